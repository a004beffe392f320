"""Weight matching over the unit graph, and REPAIR.

Every check here can fail: function preservation compares outputs, identity recovery
compares tensors bit for bit, the barrier tests compare trained pairs before / after.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from mcensemble.align import AlignResult, Repair, align_states, matching_objective, weight_matching
from mcensemble.data import create_loader
from mcensemble.errors import ArchitectureMismatchError, BadOptionError
from mcensemble.evaluate import evaluate_state, scan
from mcensemble.paths.linear import LinearPath, interpolate
from mcensemble.units import UnitGraph, UnitGroup, build_unit_graph, permute_state_dict
from mcensemble.errors import UnitGraphError
from mcensemble.zoo import DigitsCNN, DigitsMLP

from helpers import randomize, randomized_case, timm_factory, train_pair


class ResMLP(nn.Module):
    """h + W h: one group on both axes of `mix.weight` (the matching step is quadratic)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(64, 16)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        h = torch.relu(self.inp(x.flatten(1)))
        return self.head(h + torch.relu(self.mix(h)))


CASES = {  # name -> (factory, input size)
    "mlp": (DigitsMLP, 8), "bn_cnn": (DigitsCNN, 8), "resmlp": (ResMLP, 8),
    "test_resnet": (timm_factory("test_resnet"), 16),
    "test_efficientnet": (timm_factory("test_efficientnet"), 16),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    factory, size = CASES[request.param]
    model, x, graph = randomized_case(factory, size, 4)
    b = randomize(factory(), 1).state_dict()
    return request.param, model, x, graph, model.state_dict(), b


def run(model, state, x):
    """Outputs in float64, so that summation order (which a permutation changes) is no noise."""
    state = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    with torch.no_grad():
        return torch.func.functional_call(copy.deepcopy(model).double(), state, (x.double(),))


def test_aligned_b_computes_the_same_function(case):
    name, model, x, graph, a, b = case
    res = align_states(model, a, b, graph=graph, example_input=x, seed=0)
    assert isinstance(res, AlignResult) and res.converged
    assert res.moved > 0.5  # independent networks: most units move
    assert any(not torch.equal(b[k], res.state[k]) for k in b)
    assert res.state.keys() == b.keys()
    torch.testing.assert_close(run(model, res.state, x), run(model, b, x), atol=1e-5, rtol=1e-5)
    assert res.objective_after > res.objective_before


def test_aligning_a_permuted_copy_recovers_it_exactly(case):
    name, model, x, graph, a, _ = case
    g = torch.Generator().manual_seed(3)
    q = {grp.name: torch.randperm(grp.size, generator=g) for grp in graph.groups}
    b = permute_state_dict(a, graph, q)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    res = weight_matching(graph, a, b, seed=1)
    for grp in graph.groups:  # perms[i] = the unit of B that is unit i of A: the inverse of q
        assert torch.equal(res.perms[grp.name], torch.argsort(q[grp.name])), grp.name
    for k in a:
        assert torch.equal(res.state[k], a[k]), k
    assert res.converged and res.objective_after == pytest.approx(matching_objective(graph, a, a))


def test_objective_never_decreases(case):
    name, model, x, graph, a, b = case
    for seed in (0, 1):
        res = weight_matching(graph, a, b, seed=seed)
        h = res.history
        assert len(h) == res.iterations + 1
        assert all(h1 >= h0 for h0, h1 in zip(h, h[1:])), h
        assert h[-1] == pytest.approx(matching_objective(graph, a, res.state), rel=1e-9)
        assert h[0] == pytest.approx(matching_objective(graph, a, b), rel=1e-9)
        # a second run from the result cannot improve it any more
        again = weight_matching(graph, a, b, seed=seed + 7, init_perms=res.perms)
        assert again.objective_after >= res.objective_after - 1e-9 * abs(res.objective_after)


def test_verify_catches_a_wrong_unit_graph():
    torch.manual_seed(0)
    model = randomize(DigitsMLP(), 0)
    x = torch.rand(2, 1, 8, 8)
    graph = build_unit_graph(model, x[:1])
    broken = UnitGraph([UnitGroup(g.name, g.size, [r for r in g.members if r.role != "consumer"],
                                  g.depth) for g in graph.groups], graph.classifier)
    b = randomize(DigitsMLP(), 1).state_dict()
    with pytest.raises(UnitGraphError, match="other outputs"):
        align_states(model, model.state_dict(), b, graph=broken, example_input=x)


def test_bad_arguments():
    a, b = DigitsMLP().state_dict(), DigitsMLP(width=64).state_dict()
    with pytest.raises(ArchitectureMismatchError):
        align_states(DigitsMLP(), a, b)
    graph = build_unit_graph(DigitsMLP(), torch.rand(1, 1, 8, 8))
    with pytest.raises(BadOptionError):
        weight_matching(graph, a, a, max_iter=0)


# ----------------------------------------------------------------------------- trained pairs
@pytest.fixture(scope="module")
def loaders():
    return create_loader("digits", batch_size=512), create_loader("digits", split="val", batch_size=512)


@pytest.fixture(scope="module", params=["mlp", "bn_cnn"])
def pair(request):
    factory, epochs = {"mlp": (DigitsMLP, 20), "bn_cnn": (DigitsCNN, 4)}[request.param]
    a, b = (net.state_dict() for net in train_pair(factory, epochs=epochs, batch_size=128))
    return request.param, factory, a, b


def test_alignment_lowers_the_straight_line_barrier(pair, loaders):
    name, factory, a, b = pair
    train, val = loaders
    res = align_states(factory(), a, b, seed=0)
    before = scan(LinearPath(a, b), factory(), train, points=5, bn_loader=train, val_loader=val)
    after = scan(LinearPath(a, res.state), factory(), train, points=5, bn_loader=train, val_loader=val)
    assert after.barrier < 0.5 * before.barrier, (before.barrier, after.barrier)
    assert after.val_barrier < before.val_barrier
    # the path ends at the permuted B, which is B's function: same endpoint metrics
    assert after.points[-1]["loss"] == pytest.approx(before.points[-1]["loss"], rel=1e-5, abs=1e-6)


def test_repair(pair, loaders):
    name, factory, a, b = pair
    train, _ = loaders
    b_al = align_states(factory(), a, b, seed=0).state
    rep = Repair(factory(), a, b_al, train)
    assert {p.kind for p in rep.points} == ({"producer"} if name == "mlp" else {"bn"})
    net = factory()
    # at t=0 REPAIR targets A's own statistics: A's function (BN re-estimated) comes back
    ref = evaluate_state(net, a, train, bn_loader=train).loss
    assert evaluate_state(net, rep(a, 0.0), train).loss == pytest.approx(ref, abs=1e-4)
    mid = interpolate(a, b_al, 0.5)
    plain = evaluate_state(net, mid, train, bn_loader=train).loss
    repaired = evaluate_state(net, rep(mid, 0.5), train).loss
    if name == "mlp":  # variance collapse in a BN-less net: REPAIR helps clearly
        assert repaired < plain - 0.01, (plain, repaired)
    else:  # with BN, re-estimated statistics already do most of it
        assert repaired <= plain + 0.02, (plain, repaired)


# ----------------------------------------------------------------------------- CLI, --data
SEQ_MODULE = '''
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset


def seq_cnn():
    return nn.Sequential(nn.Conv1d(2, 6, 5, padding=2, bias=False), nn.BatchNorm1d(6), nn.ReLU(),
                         nn.Conv1d(6, 8, 3, padding=1, bias=False), nn.BatchNorm1d(8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 20, 3))  # sequences of length 20 only


def seq_data():
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(48, 2, 20, generator=g), torch.randint(0, 3, (48,), generator=g))
'''


@pytest.mark.parametrize("command", ["build", "scan", "align"])
def test_cli_align_traces_a_sequential_1d_cnn_with_the_data(command, mce_cli, tmp_path, monkeypatch):
    """A Sequential 1-D CNN has no input shape to guess: --align must trace it with --data's inputs."""
    import importlib
    import json
    import sys
    import uuid

    from mcensemble.checkpoints import save_checkpoint
    name = f"mce_seq_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(SEQ_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    mod = importlib.import_module(name)
    try:
        files = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            net = randomize(mod.seq_cnn(), seed)
            files.append(tmp_path / f"{seed}.safetensors")
            save_checkpoint(net.state_dict(), files[-1])
        common = ["--model", f"{name}:seq_cnn", "--data", f"{name}:seq_data", "--report", tmp_path / "r.json"]
        if command == "align":
            res = mce_cli("align", *files, *common, "--out", tmp_path / "b2.safetensors")
            assert res.exit_code == 0, res.output
            assert json.loads((tmp_path / "r.json").read_text())["groups"] >= 2
            # --precision bf16: the check runs under autocast; the matching is the same
            res = mce_cli("align", *files, *common, "--out", tmp_path / "b3.safetensors", "--precision", "bf16")
            assert res.exit_code == 0, res.output
            from safetensors.torch import load_file
            b2, b3 = load_file(str(tmp_path / "b2.safetensors")), load_file(str(tmp_path / "b3.safetensors"))
            assert b2.keys() == b3.keys() and all(torch.equal(b2[k], b3[k]) for k in b2)
            return
        common += ["--method", "linear", "--align"]
        if command == "build":
            args = ["build", *files, *common, "--members", "2", "--selection", "uniform", "--candidates", "3",
                    "--out", tmp_path / "ens.safetensors"]
        else:
            args = ["scan", *files, *common, "--points", "3"]
        res = mce_cli(*args)
        assert res.exit_code == 0, res.output
        report = json.loads((tmp_path / "r.json").read_text())
        assert report["aligned"]
    finally:
        sys.modules.pop(name, None)


# moved from test_review_fixes.py
from helpers import gaussian_batches as _data  # noqa: E402
from mcensemble.errors import DataSpecError  # noqa: E402


def test_repair_empty_loader_and_bad_t():
    from mcensemble.align import Repair

    torch.manual_seed(0)
    mk = lambda: nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))  # noqa: E731
    a, b = mk().state_dict(), mk().state_dict()
    with pytest.raises(DataSpecError, match="no batches"):
        Repair(mk(), a, b, [], example_input=torch.zeros(2, 4))
    rep = Repair(mk(), a, b, _data(), example_input=torch.zeros(2, 4))
    with pytest.raises(BadOptionError, match="number"):
        rep(a, "half")


