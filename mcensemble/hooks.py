"""Training-loop hooks: channel dropout over the unit graph, and a snapshot collector for
fast geometric ensembling (`SnapshotCollector`, at the end of this module).

`channel_dropout(model, p)` drops whole hidden units (MLP neurons, CNN channels) of every
group of the unit graph during training, the way an `nn.Dropout2d` (`nn.Dropout` for
neurons) placed after the group's activation would: one Bernoulli mask per sample and
group per forward pass, the kept units scaled by 1 / (1 - p). The mask is applied where
the units *enter their consumers* (the layers that mix them into other units: dense
convolutions and Linear layers, the classifier included), through forward pre-hooks that
multiply the consumer's input. Every consumer of a group sees the same mask in one
forward pass, so:

- a residual-stream group (ResNet stage, ConvNeXt stage) is dropped at the input of every
  block and downsample layer that reads the stream, with one shared mask; the identity
  path itself is not masked, so a dropped channel still flows along the stream and is
  silenced only where a layer reads it (Kuditipudi et al.'s dropout: zero the outgoing
  weights of the dropped units);
- per-unit ops inside a group (BatchNorm, depthwise convolutions, squeeze-excite gating)
  are left alone; the units are dropped at the squeeze-excite reduce conv and at the
  projection conv, with the same mask;
- after a Flatten a dropped channel zeroes its whole block of columns.

Eval mode is untouched bit-for-bit (the hooks return early), and `handle.remove()` leaves
no hook behind; the model's state dict is never changed.
"""
from __future__ import annotations

import logging
import math
import numbers
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn as nn

from .errors import BadOptionError
from .units import UnitGraph, UnitGraphError, build_unit_graph

__all__ = ["channel_dropout", "ChannelDropoutHandle", "SnapshotCollector", "fge_lr", "fge_train",
           "network_in", "example_batch", "fge_collector", "save_snapshots"]

logger = logging.getLogger(__name__)

# consumer module type -> the axis of its input that holds the units (MRO lookup)
_UNIT_AXIS = {nn.Linear: -1, nn.modules.conv._ConvNd: 1}


def _unit_axis(module: nn.Module, name: str) -> int:
    for cls in type(module).__mro__:
        if cls in _UNIT_AXIS:
            return _UNIT_AXIS[cls]
    raise UnitGraphError(f"channel dropout cannot hook consumer {name!r} "
                         f"({type(module).__name__}): only Linear and convolution layers "
                         f"are supported")


