"""Trained curves between two endpoints: Bezier curves and polygonal chains.

Both kinds have control points ``P_0 = A, P_1 .. P_n (the bends), P_{n+1} = B`` and
``theta(t) = sum_i c_i(t) P_i``:

- **Bezier** (``"bezier"``): ``c_i(t) = C(n+1, i) t^i (1-t)^(n+1-i)``.
- **PolyChain** (``"polychain"``): piecewise linear through A, the bends and B at
  equally spaced ``t`` (``vertices = [0, 1/(n+1), ..., 1]``); at most two ``c_i`` are non-zero.

Every floating tensor of the state dict (parameters and floating buffers, e.g. BatchNorm
running statistics) has bends. Bends of buffers are not trained by `fit_curve`: they stay on
the straight line, so the running statistics at an interior t are only a raw interpolation;
re-estimate them (`mcensemble.bn.update_bn`) before evaluating such a point. Non-floating
buffers (e.g. ``num_batches_tracked``) are A's (B's at t = 1 exactly).

Fitting lives in `mcensemble.paths.fit` (`fit_curve`, `CurveConfig`).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, Sequence

import torch

from .._io import meta_field
from ..errors import ArchitectureMismatchError, BadOptionError
from .base import ModePath, StateDict, check_same_layout, register_path
from .linear import lerp_tensor

__all__ = ["BezierPath", "PolyChainPath", "CURVE_KINDS", "bezier_coefficients", "polychain_coefficients",
           "curve_coefficients", "straight_bends", "is_interpolated", "bend_lr_scale"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def is_interpolated(t: torch.Tensor) -> bool:
    """True for tensors that curves interpolate (floating or complex); others are copied from A."""
    return t.is_floating_point() or t.is_complex()


def bezier_coefficients(t: float, n: int) -> list[float]:
    """Weights ``C(n+1, i) t^i (1-t)^(n+1-i)``, i = 0 .. n+1, of a Bezier curve with `n` bends."""
    m = n + 1
    return [math.comb(m, i) * (t ** i) * ((1.0 - t) ** (m - i)) for i in range(m + 1)]


def _polychain_segment(t: float, n: int) -> tuple[int, float]:
    """(k, s): t lies on the segment from control point k to k+1, at fraction s in [0, 1).
    t = 1 gives (n+1, 0.0). Points within 1e-12 of a vertex snap to it."""
    m = n + 1
    x = t * m
    k = int(round(x))
    if abs(x - k) <= 1e-12 * m:
        return k, 0.0
    k = min(int(math.floor(x)), m - 1)
    return k, x - k


def polychain_coefficients(t: float, n: int) -> list[float]:
    """Weights of the n+2 control points of a polygonal chain with `n` bends at `t`."""
    k, s = _polychain_segment(t, n)
    c = [0.0] * (n + 2)
    c[k] = 1.0 - s
    if s:
        c[k + 1] = s
    return c


CURVE_KINDS = {"bezier": bezier_coefficients, "polychain": polychain_coefficients}


def curve_coefficients(kind: str, t: float, n: int) -> list[float]:
    """Weights of the control points of a curve of `kind` with `n` bends at `t`."""
    try:
        fn = CURVE_KINDS[kind]
    except KeyError:
        raise BadOptionError(f"unknown curve kind {kind!r}; choose one of {', '.join(CURVE_KINDS)}",
                             option="method") from None
    return fn(t, n)


def straight_bends(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], n: int) -> list[StateDict]:
    """`n` bends evenly spaced on the straight line from `a` to `b` (floating tensors only):
    bend i (1-based) is ``(1 - i/(n+1)) a + i/(n+1) b``. Both kinds then trace the straight line."""
    out = []
    for i in range(1, n + 1):
        w = i / (n + 1)
        out.append({k: lerp_tensor(va, b[k], w) for k, va in a.items() if is_interpolated(va)})
    return out


def _combine(controls: Sequence[Mapping[str, torch.Tensor]], coeffs: Sequence[float], key: str) -> torch.Tensor:
    """sum_i coeffs[i] * controls[i][key] over the non-zero coefficients (float32 for half types)."""
    terms = [(c, p[key]) for c, p in zip(coeffs, controls) if c != 0.0]
    if len(terms) == 1 and terms[0][0] == 1.0:
        return terms[0][1].clone()
    ref = controls[0][key]
    low = ref.dtype in _LOW_PRECISION
    acc = None
    for c, v in terms:
        v = v.float() if low else v
        acc = v * c if acc is None else acc.add_(v, alpha=c)
    if acc is None:  # cannot happen for a valid coefficient vector (they sum to 1)
        acc = torch.zeros_like(ref, dtype=torch.float32 if low else ref.dtype)
    return acc.to(ref.dtype) if low else acc


class _CurvePath(ModePath):
    """Common code of the curve kinds: control points A, bends, B (see the module doc)."""

    def __init__(self, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                 bends: Sequence[Mapping[str, torch.Tensor]], *,
                 metadata: Mapping[str, Any] | None = None, copy: bool = True):
        check_same_layout(a, b)
        if isinstance(bends, Mapping):
            bends = [bends]
        bends = list(bends)
        if len(bends) < 1:
            raise BadOptionError(f"a {self.kind} path needs at least one bend, got {len(bends)}",
                                 option="bends")
        floating = [k for k, v in a.items() if is_interpolated(v)]
        groups: dict[str, Mapping[str, torch.Tensor]] = {"endpoint.0": a, "endpoint.1": b}
        for i, bend in enumerate(bends):
            missing = [k for k in floating if k not in bend]
            if missing:
                more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
                raise ArchitectureMismatchError(
                    f"bend {i} has no tensor {missing[0]!r}{more}: every floating tensor of the "
                    "endpoints needs a value in every bend (start from straight_bends(a, b, n))")
            sub = {k: bend[k] for k in floating}
            check_same_layout({k: a[k] for k in floating}, sub, names=("A", f"bend {i}"))
            groups[f"bend.{i}"] = sub
        super().__init__(groups, metadata=metadata, copy=copy)
        self._floating = floating

    # -- structure ----------------------------------------------------------------
    @property
    def n_bends(self) -> int:
        return sum(1 for g in self.groups if g.startswith("bend."))

    @property
    def bends(self) -> list[StateDict]:
        """The bend state dicts (floating tensors only), in order. The path's own tensors."""
        return [self.groups[f"bend.{i}"] for i in range(self.n_bends)]

    @property
    def control_points(self) -> list[StateDict]:
        """``[A, bend 0, ..., bend n-1, B]``."""
        a, b = self.endpoints
        return [a, *self.bends, b]

    def coefficients(self, t: float) -> list[float]:
        """The weight of each control point (A, bends, B) at `t`; they sum to 1."""
        from .base import _check_t
        return curve_coefficients(self.kind, _check_t(t), self.n_bends)

    # -- evaluation ---------------------------------------------------------------
    def _state_at(self, t: float) -> StateDict:
        a, b = self.endpoints
        if t == 0.0:
            return {k: v.clone() for k, v in a.items()}
        if t == 1.0:
            return {k: v.clone() for k, v in b.items()}
        coeffs = curve_coefficients(self.kind, t, self.n_bends)
        controls = self.control_points
        out: StateDict = {}
        for k, va in a.items():
            out[k] = _combine(controls, coeffs, k) if is_interpolated(va) else va.clone()
        return out

    # -- building -----------------------------------------------------------------
    trained = True

    @classmethod
    def from_options(cls, net, a, b, *, opts, data, fit_loader, bn_loader, index: int = 0,
                     graph=None) -> "_CurvePath":
        """`build --method bezier / polychain`: `fit_curve` with `opts.curve` (seeded by
        `data.seed`) on the shuffled `fit_loader`; `opts.checkpoint_dir` keeps
        `curve-<index>.safetensors`."""
        from .fit import fit_curve  # fit imports this module
        cfg = dataclasses.replace(opts.curve, seed=data.seed)
        ck = None if opts.checkpoint_dir is None else os.path.join(opts.checkpoint_dir, f"curve-{index}.safetensors")
        return fit_curve(net, a, b, fit_loader, config=cfg, device=data.device, progress=data.progress,
                         checkpoint=ck, checkpoint_every=opts.checkpoint_every, resume=opts.resume)

    # -- files --------------------------------------------------------------------
    def _file_fields(self) -> dict[str, Any]:
        return {"bends": self.n_bends}

    @classmethod
    def _from_file(cls, groups: dict[str, StateDict], meta: dict[str, Any]) -> "_CurvePath":
        names = [g for g in groups if g.startswith("bend.")]
        # the count is bounded by the bend groups in the file before anything is built from it
        n = meta_field(meta, "bends", "int", default=len(names), lo=1, hi=max(len(names), 1))
        if sorted(names) != sorted(f"bend.{i}" for i in range(n)):
            raise ValueError(f"expected bend groups bend.0 .. bend.{n - 1}, found {names}")
        return cls(groups["endpoint.0"], groups["endpoint.1"], [groups[f"bend.{i}"] for i in range(n)],
                   metadata=meta, copy=False)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(bends={self.n_bends}, tensors={len(self.groups['endpoint.0'])})"


