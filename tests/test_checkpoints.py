"""mcensemble.checkpoints: every format written by its own writer, safety, errors, saving."""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import pickle
import random
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from mcensemble.checkpoints import (check_finite, check_same_architecture,
                                    load_checkpoint, save_checkpoint)
from mcensemble.errors import (ArchitectureMismatchError, CheckpointError, NonFiniteError,
                               UnsafeCheckpointError)
from mcensemble.models import ModelSpec

import helpers
from helpers import RunsShell

timm = pytest.importorskip("timm")


# ----------------------------------------------------------------------------- helpers
def tiny_timm(seed: int = 0, num_classes: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=num_classes, in_chans=1).eval()


def mlp(seed: int = 0, out: int = 3) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, out)).eval()


def assert_same_tensors(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)  # safetensors does not keep key order
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k


def clone_state(m: nn.Module) -> OrderedDict:
    """A detached copy of `m`'s state dict, of the type state_dict() returns."""
    return OrderedDict(helpers.clone_state(m))


def file_hashes(root: Path) -> dict[str, str]:
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def assert_json(meta: dict) -> None:
    json.dumps(meta, allow_nan=False)


# ----------------------------------------------------------------------------- timm train
@pytest.fixture(scope="module")
def timm_run(tmp_path_factory):
    """A timm output folder written by CheckpointSaver with a ModelEmaV3 (EMA != raw)."""
    from timm.utils import CheckpointSaver, ModelEmaV3
    out = tmp_path_factory.mktemp("timm_out")
    model = tiny_timm(0)
    ema = ModelEmaV3(model)
    with torch.no_grad():  # make raw weights differ from the EMA copy
        for p in model.parameters():
            p.add_(0.01)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    args = argparse.Namespace(model="test_resnet", num_classes=10, in_chans=1, gp=None,
                              model_kwargs={}, input_size=None)
    saver = CheckpointSaver(model, opt, args=args, model_ema=ema, checkpoint_dir=str(out))
    saver.save_checkpoint(0, metric=0.25)
    return out, clone_state(model), clone_state(ema.module)


def test_timm_train_prefers_ema_and_builds_without_flags(timm_run, caplog):
    out, raw, ema = timm_run
    before = file_hashes(out)
    with caplog.at_level(logging.INFO, logger="mcensemble.checkpoints"):
        ck = load_checkpoint(out)
    assert "EMA" in caplog.text
    assert_same_tensors(ck.state_dict, ema)
    md = ck.metadata
    assert md["format"] == "timm-train" and md["weights"] == "ema"
    assert md["source"].endswith("model_best.pth.tar") and len(md["sha256"]) == 64
    assert (md["arch"], md["num_classes"], md["in_chans"], md["epoch"], md["metric"]) == \
        ("test_resnet", 10, 1, 0, 0.25)
    assert_json(md)
    net = ck.build_model()
    assert not net.training
    assert_same_tensors(net.state_dict(), ema)
    assert net(torch.zeros(2, 1, 16, 16)).shape == (2, 10)
    assert ck.model_spec == ModelSpec(arch="test_resnet", kwargs={"num_classes": 10, "in_chans": 1})
    assert file_hashes(out) == before


def test_timm_train_raw_weights_and_ema_switch(timm_run, caplog):
    out, raw, ema = timm_run
    with caplog.at_level(logging.INFO, logger="mcensemble.checkpoints"):
        ck = load_checkpoint(out / "last.pth.tar", ema=False)
    assert "raw" in caplog.text
    assert ck.metadata["weights"] == "raw"
    assert_same_tensors(ck.state_dict, raw)
    assert_same_tensors(ck.build_model().state_dict(), raw)
    assert load_checkpoint(out / "checkpoint-0.pth.tar", ema=True).metadata["weights"] == "ema"


