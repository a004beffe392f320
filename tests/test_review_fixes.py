"""Checks for fixes made in review: update_bn(modules=), the one batch reader."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from mcensemble.bn import labelled_batch, split_batch, update_bn
from mcensemble.errors import BadOptionError, DataSpecError
from mcensemble.members import predict_log_probs
from mcensemble.train import split_batch as train_split_batch


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 6),
                         nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Linear(6, 3))


def _data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 4, generator=g) * 3 + 1, torch.randint(0, 3, (16,), generator=g))
            for _ in range(4)]


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
    assert split_batch(x)[1] is None and train_split_batch is split_batch
    for batch in ((x, y), [x, y, "extra"], {"image": x, "label": y}, {"inputs": x, "target": y},
                  {"pixel_values": x, "labels": y}):
        xx, yy = split_batch(batch)
        assert xx is x and yy is y
    with pytest.raises(DataSpecError, match="empty tuple"):
        split_batch(())
    with pytest.raises(DataSpecError, match="training needs"):
        labelled_batch((x,), what="training")


def test_predict_log_probs_reads_dict_targets():
    net = _net().eval()
    data = [{"x": x, "target": y} for x, y in _data()]
    lp, labels = predict_log_probs(net, data)
    assert lp.shape == (64, 3) and torch.equal(labels, torch.cat([y for _, y in _data()]))
    with pytest.raises(DataSpecError, match="no labels"):
        predict_log_probs(net, [x for x, _ in _data()])


def test_scan_plane_leaves_the_model_alone():
    from mcensemble.paths import BezierPath
    from mcensemble.plane import scan_plane

    torch.manual_seed(0)
    mk = lambda: nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))  # noqa: E731
    a, b = mk().state_dict(), mk().state_dict()
    bend = {k: (0.5 * (a[k] + b[k]) + 0.3 * torch.randn_like(a[k])) if a[k].is_floating_point() else a[k]
            for k in a}
    model = mk().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = scan_plane(BezierPath(a, b, [bend]), model, _data(), bn_loader=_data(), resolution=2, path_points=3)
    assert res.bn_reestimated and model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(BadOptionError, match="path_points"):
        scan_plane(BezierPath(a, b, [bend]), model, _data(), path_points=1)


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


def test_channel_dropout_handle_leaves_no_hook_when_it_fails():
    from types import SimpleNamespace

    from mcensemble.hooks import ChannelDropoutHandle
    from mcensemble.units import UnitGraphError

    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.LayerNorm(6))

    def ref(module):
        return SimpleNamespace(axis=1, module=module, tensor=f"{module}.weight", block=1, offset=0)

    group = SimpleNamespace(name="g", size=6, refs=lambda role: [ref("2"), ref("3")])
    with pytest.raises(UnitGraphError, match="LayerNorm"):
        ChannelDropoutHandle(model, SimpleNamespace(groups=[group]), 0.5)
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_predict_log_probs_restores_each_mode_and_refuses_no_data():
    net = _net().train()
    net[5].eval()  # a submodule in another mode than its parent keeps it
    predict_log_probs(net, _data())
    assert net.training and not net[5].training and net[1].training
    with pytest.raises(DataSpecError, match="no batches"):
        predict_log_probs(net, [])


def test_checkpoint_with_non_object_header(tmp_path):
    from safetensors.torch import save_file

    from mcensemble import load_checkpoint
    from mcensemble.errors import CheckpointError

    f = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(2)}, str(f), metadata={"mcensemble": "[1, 2]"})
    with pytest.raises(CheckpointError, match="not a JSON object"):
        load_checkpoint(f)


def test_example_input_reads_dict_batches_and_refuses_empty_data():
    from torch.utils.data import DataLoader

    from mcensemble.data import example_input

    net = _net()
    x = torch.randn(5, 4)
    dl = DataLoader([{"image": r, "label": 0} for r in x], batch_size=5)
    assert torch.equal(example_input(net, data=dl), x[:2])
    with pytest.raises(DataSpecError, match="no batches"):
        example_input(net, data=DataLoader([], batch_size=2))


def test_atomic_path_gives_the_usual_file_mode(tmp_path):
    from mcensemble._io import atomic_path

    with atomic_path(tmp_path / "out.json") as tmp:
        tmp.write_text("{}")
    (tmp_path / "plain.json").write_text("{}")
    assert (tmp_path / "out.json").stat().st_mode & 0o777 == (tmp_path / "plain.json").stat().st_mode & 0o777
