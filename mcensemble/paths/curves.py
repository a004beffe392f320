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

Fitting lives in `mcensemble.paths.fit` (`fit_curve`); the settings, `CurveConfig`, and the
coefficients in `mcensemble.paths.curve_base`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import torch

from .._io import meta_field
from ..errors import ArchitectureMismatchError, BadOptionError
from .base import ModePath, StateDict, _check_t, check_same_layout, register_path
from .curve_base import CurveConfig, combine_controls, curve_coefficients, is_interpolated
from .fit import fit_curve

__all__ = ["BezierPath", "PolyChainPath"]

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
        return curve_coefficients(self.kind, _check_t(t), self.n_bends)

    # -- evaluation ---------------------------------------------------------------
    def _state_at(self, t: float) -> StateDict:
        end = self._end_state(t)
        if end is not None:
            return end
        a = self.endpoints[0]
        coeffs = curve_coefficients(self.kind, t, self.n_bends)
        controls = self.control_points
        out: StateDict = {}
        for k, va in a.items():
            out[k] = combine_controls(controls, coeffs, k) if is_interpolated(va) else va.clone()
        return out

    # -- building -----------------------------------------------------------------
    trained = True
    has_bends = True
    align_by_default = True  # the bends start from the aligned midpoints (docs/benchmarks/quality.md)
    config_class = CurveConfig
    flags = {
        "bends": "Bends of a bezier / polychain curve.",
        "epochs": "Curve-fitting epochs (fge: epochs of further training).",
        "lr": "Curve-fitting learning rate of the curve's points: the bends step at lr / max_t sum c_i(t)^2 "
              "(4 x lr for one Bezier bend). Constant for half the steps, then linear decay to 1%.",
        "weight_decay": "Weight decay on theta(t) (neb: on each pivot).",
    }

    @classmethod
    def config_from(cls, settings: Any = None, *, seed: int | None = None) -> CurveConfig:
        """`CurveConfig.kind` is this kind (what `settings` say of it is overridden)."""
        cfg = super().config_from(settings, seed=seed)
        return cfg if cfg.kind == cls.kind else dataclasses.replace(cfg, kind=cls.kind)

    @classmethod
    def from_options(cls, net, a, b, *, config: CurveConfig, opts, data, fit_loader, bn_loader,
                     index: int = 0, graph=None) -> "_CurvePath":
        """`build --method bezier / polychain`: `fit_curve` with `config` on the shuffled
        `fit_loader`; `opts.checkpoint_dir` keeps `curve-<index>.safetensors`."""
        ck = None if opts.checkpoint_dir is None else os.path.join(opts.checkpoint_dir, f"curve-{index}.safetensors")
        return fit_curve(net, a, b, fit_loader, config=config, device=data.device, progress=data.progress,
                         checkpoint=ck, checkpoint_every=opts.checkpoint_every, resume=opts.resume)

    @classmethod
    def report_section(cls, paths: list[ModePath], config: CurveConfig) -> dict[str, Any]:
        """`{"curve": {kind, bends, epochs, lr, weight_decay, precision?, skipped_steps?}}`."""
        curve: dict[str, Any] = {"kind": config.kind, "bends": config.bends, "epochs": config.epochs,
                                 "lr": config.lr, "weight_decay": config.weight_decay}
        fits = [p.metadata.get("fit") or {} for p in paths]
        if any("precision" in f for f in fits):  # --precision bf16 / fp16; fp16: GradScaler's skipped steps
            curve["precision"] = fits[0]["precision"]
        if any("skipped_steps" in f for f in fits):
            curve["skipped_steps"] = [f.get("skipped_steps", 0) for f in fits]
        return {"curve": curve}

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