def test_timm_train_without_ema(tmp_path):
    from timm.utils import CheckpointSaver
    model = tiny_timm(1)
    args = argparse.Namespace(model="test_resnet", num_classes=None, in_chans=None)
    saver = CheckpointSaver(model, torch.optim.SGD(model.parameters(), lr=0.1), args=args,
                            checkpoint_dir=str(tmp_path))
    saver.save_checkpoint(3)  # no metric: no model_best, folder falls back to last.pth.tar
    ck = load_checkpoint(tmp_path)
    assert ck.metadata["weights"] == "raw" and "last.pth.tar" in ck.metadata["picked"]
    # num_classes / in_chans not in args: read off the classifier / stem shapes
    assert (ck.metadata["num_classes"], ck.metadata["in_chans"]) == (10, 1)
    assert_same_tensors(ck.build_model().state_dict(), clone_state(model))
    with pytest.raises(CheckpointError, match="EMA weights were asked for"):
        load_checkpoint(tmp_path, ema=True)


# ----------------------------------------------------------------------------- timm hub
@pytest.mark.parametrize("safe", [True, False])
def test_timm_hub_folder(tmp_path, safe):
    from timm.models import save_for_hf
    model = tiny_timm(2)
    save_for_hf(model, str(tmp_path / "hub"), safe_serialization=safe)
    before = file_hashes(tmp_path / "hub")
    ck = load_checkpoint(tmp_path / "hub")
    assert ck.metadata["format"] == "timm-hub"
    assert ck.metadata["weights_format"] == ("safetensors" if safe else "torch")
    assert (ck.metadata["arch"], ck.metadata["num_classes"], ck.metadata["in_chans"]) == \
        ("test_resnet", 10, 1)
    assert_json(ck.metadata)
    assert_same_tensors(ck.state_dict, clone_state(model))
    assert_same_tensors(ck.build_model().state_dict(), clone_state(model))
    assert file_hashes(tmp_path / "hub") == before


# ----------------------------------------------------------------------------- safetensors / torch
def _write_safetensors_plain(sd, f):
    save_file(dict(sd), str(f))


def _write_safetensors_meta(sd, f):
    save_file(dict(sd), str(f), metadata={"format": "pt", "note": "hello"})


def _write_torch_plain(sd, f):
    torch.save(sd, f)


def _write_torch_ddp(sd, f):
    torch.save(OrderedDict(("module." + k, v) for k, v in sd.items()), f)


def _write_torch_compiled(sd, f):
    torch.save(OrderedDict(("_orig_mod." + k, v) for k, v in sd.items()), f)


def _write_torch_compiled_ddp(sd, f):
    torch.save(OrderedDict(("_orig_mod.module." + k, v) for k, v in sd.items()), f)


def _write_torch_wrapped(sd, f):
    torch.save({"model_state_dict": sd, "epoch": 7, "optimizer": {"lr": 0.1}}, f)


def _write_lightning(sd, f):
    # what pytorch_lightning's Trainer.save_checkpoint writes (LightningModule with `self.model`)
    torch.save({"epoch": 4, "global_step": 120, "pytorch-lightning_version": "2.4.0",
                "state_dict": OrderedDict(("model." + k, v) for k, v in sd.items()),
                "loops": {}, "callbacks": {}, "optimizer_states": [], "lr_schedulers": [],
                "hyper_parameters": {"lr": 0.01}}, f)


def _write_swa(sd, f):
    m = mlp(0)
    m.load_state_dict(sd)
    avg = torch.optim.swa_utils.AveragedModel(m)
    avg.update_parameters(m)
    torch.save(avg.state_dict(), f)


WRITERS = {
    "safetensors": ("safetensors", _write_safetensors_plain),
    "safetensors-meta": ("safetensors", _write_safetensors_meta),
    "torch": ("torch", _write_torch_plain),
    "ddp": ("torch", _write_torch_ddp),
    "compiled": ("torch", _write_torch_compiled),
    "compiled-ddp": ("torch", _write_torch_compiled_ddp),
    "wrapped": ("torch", _write_torch_wrapped),
    "lightning": ("lightning", _write_lightning),
    "swa": ("swa", _write_swa),
}


