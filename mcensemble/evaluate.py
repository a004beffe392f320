"""Loss, accuracy, NLL and calibration over a loader, and scans along paths.

`evaluate` works on any classifier returning logits `(B, C)`, and on an
`EnsembleModel`, whose log mean probabilities pass through `log_softmax` unchanged.
`scan` evaluates a `Path` at evenly spaced t and reports the loss barrier.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from . import distributed as dist_
from ._layout import fast_layout
from ._modes import modes_kept
from .bn import has_batchnorm, labelled_batch, update_bn
from .checkpoints import check_same_architecture
from .errors import ArchitectureMismatchError, BadOptionError, DataSpecError
from .models import ModelLike, as_factory
from .options import check_count
from .precision import resolve_precision

__all__ = ["Metrics", "ScanResult", "expected_calibration_error", "evaluate", "evaluate_state", "scan", "barrier"]

log = logging.getLogger(__name__)


@dataclass
class Metrics:
    """Metrics of one model on one data set. `loss` and `nll` are both the mean cross
    entropy (natural log); `acc` the top-1 accuracy in [0, 1]; `ece` the expected
    calibration error (15 equal-width confidence bins); `n` the number of examples."""

    loss: float
    acc: float
    nll: float
    ece: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return {"loss": float(self.loss), "acc": float(self.acc), "nll": float(self.nll),
                "ece": float(self.ece), "n": int(self.n)}


def _ece(conf: torch.Tensor, correct: torch.Tensor, n_bins: int) -> float:
    """ECE from per-example confidence and correctness (1-D tensors)."""
    n = conf.numel()
    if n == 0:
        return float("nan")
    conf = conf.double()
    correct = correct.double()
    # bin i holds confidences in (i/n_bins, (i+1)/n_bins]; a confidence of exactly 0 goes to bin 0
    idx = (torch.ceil(conf * n_bins).long() - 1).clamp_(0, n_bins - 1)
    sum_conf = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, conf)
    sum_acc = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, correct)
    return float((sum_acc - sum_conf).abs().sum() / n)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Expected calibration error: sum over equal-width confidence bins of
    |bin| / N * |accuracy(bin) - mean confidence(bin)|.

    `probs`: `(N, C)` class probabilities; confidence = max probability, prediction =
    argmax. `labels`: `(N,)` integer class indices. Bins are `(i/n_bins, (i+1)/n_bins]`.
    """
    if n_bins < 1:
        raise BadOptionError(f"n_bins must be at least 1, got {n_bins}", option="n_bins")
    probs = torch.as_tensor(probs)
    labels = torch.as_tensor(labels)
    if probs.ndim != 2 or labels.ndim != 1 or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"expected probs (N, C) and labels (N,), got {tuple(probs.shape)} and "
                         f"{tuple(labels.shape)}")
    conf, pred = probs.max(dim=1)
    return _ece(conf, pred.eq(labels.to(pred.device)), n_bins)


