"""mcensemble._io: atomic writes."""
from __future__ import annotations


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
