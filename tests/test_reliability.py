"""Reliability: tensor hashes and `--verify`, damaged fit checkpoints on `--resume`,
concurrent and killed writers, `--device` checked before any work, missing optional
dependencies, and image folders without images or with other classes than the training set."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import mcensemble
from mcensemble._io import HASHES_KEY, safetensors_layout
from mcensemble.checkpoints import save_checkpoint
from mcensemble.ensemble import read_ensemble_metadata, save_ensemble, verify_ensemble_file
from mcensemble.errors import CheckpointError, DataSpecError
from mcensemble.models import ModelSpec, create_model
from mcensemble.paths import LinearPath, load_path
from mcensemble.paths.base import verify_path_file

ROOT = Path(__file__).resolve().parents[1]
SPEC = ModelSpec(arch="mce_digits_mlp", kwargs={"num_classes": 10, "in_chans": 1, "width": 8})


def states(n: int = 2, offset: int = 0) -> list[dict[str, torch.Tensor]]:
    out = []
    for seed in range(offset, offset + n):
        torch.manual_seed(seed)
        out.append({k: v.detach().clone() for k, v in create_model(SPEC).state_dict().items()})
    return out


def flip_byte(file: Path, tensor: str, at: int = 3) -> None:
    """Flip one bit of tensor `tensor`'s bytes in place."""
    header, start = safetensors_layout(file)
    pos = start + header[tensor]["data_offsets"][0] + at
    data = bytearray(file.read_bytes())
    data[pos] ^= 0x10
    file.write_bytes(bytes(data))


def drop_hashes(file: Path) -> None:
    """Rewrite the header without the hash record: a file as written before hashes were."""
    header, start = safetensors_layout(file)
    body = file.read_bytes()[start:]
    doc = json.loads(header["__metadata__"]["mcensemble"])
    del doc[HASHES_KEY]
    header["__metadata__"]["mcensemble"] = json.dumps(doc)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    file.write_bytes(len(raw).to_bytes(8, "little") + raw + body)


# ----------------------------------------------------------------------------- integrity
@pytest.fixture
def ens_file(tmp_path) -> Path:
    return save_ensemble(tmp_path / "ens.safetensors", states(3), model_spec=SPEC)


@pytest.fixture
def path_file(tmp_path) -> Path:
    a, b = states()
    LinearPath(a, b).save(tmp_path / "path.safetensors", model_spec=SPEC)
    return tmp_path / "path.safetensors"


