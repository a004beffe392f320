"""data.py: the built-in digits and its options, folders, module:function specs, the fit check."""
from __future__ import annotations

import importlib
import sys
import textwrap
import uuid

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from mcensemble.data import (
    DIGITS_TRAIN_SIZE, DIGITS_VAL_SIZE, check_input_fits, create_loader, digits_tensors, spec_name,
)
from mcensemble.errors import BadOptionError, DataSpecError
from mcensemble.models import ModelSpec, create_model


def tensors(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


# ---------------------------------------------------------------- digits

def test_digits_split_sizes_and_types():
    x, y = tensors(create_loader("digits"))
    assert x.shape == (DIGITS_TRAIN_SIZE, 1, 8, 8) == (1437, 1, 8, 8)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() == 1.0
    xv, yv = tensors(create_loader("digits", split="val", batch_size=1000))
    assert xv.shape == (DIGITS_VAL_SIZE, 1, 8, 8) == (360, 1, 8, 8)
    assert set(y.tolist()) == set(yv.tolist()) == set(range(10))


def test_digits_split_is_a_fixed_partition():
    from sklearn.datasets import load_digits

    d = load_digits()
    full = torch.cat([torch.tensor(d.images, dtype=torch.float32).reshape(-1, 64) / 16,
                      torch.tensor(d.target, dtype=torch.float32)[:, None]], 1)
    xt, yt = digits_tensors("train")
    xv, yv = digits_tensors("val")
    both = torch.cat([torch.cat([xt.reshape(-1, 64), yt[:, None].float()], 1),
                      torch.cat([xv.reshape(-1, 64), yv[:, None].float()], 1)])

    def rows(t):
        return sorted(map(tuple, t.tolist()))

    assert rows(both) == rows(full)  # train + val is exactly the data set, nothing shared or lost
    # the documented split: randperm(1797) from a generator seeded 0
    perm = torch.randperm(1797, generator=torch.Generator().manual_seed(0))
    assert torch.equal(xt.reshape(-1, 64), full[perm[:1437], :64])
    assert torch.equal(yv, torch.tensor(d.target)[perm[1437:]])


def test_digits_deterministic_and_not_aliased():
    a = tensors(create_loader("digits,noise=0.3"))
    b = tensors(create_loader("digits,noise=0.3"))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    x, _ = digits_tensors("train")
    x.zero_()  # mutating a returned tensor does not touch the cache
    assert digits_tensors("train")[0].max() == 1.0


def test_shuffle_is_seeded():
    y0 = tensors(create_loader("digits", shuffle=True, seed=0, batch_size=100))[1]
    y0b = tensors(create_loader("digits", shuffle=True, seed=0, batch_size=100))[1]
    y1 = tensors(create_loader("digits", shuffle=True, seed=1, batch_size=100))[1]
    plain = tensors(create_loader("digits"))[1]
    assert torch.equal(y0, y0b) and not torch.equal(y0, y1) and not torch.equal(y0, plain)
    assert sorted(y0.tolist()) == sorted(plain.tolist())


def test_digits_size_chans_train():
    x, y = tensors(create_loader("digits,size=16,chans=3,train=100", batch_size=64, drop_last=True))
    assert x.shape == (64, 3, 16, 16)  # 100 examples, one full batch of 64 with drop_last
    assert torch.equal(x[:, 0], x[:, 2])
    x, y = tensors(create_loader("digits, size=16 ,train=100"))
    assert x.shape == (100, 1, 16, 16) and torch.equal(y, digits_tensors("train")[1][:100])
    xv, _ = tensors(create_loader("digits,size=12,train=100", split="val"))
    assert xv.shape == (360, 1, 12, 12)  # train= only limits the training split


def test_digits_noise():
    clean = digits_tensors("train")[1]
    y = tensors(create_loader("digits,noise=0.25"))[1]
    changed = (y != clean)
    assert changed.sum() == round(0.25 * 1437)  # every replaced label is a different class
    assert y.min() >= 0 and y.max() <= 9
    assert torch.equal(tensors(create_loader("digits,noise=0.25,seed=0"))[1], y)
    other = tensors(create_loader("digits,noise=0.25,seed=1"))[1]
    assert not torch.equal(other, y) and (other != clean).sum() == changed.sum()
    assert torch.equal(tensors(create_loader("digits,noise=0"))[1], clean)
    assert (tensors(create_loader("digits,noise=1"))[1] != clean).all()
    sub = tensors(create_loader("digits,noise=0.5,train=200"))[1]
    assert (sub != clean[:200]).sum() == 100
    val = tensors(create_loader("digits,noise=0.5", split="val"))[1]
    assert torch.equal(val, digits_tensors("val")[1])  # only training labels are noised


@pytest.mark.parametrize("spec, expect", [
    ("digits,sise=16", r"unknown key 'sise'\. Valid keys for digits: size, chans, train, noise, seed"),
    ("digits,size", r"'size' is not key=value"),
    ("digits,size=0", r"size='0' must be an integer >= 1"),
    ("digits,size=abc", r"size='abc' must be an integer"),
    ("digits,train=2000", r"train='2000' must be an integer from 1 to 1437"),
    ("digits,noise=1.5", r"noise='1.5' must be a fraction between 0 and 1"),
    ("digits,size=8,size=9", r"given twice"),
])
def test_digits_bad_options(spec, expect):
    with pytest.raises(DataSpecError, match=expect) as ei:
        create_loader(spec)
    assert ei.value.option == "data"


@pytest.mark.parametrize("kw, expect", [
    ({"split": "test"}, r"split must be one of train, val"),
    ({"batch_size": 0}, r"`batch_size` must be a positive integer"),
])
def test_bad_loader_options(kw, expect):
    with pytest.raises(BadOptionError, match=expect):
        create_loader("digits", **kw)


@pytest.mark.parametrize("spec, expect", [
    ("no/such/folder", r"data 'no/such/folder': no such folder.*Accepted forms: 'digits'.*module:function"),
    ("digit", r"no such folder"),
    ("", r"non-empty string"),
])
def test_bad_specs(spec, expect):
    with pytest.raises(DataSpecError, match=expect):
        create_loader(spec)


# ---------------------------------------------------------------- folders

@pytest.fixture
def image_folder(tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    g = torch.Generator().manual_seed(0)
    for ci, cls in enumerate(["cat", "dog"]):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            arr = (torch.rand(20 + 4 * i, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / cls / f"{i}.png")
    return root


def test_folder_with_timm_transforms(image_folder):
    model = create_model(ModelSpec(arch="test_resnet", kwargs={"num_classes": 2}))
    loader = create_loader(str(image_folder), model=model, batch_size=4)
    x, y = tensors(loader)
    assert x.shape == (6, 3, 160, 160)  # test_resnet's eval input size
    assert y.tolist() == [0, 0, 0, 1, 1, 1]
    assert x.min() < 0  # normalised with the model's mean / std
    check_input_fits(model, loader, spec=str(image_folder))
    assert spec_name(image_folder) == f"folder {image_folder}"


def test_folder_for_a_one_channel_model(image_folder):
    model = create_model(ModelSpec(arch="test_resnet", kwargs={"num_classes": 2, "in_chans": 1}))
    loader = create_loader(image_folder, model=model, batch_size=6)  # a Path works too
    assert next(iter(loader))[0].shape == (6, 1, 160, 160)
    check_input_fits(model, loader, spec=str(image_folder))


def test_folder_without_model_is_plain_tensors(image_folder):
    ds = create_loader(str(image_folder)).dataset
    x, y = ds[0]
    assert x.shape == (3, 20, 24) and 0 <= x.min() and x.max() <= 1 and y == 0


def test_folder_errors(image_folder, tmp_path):
    (tmp_path / "split" / "train" / "a").mkdir(parents=True)
    (tmp_path / "split" / "val" / "a").mkdir(parents=True)
    with pytest.raises(DataSpecError, match=r"holds split folders \(train, val\).*pass one of them"):
        create_loader(str(tmp_path / "split"))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataSpecError, match=r"'.*empty'.*has no images: its class folders \(a\) hold no"):
        create_loader(str(tmp_path / "empty"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataSpecError, match=r"is a file, not a folder"):
        create_loader(str(tmp_path / "file.txt"))


# ---------------------------------------------------------------- module:function

DATA_PY = """
import torch
from torch.utils.data import DataLoader, TensorDataset
LOADER = DataLoader(TensorDataset(torch.zeros(6, 1, 8, 8), torch.arange(6)), batch_size=4)
def dataset():
    return TensorDataset(torch.rand(10, 1, 8, 8), torch.arange(10) % 3)
def loader():
    return LOADER
def wrong():
    return [1, 2, 3]
def raises():
    raise OSError("cannot open shard")
"""


@pytest.fixture
def data_module(tmp_path, monkeypatch):
    name = f"mce_data_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(DATA_PY))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield name
    sys.modules.pop(name, None)


def test_module_function_dataset_and_loader(data_module):
    loader = create_loader(f"{data_module}:dataset", batch_size=4, shuffle=True, seed=3)
    x, y = tensors(loader)
    assert x.shape == (10, 1, 8, 8) and sorted(y.tolist()) == sorted((torch.arange(10) % 3).tolist())
    given = create_loader(f"{data_module}:loader", batch_size=100)
    assert given is sys.modules[data_module].LOADER  # a DataLoader is used as is


@pytest.mark.parametrize("fn, expect", [
    ("wrong", r"returned list; it must return a torch Dataset or DataLoader"),
    ("raises", r"the function raised OSError: cannot open shard"),
    ("nothere", r"has no attribute 'nothere'"),
])
def test_module_function_errors(data_module, fn, expect):
    with pytest.raises(DataSpecError, match=expect):
        create_loader(f"{data_module}:{fn}")


def test_module_function_missing_module():
    with pytest.raises(DataSpecError, match=r"cannot find module 'mce_no_such_data'.*PYTHONPATH") as ei:
        create_loader("mce_no_such_data:train")
    assert ei.value.option == "data"


# ---------------------------------------------------------------- check_input_fits

def mlp(classes=10):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Dropout(0.2), nn.Linear(16, classes))


def test_check_input_fits_ok_and_restores_modes():
    model = mlp()
    model.train()
    model[3].eval()  # a mixed state must come back exactly
    bn_mean = model[2].running_mean.clone()
    check_input_fits(model, create_loader("digits"), spec="digits")
    assert [m.training for m in model.modules()] == [True, True, True, True, False, True]
    assert torch.equal(model[2].running_mean, bn_mean)  # ran in eval mode


@pytest.mark.parametrize("model, spec, expect", [
    (mlp, "digits,size=16",
     r"data 'digits,size=16' gives inputs of shape \(128, 1, 16, 16\) that the model \(Sequential\) cannot take: "
     r"RuntimeError: .*Pass `in_chans` / `num_classes` or a data spec with size=/chans="),
    (lambda: create_model(ModelSpec(arch="test_resnet", kwargs={"in_chans": 1, "num_classes": 10})),
     "digits,size=16,chans=3", r"shape \(128, 3, 16, 16\) that the model \(timm:test_resnet\) cannot take"),
    (lambda: mlp(classes=5), "digits",
     r"labels from 0 to 9 .* model \(Sequential\) has 5 outputs: pass `num_classes` 10"),
])
def test_check_input_fits_errors(model, spec, expect):
    m = model()
    modes = [mod.training for mod in m.modules()]
    with pytest.raises(DataSpecError, match=expect) as ei:
        check_input_fits(m, create_loader(spec), spec=spec)
    assert ei.value.option == "data"
    assert [mod.training for mod in m.modules()] == modes  # restored after a failure too


def test_check_input_fits_empty_and_bad_batches():
    with pytest.raises(DataSpecError, match=r"gives no batches"):
        check_input_fits(mlp(), create_loader("digits,train=10", batch_size=64, drop_last=True), spec="digits,train=10")
    bad = DataLoader(torch.zeros(4, 1, 8, 8), batch_size=2)
    with pytest.raises(DataSpecError, match=r"must give \(inputs, labels\) batches"):
        check_input_fits(mlp(), bad, spec="x:y")


def test_folder_for_a_builtin_digits_model(image_folder):
    model = create_model(ModelSpec(arch="mce_digits_cnn", kwargs={"num_classes": 2, "in_chans": 1}))
    loader = create_loader(str(image_folder), model=model, batch_size=6)
    assert next(iter(loader))[0].shape == (6, 1, 8, 8)
    check_input_fits(model, loader, spec=str(image_folder))


# ---------------------------------------------------------------- example_input

@pytest.mark.parametrize("make, shape", [
    (lambda: create_model(ModelSpec(arch="mce_digits_cnn", kwargs={"in_chans": 1})), (2, 1, 8, 8)),
    (lambda: create_model(ModelSpec(arch="mce_digits_mlp")), (2, 1, 8, 8)),
    (lambda: mlp(), (2, 64)),
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 14 * 14, 2)), (2, 3, 16, 16)),
])
def test_example_input(make, shape):
    from mcensemble.data import example_input

    model = make()
    model.train()
    x = example_input(model)
    assert x.shape == shape and model.training
    assert example_input(model, data="digits").shape == (2, 1, 8, 8)  # from the data when given


def test_example_input_unknown_shape():
    from mcensemble.data import example_input

    with pytest.raises(DataSpecError, match="cannot guess an input shape"):
        example_input(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(7, 2)))


# moved from test_review_fixes.py
from helpers import bn_mlp as _net  # noqa: E402


def test_example_input_reads_dict_batches_and_refuses_empty_data():
    from torch.utils.data import DataLoader

    from mcensemble.data import example_input

    net = _net()
    x = torch.randn(5, 4)
    dl = DataLoader([{"image": r, "label": 0} for r in x], batch_size=5)
    assert torch.equal(example_input(net, data=dl), x[:2])
    with pytest.raises(DataSpecError, match="no batches"):
        example_input(net, data=DataLoader([], batch_size=2))
