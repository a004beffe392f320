"""`mcensemble._layout.fast_layout`: private work copies run channels_last only where a probe
batch shows the same logits."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from mcensemble._layout import fast_layout


class ViewNet(nn.Module):
    """Flattens a convolution's output with `.view`, which channels_last tensors refuse."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        h = self.conv(x)
        return self.fc(h.view(h.shape[0], -1))


def conv_net():
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3))


def is_channels_last(m: nn.Module) -> bool:
    w = next(p for p in m.parameters() if p.dim() == 4)
    return w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()


def test_conv_net_runs_channels_last_with_the_same_logits():
    torch.manual_seed(0)
    net = conv_net().eval()
    x = torch.randn(16, 2, 8, 8)
    want = net(x)
    work = copy.deepcopy(net)
    assert fast_layout(work, [(x, torch.zeros(16))])  # a loader: its first batch is the probe
    assert is_channels_last(work) and not is_channels_last(net)
    torch.testing.assert_close(work(x), want, rtol=1e-5, atol=1e-6)
    work.load_state_dict(net.state_dict())  # states load into the other layout unchanged
    torch.testing.assert_close(work(x), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make, x", [
    (ViewNet, torch.randn(4, 2, 8, 8)),  # raises in channels_last: left as it was
    (lambda: nn.Sequential(nn.Linear(5, 3)), torch.randn(4, 5)),  # no convolution
    (conv_net, None),  # no probe batch
])
def test_left_contiguous_where_channels_last_does_not_apply(make, x):
    work = make().eval()
    assert not fast_layout(work, x)
    assert all(p.is_contiguous() for p in work.parameters())
    if x is not None:
        work(x)  # still runs


def test_probe_runs_in_eval_mode_and_leaves_the_modes_and_statistics():
    torch.manual_seed(0)
    net = conv_net().train()
    stats = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    assert fast_layout(net, torch.randn(16, 2, 8, 8))
    assert all(m.training for m in net.modules())  # train mode back
    assert all(torch.equal(net.state_dict()[k], v) for k, v in stats.items())  # no batch statistics taken


def test_other_devices_are_left_alone():
    net = conv_net().eval()
    assert not fast_layout(net, torch.randn(4, 2, 8, 8), device="cuda")
    assert all(p.is_contiguous() for p in net.parameters())
