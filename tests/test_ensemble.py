"""EnsembleModel, the ensemble file, inference strategies and load_ensemble() safety."""
from __future__ import annotations

import importlib
import json
import logging
import math
import sys
import uuid

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from mcensemble.ensemble import (
    EnsembleModel, combine_mean_prob, load_ensemble, read_ensemble_metadata, save_ensemble,
)
from mcensemble.errors import (
    ArchitectureMismatchError, BadOptionError, CheckpointError, ModelSpecError, NonFiniteError,
)
from mcensemble.models import ModelSpec

from helpers import clone_state

STRATEGIES = ["loop", "vmap"]


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 5))


def make_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))


def member_states(factory, k, *, seed=0):
    states = []
    for i in range(k):
        torch.manual_seed(seed + i)
        m = factory()
        with torch.no_grad():   # non-trivial BN statistics
            for mod in m.modules():
                if isinstance(mod, nn.BatchNorm2d):
                    mod.running_mean.uniform_(-0.5, 0.5)
                    mod.running_var.uniform_(0.5, 2.0)
                    mod.num_batches_tracked.fill_(i + 3)
        states.append(clone_state(m))
    return states


def loop_then_vmap(ens, x):
    """`ens(x)` without gradients with the loop strategy, then with vmap (left selected)."""
    with torch.no_grad():
        ens.strategy = "loop"
        a = ens(x)
        ens.strategy = "vmap"
        return a, ens(x)


def by_hand(factory, states, x):
    probs = []
    for st in states:
        m = factory()
        m.load_state_dict(st)
        m.eval()
        with torch.no_grad():
            probs.append(torch.softmax(m(x).double(), dim=1))
    return torch.stack(probs).mean(0).log()


