"""What the curve kinds (`paths.curves`) and their fitter (`paths.fit`) share: the
coefficients of a curve at t, the bends' learning-rate scale, and `CurveConfig`, the curve
kinds' settings. Imports no other curve module, so `curves` -> `fit` -> `fit_run` is a line,
not a circle.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from .._io import is_int as _is_int
from ..errors import BadOptionError
from .linear import lerp_tensor

__all__ = ["CURVE_KINDS", "CurveConfig", "bezier_coefficients", "polychain_coefficients", "curve_coefficients",
           "straight_bends", "is_interpolated", "bend_lr_scale", "combine_controls"]

StateDict = dict[str, torch.Tensor]

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


def combine_controls(controls: Sequence[Mapping[str, torch.Tensor]], coeffs: Sequence[float], key: str) -> torch.Tensor:
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


def is_number_or_inf(x: Any) -> bool:
    """An int or float that is not a bool (infinite allowed: each check says what it takes)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)



@dataclass(frozen=True)
class CurveConfig:
    """How to fit a curve (validated when made: `BadOptionError` naming the field).

    kind: "bezier" or "polychain"; bends: number of bends n >= 1; epochs: passes over the
    loader (one step per batch); lr: the SGD learning rate *of the curve's points*: the bends'
    own learning rate is ``lr * bend_lr_scale(kind, bends)`` (4 x lr for one Bezier bend,
    see `bend_lr_scale`), so that where the curve moves most with its bends
    (t = 0.5 for one bend) a step moves theta(t) as far as a step at `lr` moves a trained
    model. Held for the first half of the steps, then decayed linearly to 1% of it at the
    last step; momentum: SGD momentum; weight_decay: coefficient of
    ``weight_decay / 2 * ||theta(t)||^2`` (parameters at the sampled point, not the bends);
    seed: seeds the draws of t and the torch RNG used inside (dropout, shuffling), without
    disturbing the caller's RNG state; max_grad_norm: clip the total gradient norm over all
    bends (None: no clipping).
    """

    kind: str = "bezier"
    bends: int = 1
    epochs: int = 20
    lr: float = 0.04
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        validate_curve_config(self)


def validate_curve_config(config: CurveConfig) -> None:
    """Raise `BadOptionError` (naming the option) for an invalid config; `CurveConfig` runs
    it when made."""
    if config.kind not in CURVE_KINDS:
        raise BadOptionError(f"unknown curve kind {config.kind!r}; choose one of {', '.join(CURVE_KINDS)}",
                             option="method")
    if not _is_int(config.bends) or config.bends < 1:
        raise BadOptionError(f"`bends` must be an integer >= 1, got {config.bends!r}", option="bends")
    if not _is_int(config.epochs) or config.epochs < 1:
        raise BadOptionError(f"`epochs` must be an integer >= 1, got {config.epochs!r}", option="epochs")
    if not is_number_or_inf(config.lr) or not config.lr > 0 or config.lr == float("inf"):
        raise BadOptionError(f"`lr` must be a positive number, got {config.lr!r}", option="lr")
    if not is_number_or_inf(config.momentum) or not 0 <= config.momentum < 1:
        raise BadOptionError(f"`momentum` must be in [0, 1), got {config.momentum!r}", option="momentum")
    if not is_number_or_inf(config.weight_decay) or not config.weight_decay >= 0:
        raise BadOptionError(f"`weight_decay` must be >= 0, got {config.weight_decay!r}", option="weight_decay")
    if config.max_grad_norm is not None and (not is_number_or_inf(config.max_grad_norm) or not config.max_grad_norm > 0):
        raise BadOptionError(f"`max_grad_norm` must be a positive number or None, got {config.max_grad_norm!r}",
                             option="max_grad_norm")
    if not _is_int(config.seed):
        raise BadOptionError(f"`seed` must be an integer, got {config.seed!r}", option="seed")


@dataclass
class ModelOptions:
    """What the user said about the model: a timm `arch` or a `module:function` entry, and overrides."""
