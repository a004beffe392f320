"""Memory layout of private work copies: channels_last where it is faster and safe.

On CPU, PyTorch's 2-D convolutions run much faster on channels_last tensors (measured on
this project's benchmark machine, one thread, batch 128, eval mode: a VGG-style BN CNN
3.3x, a timm resnet10t 1.5x; docs/benchmarks/fast_paths.md). The path constructions and
the kept-half searches evaluate one private copy of the user's model many times, so they
put that copy in channels_last when a probe batch shows it runs and gives the same logits.
The user's own model, the states read and the files written never change layout.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn as nn

from ._modes import modes_kept
from .bn import first_input

__all__ = ["fast_layout"]

#: largest relative logit deviation (of the largest logit) accepted between the layouts
RTOL = 1e-4


def _logits(out: Any) -> torch.Tensor:
    return (out[0] if isinstance(out, (tuple, list)) else out).detach().double()


@torch.no_grad()
def fast_layout(work: nn.Module, data: torch.Tensor | Iterable[Any] | None, *,
                device: str | torch.device = "cpu") -> bool:
    """Put `work` (a private copy, in eval mode) in channels_last memory format when that
    is faster and changes nothing: on CPU, for a model with 4-D convolution weights, when a
    probe batch (`data`: a batch of inputs, or a loader whose first batch is used) runs in
    both layouts with logits within `RTOL` relative of each other. Returns whether it did;
    `work` is left in its own layout otherwise (a model that calls `.view` on a
    convolution's output, for instance, raises in channels_last), and when it is to run on
    another `device` than the CPU. The probe runs in eval mode; every module's own
    `training` flag is back after."""
    if torch.device(device).type != "cpu":
        return False
    x = first_input(data)
    if x is None or not torch.is_tensor(x) or x.dim() != 4 or x.device.type != "cpu":
        return False
    if not any(isinstance(m, nn.Conv2d) for m in work.modules()):
        return False
    if any(p.device.type != "cpu" for p in work.parameters()):
        return False
    x = x[:8]
    with modes_kept(work, False):
        try:
            want = _logits(work(x))
        except Exception:  # the probe is only a test: the caller's own passes report errors
            return False
        work.to(memory_format=torch.channels_last)
        try:
            got = _logits(work(x))
            scale = max(float(want.abs().max()), 1e-12)
            ok = got.shape == want.shape and bool(torch.isfinite(got).all()) and \
                float((got - want).abs().max()) <= RTOL * scale
        except Exception:
            ok = False
        if not ok:
            work.to(memory_format=torch.contiguous_format)
    return ok