def _log_probs(out: Any, y: torch.Tensor) -> torch.Tensor:
    """float32 log-probabilities of a model's output `out` for a batch with labels `y`,
    after checking the labels fit it (`DataSpecError` saying what is wrong otherwise): what
    `evaluate` sums its loss over."""
    logp = F.log_softmax(_logits(out).float(), dim=1)
    if y.ndim != 1 or y.shape[0] != logp.shape[0]:
        raise DataSpecError(f"labels of shape {tuple(y.shape)} do not match outputs of shape "
                            f"{tuple(logp.shape)}; expected one integer class per example",
                            option="data")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= logp.shape[1]):
        raise DataSpecError(f"labels range over [{int(y.min())}, {int(y.max())}] but the model "
                            f"outputs {logp.shape[1]} classes; check `num_classes` and the data",
                            option="data")
    return logp


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, (list, tuple)) and out and isinstance(out[0], torch.Tensor):
        out = out[0]
    elif isinstance(out, Mapping) and "logits" in out:
        out = out["logits"]
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise BadOptionError(f"the model returned {shape}; a classifier returning logits of shape "
                             "(batch, classes) is expected", option="model")
    return out


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[Any], *, device: str | torch.device = "cpu",
             progress: bool | None = None, precision: str | None = None) -> Metrics:
    """Evaluate a classifier on a loader of `(inputs, labels)` batches.

    The model is moved to `device` (in place, as `nn.Module.to` does) and run in eval mode
    under `torch.no_grad()`; its train/eval mode is restored afterwards. Outputs go through
    `log_softmax` (a no-op on log-probabilities such as an `EnsembleModel`'s output).
    `precision` ("fp32" default, "bf16", "fp16"): forward passes under autocast
    (`mcensemble.precision`); the metrics are computed in float32.
    """
    prec = resolve_precision(precision, device)
    model.to(device)
    total_nll = 0.0
    n_correct = 0
    n = 0
    confs: list[torch.Tensor] = []
    corrects: list[torch.Tensor] = []
    bar = tqdm(loader, desc="evaluate", unit="batch", leave=False, file=sys.stderr,
               disable=None if progress is None else not progress)
    try:
        with modes_kept(model, False):
            for batch in bar:
                x, y = labelled_batch(batch, what="evaluation")
                x, y = x.to(device), y.to(device).long()
                with prec.autocast():
                    out = model(prec.input(x))
                logp = _log_probs(out, y)
                total_nll += float(F.nll_loss(logp, y, reduction="sum").double())
                conf, pred = logp.max(dim=1)
                correct = pred.eq(y)
                n_correct += int(correct.sum())
                n += y.shape[0]
                confs.append(conf.exp().cpu())
                corrects.append(correct.cpu())
    finally:
        bar.close()
    if n == 0:
        raise DataSpecError("cannot evaluate: the data loader yielded no examples", option="data")
    nll = total_nll / n
    ece = _ece(torch.cat(confs), torch.cat(corrects), 15)
    return Metrics(loss=nll, acc=n_correct / n, nll=nll, ece=ece, n=n)


def _load_state_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    check_same_architecture(model.state_dict(), state_dict, names=("the model", "the state"))
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise ArchitectureMismatchError(f"the state does not fit the model: {e}") from e


def evaluate_state(model: nn.Module, state_dict: Mapping[str, torch.Tensor], loader: Iterable[Any], *,
                   bn_loader: Iterable[Any] | None = None, device: str | torch.device = "cpu",
                   progress: bool | None = None, precision: str | None = None) -> Metrics:
    """Load `state_dict` into `model` (in place, strict), re-estimate BatchNorm statistics
    on `bn_loader` when the model has BN and a `bn_loader` is given, and evaluate on
    `loader`. Shape / key mismatches raise `ArchitectureMismatchError`."""
    _load_state_strict(model, state_dict)
    model.to(device)
    if bn_loader is not None and has_batchnorm(model):
        update_bn(model, bn_loader, device=device, progress=False if progress is None else progress,
                  precision=precision)
    return evaluate(model, loader, device=device, progress=progress, precision=precision)


