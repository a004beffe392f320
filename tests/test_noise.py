"""Noise stability (Arora et al. 2018's quantities per unit group): the estimators against
direct computations on a tiny MLP, the two noise kinds, determinism, a BN-CNN and a timm
residual net, the graph's refusals, option checks and `stability --noise`."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mcensemble import zoo  # noqa: F401  (registers mce_* with timm)
from mcensemble.errors import BadOptionError
from mcensemble.noise import NOISE_KINDS, _contractions, _op_fro, noise_stability
from mcensemble.errors import UnitGraphError

from helpers import clone_state, randomize, small_eval_loader, timm_factory


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)).eval()


def batches(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(24, 8, generator=g), torch.randint(0, 3, (24,), generator=g)) for _ in range(n)]


def data_x() -> torch.Tensor:
    return torch.cat([x for x, _ in batches()])


@pytest.fixture(scope="module")
def mlp_result():
    return noise_stability(mlp(), batches(), examples=48, probes=4)


def test_rows_ranges_and_json(mlp_result):
    res = mlp_result
    assert [g.name for g in res.groups] == ["0", "2"] and res.examples == 48
    for g in res.groups:
        assert 0 < g.layer_cushion <= 1 and 0 < g.interlayer_cushion <= 1
        assert g.activation_contraction >= 1  # ReLU never grows a vector
        assert g.noise["gaussian"]["relative_noise"] == pytest.approx(0.1, rel=1e-5)
        assert g.noise["dropout"]["relative_noise"] == pytest.approx(1.0, rel=1e-5)  # p = 0.5: +-z per unit
    # the first group's noise passes a ReLU: curvature seen, finite smoothness; the last one
    # reaches the logits through the linear head only: no curvature, infinite smoothness
    assert 0 < res.groups[0].noise["gaussian"]["smoothness"] < math.inf
    assert all(res.groups[1].noise[k]["smoothness"] == math.inf for k in NOISE_KINDS)
    d = json.loads(json.dumps(res.to_dict(), allow_nan=True))
    assert set(d) == {"scale", "p", "delta", "probes", "examples", "base_loss", "network", "groups"}
    assert d["network"]["layer_cushion"] == min(g.layer_cushion for g in res.groups)
    assert d["network"]["activation_contraction"] == max(g.activation_contraction for g in res.groups)


def test_layer_cushion_and_contraction_are_the_definitions(mlp_result):
    net, x = mlp(), data_x()
    with torch.no_grad():
        h1 = net[0](x)
        u2 = torch.relu(h1)
        h2 = net[2](u2)
    for lin, u, group in ((net[0], x, 0), (net[2], u2, 1)):
        w = lin.weight.detach()
        want = ((u @ w.T).norm(dim=1) / (w.norm() * u.norm(dim=1))).min()
        assert mlp_result.groups[group].layer_cushion == pytest.approx(float(want), rel=1e-5)
    for h, group in ((h1, 0), (h2, 1)):
        want = (h.norm(dim=1) / torch.relu(h).norm(dim=1)).max()
        assert mlp_result.groups[group].activation_contraction == pytest.approx(float(want), rel=1e-5)


def test_interlayer_cushion_matches_the_exact_jacobian():
    # the last group reaches only the logits, through the head: J = W, exactly
    net, x = mlp(), data_x()
    with torch.no_grad():
        z = torch.relu(net[2](torch.relu(net[0](x))))
    w = net[4].weight.detach()
    want = float(((z @ w.T).norm(dim=1) / (w.norm() * z.norm(dim=1))).min())
    got = noise_stability(net, batches(), examples=48, probes=128).groups[1].interlayer_cushion
    assert got == pytest.approx(want, rel=0.2)  # Hutchinson's ||J||_F: sd ~ sqrt(2 / probes)


def test_operator_frobenius_norm_counts_padding_and_stride():
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=True)
    u = torch.randn(1, 2, 5, 5)
    jac = torch.autograd.functional.jacobian(lambda v: F.conv2d(v, conv.weight, None, 2, 1), u)
    assert float(_op_fro(conv, u)) == pytest.approx(float(jac.norm()), rel=1e-5)
    assert float(jac.norm()) < math.sqrt(9) * float(conv.weight.detach().norm())  # border taps fall in the padding


def test_zero_scale_is_no_perturbation_and_dropout_beats_tiny_noise():
    net = mlp()
    zero = noise_stability(net, batches(), examples=48, probes=1, scale=0.0)
    tiny = noise_stability(net, batches(), examples=48, probes=1, scale=0.01)
    big = noise_stability(net, batches(), examples=48, probes=1, scale=0.1)
    for z, t, b in zip(zero.groups, tiny.groups, big.groups):
        gz = z.noise["gaussian"]
        assert gz["output_change"] == 0 and gz["loss_increase"] == 0 and gz["smoothness"] == math.inf
        assert 0 < t.noise["gaussian"]["output_change"] < b.noise["gaussian"]["output_change"]
        assert t.noise["dropout"]["output_change"] > 10 * t.noise["gaussian"]["output_change"]
        assert z.noise["dropout"] == t.noise["dropout"]  # the scale is the Gaussian's only
    more_probes = noise_stability(net, batches(), examples=48, probes=3, scale=0.01)
    assert [g.noise for g in more_probes.groups] == [g.noise for g in tiny.groups]  # own draws per purpose


def test_deterministic_for_a_seed_and_leaves_the_model_alone():
    net = mlp()
    before = clone_state(net)
    a = noise_stability(net, batches(), examples=32, probes=2, seed=5).to_dict()
    b = noise_stability(net, batches(), examples=32, probes=2, seed=5).to_dict()
    c = noise_stability(net, batches(), examples=32, probes=2, seed=6).to_dict()
    assert a == b
    assert a["groups"][0]["noise"]["gaussian"] != c["groups"][0]["noise"]["gaussian"]
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_channel_dropout_training_makes_dropout_noise_cheaper():
    # the property the short path needs: a net trained with channel dropout loses less when
    # half its units are dropped than the same net trained without
    from helpers import train_small
    incr = {}
    for p in (0.0, 0.3):
        net = train_small("mce_digits_mlp", 10, 0, channel_p=p, width=32)
        res = noise_stability(net, small_eval_loader(), examples=128, probes=1)
        incr[p] = [g.noise["dropout"]["loss_increase"] for g in res.groups]
    assert all(b < a / 2 for a, b in zip(incr[0.0], incr[0.3])), incr


def test_bn_cnn_every_group_measured():
    net = randomize(timm_factory("mce_digits_cnn", widths=(4, 8))(), seed=2)
    loader = [(torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(32) % 10)]
    res = noise_stability(net, loader, examples=32, probes=2)
    assert len(res.groups) == 2
    for g in res.groups:
        assert 0 < g.layer_cushion <= 1 and 0 < g.interlayer_cushion <= 1 and g.activation_contraction >= 1
        for k in NOISE_KINDS:
            assert g.noise[k]["output_change"] > 0 and g.noise[k]["smoothness"] > 0


def test_timm_resnet_stream_and_block_groups_reach_the_output():
    net = randomize(timm_factory("test_resnet")(), seed=0)  # random BN gammas: no zero-init branch
    loader = [(torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 10)]
    res = noise_stability(net, loader, examples=16, probes=1)
    assert any(len(g.producers) > 1 for g in res.graph.groups)  # residual streams are groups
    for g in res.groups:
        assert 0 < g.layer_cushion <= 1 and 0 < g.interlayer_cushion <= 1, g.name
        assert g.activation_contraction >= 1, g.name
        assert all(g.noise[k]["output_change"] > 0 for k in NOISE_KINDS), g.name


def test_contraction_sees_activations_inside_norm_act_layers():
    # timm's EfficientNet: BatchNormAct2d (BN + SiLU in one traced module), squeeze-excite,
    # linear bottlenecks (conv_pwl: no activation, so no contraction)
    from mcensemble.units import build_unit_graph
    net = randomize(timm_factory("test_efficientnet")(), seed=0)
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    graph = build_unit_graph(net, x[:2])
    c = _contractions(net, graph, x)
    assert c["conv_stem"] is not None and c["conv_stem"] >= 1  # SiLU inside bn1 (BatchNormAct2d)
    se = [g.name for g in graph.groups if g.name.endswith("se.conv_reduce")]
    assert se and all(c[n] is not None for n in se)
    pwl = [g.name for g in graph.groups if g.name.endswith("conv_pwl")]
    assert pwl and all(c[n] is None for n in pwl)


class _StridedUnits(nn.Module):
    """Reads every other channel: no permutation of the channels leaves that unchanged."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.head = nn.Linear(2 * 6 * 6, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x))[:, ::2].flatten(1))


