"""The straight line between two endpoints: theta(t) = (1 - t) A + t B."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from .base import Path, StateDict, check_same_layout, register_path

__all__ = ["LinearPath", "interpolate"]


def interpolate(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], t: float) -> StateDict:
    """`(1 - t) * a + t * b` for floating tensors (computed in float32 for half / bfloat16,
    then cast back); non-floating tensors (e.g. `num_batches_tracked`) are a's for t < 0.5,
    else b's. t = 0 / t = 1 return clones of a / b, bit for bit."""
    if t == 0.0:
        return {k: v.clone() for k, v in a.items()}
    if t == 1.0:
        return {k: v.clone() for k, v in b.items()}
    out: StateDict = {}
    for k, va in a.items():
        vb = b[k]
        if va.is_floating_point() or va.is_complex():
            if va.dtype in (torch.float16, torch.bfloat16):
                out[k] = ((1.0 - t) * va.float() + t * vb.float()).to(va.dtype)
            else:
                out[k] = (1.0 - t) * va + t * vb
        else:
            out[k] = (va if t < 0.5 else vb).clone()
    return out


@register_path("linear")
class LinearPath(Path):
    """The straight line from state dict `a` (t = 0) to `b` (t = 1).

    `a` and `b` must have the same keys, shapes and dtypes (else
    `ArchitectureMismatchError` naming the first differing tensor). Their tensors are
    copied, so later in-place changes to a model do not move the path.
    """

    vertices = [0.0, 1.0]

    def __init__(self, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], *,
                 metadata: Mapping[str, Any] | None = None, copy: bool = True):
        check_same_layout(a, b)
        super().__init__({"endpoint.0": a, "endpoint.1": b}, metadata=metadata, copy=copy)
        self.vertices = [0.0, 1.0]

    def _state_at(self, t: float) -> StateDict:
        a, b = self.endpoints
        return interpolate(a, b, t)

    @classmethod
    def _from_file(cls, groups: dict[str, StateDict], meta: dict[str, Any]) -> "LinearPath":
        return cls(groups["endpoint.0"], groups["endpoint.1"], metadata=meta, copy=False)
