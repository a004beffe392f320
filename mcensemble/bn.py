"""BatchNorm statistics at any point of a path.

`update_bn` re-estimates the running statistics of every BatchNorm layer with one pass
over a loader, as `torch.optim.swa_utils.update_bn` does (reset, cumulative average,
forward passes with BN in train mode), with three differences:

- only the BatchNorm modules are switched to train mode; everything else (dropout,
  stochastic depth, ...) runs in eval mode, so the statistics are those of the network
  that will be evaluated;
- every module's `training` flag and every BN `momentum` are restored afterwards, even
  when a submodule was in a different mode than its parent, and even on error (then the
  old statistics are restored too);
- inputs are taken from tensors, `(x, y)` tuples / lists, or dicts (`"image"`,
  `"input"`, `"x"`, `"pixel_values"`, `"inputs"`, `"images"`).

`modules=` re-estimates only some BatchNorm layers (the others stay in eval mode on their
own statistics). `batch_input` / `split_batch` are the one reader of loader batches that
every module uses.
"""
from __future__ import annotations

import logging
import sys
from typing import Any, Iterable

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm import tqdm

from . import distributed as dist_
from ._modes import modes_kept
from .errors import BadOptionError, DataSpecError
from .precision import resolve_precision

__all__ = ["has_batchnorm", "update_bn", "batch_input", "split_batch", "labelled_batch", "FixedSubset"]

log = logging.getLogger(__name__)

_INPUT_KEYS = ("image", "input", "x", "pixel_values", "inputs", "images")
_LABEL_KEYS = ("label", "labels", "target", "targets", "y")


def has_batchnorm(model: nn.Module) -> bool:
    """True when any submodule of `model` is a BatchNorm layer (1d / 2d / 3d / Sync / Lazy)."""
    return any(isinstance(m, _BatchNorm) for m in model.modules())


def first_input(data: Any, n: int | None = None) -> torch.Tensor | None:
    """A probe batch: `data` itself when it is a tensor, else the inputs of the first batch
    of the loader `data` (None when it yields none, or `data` is None); its first `n`
    examples when `n` is given."""
    if data is None:
        return None
    if torch.is_tensor(data):
        x = data
    else:
        x = next((batch_input(b) for b in data), None)
        if x is None:
            return None
    return x if n is None else x[:n]


