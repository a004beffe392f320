"""Tests for mcensemble.bn: BatchNorm re-estimation."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.optim.swa_utils import update_bn as swa_update_bn
from torch.utils.data import DataLoader, TensorDataset

from mcensemble.bn import batch_input, has_batchnorm, update_bn
from mcensemble.errors import DataSpecError


def bn_cnn(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers += [nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6, momentum=0.3), nn.ReLU(),
               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5), nn.BatchNorm1d(5)]
    return nn.Sequential(*layers)


def data(n: int = 40, batch: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 6, 6, generator=g) * 2 + 0.5
    y = torch.randint(0, 5, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def bn_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()
            if "running" in k or "num_batches" in k}


def assert_stats_close(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
        else:
            assert torch.equal(a[k], b[k]), k


def test_has_batchnorm():
    assert has_batchnorm(bn_cnn())
    assert not has_batchnorm(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))


def test_matches_swa_update_bn():
    ours, ref = bn_cnn(), bn_cnn()
    ours.eval()
    ref.eval()
    update_bn(ours, data())
    swa_update_bn(data(), ref)
    assert_stats_close(bn_stats(ours), bn_stats(ref))
    # the statistics really changed from the fresh ones
    assert not torch.allclose(bn_stats(ours)["1.running_mean"], torch.zeros(4))


def test_dropout_stays_off():
    torch.manual_seed(3)
    ours = bn_cnn(dropout=0.5)
    ref = copy.deepcopy(ours)
    ref[3] = nn.Identity()  # what eval-mode dropout computes
    ours.train()
    update_bn(ours, data())
    swa_update_bn(data(), ref)
    assert_stats_close(bn_stats(ours), bn_stats(ref))


def test_modes_and_momenta_restored():
    model = bn_cnn(dropout=0.2)
    model.train()
    model[1].eval()          # a submodule in a different mode than its parent
    model[3].eval()
    model[1].momentum = None
    before = {name: m.training for name, m in model.named_modules()}
    update_bn(model, data())
    assert {name: m.training for name, m in model.named_modules()} == before
    assert model[1].momentum is None and model[5].momentum == 0.3 and model[10].momentum == 0.1


@pytest.mark.parametrize("form", ["tensor", "tuple", "list", "dict_image", "dict_input"])
def test_batch_forms(form):
    loader = data()
    xs = [x for x, _ in loader]
    batches = {
        "tensor": xs,
        "tuple": [(x, 0) for x in xs],
        "list": [[x, 0] for x in xs],
        "dict_image": [{"image": x, "label": 0} for x in xs],
        "dict_input": [{"input": x} for x in xs],
    }[form]
    ours, ref = bn_cnn(), bn_cnn()
    update_bn(ours, batches)
    swa_update_bn(xs, ref)
    assert_stats_close(bn_stats(ours), bn_stats(ref))


def test_bad_dict_batch():
    with pytest.raises(DataSpecError, match="'pixels'.*'image'"):
        batch_input({"pixels": torch.zeros(1)})


def test_no_bn_is_noop():
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5))
    model.train()
    before = copy.deepcopy(model.state_dict())

    def never():
        raise AssertionError("loader must not be read")
        yield

    update_bn(model, never())
    assert model.training and model[1].training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_max_batches():
    ours, ref = bn_cnn(), bn_cnn()
    update_bn(ours, data(), max_batches=2)
    swa_update_bn([x for i, (x, _) in enumerate(data()) if i < 2], ref)
    assert_stats_close(bn_stats(ours), bn_stats(ref))


def test_empty_loader_keeps_stats():
    model = bn_cnn()
    update_bn(model, data())
    before = bn_stats(model)
    with pytest.raises(DataSpecError, match="no batches"):
        update_bn(model, [])
    assert_stats_close(bn_stats(model), before)
    assert model[4].momentum == 0.3


# moved from test_review_fixes.py
from helpers import bn_mlp as _net, gaussian_batches as _data  # noqa: E402
from mcensemble.bn import labelled_batch, split_batch  # noqa: E402
from mcensemble.errors import BadOptionError  # noqa: E402


def test_update_bn_modules_only_those():
    net = _net().train()
    net[1].momentum = 0.3
    before = {k: v.clone() for k, v in net[1].state_dict().items()}
    ref = _net()
    update_bn(ref, _data())  # every BN layer
    update_bn(net, _data(), modules=["4"])
    for k, v in net[1].state_dict().items():  # layer 1 kept its statistics
        assert torch.equal(v, before[k])
    assert net[1].momentum == 0.3 and all(m.training for m in net.modules())
    # layer 4's statistics are those of its inputs with layer 1 in eval mode on its own
    # (initial) statistics
    exp = _net()
    exp.eval()
    with torch.no_grad():
        h = torch.cat([exp[:4](x) for x, _ in _data()])
    assert net[4].num_batches_tracked.item() == 4
    assert torch.allclose(net[4].running_mean, h.mean(0), atol=1e-5)
    update_bn(net, _data(), modules=[net[1], net[4]])
    for k in ("running_mean", "running_var"):
        assert torch.allclose(getattr(net[1], k), getattr(ref[1], k))
        assert torch.allclose(getattr(net[4], k), getattr(ref[4], k))


def test_update_bn_modules_bad():
    net = _net()
    with pytest.raises(BadOptionError, match="no module 'nope'"):
        update_bn(net, _data(), modules=["nope"])
    with pytest.raises(BadOptionError, match="not a BatchNorm"):
        update_bn(net, _data(), modules=["0"])
    with pytest.raises(BadOptionError, match="not a submodule"):
        update_bn(net, _data(), modules=[nn.BatchNorm1d(6)])


def test_one_batch_reader():
    x, y = torch.zeros(2, 4), torch.tensor([0, 1])
    assert split_batch(x)[1] is None
    for batch in ((x, y), [x, y, "extra"], {"image": x, "label": y}, {"inputs": x, "target": y},
                  {"pixel_values": x, "labels": y}):
        xx, yy = split_batch(batch)
        assert xx is x and yy is y
    with pytest.raises(DataSpecError, match="empty tuple"):
        split_batch(())
    with pytest.raises(DataSpecError, match="training needs"):
        labelled_batch((x,), what="training")


def test_fixed_subsample_spreads_whole_batches_and_repeats():
    from torch.utils.data import DataLoader, TensorDataset
    from mcensemble.bn import FixedSubset
    from mcensemble.errors import BadOptionError, DataSpecError
    x = torch.arange(100, dtype=torch.float32).reshape(100, 1)
    ld = DataLoader(TensorDataset(x, torch.zeros(100, dtype=torch.long)), batch_size=10)
    sub = FixedSubset(ld, 30)
    firsts = [int(b[0][0, 0]) for b in sub]
    assert firsts == [0, 30, 60] and sub.n == 30 and sub.batches == len(sub) == 3 and sub.of == 10
    assert [int(b[0][0, 0]) for b in sub] == firsts  # the same batches every time
    assert sub.describe() == "30 examples in 3 batches of 10"
    assert FixedSubset(ld, 1000).n == 100  # never more than the loader holds
    assert FixedSubset(iter([(x[:4], None), (x[4:8], None)]), 5).n == 8  # no length: the first batches
    with pytest.raises(BadOptionError, match="at least 1 example"):
        FixedSubset(ld, 0)
    with pytest.raises(DataSpecError, match="no batches"):
        FixedSubset([], 10)


def test_first_input_is_the_probe_batch():
    from mcensemble.bn import first_input
    x = torch.arange(12.0).reshape(6, 2)
    assert first_input(x) is x and torch.equal(first_input(x, 2), x[:2])
    loader = [(x[:4], torch.zeros(4)), (x[4:], torch.zeros(2))]
    assert torch.equal(first_input(loader, 3), x[:3]) and torch.equal(first_input(loader), x[:4])
    assert first_input([]) is None and first_input(None) is None