class ChannelDropoutHandle:
    """What `channel_dropout` returns: `remove()` (idempotent) takes every hook off;
    also a context manager. `p`, `graph` and `consumers` (module name -> list of
    (group name, units, block, offset)) describe what is dropped where."""

    def __init__(self, model: nn.Module, graph: UnitGraph, p: float):
        self.model, self.graph, self.p = model, graph, float(p)
        self.consumers: dict[str, list[tuple[str, int, int, int]]] = {}
        for g in graph.groups:
            for r in g.refs("consumer"):
                if r.axis != 1:
                    raise UnitGraphError(f"consumer member {r.tensor!r} of group {g.name!r} "
                                         f"uses axis {r.axis}; channel dropout needs axis 1")
                self.consumers.setdefault(r.module, []).append((g.name, g.size, r.block, r.offset))
        self._masks: dict[str, torch.Tensor] = {}
        hooked = []
        for name, entries in self.consumers.items():  # check every consumer before hooking any
            try:
                module = model.get_submodule(name)
            except AttributeError as e:
                raise UnitGraphError(f"unit graph names consumer {name!r}, which the model "
                                     f"does not have") from e
            hooked.append((module, entries, _unit_axis(module, name)))
        self._handles = [model.register_forward_pre_hook(self._new_pass)]
        for module, entries, axis in hooked:
            self._handles.append(module.register_forward_pre_hook(self._hook(entries, axis)))

    def _new_pass(self, module, args) -> None:
        self._masks.clear()

    def _mask(self, group: str, size: int, x: torch.Tensor) -> torch.Tensor:
        m = self._masks.get(group)
        if m is None or m.shape[0] != x.shape[0] or m.device != x.device or m.dtype != x.dtype:
            m = torch.empty(x.shape[0], size, device=x.device, dtype=x.dtype)
            m = m.bernoulli_(1.0 - self.p).div_(1.0 - self.p)
            self._masks[group] = m
        return m

    def _hook(self, entries: list[tuple[str, int, int, int]], axis: int):
        def pre_hook(module: nn.Module, args: tuple) -> Any:
            if not module.training or self.p == 0.0 or not args or not torch.is_tensor(args[0]):
                return None
            x = args[0]
            mask = x.new_ones(x.shape[0], x.shape[axis])
            for group, size, block, offset in entries:
                m = self._mask(group, size, x)
                mask[:, offset:offset + size * block] = m.repeat_interleave(block, dim=1)
            shape = [x.shape[0]] + [1] * (x.dim() - 1)
            shape[axis] = x.shape[axis]
            return (x * mask.view(shape), *args[1:])
        return pre_hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._masks.clear()

    def __enter__(self) -> "ChannelDropoutHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def channel_dropout(model: nn.Module, p: float = 0.5, *, groups=None,
                    example_input=None) -> ChannelDropoutHandle:
    """Drop whole hidden units of every unit group with probability `p` in train mode.

    `groups`: a `UnitGraph` (or anything `build_unit_graph(groups=...)` takes: its dict
    form, a list of `UnitGroup`, a JSON file) to restrict or correct what is dropped;
    otherwise the graph is derived by tracing `model` on `example_input`. Returns a
    `ChannelDropoutHandle`; `handle.remove()` restores the model exactly.
    """
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= float(p) < 1.0:
        raise BadOptionError(f"channel dropout probability p must be in [0, 1), got p={p!r}",
                             option="p")
    if groups is None and example_input is None:
        raise BadOptionError("channel_dropout needs example_input (one input batch) to find "
                             "the unit groups, or groups=", option="example_input")
    graph = build_unit_graph(model, example_input, groups=groups)
    return ChannelDropoutHandle(model, graph, p)


# --------------------------------------------------------------------------- snapshots (FGE)

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


