"""The short path (Theorem 2): five segments on every architecture, exact segments constant,
the convex one below its ends, measured segments measured on the very states of the path,
the file format, the packed pair, refusals (ConvNeXt, layered-only dropout path)."""
from __future__ import annotations

import pytest
import torch

from mcensemble import zoo  # noqa: F401  (registers mce_* with timm)
from mcensemble.data import create_loader
from mcensemble.evaluate import evaluate
from mcensemble.paths import load_path
from mcensemble.paths.short import SEGMENT_KINDS, ShortPath, build_short_path
from mcensemble.errors import ShortPathError

from helpers import assert_close_rel, clone_state, one_thread, small_pair, timm_factory

DATA = "digits,size=16,train=64"
INTERIOR = 9  # interior points checked per segment


@pytest.fixture(autouse=True)
def _threads():
    with one_thread():
        yield


def _loss(model, state, ld) -> float:
    model.load_state_dict(state)
    return evaluate(model, ld).loss


@torch.no_grad()
def _logits(model, state, x) -> torch.Tensor:
    model.load_state_dict(state)
    return model.eval()(x).double()


def dense_check(path, model, ld):
    """Every segment at INTERIOR interior points on the one batch of `ld` (the certificate's
    data): exact ones constant (logits and loss, to a relative 1e-5), the convex one at or
    below its larger end, measured ones equal to what the certificate recorded at its points."""
    cert = path.certificate
    batch = next(iter(ld))
    n = path.n_vertices
    assert n == 6 and [s["kind"] for s in cert["segments"]] == list(SEGMENT_KINDS)
    worst = []
    for i, seg in enumerate(cert["segments"]):
        ts = [(i + f / (INTERIOR + 1)) / (n - 1) for f in range(INTERIOR + 2)]
        if seg["kind"] == "measured":
            assert len(seg["points"]) >= 17 and seg["proven"] is False
            assert seg["bound"] == pytest.approx(max(p[1] for p in seg["points"]))
            assert seg["max_slope"] >= 0
            for t, want in seg["points"][5:7]:  # the certificate measured the path's own states
                assert _loss(model, path.state_at(t), ld) == pytest.approx(want, rel=1e-5)
            continue
        assert seg["proven"] is True
        zs = [_logits(model, path.state_at(t), batch[0]) for t in ts]
        losses = [float(torch.nn.functional.cross_entropy(z, batch[1].long())) for z in zs]
        worst.append(max(losses))
        if seg["kind"] == "exact":
            for z in zs[1:]:
                assert_close_rel(z, zs[0], rtol=1e-5)
            assert max(losses) - min(losses) <= 1e-5 * max(1.0, abs(losses[0])), (i, losses)
        else:
            assert max(losses) <= max(losses[0], losses[-1]) * (1 + 1e-5) + 1e-7, (i, losses)
        assert max(losses) <= seg["bound"] * (1 + 1e-5) + 1e-7
        assert losses[0] == pytest.approx(cert["vertex_losses"][i], rel=1e-5)
    assert cert["max_loss"] == pytest.approx(max(s["bound"] for s in cert["segments"]))
    assert cert["proven_max_loss"] <= cert["max_loss"]
    return worst


def test_measured_points_and_random_half_on_a_fixed_subsample(mlp_pair):
    """With `sample_examples` below the data's size, the measured segments' points and the
    random half are taken on a fixed subsample (the certificate says so); vertices on all."""
    from mcensemble.bn import FixedSubset
    model, a, b = mlp_pair
    ld = create_loader("digits,train=300", batch_size=50)
    path = build_short_path(model, a, b, ld, search_steps=0, sample_examples=100)
    cert = path.certificate
    sub = FixedSubset(ld, 100)
    assert "100 examples in 2 batches of 6" in cert["data"]["measured_points"]
    assert "subsample" in cert["data"]["random_half"]
    for seg in cert["segments"]:
        if seg["kind"] == "measured":
            (t0, l0), (t, want) = seg["points"][0], seg["points"][8]
            assert _loss(model, path.state_at(t), sub) == pytest.approx(want, rel=1e-5)
            assert _loss(model, path.state_at(t0), sub) == pytest.approx(l0, rel=1e-5)
            assert seg["bound"] >= max(p[1] for p in seg["points"])
    assert cert["vertex_losses"][0] == pytest.approx(_loss(model, a, ld), rel=1e-6)
    for i in (2, 3):  # taken from their exact neighbours: what evaluating them gives
        assert cert["vertex_losses"][i] == pytest.approx(_loss(model, path.vertex_states()[i], ld), rel=1e-5)
    assert path.metadata["evaluation_passes"] < 2 * 15


