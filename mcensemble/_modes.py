"""Module modes: run a model in one mode for a while, then give every submodule its own
`training` flag back (a submodule in another mode than its parent keeps it), errors included.
The one home of what evaluation, BatchNorm re-estimation, tracing, fitting and probing do
around the user's model."""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.nn as nn

__all__ = ["modes_kept", "process_state_kept", "keeps_process_state"]

_F = TypeVar("_F", bound=Callable[..., Any])


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


def flush_denormal_on() -> bool:
    """Whether this thread flushes denormal floats to zero now (`torch.set_flush_denormal`
    has no getter: a denormal survives a multiplication only when they are kept)."""
    tiny = torch.tensor([1e-39], dtype=torch.float32)
    return bool((tiny * 1.0)[0] == 0)


@contextlib.contextmanager
def process_state_kept() -> Iterator[None]:
    """Inside, the block may set process-wide numerics for its own sake (flush-denormal on,
    the global torch seed); on exit, however it is left, both are as they were: the caller's
    random stream goes on as if the block had not drawn from it (`torch.random.fork_rng`, the
    CPU generator and those of initialised CUDA devices)."""
    flush = flush_denormal_on()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        torch.set_flush_denormal(flush)


def keeps_process_state(fn: _F) -> _F:
    """`fn` run inside `process_state_kept()` (training entry points that seed torch and
    turn flush-denormal on: fit_curve, fge_train, train_model, AutoNEB)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with process_state_kept():
            return fn(*args, **kwargs)
    return wrapper  # type: ignore[return-value]
