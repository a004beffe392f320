"""The key quality claim, small and fast: on a pair of small models trained where ensembles
matter, the ensemble `build` makes with its default selection (with replacement, behind the
bootstrap gate; at most 4 members) has a held-out NLL below both endpoints', and the curve's
worst training loss is far below the straight line's midpoint.

Setting (as in tests/benchmarks/bench_quality.py): `digits,train=300,noise=0.2` (300
training examples, a fifth of their labels wrong), endpoints trained 100 epochs (long
enough to fit the noise: overconfident, diverse models), a Bezier curve fitted 100 epochs,
members chosen on a clean selection split (digits training-split examples 1077..1436,
never trained on), NLL reported on the `digits` val split (360 examples, used for nothing
else). With the old fit defaults (bends at the points' learning rate, no alignment) 4
greedy members beat the better endpoint by 0.044..0.072 (MLP) and 0.013..0.085 (CNN) on
seeds 0..7. The flat default fit (aligned start, bends at 4x the rate) fits the MLP's wrong
labels along the whole curve as the endpoints do, so 4 forced curve members lost to the
better endpoint there (0.656 against 0.625), and the selection's choice, the two-endpoint
ensemble (0.641), does not beat the better endpoint either: on that MLP the old curve's gain
was the early stopping of an under-fitted middle, not averaging. The claim is kept for the
BN CNN, the case the flat default was made for (docs/benchmarks/quality.md).
"""
from __future__ import annotations

import sys
import types

import pytest
import torch

from mcensemble import zoo  # noqa: F401  (registers mce_* archs)
from mcensemble.checkpoints import save_checkpoint
from mcensemble.data import create_loader, digits_tensors
from mcensemble.members import ensemble_metrics, predict_log_probs
from mcensemble.models import ModelSpec, create_model
from mcensemble.options import BuildOptions, DataOptions, ModelOptions
from mcensemble.pipeline import build_ensemble

from helpers import train_seeded

DATA = "digits,train=300,noise=0.2"
EPOCHS = 100
CURVE_EPOCHS = 100
_MOD = "_mce_test_quality_data"


def _selection():
    x, y = digits_tensors("train")
    return torch.utils.data.TensorDataset(x[1077:].contiguous(), y[1077:].clone())


@pytest.fixture()
def selection_spec(monkeypatch):
    mod = types.ModuleType(_MOD)
    mod.selection = _selection
    monkeypatch.setitem(sys.modules, _MOD, mod)
    return f"{_MOD}:selection"


def _train(arch: str, seed: int, dest):
    net = train_seeded(lambda: create_model(ModelSpec(arch=arch, kwargs={"num_classes": 10, "in_chans": 1})),
                       seed, epochs=EPOCHS, data=DATA)
    save_checkpoint(net.state_dict(), dest, metadata={"arch": arch, "num_classes": 10, "in_chans": 1})
    return net


@pytest.mark.parametrize("arch", ["mce_digits_cnn"])
def test_curve_ensemble_beats_both_endpoints(arch, tmp_path, selection_spec, mce_one_thread):
    files = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    nets = [_train(arch, seed, f) for seed, f in zip((0, 1), files)]
    res = build_ensemble(files, model=ModelOptions(),
                         data=DataOptions(data=DATA, val_data=selection_spec, batch_size=64, seed=0, progress=False),
                         opts=BuildOptions(method="bezier", members=4, selection="greedy", settings={"epochs": CURVE_EPOCHS},
                                           packed=False))
    rep = res.report
    assert rep["selection"] == "greedy-val-nll" and 1 <= len(res.member_states) <= 4

    test = create_loader("digits", split="val", batch_size=512)
    ends = []
    for net in nets:
        lp, labels = predict_log_probs(net, test)
        ends.append(ensemble_metrics([lp], labels).nll)
    scratch = create_model(ModelSpec(arch=arch, kwargs={"num_classes": 10, "in_chans": 1}))
    member_lp = []
    for state in res.member_states:
        scratch.load_state_dict(state, strict=True)
        member_lp.append(predict_log_probs(scratch, test)[0])
    built_nll = ensemble_metrics(member_lp, labels, weights=res.weights).nll
    assert built_nll < min(ends) - 0.01, (built_nll, ends, rep["choice"]["decision"])

    worst = rep["path"]["worst"]["loss"]
    mid = min(rep["line"]["points"], key=lambda p: abs(p["t"] - 0.5))
    assert mid["t"] == pytest.approx(0.5)
    # seed 0 gave ratios of about 0.36 (MLP) and 0.015 (CNN)
    assert worst < 0.5 * mid["loss"], (worst, mid["loss"])