MODELS = {
    "mlp": (make_mlp, lambda b: torch.randn(b, 1, 4, 4)),
    "cnn": (make_cnn, lambda b: torch.randn(b, 1, 8, 8)),
}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("arch", list(MODELS))
def test_forward_is_log_mean_prob(arch, strategy):
    factory, data = MODELS[arch]
    states = member_states(factory, 3)
    x = data(7)
    ens = EnsembleModel(factory, states, strategy=strategy)
    assert len(ens) == 3 and not ens.training
    with torch.no_grad():
        out = ens(x)
    assert out.shape == (7, 5)
    assert ens.strategy == strategy
    torch.testing.assert_close(out.double(), by_hand(factory, states, x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(7), atol=1e-5, rtol=0)
    with torch.no_grad():
        ml = ens.member_logits(x)
    assert ml.shape == (3, 7, 5)
    torch.testing.assert_close(combine_mean_prob(ml), out)


@pytest.mark.parametrize("arch", list(MODELS))
def test_loop_and_vmap_agree(arch):
    factory, data = MODELS[arch]
    ens = EnsembleModel(factory, member_states(factory, 4))
    x = data(9)
    a, b = loop_then_vmap(ens, x)
    assert ens.strategy == "vmap"
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # works with gradients enabled too (falls back to the loop, gradients reach members)
    out = ens(x)
    out.logsumexp(1).sum().backward()
    assert ens.members[0][0].weight.grad is not None if arch == "cnn" else \
        ens.members[0][1].weight.grad is not None


def test_the_default_strategy_is_the_loop():
    assert EnsembleModel(make_cnn, member_states(make_cnn, 2)).strategy == "loop"


def test_auto_measures_and_caches():
    ens = EnsembleModel(make_cnn, member_states(make_cnn, 2), strategy="auto")
    assert ens.strategy == "auto"
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        out = ens(x)
    assert ens.strategy in ("loop", "vmap")
    assert len(ens.auto_timings) == 1
    (rec,) = ens.auto_timings.values()
    assert rec["winner"] == ens.strategy and rec["loop"] > 0 and rec["vmap"] > 0
    with torch.no_grad():
        again = ens(x)
    assert len(ens.auto_timings) == 1           # cached, not re-measured
    torch.testing.assert_close(out, again, atol=1e-5, rtol=1e-5)


def test_custom_strategy_function():
    calls = []

    def mine(ens, x):
        calls.append(x.shape)
        return torch.stack([m(x) for m in ens.members])

    ens = EnsembleModel(make_mlp, member_states(make_mlp, 2), strategy=mine)
    ens(torch.randn(3, 16))
    assert calls and ens.strategy == "mine"
    with pytest.raises(BadOptionError, match="unknown ensemble strategy 'fast'"):
        ens.strategy = "fast"


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.fc(x)
        if y.abs().max() > 1e6:        # data-dependent control flow: vmap cannot do this
            y = y / 2
        return y


@pytest.mark.parametrize("strategy", ["vmap", "auto"])
def test_vmap_falls_back_to_loop_with_warning(strategy, caplog):
    ens = EnsembleModel(DataDependent, member_states(DataDependent, 3), strategy=strategy)
    x = torch.randn(5, 4)
    with caplog.at_level(logging.WARNING, logger="mcensemble.ensemble"), torch.no_grad():
        out = ens(x)
    assert "vmap strategy failed" in caplog.text
    assert ens.strategy == ("loop" if strategy == "auto" else "vmap")
    with torch.no_grad():
        ref = torch.stack([m(x) for m in ens.members])
    torch.testing.assert_close(out, combine_mean_prob(ref))


def test_bn_train_mode_vmap_matches_loop():
    states = member_states(make_cnn, 2)
    x = torch.randn(6, 1, 8, 8)
    outs, bufs = [], []
    for strategy in STRATEGIES:
        ens = EnsembleModel(make_cnn, states, strategy=strategy).train()
        with torch.no_grad():
            outs.append(ens(x))
        bufs.append(ens.member_state_dict(1))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for n in bufs[0]:
        torch.testing.assert_close(bufs[0][n], bufs[1][n], atol=1e-5, rtol=1e-5)
    assert not torch.equal(bufs[0]["1.running_mean"], states[1]["1.running_mean"])


def test_holds_exactly_k_copies_and_to_keeps_sharing():
    k = 3
    ens = EnsembleModel(make_cnn, member_states(make_cnn, k))

    def storage_bytes():
        seen = {}
        for t in list(ens.parameters()) + list(ens.buffers()):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return sum(seen.values())

    def nbytes(m):
        return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))

    assert storage_bytes() == k * nbytes(make_cnn())
    ens.to("cpu")
    ens.double()
    assert ens.members[2][0].weight.dtype == torch.float64
    assert storage_bytes() == k * nbytes(make_cnn().double())
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    a, b = loop_then_vmap(ens, x)
    torch.testing.assert_close(a, b)
    # in-place edits of a member are seen by the vmap strategy (same memory)
    with torch.no_grad():
        ens.members[0][-1].bias[0] += 5.0
        c = ens(x)
        ens.strategy = "loop"
        d = ens(x)
    torch.testing.assert_close(c, d)
    assert not torch.allclose(a, c)
    # a deep copy is an independent ensemble that again holds exactly K copies
    import copy
    ens2 = copy.deepcopy(ens)
    assert storage_bytes() == k * nbytes(make_cnn().double())
    with torch.no_grad():
        ens2.members[1][-1].bias[1] += 3.0
        ens2.strategy = "vmap"
        e = ens2(x)
        ens2.strategy = "loop"
        torch.testing.assert_close(e, ens2(x))
        torch.testing.assert_close(ens(x), d)
    ens = ens2
    assert storage_bytes() == k * nbytes(make_cnn().double())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_inference_mode_and_to_cpu(strategy):
    ens = EnsembleModel(make_cnn, member_states(make_cnn, 2), strategy=strategy).to("cpu")
    x = torch.randn(3, 1, 8, 8)
    with torch.inference_mode():
        out = ens(x)
    assert out.shape == (3, 5)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cuda(strategy):
    states = member_states(make_cnn, 2)
    x = torch.randn(3, 1, 8, 8)
    ens = EnsembleModel(make_cnn, states, strategy=strategy)
    with torch.no_grad():
        ref = ens(x)
    ens.to("cuda")
    assert all(t.is_cuda for t in list(ens.parameters()) + list(ens.buffers()))
    with torch.no_grad():
        out = ens(x.cuda())
    torch.testing.assert_close(out.cpu(), ref, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- file

@pytest.mark.parametrize("strategy", STRATEGIES)
def test_save_load_round_trip(tmp_path, strategy):
    states = member_states(make_cnn, 3)
    f = tmp_path / "ens.safetensors"
    members = [{"t": 0.0, "kind": "bezier"}, {"t": 0.5, "kind": "bezier", "val_nll": 0.1},
               {"t": 1.0, "kind": "bezier"}]
    save_ensemble(f, states, model_spec=None, members=members,
                  sources=[{"file": "a.pt", "sha256": "0" * 64}], extra={"note": "hi"})
    ens = load_ensemble(f, model=make_cnn, strategy=strategy)
    assert len(ens) == 3 and not ens.training
    for i, st in enumerate(states):
        got = ens.member_state_dict(i)
        assert got.keys() == st.keys()
        for n in st:
            assert torch.equal(got[n], st[n]) and got[n].dtype == st[n].dtype, n
    md = ens.metadata
    assert md["format"] == "mcensemble-ensemble" and md["format_version"] == 1
    assert md["members"] == members and md["combine"] == "mean_prob"
    assert md["sources"] == [{"file": "a.pt", "sha256": "0" * 64}] and md["note"] == "hi"
    assert read_ensemble_metadata(f) == md
    # member_state_dict is a fresh copy
    sd = ens.member_state_dict(0)
    sd["0.weight"].zero_()
    assert not torch.equal(ens.member_state_dict(0)["0.weight"], sd["0.weight"])
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ens(x).double(), by_hand(make_cnn, states, x),
                                   atol=1e-5, rtol=1e-5)
    # raw file layout
    raw = load_file(str(f))
    assert set(raw) == {f"member.{i}.{n}" for i in range(3) for n in states[0]}
    # EnsembleModel.save round-trips too
    g = ens.save(tmp_path / "again.safetensors")
    ens2 = load_ensemble(g, model=make_cnn())            # nn.Module as model=
    assert ens2.metadata["members"] == members and ens2.metadata["note"] == "hi"
    for i in range(3):
        assert all(torch.equal(ens2.member_state_dict(i)[n], states[i][n]) for n in states[i])


