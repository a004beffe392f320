"""AutoNEB (`mcensemble.paths.neb`): the tangent, the projection, the redistribution, the
insertion scores, the run end to end (lower than the straight line), the path file, BatchNorm
per pivot, resuming bit for bit, two processes, and `--method neb` through the pipeline."""
from __future__ import annotations

import dataclasses
import os
import socket

import pytest
import torch

from helpers import assert_close_rel, timm_factory
from mcensemble.data import create_loader
from mcensemble.errors import BadOptionError, CheckpointError
from mcensemble.evaluate import scan
from mcensemble.paths import LinearPath, load_path
from mcensemble.paths.neb import (Band, NebConfig, NebPath, fit_neb, improved_tangent_weights,
                                  insertion_scores, read_neb_checkpoint)

TINY = NebConfig(cycles=((8, 0.1), (8, 0.1)), insert=1, dense_points=3, eval_batches=1)
DATA = "digits,train=256"


def _mlp(width: int) -> torch.nn.Module:
    # not mcensemble.zoo: importing timm makes the two spawned processes slow to start
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, width), torch.nn.ReLU(),
                               torch.nn.Linear(width, 10))


def _mlp_states(width: int = 8):
    torch.manual_seed(1)
    a = _mlp(width).state_dict()
    torch.manual_seed(2)
    b = _mlp(width).state_dict()
    return _mlp(width).train(), a, b


def _states_of(files):
    from mcensemble.checkpoints import load_checkpoint
    return [load_checkpoint(f).state_dict for f in files]


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in ts])


@pytest.mark.parametrize("losses, want", [
    ((0.0, 1.0, 2.0), (1.0, 0.0)),   # rising: towards the higher next pivot
    ((2.0, 1.0, 0.0), (0.0, 1.0)),   # falling: towards the higher previous pivot
    ((0.0, 3.0, 1.0), (3.0, 2.0)),   # a maximum: mix, the bigger weight towards the higher neighbour (next)
    ((1.0, 3.0, 0.0), (2.0, 3.0)),   # a maximum: ... (previous)
    ((1.0, 0.0, 3.0), (3.0, 1.0)),   # a minimum: ... (next)
    ((1.0, 1.0, 1.0), (0.5, 0.5)),   # flat
])
def test_improved_tangent_weights(losses, want):
    assert improved_tangent_weights(*losses) == pytest.approx(want)


@pytest.mark.parametrize("kw, name", [
    ({"cycles": ()}, "cycles"), ({"cycles": ((0, 0.1),)}, "cycles"), ({"cycles": ((5, -1.0),)}, "cycles"),
    ({"cycles": (5,)}, "cycles"), ({"insert": 0}, "insert"), ({"momentum": 1.0}, "momentum"),
    ({"weight_decay": -1.0}, "weight_decay"), ({"dense_points": 0}, "dense_points"),
    ({"max_pivots": 1, "insert": 2}, "max_pivots"), ({"eval_batches": 0}, "eval_batches"),
    ({"seed": 1.5}, "seed"), ({"threshold": float("nan")}, "threshold"),
])
def test_config_errors_name_the_parameter(kw, name):
    with pytest.raises(BadOptionError, match=name) as e:
        NebConfig(**kw)
    assert e.value.option == name


def test_config_is_frozen_and_normalised():
    cfg = NebConfig(cycles=[[3, 1]])
    assert cfg.cycles == ((3, 1.0),) and cfg.total_steps == 3
    with pytest.raises(Exception):
        cfg.insert = 3  # type: ignore[misc]


def test_insertion_scores():
    # two segments; the second bulges 1.0 above its chord at s = 0.5, the spread of the pivots is 2
    scores = insertion_scores([0.0, 2.0, 2.0], [[0.5, 1.0, 1.5], [2.0, 3.0, 2.0]], [0.25, 0.5, 0.75])
    assert scores[0][0] == pytest.approx(0.0)
    assert scores[1] == pytest.approx((0.5, 0.5))


