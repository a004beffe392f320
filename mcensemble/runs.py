"""timm training runs: pick checkpoints from the output folders of timm's train.py.

A timm output folder (written by `timm.utils.CheckpointSaver`) holds `checkpoint-<epoch>.pth.tar`
for the best `max_history` epochs by the eval metric, `last.pth.tar` (the latest epoch),
`model_best.pth.tar` (a copy of the best), maybe `milestone-<n>.pth.tar`, and `summary.csv`
(one row per epoch: `epoch, train_*, eval_*, lr`). `checkpoints_from_runs` chooses among them
by their recorded metric, the way `avg_checkpoints.py -n K` does: the `metric` stored in each
checkpoint, else the run's summary.csv column `eval_<args.eval_metric>` (default
`eval_top1`). Files are told apart by their content's `epoch`, so a `model_best.pth.tar` that
duplicates a numbered checkpoint counts once. Reading a checkpoint's metadata memory-maps its
tensors (cheap even for large files) and allows only `argparse.Namespace` beyond tensors and
plain containers, as `load_checkpoint` does. EMA versus raw weights is decided later, when
the chosen files are loaded (`--ema/--no-ema`).
"""
from __future__ import annotations

import argparse
import csv
import logging
import math
import numbers
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .checkpoints import _torch_load
from .errors import BadOptionError, CheckpointError, MCEnsembleError

__all__ = ["RunCheckpoint", "scan_run", "select_checkpoints", "checkpoints_from_runs"]

logger = logging.getLogger(__name__)

#: file name patterns of a timm output folder, in order of preference for one epoch
_PATTERNS = (("checkpoint", re.compile(r"checkpoint-(\d+)\.pth\.tar")),
             ("milestone", re.compile(r"milestone-(\d+)\.pth\.tar")),
             ("last", re.compile(r"last\.pth\.tar")),
             ("best", re.compile(r"model_best\.pth\.tar")))


@dataclass(frozen=True)
class RunCheckpoint:
    """One distinct checkpoint of a run: its file, epoch, metric (None when not recorded),
    where the metric came from (`"checkpoint"`, `"summary.csv"` or None) and the run's
    `--eval-metric` (from the checkpoint's args; None when not recorded)."""

    path: Path
    epoch: int | None
    metric: float | None
    metric_source: str | None = None
    eval_metric: str | None = None


def _read_meta(path: Path) -> dict[str, Any]:
    """The checkpoint's non-tensor entries, tensors memory-mapped (not read)."""
    import torch
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - legacy format (no mmap), unsafe or corrupt: the reader says which
        try:
            obj = _torch_load(path)
        except MCEnsembleError:
            raise
        except Exception as e:  # noqa: BLE001 - torch's errors on truncated / corrupt files
            line = (str(e).strip().splitlines() or [""])[0][:200]
            raise CheckpointError(f"{path}: cannot be read, the file is truncated or corrupt "
                                  f"({type(e).__name__}: {line})") from e
    if not isinstance(obj, dict) or "state_dict" not in obj:
        raise CheckpointError(f"{path}: not a timm training checkpoint (no 'state_dict' entry)")
    return obj


def _number(x: Any) -> float | None:
    if hasattr(x, "item") and getattr(x, "numel", lambda: 0)() == 1:
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x):
        return None
    return float(x)


def _summary_metrics(folder: Path, column: str) -> dict[int, float]:
    """epoch -> value of `column` in the run's summary.csv (the last row of an epoch wins:
    a resumed run appends rows again); {} when there is no such file or column."""
    file = folder / "summary.csv"
    if not file.is_file():
        return {}
    out: dict[int, float] = {}
    try:
        with open(file, newline="") as f:
            for row in csv.DictReader(f):
                try:
                    epoch, value = int(float(row["epoch"])), float(row[column])
                except (KeyError, TypeError, ValueError):
                    continue
                if math.isfinite(value):
                    out[epoch] = value
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        logger.warning("%s: cannot read it (%s); using the checkpoints' own metrics only", file, e)
    return out


def _candidates(folder: Path) -> list[tuple[int, str, Path]]:
    found = []
    for p in sorted(folder.iterdir()):
        for rank, (_, pat) in enumerate(_PATTERNS):
            if pat.fullmatch(p.name) and p.is_file():
                found.append((rank, p.name, p))
    return sorted(found)


def _check_folder(folder: Path) -> None:
    if not folder.exists():
        raise CheckpointError(f"run folder {str(folder)!r} not found")
    if not folder.is_dir():
        raise CheckpointError(f"{str(folder)!r} is a file, not a run folder; pass the folder timm's "
                              f"train.py wrote (or give the checkpoint file itself as a checkpoint)")


def _no_checkpoints(folder: Path) -> CheckpointError:
    runs = sorted(p.name for p in folder.iterdir() if p.is_dir() and _candidates(p))
    hint = (f"; it holds run folders ({', '.join(runs[:5])}{' ...' if len(runs) > 5 else ''}): "
            f"pass those" if runs else "")
    return CheckpointError(
        f"run folder {str(folder)!r} holds no timm checkpoints (checkpoint-*.pth.tar, "
        f"milestone-*.pth.tar, last.pth.tar or model_best.pth.tar){hint}")