@pytest.mark.parametrize("name", list(WRITERS))
def test_round_trip_exact_tensors(tmp_path, name):
    fmt, write = WRITERS[name]
    model = mlp(3)
    with torch.no_grad():
        model[1].running_mean.uniform_()  # buffers travel too
    sd = clone_state(model)
    f = tmp_path / "ck.bin"  # content decides, not the name
    write(model.state_dict(), f)
    before = file_hashes(f)
    ck = load_checkpoint(f)
    assert ck.metadata["format"] == fmt
    assert_same_tensors(ck.state_dict, sd)
    assert_json(ck.metadata)
    assert ck.metadata["sha256"] == before[str(f)] and ck.metadata["source"] == str(f)
    net = load_checkpoint(f, model=lambda: mlp(9)).build_model()
    assert_same_tensors(net.state_dict(), sd)
    assert file_hashes(f) == before
    if name == "lightning":
        assert (ck.metadata["epoch"], ck.metadata["global_step"],
                ck.metadata["pytorch-lightning_version"]) == (4, 120, "2.4.0")
    if name == "swa":
        assert ck.metadata["n_averaged"] == 1
    if name == "safetensors-meta":
        assert ck.metadata["header"]["note"] == "hello"


@pytest.mark.parametrize("kind", ["module", "factory", "spec"])
def test_model_argument_forms(tmp_path, kind):
    model = tiny_timm(4)
    f = tmp_path / "sd.pt"
    torch.save(model.state_dict(), f)
    given = {"module": tiny_timm(5), "factory": lambda: tiny_timm(6),
             "spec": ModelSpec(arch="test_resnet", kwargs={"num_classes": 10, "in_chans": 1})}[kind]
    ck = load_checkpoint(f, model=given)
    net = ck.build_model()
    assert not net.training
    assert_same_tensors(net.state_dict(), clone_state(model))
    if kind == "module":
        assert not torch.equal(given.fc.weight, model.fc.weight)  # the given module is untouched


def test_no_arch_anywhere_says_what_to_pass(tmp_path):
    f = tmp_path / "sd.pt"
    torch.save(mlp().state_dict(), f)
    ck = load_checkpoint(f)
    assert ck.metadata["arch"] is None and ck.model_spec is None
    with pytest.raises(CheckpointError, match=r"`arch` NAME.*`model` module:function"):
        ck.build_model()


def test_lightning_prefix_put_back_when_model_wants_it(tmp_path):
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = mlp(0)
    sd = clone_state(Holder())
    f = tmp_path / "x.ckpt"
    torch.save({"state_dict": sd, "global_step": 1, "epoch": 0}, f)
    ck = load_checkpoint(f, model=Holder)
    assert "0.weight" in ck.state_dict
    assert_same_tensors(ck.build_model().state_dict(), sd)


def test_save_checkpoint_round_trip_with_metadata(timm_run, tmp_path):
    out, raw, ema = timm_run
    ck = load_checkpoint(out)
    dest = tmp_path / "sub" / "w.safetensors"
    assert save_checkpoint(ck.state_dict, dest, metadata=ck.metadata) == dest
    back = load_checkpoint(dest)
    assert back.metadata["format"] == "safetensors" and back.metadata["weights"] == "ema"
    assert back.metadata["origin"]["format"] == "timm-train"
    assert back.metadata["origin"]["sha256"] == ck.metadata["sha256"]
    assert (back.metadata["arch"], back.metadata["epoch"]) == ("test_resnet", 0)
    assert_same_tensors(back.state_dict, ema)
    assert_same_tensors(back.build_model().state_dict(), ema)  # no flags needed
    load_checkpoint(dest, ema=True)  # it says the weights are EMA ones