def batch_input(batch: Any) -> torch.Tensor:
    """The model input of one loader batch: the tensor itself, the first element of a
    tuple / list, or the `"image"` / `"input"` (/ `"x"`, `"pixel_values"`, `"inputs"`,
    `"images"`) entry of a dict; anything else -> `DataSpecError(option="data")`."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (list, tuple)):
        if not batch:
            raise DataSpecError("a data batch is an empty tuple/list; expected (inputs, labels)",
                                option="data")
        return batch[0]
    if isinstance(batch, dict):
        for key in _INPUT_KEYS:
            if key in batch:
                return batch[key]
        raise DataSpecError(
            f"a data batch is a dict with keys {sorted(map(str, batch))}, none of which is an input "
            f"key ({', '.join(repr(k) for k in _INPUT_KEYS)}); return (inputs, labels) tuples or "
            "name the input 'image' or 'input'", option="data")
    raise DataSpecError(
        f"a data batch is a {type(batch).__name__}; expected a tensor, an (inputs, labels) tuple "
        "or a dict with an 'image' / 'input' entry", option="data")


def split_batch(batch: Any) -> tuple[torch.Tensor, Any]:
    """(inputs, labels) of one loader batch: inputs as `batch_input` finds them; labels
    `batch[1]` of a tuple / list, a dict's `"label"` / `"labels"` / `"target"` /
    `"targets"` / `"y"` entry, else None (a bare tensor, a 1-tuple)."""
    x = batch_input(batch)
    if isinstance(batch, (list, tuple)):
        return x, (batch[1] if len(batch) > 1 else None)
    if isinstance(batch, dict):
        return x, next((batch[k] for k in _LABEL_KEYS if k in batch), None)
    return x, None


def labelled_batch(batch: Any, *, what: str = "this") -> tuple[torch.Tensor, torch.Tensor]:
    """`split_batch` for code that needs labels: (inputs, labels as a tensor); a batch
    without labels -> `DataSpecError(option="data")` saying that `what` needs them."""
    x, y = split_batch(batch)
    if y is None:
        raise DataSpecError(f"a data batch has no labels; {what} needs (inputs, labels) batches "
                            "or dicts with a 'label' / 'target' entry", option="data")
    return x, torch.as_tensor(y)


def _forward_batches(model: nn.Module, loader, *, device, max_batches, shard, progress, prec=None) -> int:
    """Run the (first `max_batches`; with `shard` = (rank, world) only this rank's) batches
    through `model`; returns how many were run."""
    seen, total = 0, None
    if max_batches is not None:
        try:
            total = min(len(loader), max_batches)  # type: ignore[arg-type]
        except TypeError:
            total = max_batches
    bar = tqdm(loader, total=total, desc="BatchNorm statistics", unit="batch", leave=False,
               file=sys.stderr, disable=None if progress is None else not progress)
    try:
        for index, batch in enumerate(bar):
            if max_batches is not None and index >= max_batches:
                break
            if shard is not None and index % shard[1] != shard[0]:
                continue
            x = batch_input(batch)
            if device is not None:
                x = x.to(device)
            if prec is None:
                model(x)
            else:
                with prec.autocast():
                    model(prec.input(x))
            seen += 1
    finally:
        bar.close()
    return seen


def _batch_shard(distributed: bool) -> tuple[int, int] | None:
    """(rank, world) when batches are split over several processes, else None."""
    if not distributed:
        return None
    return (dist_.rank(), dist_.world_size()) if dist_.is_distributed() else None


def _combine_across_processes(bns: list[_BatchNorm], seen: int) -> int:
    """Every process's BN running statistics (averages over its `seen` batches) become the
    batch-count-weighted average over the processes; returns the total batch count."""
    dev = bns[0].running_mean.device if bns[0].running_mean is not None else torch.device("cpu")
    count = torch.tensor([float(seen)], dtype=torch.float64, device=dev)
    dist_.all_reduce_sum_([count])
    total = int(count.item())
    if total == 0:
        return 0
    w = seen / total
    stats = []
    for bn in bns:
        for name in ("running_mean", "running_var"):
            t = getattr(bn, name, None)
            if t is not None:
                t.mul_(w)  # this process's share; weighted sums are added up below
                stats.append(t)
    dist_.all_reduce_sum_(stats)
    for bn in bns:
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.fill_(total)
    return total


def _bn_layers(model: nn.Module, modules: Iterable[str | nn.Module] | None) -> list[_BatchNorm]:
    """The BatchNorm layers to re-estimate: all of `model`'s, or those `modules` names (or
    gives); either way only those tracking running statistics."""
    if modules is None:
        return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if isinstance(modules, (str, nn.Module)):
        modules = [modules]
    named = dict(model.named_modules())
    name_of = {id(m): n for n, m in named.items()}
    out: list[_BatchNorm] = []
    for m in modules:
        if isinstance(m, str):
            if m not in named:
                raise BadOptionError(f"update_bn: the model has no module {m!r}; pass names from "
                                     "model.named_modules()", option="modules")
            name, m = m, named[m]
        elif id(m) in name_of:
            name = name_of[id(m)]
        else:
            raise BadOptionError(f"update_bn: a {type(m).__name__} given in modules= is not a "
                                 "submodule of the model", option="modules")
        if not isinstance(m, _BatchNorm):
            raise BadOptionError(f"update_bn: module {name!r} is a {type(m).__name__}, not a "
                                 "BatchNorm layer; pass only BatchNorm modules", option="modules")
        if m.track_running_stats and all(m is not o for o in out):
            out.append(m)
    return out


def _model_device(model: nn.Module) -> torch.device | None:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


@torch.no_grad()
def update_bn(model: nn.Module, loader: Iterable[Any], *, device: str | torch.device | None = None,
              max_batches: int | None = None, progress: bool | None = None, distributed: bool = False,
              modules: Iterable[str | nn.Module] | None = None, precision: str | None = None) -> None:
    """Re-estimate the BatchNorm running statistics of `model` (in place) on `loader`.

    `precision` ("fp32" default, "bf16", "fp16"; `mcensemble.precision`): the forward
    passes run under autocast; the statistics are accumulated in float32 (BatchNorm layers
    held in half precision are accumulated in a float32 copy, then cast back).

    Running statistics are reset and re-accumulated as a cumulative average over the
    batches (momentum None), with only the BN layers in train mode. `device`: where inputs
    are sent (default: the device of the model's first parameter). `max_batches`: stop
    after that many batches. No-op on a model without BatchNorm (or whose BN layers
    track no running statistics). A loader that yields no batch raises `DataSpecError`
    and leaves the statistics as they were. `modules`: names (as in `named_modules()`) or
    modules of the BatchNorm layers to re-estimate; every other BN layer stays in eval
    mode on its own statistics (a name that is not a BatchNorm submodule ->
    `BadOptionError(option="modules")`).

    `distributed=True` with several processes (`mcensemble.distributed`; every process
    calls it with the same weights and loader): process r runs batches r, r + world, ...
    and the statistics are then combined so that every process ends with what one process
    gives over all the batches. With momentum None, BN's running mean is the average of the
    batches' means and its running variance the average of the batches' (unbiased)
    variances, so the exact union is the average of the processes' statistics weighted by
    their batch counts (for the mean and the variance alike; `num_batches_tracked` is the
    total). No-op flag with one process.
    """
    bns = _bn_layers(model, modules)
    if not bns:
        return
    if max_batches is not None and max_batches < 1:
        raise BadOptionError(f"max_batches must be at least 1, got {max_batches}", option="max_batches")
    if device is None:
        device = _model_device(model)
    prec = resolve_precision(precision, device)

    half = [(bn, bn.running_mean.dtype) for bn in bns if prec.enabled and bn.running_mean is not None
            and bn.running_mean.dtype in (torch.float16, torch.bfloat16)]
    momenta = [(bn, bn.momentum) for bn in bns]
    saved = [(bn, {k: v.clone() for k, v in bn.named_buffers(recurse=False) if v is not None}) for bn in bns]
    with modes_kept(model):  # every module's own flag back after
        ok = False
        try:
            for bn, _ in half:
                bn.float()  # float32 master copy of the accumulated statistics
            model.eval()
            for bn in bns:
                bn.reset_running_stats()
                bn.momentum = None
                bn.train()
            shard = _batch_shard(distributed)
            seen = _forward_batches(model, loader, device=device, max_batches=max_batches, shard=shard,
                                    progress=progress, prec=prec if prec.enabled or prec.channels_last else None)
            if shard is not None:
                seen = _combine_across_processes(bns, seen)
            if seen == 0:
                raise DataSpecError("cannot re-estimate BatchNorm statistics: the data loader yielded no "
                                    "batches; give a non-empty training data set", option="data")
            log.debug("re-estimated BatchNorm statistics of %d layers on %d batches", len(bns), seen)
            ok = True
        finally:
            for bn, dtype in half:
                bn.to(dtype)
            if not ok:
                for bn, bufs in saved:
                    for k, v in bufs.items():
                        getattr(bn, k).copy_(v)
            for bn, mom in momenta:
                bn.momentum = mom


class FixedSubset:
    """A fixed subsample of a loader's batches, read once and kept: about `examples`
    examples in whole batches spread evenly over the loader (every k-th batch when the
    loader has a length, else the first batches). Iterating it yields the same batches
    every time, so searches, BatchNorm re-estimation and estimates made on it agree with
    each other. `n`: the examples it holds; `batches`: how many batches; `of`: the loader's
    batch count (None when it has no length). `examples` < 1 -> `BadOptionError`."""

    def __init__(self, loader: Iterable[Any], examples: int, *, what: str = "this job"):
        if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
            raise BadOptionError(f"a fixed subsample needs at least 1 example, got {examples!r}",
                                 option="examples")
        try:
            total = len(loader)  # type: ignore[arg-type]
        except TypeError:
            total = None
        self.of = total
        kept: list[Any] = []
        n = 0
        step = None
        for i, batch in enumerate(loader):
            if step is None:
                size = int(batch_input(batch).shape[0])
                want = max(1, -(-examples // max(size, 1)))
                step = max(1, total // want) if total else 1
            if i % step:
                continue
            kept.append(batch)
            n += int(batch_input(batch).shape[0])
            if n >= examples:
                break
        if not kept:
            raise DataSpecError(f"{what}: the data loader yielded no batches; give a non-empty data set",
                                option="data")
        self._batches, self.n = kept, n

    @property
    def batches(self) -> int:
        return len(self._batches)

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self):
        return iter(self._batches)

    def describe(self) -> str:
        """'N examples in B batches (of T)' for reports."""
        of = f" of {self.of}" if self.of is not None else ""
        return f"{self.n} examples in {self.batches} batches{of}"