@dataclass
class ScanResult:
    """Metrics along a path. `points`: one dict per t (`t, loss, acc, nll, ece, n`, and
    `val_*` with validation data); `endpoints`: `{"A": t=0 point, "B": t=1 point}`;
    `barrier`: max over t of L(t) - ((1-t) L(A) + t L(B)) on the training loss (and
    `val_barrier` on the validation loss); `bn_reestimated`: whether BatchNorm statistics
    were re-estimated at every point (False for models without BN)."""

    points: list[dict[str, Any]]
    endpoints: dict[str, dict[str, Any]]
    barrier: float
    bn_reestimated: bool
    val_barrier: float | None = None
    barrier_t: float | None = None
    has_batchnorm: bool = False
    kind: str | None = None
    label: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ts(self) -> list[float]:
        return [p["t"] for p in self.points]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the `--report` of `mcensemble scan`)."""
        d: dict[str, Any] = {
            "kind": self.kind,
            "points": [dict(p) for p in self.points],
            "endpoints": {k: dict(v) for k, v in self.endpoints.items()},
            "barrier": float(self.barrier),
            "barrier_t": self.barrier_t,
            "bn_reestimated": bool(self.bn_reestimated),
            "has_batchnorm": bool(self.has_batchnorm),
        }
        if self.val_barrier is not None:
            d["val_barrier"] = float(self.val_barrier)
        if self.label is not None:
            d["label"] = self.label
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ScanResult":
        known = {"kind", "points", "endpoints", "barrier", "barrier_t", "bn_reestimated",
                 "has_batchnorm", "val_barrier", "label"}
        return cls(points=[dict(p) for p in d["points"]], endpoints={k: dict(v) for k, v in d["endpoints"].items()},
                   barrier=float(d["barrier"]), bn_reestimated=bool(d.get("bn_reestimated", False)),
                   val_barrier=d.get("val_barrier"), barrier_t=d.get("barrier_t"),
                   has_batchnorm=bool(d.get("has_batchnorm", False)), kind=d.get("kind"),
                   label=d.get("label"), extra={k: v for k, v in d.items() if k not in known})


def barrier(ts: Sequence[float], losses: Sequence[float]) -> tuple[float, float]:
    """(the loss barrier of one path, its t): the largest `loss(t) - ((1 - t) L(A) + t L(B))`
    over the scanned points, `ts` increasing from 0 to 1 (so it is >= 0: the ends give 0)."""
    la, lb = losses[0], losses[-1]
    gaps = [l - ((1 - t) * la + t * lb) for t, l in zip(ts, losses)]
    i = max(range(len(gaps)), key=lambda j: gaps[j])
    return gaps[i], ts[i]


def scan(path: Any, model: ModelLike, loader: Iterable[Any], *, points: int = 11,
         val_loader: Iterable[Any] | None = None, bn_loader: Iterable[Any] | None = None,
         device: str | torch.device = "cpu", progress: bool | None = None,
         precision: str | None = None) -> ScanResult:
    """Evaluate `path.state_at(t)` at `points` evenly spaced t in [0, 1] (both ends included).

    `model`: an `nn.Module` (deep-copied once; the caller's model is not changed), a
    zero-argument callable or a `ModelSpec`. For a model with BatchNorm, the statistics
    are re-estimated on `bn_loader` at every point, endpoints included; without a
    `bn_loader` the states' own statistics are used and the result says
    `bn_reestimated=False` (a warning is logged). `precision`: as in `evaluate`.
    """
    check_count(points, "points", minimum=2)  # the two endpoints
    net = as_factory(model)()
    fast_layout(net, loader, device=device)  # a private copy: channels_last on CPU where it is faster
    bn = has_batchnorm(net)
    reestimate = bn and bn_loader is not None
    if bn and not reestimate:
        log.warning("the model has BatchNorm but no data to re-estimate its statistics was given; "
                    "points are evaluated with the statistics stored in the path's states")
    ts = [i / (points - 1) for i in range(points)]
    rows: list[dict[str, Any]] = []
    bar = tqdm(dist_.shard(ts), desc=f"scan {getattr(path, 'kind', 'path')}", unit="point", file=sys.stderr,
               disable=None if progress is None else not progress)
    try:
        for t in bar:
            m = evaluate_state(net, path.state_at(t), loader, bn_loader=bn_loader if reestimate else None,
                               device=device, progress=False, precision=precision)
            row: dict[str, Any] = {"t": t, **m.to_dict()}
            if val_loader is not None:
                v = evaluate(net, val_loader, device=device, progress=False, precision=precision)
                row.update({f"val_{k}": x for k, x in v.to_dict().items()})
            rows.append(row)
    finally:
        bar.close()
    rows = dist_.gather_sharded(rows, len(ts))
    height, barrier_t = barrier(ts, [r["loss"] for r in rows])
    val_barrier = barrier(ts, [r["val_loss"] for r in rows])[0] if val_loader is not None else None
    return ScanResult(points=rows, endpoints={"A": dict(rows[0]), "B": dict(rows[-1])}, barrier=height,
                      bn_reestimated=reestimate, val_barrier=val_barrier, barrier_t=barrier_t,
                      has_batchnorm=bn, kind=getattr(path, "kind", None))
