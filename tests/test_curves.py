"""Bezier / PolyChain paths (mcensemble.paths.curves) and curve fitting (mcensemble.paths.fit)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from mcensemble.errors import ArchitectureMismatchError, BadOptionError
from mcensemble.paths.curves import BezierPath, PolyChainPath
from mcensemble.paths.curve_base import CurveConfig, bezier_coefficients, polychain_coefficients, straight_bends
from mcensemble.paths.fit import CurveFitter, fit_curve
from mcensemble.paths.fit_run import lr_factor
from mcensemble.zoo import DigitsCNN, DigitsMLP

from helpers import clone_state, timm_factory, train_pair


def small_cnn():
    return DigitsCNN(widths=(8, 16))


def random_state(make, seed):
    torch.manual_seed(seed)
    m = make()
    with torch.no_grad():  # non-trivial BN statistics too
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_()
                mod.running_var.uniform_(0.5, 2.0)
                mod.num_batches_tracked.fill_(seed + 3)
    return clone_state(m)


def random_bends(a, n, seed=100):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        bend = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in a.items() if v.is_floating_point()}
        for k in bend:
            if k.endswith("running_var"):
                bend[k] = bend[k].abs() + 0.5
        out.append(bend)
    return out


# ----------------------------------------------------------------------------- coefficients
@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("t", [0.0, 0.1, 0.37, 0.5, 0.9, 1.0])
def test_coefficients_sum_to_one(n, t):
    for fn in (bezier_coefficients, polychain_coefficients):
        c = fn(t, n)
        assert len(c) == n + 2
        assert math.isclose(sum(c), 1.0, abs_tol=1e-12)
        assert all(ci >= 0 for ci in c)


def test_coefficient_values():
    assert bezier_coefficients(0.5, 1) == [0.25, 0.5, 0.25]
    assert bezier_coefficients(0.0, 2) == [1.0, 0.0, 0.0, 0.0]
    assert bezier_coefficients(1.0, 2) == [0.0, 0.0, 0.0, 1.0]
    assert polychain_coefficients(0.25, 1) == [0.5, 0.5, 0.0]
    assert polychain_coefficients(0.5, 1) == [0.0, 1.0, 0.0]
    assert polychain_coefficients(1.0, 3) == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert polychain_coefficients(2 / 3, 2) == [0.0, 0.0, 1.0, 0.0]  # snaps to the vertex


# ----------------------------------------------------------------------------- paths
@pytest.mark.parametrize("cls", [BezierPath, PolyChainPath])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_endpoints_exact(cls, n):
    a, b = random_state(small_cnn, 1), random_state(small_cnn, 2)
    path = cls(a, b, random_bends(a, n))
    assert path.n_bends == n and len(path.bends) == n
    s0, s1 = path.state_at(0), path.state_at(1.0)
    assert s0.keys() == a.keys() == s1.keys()
    assert all(torch.equal(s0[k], a[k]) and s0[k].dtype == a[k].dtype for k in a)
    assert all(torch.equal(s1[k], b[k]) for k in b)
    s0["head.weight"].add_(1.0)  # fresh tensors: the path does not change
    assert torch.equal(path.state_at(0)["head.weight"], a["head.weight"])


def test_bezier_one_bend_midpoint_and_buffers():
    a, b = random_state(small_cnn, 1), random_state(small_cnn, 2)
    (p,) = random_bends(a, 1)
    path = BezierPath(a, b, [p])
    assert path.kind == "bezier" and path.vertex_t is None
    assert path.coefficients(0.5) == [0.25, 0.5, 0.25]
    mid = path.state_at(0.5)
    for k, v in a.items():
        if v.is_floating_point():  # parameters and BN running stats: by the formula
            torch.testing.assert_close(mid[k], 0.25 * a[k] + 0.5 * p[k] + 0.25 * b[k], rtol=1e-6, atol=1e-6)
        else:  # num_batches_tracked: A's
            assert torch.equal(mid[k], a[k])
    t = 0.3
    c = [(1 - t) ** 2, 2 * t * (1 - t), t ** 2]
    s = path.state_at(t)
    torch.testing.assert_close(s["head.bias"], c[0] * a["head.bias"] + c[1] * p["head.bias"] + c[2] * b["head.bias"])


def test_straight_bends_give_the_straight_line():
    a, b = random_state(small_cnn, 1), random_state(small_cnn, 2)
    for cls in (BezierPath, PolyChainPath):
        path = cls(a, b, straight_bends(a, b, 2))
        s = path.state_at(0.4)
        torch.testing.assert_close(s["features.0.weight"], 0.6 * a["features.0.weight"] + 0.4 * b["features.0.weight"])


def test_polychain_vertices_and_segments():
    a, b = random_state(small_cnn, 1), random_state(small_cnn, 2)
    bends = random_bends(a, 3)
    path = PolyChainPath(a, b, bends)
    assert path.kind == "polychain"
    assert path.vertex_t == [0.0, 0.25, 0.5, 0.75, 1.0]
    for i, t in enumerate([0.25, 0.5, 0.75]):
        s = path.state_at(t)
        assert all(torch.equal(s[k], bends[i][k]) for k in bends[i])  # bit for bit at a vertex
        assert torch.equal(s["features.1.num_batches_tracked"], a["features.1.num_batches_tracked"])
    s = path.state_at(0.3)  # 20% of the way from bend 0 to bend 1
    torch.testing.assert_close(s["head.weight"], 0.8 * bends[0]["head.weight"] + 0.2 * bends[1]["head.weight"])
    s = path.state_at(0.1)
    torch.testing.assert_close(s["head.weight"], 0.6 * a["head.weight"] + 0.4 * bends[0]["head.weight"])


def test_functional_call_matches_module_forward():
    a, b = random_state(small_cnn, 1), random_state(small_cnn, 2)
    path = BezierPath(a, b, random_bends(a, 2))
    state = path.state_at(0.3)
    x = torch.rand(16, 1, 8, 8)
    m1, m2 = small_cnn().eval(), small_cnn().eval()
    m2.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(functional_call(m1, state, (x,)), m2(x), rtol=0, atol=0)


def test_path_errors():
    a, b = random_state(small_cnn, 1), random_state(small_cnn, 2)
    with pytest.raises(BadOptionError, match="at least one bend"):
        BezierPath(a, b, [])
    bad = random_bends(a, 1)
    del bad[0]["head.bias"]
    with pytest.raises(ArchitectureMismatchError, match="head.bias"):
        PolyChainPath(a, b, bad)
    bad = random_bends(a, 1)
    bad[0]["head.weight"] = torch.zeros(3, 3)
    with pytest.raises(ArchitectureMismatchError, match="head.weight"):
        BezierPath(a, b, bad)
    path = BezierPath(a, b, random_bends(a, 1))
    with pytest.raises(BadOptionError, match=r"\[0, 1\]"):
        path.state_at(1.5)


def test_save_load_round_trip(tmp_path):
    from mcensemble.paths import load_path
    a, b = random_state(small_cnn, 1), random_state(small_cnn, 2)
    for cls, n in ((BezierPath, 2), (PolyChainPath, 3)):
        path = cls(a, b, random_bends(a, n))
        f = tmp_path / f"{path.kind}.safetensors"
        path.save(f, extra={"note": "x"})
        back = load_path(f)
        assert type(back) is cls and back.kind == path.kind and back.n_bends == n
        assert back.vertex_t == path.vertex_t
        assert back.metadata["bends"] == n and back.metadata["note"] == "x"
        for i in range(n):
            assert all(torch.equal(back.bends[i][k], path.bends[i][k]) for k in path.bends[i])
        for t in (0.0, 0.3, 0.5, 1.0):
            s1, s2 = path.state_at(t), back.state_at(t)
            assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_lazy_exports():
    import mcensemble.paths as paths
    assert paths.BezierPath is BezierPath and paths.PolyChainPath is PolyChainPath
    assert paths.fit_curve is fit_curve


# ----------------------------------------------------------------------------- fitting
def test_lr_schedule():
    assert lr_factor(0, 100) == 1.0 and lr_factor(49, 100) == 1.0
    assert lr_factor(99, 100) == pytest.approx(0.01)
    assert lr_factor(74, 100) == pytest.approx(1 - 0.99 * (74 / 99 - 0.5) / 0.5)
    assert lr_factor(0, 1) == 1.0


@pytest.mark.parametrize("kind,n", [("bezier", 1), ("bezier", 3), ("polychain", 2)])
def test_step_equals_autograd_through_bends(kind, n):
    """The hand-applied chain rule + foreach SGD equals autograd through theta(t) into the
    bends with loss + wd/2 ||theta||^2 and torch.optim.SGD(momentum=0.9)."""
    a, b = random_state(small_cnn, 1), random_state(small_cnn, 2)
    model = small_cnn().train()
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    fitter = CurveFitter(model, a, b, kind=kind, bends=n, momentum=0.9, weight_decay=1e-3)
    pnames = dict(model.named_parameters())
    names = fitter.floating
    ref = [[p.clone().requires_grad_(k in pnames) for p, k in zip(bend, names)] for bend in fitter.bends]
    opt = torch.optim.SGD([p for bend in ref for p in bend if p.requires_grad], lr=0.1, momentum=0.9)
    coef_fn = bezier_coefficients if kind == "bezier" else polychain_coefficients
    for t in (0.3, 0.8, 0.55):
        fitter.step(x, y, t, 0.1)
        ctrl = [fitter.A, *ref, fitter.B]
        theta = {k: sum(c * ctrl[i][j] for i, c in enumerate(coef_fn(t, n))) for j, k in enumerate(names)}
        state = {k: (v if k in pnames else v.detach().clone()) for k, v in theta.items()}
        state.update({k: v.clone() for k, v in a.items() if not v.is_floating_point()})
        loss = F.cross_entropy(functional_call(model, state, (x,)), y)
        loss = loss + 1e-3 / 2 * sum((theta[k] ** 2).sum() for k in names if k in pnames)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for bend, rbend in zip(fitter.bends, ref):
        for p, q in zip(bend, rbend):
            torch.testing.assert_close(p, q.detach(), rtol=1e-5, atol=1e-6)


def digits_loaders():
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
    y = torch.tensor(d.target, dtype=torch.int64)
    ds = TensorDataset(x[:1200], y[:1200])
    train = DataLoader(ds, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    full = DataLoader(ds, batch_size=600)
    return train, full


def mean_loss(model, state, loader):
    from mcensemble.bn import update_bn
    model.load_state_dict(state)
    update_bn(model, loader)  # no-op without BN
    model.eval()
    with torch.no_grad():
        tot = sum(F.cross_entropy(model(x), y, reduction="sum").item() for x, y in loader)
    return tot / len(loader.dataset)


def train_endpoints(make, epochs):
    train, full = digits_loaders()
    a, b = (clone_state(m) for m in train_pair(make, epochs=epochs, seeds=(1, 2), data=train))
    return a, b, train, full


def mlp():
    return DigitsMLP(width=64)


@pytest.fixture(scope="module")
def mlp_endpoints():
    return train_endpoints(mlp, 10)


@pytest.fixture(scope="module")
def cnn_endpoints():
    return train_endpoints(small_cnn, 6)


@pytest.mark.parametrize("kind", ["bezier", "polychain"])
def test_fit_mlp_lowers_midpoint_loss(mlp_endpoints, kind):
    a, b, train, full = mlp_endpoints
    a0, b0 = clone_state(a), clone_state(b)
    model = mlp()
    own = clone_state(model)
    model.eval()
    steps = []
    path = fit_curve(model, a, b, train, config=CurveConfig(kind=kind, epochs=15, bends=1),
                     progress=False, callback=lambda s, t, loss: steps.append((s, t, loss)))
    assert isinstance(path, BezierPath if kind == "bezier" else PolyChainPath) and path.n_bends == 1
    # a, b and the model's own weights untouched; training flags restored
    assert all(torch.equal(a[k], a0[k]) for k in a) and all(torch.equal(b[k], b0[k]) for k in b)
    assert all(torch.equal(v, own[k]) for k, v in model.state_dict().items())
    assert not any(m.training for m in model.modules())
    assert [s for s, _, _ in steps] == list(range(15 * len(train)))
    assert all(0 <= t <= 1 and math.isfinite(loss) for _, t, loss in steps)
    lin_mid = mean_loss(model, {k: 0.5 * a[k] + 0.5 * b[k] for k in a}, full)
    curve_mid = mean_loss(model, path.state_at(0.5), full)
    end_loss = max(mean_loss(model, a, full), mean_loss(model, b, full))
    assert curve_mid < 0.5 * lin_mid, (curve_mid, lin_mid)
    assert curve_mid < end_loss + 0.5 * (lin_mid - end_loss)
    assert all(torch.equal(path.state_at(0)[k], a0[k]) for k in a)


@pytest.mark.parametrize("kind", ["bezier", "polychain"])
def test_fit_bn_cnn_lowers_midpoint_loss(cnn_endpoints, kind):
    a, b, train, full = cnn_endpoints
    a0, b0 = clone_state(a), clone_state(b)
    model = small_cnn().train()
    path = fit_curve(model, a, b, train, config=CurveConfig(kind=kind, epochs=4, bends=1), progress=False)
    assert all(torch.equal(a[k], a0[k]) for k in a) and all(torch.equal(b[k], b0[k]) for k in b)
    assert all(m.training for m in model.modules())
    lin_mid = mean_loss(model, {k: (0.5 * a[k] + 0.5 * b[k]) if a[k].is_floating_point() else a[k] for k in a}, full)
    curve_mid = mean_loss(model, path.state_at(0.5), full)  # BN re-estimated at t = 0.5
    assert curve_mid < 0.4 * lin_mid, (curve_mid, lin_mid)
    # the bends of the BN buffers were not trained: still on the straight line
    bn_key = "features.1.running_mean"
    torch.testing.assert_close(path.bends[0][bn_key], 0.5 * a[bn_key] + 0.5 * b[bn_key])
    assert "features.1.num_batches_tracked" not in path.bends[0]


def test_same_seed_same_bends_and_rng_untouched():
    train = lambda: digits_loaders()[0]  # a fresh loader: the same batch order  # noqa: E731
    make = lambda: DigitsMLP(width=64, drop_rate=0.2)  # dropout draws from the seeded RNG  # noqa: E731
    a, b = random_state(make, 1), random_state(make, 2)
    cfg = CurveConfig(kind="bezier", bends=2, epochs=2, seed=7, max_grad_norm=1.0)
    model = make()
    state = torch.random.get_rng_state()
    p1 = fit_curve(model, a, b, train(), config=cfg, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    p2 = fit_curve(make, a, b, train(), config=cfg, progress=False)  # a factory works too
    p3 = fit_curve(make(), a, b, train(), config=CurveConfig(kind="bezier", bends=2, epochs=2, seed=8),
                   progress=False)
    for i in range(2):
        assert all(torch.equal(p1.bends[i][k], p2.bends[i][k]) for k in p1.bends[i])
    assert not torch.equal(p1.bends[0]["head.weight"], p3.bends[0]["head.weight"])


def test_fit_timm_model_and_save(tmp_path):
    from mcensemble.paths import load_path
    make = timm_factory("test_resnet")
    torch.manual_seed(0)
    a, b = clone_state(make()), clone_state(make())
    ds = TensorDataset(torch.rand(32, 1, 16, 16), torch.randint(0, 10, (32,)))
    path = fit_curve(make(), a, b, DataLoader(ds, batch_size=16),
                     config=CurveConfig(kind="polychain", bends=1, epochs=1), progress=False)
    assert path.kind == "polychain" and path.metadata["fit"]["steps"] == 2
    nbt = [k for k in a if k.endswith("num_batches_tracked")]
    assert nbt and all(torch.equal(path.state_at(0.3)[k], a[k]) for k in nbt)
    path.save(tmp_path / "p.safetensors")
    back = load_path(tmp_path / "p.safetensors")
    s1, s2 = path.state_at(0.7), back.state_at(0.7)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(64, 64)
        self.dec = nn.Linear(64, 64)
        self.dec.weight = self.enc.weight
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(torch.relu(self.dec(torch.relu(self.enc(x.flatten(1))))))


def test_fit_tied_weights():
    torch.manual_seed(0)
    a, b = clone_state(Tied()), clone_state(Tied())
    a["dec.weight"] = a["enc.weight"]
    b["dec.weight"] = b["enc.weight"]
    ds = TensorDataset(torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,)))
    path = fit_curve(Tied(), a, b, DataLoader(ds, batch_size=16), config=CurveConfig(epochs=2), progress=False)
    bend = path.bends[0]
    assert torch.equal(bend["dec.weight"], bend["enc.weight"])
    assert not torch.equal(bend["enc.weight"], 0.5 * a["enc.weight"] + 0.5 * b["enc.weight"])


@pytest.mark.parametrize("field,value,match", [
    ("bends", 0, "`bends`"), ("epochs", 0, "`epochs`"), ("lr", 0.0, "`lr`"), ("lr", -1.0, "`lr`"),
    ("kind", "spline", "unknown curve kind 'spline'"), ("max_grad_norm", 0.0, "`max_grad_norm`"),
    ("weight_decay", -1.0, "`weight_decay`"),
])
def test_bad_config(field, value, match):
    with pytest.raises(BadOptionError, match=match) as e:  # validated when made, before any fit
        CurveConfig(**{field: value})
    assert e.value.option == ("method" if field == "kind" else field)


def test_architecture_mismatch():
    a = random_state(small_cnn, 1)
    b = clone_state(a)
    b["head.weight"] = torch.zeros(10, 7)
    loader = DataLoader(TensorDataset(torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))))
    with pytest.raises(ArchitectureMismatchError, match=r"head\.weight.*\(10, 64\).*\(10, 7\)"):
        fit_curve(small_cnn(), a, b, loader, config=CurveConfig(epochs=1))
    with pytest.raises(ArchitectureMismatchError, match="features.0.weight"):
        fit_curve(DigitsCNN(widths=(4, 16)), a, clone_state(a), loader, config=CurveConfig(epochs=1))


def test_default_fit_is_flat_on_a_small_bn_cnn_pair():
    """The default fit (B aligned to A first, as `build` does for curves, then `CurveConfig()`:
    20 epochs in batches of 128) keeps the whole curve within 2x of the endpoints' training
    loss, BN re-estimated at every point; the straight line between them is far above."""
    from mcensemble.align import align_states
    from mcensemble.data import digits_tensors
    from mcensemble.paths.curve_base import bend_lr_scale
    x, y = digits_tensors("train")
    ds = TensorDataset(x[:600], y[:600])
    make = small_cnn
    a, b = (clone_state(m) for m in train_pair(make, epochs=10, data=DataLoader(
        ds, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))))
    b_aligned = align_states(make(), a, b, example_input=x[:4]).state
    path = fit_curve(make(), a, b_aligned, DataLoader(ds, batch_size=128, shuffle=True), config=CurveConfig(),
                     progress=False)
    assert path.metadata["fit"]["bend_lr"] == pytest.approx(CurveConfig.lr * bend_lr_scale("bezier", 1))
    full = DataLoader(ds, batch_size=600)
    model = make()
    losses = [mean_loss(model, path.state_at(i / 10), full) for i in range(11)]
    ends = 0.5 * (losses[0] + losses[-1])
    assert max(losses) <= 2.0 * ends, losses
    line_mid = mean_loss(model, {k: (0.5 * a[k] + 0.5 * b[k]) if a[k].is_floating_point() else a[k] for k in a}, full)
    assert line_mid > 10 * ends, (line_mid, ends)


@pytest.mark.parametrize("kind, n, scale", [("bezier", 1, 4.0), ("bezier", 2, 1 / (2 * (3 / 8) ** 2)),
                                            ("polychain", 1, 1.0), ("polychain", 3, 1.0)])
def test_bend_lr_scale(kind, n, scale):
    from mcensemble.paths.curve_base import bend_lr_scale
    assert bend_lr_scale(kind, n) == pytest.approx(scale, rel=1e-6)


class _WithSpare(nn.Module):
    """A CNN with a parameter the loss does not use and a frozen one."""

    def __init__(self):
        super().__init__()
        self.net = small_cnn()
        self.spare = nn.Parameter(torch.randn(3))
        self.frozen = nn.Parameter(torch.randn(2), requires_grad=False)

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_streamed_step_equals_the_materialised_one(momentum):
    """Without clipping each tensor's gradient is applied during backward and freed (bounded
    memory); with a clipping bound it never reaches, the gradients are all materialised first
    and updated with foreach ops: the bends must come out bit for bit the same."""
    torch.manual_seed(0)
    a, b = _WithSpare().state_dict(), _WithSpare().state_dict()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    out = []
    for clip in (None, 1e30):
        torch.manual_seed(5)
        fitter = CurveFitter(_WithSpare().train(), a, b, bends=2, momentum=momentum, weight_decay=1e-3,
                             max_grad_norm=clip, stream=True)
        assert fitter.stream                # forced: this model is below STREAM_MIN_BYTES
        for t in (0.3, 0.8, 0.55):
            fitter.step(x, y, t, 0.1)
        out.append(fitter.bend_state_dicts())
    for p, q in zip(*out):
        assert p.keys() == q.keys()
        for k in p:
            assert torch.equal(p[k], q[k]), k
    moved = out[0][0]["spare"] - torch.lerp(a["spare"], b["spare"], 1 / 3)
    assert moved.abs().max() > 0  # weight decay moves the unused parameter's bend too


def test_the_streamed_step_is_chosen_by_model_size(monkeypatch):
    import mcensemble.paths.fit as fit_mod
    a, b = _WithSpare().state_dict(), _WithSpare().state_dict()
    assert not CurveFitter(_WithSpare().train(), a, b).stream          # tiny: the hooks cost more than they save
    monkeypatch.setattr(fit_mod, "STREAM_MIN_BYTES", 1)
    assert CurveFitter(_WithSpare().train(), a, b).stream              # over the bound: streamed
    assert not CurveFitter(_WithSpare().train(), a, b, stream=False).stream