def scan_run(folder: str | os.PathLike) -> list[RunCheckpoint]:
    """Every distinct checkpoint of one timm output folder, sorted by epoch.

    One file per epoch (numbered checkpoints preferred over milestones, `last`, `model_best`).
    Metric: the checkpoint's own `metric`, else summary.csv's `eval_<eval_metric>` column.
    Raises `CheckpointError` naming the folder when it is missing or holds no checkpoint.
    """
    folder = Path(folder)
    _check_folder(folder)
    files = _candidates(folder)
    if not files:
        raise _no_checkpoints(folder)
    by_epoch: dict[Any, tuple[Path, float | None]] = {}
    eval_metric = None
    for _, _, path in files:
        meta = _read_meta(path)
        epoch = meta.get("epoch")
        epoch = int(epoch) if isinstance(epoch, numbers.Integral) else None
        args = meta.get("args")
        if eval_metric is None and isinstance(args, argparse.Namespace):
            eval_metric = getattr(args, "eval_metric", None)
        key = epoch if epoch is not None else path.name   # no epoch: each file stands alone
        if key not in by_epoch:
            by_epoch[key] = (path, _number(meta.get("metric")))
    summary = _summary_metrics(folder, f"eval_{eval_metric or 'top1'}")
    out = []
    for key, (path, metric) in by_epoch.items():
        epoch = key if isinstance(key, int) else None
        source = "checkpoint" if metric is not None else None
        if metric is None and epoch is not None and epoch in summary:
            metric, source = summary[epoch], "summary.csv"
        out.append(RunCheckpoint(path=path, epoch=epoch, metric=metric, metric_source=source,
                                 eval_metric=eval_metric))
    return sorted(out, key=lambda c: (c.epoch is None, c.epoch if c.epoch is not None else 0,
                                      c.path.name))


def select_checkpoints(run: list[RunCheckpoint], k: int | None, *,
                       metric_mode: str = "max") -> list[RunCheckpoint]:
    """The `k` best of one run's checkpoints (all when k is None), in epoch order.

    Ranked by metric (`metric_mode` "max": higher is better, "min": lower), ties to the
    earlier epoch; checkpoints without a metric come after, newest first (as timm's
    CheckpointSaver keeps them).
    """
    if k is None or k >= len(run):
        return list(run)
    sign = -1.0 if metric_mode == "max" else 1.0

    def rank(c: RunCheckpoint):
        if c.metric is not None:
            return (0, sign * c.metric, c.epoch if c.epoch is not None else math.inf)
        return (1, -(c.epoch if c.epoch is not None else -1), 0)

    chosen = set(id(c) for c in sorted(run, key=rank)[:k])
    return [c for c in run if id(c) in chosen]


def _as_dirs(dirs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    if isinstance(dirs, (str, os.PathLike)):
        return [Path(dirs)]
    try:
        out = [Path(d) for d in dirs]
    except TypeError as e:
        raise BadOptionError(f"run folders must be paths, got {dirs!r}", option="from_run") from e
    if not out:
        raise BadOptionError("no run folder given; pass at least one timm output folder",
                             option="from_run")
    return out


def checkpoints_from_runs(dirs: str | os.PathLike | Iterable[str | os.PathLike], *,
                          top_k: int | None = None, metric_mode: str = "max") -> list[Path]:
    """Checkpoint files chosen from one or more timm output folders, by recorded metric.

    One folder: its `top_k` best checkpoints (all distinct ones when None), sorted by epoch
    so that consecutive files are neighbours along training. Several folders: the `top_k`
    best of each (default 1: each run's best), folder by folder in the order given, each
    folder's in epoch order. A run with no recorded metric at all gives its latest epochs
    (with a warning). `metric_mode`: "max" (accuracy, the default of timm's train.py) or
    "min" (a loss: `--eval-metric loss`). Raises `CheckpointError` naming a folder that is
    missing or holds no checkpoint, `BadOptionError` for bad `top_k` / `metric_mode`.
    """
    if metric_mode not in ("max", "min"):
        raise BadOptionError(f"metric_mode must be 'max' or 'min', got {metric_mode!r}",
                             option="metric_mode")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral)
                              or top_k < 1):
        raise BadOptionError(f"top_k must be an integer >= 1, got {top_k!r}", option="top_k")
    folders = _as_dirs(dirs)
    k = top_k if top_k is not None or len(folders) == 1 else 1
    chosen: list[Path] = []
    for folder in folders:
        try:
            run = scan_run(folder)
        except OSError as e:
            raise CheckpointError(f"run folder {str(folder)!r}: cannot read it ({e})") from e
        if run[0].eval_metric == "loss" and metric_mode == "max":
            logger.warning("%s: the run ranked its checkpoints by eval loss, but checkpoints are chosen "
                           "by the highest metric; pass `metric_mode` min to choose the lowest loss", folder)
        if k is not None and k < len(run) and all(c.metric is None for c in run):
            logger.warning("%s: no checkpoint records a metric (and no summary.csv eval column); "
                           "taking the %d latest epoch(s)", folder, k)
        picked = select_checkpoints(run, k, metric_mode=metric_mode)
        logger.info("%s: chose %s", folder, ", ".join(
            f"{c.path.name} (epoch {c.epoch}, metric {c.metric})" for c in picked))
        chosen.extend(c.path for c in picked)
    return chosen