def test_save_handles_shared_and_noncontiguous(tmp_path):
    w = torch.randn(6, 4)
    st = {"a": w, "b": w, "c": w.t(), "d": w[1]}
    f = save_ensemble(tmp_path / "e.safetensors", [st, {k: v.clone() for k, v in st.items()}])
    raw = load_file(str(f))
    assert torch.equal(raw["member.0.b"], w) and torch.equal(raw["member.0.c"], w.t())
    assert torch.equal(raw["member.1.d"], w[1])


def test_sources_as_paths_are_hashed(tmp_path):
    src = tmp_path / "a.bin"
    src.write_bytes(b"hello")
    f = save_ensemble(tmp_path / "e.safetensors", member_states(make_mlp, 1), sources=[src])
    md = read_ensemble_metadata(f)
    assert md["sources"] == [{"file": "a.bin", "sha256": (
        "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824")}]
    assert md["members"] == [{"t": None, "kind": "state"}] and md["model"] is None


def test_save_validation(tmp_path):
    f = tmp_path / "e.safetensors"
    states = member_states(make_cnn, 3)
    with pytest.raises(BadOptionError, match="at least one member"):
        save_ensemble(f, [])
    bad = dict(states[2])
    bad["3.weight"] = torch.zeros(7, 4, 3, 3)
    with pytest.raises(ArchitectureMismatchError,
                       match=r"member 2 tensor '3.weight' has shape \(7, 4, 3, 3\).*\(6, 4, 3, 3\)"):
        save_ensemble(f, [states[0], states[1], bad])
    missing = {k: v for k, v in states[1].items() if k != "8.bias"}
    with pytest.raises(ArchitectureMismatchError, match="member 1 .*missing 1 tensor.*8.bias"):
        save_ensemble(f, [states[0], missing])
    nan = dict(states[1])
    nan["8.bias"] = torch.tensor([0.0, float("nan"), 0, 0, 0])
    with pytest.raises(NonFiniteError, match="member 1 tensor '8.bias'"):
        save_ensemble(f, [states[0], nan])
    with pytest.raises(BadOptionError, match=r"t=1.5; t must be a number in \[0, 1\]"):
        save_ensemble(f, states[:1], members=[{"t": 1.5, "kind": "linear"}])
    with pytest.raises(BadOptionError, match="describes 1 member"):
        save_ensemble(f, states[:2], members=[{"t": 0.5, "kind": "linear"}])
    with pytest.raises(BadOptionError, match="reserved key 'members'"):
        save_ensemble(f, states[:1], extra={"members": []})
    assert not f.exists() and not list(tmp_path.iterdir())     # nothing half-written