def _check_positive_int(value: Any, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise BadOptionError(f"{name} must be an integer >= {minimum}, got {name}={value!r}",
                             option=name)
    return int(value)


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
    `bn_loader` when given. `state_dict()` / `load_state_dict()` carry everything across a
    resume.

    Example (a complete training loop; tests/test_hooks_fge.py runs exactly this)::

        import torch
        import torch.nn.functional as F
        import mcensemble
        from mcensemble.data import create_loader
        from mcensemble.hooks import SnapshotCollector
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

        ens = mcensemble.load("fge.safetensors")      # an nn.Module with 4 members
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
        self.start = _check_positive_int(start, "start", minimum=0)
        self.max_snapshots = (None if max_snapshots is None
                              else _check_positive_int(max_snapshots, "max_snapshots", minimum=1))
        self.cycle_steps = None if cycle_steps is None else \
            _check_positive_int(cycle_steps, "cycle_steps", minimum=2)
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

    def member_states(self, *, bn_loader: Iterable | None = None,
                      bn_max_batches: int | None = None) -> list[dict[str, torch.Tensor]]:
        """The snapshots, each with BatchNorm statistics re-estimated on `bn_loader` when
        given (`mcensemble.bn.update_bn`, run on `model` itself, whose own weights are put
        back afterwards)."""
        from .bn import has_batchnorm, update_bn
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
                update_bn(model, bn_loader, max_batches=bn_max_batches, progress=False)
                out.append({k: v.detach().to(self.device, copy=True)
                            for k, v in model.state_dict().items()})
        finally:
            model.load_state_dict(own)
        return out

    def save(self, file: str | os.PathLike, *, model_spec=None, bn_loader: Iterable | None = None,
             bn_max_batches: int | None = None, sources: Iterable = (),
             extra: Mapping[str, Any] | None = None) -> Path:
        """Write the snapshots as an ensemble file (`mcensemble.load` reads it; pass
        `model_spec` - a `ModelSpec` or its dict - so that it loads without `model=`).
        Members are `{"t": None, "kind": "snapshot", "step": ..., ...}` in snapshot order."""
        from .ensemble import save_ensemble
        states = self.member_states(bn_loader=bn_loader, bn_max_batches=bn_max_batches)
        from .bn import has_batchnorm
        bn = None if not has_batchnorm(self.model) else \
            "re-estimated" if bn_loader is not None else "as trained"
        members = [{"t": None, "kind": "snapshot", "bn": bn, **info} for info in self.info]
        schedule = {"cycle_steps": self.cycle_steps, "lr_max": self.lr_max, "lr_min": self.lr_min,
                    "start": self.start, "steps": self.step_count}
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


def fge_train(model: nn.Module, loader: Iterable, *, cycles: int = 4, epochs: int = 8,
              lr_max: float = 0.05, lr_min: float | None = None, momentum: float = 0.9,
              weight_decay: float = 5e-4, device: str | torch.device = "cpu", seed: int = 0,
              progress: bool | None = None, hook=None) -> SnapshotCollector:
    """Fast geometric ensembling from a trained `model` (trained further in place): `epochs`
    epochs over `loader` split into `cycles` equal cycles (SGD with Nesterov momentum, cross
    entropy), one snapshot per cycle. `lr_min` defaults to `lr_max / 100`. `hook(model)` may
    return a handle with `.remove()` (e.g. channel dropout), removed at the end. Returns the
    collector: `col.save(file, model_spec=..., bn_loader=...)` writes the ensemble."""
    import sys
    import torch.nn.functional as F
    from tqdm.auto import tqdm
    from .bn import labelled_batch
    cycles = _check_positive_int(cycles, "cycles", minimum=1)
    epochs = _check_positive_int(epochs, "epochs", minimum=1)
    cycle = epochs * len(loader) // cycles  # type: ignore[arg-type]
    if cycle < 2:
        raise BadOptionError(f"{epochs} epoch(s) of {len(loader)} batch(es) make cycles of "  # type: ignore[arg-type]
                             f"{cycle} step(s) for {cycles} cycles; FGE needs at least 2 steps "
                             "per cycle: give more epochs or fewer members", option="epochs")
    torch.set_flush_denormal(True)
    torch.manual_seed(seed)
    model.to(device).train()
    lr_min = lr_max / 100.0 if lr_min is None else lr_min
    opt = torch.optim.SGD(model.parameters(), lr=lr_max, momentum=momentum,
                          weight_decay=weight_decay, nesterov=momentum > 0)
    col = SnapshotCollector(model, opt, cycle_steps=cycle, lr_max=lr_max, lr_min=lr_min)
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
                loss = F.cross_entropy(model(x.to(device)), y.to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                taken = col.step()
                if taken is not None:
                    taken["epoch"] = epoch
                bar.update()
    finally:
        bar.close()
        if handle is not None:
            handle.remove()
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


def example_batch(loader: Iterable | None, device: torch.device | str, *, n: int = 2) -> torch.Tensor:
    """The first `n` inputs of `loader`'s first batch, on `device`: what tracing the unit graph
    for channel dropout needs when no example input was given."""
    from .bn import batch_input
    if loader is None:
        raise BadOptionError("channel dropout needs example_input= or a training dataloader",
                             option="example_input")
    return batch_input(next(iter(loader)))[:n].to(device)


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


def save_snapshots(col: SnapshotCollector, out, *, who: str, model_spec=None, bn_loader=None,
                   bn_max_batches: int | None = None, extra: Mapping[str, Any] | None = None):
    """End of training in a plugin: write the collected snapshots as an ensemble file (BN
    re-estimated on `bn_loader`), or warn and write nothing when none was taken. Returns the
    file written, or None."""
    if not len(col):
        logger.warning("%s: no snapshot was taken (training too short for the schedule?); no ensemble "
                       "written", who)
        return None
    path = col.save(out, model_spec=model_spec, bn_loader=bn_loader, bn_max_batches=bn_max_batches, extra=extra)
    logger.info("%s: wrote %d-member ensemble to %s", who, len(col), out)
    return path
