"""Numeric precision of forward passes: ``fp32`` (default), ``bf16`` and ``fp16``.

One place decides how every model is run (curve fitting, evaluation, BatchNorm
re-estimation, alignment, the dropout path, ensemble inference):

- the weights the library *keeps* (endpoints, bends, their momenta, accumulated BatchNorm
  statistics, ensemble members) stay float32 ("master copies"); only the forward pass runs
  under `torch.autocast` in the low-precision dtype, so matrix products and convolutions
  run in bf16 / fp16 while reductions, losses and BatchNorm statistics stay float32;
- fp16 training needs loss scaling: `Precision.grad_scaler()` gives a `torch.amp.GradScaler`
  (None for fp32 / bf16, whose range is float32's); steps whose gradients overflow are
  skipped and counted by the caller.

`torch.autocast` runs bf16 and fp16 on CPU (torch >= 2.4) and on CUDA, so every path is
tested on CPU. A device without autocast support for a dtype is refused with
`BadOptionError(option="precision")` before any work.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .errors import BadOptionError

__all__ = ["PRECISIONS", "SAVE_DTYPES", "Precision", "resolve_precision", "autocast", "use_precision",
           "current_precision", "parse_dtype", "cast_floating"]

# name -> the autocast dtype (None: no autocast)
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# --save-dtype / load(dtype=) names
SAVE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# what `precision=None` means: "fp32" unless a `use_precision` block (the CLI's --precision) says otherwise
_DEFAULT: contextvars.ContextVar[str] = contextvars.ContextVar("mcensemble_precision", default="fp32")
_CHANNELS_LAST: contextvars.ContextVar[bool] = contextvars.ContextVar("mcensemble_channels_last", default=False)
_DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}


@dataclass(frozen=True)
class Precision:
    """How forward passes run: `name` ("fp32" / "bf16" / "fp16") on `device_type`;
    `channels_last`: 4-D inputs are given to the model in channels_last memory format (the
    convolutions then run in it)."""

    name: str = "fp32"
    device_type: str = "cpu"
    channels_last: bool = False

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype, None for fp32."""
        return PRECISIONS[self.name]

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    def autocast(self) -> contextlib.AbstractContextManager:
        """`torch.autocast(device_type, dtype)` for bf16 / fp16; a no-op context for fp32."""
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def input(self, x: Any) -> Any:
        """`x` as the model gets it: a 4-D tensor in channels_last format when asked."""
        if self.channels_last and isinstance(x, torch.Tensor) and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A dynamic loss scaler for fp16 training (None otherwise: bf16 has float32's range)."""
        if self.name != "fp16":
            return None
        return torch.amp.GradScaler(self.device_type)


def _device_type(device: Any) -> str:
    if device is None:
        return "cpu"
    return torch.device(device).type


def resolve_precision(precision: "str | Precision | None", device: Any = "cpu") -> Precision:
    """The `Precision` for a name ("fp32", "bf16", "fp16"; None -> `current_precision()`,
    fp32 unless inside `use_precision`) on `device`.

    `BadOptionError(option="precision")` for an unknown name, or when the device has no
    autocast for that dtype (the message says which precision to use instead)."""
    if isinstance(precision, Precision):
        return precision
    channels_last = _CHANNELS_LAST.get()
    name = _DEFAULT.get() if precision is None else _DTYPE_ALIASES.get(str(precision).lower(), str(precision).lower())
    if name not in PRECISIONS:
        raise BadOptionError(f"`precision` must be one of {', '.join(PRECISIONS)}, got {precision!r}",
                             option="precision")
    dtype_name = _device_type(device)
    prec = Precision(name, dtype_name, channels_last)
    if prec.enabled:
        if not torch.amp.autocast_mode.is_autocast_available(dtype_name):
            raise BadOptionError(f"`precision` {name}: this torch has no autocast on {dtype_name!r} devices; "
                                 "use `precision` fp32", option="precision")
        try:
            with prec.autocast():
                pass
        except (RuntimeError, AssertionError) as e:  # torch warns+disables or raises for unsupported dtypes
            raise BadOptionError(f"`precision` {name} is not supported on {dtype_name!r} by this torch ({e}); "
                                 "use `precision` fp32 or bf16", option="precision") from e
    return prec


def current_precision() -> str:
    """The precision that `precision=None` stands for here ("fp32" outside `use_precision`)."""
    return _DEFAULT.get()


@contextlib.contextmanager
def use_precision(precision: str | None, *, channels_last: bool = False) -> Iterator[str]:
    """Inside the block, every library call given no `precision=` runs its forward passes at
    `precision`, with 4-D inputs in channels_last format if `channels_last` (the CLI's
    `--precision` / `--channels-last` wrap a whole command in it). Validated first."""
    name = resolve_precision(precision or "fp32").name
    token, token_cl = _DEFAULT.set(name), _CHANNELS_LAST.set(bool(channels_last))
    try:
        yield name
    finally:
        _CHANNELS_LAST.reset(token_cl)
        _DEFAULT.reset(token)


@contextlib.contextmanager
def autocast(precision: "str | Precision | None", device: Any = "cpu") -> Iterator[Precision]:
    """Context manager: run the body's forward passes at `precision` on `device`."""
    prec = resolve_precision(precision, device)
    with prec.autocast():
        yield prec


def parse_dtype(dtype: "str | torch.dtype | None", *, option: str = "dtype") -> torch.dtype | None:
    """A floating dtype from "fp32" / "bf16" / "fp16" (or "float32", "bfloat16", "float16",
    "half", or a torch.dtype among those); None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and dtype not in SAVE_DTYPES.values():
            raise BadOptionError(f"{option} must be float32, bfloat16 or float16, got {dtype}", option=option)
        return dtype
    name = _DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if name not in SAVE_DTYPES:
        raise BadOptionError(f"{option} must be one of {', '.join(SAVE_DTYPES)}, got {dtype!r}", option=option)
    return SAVE_DTYPES[name]


def cast_floating(state: "dict[str, torch.Tensor]", dtype: torch.dtype | None) -> "dict[str, torch.Tensor]":
    """A new dict with the floating tensors of `state` in `dtype` (others, and everything
    when `dtype` is None, unchanged; the input is not modified)."""
    if dtype is None:
        return dict(state)
    return {k: (v.to(dtype) if v.is_floating_point() and v.dtype != dtype else v) for k, v in state.items()}
