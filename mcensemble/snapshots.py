"""Snapshot ensembles from one training run: `SnapshotCollector` (weight snapshots, and the
cyclical learning rate of fast geometric ensembling, FGE, Garipov et al. 2018), `fge_train`
(FGE from a trained model, what `mcensemble build --method fge` runs), and the small plan the
trainer plugins (`plugins/lightning`, `plugins/hf`) adapt: `network_in`, `fge_collector`,
`save_snapshots`, and the collector's state as a file (`write_collector_state` /
`read_collector_state`, what a plugin keeps in its trainer's checkpoints).

Framework-agnostic: a collector sees a model, an optimizer and `step()` / `snapshot()`
calls; the plugins only translate their trainer's events into those calls. Forward passes
the collector runs itself (BatchNorm re-estimation of each snapshot before saving, FGE
training) take `precision=` ("fp32" / "bf16" / "fp16", `mcensemble.precision`).
"""
from __future__ import annotations

import json
import logging
import math
import numbers
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ._io import atomic_path, read_header
from ._modes import keeps_process_state
from .bn import has_batchnorm, labelled_batch, update_bn
from .ensemble import save_ensemble
from .errors import BadOptionError, CheckpointError
from .options import check_count
from .precision import resolve_precision

__all__ = ["FgeConfig", "SnapshotCollector", "fge_lr", "fge_train", "network_in", "fge_collector", "save_snapshots",
           "check_bn_options", "write_collector_state", "read_collector_state"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FgeConfig:
    """`build --method fge`'s settings (the path kinds' flags of the same names): epochs of
    further training, split into `BuildOptions.members` cycles; lr: the cycles' top learning
    rate (their low point is lr / 100); weight_decay: SGD weight decay."""

    method: ClassVar[str] = "fge"
    flags: ClassVar[Mapping[str, str]] = {"epochs": "Epochs of further training (fge).",
                                          "lr": "Top learning rate of the cycles (fge).",
                                          "weight_decay": "Weight decay (fge)."}
    epochs: int = 20
    lr: float = 0.04
    weight_decay: float = 5e-4

    def __post_init__(self) -> None:
        check_count(self.epochs, "epochs", minimum=1)
        _check_lr(self.lr, "lr")
        _check_lr(self.weight_decay, "weight_decay")
        if self.lr == 0:
            raise BadOptionError("`lr` must be > 0, got 0", option="lr")


def fge_lr(pos: int, cycle_steps: int, lr_max: float, lr_min: float) -> float:
    """The learning rate of step `pos` (0-based, counted from the first cycle's start) of
    Garipov et al.'s cyclical schedule: with t = ((pos mod c) + 1) / c, lr falls linearly
    from `lr_max` to `lr_min` while t goes to 1/2 and climbs back to `lr_max` at t = 1.
    Step c/2 - 1 of each cycle (t = 1/2 for even c) runs at the low point."""
    c = int(cycle_steps)
    t = ((int(pos) % c) + 1) / c
    if t <= 0.5:
        return (1.0 - 2.0 * t) * lr_max + 2.0 * t * lr_min
    return (2.0 - 2.0 * t) * lr_min + (2.0 * t - 1.0) * lr_max


def _check_lr(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value < 0:
        raise BadOptionError(f"{name} must be a finite number >= 0, got {name}={value!r}", option=name)
    return float(value)


class SnapshotCollector:
    """Collect weight snapshots during training and write them as an mcensemble ensemble.

    With `cycle_steps` it runs fast geometric ensembling (FGE, Garipov et al. 2018): from step
    `start` on, every call to `step()` sets the optimizer's learning rate (all param groups)
    by a cyclical schedule (`fge_lr`: linear from `lr_max` down to `lr_min` over the first
    half of each cycle of `cycle_steps` steps, back up over the second half) and takes a
    snapshot of the weights at each cycle's low point. Steps before `start` leave the lr to
    you (ordinary training first; do not run another lr scheduler during the cycles).
    Call `step()` once after every `optimizer.step()`, or once per epoch for cycles counted
    in epochs. Without `cycle_steps` nothing is scheduled: call `snapshot()` yourself (e.g.
    at the end of each epoch).

    Snapshots are detached copies of `model.state_dict()` on `device` (CPU by default):
    `snapshots` (list of state dicts) and `info` (one dict per snapshot: `step`, `cycle`,
    `lr`, ...). `max_snapshots` keeps only the most recent ones. `save(file, ...)` writes
    them with `mcensemble.ensemble.save_ensemble`, BatchNorm statistics re-estimated on
    `bn_loader` when given (forward passes at `precision=`, "fp32" / "bf16" / "fp16").
    `state_dict()` / `load_state_dict()` carry everything across a resume.

    Example (a complete training loop; tests/test_snapshots.py runs exactly this)::

        import torch
        import torch.nn.functional as F
        import mcensemble
        from mcensemble.data import create_loader
        from mcensemble.snapshots import SnapshotCollector
        from mcensemble.models import ModelSpec, create_model

        spec = ModelSpec(arch="mce_digits_cnn", kwargs={"num_classes": 10, "in_chans": 1, "widths": [8, 16]})
        model = create_model(spec).train()
        loader = create_loader("digits", batch_size=64, shuffle=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        steps = len(loader)                           # optimizer steps per epoch
        col = SnapshotCollector(model, opt, cycle_steps=2 * steps, lr_max=0.05, lr_min=0.001,
                                start=4 * steps)      # 4 epochs at the optimizer's own lr first
        for epoch in range(12):                       # then 4 cycles of 2 epochs: 4 snapshots
            for x, y in loader:
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                col.step()                            # sets the next lr, snapshots at each low point
        col.save("fge.safetensors", model_spec=spec, bn_loader=loader)

        ens = mcensemble.load_ensemble("fge.safetensors")      # an nn.Module with 4 members
        log_probs = ens(x)                            # (B, 10): log of the mean member probability
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 cycle_steps: int | None = None, lr_max: float | None = None,
                 lr_min: float | None = None, start: int = 0, max_snapshots: int | None = None,
                 device: str | torch.device = "cpu"):
        if not isinstance(model, nn.Module):
            raise BadOptionError(f"SnapshotCollector needs an nn.Module, got {type(model).__name__}",
                                 option="model")
        self.model, self.optimizer, self.device = model, optimizer, torch.device(device)
        self.start = check_count(start, "start", minimum=0)
        self.max_snapshots = (None if max_snapshots is None
                              else check_count(max_snapshots, "max_snapshots", minimum=1))
        self.cycle_steps = None if cycle_steps is None else \
            check_count(cycle_steps, "cycle_steps", minimum=2)
        if self.cycle_steps is None:
            if lr_max is not None or lr_min is not None:
                raise BadOptionError("lr_max / lr_min set a cyclical schedule, which needs "
                                     "cycle_steps= (steps per cycle)", option="cycle_steps")
        else:
            if lr_max is None or lr_min is None:
                raise BadOptionError("cycle_steps= needs lr_max= and lr_min= (the cycle's top and "
                                     "low learning rates)", option="lr_max")
            if optimizer is None or not hasattr(optimizer, "param_groups"):
                raise BadOptionError("cycle_steps= needs the optimizer whose learning rate it "
                                     "sets (SnapshotCollector(model, optimizer, ...))",
                                     option="optimizer")
            lr_max, lr_min = _check_lr(lr_max, "lr_max"), _check_lr(lr_min, "lr_min")
            if lr_min > lr_max:
                raise BadOptionError(f"lr_min={lr_min} is above lr_max={lr_max}", option="lr_min")
        self.lr_max, self.lr_min = lr_max, lr_min
        self.step_count = 0
        self.skipped_steps = 0   # fp16 training steps whose gradients overflowed (fge_train counts them)
        self.snapshots: list[dict[str, torch.Tensor]] = []
        self.info: list[dict[str, Any]] = []
        self._apply_lr()

    # -- schedule ----------------------------------------------------------------------
    def lr_at(self, step: int) -> float | None:
        """The lr the schedule gives optimizer step `step` (0-based), None before `start`
        or without a schedule."""
        if self.cycle_steps is None or step < self.start:
            return None
        return fge_lr(step - self.start, self.cycle_steps, self.lr_max, self.lr_min)

    def is_low_point(self, step: int) -> bool:
        """True when step `step` ends at a cycle's low point (a snapshot is taken after it)."""
        return (self.cycle_steps is not None and step >= self.start
                and (step - self.start) % self.cycle_steps == self.cycle_steps // 2 - 1)

    def _apply_lr(self) -> None:
        lr = self.lr_at(self.step_count)
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr

    def step(self) -> dict[str, Any] | None:
        """Call after each optimizer step: takes a snapshot if this step ended a cycle's low
        point (returns its info dict, else None) and sets the lr of the next step."""
        n = self.step_count
        taken = None
        if self.is_low_point(n):
            taken = self.snapshot(step=n, cycle=(n - self.start) // self.cycle_steps,
                                  lr=self.lr_at(n))
        self.step_count = n + 1
        self._apply_lr()
        return taken

    # -- snapshots ---------------------------------------------------------------------
    def snapshot(self, **info: Any) -> dict[str, Any]:
        """Copy the model's current weights now (`info`: JSON-able facts to record, e.g.
        `epoch=3`); returns the snapshot's info dict."""
        state = {k: v.detach().to(self.device, copy=True) for k, v in self.model.state_dict().items()}
        record = {"step": self.step_count, **info}
        self.snapshots.append(state)
        self.info.append(record)
        if self.max_snapshots is not None and len(self.snapshots) > self.max_snapshots:
            del self.snapshots[0], self.info[0]
        logger.debug("snapshot %d taken (%s)", len(self.snapshots), record)
        return record

    def __len__(self) -> int:
        return len(self.snapshots)

    def member_states(self, *, bn_loader: Iterable | None = None, bn_max_batches: int | None = None,
                      precision: str | None = None) -> list[dict[str, torch.Tensor]]:
        """The snapshots, each with BatchNorm statistics re-estimated on `bn_loader` when
        given (`mcensemble.bn.update_bn`, run on `model` itself, whose own weights are put
        back afterwards; its forward passes at `precision`, the statistics kept float32)."""
        if not self.snapshots:
            raise BadOptionError("no snapshots taken yet: run more steps (a snapshot is taken at "
                                 "each cycle's low point) or call snapshot()", option="snapshots")
        if bn_loader is None or not has_batchnorm(self.model):
            return list(self.snapshots)
        model = self.model
        own = {k: v.detach().clone() for k, v in model.state_dict().items()}
        out = []
        try:
            for state in self.snapshots:
                model.load_state_dict(state)
                update_bn(model, bn_loader, max_batches=bn_max_batches, progress=False, precision=precision)
                out.append({k: v.detach().to(self.device, copy=True)
                            for k, v in model.state_dict().items()})
        finally:
            model.load_state_dict(own)
        return out

    def save(self, file: str | os.PathLike, *, model_spec=None, bn_loader: Iterable | None = None,
             bn_max_batches: int | None = None, sources: Iterable = (),
             extra: Mapping[str, Any] | None = None, precision: str | None = None) -> Path:
        """Write the snapshots as an ensemble file (`mcensemble.load_ensemble` reads it; pass
        `model_spec` - a `ModelSpec` or its dict - so that it loads without `model=`).
        Members are `{"t": None, "kind": "snapshot", "step": ..., ...}` in snapshot order.
        `precision`: of the BatchNorm re-estimation's forward passes."""
        states = self.member_states(bn_loader=bn_loader, bn_max_batches=bn_max_batches, precision=precision)
        bn = None if not has_batchnorm(self.model) else \
            "re-estimated" if bn_loader is not None else "as trained"
        members = [{"t": None, "kind": "snapshot", "bn": bn, **info} for info in self.info]
        schedule = {"cycle_steps": self.cycle_steps, "lr_max": self.lr_max, "lr_min": self.lr_min,
                    "start": self.start, "steps": self.step_count}
        if self.skipped_steps:
            schedule["skipped_steps"] = self.skipped_steps
        return save_ensemble(file, states, model_spec=model_spec, members=members,
                             sources=sources, extra={"snapshots": schedule, **dict(extra or {})})

    # -- resume ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: step count, schedule, snapshots and their info."""
        return {"step_count": self.step_count, "cycle_steps": self.cycle_steps,
                "lr_max": self.lr_max, "lr_min": self.lr_min, "start": self.start,
                "snapshots": [dict(s) for s in self.snapshots], "info": [dict(i) for i in self.info]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()`; the schedule must match this collector's (else
        `BadOptionError`), and the optimizer's lr is set for the next step."""
        for key in ("cycle_steps", "lr_max", "lr_min", "start"):
            if key in state and state[key] != getattr(self, key):
                raise BadOptionError(
                    f"cannot resume snapshot collection: the saved state has {key}={state[key]!r} "
                    f"but this collector has {key}={getattr(self, key)!r}", option=key)
        self.step_count = int(state.get("step_count", 0))
        self.snapshots = [{k: v.to(self.device) for k, v in s.items()}
                          for s in state.get("snapshots", [])]
        self.info = [dict(i) for i in state.get("info", [])]
        if len(self.snapshots) != len(self.info):
            raise BadOptionError(f"corrupt snapshot state: {len(self.snapshots)} snapshots but "
                                 f"{len(self.info)} info records", option="state")
        self._apply_lr()


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, prec,
                scaler: "torch.amp.GradScaler | None") -> bool:
    """One SGD step on cross entropy, the forward pass under `prec`'s autocast (the loss in
    float32). With an fp16 `scaler`: loss scaling; False when the scaled gradients overflowed
    and the step was skipped."""
    with prec.autocast():
        out = model(prec.input(x))
    loss = F.cross_entropy(out.float(), y)
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        opt.step()
        return True
    scale = scaler.get_scale()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return scaler.get_scale() >= scale   # the scaler backs off only after an overflow


@keeps_process_state
def fge_train(model: nn.Module, loader: Iterable, *, cycles: int = 4, epochs: int = 8,
              lr_max: float = 0.05, lr_min: float | None = None, momentum: float = 0.9,
              weight_decay: float = 5e-4, device: str | torch.device = "cpu", seed: int = 0,
              progress: bool | None = None, hook=None, precision: str | None = None) -> SnapshotCollector:
    """Fast geometric ensembling from a trained `model` (trained further in place): `epochs`
    epochs over `loader` split into `cycles` equal cycles (SGD with Nesterov momentum, cross
    entropy), one snapshot per cycle. `lr_min` defaults to `lr_max / 100`. `hook(model)` may
    return a handle with `.remove()` (e.g. channel dropout), removed at the end.

    `precision` ("fp32" / "bf16" / "fp16"; None: `mcensemble.precision.current_precision()`,
    fp32 unless the CLI's `--precision` says otherwise): forward passes under autocast, the
    weights and optimizer state float32; fp16 scales the loss (`torch.amp.GradScaler`), and a
    step whose gradients overflow is skipped (it still counts in the cyclical schedule) and
    counted in the collector's `skipped_steps`. Returns the collector:
    `col.save(file, model_spec=..., bn_loader=...)` writes the ensemble."""
    cycles = check_count(cycles, "cycles", minimum=1)
    epochs = check_count(epochs, "epochs", minimum=1)
    cycle = epochs * len(loader) // cycles  # type: ignore[arg-type]
    if cycle < 2:
        raise BadOptionError(f"{epochs} epoch(s) of {len(loader)} batch(es) make cycles of "  # type: ignore[arg-type]
                             f"{cycle} step(s) for {cycles} cycles; FGE needs at least 2 steps "
                             "per cycle: give more epochs or fewer members", option="epochs")
    prec = resolve_precision(precision, device)
    torch.set_flush_denormal(True)
    torch.manual_seed(seed)
    model.to(device).train()
    lr_min = lr_max / 100.0 if lr_min is None else lr_min
    opt = torch.optim.SGD(model.parameters(), lr=lr_max, momentum=momentum,
                          weight_decay=weight_decay, nesterov=momentum > 0)
    col = SnapshotCollector(model, opt, cycle_steps=cycle, lr_max=lr_max, lr_min=lr_min)
    scaler = prec.grad_scaler()
    handle = hook(model) if hook is not None else None
    total = cycles * cycle
    bar = tqdm(total=total, desc="fge", file=sys.stderr, leave=False,
               disable=None if progress is None else not progress)
    try:
        for epoch in range(epochs):
            for batch in loader:
                if col.step_count >= total:
                    break
                x, y = labelled_batch(batch, what="FGE training")
                if not _train_step(model, opt, x.to(device), y.to(device), prec, scaler):
                    col.skipped_steps += 1
                taken = col.step()
                if taken is not None:
                    taken["epoch"] = epoch
                bar.update()
    finally:
        bar.close()
        if handle is not None:
            handle.remove()
    if col.skipped_steps:
        logger.warning("fge_train: %d of %d fp16 steps skipped (gradients overflowed)", col.skipped_steps, total)
    model.eval()
    return col


# ----------------------------------------------------------------------------- for trainer plugins
def network_in(model: nn.Module, name: str | None, *, owner: str = "the model") -> nn.Module:
    """`model` itself (name None) or its submodule `name`: the network whose weights a
    plugin snapshots and drops out. A missing one -> `BadOptionError(option="module")`."""
    if name is None:
        return model
    try:
        return model.get_submodule(name)
    except AttributeError as e:
        raise BadOptionError(f"{owner} has no submodule {name!r} (module= names the network inside it)",
                             option="module") from e


def fge_collector(net: nn.Module, optimizer, *, steps_per_epoch: Callable[[], int], cycle_steps: int | None,
                  cycle_epochs: int | None, start_epoch: int, lr_max: float, lr_min: float | None,
                  max_snapshots: int | None) -> SnapshotCollector:
    """A `SnapshotCollector` on an FGE schedule counted in optimizer steps: cycles of
    `cycle_steps`, or `cycle_epochs` x `steps_per_epoch()` (only called when epochs are used),
    starting after `start_epoch` epochs."""
    per_epoch = steps_per_epoch() if (cycle_epochs or start_epoch) else 0
    cycle = cycle_steps if cycle_steps is not None else (cycle_epochs or 0) * per_epoch
    if cycle < 2:
        raise BadOptionError(f"cycle_epochs={cycle_epochs} makes cycles of {cycle} optimizer step(s); "
                             "FGE needs at least 2 (use cycle_steps=)", option="cycle_epochs")
    return SnapshotCollector(net, optimizer, cycle_steps=cycle, lr_max=lr_max, lr_min=lr_min,
                             start=start_epoch * per_epoch, max_snapshots=max_snapshots)


def check_bn_options(bn_loader: Any, bn_max_batches: Any, precision: Any) -> str | None:
    """The trainer plugins' BatchNorm-before-saving options, checked the same way in every
    plugin: `bn_loader` "train" (the trainer's training loader), an iterable of batches or
    None; `bn_max_batches` an integer >= 1 or None; `precision` None or "fp32" / "bf16" /
    "fp16" (returned as its canonical name). `BadOptionError` naming the keyword otherwise."""
    if (isinstance(bn_loader, str) and bn_loader != "train") or not (
            bn_loader is None or isinstance(bn_loader, str) or hasattr(bn_loader, "__iter__")):
        got = repr(bn_loader) if isinstance(bn_loader, str) else f"a {type(bn_loader).__name__}"
        raise BadOptionError(f"bn_loader must be 'train', an iterable of batches or None, got {got}",
                             option="bn_loader")
    if bn_max_batches is not None and (isinstance(bn_max_batches, bool) or not isinstance(
            bn_max_batches, numbers.Integral) or bn_max_batches < 1):
        raise BadOptionError(f"bn_max_batches must be an integer >= 1 or None, got {bn_max_batches!r}",
                             option="bn_max_batches")
    if precision is None:
        return None
    try:
        return resolve_precision(precision).name
    except BadOptionError as e:
        raise BadOptionError(f"precision must be 'fp32', 'bf16' or 'fp16', got {precision!r}",
                             option="precision") from e


def save_snapshots(col: SnapshotCollector, out, *, who: str, model_spec=None, bn_loader=None,
                   bn_max_batches: int | None = None, extra: Mapping[str, Any] | None = None,
                   precision: str | None = None):
    """End of training in a plugin: write the collected snapshots as an ensemble file (BN
    re-estimated on `bn_loader`, forward passes at `precision`), or warn and write nothing
    when none was taken. Returns the file written, or None."""
    if not len(col):
        logger.warning("%s: no snapshot was taken (training too short for the schedule?); no ensemble "
                       "written", who)
        return None
    path = col.save(out, model_spec=model_spec, bn_loader=bn_loader, bn_max_batches=bn_max_batches, extra=extra,
                    precision=precision)
    logger.info("%s: wrote %d-member ensemble to %s", who, len(col), out)
    return path


# ----------------------------------------------------------------------------- collector state files
def write_collector_state(file: str | os.PathLike, state: Mapping[str, Any], *, key: str,
                          extra: Mapping[str, Any] | None = None) -> Path:
    """Write `state` (a `SnapshotCollector.state_dict()`) to the safetensors `file`, atomically:
    snapshot i's tensor `name` as `snapshot.<i>.<name>`, everything else (plus `extra`, plus
    "count" and "keys") as JSON under the metadata key `key`. `read_collector_state` reads it."""
    state = dict(state)
    snaps = state.pop("snapshots")
    keys = list(snaps[0]) if snaps else []
    tensors = {}
    for i, snap in enumerate(snaps):
        if list(snap) != keys:
            raise BadOptionError("snapshots have different tensor names; cannot save them", option="state")
        for k, t in snap.items():
            tensors[f"snapshot.{i}.{k}"] = t.detach().to("cpu").contiguous().clone()
    doc = {**dict(extra or {}), "count": len(snaps), "keys": keys, **state}
    file = Path(file)
    with atomic_path(file) as tmp:
        save_file(tensors, str(tmp), metadata={key: json.dumps(doc), "format": "pt"})
    return file


def read_collector_state(file: str | os.PathLike, *, key: str) -> dict[str, Any]:
    """The document `write_collector_state` stored under `key` in `file`, with "snapshots" (a
    list of state dicts on the CPU) filled back in. `CheckpointError` naming the file when it
    is unreadable or holds no such document."""
    doc = read_header(file).document(key)
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list) or not isinstance(doc.get("count"), int):
        raise CheckpointError(f"{str(file)!r} holds no snapshot state under {key!r}")
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            doc["snapshots"] = [{k: f.get_tensor(f"snapshot.{i}.{k}") for k in doc["keys"]}
                                for i in range(doc["count"])]
    except Exception as e:
        raise CheckpointError(f"cannot read the snapshots from {str(file)!r} ({type(e).__name__}: {e})") from e
    return doc