@register_path("bezier")
class BezierPath(_CurvePath):
    """Bezier curve of degree n+1 from `a` (t = 0) to `b` (t = 1), shaped by the `bends`.

    ``theta(t) = sum_i C(n+1, i) t^i (1-t)^(n+1-i) P_i`` with ``P_0 = a``, ``P_{n+1} = b``.
    `bends`: a list of n >= 1 state dicts with a value for every floating tensor of `a`.
    t = 0 / t = 1 give `a` / `b` bit for bit. `vertex_t` is None (a smooth curve).
    """

    vertex_t = None


@register_path("polychain")
class PolyChainPath(_CurvePath):
    """Polygonal chain from `a` through the `bends` to `b`, vertices equally spaced in t.

    `vertex_t` = ``[0, 1/(n+1), ..., 1]``; at a vertex the state is that control point bit
    for bit (floating tensors; non-floating ones are A's, B's at t = 1).
    """

    def __init__(self, a, b, bends, *, metadata=None, copy=True):
        super().__init__(a, b, bends, metadata=metadata, copy=copy)
        m = self.n_bends + 1
        self.vertex_t = [i / m for i in range(m + 1)]


def bend_lr_scale(kind: str, bends: int) -> float:
    """``1 / max_t sum_i c_i(t)^2`` over the bends' coefficients of a curve of `kind` with
    `bends` bends (t on a grid of 1000 (bends + 1) + 1 points, the chain's vertices included).

    A step of ``-eta * c_i(t) * g`` on every bend i (the gradient of a loss at theta(t)) moves
    theta(t) by ``-eta * sum_i c_i(t)^2 * g``: the points of the curve learn at only a fraction
    of the bends' learning rate, a quarter at t = 0.5 for one Bezier bend (2 t (1 - t) = 1/2).
    Fitting at the endpoints' own learning rate therefore trains the middle of the curve 4x
    slower than the endpoints were trained, and the fit stalls far above their loss
    (docs/benchmarks/quality.md). Multiplying the bends' learning rate by this factor makes the
    step of theta(t) at its most-moved point equal to `CurveConfig.lr`: 4 for one Bezier bend,
    about 3.6 for two, 1 for a polygonal chain (a vertex is a bend itself)."""
    n = int(bends)
    steps = 1000 * (n + 1)
    peak = max(sum(c * c for c in curve_coefficients(kind, i / steps, n)[1:-1]) for i in range(steps + 1))
    return 1.0 / peak