def _check_ends(path, a, b):
    s0, s1 = path.state_at(0.0), path.state_at(1.0)
    assert all(torch.equal(s0[k], a[k]) and torch.equal(s1[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- trained pairs
@pytest.fixture(scope="module")
def mlp_pair():
    return small_pair("mce_digits_mlp", 8, width=24, drop_rate=0.3)


@pytest.fixture(scope="module")
def cnn_pair():
    return small_pair("mce_digits_cnn", 4, channel_p=0.3, widths=(6, 8))


@pytest.mark.parametrize("which", ["mlp_pair", "cnn_pair"])
def test_layered_networks_trained_with_dropout(which, request, tmp_path):
    model, a, b = request.getfixturevalue(which)
    ld = create_loader("digits,train=300", batch_size=300)
    path = build_short_path(model, a, b, ld, search_steps=2)
    assert path.kind == "short" and isinstance(path, ShortPath)
    _check_ends(path, a, b)
    dense_check(path, model, ld)
    cert = path.certificate
    assert cert["loss_a"] == pytest.approx(_loss(model, a, ld), rel=1e-6)
    assert cert["eps"] >= 0 and cert["eps_random"] >= 0
    assert path.metadata["evaluation_passes"] >= 2 * 15
    # the file: same states bit for bit, the certificate kept, measured segments still not proven
    f = tmp_path / "short.safetensors"
    path.save(f)
    back = load_path(f)
    assert back.kind == "short" and back.certificate["segments"][0]["proven"] is False
    for t in (0.1, 0.3, 0.5, 0.7, 0.9):
        s, r = path.state_at(t), back.state_at(t)
        assert all(torch.equal(s[k], r[k]) for k in s)


def test_a_chosen_half_beats_a_random_one_on_a_dropout_trained_mlp(mlp_pair):
    model, a, b = mlp_pair
    ld = create_loader("digits,train=300", batch_size=300)
    path = build_short_path(model, a, b, ld, search_steps=4, search_examples=300)
    cert = path.certificate
    # what the search minimises, on the same data: no worse than the random half it reports
    chosen = max(cert["vertex_losses"][1], cert["vertex_losses"][4])
    assert chosen <= max(cert["loss_da_random"], cert["loss_db_random"]) + 1e-2
    search = path.metadata["search"]
    assert search["objective_end"] <= search["objective_start"] <= search["start_objectives"]["random"]


# ----------------------------------------------------------------------------- timm networks
TIMM = {
    "test_resnet": {},  # basic and bottleneck blocks, deep stem, avg-pool downsample
    "resnet26": {"channels": (8, 16, 24, 32), "stem_width": 8},  # bottlenecks
    "resnet10t": {"channels": (8, 16, 24, 32), "stem_width": 8},  # deep tiered stem
    "test_efficientnet": {},  # squeeze-excite, inverted residuals, SiLU
    "mobilenetv3_small_050": {},  # hard-swish, hard-sigmoid gates
}


def _init(make, seed: int) -> dict:
    """timm's own initialisation from `seed` (the construction and its checks do not need
    trained weights; the benchmark trains)."""
    torch.manual_seed(seed)
    return clone_state(make().eval())


@pytest.mark.parametrize("arch", list(TIMM))
def test_timm_residual_and_squeeze_excite_networks(arch, tmp_path):
    make = timm_factory(arch, **TIMM[arch])
    a, b = (_init(make, s) for s in (0, 1))
    model = make().eval()
    ld = create_loader(DATA, batch_size=64)
    path = build_short_path(model, a, b, ld, search_steps=0, random_baseline=False)
    _check_ends(path, a, b)
    dense_check(path, model, ld)
    assert all(s.get("logit_deviation", 0.0) <= 1e-5 for s in path.certificate["segments"])


def test_packed_pair_outputs_the_mean_of_the_two_dropout_networks():
    from mcensemble.pack import pack_pair
    from mcensemble.paths.short import prepare_short
    make = timm_factory("test_resnet")
    a, b = (_init(make, s) for s in (0, 1))
    model = make().eval()
    ld = create_loader(DATA, batch_size=64)
    x = next(iter(ld))[0][:32]
    con = prepare_short(model, a, b, ld, search_steps=0, random_baseline=False)
    packed = pack_pair(model, a, b, ld, method="short", halves=(con.halves.s, con.halves.t)).state
    assert set(packed) == set(a) and all(packed[k].shape == a[k].shape for k in a)
    da, db = con.vertices[1], con.vertices[4]
    want = (_logits(model, da, x) + _logits(model, db, x)) / 2
    assert_close_rel(_logits(model, packed, x), want, rtol=1e-5)


# ----------------------------------------------------------------------------- refusals
def test_convnext_is_refused_before_any_work():
    import timm
    model = timm.create_model("test_convnext", num_classes=10, in_chans=1).eval()
    state = model.state_dict()

    class NoData:
        def __iter__(self):
            raise AssertionError("the refusal must come before the data is read")

    with pytest.raises(ShortPathError, match=r"LayerNorm.*normalises over the channels"):
        build_short_path(model, state, state, NoData())


def test_dropout_path_on_a_residual_network_names_the_short_path():
    import timm

    from mcensemble.paths.dropout import build_dropout_path

    from mcensemble.errors import DropoutPathError
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1).eval()
    state = model.state_dict()
    with pytest.raises(DropoutPathError, match="`method` short"):
        build_dropout_path(model, state, state, create_loader(DATA, batch_size=64))


def test_points_below_17_and_overlapping_halves_are_refused(mlp_pair):
    from mcensemble.errors import BadOptionError
    model, a, b = mlp_pair
    ld = create_loader("digits,train=100", batch_size=100)
    with pytest.raises(BadOptionError, match="points must be an integer >= 17"):
        build_short_path(model, a, b, ld, points=9)
    from mcensemble.units import build_unit_graph
    graph = build_unit_graph(model, torch.zeros(1, 1, 8, 8))
    same = {g.name: list(range(g.size // 2)) for g in graph.groups}
    with pytest.raises(BadOptionError, match="overlap"):
        build_short_path(model, a, b, ld, halves=(same, same))


def test_a_damaged_delta_is_refused(mlp_pair, tmp_path):
    from safetensors.torch import load_file, save_file

    from mcensemble.errors import CheckpointError
    model, a, b = mlp_pair
    ld = create_loader("digits,train=100", batch_size=100)
    path = build_short_path(model, a, b, ld, search_steps=0, random_baseline=False)
    f = tmp_path / "p.safetensors"
    path.save(f)
    from safetensors import safe_open
    with safe_open(str(f), "pt") as h:
        meta = h.metadata()
    tensors = load_file(str(f))
    key = next(k for k in tensors if k.startswith("delta.1.C:"))
    tensors[key] = torch.full_like(tensors[key], 7)
    save_file(tensors, str(f), metadata=meta)
    with pytest.raises(CheckpointError, match="multiplier"):
        load_path(f)


# ----------------------------------------------------------------------------- training and stability
def test_channel_dropout_ties_a_squeeze_excite_gate_to_the_group_it_gates():
    """The gated group is read by the squeeze-excite reduce conv and by the projection: one
    mask for both in a forward pass; the bottleneck has its own (what D_S drops at once)."""
    import timm

    from mcensemble.hooks import channel_dropout
    model = timm.create_model("test_efficientnet", num_classes=10, in_chans=1).train()
    x = torch.randn(6, 1, 16, 16)
    seen = {}
    names = ("blocks.3.0.se.conv_reduce", "blocks.3.0.conv_pwl", "blocks.3.0.se.conv_expand")
    with channel_dropout(model, 0.5, example_input=x[:1]) as h:
        assert {g for g, *_ in h.consumers["blocks.3.0.se.conv_reduce"]} == \
            {g for g, *_ in h.consumers["blocks.3.0.conv_pwl"]}
        hooks = [model.get_submodule(n).register_forward_pre_hook(
            lambda m, args, n=n: seen.__setitem__(n, args[0].detach())) for n in names]
        model(x)
        for hk in hooks:
            hk.remove()
    zero = {n: (v.flatten(2).abs().sum(2) == 0) for n, v in seen.items()}
    # the gated units dropped at the reduce conv are exactly those dropped at the projection
    assert torch.equal(zero[names[0]], zero[names[1]])
    assert 0 < zero[names[0]].float().mean() < 1 and 0 < zero[names[2]].float().mean() < 1


def test_stability_on_a_residual_network_reestimates_the_stream_writers_batchnorm():
    from mcensemble.stability import _bn_modules, changed_bn_modules, dropout_stability
    from mcensemble.units import build_unit_graph
    make = timm_factory("resnet18", channels=(64, 8, 8, 8))  # plain stem: stage 1's stream has depth 1
    state = _init(make, 0)
    model = make().eval()
    ld = create_loader(DATA, batch_size=64)
    graph = build_unit_graph(model, torch.zeros(1, 1, 16, 16))
    assert graph.group("conv1").depth == 1
    kept = {g.name: list(range(g.size // 2)) for g in graph.groups}
    bns = changed_bn_modules(model, state, graph, kept, ld)
    # the BatchNorm after a block's last conv writes that depth-1 stream, yet its input
    # changes: the depth rule misses it, the measured inputs do not; the stem's does not change
    assert "layer1.0.bn2" in bns and "layer1.0.bn2" not in _bn_modules(model, graph, 2)
    assert "bn1" not in bns and "layer4.1.bn2" in bns
    res = dropout_stability(model, state, ld, graph=graph, search_steps=0)
    assert res.eps >= 0 and len(res.depths) == len(graph.depths)
    assert res.depths[0]["depth"] == min(graph.depths)


# ----------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def effnet_files(tmp_path_factory):
    from mcensemble import save_checkpoint
    d = tmp_path_factory.mktemp("short-cli")
    make = timm_factory("test_efficientnet")
    files = []
    for s in (0, 1):
        f = d / f"e{s}.safetensors"
        save_checkpoint(_init(make, s), f, metadata={"arch": "test_efficientnet", "num_classes": 10, "in_chans": 1})
        files.append(f)
    return files


def test_cli_pack_and_scan_short(effnet_files, mce_cli, tmp_path):
    import json

    import timm

    from mcensemble import load_checkpoint
    a, b = effnet_files
    out = tmp_path / "packed.safetensors"
    res = mce_cli("pack", a, b, "--method", "short", "--search-steps", "1", "--data", DATA, "--out", out)
    assert res.exit_code == 0, res.output
    ck = load_checkpoint(out)
    assert ck.metadata["method"] == "short"
    timm.create_model("test_efficientnet", num_classes=10, in_chans=1).load_state_dict(ck.state_dict)
    res = mce_cli("pack", a, b, "--method", "sideways", "--data", DATA, "--out", out)
    assert res.exit_code != 0 and "sideways" in res.output
    res = mce_cli("pack", a, b, "--method", "short", "--search-steps", "-1", "--data", DATA, "--out", out)
    assert res.exit_code != 0 and "--search-steps" in res.output
    # scan prints every segment's kind; the measured ones are never called proven
    res = mce_cli("scan", a, b, "--method", "short", "--data", DATA, "--points", "3", "--report", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    assert res.output.count("MEASURED at 17 points, not proven") == 2
    assert res.output.count("exact (output unchanged") == 2 and "convex" in res.output
    assert "proven" not in res.output.replace("not proven", "").replace("proven segments", "")
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["method"] == "short"
    assert [s["proven"] for s in rep["certificate"]["segments"]] == [False, True, True, True, False]


@pytest.mark.parametrize("steps", [0, 2])
def test_cli_build_short_takes_the_search_steps(effnet_files, mce_cli, tmp_path, steps):
    a, b = effnet_files
    p = tmp_path / "p.safetensors"
    res = mce_cli("build", a, b, "--method", "short", "--search-steps", str(steps), "--data", DATA, "--no-packed",
                  "--members", "2", "--candidates", "3", "--path-out", p)
    assert res.exit_code == 0, res.output
    search = load_path(p).metadata["search"]
    assert search["steps"] == steps
    if steps:  # every trial evaluated at least the side that binds the objective
        assert search["trial_forwards"] + search["skipped_forwards"] == steps * 13 * 2


def test_dropout_vertices_batchnorm_on_a_fixed_subsample(cnn_pair):
    """`bn_examples`: D_S(A)'s BatchNorm statistics come from the fixed subsample (the
    certificate says so); its loss is still taken on all the data."""
    from mcensemble.bn import FixedSubset
    from mcensemble.stability import reestimate_bn
    model, a, b = cnn_pair
    ld = create_loader("digits,train=300", batch_size=50)
    path = build_short_path(model, a, b, ld, search_steps=0, random_baseline=False, bn_examples=100)
    cert = path.certificate
    assert "100 examples in 2 batches of 6" in cert["data"]["batchnorm"]
    da = path.vertex_states()[1]
    mods = path.metadata["bn_reestimated"]
    assert mods
    want = reestimate_bn(model, da, FixedSubset(ld, 100), mods)
    for k, v in want.items():
        assert_close_rel(da[k], v, rtol=1e-5)
    assert cert["vertex_losses"][1] == pytest.approx(_loss(model, da, ld), rel=1e-6)


@pytest.mark.parametrize("size", [7, 8])
def test_guided_joint_order_is_the_predicted_change_of_the_objective(size):
    """`_GuidedJointSwaps` orders the swaps (A's unit i out, o in; B's half re-derived) by the
    first-order change of max(l_A, l_B) + 1e-3 (l_A + l_B), written out here swap by swap."""
    from types import SimpleNamespace
    from mcensemble.paths.short import _b_half, _GuidedJointSwaps, _JointSearch
    gen = torch.Generator().manual_seed(size)
    g = SimpleNamespace(name="g", size=size)
    b_score = torch.rand(size, generator=gen)
    ga, gb = torch.randn(size, generator=gen, dtype=torch.float64), torch.randn(size, generator=gen, dtype=torch.float64)
    s = sorted(torch.randperm(size, generator=gen)[:size // 2].tolist())
    t = _b_half(g, s, b_score)
    search = SimpleNamespace(kept=({"g": s}, {"g": t}), losses=[0.5, 0.45], value=_JointSearch.value,
                             unit_gradients=lambda _g, side: (ga, gb)[side])
    guide = _GuidedJointSwaps(search, {"g": b_score})
    first = guide(g)
    want = []
    for i in s:
        for o in (u for u in range(size) if u not in s):
            new_t = _b_half(g, sorted([u for u in s if u != i] + [o]), b_score)
            la = 0.5 + 2 * float(ga[o] - ga[i])
            lb = 0.45 + 2 * (float(gb[new_t].sum()) - float(gb[t].sum()))
            want.append((_JointSearch.value(la, lb), i, o))
    want.sort()
    got = [(first[0], first[1])] + [guide(g) for _ in range(len(want) - 1)]
    assert guide(g) is None  # every swap of the current halves tried
    for (v, i, o), (new_s, new_t) in zip(want, got):
        assert new_s == sorted([u for u in s if u != i] + [o]) and new_t == _b_half(g, new_s, b_score), (v, i, o)