def test_load_mismatched_members_names_tensor(tmp_path):
    f = tmp_path / "e.safetensors"
    save_ensemble(f, member_states(make_cnn, 2))
    with pytest.raises(ArchitectureMismatchError, match=r"member 0 .*unexpected 12 tensor.*0.bias"):
        load_ensemble(f, model=make_mlp)
    with pytest.raises(ArchitectureMismatchError,
                       match=r"member 0 tensor '8.weight' has shape \(5, 6\), but the model has shape \(5, 7\)"):
        load_ensemble(f, model=lambda: nn.Sequential(*list(make_cnn())[:-1], nn.Linear(7, 5)))
    # a file whose members differ from each other (hand-crafted)
    raw = load_file(str(f))
    raw["member.1.8.weight"] = torch.zeros(5, 7)
    meta = {"mcensemble": read_and_dump(f)}
    save_file(raw, str(f), metadata=meta)
    with pytest.raises(ArchitectureMismatchError, match=r"member 1 tensor '8.weight' has shape \(5, 7\)"):
        load_ensemble(f, model=make_cnn)


def read_and_dump(f, **changes):
    md = read_ensemble_metadata(f)
    md.update(changes)
    return json.dumps(md)


def test_load_refuses_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="nope.safetensors' not found"):
        load_ensemble(tmp_path / "nope.safetensors", model=make_mlp)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(CheckpointError, match="junk.safetensors.*not a readable safetensors"):
        load_ensemble(junk, model=make_mlp)
    plain = tmp_path / "plain.safetensors"
    save_file(make_mlp().state_dict(), str(plain))
    with pytest.raises(CheckpointError, match="plain.safetensors.*not an mcensemble ensemble file"):
        load_ensemble(plain, model=make_mlp)
    path_file = tmp_path / "path.safetensors"
    save_file({"endpoint.0.w": torch.zeros(1)}, str(path_file),
              metadata={"mcensemble": json.dumps({"format": "mcensemble-path", "format_version": 1})})
    with pytest.raises(CheckpointError, match="path file"):
        load_ensemble(path_file, model=make_mlp)


def test_load_refuses_newer_format(tmp_path):
    f = tmp_path / "e.safetensors"
    save_ensemble(f, member_states(make_mlp, 2))
    save_file(load_file(str(f)), str(f), metadata={"mcensemble": read_and_dump(f, format_version=7)})
    with pytest.raises(CheckpointError,
                       match=r"written by a newer mcensemble \(format 7 > 1\); upgrade mcensemble"):
        load_ensemble(f, model=make_mlp)


def test_load_without_model_spec_asks_for_model(tmp_path):
    f = save_ensemble(tmp_path / "e.safetensors", member_states(make_mlp, 1))
    with pytest.raises(CheckpointError, match="does not say how to build the model; pass `model`"):
        load_ensemble(f)


# --------------------------------------------------------------------------- security

EVIL = '''
import pathlib, torch.nn as nn
pathlib.Path({marker!r}).write_text("imported")

def build():
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 5))
'''


