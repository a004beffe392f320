import pytest
import torch
import torch.nn as nn

from mcensemble.errors import BadOptionError
from mcensemble.evaluate import evaluate
from mcensemble.paths import BezierPath, LinearPath
from mcensemble.plane import _coords, _state_on_plane, plane_basis, project, scan_plane
from mcensemble.plot import plot_plane


def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.fixture
def setup():
    a, b = _mlp(0).state_dict(), _mlp(1).state_dict()
    bend = {k: 0.5 * (a[k] + b[k]) + 0.3 * torch.randn_like(a[k]) for k in a}
    x = torch.randn(24, 1, 4, 4)
    y = torch.randint(0, 3, (24,))
    loader = [(x[:12], y[:12]), (x[12:], y[12:])]
    return a, b, bend, loader


def test_projection_of_the_three_points(setup):
    a, b, bend, _ = setup
    names = _coords(_mlp(0), a)
    basis = plane_basis(a, b, bend, names)
    ax, ay = project(a, names, basis)
    bx, by = project(b, names, basis)
    px, py = project(bend, names, basis)
    dist = torch.cat([(b[n] - a[n]).reshape(-1) for n in names]).double().norm().item()
    assert (ax, ay) == pytest.approx((0.0, 0.0), abs=1e-9)
    assert (bx, by) == pytest.approx((dist, 0.0), rel=1e-6, abs=1e-6)
    assert py > 0
    # a grid point at the bend's coordinates reproduces the bend
    st = _state_on_plane(px, py, a, names, basis)
    for n in names:
        torch.testing.assert_close(st[n], bend[n], atol=1e-5, rtol=1e-5)


def test_scan_plane_grid_and_paths(setup, tmp_path):
    a, b, bend, loader = setup
    path = BezierPath(a, b, [bend])
    model = _mlp(0)
    res = scan_plane(path, model, loader, resolution=3, path_points=5, others={"linear": LinearPath(a, b)})
    assert len(res.xs) == len(res.ys) == 3 and len(res.loss) == 3 and len(res.loss[0]) == 3
    names = _coords(model, a)
    basis = plane_basis(a, b, bend, names)
    model.load_state_dict(_state_on_plane(res.xs[1], res.ys[2], a, names, basis))
    assert res.loss[2][1] == pytest.approx(evaluate(model, loader).loss, rel=1e-6)
    # a one-bend Bezier curve lies in the plane: its midpoint is 0.25 A + 0.5 P + 0.25 B
    mid = res.paths["bezier"][2]
    want = [0.25 * p + 0.5 * q + 0.25 * r for p, q, r in zip(res.points["A"], res.points["bend"], res.points["B"])]
    assert mid == pytest.approx(want, rel=1e-5, abs=1e-6)
    tol = 1e-5 * max(1.0, abs(res.points["B"][0]))  # float32 rounding grows with the distance
    assert all(y == pytest.approx(0.0, abs=tol) for _, y in res.paths["linear"])
    plot_plane(res, tmp_path / "plane.png", title="t")
    assert (tmp_path / "plane.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plane_needs_a_bend(setup):
    a, b, _, loader = setup
    with pytest.raises(BadOptionError, match="no bend: `plane` needs a bezier or polychain path"):
        scan_plane(LinearPath(a, b), _mlp(0), loader)
    straight = {k: 0.5 * (a[k] + b[k]) for k in a}
    with pytest.raises(BadOptionError, match="lies on the straight line"):
        scan_plane(BezierPath(a, b, [straight]), _mlp(0), loader)
    with pytest.raises(BadOptionError, match="at least 2 points"):
        scan_plane(BezierPath(a, b, [straight]), _mlp(0), loader, resolution=1)


# moved from test_review_fixes.py
from helpers import gaussian_batches as _data  # noqa: E402


def test_scan_plane_leaves_the_model_alone():
    from mcensemble.paths import BezierPath
    from mcensemble.plane import scan_plane

    torch.manual_seed(0)
    mk = lambda: nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))  # noqa: E731
    a, b = mk().state_dict(), mk().state_dict()
    bend = {k: (0.5 * (a[k] + b[k]) + 0.3 * torch.randn_like(a[k])) if a[k].is_floating_point() else a[k]
            for k in a}
    model = mk().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = scan_plane(BezierPath(a, b, [bend]), model, _data(), bn_loader=_data(), resolution=2, path_points=3)
    assert res.bn_reestimated and model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(BadOptionError, match="path_points"):
        scan_plane(BezierPath(a, b, [bend]), model, _data(), path_points=1)


def test_grid_on_a_fixed_subsample_with_batchnorm():
    """`sample_examples`: each grid point's BatchNorm re-estimation and loss on the same fixed
    subsample (here the first of three batches), and the result says so."""
    from mcensemble.bn import FixedSubset, update_bn

    def net(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    a, b = net(0).state_dict(), net(1).state_dict()
    bend = {k: (0.5 * (a[k] + b[k]) + 0.3 * torch.randn_like(a[k])) if a[k].is_floating_point() else a[k]
            for k in a}
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(10, 1, 4, 4, generator=g), torch.randint(0, 3, (10,), generator=g)) for _ in range(3)]
    res = scan_plane(BezierPath(a, b, [bend]), net(0), loader, bn_loader=loader, resolution=2, path_points=3,
                     sample_examples=10)
    assert res.bn_reestimated and "10 examples in 1 batches of 3" in res.data
    model = net(0)
    names = _coords(model, a)
    model.load_state_dict(_state_on_plane(res.xs[1], res.ys[0], a, names, plane_basis(a, b, bend, names)))
    sub = FixedSubset(loader, 10)
    update_bn(model, sub)
    assert res.loss[0][1] == pytest.approx(evaluate(model, sub).loss, rel=1e-6)
    assert res.loss[0][1] != pytest.approx(evaluate(model, loader).loss, rel=1e-6)
    full = scan_plane(BezierPath(a, b, [bend]), net(0), loader, bn_loader=loader, resolution=2, path_points=3,
                      sample_examples=None)
    assert full.data == "loss on all the training data; BatchNorm re-estimated at every point on all the training data"
