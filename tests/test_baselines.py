"""baselines: the packed pair in build reports reaches residual networks through the short
path's construction, and says why when no construction applies."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

from mcensemble.baselines import packed_state

from helpers import randomize, timm_factory


def _loader(n: int = 32, size: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 1, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)),
                      batch_size=16)


def test_residual_network_gets_the_short_paths_packed_pair():
    make = timm_factory("test_resnet")
    a, b = randomize(make(), 0).state_dict(), randomize(make(), 1).state_dict()
    packed, reason = packed_state(make(), a, b, _loader(n=48), data_examples=32)
    assert reason is None and packed is not None and packed.method == "short"
    state = packed.state
    assert "32 examples in 2 batches of 3" in packed.certificate["data"]["losses"]
    assert state.keys() == a.keys() and all(state[k].shape == a[k].shape for k in a)
    assert any(not torch.equal(state[k], a[k]) for k in a if a[k].is_floating_point())


def test_layernorm_network_is_skipped_with_the_reason():
    make = timm_factory("test_convnext")
    a, b = randomize(make(), 0).state_dict(), randomize(make(), 1).state_dict()
    state, reason = packed_state(make(), a, b, _loader(size=32))
    assert state is None and "LayerNorm" in reason
