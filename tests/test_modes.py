"""_modes: the process-wide state the library's training calls set for themselves is put back."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from mcensemble._modes import flush_denormal_on, process_state_kept
from mcensemble.snapshots import fge_train
from mcensemble.train import TrainConfig, train_model


@pytest.fixture
def flush_restored():
    before = flush_denormal_on()
    yield
    torch.set_flush_denormal(before)


def _batches():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = (x[:, 0] > 0).long()
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]


def _net():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 2))


@pytest.mark.parametrize("flush", [False, True])
def test_process_state_kept_puts_back_flush_and_the_random_stream(flush, flush_restored):
    torch.set_flush_denormal(flush)
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    with process_state_kept():
        torch.set_flush_denormal(not flush)
        torch.manual_seed(9)
        torch.rand(5)
    assert flush_denormal_on() == flush
    assert torch.equal(torch.rand(3), want)


@pytest.mark.parametrize("train", [
    lambda net: train_model(net, _batches(), config=TrainConfig(epochs=1, seed=5), progress=False),
    lambda net: fge_train(net, _batches(), cycles=1, epochs=1, lr_max=0.05, seed=5, progress=False),
], ids=["train_model", "fge_train"])
@pytest.mark.parametrize("flush", [False, True])
def test_training_calls_leave_the_process_as_they_found_it(train, flush, flush_restored):
    net = _net()
    torch.set_flush_denormal(flush)
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    train(net)
    assert flush_denormal_on() == flush            # they turn flushing on for themselves only
    assert torch.equal(torch.rand(3), want)         # and seed torch without moving the caller's stream