def test_a_flipped_byte_in_a_member_is_reported_by_tensor_name(ens_file, mce_cli):
    assert verify_ensemble_file(ens_file) == 3 * 6
    assert mcensemble.load_ensemble(ens_file, verify=True)(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    res = mce_cli("inspect", "--verify", ens_file)
    assert res.exit_code == 0 and "ok, all 18 tensors match" in res.output, res.output
    flip_byte(ens_file, "member.1.layers.3.weight")
    with pytest.raises(CheckpointError, match=r"tensor 'member\.1\.layers\.3\.weight' do not match the SHA-256"):
        mcensemble.load_ensemble(ens_file, verify=True)
    mcensemble.load_ensemble(ens_file)  # without verify= the changed weights load (what verify is for)
    res = mce_cli("inspect", "--verify", ens_file)
    assert res.exit_code == 1 and "member.1.layers.3.weight" in res.output and "Traceback" not in res.output


def test_path_files_are_verified_too(path_file, mce_cli):
    assert load_path(path_file, verify=True).state_at(0.5)
    flip_byte(path_file, "endpoint.1.head.bias", at=0)
    with pytest.raises(CheckpointError, match=r"'endpoint\.1\.head\.bias'"):
        load_path(path_file, verify=True)
    with pytest.raises(CheckpointError, match=r"'endpoint\.1\.head\.bias'"):
        verify_path_file(path_file)
    res = mce_cli("inspect", "--verify", path_file)
    assert res.exit_code == 1 and "endpoint.1.head.bias" in res.output


@pytest.mark.parametrize("kind", ["ensemble", "path"])
def test_files_without_hashes_still_load_and_verify_says_so(kind, ens_file, path_file, mce_cli, caplog):
    file = ens_file if kind == "ensemble" else path_file
    drop_hashes(file)
    with caplog.at_level("WARNING"):
        loaded = mcensemble.load_ensemble(file, verify=True) if kind == "ensemble" else load_path(file, verify=True)
    assert loaded is not None and "records no tensor hashes" in caplog.text
    res = mce_cli("inspect", "--verify", file)
    assert res.exit_code == 0 and "no hashes are recorded" in res.output, res.output


def test_verify_refuses_files_that_record_no_hashes_by_design(tmp_path, mce_cli):
    save_checkpoint(states(1)[0], tmp_path / "ck.safetensors", metadata={"arch": "mce_digits_mlp"})
    res = mce_cli("inspect", "--verify", tmp_path / "ck.safetensors")
    assert res.exit_code == 1 and "--verify checks mcensemble ensemble and path files" in res.output
    res = mce_cli("inspect", "--verify", tmp_path / "missing.safetensors")
    assert res.exit_code == 1 and "missing.safetensors" in res.output and "Traceback" not in res.output


def test_hashes_cover_exactly_the_tensors_written(ens_file):
    doc = read_ensemble_metadata(ens_file)
    header, _ = safetensors_layout(ens_file)
    assert set(doc[HASHES_KEY]) == {k for k in header if k != "__metadata__"}
    ens = mcensemble.load_ensemble(ens_file)
    ens.save(ens_file.with_name("again.safetensors"))  # re-saving records fresh hashes, not stale ones
    assert verify_ensemble_file(ens_file.with_name("again.safetensors")) == 18


# ----------------------------------------------------------------------------- interrupted fits
def _ends(tmp_path: Path) -> list[str]:
    files = []
    for i, st in enumerate(states()):
        save_checkpoint(st, tmp_path / f"e{i}.safetensors", metadata={"arch": "mce_digits_mlp", **SPEC.kwargs,
                                                                       "model_args": {"width": 8}})
        files.append(str(tmp_path / f"e{i}.safetensors"))
    return files


BUILD = ["--data", "digits,train=64", "--batch-size", "32", "--epochs", "1", "--members", "2", "--candidates",
         "3", "--method", "bezier", "--checkpoint-dir", "ck"]


def test_a_truncated_or_damaged_fit_checkpoint_is_refused_on_resume(tmp_path, monkeypatch, mce_cli):
    monkeypatch.chdir(tmp_path)
    ends = _ends(tmp_path)
    res = mce_cli("build", *ends, *BUILD, "--out", "ens.safetensors")
    assert res.exit_code == 0, res.output
    ck = tmp_path / "ck" / "curve-0.safetensors"
    whole = ck.read_bytes()
    ck.write_bytes(whole[: len(whole) // 2])
    res = mce_cli("build", *ends, *BUILD, "--resume", "--out", "again.safetensors")
    assert res.exit_code == 1 and "curve-0.safetensors" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "again.safetensors").exists()
    assert ck.read_bytes() == whole[: len(whole) // 2]  # refused, not overwritten

    from safetensors.torch import load_file, save_file
    from mcensemble.paths.fit_run import read_fit_checkpoint
    ck.write_bytes(whole)
    tensors, meta = read_fit_checkpoint(ck)
    del tensors["rng.torch.0"]  # everything else fine: still refused whole
    save_file(tensors, str(ck), metadata={"mcensemble": json.dumps(meta)})
    res = mce_cli("build", *ends, *BUILD, "--resume", "--out", "again.safetensors")
    assert res.exit_code == 1 and "rng.torch.0" in res.output, res.output
    meta["step"] = meta["total_steps"] + 5
    save_file(load_file(str(tmp_path / "e0.safetensors")), str(ck), metadata={"mcensemble": json.dumps(meta)})
    res = mce_cli("build", *ends, *BUILD, "--resume", "--out", "again.safetensors")
    assert res.exit_code == 1 and "'step'" in res.output, res.output
    ck.write_bytes(whole)
    res = mce_cli("build", *ends, *BUILD, "--bends", "2", "--resume", "--out", "again.safetensors")
    assert res.exit_code == 1 and "--bends" in res.output  # another run's options: the reason is named
    assert not (tmp_path / "again.safetensors").exists()


# ----------------------------------------------------------------------------- writers
WRITER = textwrap.dedent('''
    import json, sys
    import numpy as np
    from safetensors.numpy import save_file
    from mcensemble._io import atomic_path  # what every writer of mcensemble (build --out ...) goes through
    dest, value, n = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    arrays = {"w": np.full((512, 256), value, np.float32), "b": np.full((256,), value, np.float32)}
    for _ in range(n):
        with atomic_path(dest) as tmp:
            save_file(arrays, str(tmp), metadata={"writer": str(value)})
''')


def test_concurrent_writers_leave_one_complete_file(tmp_path):
    from safetensors import safe_open
    dest = tmp_path / "out.safetensors"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    procs = [subprocess.Popen([sys.executable, str(script), str(dest), str(v), "40"]) for v in (1, 2)]

    def check() -> None:  # whenever the file exists it is complete: one writer's header and bytes
        with safe_open(str(dest), framework="np") as f:
            value = float(f.metadata()["writer"])
            assert all(bool((f.get_tensor(k) == value).all()) for k in ("w", "b"))
    while any(p.poll() is None for p in procs):
        if dest.exists():
            check()
        time.sleep(0.005)
    assert [p.wait() for p in procs] == [0, 0]
    check()
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors", "writer.py"]  # no temporary files left


KILLED = textwrap.dedent('''
    import sys, time
    from mcensemble._io import atomic_path
    dest, ready = sys.argv[1], sys.argv[2]
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"half a file")
            f.flush()
        open(ready, "w").close()
        time.sleep(120)
''')


def _start_writer(tmp_path: Path, dest: Path, name: str) -> subprocess.Popen:
    script = tmp_path / "killed.py"
    script.write_text(KILLED)
    ready = tmp_path / f"{name}.ready"
    proc = subprocess.Popen([sys.executable, str(script), str(dest), str(ready)])
    for _ in range(600):
        if ready.exists() or proc.poll() is not None:
            break
        time.sleep(0.05)
    assert ready.exists(), "the writer did not start"
    ready.unlink()
    return proc


def _temps(folder: Path, dest: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith(f".{dest.name}."))


@pytest.mark.parametrize("old", [True, False])
def test_kill_9_during_a_write_leaves_the_old_file_or_none_and_no_temp_files_after(tmp_path, old):
    dest = tmp_path / "ens.safetensors"
    if old:
        save_ensemble(dest, states(2), model_spec=SPEC)
    before = dest.read_bytes() if old else None
    proc = _start_writer(tmp_path, dest, "a")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (dest.read_bytes() if dest.exists() else None) == before
    if old:
        assert mcensemble.load_ensemble(dest, verify=True) is not None
    stale = _temps(tmp_path, dest)
    assert len(stale) == 1  # what the killed process could not remove

    live = _start_writer(tmp_path, dest, "b")  # a writer still at work: its file must survive
    try:
        save_ensemble(dest, states(2, offset=5), model_spec=SPEC)  # the next write cleans up the dead one's
        left = _temps(tmp_path, dest)
        assert stale[0] not in left and len(left) == 1
        assert verify_ensemble_file(dest) == 12
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait()
    save_ensemble(dest, states(2), model_spec=SPEC)
    assert _temps(tmp_path, dest) == []


# ----------------------------------------------------------------------------- devices
COMMANDS = [["scan", "missing-a.pt", "missing-b.pt"], ["build", "missing-a.pt", "missing-b.pt"],
            ["eval", "missing.safetensors", "--data", "digits"], ["stability", "missing.pt"],
            ["pack", "missing-a.pt", "missing-b.pt", "--out", "x.safetensors"]]


@pytest.mark.parametrize("device,message", [("cuda:99", "cuda:99"), ("cu da", "is not a torch device"),
                                            ("meta", "mcensemble runs on cpu, cuda, mps")])
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_device_is_checked_before_any_work(command, device, message, mce_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = mce_cli(*command, "--device", device)
    assert res.exit_code == 2, res.output
    assert "--device" in res.output and message in res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in res.output
    assert "missing" not in res.output.split("Error:")[-1]  # refused before the files were looked at
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert not list(tmp_path.iterdir())  # nothing written


def test_device_from_a_recipe_is_checked_too(tmp_path, mce_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text("device: cuda:99\n")
    res = mce_cli("build", "missing-a.pt", "missing-b.pt", "--recipe", "r.yaml")
    assert res.exit_code == 2 and "cuda:99" in res.output, res.output


# ----------------------------------------------------------------------------- environment
@pytest.mark.parametrize("plugin,blocked,hint", [
    ("lightning", ["lightning", "pytorch_lightning"], "pip install lightning"),
    ("hf", ["transformers"], "pip install transformers"),
])
def test_missing_optional_dependency_gives_an_install_hint(plugin, blocked, hint, monkeypatch):
    import importlib
    module = {"lightning": "mcensemble_lightning", "hf": "mcensemble_hf"}[plugin]
    monkeypatch.syspath_prepend(str(ROOT / "plugins" / plugin))
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)  # put back after the test
    for name in blocked:
        monkeypatch.setitem(sys.modules, name, None)  # "not installed"
    with pytest.raises(ImportError) as e:
        importlib.import_module(module)
    assert hint in str(e.value) and "\n" not in str(e.value)


def _image_folder(root: Path, classes: list[str], n: int = 2) -> Path:
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            px = (torch.rand(8, 8, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(px).save(root / c / f"{i}.png")
    return root


def test_folders_without_images_are_refused_by_name(tmp_path):
    from mcensemble.data import create_loader
    (tmp_path / "empty").mkdir()
    for c in ("cat", "dog"):
        (tmp_path / "noimg" / c).mkdir(parents=True)
        (tmp_path / "noimg" / c / "notes.txt").write_text("no image here")
    with pytest.raises(DataSpecError, match=r"'.*empty'.*no images.*no class folders"):
        create_loader(str(tmp_path / "empty"))
    with pytest.raises(DataSpecError, match=r"'.*noimg'.*no images.*class folders \(cat, dog\)"):
        create_loader(str(tmp_path / "noimg"))


def test_train_and_val_folders_with_other_classes_are_refused(tmp_path, mce_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _image_folder(tmp_path / "train", ["cat", "dog", "fish"])
    _image_folder(tmp_path / "val", ["cat", "fish"])
    ends = _ends(tmp_path)
    res = mce_cli("scan", *ends, "--data", "train", "--val-data", "val", "--points", "2")
    assert res.exit_code == 2, res.output
    assert "only in --data: 'dog'" in res.output and "'val'" in res.output
    _image_folder(tmp_path / "val2", ["cat", "dog", "fish"])
    res = mce_cli("scan", *ends, "--data", "train", "--val-data", "val2", "--points", "2")
    assert res.exit_code == 0, res.output