@pytest.mark.parametrize("losses", [(0.0, 1.0, 2.0), (2.0, 1.0, 0.0), (0.0, 3.0, 1.0)])
def test_step_moves_pivots_perpendicular_to_the_improved_tangent(losses):
    net, a, b = _mlp_states()
    band = Band(net, a, b, momentum=0.0, weight_decay=0.0)
    band.insert_even(1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # push the pivot off the line so that tau+ and tau- differ
        for p in band.pivots[0]:
            p.add_(torch.randn(p.shape, generator=g))
    before = [p.clone() for p in band.pivots[0]]
    grads = [[torch.randn(p.shape, generator=g) for p in band.pivots[0]]]
    want_g = _flat(grads[0])
    prev, here, nxt = (_flat(x) for x in (band.A, before, band.B))
    c_plus, c_minus = improved_tangent_weights(*losses)
    tau = c_plus * (nxt - here) / (nxt - here).norm() + c_minus * (here - prev) / (here - prev).norm()
    tau = tau / tau.norm()
    band._update(grads, list(losses), lr=0.1)
    move = _flat(band.pivots[0]) - here
    assert abs(float(move @ tau)) < 1e-6 * float(move.norm())
    assert_close_rel(move, -0.1 * (want_g - (want_g @ tau) * tau), rtol=1e-5)


def test_redistribute_puts_pivots_at_their_arc_length_fractions():
    net, a, b = _mlp_states()
    band = Band(net, a, b)
    band.insert_even(2)
    band.insert(0, 0.5)  # weights 1/6, 1/6, 1/3, 1/3
    assert band.weights == pytest.approx([1 / 6, 1 / 6, 1 / 3, 1 / 3])
    line = [_flat(band.A), _flat(band.B)]
    with torch.no_grad():  # slide the pivots along the straight line, away from their places
        for piv, s in zip(band.pivots, (0.05, 0.1, 0.9)):
            for p, x, y in zip(piv, band.A, band.B):
                p.copy_(torch.lerp(x, y, s))
    band.redistribute()
    for piv, t in zip(band.pivots, band.ts()[1:-1]):
        torch.testing.assert_close(_flat(piv), torch.lerp(line[0], line[1], t), rtol=1e-5, atol=1e-6)
    # off the line: every new pivot lies on the old polyline, at its arc-length fraction
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for piv in band.pivots:
            for p in piv:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    old = [_flat(p) for p in band.points()]
    seg = [float((old[j + 1] - old[j]).norm()) for j in range(len(old) - 1)]
    band.redistribute()
    cum = torch.tensor([0.0] + seg).cumsum(0).tolist()
    for piv, t in zip(band.pivots, band.ts()[1:-1]):
        d = t * cum[-1]
        j = max(k for k in range(len(seg)) if cum[k] <= d)
        want = torch.lerp(old[j], old[j + 1], (d - cum[j]) / seg[j])
        torch.testing.assert_close(_flat(piv), want, rtol=1e-5, atol=1e-6)


def test_fit_neb_is_lower_than_the_line_and_round_trips(mce_mlp_pair, tmp_path):
    a, b = _states_of(mce_mlp_pair)
    make = timm_factory("mce_digits_mlp", width=32)
    loader = create_loader(DATA, batch_size=64, shuffle=True, seed=0)
    path = fit_neb(make(), a, b, loader, config=TINY, progress=False)
    assert isinstance(path, NebPath) and path.kind == "neb"
    hist = path.metadata["neb"]["cycles_run"]
    assert hist[0]["pivots"] == 1 and hist[1]["pivots"] == path.n_pivots >= 1
    assert path.vertex_t[0] == 0.0 and path.vertex_t[-1] == 1.0
    assert all(x < y for x, y in zip(path.vertex_t, path.vertex_t[1:]))
    ev = create_loader(DATA, batch_size=256)
    neb, line = (scan(p, make(), ev, points=21) for p in (path, LinearPath(a, b)))
    assert neb.barrier < 0.5 * line.barrier, (neb.barrier, line.barrier)
    for k, v in a.items():  # ends untouched, pivots are the vertices' states
        assert torch.equal(path.state_at(0.0)[k], v)
    piv = path.control_points[1]
    mid = path.state_at(path.vertex_t[1])
    assert all(torch.equal(mid[k], piv[k]) for k in piv)
    path.save(tmp_path / "neb.safetensors")
    back = load_path(tmp_path / "neb.safetensors", verify=True)
    assert isinstance(back, NebPath) and back.vertex_t == pytest.approx(path.vertex_t)
    for t in (0.3, path.vertex_t[1], 0.77):
        s1, s2 = path.state_at(t), back.state_at(t)
        assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_pivots_carry_re_estimated_batchnorm(mce_cnn_pair):
    from mcensemble.bn import update_bn
    a, b = _states_of(mce_cnn_pair)
    make = timm_factory("mce_digits_cnn", widths=[4, 8])
    loader = create_loader("digits,train=128", batch_size=64, shuffle=True, seed=0)
    bn_loader = create_loader("digits,train=128", batch_size=128)
    cfg = NebConfig(cycles=((2, 0.05),), insert=1, eval_batches=1)
    path = fit_neb(make(), a, b, loader, config=cfg, bn_loader=bn_loader, progress=False)
    piv = path.control_points[1]
    net = make()
    net.load_state_dict(piv)
    update_bn(net, bn_loader)
    key = next(k for k in piv if k.endswith("running_mean"))
    assert not torch.allclose(piv[key], torch.lerp(a[key], b[key], 0.5))  # not the interpolation
    torch.testing.assert_close(piv[key], net.state_dict()[key], rtol=1e-5, atol=1e-6)


class _Stop(Exception):
    pass


def test_resume_is_bit_identical(tmp_path):
    net, a, b = _mlp_states(width=16)
    loader = create_loader(DATA, batch_size=64, shuffle=True, seed=0)
    cfg = NebConfig(cycles=((5, 0.1), (5, 0.05)), insert=1, dense_points=3, eval_batches=1, seed=3)
    ref = fit_neb(net, a, b, loader, config=cfg, progress=False)
    ck = tmp_path / "neb.ck"

    def stop_at_7(cycle, step, losses):
        if cycle == 1 and step == 2:
            raise _Stop
    with pytest.raises(_Stop):
        fit_neb(net, a, b, loader, config=cfg, progress=False, checkpoint=ck, checkpoint_every=2, callback=stop_at_7)
    meta = read_neb_checkpoint(ck)[1]
    assert (meta["cycle"], meta["step"], meta["finished"]) == (1, 1, False)
    with pytest.raises(BadOptionError, match="`resume`"):
        fit_neb(net, a, b, loader, config=cfg, progress=False, checkpoint=ck)
    with pytest.raises(CheckpointError, match="seed"):
        fit_neb(net, a, b, loader, config=dataclasses.replace(cfg, seed=4), progress=False,
                checkpoint=ck, resume=True)
    got = fit_neb(net, a, b, loader, config=cfg, progress=False, checkpoint=ck, resume=True)
    assert got.vertex_t == ref.vertex_t
    for p, q in zip(got.control_points, ref.control_points):
        assert all(torch.equal(p[k], q[k]) for k in q)
    assert read_neb_checkpoint(ck)[1]["finished"]


def test_pipeline_method_neb(mce_cnn_pair):
    from mcensemble.options import BuildOptions, DataOptions, ModelOptions
    from mcensemble.pipeline import scan_checkpoints
    cfg = NebConfig(cycles=((3, 0.05),), insert=1, eval_batches=1)
    rep = scan_checkpoints(list(mce_cnn_pair), model=ModelOptions(), data=DataOptions(data="digits,train=128"),
                           points=3, opts=BuildOptions(method="neb", settings=cfg, align=False))
    assert rep["method"] == "neb" and rep["kind"] == "neb" and rep["bn_reestimated"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    from mcensemble import distributed as D
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    with D.session("cpu"):
        net, a, b = _mlp_states(width=16)
        loader = create_loader(DATA, batch_size=64, shuffle=True, seed=0)
        path = fit_neb(net, a, b, loader, config=TINY, progress=False)
        torch.save({"pivots": path.control_points[1:-1], "vertices": path.vertex_t}, os.path.join(out, f"{rank}.pt"))


def test_two_processes_average_gradients_like_one(tmp_path):
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    net, a, b = _mlp_states(width=16)
    one = fit_neb(net, a, b, create_loader(DATA, batch_size=64, shuffle=True, seed=0), config=TINY, progress=False)
    assert ranks[0]["vertices"] == ranks[1]["vertices"] == pytest.approx(one.vertex_t)
    for p0, p1, q in zip(ranks[0]["pivots"], ranks[1]["pivots"], one.control_points[1:-1]):
        for k in q:
            assert torch.equal(p0[k], p1[k])  # identical on every rank
            torch.testing.assert_close(p0[k], q[k], rtol=1e-4, atol=1e-5)  # the full batch's gradient
