"""Model specs: a timm architecture name or a `module:function` entry point -> nn.Module.

A `ModelSpec` is what files record about "how to build the model"; it is plain JSON
(`to_dict` / `from_dict`). Building a spec never imports code a *file* names unless the
caller says so (`trust_entry=True`): timm names go through timm's registry only.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import torch.nn as nn

__all__ = ["ModelSpec", "ModelLike", "create_model", "as_factory"]

ModelLike = Union[nn.Module, Callable[[], nn.Module], "ModelSpec"]


@dataclass(frozen=True)
class ModelSpec:
    """How to build a model: exactly one of `arch` (timm name) or `entry` ("module:function")."""

    arch: str | None = None
    entry: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "entry": self.entry, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        return cls(arch=d.get("arch"), entry=d.get("entry"), kwargs=dict(d.get("kwargs") or {}))

    def describe(self) -> str:
        if self.arch:
            kw = ", ".join(f"{k}={v!r}" for k, v in sorted(self.kwargs.items()))
            return f"timm:{self.arch}({kw})"
        return self.entry or "<unspecified model>"


def create_model(spec: ModelSpec, *, trust_entry: bool = True) -> nn.Module:
    """Build the model a spec describes, in eval mode, with freshly initialised weights."""
    # Minimal version; helper H2 (models/data) extends: registry check with suggestions,
    # clear errors for bad entry points, non-Module returns, etc.
    import importlib
    import timm
    if spec.arch:
        m = timm.create_model(spec.arch, pretrained=False, **spec.kwargs)
    elif spec.entry:
        if not trust_entry:
            raise RuntimeError("untrusted entry")
        mod, fn = spec.entry.split(":")
        m = getattr(importlib.import_module(mod), fn)()
    else:
        raise RuntimeError("empty spec")
    return m.eval()


def as_factory(model: ModelLike) -> Callable[[], nn.Module]:
    """Turn an nn.Module (deep-copied per call), a zero-argument callable or a ModelSpec
    into a zero-argument factory returning a fresh nn.Module."""
    if isinstance(model, ModelSpec):
        return lambda: create_model(model)
    if isinstance(model, nn.Module):
        return lambda: copy.deepcopy(model)
    if callable(model):
        return model
    from .errors import BadOptionError
    raise BadOptionError(
        f"model= must be an nn.Module, a zero-argument callable returning one, or a ModelSpec; got {type(model).__name__}",
        option="model")