def test_entry_in_file_is_not_imported_without_trust(tmp_path, monkeypatch):
    name = f"mce_evil_{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "marker.txt"
    (tmp_path / f"{name}.py").write_text(EVIL.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    f = tmp_path / "e.safetensors"
    states = member_states(make_mlp, 2)
    save_ensemble(f, states, model_spec=ModelSpec(entry=f"{name}:build"))

    with pytest.raises(ModelSpecError,
                       match=rf"names code '{name}:build'.*not imported.*`model`.*`trust_remote_code`=True"):
        load_ensemble(f)
    assert not marker.exists()
    assert name not in sys.modules

    ens = load_ensemble(f, model=make_mlp)                 # the caller's model: still nothing imported
    assert len(ens) == 2
    assert not marker.exists() and name not in sys.modules

    try:
        ens = load_ensemble(f, trust_remote_code=True)
        assert marker.exists() and name in sys.modules
        assert torch.equal(ens.member_state_dict(1)["3.weight"], states[1]["3.weight"])
    finally:
        sys.modules.pop(name, None)


def test_entry_next_to_arch_is_ignored(tmp_path, monkeypatch):
    timm = pytest.importorskip("timm")
    name = f"mce_evil_{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "marker.txt"
    (tmp_path / f"{name}.py").write_text(EVIL.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    kwargs = {"num_classes": 10, "in_chans": 1}
    torch.manual_seed(0)
    states = [timm.create_model("test_resnet", **kwargs).state_dict() for _ in range(2)]
    f = save_ensemble(tmp_path / "e.safetensors", states,
                      model_spec={"arch": "test_resnet", "entry": f"{name}:build", "kwargs": kwargs})
    ens = load_ensemble(f)
    assert len(ens) == 2 and not marker.exists() and name not in sys.modules


# --------------------------------------------------------------------------- timm

@pytest.mark.parametrize("strategy", STRATEGIES)
def test_timm_round_trip_from_spec(tmp_path, strategy):
    timm = pytest.importorskip("timm")
    kwargs = {"num_classes": 10, "in_chans": 1}
    states = []
    for seed in range(2):
        torch.manual_seed(seed)
        states.append({n: t.clone() for n, t in
                       timm.create_model("test_resnet", **kwargs).state_dict().items()})
    f = save_ensemble(tmp_path / "timm.safetensors", states,
                      model_spec=ModelSpec(arch="test_resnet", kwargs=kwargs),
                      members=[{"t": 0.0, "kind": "linear"}, {"t": 1.0, "kind": "linear"}])
    ens = load_ensemble(f, strategy=strategy)
    assert ens.model_spec == ModelSpec(arch="test_resnet", kwargs=kwargs)
    for i in range(2):
        got = ens.member_state_dict(i)
        assert all(torch.equal(got[n], states[i][n]) for n in states[i])
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        out = ens(x)
    assert out.shape == (3, 10)
    factory = lambda: timm.create_model("test_resnet", **kwargs)  # noqa: E731
    torch.testing.assert_close(out.double(), by_hand(factory, states, x), atol=1e-5, rtol=1e-5)


def test_public_reexport():
    import mcensemble
    assert mcensemble.load_ensemble is load_ensemble and mcensemble.EnsembleModel is EnsembleModel
    assert math.isclose(float(combine_mean_prob(torch.zeros(4, 2, 3)).exp().sum(1)[0]), 1.0,
                        rel_tol=1e-6)


# ----------------------------------------------------------------------------- member weights
def weighted_by_hand(factory, states, weights, x):
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    probs = []
    for st in states:
        m = factory()
        m.load_state_dict(st)
        with torch.no_grad():
            probs.append(torch.softmax(m.eval()(x).double(), dim=1))
    return (torch.stack(probs) * w.view(-1, 1, 1)).sum(0).log()


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("arch", list(MODELS))
def test_weights_round_trip_and_change_forward(tmp_path, arch, strategy):
    factory, data = MODELS[arch]
    states = member_states(factory, 3)
    x = data(6)
    f = tmp_path / "w.safetensors"
    save_ensemble(f, states, members=[{"t": 0.0}, {"t": 0.5}, {"t": 1.0}], weights=[3, 0, 1])
    md = read_ensemble_metadata(f)
    assert [m["weight"] for m in md["members"]] == [0.75, 0.0, 0.25]  # normalised, stored per member
    ens = load_ensemble(f, model=factory, strategy=strategy)
    assert ens.weights == [0.75, 0.0, 0.25]
    with torch.no_grad():
        out = ens(x)
    torch.testing.assert_close(out.double(), weighted_by_hand(factory, states, [3, 0, 1], x), atol=1e-5, rtol=1e-5)
    equal = by_hand(factory, states, x)
    assert (out.double() - equal).abs().max() > 1e-3  # the weights matter
    # a zero-weight member does not count: the same as the two-member ensemble 3:1
    two = EnsembleModel(factory, [states[0], states[2]], weights=[0.75, 0.25], strategy=strategy)
    with torch.no_grad():
        torch.testing.assert_close(two(x), out, atol=1e-5, rtol=1e-5)
    # re-saving keeps them; setting them changes forward and the metadata
    ens.save(tmp_path / "again.safetensors")
    assert load_ensemble(tmp_path / "again.safetensors", model=factory).weights == [0.75, 0.0, 0.25]
    ens.weights = [1, 1, 1]
    assert ens.metadata["members"][1]["weight"] == pytest.approx(1 / 3)
    with torch.no_grad():
        torch.testing.assert_close(ens(x).double(), equal, atol=1e-5, rtol=1e-5)


def test_files_without_weights_load_with_equal_weights(tmp_path):
    states = member_states(make_mlp, 2)
    f = tmp_path / "old.safetensors"
    save_ensemble(f, states)
    assert all("weight" not in m for m in read_ensemble_metadata(f)["members"])
    ens = load_ensemble(f, model=make_mlp)
    assert ens.weights == [0.5, 0.5]
    x = torch.randn(4, 1, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(ens(x).double(), by_hand(make_mlp, states, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("weights, match", [
    ([1.0, float("nan")], r"weights\[1\] = nan: member weights must be finite and >= 0"),
    ([1.0, float("inf")], r"weights\[1\] = inf"),
    ([-0.5, 1.5], r"weights\[0\] = -0.5"),
    ([0, 0], "sum to 0"),
    ([1.0], "1 value.*2 member"),
    (["a", 1], "must be 2 numbers"),
    ([True, 1], "must be 2 numbers"),
])
def test_bad_weights_are_refused(tmp_path, weights, match):
    states = member_states(make_mlp, 2)
    with pytest.raises(BadOptionError, match=match):
        save_ensemble(tmp_path / "w.safetensors", states, weights=weights)
    with pytest.raises(BadOptionError, match=match):
        EnsembleModel(make_mlp, states, weights=weights)
    assert not (tmp_path / "w.safetensors").exists()


def test_load_refuses_bad_weights_in_the_file(tmp_path):
    f = tmp_path / "e.safetensors"
    save_ensemble(f, member_states(make_mlp, 2), weights=[1, 1])
    good, tensors = read_ensemble_metadata(f), load_file(str(f))
    for members, match in (([{"t": None, "kind": "state", "weight": -1}, {"t": None, "kind": "state", "weight": 1}],
                            r"weight.* -1"),
                           ([{"t": None, "kind": "state", "weight": 1}, {"t": None, "kind": "state"}],
                            "member 1 has no weight")):
        save_file(tensors, str(f), metadata={"mcensemble": json.dumps({**good, "members": members})})
        with pytest.raises(CheckpointError, match=match):
            load_ensemble(f, model=make_mlp)


def test_combine_mean_prob_with_weights():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 5)
    p = torch.softmax(logits.double(), dim=2)
    want = (0.5 * p[0] + 0.3 * p[1] + 0.2 * p[2]).log()
    torch.testing.assert_close(combine_mean_prob(logits.double(), [5, 3, 2]), want)
    # equal weights take the unweighted path exactly
    assert torch.equal(combine_mean_prob(logits, [2, 2, 2]), combine_mean_prob(logits))


@pytest.mark.parametrize("dtype", [None, "bf16", "fp16"])
def test_streamed_file_is_what_save_file_writes(tmp_path, dtype):
    """save_ensemble writes tensor by tensor; the file has the same tensor bytes in the same
    order, the same header and a right tensor_sha256 record as safetensors' save_file of all
    the tensors at once would."""
    from mcensemble._io import safetensors_layout, tensor_hashes, verify_file
    states = member_states(make_cnn, 11)  # 11 members: member.10.* sorts between member.1.* and member.2.*
    f = save_ensemble(tmp_path / "e.safetensors", states, dtype=dtype)
    header, start = safetensors_layout(f)
    tensors = load_file(str(f))
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata=header["__metadata__"])
    ref_header, ref_start = safetensors_layout(tmp_path / "ref.safetensors")
    assert header == ref_header and start == ref_start and start % 8 == 0
    assert f.read_bytes()[start:] == (tmp_path / "ref.safetensors").read_bytes()[ref_start:]
    doc = json.loads(header["__metadata__"]["mcensemble"])
    assert doc["tensor_sha256"] == tensor_hashes(tensors)
    assert list(doc["tensor_sha256"]) == [f"member.{i}.{n}" for i, st in enumerate(states) for n in st]
    assert verify_file(f) == ("mcensemble-ensemble", len(tensors))
    want = torch.float32 if dtype is None else {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    assert tensors["member.3.0.weight"].dtype == want
    torch.testing.assert_close(tensors["member.3.0.weight"].float(), states[3]["0.weight"], rtol=1e-2, atol=1e-2)


def test_ensemble_model_save_copies_no_member(tmp_path, monkeypatch):
    ens = EnsembleModel(make_mlp, member_states(make_mlp, 3))
    monkeypatch.setattr(EnsembleModel, "member_state_dict", lambda self, i: pytest.fail("cloned a member"))
    f = ens.save(tmp_path / "e.safetensors")
    got = load_ensemble(f, model=make_mlp)
    for i in range(3):
        for n, t in ens.members[i].state_dict().items():
            assert torch.equal(got.members[i].state_dict()[n], t)
