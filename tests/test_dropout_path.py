"""The dropout-stable path: dense checks of the certificate on every segment, exact
endpoints, segment kinds, the file format, unsupported graphs."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

from mcensemble import zoo  # noqa: F401  (registers mce_* with timm)
from mcensemble.data import create_loader
from mcensemble.evaluate import evaluate
from mcensemble.paths import load_path
from mcensemble.paths import dropout as dp
from mcensemble.paths.dropout import DropoutPath, build_dropout_path
from mcensemble.errors import DropoutPathError
from mcensemble.units import build_unit_graph

from helpers import small_eval_loader, small_pair


def loss_at(model, state, ld) -> float:
    model.load_state_dict(state)
    return evaluate(model, ld).loss


def dense(path, model, ld, per_segment: int = 9) -> list[list[float]]:
    n = path.n_vertices
    return [[loss_at(model, path.state_at(min(1.0, (i + f / (per_segment - 1)) / (n - 1))), ld)
             for f in range(per_segment)] for i in range(n - 1)]


@pytest.fixture(scope="module")
def mlp_pair():
    return small_pair("mce_digits_mlp", 30, width=32, drop_rate=0.3)


@pytest.fixture(scope="module")
def cnn_pair():
    return small_pair("mce_digits_cnn", 10, channel_p=0.3, widths=(6, 8))


@pytest.fixture(scope="module")
def deep_pair():
    # three hidden layers of odd width: alternating slots, relocation at every depth
    return small_pair("mce_digits_mlp", 30, width=15, depth=3, drop_rate=0.2)


def check_certificate(path, model, a, b, ld):
    cert = path.certificate
    curves = dense(path, model, ld)
    worst = max(max(c) for c in curves)
    assert worst <= cert["max_loss"] + 1e-4, (worst, cert["max_loss"])
    assert cert["max_loss"] <= max(cert["loss_a"], cert["loss_b"]) + cert["eps"] + 1e-6
    assert cert["eps"] >= 0
    assert len(cert["vertex_losses"]) == path.n_vertices == len(cert["segments"]) + 1
    # every vertex's loss is the function's it computes (A, B, a D_k of one), checked on a
    # probe batch, not evaluated itself (the dense check below evaluates them all the same)
    fns = cert["vertex_functions"]
    assert len(fns) == path.n_vertices and fns[0] == "A" and fns[-1] == "B"
    assert cert["measured_vertices"] == [] and cert["probe"]["largest_deviation"] <= cert["probe"]["rtol"]
    d = len(path.metadata["unit_groups"])
    assert set(fns) == {"A", "B", *(f"D_{k}({s})" for k in range(1, d + 1) for s in "AB")}
    for i, seg in enumerate(cert["segments"]):  # only a classifier segment changes the function
        if seg["kind"] != "classifier":
            assert fns[i] == fns[i + 1], (i, seg)
    for i, (seg, c) in enumerate(zip(cert["segments"], curves)):
        assert seg["kind"] in ("classifier", "inactive", "switch")
        assert c[0] == pytest.approx(cert["vertex_losses"][i], rel=1e-5, abs=1e-6)
        assert c[-1] == pytest.approx(cert["vertex_losses"][i + 1], rel=1e-5, abs=1e-6)
        if seg["kind"] != "classifier":
            assert max(c) - min(c) <= 1e-5 * max(1.0, max(c)), (i, seg, c)
        else:  # convex in the classifier: below the larger end
            assert max(c) <= max(c[0], c[-1]) * (1 + 1e-5) + 1e-6
    s0, s1 = path.state_at(0.0), path.state_at(1.0)
    assert all(torch.equal(s0[k], a[k]) and torch.equal(s1[k], b[k]) for k in a)
    assert cert["loss_a"] == pytest.approx(loss_at(model, a, ld), rel=1e-5)
    assert cert["loss_b"] == pytest.approx(loss_at(model, b, ld), rel=1e-5)
    return curves


def test_mlp_path_certificate(mlp_pair):
    model, a, b = mlp_pair
    ld = small_eval_loader()
    path = build_dropout_path(model, a, b, ld)
    assert path.kind == "dropout" and path.vertex_t[0] == 0.0 and path.vertex_t[-1] == 1.0
    kinds = [s["kind"] for s in path.certificate["segments"]]
    assert kinds.count("switch") == 2  # one per hidden depth
    check_certificate(path, model, a, b, ld)
    # the model passed in is not changed
    assert all(torch.equal(model.state_dict()[k], b[k]) for k in b)


def test_bn_cnn_path_certificate(cnn_pair):
    model, a, b = cnn_pair
    ld = small_eval_loader()
    path = build_dropout_path(model, a, b, ld)
    check_certificate(path, model, a, b, ld)
    # copies carry re-estimated statistics: some vertex has BN statistics of neither end
    vs = path.vertex_states()
    assert any(not torch.equal(v["features.5.running_mean"], a["features.5.running_mean"]) and
               not torch.equal(v["features.5.running_mean"], b["features.5.running_mean"]) for v in vs)


def test_deep_odd_width_path(deep_pair):
    model, a, b = deep_pair
    ld = small_eval_loader()
    path = build_dropout_path(model, a, b, ld)
    check_certificate(path, model, a, b, ld)
    assert [s["kind"] for s in path.certificate["segments"]].count("switch") == 3


def test_dense_check_catches_a_wrong_construction(mlp_pair, monkeypatch):
    """Jumping straight from B's copy to B's final slots (no step 4) is not certified:
    the dense check sees the loss move along that "inactive" segment."""
    model, a, b = mlp_pair
    ld = small_eval_loader()

    def jump(self, tr, q, pb, end):
        for name in end:
            tr.w(name).copy_(end[name])
        tr.emit("inactive", "jump")
        tr.vertices[-1] = end
    monkeypatch.setattr(dp._Construction, "relocate", jump)
    with pytest.raises(RuntimeError, match="jump"):  # the builder's own segment check
        build_dropout_path(model, a, b, ld)
    monkeypatch.setattr(dp, "_check_segment", lambda *args: None)
    path = build_dropout_path(model, a, b, ld)
    i = [s["step"] for s in path.certificate["segments"]].index("jump")
    n = path.n_vertices - 1
    seg = [loss_at(model, path.state_at((i + f / 8) / n), ld) for f in range(9)]
    assert max(seg) - min(seg) > 1e-3
    with pytest.raises(AssertionError):
        check_certificate(path, model, a, b, ld)


def test_save_load_exact_and_small(mlp_pair, tmp_path):
    model, a, b = mlp_pair
    ld = small_eval_loader()
    path = build_dropout_path(model, a, b, ld, search_steps=4)
    f = tmp_path / "p.safetensors"
    path.save(f)
    back = load_path(f)
    assert isinstance(back, DropoutPath) and back.vertex_t == path.vertex_t
    assert back.certificate == path.certificate
    for t in path.vertex_t + [0.123, 0.5, 0.77]:
        x, y = path.state_at(t), back.state_at(t)
        assert all(torch.equal(x[k], y[k]) for k in x)
    model_bytes = sum(v.numel() * v.element_size() for v in a.values())
    assert os.path.getsize(f) < 0.5 * path.n_vertices * model_bytes
    # fresh tensors
    s = back.state_at(path.vertex_t[3])
    s["head.bias"] += 1
    assert not torch.equal(back.state_at(path.vertex_t[3])["head.bias"], s["head.bias"])


@pytest.mark.parametrize("pair", ["deep_pair", "cnn_pair"])
def test_streamed_path_is_the_constructed_one(pair, request, monkeypatch):
    """The builder keeps no list of vertices (each is checked, evaluated and delta-encoded as
    it is made, a track holding the last two): every vertex the construction emits is, bit
    for bit, the path's vertex, in any order of access, and the certificate's vertex losses
    are those vertices' losses; the inputs are not aliased."""
    model, a, b = request.getfixturevalue(pair)
    ld = small_eval_loader()
    tracks: dict[int, list] = {}
    emit = dp._Track.emit

    def spy(self, kind, note, **kw):
        seen = tracks.setdefault(id(self), [{k: v.clone() for k, v in self.vertices[-1].items()}])
        n = self.emitted
        emit(self, kind, note, **kw)
        assert len(self.vertices) <= 2
        if self.emitted > n:
            seen.append({k: v.clone() for k, v in self.vertices[-1].items()})
    monkeypatch.setattr(dp._Track, "emit", spy)
    path = build_dropout_path(model, a, b, ld, search_steps=0)
    ta, tb = tracks.values()
    want = ta + tb[-2::-1]
    assert path.n_vertices == len(want) and torch.equal(want[0]["head.weight"], a["head.weight"])

    def same(x, y):
        return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) and x[k].dtype == y[k].dtype
                                            for k in x)
    n = path.n_vertices - 1
    order = list(range(n, -1, -1)) + list(range(n + 1)) + [3, 1, n - 1, 0, 2]
    for i in order:  # backwards (a restart from A each time), forwards, jumps
        assert same(path.state_at(i / n), want[i]), i
    for i in (n - 1, 0, n // 2):
        got = path.state_at((i + 0.25) / n)
        assert same(got, dp.mix_states(want[i], want[i + 1], 0.25)), i
    assert same(path.vertex_states()[n // 2], want[n // 2])
    losses = path.certificate["vertex_losses"]
    for i in (0, 1, n // 2, n - 1, n):  # the work copy may run channels_last (`_layout`): last bits differ
        assert losses[i] == pytest.approx(loss_at(model, want[i], ld), rel=1e-6)
    for sd in path.groups.values():  # the path owns its tensors
        for t in sd.values():
            assert all(t.data_ptr() != x.data_ptr() for x in (*a.values(), *b.values()) if x.numel())


def test_segment_verifier(mlp_pair):
    """verify_segments accepts the built path and rejects a mislabelled segment."""
    model, a, b = mlp_pair
    path = build_dropout_path(model, a, b, small_eval_loader(), search_steps=0)
    graph = build_unit_graph(model, torch.zeros(2, 1, 8, 8))
    chain = dp.layered_chain(graph, a)
    vs, segs = path.vertex_states(), path.certificate["segments"]
    dp.verify_segments(vs, segs, graph, chain)
    i = [s["kind"] for s in segs].index("classifier")
    bad = [dict(s) for s in segs]
    bad[i]["kind"] = "inactive"
    with pytest.raises(RuntimeError, match="classifier"):
        dp.verify_segments(vs, bad, graph, chain)
    j = [s["kind"] for s in segs].index("inactive")
    bad = [dict(s) for s in segs]
    bad[j]["kind"] = "switch"
    with pytest.raises(RuntimeError):
        dp.verify_segments(vs, bad, graph, chain)
    # an "inactive" segment that touches a live unit
    v1 = dict(vs[0])
    v1["layers.1.bias"] = v1["layers.1.bias"] + 1
    with pytest.raises(RuntimeError, match="live units"):
        dp.verify_segments([vs[0], v1], [{"kind": "inactive", "step": "x"}], graph, chain)


def test_t_outside_range(mlp_pair):
    from mcensemble.errors import BadOptionError
    model, a, b = mlp_pair
    path = build_dropout_path(model, a, b, small_eval_loader(), search_steps=0)
    with pytest.raises(BadOptionError):
        path.state_at(1.5)


class Skip(nn.Module):
    def __init__(self):
        super().__init__()
        self.flat = nn.Flatten()
        self.fc1 = nn.Linear(64, 16)
        self.fc2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        h = torch.relu(self.fc1(self.flat(x)))
        return self.head(h + torch.relu(self.fc2(h)))


def test_residual_graph_refused():
    net = Skip().eval()
    sd = net.state_dict()
    with pytest.raises(DropoutPathError, match="fc1"):
        build_dropout_path(net, sd, sd, small_eval_loader(), search_steps=0)


def test_timm_resnet_refused():
    import timm
    net = timm.create_model("test_resnet", num_classes=10, in_chans=1).eval()
    sd = net.state_dict()
    ld = create_loader("digits,train=40,size=16", batch_size=40)
    with pytest.raises(DropoutPathError, match="layered"):
        build_dropout_path(net, sd, sd, ld, search_steps=0)


def test_layernorm_refused():
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.LayerNorm(8), nn.ReLU(),
                        nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 10)).eval()
    sd = net.state_dict()
    with pytest.raises(DropoutPathError, match="LayerNorm"):
        build_dropout_path(net, sd, sd, small_eval_loader(), search_steps=0)


@pytest.mark.parametrize("pair", ["deep_pair", "cnn_pair"])
def test_stability_taken_at_the_vertices_is_the_measured_one(pair, request):
    """The path measures no D_k apart: its stability rows come from the vertices computing
    D_k; they equal what `dropout_stability` measures for the same halves."""
    from mcensemble.stability import dropout_stability
    model, a, b = request.getfixturevalue(pair)
    ld = small_eval_loader()
    path = build_dropout_path(model, a, b, ld, search_steps=2)
    for side, sd in zip(path.certificate["stability"], (a, b)):
        want = dropout_stability(model, sd, ld, kept=side["kept"])
        assert side["base_loss"] == pytest.approx(want.base_loss, rel=1e-6)
        assert [r["depth"] for r in side["depths"]] == [r["depth"] for r in want.depths]
        for got, w in zip(side["depths"], want.depths):
            assert got["loss"] == pytest.approx(w["loss"], rel=1e-5)
        assert side["eps"] == pytest.approx(want.eps, rel=1e-5, abs=1e-7)
        assert side["search"]["steps"] == 2
    assert path.certificate["eps"] == max(s["eps"] for s in path.certificate["stability"])


def test_vertex_failing_its_probe_is_evaluated_itself(cnn_pair, monkeypatch):
    """A vertex whose logits on the probe batch differ from its function's is not given
    that function's loss: it is evaluated on all the data (`measured_vertices`)."""
    model, a, b = cnn_pair
    ld = small_eval_loader()
    monkeypatch.setattr(dp, "PROBE_RTOL", -1.0)  # no vertex passes
    path = build_dropout_path(model, a, b, ld, search_steps=0)
    cert = path.certificate
    assert cert["measured_vertices"] == list(range(1, path.n_vertices - 1))
    states = path.vertex_states()
    for i in (1, path.n_vertices // 2, path.n_vertices - 2):
        assert cert["vertex_losses"][i] == pytest.approx(loss_at(model, states[i], ld), rel=1e-6)
