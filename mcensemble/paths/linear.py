"""The straight line between two endpoints: theta(t) = (1 - t) A + t B."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from .base import ModePath, StateDict, check_same_layout, register_path

__all__ = ["LinearPath", "interpolate", "lerp_tensor"]


def interpolate(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], t: float) -> StateDict:
    """`(1 - t) * a + t * b` for floating tensors (computed in float32 for half / bfloat16,
    then cast back); non-floating tensors (e.g. `num_batches_tracked`) are a's for t < 0.5,
    else b's. t = 0 / t = 1 return clones of a / b, bit for bit."""
    if t == 0.0:
        return {k: v.clone() for k, v in a.items()}
    if t == 1.0:
        return {k: v.clone() for k, v in b.items()}
    return {k: lerp_tensor(va, b[k], t) for k, va in a.items()}


def lerp_tensor(a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    """The one interpolation of two tensors every path uses: `(1 - w) a + w b` (`torch.lerp`)
    for floating tensors, computed in float32 for float16 / bfloat16 and cast back; other
    tensors (integer counters such as BatchNorm's `num_batches_tracked`, bools) are a copy of
    a's for w < 0.5, else of b's (never a float). A fresh tensor in every case."""
    if a.is_complex():
        return (1.0 - w) * a + w * b
    if not a.is_floating_point():
        return (a if w < 0.5 else b).clone()
    if a.dtype in (torch.float16, torch.bfloat16):
        return torch.lerp(a.float(), b.float(), w).to(a.dtype)
    return torch.lerp(a, b, w)


@register_path("linear")
class LinearPath(ModePath):
    """The straight line from state dict `a` (t = 0) to `b` (t = 1).

    `a` and `b` must have the same keys, shapes and dtypes (else
    `ArchitectureMismatchError` naming the first differing tensor). Their tensors are
    copied, so later in-place changes to a model do not move the path.
    """

    vertex_t = [0.0, 1.0]

    def __init__(self, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], *,
                 metadata: Mapping[str, Any] | None = None, copy: bool = True):
        check_same_layout(a, b)
        super().__init__({"endpoint.0": a, "endpoint.1": b}, metadata=metadata, copy=copy)
        self.vertex_t = [0.0, 1.0]

    def _state_at(self, t: float) -> StateDict:
        a, b = self.endpoints
        return interpolate(a, b, t)

    @classmethod
    def from_options(cls, net, a, b, *, config=None, opts, data, fit_loader, bn_loader, index: int = 0,
                     graph=None) -> "LinearPath":
        """`build --method linear`: the straight line (nothing to fit)."""
        return cls(a, b)

    @classmethod
    def _from_file(cls, groups: dict[str, StateDict], meta: dict[str, Any]) -> "LinearPath":
        return cls(groups["endpoint.0"], groups["endpoint.1"], metadata=meta, copy=False)