def test_save_checkpoint_shared_and_strided_tensors(tmp_path):
    w = torch.randn(4, 6)
    sd = {"a": w, "tied": w, "t": w.t(), "row": w[1], "n": torch.tensor(3)}
    save_checkpoint(sd, tmp_path / "s.safetensors")
    back = load_checkpoint(tmp_path / "s.safetensors").state_dict
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    import safetensors.torch as st

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(st, "save_file", broken)
    dest = tmp_path / "w.safetensors"
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"a": torch.ones(2)}, dest)
    assert list(tmp_path.iterdir()) == []
    dest.write_bytes(b"old")
    with pytest.raises(OSError):
        save_checkpoint({"a": torch.ones(2)}, dest)
    assert dest.read_bytes() == b"old" and list(tmp_path.iterdir()) == [dest]


def test_saving_does_not_touch_input_tensors(tmp_path):
    sd = clone_state(mlp(1))
    copy = {k: v.clone() for k, v in sd.items()}
    save_checkpoint(sd, tmp_path / "a.safetensors", metadata={"note": "x"})
    assert_same_tensors(sd, copy)


# ----------------------------------------------------------------------------- safety
def _make_marker(path):
    Path(path).write_text("code ran")


class _TouchesFile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_make_marker, (str(self.marker),))


@pytest.mark.parametrize("how", ["torch-system", "pickle-system", "pickle4-touch", "torch-touch"])
def test_malicious_pickle_is_refused_without_running(tmp_path, how):
    marker = tmp_path / "PWNED"
    f = tmp_path / "evil.pth"
    payload = RunsShell(marker) if how.endswith("system") else _TouchesFile(marker)
    if how.startswith("torch"):
        torch.save({"weight": torch.zeros(2), "x": payload}, f)
    else:
        f.write_bytes(pickle.dumps(payload, protocol=4 if "4" in how else 2))
    before = file_hashes(f)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint(f)
    msg = str(info.value)
    expected = ("system",) if how.endswith("system") else ("_make_marker",)
    assert all(e in msg for e in expected), msg
    assert "nothing in it was executed" in msg and "state dict" in msg and str(f) in msg
    assert isinstance(info.value.__cause__, Exception)
    assert not marker.exists()
    assert file_hashes(f) == before


def test_whole_module_pickle_is_refused(tmp_path):
    f = tmp_path / "model.pt"
    torch.save(mlp(), f)
    with pytest.raises(UnsafeCheckpointError, match=r"torch\.nn\.modules"):
        load_checkpoint(f)


# ----------------------------------------------------------------------------- bad files
def _truncated_zip(f):
    torch.save(mlp().state_dict(), f)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _truncated_safetensors(f):
    save_file(dict(mlp().state_dict()), str(f))
    f.write_bytes(f.read_bytes()[:-40])


def _truncated_safetensors_header(f):
    save_file(dict(mlp().state_dict()), str(f))
    f.write_bytes(f.read_bytes()[:60])


