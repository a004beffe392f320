"""mcensemble._io: atomic writes."""
from __future__ import annotations

import pytest


# moved from test_review_fixes.py


def test_atomic_path_gives_the_usual_file_mode(tmp_path):
    from mcensemble._io import atomic_path

    with atomic_path(tmp_path / "out.json") as tmp:
        tmp.write_text("{}")
    (tmp_path / "plain.json").write_text("{}")
    assert (tmp_path / "out.json").stat().st_mode & 0o777 == (tmp_path / "plain.json").stat().st_mode & 0o777


def test_to_json_is_the_one_converter_and_writes_standard_json():
    import argparse
    import json
    import math
    from pathlib import Path

    import numpy as np
    import torch

    from mcensemble._io import to_json

    doc = to_json({"nan": float("nan"), "inf": -math.inf, "t": torch.tensor(2.5), "v": torch.ones(2),
                   "np": np.float32(1.5), "i": np.int64(3), "ns": argparse.Namespace(x=1),
                   "p": Path("/x"), 1: (1, 2), "b": True})
    assert doc == {"nan": None, "inf": None, "t": 2.5, "v": [1.0, 1.0], "np": 1.5, "i": 3, "ns": {"x": 1},
                   "p": "/x", "1": [1, 2], "b": True}
    json.dumps(doc, allow_nan=False)  # standard JSON: no NaN / Infinity tokens


# ----------------------------------------------------------------------------- read_header
def _st_file(tmp_path, name="w.safetensors", metadata=None):
    import torch
    from safetensors.torch import save_file

    f = tmp_path / name
    save_file({"a": torch.ones(3, 2), "b": torch.arange(4, dtype=torch.int64)}, str(f), metadata=metadata)
    return f


def test_read_header_reads_tensors_and_metadata_without_the_data(tmp_path):
    import json

    from mcensemble._io import read_header

    f = _st_file(tmp_path, metadata={"mcensemble": json.dumps({"format": "x", "n": 1}), "other": "y"})
    h = read_header(f)
    assert h.format == "safetensors" and h.path == f
    assert {k: (v["dtype"], v["shape"]) for k, v in h.tensors.items()} == {"a": ("F32", [3, 2]), "b": ("I64", [4])}
    assert h.metadata["other"] == "y" and h.document() == {"format": "x", "n": 1}
    assert h.document("absent") is None
    assert h.data_start + 3 * 2 * 4 + 4 * 8 == f.stat().st_size


@pytest.mark.parametrize("kind, expect", [
    ("torch-zip", "torch-zip"), ("pickle", "pickle"), ("empty", "empty"), ("text", "unknown")])
def test_read_header_sniffs_other_formats_from_the_bytes(tmp_path, kind, expect):
    import pickle

    import torch

    from mcensemble._io import read_header

    f = tmp_path / "w.safetensors"   # the name does not count
    if kind == "torch-zip":
        torch.save({"w": torch.ones(2)}, f)
    elif kind == "pickle":
        f.write_bytes(pickle.dumps([1, 2], protocol=2))
    elif kind == "empty":
        f.write_bytes(b"")
    else:
        f.write_text("epoch,loss\n1,0.5\n")
    h = read_header(f)
    assert (h.format, dict(h.tensors), dict(h.metadata)) == (expect, {}, {})


def _cut_tail(f):
    f.write_bytes(f.read_bytes()[:-8])


def _cut_header(f):
    f.write_bytes(f.read_bytes()[:30])


def _bad_json(f):
    data = bytearray(f.read_bytes())
    data[9] = ord("!")
    f.write_bytes(bytes(data))


def _wrong_offsets(f):
    import json
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["a"]["data_offsets"][1] -= 4      # no longer sized for F32 [3, 2]
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    f.write_bytes(data[:8] + raw + data[8 + n:])


@pytest.mark.parametrize("damage, message", [
    (_cut_tail, r"truncated or corrupt"),
    (_cut_header, r"truncated safetensors file"),
    (_bad_json, r"not valid JSON"),
    (_wrong_offsets, r"tensor 'a' .* does not fit"),
])
def test_read_header_refuses_a_damaged_safetensors_file_naming_it(tmp_path, damage, message):
    from mcensemble._io import read_header
    from mcensemble.errors import CheckpointError

    f = _st_file(tmp_path)
    damage(f)
    with pytest.raises(CheckpointError, match=message) as info:
        read_header(f)
    assert str(f) in str(info.value)


def test_read_header_missing_file_and_folder(tmp_path):
    from mcensemble._io import read_header
    from mcensemble.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"nope\.safetensors: no such file"):
        read_header(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="is a folder"):
        read_header(tmp_path)


def test_read_header_bad_document_json_names_the_file(tmp_path):
    from mcensemble._io import read_header
    from mcensemble.errors import CheckpointError

    f = _st_file(tmp_path, metadata={"mcensemble": "{not json"})
    with pytest.raises(CheckpointError, match=r"w\.safetensors: its 'mcensemble' metadata is not valid JSON"):
        read_header(f).document()
