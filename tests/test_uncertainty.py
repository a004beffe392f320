"""EnsembleModel.predict: per-example uncertainty against direct formulas and a hand example."""
from __future__ import annotations

import math

import pytest
import torch

from mcensemble.ensemble import EnsembleModel, save_ensemble
from mcensemble.errors import BadOptionError
from mcensemble.uncertainty import Prediction, entropy, predict_from_logits

from helpers import assert_close_rel, tiny_mlp, tiny_mlp_states


make_mlp = tiny_mlp


def states(k: int) -> list[dict]:
    return tiny_mlp_states(k, head_scale=4.0)


def direct(member_probs: torch.Tensor, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """The quantities straight from their definitions, in float64."""
    p = member_probs.double()
    w = w.double() / w.double().sum()
    mean = (w.view(-1, 1, 1) * p).sum(0)
    h = lambda q: -(q * q.log()).sum(-1)  # noqa: E731 - probabilities are > 0 here
    expected = (w.view(-1, 1) * h(p)).sum(0)
    top = mean.argmax(1)
    dis = (w.view(-1, 1) * (p.argmax(2) != top).double()).sum(0)
    return {"probs": mean, "entropy": h(mean), "expected_entropy": expected,
            "mutual_information": h(mean) - expected, "disagreement": dis}


@pytest.mark.parametrize("weights", [None, [0.2, 0.5, 0.3]])
def test_predict_matches_direct_formulas(weights):
    sts = states(3)
    ens = EnsembleModel(make_mlp, sts, weights=weights)
    x = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    pred = ens.predict(x)
    assert isinstance(pred, Prediction)
    with torch.no_grad():
        member_probs = torch.stack([torch.softmax(m(x), 1) for m in ens.members])
    want = direct(member_probs, torch.tensor(weights or [1.0, 1.0, 1.0]))
    for name, value in want.items():
        assert_close_rel(getattr(pred, name), value, rtol=1e-5, msg=name)
    # the identity MI = H[mean] - mean H, and the members do disagree somewhere
    assert_close_rel(pred.mutual_information, pred.entropy - pred.expected_entropy, rtol=1e-5)
    assert float(pred.mutual_information.max()) > 1e-3 and float(pred.disagreement.max()) > 0
    assert (pred.mutual_information >= 0).all()
    # forward is unchanged: the log of predict's probabilities
    with torch.no_grad():
        assert_close_rel(ens(x).exp(), pred.probs, rtol=1e-6)
    assert not pred.probs.requires_grad


def test_two_members_by_hand():
    # member 1: p = (1/2, 1/2); member 2: p = (1, 0) up to e^-40 -> mean (3/4, 1/4)
    logits = torch.tensor([[[0.0, 0.0]], [[40.0, 0.0]]], dtype=torch.float64)
    pred = predict_from_logits(logits)
    h_mean = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))   # 0.5623
    mean_h = (math.log(2) + 0.0) / 2                              # 0.3466
    assert pred.probs[0].tolist() == pytest.approx([0.75, 0.25], rel=1e-12)
    assert float(pred.entropy) == pytest.approx(h_mean, rel=1e-9)
    assert float(pred.expected_entropy) == pytest.approx(mean_h, rel=1e-9)
    assert float(pred.mutual_information) == pytest.approx(h_mean - mean_h, rel=1e-9)
    # member 1 ties (argmax 0), member 2 says class 0, the ensemble class 0: no disagreement
    assert float(pred.disagreement) == 0.0
    # weights 3:1 towards a member whose top class is 1
    logits = torch.tensor([[[0.0, math.log(3.0)]], [[40.0, 0.0]]], dtype=torch.float64)
    pred = predict_from_logits(logits, [3.0, 1.0])
    mean = [0.75 * 0.25 + 0.25, 0.75 * 0.75]                    # (0.4375, 0.5625): class 1
    assert pred.probs[0].tolist() == pytest.approx(mean, rel=1e-12)
    assert float(pred.disagreement) == pytest.approx(0.25)      # member 2 (weight 1/4) says class 0


def test_temperature_changes_probs_not_members():
    sts = states(2)
    ens = EnsembleModel(make_mlp, sts)
    x = torch.randn(32, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    cold = ens.predict(x)
    ens.temperature = 2.5
    warm = ens.predict(x)
    want = torch.softmax(cold.probs.double().log() / 2.5, 1)
    assert_close_rel(warm.probs, want, rtol=1e-5)
    assert_close_rel(warm.entropy, entropy(want.log()), rtol=1e-5)
    assert torch.equal(warm.mutual_information, cold.mutual_information)
    assert torch.equal(warm.expected_entropy, cold.expected_entropy)
    assert torch.equal(warm.probs.argmax(1), cold.probs.argmax(1))
    assert torch.equal(warm.disagreement, cold.disagreement)
    with torch.no_grad():
        assert_close_rel(ens(x).exp(), warm.probs, rtol=1e-5)


def test_entropy_of_a_certain_prediction_is_zero():
    lp = torch.log(torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]]))
    assert entropy(lp).tolist() == pytest.approx([0.0, math.log(2)])


def test_bad_member_outputs_are_refused():
    with pytest.raises(BadOptionError, match=r"\(K, batch, classes\)"):
        predict_from_logits(torch.zeros(2, 3))


def test_lazy_ensemble_predicts_as_the_full_one(tmp_path):
    from mcensemble import load_ensemble
    sts = states(2)
    f = save_ensemble(tmp_path / "e.safetensors", sts, weights=[0.3, 0.7], calibration={"temperature": 1.7})
    full, lazy = load_ensemble(f, model=make_mlp), load_ensemble(f, model=make_mlp, lazy=True)
    assert full.temperature == lazy.temperature == 1.7
    x = torch.randn(8, 1, 4, 4)
    a, b = full.predict(x), lazy.predict(x)
    for name in Prediction._fields:
        assert_close_rel(getattr(b, name), getattr(a, name), rtol=1e-6, msg=name)
    with torch.no_grad():
        assert_close_rel(lazy(x), full(x), rtol=1e-6)
        assert_close_rel(full(x).exp(), a.probs, rtol=1e-6)