BAD_FILES = {
    "truncated-zip": (_truncated_zip, "truncated or corrupt"),
    "truncated-safetensors": (_truncated_safetensors, "truncated"),
    "truncated-safetensors-header": (_truncated_safetensors_header, "truncated"),
    "random-bytes": (lambda f: f.write_bytes(random.Random(0).randbytes(4096)), "not a checkpoint"),
    "random-pickle-magic": (lambda f: f.write_bytes(b"\x80\x02" + bytes(range(256)) * 4),
                            "not a torch checkpoint"),
    "text": (lambda f: f.write_text("epoch,loss\n1,0.5\n"), "not a checkpoint"),
    "empty": (lambda f: f.write_bytes(b""), "not a checkpoint, the file is empty"),
    "list-pickle": (lambda f: f.write_bytes(pickle.dumps([1, 2, 3], protocol=2)),
                    "not written by torch.save"),
    "list-pickle4": (lambda f: f.write_bytes(pickle.dumps([1, 2, 3], protocol=4)),
                     "not a torch checkpoint"),
    "dict-no-tensors": (lambda f: torch.save({"epoch": 3, "lr": 0.1}, f), "no state dict"),
    "torch-list": (lambda f: torch.save([torch.ones(2)], f), "holds a list"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_files_give_one_line_checkpoint_error(tmp_path, name):
    write, text = BAD_FILES[name]
    f = tmp_path / "bad.pt"
    write(f)
    with pytest.raises(CheckpointError, match=text) as info:
        load_checkpoint(f)
    assert not isinstance(info.value, UnsafeCheckpointError)
    msg = str(info.value)
    assert str(f) in msg and "\n" not in msg


def test_missing_path_and_unrecognised_folder(tmp_path):
    with pytest.raises(CheckpointError, match=r"no such file or folder") as info:
        load_checkpoint(tmp_path / "nope.pt")
    assert "nope.pt" in str(info.value)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match=r"no checkpoint I recognise"):
        load_checkpoint(tmp_path / "d")
    (tmp_path / "d" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"config.json found but no model.safetensors"):
        load_checkpoint(tmp_path / "d")


def test_path_file_is_not_a_checkpoint(tmp_path):
    f = tmp_path / "p.safetensors"
    save_file({"endpoint.0.w": torch.ones(1)}, str(f),
              metadata={"mcensemble": json.dumps({"format": "mcensemble-path", "kind": "linear"})})
    with pytest.raises(CheckpointError, match="load_path"):
        load_checkpoint(f)


@pytest.mark.parametrize("where", ["safetensors", "torch", "timm-ema"])
def test_non_finite_weights_name_the_tensor(tmp_path, where):
    sd = clone_state(mlp())
    sd["3.weight"][0, 1] = float("nan")
    f = tmp_path / "nan.bin"
    if where == "safetensors":
        save_file(sd, str(f))
    elif where == "torch":
        torch.save(sd, f)
    else:
        torch.save({"state_dict": clone_state(mlp()), "state_dict_ema": sd, "arch": "x"}, f)
        assert load_checkpoint(f, ema=False).metadata["weights"] == "raw"  # raw ones are fine
    with pytest.raises(NonFiniteError, match=r"'3\.weight'.*1 NaN") as info:
        load_checkpoint(f)
    assert ("`ema` False" in str(info.value)) == (where == "timm-ema")


def test_check_finite_ignores_integer_tensors():
    check_finite({"n": torch.tensor(3), "w": torch.ones(2)}, source="x")
    with pytest.raises(NonFiniteError, match=r"x: tensor 'b'.*Inf"):
        check_finite({"a": torch.ones(2), "b": torch.tensor([1.0, float("inf")])}, source="x")


# ----------------------------------------------------------------------------- architecture
def test_mismatched_architecture_names_tensor_and_shapes(tmp_path):
    f = tmp_path / "sd.pt"
    torch.save(tiny_timm(0, num_classes=10).state_dict(), f)
    ck = load_checkpoint(f, model=lambda: tiny_timm(0, num_classes=5))
    with pytest.raises(ArchitectureMismatchError, match=r"'fc\.weight'.*\(5, \d+\).*\(10, \d+\)"):
        ck.build_model()


def test_check_same_architecture_lists_missing_and_unexpected():
    a = {"x.weight": torch.zeros(3, 2), "y": torch.zeros(1), "z": torch.zeros(1)}
    b = {"x.weight": torch.zeros(3, 4), "y": torch.zeros(1), "extra": torch.zeros(1)}
    check_same_architecture(a, dict(a))
    with pytest.raises(ArchitectureMismatchError) as info:
        check_same_architecture(a, b, names=("first.pt", "second.pt"))
    msg = str(info.value)
    assert "'x.weight'" in msg and "first.pt has shape (3, 2)" in msg and "second.pt has shape (3, 4)" in msg
    assert "missing from second.pt: 'z'" in msg and "unexpected in second.pt: 'extra'" in msg


# moved from test_review_fixes.py


def test_checkpoint_with_non_object_header(tmp_path):
    from safetensors.torch import save_file

    from mcensemble import load_checkpoint
    from mcensemble.errors import CheckpointError

    f = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(2)}, str(f), metadata={"mcensemble": "[1, 2]"})
    with pytest.raises(CheckpointError, match="not a JSON object"):
        load_checkpoint(f)