# ----------------------------------------------------------------------------- precision
def test_align_in_bf16_finds_the_fp32_matching_and_still_checks():
    """Weight matching uses the weights only: bf16 gives the same permutations; the check of
    the function runs under bf16 autocast (looser tolerance) and still catches a wrong graph."""
    torch.manual_seed(0)
    model = randomize(DigitsCNN(), 0)
    a, b = model.state_dict(), randomize(DigitsCNN(), 1).state_dict()
    x = torch.rand(4, 1, 8, 8)
    ref = align_states(DigitsCNN, a, b, example_input=x)
    got = align_states(DigitsCNN, a, b, example_input=x, precision="bf16")
    assert ref.perms.keys() == got.perms.keys()
    assert all(torch.equal(ref.perms[k], got.perms[k]) for k in ref.perms)
    assert all(torch.equal(ref.state[k], got.state[k]) for k in ref.state)
    graph = build_unit_graph(DigitsMLP(), x[:1])
    broken = UnitGraph([UnitGroup(g.name, g.size, [r for r in g.members if r.role != "consumer"],
                                  g.depth) for g in graph.groups], graph.classifier)
    mlp_a, mlp_b = randomize(DigitsMLP(), 0).state_dict(), randomize(DigitsMLP(), 1).state_dict()
    with pytest.raises(UnitGraphError, match="other outputs"):
        align_states(DigitsMLP, mlp_a, mlp_b, graph=broken, example_input=x, precision="bf16")


def test_repair_in_bf16_is_close_to_fp32(pair, loaders):
    """REPAIR's statistics measured under bf16 autocast (summed in float64 / float32): the
    repaired network's loss within 2% of the fp32 REPAIR's, its corrected tensors within 3%."""
    name, factory, a, b = pair
    train, _ = loaders
    mid = interpolate(a, b, 0.5)
    out = {p: Repair(factory(), a, b, train, max_batches=2, precision=p)(mid, 0.5) for p in ("fp32", "bf16")}
    changed = [k for k, v in out["fp32"].items() if v.is_floating_point() and not torch.equal(v, mid[k])]
    assert changed
    assert any(not torch.equal(out["bf16"][k], out["fp32"][k]) for k in changed)  # bf16 did run
    for k in changed:
        diff = float((out["bf16"][k] - out["fp32"][k]).norm())
        assert diff <= 0.03 * float(out["fp32"][k].norm()) + 1e-6, k
    net = factory()
    l32, l16 = (evaluate_state(net, out[p], train).loss for p in ("fp32", "bf16"))
    assert l16 == pytest.approx(l32, rel=0.02)
