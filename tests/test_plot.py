"""Tests for mcensemble.plot."""
from __future__ import annotations

import json
import sys

import pytest

from mcensemble.errors import BadOptionError
from mcensemble.evaluate import ScanResult
from mcensemble.plot import plot_scan

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_scan(bump: float, *, val: bool = True, kind: str = "linear") -> ScanResult:
    pts = []
    for i in range(7):
        t = i / 6
        loss = 0.2 + 0.1 * t + bump * 4 * t * (1 - t)
        p = {"t": t, "loss": loss, "acc": 1 - loss / 3, "nll": loss, "ece": 0.02, "n": 100}
        if val:
            p.update(val_loss=loss + 0.1, val_acc=1 - (loss + 0.1) / 3, val_nll=loss + 0.1, val_ece=0.03, val_n=50)
        pts.append(p)
    return ScanResult(points=pts, endpoints={"A": pts[0], "B": pts[-1]}, barrier=bump,
                      bn_reestimated=True, val_barrier=bump if val else None, kind=kind)


def check_png(f):
    data = f.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 10_000
    assert not [p for p in f.parent.iterdir() if p.name.endswith(".tmp")]


def test_single_scan(tmp_path):
    had_pyplot = "matplotlib.pyplot" in sys.modules
    f = tmp_path / "out" / "scan.png"
    plot_scan(fake_scan(1.5), f, title="A to B")
    check_png(f)
    if not had_pyplot:
        assert "matplotlib.pyplot" not in sys.modules


def test_several_curves(tmp_path):
    f = tmp_path / "cmp.png"
    plot_scan({"straight line": fake_scan(1.5), "bezier": fake_scan(0.05, kind="bezier")}, f,
              title="linear vs bezier")
    check_png(f)


@pytest.mark.parametrize("form", ["list", "dicts", "labels"])
def test_forms(tmp_path, form):
    results = [fake_scan(1.0, val=False), fake_scan(0.1, kind="polychain")]
    if form == "dicts":  # as read back from a --report JSON
        results = [json.loads(json.dumps(r.to_dict())) for r in results]
    f = tmp_path / f"{form}.png"
    plot_scan(results, f, labels=["one", "two"] if form == "labels" else None)
    check_png(f)


def test_bad_input(tmp_path):
    with pytest.raises(BadOptionError, match="2 `labels` given for 1 scans"):
        plot_scan([fake_scan(1.0)], tmp_path / "x.png", labels=["a", "b"])
    with pytest.raises(ValueError, match="at least one"):
        plot_scan([], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
