"""Module modes: run a model in one mode for a while, then give every submodule its own
`training` flag back (a submodule in another mode than its parent keeps it), errors included.
The one home of what evaluation, BatchNorm re-estimation, tracing, fitting and probing do
around the user's model."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch.nn as nn

__all__ = ["modes_kept"]


@contextlib.contextmanager
def modes_kept(model: nn.Module, train: bool | None = None) -> Iterator[nn.Module]:
    """Inside, `model.train(train)` when `train` is given (False: eval mode); on exit, however
    it is left, every module's own `training` flag as it was on entry."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        if train is not None:
            model.train(train)
        yield model
    finally:
        for m, flag in flags:
            m.training = flag
