"""Every timm test architecture on the unit graph: a random permutation of every unit
group leaves the logits unchanged, and weight matching recovers a permuted copy.

Parametrised from `timm.list_models("test_*")`, so new test models join by themselves.
Models that cannot be placed exactly are listed in `NOT_PLACED` with the reason."""
from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

from mcensemble.align import weight_matching
from mcensemble.units import build_unit_graph, permute_state_dict
from helpers import perturbed_state

#: test models that cannot be placed exactly, with the reason (none today)
NOT_PLACED: dict[str, str] = {}

MODELS = sorted(timm.list_models("test_*"))


def _input(model, seed: int = 0) -> torch.Tensor:
    cfg = model.pretrained_cfg
    c, h, _ = cfg.get("min_input_size") or cfg["input_size"]
    size = min(h, 64) if not cfg.get("fixed_input_size") else h
    gen = torch.Generator().manual_seed(seed)
    try:  # the smallest input the model takes: windows / patches fix a lower bound
        model.eval()(torch.randn(1, c, size, size, generator=gen))
    except (RuntimeError, AssertionError, ValueError):
        size = h
    return torch.randn(2, c, size, size, generator=gen)


def _randomised(model: torch.nn.Module, seed: int) -> dict:
    return perturbed_state(model, seed, 0.2)


def _logits(model, state, x):
    return torch.func.functional_call(model, state, (x,))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("name", MODELS)
def test_permutation_keeps_logits_and_alignment_recovers(name):
    if name in NOT_PLACED:
        pytest.xfail(NOT_PLACED[name])
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = _input(model)
    graph = build_unit_graph(model, x[:1])
    assert graph.groups, "no hidden unit groups found"
    assert type(graph).from_dict(graph.to_dict()).to_dict() == graph.to_dict()  # unique names, JSON-ready
    state = _randomised(model, seed=1)
    gen = torch.Generator().manual_seed(2)
    q = {g.name: torch.randperm(g.size, generator=gen) for g in graph.groups}
    assert any(not torch.equal(p, torch.arange(p.numel())) for p in q.values())
    permuted = permute_state_dict(state, graph, q)
    with torch.no_grad():
        ref, got = _logits(model, state, x), _logits(model, permuted, x)
    rel = float((ref - got).norm() / ref.norm().clamp_min(1e-12))
    assert rel < 1e-4, f"{name}: permuted logits differ by {rel:.3g} (relative)"
    # weight matching recovers the permuted copy exactly
    res = weight_matching(graph, state, permuted, max_iter=20)
    for k, v in state.items():
        assert torch.equal(res.state[k], v), f"{name}: {k} not recovered"


@pytest.mark.parametrize("name, tensor", [("test_vit", "cls_token"), ("test_vit", "pos_embed"),
                                          ("test_vit_relpos", "rel_pos.mlp.fc2"),
                                          ("test_maxvit", "relative_position_bias_table"),
                                          ("test_nfnet", ".gain"),
                                          ("test_efficientnet_gn", "bn1.weight")])
def test_a_missed_axis_shows_in_the_logits(name, tensor):
    """The check above can fail: leave out the members the new rules add (class token,
    position embedding, relative position bias MLP, NFNet gain, GroupNorm weight)."""
    from mcensemble.units import UnitGraph, UnitGroup
    model = timm.create_model(name, pretrained=False).eval()
    x = _input(model)
    graph = build_unit_graph(model, x[:1])
    hit = [g for g in graph.groups if any(tensor in r.tensor for r in g.members)]
    assert hit, f"no group of {name} has a member on {tensor}"
    g = hit[0]
    cut = UnitGraph([UnitGroup(g.name, g.size, [r for r in g.members if tensor not in r.tensor])])
    state = _randomised(model, seed=1)
    perm = torch.roll(torch.arange(g.size), 1)
    with torch.no_grad():
        ref = _logits(model, state, x)
        good = _logits(model, permute_state_dict(state, graph, {g.name: perm}), x)
        bad = _logits(model, permute_state_dict(state, cut, {g.name: perm}), x)
    assert float((ref - good).norm() / ref.norm()) < 1e-4
    assert float((ref - bad).norm() / ref.norm()) > 1e-4


def test_build_on_a_vit_pair_aligns_before_fitting_without_warning(tmp_path, caplog):
    """`build` (a bezier curve, alignment by default) on two ViTs: the checkpoints are
    aligned on the unit graph, the curve is fitted between them, nothing is warned."""
    import logging

    from mcensemble.checkpoints import save_checkpoint
    from mcensemble.options import BuildOptions, DataOptions, ModelOptions
    from mcensemble.pipeline import build_ensemble

    args = {"img_size": 8, "patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2}
    files = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = timm.create_model("test_vit", num_classes=10, in_chans=1, **args)
        files.append(tmp_path / f"vit-{seed}.safetensors")
        save_checkpoint(_randomised(net, seed), files[-1], metadata={
            "arch": "test_vit", "num_classes": 10, "in_chans": 1, "model_args": args})
    with caplog.at_level(logging.WARNING):
        res = build_ensemble(files, model=ModelOptions(), data=DataOptions(data="digits", batch_size=256),
                             opts=BuildOptions(method="bezier", settings={"epochs": 1}, members=2, candidates=3,
                                               packed=False))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "align" in r.getMessage()]
    (info,) = res.report["aligned"]
    assert info["groups"] > 0 and info["moved"] > 0
    assert info["objective_after"] >= info["objective_before"]


@pytest.mark.parametrize("name, norm", [("test_vit4", "RmsNorm"), ("test_efficientnet_evos", "EvoNorm2dS0"),
                                        ("test_efficientnet_gn", "GroupNorm"), ("test_vit", "LayerNorm")])
def test_paths_that_silence_units_refuse_norms_over_channels(name, norm):
    """Their graphs build now, but a zeroed unit still moves RMSNorm / EvoNorm / GroupNorm /
    LayerNorm statistics: the short path refuses them before any work, naming the layer."""
    from mcensemble.paths.short import ShortPathError, check_norms
    with pytest.raises(ShortPathError, match=rf"is a {norm}\w*: it normalises over the channels"):
        check_norms(timm.create_model(name, pretrained=False))