def test_what_the_unit_graph_refuses_is_refused():
    torch.manual_seed(0)
    with pytest.raises(UnitGraphError, match="strided slice of the units"):
        noise_stability(_StridedUnits().eval(), [(torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))])


@pytest.mark.parametrize("kw, option", [({"scale": -0.1}, "scale"), ({"scale": float("nan")}, "scale"),
                                        ({"examples": 1}, "examples"), ({"probes": 0}, "probes"),
                                        ({"delta": 1.0}, "delta")])
def test_bad_options_name_the_option(kw, option):
    with pytest.raises(BadOptionError, match="must be") as e:
        noise_stability(mlp(), batches(), **kw)
    assert e.value.option == option


@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory):
    from mcensemble.checkpoints import save_checkpoint
    torch.manual_seed(0)
    net = timm_factory("mce_digits_mlp", width=16)()
    dest = tmp_path_factory.mktemp("noise") / "mlp.safetensors"
    save_checkpoint(net.state_dict(), dest, metadata={"arch": "mce_digits_mlp", "num_classes": 10, "in_chans": 1,
                                                      "model_args": {"width": 16}})
    return dest


def test_cli_prints_the_group_table_and_writes_the_report(mce_cli, mlp_file, tmp_path):
    res = mce_cli("stability", mlp_file, "--noise", "--data", "digits,train=100", "--noise-examples", "32",
                  "--noise-scale", "0.05", "--report", tmp_path / "n.json")
    assert res.exit_code == 0, res.output
    header = res.output.splitlines()[0]
    assert "layer cushion" in header and "interlayer cushion" in header and "dropout smooth" in header
    rep = json.loads((tmp_path / "n.json").read_text())
    assert rep["scale"] == 0.05 and rep["examples"] == 32
    assert [ln.split()[0] for ln in res.output.splitlines()[1:1 + len(rep["groups"])]] == \
        [g["group"] for g in rep["groups"]]
    assert "network: layer cushion" in res.output


@pytest.mark.parametrize("args, message", [(["--noise", "--noise-scale", "-1"], "--noise-scale"),
                                           (["--noise", "--noise-examples", "1"], "--noise-examples"),
                                           (["--noise-scale", "0.2"], "applies only with --noise")])
def test_cli_bad_noise_options(mce_cli, mlp_file, args, message):
    res = mce_cli("stability", mlp_file, "--data", "digits,train=100", *args)
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output
