"""Training-loop hooks: channel dropout over the unit graph (snapshots and fast geometric
ensembling live in `mcensemble.snapshots`).

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
import numbers
from typing import Any, Iterable

import torch
import torch.nn as nn

from .bn import batch_input
from .data import example_input as guess_input
from .errors import BadOptionError, UnitGraphError
from .units import UnitGraph, build_unit_graph

__all__ = ["channel_dropout", "ChannelDropoutHandle", "example_batch"]

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


def channel_dropout(model: nn.Module, p: float = 0.5, *, graph=None, example_input=None) -> ChannelDropoutHandle:
    """Drop whole hidden units of every unit group with probability `p` in train mode.

    `graph`: a `UnitGraph` (or anything `build_unit_graph(graph=...)` takes: its dict
    form, a list of `UnitGroup`, a JSON file) to restrict or correct what is dropped;
    otherwise the graph is derived by tracing `model` on `example_input` (None: an input
    guessed from the model, as `align` does: `data.example_input(model)`, run in eval mode;
    `DataSpecError` when no shape fits, then pass one batch). Returns a
    `ChannelDropoutHandle`; `handle.remove()` restores the model exactly.
    """
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= float(p) < 1.0:
        raise BadOptionError(f"channel dropout probability p must be in [0, 1), got p={p!r}",
                             option="p")
    if graph is None and example_input is None:
        example_input = guess_input(model)
    return ChannelDropoutHandle(model, build_unit_graph(model, example_input, graph=graph), p)


# ----------------------------------------------------------------------------- for trainer plugins
def example_batch(loader: Iterable | None, device: torch.device | str, *, n: int = 2) -> torch.Tensor:
    """The first `n` inputs of `loader`'s first batch, on `device`: what tracing the unit graph
    for channel dropout needs when no example input was given."""
    if loader is None:
        raise BadOptionError("channel dropout needs example_input= or a training dataloader",
                             option="example_input")
    return batch_input(next(iter(loader)))[:n].to(device)
