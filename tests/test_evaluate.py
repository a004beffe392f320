"""Tests for mcensemble.evaluate: metrics, ECE, evaluate_state and scan."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from mcensemble.bn import update_bn
from mcensemble.errors import ArchitectureMismatchError, BadOptionError, DataSpecError
from mcensemble.evaluate import (Metrics, ScanResult, evaluate, evaluate_state,
                                 expected_calibration_error, scan)
from mcensemble.paths import LinearPath
from mcensemble.paths.linear import interpolate


class TableModel(nn.Module):
    """Returns fixed logits: row `int(x[i, 0])` of a table."""

    def __init__(self, table: torch.Tensor, log_probs: bool = False):
        super().__init__()
        self.register_buffer("table", table)
        self.log_probs = log_probs

    def forward(self, x):
        out = self.table[x[:, 0].long()]
        return F.log_softmax(out, dim=1) if self.log_probs else out


TABLE = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0], [-2.0, 4.0, 0.0]])
LABELS = torch.tensor([0, 0, 2, 1, 1])


def table_loader(batch_size=2):
    x = torch.arange(5, dtype=torch.float32)[:, None]
    return DataLoader(TensorDataset(x, LABELS), batch_size=batch_size)


def mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def bn_net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 10))


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images[:240], dtype=torch.float32)[:, None] / 16
    y = torch.tensor(d.target[:240], dtype=torch.int64)
    train = DataLoader(TensorDataset(x[:160], y[:160]), batch_size=64)
    val = DataLoader(TensorDataset(x[160:], y[160:]), batch_size=64)
    return train, val


# -- ECE ------------------------------------------------------------------------------
def test_ece_hand_example():
    # confidences 0.95, 0.75, 0.62, 0.71 fall in four different bins of width 1/15
    probs = torch.tensor([[0.95, 0.05], [0.25, 0.75], [0.62, 0.38], [0.29, 0.71]])
    labels = torch.tensor([0, 0, 0, 1])  # correct, wrong, correct, correct
    expected = (0.05 + 0.75 + 0.38 + 0.29) / 4
    assert expected_calibration_error(probs, labels) == pytest.approx(expected, abs=1e-6)


def test_ece_shared_bin_and_one_bin():
    probs = torch.tensor([[0.61, 0.39], [0.62, 0.38], [0.1, 0.9]])
    labels = torch.tensor([0, 1, 1])
    # bin (0.6, 0.667]: acc 0.5, conf 0.615; bin (0.867, 0.933]: acc 1, conf 0.9
    expected = 2 / 3 * abs(0.5 - 0.615) + 1 / 3 * abs(1 - 0.9)
    assert expected_calibration_error(probs, labels) == pytest.approx(expected, abs=1e-6)
    # one bin: |accuracy - mean confidence|
    assert expected_calibration_error(probs, labels, n_bins=1) == pytest.approx(abs(2 / 3 - (0.61 + 0.62 + 0.9) / 3))


def test_ece_perfectly_calibrated_is_zero():
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(probs, torch.tensor([0, 1])) == 0.0


# -- evaluate --------------------------------------------------------------------------
def expected_metrics():
    logp = F.log_softmax(TABLE.double(), dim=1)
    nll = -logp[torch.arange(5), LABELS].mean().item()
    acc = (TABLE.argmax(1) == LABELS).double().mean().item()
    probs = logp.exp()
    return nll, acc, expected_calibration_error(probs, LABELS)


@pytest.mark.parametrize("batch_size", [1, 2, 5])
@pytest.mark.parametrize("log_probs", [False, True])
def test_evaluate_known_outputs(batch_size, log_probs):
    nll, acc, ece = expected_metrics()
    m = evaluate(TableModel(TABLE, log_probs=log_probs), table_loader(batch_size))
    assert isinstance(m, Metrics)
    assert m.n == 5
    assert m.loss == pytest.approx(nll, rel=1e-6) and m.nll == m.loss
    assert m.acc == pytest.approx(acc) == 3 / 5  # rows 0, 2, 4 right; row 3 is a tie -> class 0
    assert m.ece == pytest.approx(ece, abs=1e-6)
    assert set(m.to_dict()) == {"loss", "acc", "nll", "ece", "n"}


def test_evaluate_restores_mode_and_runs_in_eval():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Dropout(0.9))
    model.train()
    x = torch.randn(20, 1, 8, 8)
    loader = DataLoader(TensorDataset(x, torch.randint(0, 10, (20,))), batch_size=7)
    a, b = evaluate(model, loader), evaluate(model, loader)
    assert a == b  # dropout was off
    assert model.training and model[2].training


def test_evaluate_dict_batches():
    nll, _, _ = expected_metrics()
    batches = [{"image": x, "label": y} for x, y in table_loader(2)]
    assert evaluate(TableModel(TABLE), batches).loss == pytest.approx(nll, rel=1e-6)


def test_evaluate_label_out_of_range():
    x = torch.arange(5, dtype=torch.float32)[:, None]
    loader = DataLoader(TensorDataset(x, torch.tensor([0, 1, 2, 3, 7])), batch_size=5)
    with pytest.raises(DataSpecError, match=r"\[0, 7\].*3 classes"):
        evaluate(TableModel(TABLE), loader)


def test_evaluate_empty_loader():
    with pytest.raises(DataSpecError, match="no examples"):
        evaluate(TableModel(TABLE), [])


# -- evaluate_state ----------------------------------------------------------------------
def test_evaluate_state_loads_and_reestimates_bn(digits):
    train, val = digits
    model = bn_net(0)
    state = bn_net(1).state_dict()
    m = evaluate_state(model, state, val, bn_loader=train)
    ref = bn_net(1)
    update_bn(ref, train)
    assert m == evaluate(ref, val)
    torch.testing.assert_close(model[1].running_mean, ref[1].running_mean)
    # without a bn_loader the state's own statistics are used
    m2 = evaluate_state(model, state, val)
    assert m2 == evaluate(bn_net(1), val)


def test_evaluate_state_mismatch(digits):
    state = mlp(0).state_dict()
    state["3.weight"] = torch.zeros(5, 16)
    with pytest.raises(ArchitectureMismatchError, match=r"'3.weight'.*the model has shape \(10, 16\).*the state has shape \(5, 16\)"):
        evaluate_state(mlp(1), state, digits[1])
    state = mlp(0).state_dict()
    del state["1.bias"]
    with pytest.raises(ArchitectureMismatchError, match="missing.*1.bias"):
        evaluate_state(mlp(1), state, digits[1])


# -- scan --------------------------------------------------------------------------------
def test_scan_keys_and_barrier(digits):
    train, val = digits
    a, b = mlp(0).state_dict(), mlp(1).state_dict()
    path = LinearPath(a, b)
    caller = mlp(5)
    before = copy.deepcopy(caller.state_dict())
    res = scan(path, caller, train, points=5, val_loader=val)
    d = res.to_dict()
    json.dumps(d)
    assert {"points", "endpoints", "barrier", "bn_reestimated", "val_barrier"} <= set(d)
    assert [p["t"] for p in d["points"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    for p in d["points"]:
        assert {"t", "loss", "acc", "nll", "ece", "val_loss", "val_acc", "val_nll", "val_ece"} <= set(p)
    assert d["bn_reestimated"] is False
    # the caller's model is untouched
    for k, v in caller.state_dict().items():
        assert torch.equal(v, before[k])

    # hand computation
    net = mlp(9)
    losses, val_losses = [], []
    for t in [0.0, 0.25, 0.5, 0.75, 1.0]:
        net.load_state_dict(interpolate(a, b, t))
        losses.append(evaluate(net, train).loss)
        val_losses.append(evaluate(net, val).loss)
    assert [p["loss"] for p in d["points"]] == pytest.approx(losses, rel=1e-6)
    barrier = max(l - ((1 - t) * losses[0] + t * losses[-1]) for t, l in zip([0, .25, .5, .75, 1], losses))
    val_barrier = max(l - ((1 - t) * val_losses[0] + t * val_losses[-1])
                      for t, l in zip([0, .25, .5, .75, 1], val_losses))
    assert d["barrier"] == pytest.approx(barrier, rel=1e-6, abs=1e-9)
    assert d["val_barrier"] == pytest.approx(val_barrier, rel=1e-6, abs=1e-9)
    assert d["barrier"] >= 0
    assert d["endpoints"]["A"] == d["points"][0] and d["endpoints"]["B"] == d["points"][-1]
    ma = mlp(0)
    assert d["endpoints"]["A"]["loss"] == pytest.approx(evaluate(ma, train).loss, rel=1e-6)
    assert ScanResult.from_dict(json.loads(json.dumps(d))).to_dict() == d


def test_scan_bn_reestimated_at_every_point(digits):
    train, val = digits
    a, b = bn_net(0).state_dict(), bn_net(1).state_dict()
    res = scan(LinearPath(a, b), lambda: bn_net(7), val, points=3, bn_loader=train)
    assert res.bn_reestimated is True and res.has_batchnorm
    ref = bn_net(0)
    update_bn(ref, train)  # endpoints are re-estimated too
    assert res.endpoints["A"]["loss"] == pytest.approx(evaluate(ref, val).loss, rel=1e-6)
    assert "val_barrier" not in res.to_dict()
    res2 = scan(LinearPath(a, b), bn_net(3), val, points=2)
    assert res2.bn_reestimated is False and res2.has_batchnorm
    assert res2.endpoints["A"]["loss"] == pytest.approx(evaluate(bn_net(0), val).loss, rel=1e-6)


@pytest.mark.parametrize("points", [1, 0, -3, 2.5, True])
def test_scan_bad_points(points, digits):
    path = LinearPath(mlp(0).state_dict(), mlp(1).state_dict())
    with pytest.raises(BadOptionError, match="points must be an integer >= 2") as e:
        scan(path, mlp(0), digits[1], points=points)
    assert e.value.option == "points"
