"""AutoNEB (Draxler et al. 2018): a nudged elastic band with automatic pivot insertion.

A band is a list of pivots (points of parameter space) between two fixed ends A and B; the
path is the polygonal chain through them. The unmodified model is run at every pivot with
`torch.func.functional_call`.

One step (`Band.step`): every interior pivot is evaluated on the same fresh minibatch in
train mode (the ends too, without gradient, for the tangents); its loss gradient g_i, plus
``weight_decay * theta_i``, loses its component along the improved tangent tau_i of
Henkelman and Jonsson (2000): towards the higher-loss neighbour, and at a local extremum of
the loss along the band a mix of both neighbours' unit vectors weighted by the loss
differences. Then an SGD-with-momentum update (the `torch.optim.SGD` rule) on the pivots,
and the pivots are moved back along the new polyline so that their arc-length fractions are
the target weights' cumulative sums: the infinite spring constant limit.

A run is a list of cycles ``(steps, lr)``. The first cycle inserts `insert` evenly spaced
pivots per segment; every later one evaluates each segment densely (`dense_points`
interior points, on a few fixed batches in train mode), scores each point by its loss above
the straight line between the segment's pivots divided by the spread (max - min) of the
pivot losses, and inserts a pivot at the best point of the `insert` highest-scoring
segments whose score exceeds `threshold` (that segment's target weight is split there).
Momentum buffers start at zero in every cycle.

The result is a `NebPath` (kind ``"neb"``): piecewise linear, vertices at the pivots'
``t`` = cumulative target weights, with BatchNorm statistics re-estimated at every pivot.
`fit_neb(checkpoint=..., resume=True)` saves and resumes a run (bit for bit on the same
device). Several processes (`mcensemble.distributed`): each takes its rows of every batch,
and the gradients and losses are averaged before every update, so pivots stay identical.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import asdict, dataclass
from itertools import islice
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from tqdm.auto import tqdm

from .. import distributed as dist_
from .._io import atomic_path
from .._io import is_int as _is_int
from .._io import is_number, meta_field
from .._modes import keeps_process_state, modes_kept
from ..bn import has_batchnorm, update_bn
from ..data import epoch_batches
from ..errors import BadOptionError, CheckpointError
from ..evaluate import _load_state_strict
from .base import ModePath, StateDict, check_same_layout, register_path, state_dict_sha256
from .curve_base import is_interpolated
from .fit_run import _ck_tensor, open_training_checkpoint, prepare_fit
from .linear import lerp_tensor

__all__ = ["NebConfig", "NebPath", "Band", "fit_neb", "improved_tangent_weights", "insertion_scores",
           "NEB_CHECKPOINT_FORMAT"]

log = logging.getLogger(__name__)

NEB_CHECKPOINT_FORMAT = "mcensemble-neb-checkpoint"
_NEB_CK = "AutoNEB checkpoint"


def _is_pos(x: Any) -> bool:
    return is_number(x) and x > 0


@dataclass(frozen=True)
class NebConfig:
    """An AutoNEB schedule.

    cycles: ``((steps, lr), ...)``: one entry per cycle (steps >= 1, lr > 0); insert: pivots
    added per segment by the first cycle, and the most segments that get a pivot in a later
    cycle; momentum: SGD momentum; weight_decay: added to each pivot's gradient as
    ``weight_decay * theta``; dense_points: interior points per segment evaluated before a
    later cycle; threshold: the least score a segment needs to get a pivot; max_pivots: no
    insertion beyond this many interior pivots; eval_batches: fixed batches of the loader
    the dense evaluation runs on; seed: data order and the torch RNG inside (dropout).
    The default runs in seconds on a digits-sized CNN.
    """

    cycles: tuple = ((30, 0.1), (30, 0.1), (30, 0.01))
    insert: int = 2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    dense_points: int = 9
    threshold: float = 0.1
    max_pivots: int = 8
    eval_batches: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        try:
            cycles = tuple((int(s), float(lr)) if _is_int(s) and _is_pos(lr) else (s, lr)
                           for s, lr in self.cycles)
        except (TypeError, ValueError) as e:
            raise BadOptionError(f"cycles must be a sequence of (steps, lr) pairs, got {self.cycles!r}",
                                 option="cycles") from e
        if not cycles or any(not _is_int(s) or s < 1 or not _is_pos(lr) for s, lr in cycles):
            raise BadOptionError(f"cycles must be one or more (steps >= 1, lr > 0) pairs, got {self.cycles!r}",
                                 option="cycles")
        object.__setattr__(self, "cycles", cycles)
        checks = [("insert", _is_int(self.insert) and self.insert >= 1, "an integer >= 1"),
                  ("momentum", isinstance(self.momentum, (int, float)) and not isinstance(self.momentum, bool)
                   and 0 <= self.momentum < 1, "in [0, 1)"),
                  ("weight_decay", isinstance(self.weight_decay, (int, float)) and not isinstance(self.weight_decay, bool)
                   and 0 <= self.weight_decay < math.inf, "a number >= 0"),
                  ("dense_points", _is_int(self.dense_points) and self.dense_points >= 1, "an integer >= 1"),
                  ("threshold", isinstance(self.threshold, (int, float)) and not isinstance(self.threshold, bool)
                   and math.isfinite(self.threshold), "a finite number"),
                  ("max_pivots", _is_int(self.max_pivots) and self.max_pivots >= self.insert,
                   f"an integer >= insert ({self.insert})"),
                  ("eval_batches", _is_int(self.eval_batches) and self.eval_batches >= 1, "an integer >= 1"),
                  ("seed", _is_int(self.seed), "an integer")]
        for name, ok, what in checks:
            if not ok:
                raise BadOptionError(f"NebConfig.{name} must be {what}, got {getattr(self, name)!r}", option=name)

    @property
    def total_steps(self) -> int:
        return sum(s for s, _ in self.cycles)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cycles"] = [list(c) for c in self.cycles]
        return d


# ---------------------------------------------------------------------------------------------
# the path


@register_path("neb")
class NebPath(ModePath):
    """Piecewise linear path from `a` through the `pivots` to `b`; pivot i sits at
    ``t = w_0 + ... + w_i`` (`weights`: n+1 positive segment weights summing to 1).

    `pivots`: n >= 1 state dicts with every floating tensor of `a` (BatchNorm statistics
    included: `fit_neb` stores them re-estimated). At a vertex the state is that pivot bit
    for bit (floating tensors; non-floating ones are A's, B's at t = 1)."""

    def __init__(self, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                 pivots: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], *,
                 metadata: Mapping[str, Any] | None = None, copy: bool = True):
        check_same_layout(a, b)
        pivots = list(pivots)
        w = [float(x) for x in weights]
        if len(pivots) < 1 or len(w) != len(pivots) + 1:
            raise ValueError(f"a neb path needs n >= 1 pivots and n + 1 weights, got {len(pivots)} pivots "
                             f"and {len(w)} weights")
        if any(not (x > 0 and math.isfinite(x)) for x in w) or abs(math.fsum(w) - 1.0) > 1e-6:
            raise ValueError(f"neb segment weights must be positive and sum to 1, got {w}")
        floating = [k for k, v in a.items() if is_interpolated(v)]
        groups: dict[str, Mapping[str, torch.Tensor]] = {"endpoint.0": a, "endpoint.1": b}
        for i, p in enumerate(pivots):
            sub = {k: p[k] for k in floating if k in p}
            check_same_layout({k: a[k] for k in floating}, sub, names=("A", f"pivot {i}"))
            groups[f"pivot.{i}"] = sub
        super().__init__(groups, metadata=metadata, copy=copy)
        self.weights = w
        cum, acc = [0.0], 0.0
        for x in w[:-1]:
            acc += x
            cum.append(acc)
        self.vertex_t = cum + [1.0]

    @property
    def n_pivots(self) -> int:
        return len(self.weights) - 1

    @property
    def control_points(self) -> list[StateDict]:
        a, b = self.endpoints
        return [a, *(self.groups[f"pivot.{i}"] for i in range(self.n_pivots)), b]

    def _state_at(self, t: float) -> StateDict:
        end = self._end_state(t)
        if end is not None:
            return end
        a = self.endpoints[0]
        v = self.vertex_t
        j = max(i for i in range(len(v) - 1) if v[i] <= t)
        s = (t - v[j]) / (v[j + 1] - v[j])
        pts = self.control_points
        if abs(s) <= 1e-12 or abs(1 - s) <= 1e-12:
            src = pts[j] if abs(s) <= 1e-12 else pts[j + 1]
            return {k: (src[k].clone() if is_interpolated(x) else x.clone()) for k, x in a.items()}
        out: StateDict = {}
        for k, x in a.items():
            out[k] = lerp_tensor(pts[j][k], pts[j + 1][k], s) if is_interpolated(x) else x.clone()
        return out

    trained = True

    config_class = NebConfig
    flags = {"weight_decay": "Weight decay on theta(t) (neb: on each pivot)."}

    @classmethod
    def from_options(cls, net, a, b, *, config: NebConfig, opts, data, fit_loader, bn_loader,
                     index: int = 0, graph=None) -> "NebPath":
        """`build --method neb`: `fit_neb` with `config` on the shuffled `fit_loader`, pivots'
        BN on `bn_loader`; `opts.checkpoint_dir` keeps `neb-<index>.safetensors`."""
        cfg = config
        ck = None if opts.checkpoint_dir is None else os.path.join(opts.checkpoint_dir, f"neb-{index}.safetensors")
        return fit_neb(net, a, b, fit_loader, config=cfg, bn_loader=bn_loader, device=data.device,
                       progress=data.progress, checkpoint=ck, checkpoint_every=opts.checkpoint_every,
                       resume=opts.resume)

    @classmethod
    def report_section(cls, paths: list[ModePath], config: NebConfig) -> dict[str, Any]:
        """`{"neb": [...]}`: each band's schedule and what every cycle inserted."""
        return {"neb": [p.metadata.get("neb") for p in paths]}

    def _file_fields(self) -> dict[str, Any]:
        return {"pivots": self.n_pivots, "weights": list(self.weights)}

    @classmethod
    def _from_file(cls, groups: dict[str, StateDict], meta: dict[str, Any]) -> "NebPath":
        names = [g for g in groups if g.startswith("pivot.")]
        n = meta_field(meta, "pivots", "int", lo=1, hi=max(len(names), 1))
        if sorted(names) != sorted(f"pivot.{i}" for i in range(n)):
            raise ValueError(f"expected pivot groups pivot.0 .. pivot.{n - 1}, found {names}")
        w = meta_field(meta, "weights", "number-list")
        return cls(groups["endpoint.0"], groups["endpoint.1"], [groups[f"pivot.{i}"] for i in range(n)], w,
                   metadata=meta, copy=False)

    def __repr__(self) -> str:
        return f"NebPath(pivots={self.n_pivots}, tensors={len(self.groups['endpoint.0'])})"


# ---------------------------------------------------------------------------------------------
# the band


def improved_tangent_weights(l_prev: float, l_here: float, l_next: float) -> tuple[float, float]:
    """(weight of the unit vector to the next pivot, weight of the unit vector from the
    previous one) in the improved tangent of Henkelman and Jonsson (2000)."""
    if l_next > l_here > l_prev:
        return 1.0, 0.0
    if l_next < l_here < l_prev:
        return 0.0, 1.0
    d_next, d_prev = abs(l_next - l_here), abs(l_prev - l_here)
    big, small = max(d_next, d_prev), min(d_next, d_prev)
    if big == 0.0:
        return 0.5, 0.5
    return (big, small) if l_next > l_prev else (small, big)


def insertion_scores(pivot_losses: Sequence[float], dense: Sequence[Sequence[float]], fractions: Sequence[float]
                     ) -> list[tuple[float, float]]:
    """For each segment, (best score, its fraction s): a point's score is its loss above the
    straight line between the segment's two pivots, divided by the spread of the pivot losses."""
    spread = max(pivot_losses) - min(pivot_losses)
    spread = spread if spread > 1e-12 else 1e-12
    out = []
    for j, row in enumerate(dense):
        la, lb = pivot_losses[j], pivot_losses[j + 1]
        scores = [(l - ((1 - s) * la + s * lb)) / spread for l, s in zip(row, fractions)]
        k = max(range(len(scores)), key=lambda i: scores[i])
        out.append((scores[k], fractions[k]))
    return out


def _norm(ts: Sequence[torch.Tensor]) -> float:
    if not ts:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([n.double() for n in torch._foreach_norm(list(ts))])))


def _dot(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(xs, ys)))


class Band:
    """The pivots of a NEB run and its step. `fit_neb` drives it.

    `model` must be in train mode on `device`. Holds A and B (read only), the interior
    pivots (trainable tensors only), their momentum buffers and their target weights."""

    def __init__(self, model: nn.Module, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], *,
                 momentum: float = 0.9, weight_decay: float = 5e-4, device: str | torch.device = "cpu",
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None):
        device = torch.device(device)
        self.model, self.a, self.b, self.device = model, a, b, device
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        self.loss_fn = F.cross_entropy if loss_fn is None else loss_fn
        params = dict(model.named_parameters())
        self.names = [k for k, p in params.items() if k in a and p.requires_grad and is_interpolated(a[k])]
        if not self.names:
            raise BadOptionError("the model has no trainable parameters: nothing to fit", option="model")
        self.tied = len(list(model.named_parameters(remove_duplicate=False))) != len(params)
        # everything else the model holds: A's values, private clones (BN updates them in place)
        held = set(params) | {k for k, _ in model.named_buffers()}
        self.scratch = {k: v.detach().to(device).clone() for k, v in a.items() if k not in self.names and k in held}
        self.A = [a[k].detach().to(device) for k in self.names]
        self.B = [b[k].detach().to(device) for k in self.names]
        self.pivots: list[list[torch.Tensor]] = []
        self.momenta: list[list[torch.Tensor]] = []
        self.weights: list[float] = [1.0]

    # -- structure ----------------------------------------------------------------
    def points(self) -> list[list[torch.Tensor]]:
        return [self.A, *self.pivots, self.B]

    def ts(self) -> list[float]:
        """t of every point (ends included): cumulative target weights."""
        out, acc = [0.0], 0.0
        for w in self.weights[:-1]:
            acc += w
            out.append(acc)
        return out + [1.0]

    def insert(self, segment: int, s: float) -> None:
        """A new pivot at fraction `s` of `segment` (0: A to pivot 0); its weight is split."""
        pts = self.points()
        new = [torch.lerp(x, y, s) for x, y in zip(pts[segment], pts[segment + 1])]
        self.pivots.insert(segment, new)
        w = self.weights[segment]
        self.weights[segment:segment + 1] = [w * s, w * (1 - s)]
        self.reset_momenta()

    def insert_even(self, k: int) -> None:
        """`k` evenly spaced pivots in every segment."""
        for seg in reversed(range(len(self.weights))):
            for i in range(k, 0, -1):  # from the far end, so the fractions stay those of the segment
                self.insert(seg, i / (i + 1))

    def reset_momenta(self) -> None:
        self.momenta = [[torch.zeros_like(p) for p in piv] for piv in self.pivots]

    # -- evaluation ---------------------------------------------------------------
    def _forward_loss(self, theta: Sequence[torch.Tensor], x, y) -> torch.Tensor:
        state = dict(zip(self.names, theta))
        state.update(self.scratch)
        return self.loss_fn(functional_call(self.model, state, (x,), tie_weights=self.tied), y)

    def losses_at(self, thetas: Sequence[Callable[[], Sequence[torch.Tensor]]], batches) -> list[float]:
        """Mean loss of each point (`thetas`: functions that build it) over `batches` (train
        mode, no gradient), averaged over the rows of every process."""
        sums = torch.zeros(len(thetas) + 1, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for i, make in enumerate(thetas):
                th = make()
                for batch in batches:
                    if batch is not None:
                        sums[i] += float(self._forward_loss(th, *batch)) * len(batch[0])
            sums[-1] = float(sum(len(bt[0]) for bt in batches if bt is not None))
        dist_.all_reduce_sum_([sums])
        rows = max(float(sums[-1]), 1.0)
        return [float(v) / rows for v in sums[:-1]]

    # -- the step ---------------------------------------------------------------------
    def step(self, x, y, lr: float) -> list[float]:
        """One NEB step on the batch (x None: an empty share under several processes).
        Returns the losses of every point on it, ends included."""
        n = len(self.pivots)
        rows = 0.0 if x is None else float(len(x))
        losses = torch.zeros(n + 3, dtype=torch.float64, device=self.device)
        grads = []
        for i, piv in enumerate(self.pivots):
            if x is None:
                grads.append([torch.zeros_like(p) for p in piv])
                continue
            leaves = [p.detach().requires_grad_(True) for p in piv]
            loss = self._forward_loss(leaves, x, y)
            g = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
            grads.append([gi * rows for gi in g])
            losses[i + 1] = float(loss.detach()) * rows
        if x is not None:
            with torch.no_grad():
                losses[0] = float(self._forward_loss(self.A, x, y)) * rows
                losses[n + 1] = float(self._forward_loss(self.B, x, y)) * rows
        losses[-1] = rows
        if dist_.is_distributed():
            dist_.all_reduce_sum_([g for gs in grads for g in gs] + [losses])
        total = max(float(losses[-1]), 1.0)
        with torch.no_grad():
            for g in grads:
                torch._foreach_mul_(g, 1.0 / total)
            lv = [float(v) / total for v in losses[:-1]]
            self._update(grads, lv, lr)
            self.redistribute()
        return lv

    def _update(self, grads, lv: list[float], lr: float) -> None:
        pts = self.points()
        for i, (piv, g) in enumerate(zip(self.pivots, grads), start=1):
            if self.weight_decay:
                torch._foreach_add_(g, piv, alpha=self.weight_decay)
            tau = self._tangent(pts[i - 1], piv, pts[i + 1], lv[i - 1], lv[i], lv[i + 1])
            if tau is not None:
                torch._foreach_add_(g, tau, alpha=-_dot(g, tau))
            buf = self.momenta[i - 1]
            if self.momentum:
                torch._foreach_mul_(buf, self.momentum)
            else:
                torch._foreach_zero_(buf)
            torch._foreach_add_(buf, g)
        for piv, buf in zip(self.pivots, self.momenta):  # after every tangent is taken
            torch._foreach_add_(piv, buf, alpha=-lr)

    @staticmethod
    def _tangent(prev, here, nxt, l_prev, l_here, l_next) -> list[torch.Tensor] | None:
        plus = torch._foreach_sub(list(nxt), list(here))
        minus = torch._foreach_sub(list(here), list(prev))
        n_plus, n_minus = _norm(plus), _norm(minus)
        c_plus, c_minus = improved_tangent_weights(l_prev, l_here, l_next)
        tau = [torch.zeros_like(p) for p in here]
        if n_plus > 0 and c_plus:
            torch._foreach_add_(tau, plus, alpha=c_plus / n_plus)
        if n_minus > 0 and c_minus:
            torch._foreach_add_(tau, minus, alpha=c_minus / n_minus)
        n_tau = _norm(tau)
        if n_tau == 0.0:
            return None
        torch._foreach_mul_(tau, 1.0 / n_tau)
        return tau

    def redistribute(self) -> None:
        """Move the pivots along the current polyline to arc-length fractions = their t."""
        pts = self.points()
        seg = [_norm(torch._foreach_sub(list(pts[j + 1]), list(pts[j]))) for j in range(len(pts) - 1)]
        total = sum(seg)
        if not total > 0:
            return
        cum = [0.0]
        for d in seg:
            cum.append(cum[-1] + d)
        new = []
        for t in self.ts()[1:-1]:
            d = t * total
            j = next((j for j in range(len(seg)) if cum[j + 1] >= d and seg[j] > 0), len(seg) - 1)
            s = min(max((d - cum[j]) / seg[j], 0.0), 1.0) if seg[j] > 0 else 0.0
            new.append([torch.lerp(x, y, s) for x, y in zip(pts[j], pts[j + 1])])
        for piv, nw in zip(self.pivots, new):
            torch._foreach_copy_(piv, nw)

    # -- insertion --------------------------------------------------------------------
    def dense(self, batches, points: int) -> tuple[list[float], list[list[float]], list[float]]:
        """(pivot losses, per segment the losses at `points` interior fractions, the fractions)."""
        fr = [k / (points + 1) for k in range(1, points + 1)]
        pts = self.points()

        def on_segment(j: int, s: float) -> Callable[[], list[torch.Tensor]]:
            return lambda: [torch.lerp(x, y, s) for x, y in zip(pts[j], pts[j + 1])]

        thetas: list[Callable[[], Sequence[torch.Tensor]]] = [(lambda p=p: p) for p in pts]
        thetas += [on_segment(j, s) for j in range(len(pts) - 1) for s in fr]
        ls = self.losses_at(thetas, batches)
        m = len(pts)
        return ls[:m], [ls[m + j * points: m + (j + 1) * points] for j in range(m - 1)], fr

    def state_dicts(self) -> list[StateDict]:
        """Full state dicts of the interior pivots on A's devices (floating buffers on the
        straight line at the pivot's t; tied aliases share their tensor)."""
        alias = {}
        canon = {id(p): k for k, p in self.model.named_parameters()}
        for k, p in self.model.named_parameters(remove_duplicate=False):
            if k in self.a and canon[id(p)] != k:
                alias[k] = canon[id(p)]
        out = []
        for t, piv in zip(self.ts()[1:-1], self.pivots):
            sd = {k: (lerp_tensor(v, self.b[k], t) if is_interpolated(v) else v.clone()) for k, v in self.a.items()}
            for k, p in zip(self.names, piv):
                sd[k] = p.detach().to(self.a[k].device).clone()
            for k, c in alias.items():
                sd[k] = sd[c]
            out.append(sd)
        return out


# ---------------------------------------------------------------------------------------------
# the run


@keeps_process_state
def fit_neb(model: Any, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], loader, *,
            config: NebConfig = NebConfig(), bn_loader=None, device: str | torch.device = "cpu",
            progress: bool | None = None, callback: Callable[[int, int, list[float]], Any] | None = None,
            loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
            checkpoint: str | os.PathLike | None = None, checkpoint_every: int | None = None,
            resume: bool = False) -> NebPath:
    """Run AutoNEB from state dict `a` (t = 0) to `b` (t = 1) on `loader` (module docstring).

    `model`: an `nn.Module` of the endpoints' architecture (only its structure is used; its
    training flags are restored at the end) or anything `models.as_factory` takes. `loader`
    yields ``(input, target)`` batches; its order is drawn here (`data.epoch_batches`,
    seeded by ``config.seed``). `bn_loader` (default `loader`): data on which every pivot's
    BatchNorm statistics are re-estimated at the end. `callback(cycle, step, losses)` after
    every step (losses of every point on that step's batch, ends included).
    `checkpoint`: a file saved (atomically, rank 0) at the end of every cycle and every
    `checkpoint_every` steps; `resume` continues from it (`CheckpointError` when it was
    written for other endpoints, another config or another number of processes).
    Returns a `NebPath`; `a` and `b` are never modified."""
    if not isinstance(config, NebConfig):
        raise BadOptionError(f"config must be a NebConfig, got {type(config).__name__}", option="config")
    model, device = prepare_fit(model, a, b, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                                resume=resume, device=device)
    with modes_kept(model, True):
        model.to(device)
        band = Band(model, a, b, momentum=config.momentum, weight_decay=config.weight_decay, device=device,
                    loss_fn=loss_fn)
        run = _NebRun(band, config, loader, device=device, checkpoint=checkpoint, every=checkpoint_every)
        history = run.run(resume=resume, progress=progress, callback=callback)
        pivots = band.state_dicts()
        _reestimate_bn(model, pivots, bn_loader if bn_loader is not None else loader, device)
    meta = {"neb": {**config.to_dict(), "steps": config.total_steps, "cycles_run": history}}
    if dist_.world_size() > 1:
        meta["neb"]["world_size"] = dist_.world_size()
    return NebPath(a, b, pivots, band.weights, metadata=meta)


def _reestimate_bn(model: nn.Module, pivots: list[StateDict], loader, device) -> None:
    if not has_batchnorm(model):
        return
    model.eval()
    keep = model.state_dict()
    keep = {k: v.clone() for k, v in keep.items()}
    try:
        for sd in pivots:
            _load_state_strict(model, sd)
            update_bn(model, loader, device=device, progress=False, distributed=dist_.is_distributed())
            new = model.state_dict()
            for k in sd:
                if k in new and ("running_" in k or k.endswith("num_batches_tracked")):
                    sd[k] = new[k].detach().to(sd[k].device).clone()
    finally:
        model.load_state_dict(keep)


class _NebRun:
    """The loop of `fit_neb`: cycles, insertion, data order, RNG, checkpoints."""

    def __init__(self, band: Band, config: NebConfig, loader, *, device, checkpoint, every):
        self.band, self.config, self.loader, self.device = band, config, loader, device
        self.checkpoint = None if checkpoint is None else os.fspath(checkpoint)
        self.every = every
        self.cycle, self.step, self.done, self.inserted = 0, 0, 0, False
        self.history: list[dict[str, Any]] = []
        try:
            self.spe = len(loader)
        except TypeError:
            self.spe = sum(1 for _ in loader)
        if self.spe < 1:
            raise BadOptionError("the training data loader yields no batches; check `data` and `batch_size`",
                                 option="data")

    def run(self, *, resume: bool, progress, callback) -> list[dict[str, Any]]:
        cfg = self.config
        cuda = self.device.type == "cuda"
        with torch.random.fork_rng(devices=[self.device] if cuda else [], device_type="cuda"):
            r = dist_.rank()
            torch.manual_seed(cfg.seed if r == 0 else (cfg.seed + (r << 40)) % (1 << 63))
            self._start(resume)
            eval_batches = [self._to_device(bt) for bt in islice(epoch_batches(self.loader, 0, cfg.seed),
                                                                  cfg.eval_batches)]
            bar = tqdm(total=cfg.total_steps, initial=self.done, desc="fit neb", file=sys.stderr, leave=False,
                       disable=None if progress is None else not progress)
            try:
                batches = self._batches()
                while self.cycle < len(cfg.cycles):
                    if not self.inserted:
                        self._insert(eval_batches)
                    steps, lr = cfg.cycles[self.cycle]
                    while self.step < steps:
                        x, y = next(batches) or (None, None)
                        losses = self.band.step(x, y, lr)
                        self.step += 1
                        self.done += 1
                        bar.update()
                        if callback is not None:
                            callback(self.cycle, self.step - 1, losses)
                        if self.every and self.done % self.every == 0 and self.step < steps:
                            self._save()
                    self.cycle, self.step, self.inserted = self.cycle + 1, 0, False
                    self._save()
            finally:
                bar.close()
        return self.history

    def _to_device(self, batch):
        if batch is None:
            return None
        x, y = batch
        if y is None:
            raise BadOptionError("AutoNEB needs (input, target) batches; the loader gives inputs only",
                                 option="data")
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _batches(self) -> Iterator:
        epoch, skip = divmod(self.done, self.spe)
        while True:
            for batch in epoch_batches(self.loader, epoch, self.config.seed, skip=skip):
                yield self._to_device(batch)
            epoch, skip = epoch + 1, 0

    def _insert(self, eval_batches) -> None:
        band, cfg = self.band, self.config
        entry: dict[str, Any] = {"cycle": self.cycle, "inserted": []}
        if not band.pivots:
            band.insert_even(cfg.insert)
            entry["inserted"] = band.ts()[1:-1]
        else:
            pl, dense, fr = band.dense(eval_batches, cfg.dense_points)
            scores = insertion_scores(pl, dense, fr)
            entry["max_dense_loss"] = max(max(pl), *(max(r) for r in dense))
            entry["scores"] = [s for s, _ in scores]
            room = cfg.max_pivots - len(band.pivots)
            best = sorted((j for j, (s, _) in enumerate(scores) if s > cfg.threshold),
                          key=lambda j: -scores[j][0])[:max(min(cfg.insert, room), 0)]
            for j in sorted(best, reverse=True):
                t0, t1 = band.ts()[j], band.ts()[j + 1]
                band.insert(j, scores[j][1])
                entry["inserted"].append(t0 + scores[j][1] * (t1 - t0))
            entry["inserted"].sort()
        band.reset_momenta()
        entry["pivots"] = len(band.pivots)
        self.history.append(entry)
        self.inserted = True

    # -- checkpoints --------------------------------------------------------------
    def _hashes(self) -> list[str]:
        return [state_dict_sha256(self.band.a), state_dict_sha256(self.band.b)]

    def _save(self) -> None:
        if self.checkpoint is None:
            return
        mine = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            mine["cuda"] = torch.cuda.get_rng_state(self.device)
        rng = dist_.gather_objects(mine)  # a collective: every process takes part
        if not dist_.is_main():
            return
        from safetensors.torch import save_file

        band = self.band
        tensors = {f"rng.{k}.{r}": v for r, states in enumerate(rng) for k, v in states.items()}
        for i, (piv, buf) in enumerate(zip(band.pivots, band.momenta)):
            tensors.update({f"pivot.{i}.{k}": v.detach().cpu().clone() for k, v in zip(band.names, piv)})
            tensors.update({f"momentum.{i}.{k}": v.detach().cpu().clone() for k, v in zip(band.names, buf)})
        meta = {"format": NEB_CHECKPOINT_FORMAT, "format_version": 1, "cycle": self.cycle, "step": self.step,
                "done": self.done, "inserted": self.inserted, "weights": band.weights, "history": self.history,
                "world_size": dist_.world_size(), "finished": self.cycle >= len(self.config.cycles),
                "config": self.config.to_dict(), "endpoints_sha256": self._hashes(), "steps_per_epoch": self.spe}
        with atomic_path(self.checkpoint) as tmp:
            save_file(tensors, str(tmp), metadata={"mcensemble": json.dumps(meta)})

    def _start(self, resume: bool) -> None:
        ck = self.checkpoint
        if ck is None or not os.path.exists(ck):
            if resume:
                log.warning("no AutoNEB checkpoint at %s: starting from the beginning", ck)
            return
        if not resume:
            raise BadOptionError(f"{ck} already holds an AutoNEB run; pass `resume` to continue it, or choose "
                                 "another `checkpoint`", option="resume")
        tensors, meta = read_neb_checkpoint(ck)
        self._check(meta)
        band, r = self.band, dist_.rank()
        n = len(meta["weights"]) - 1
        pivots, momenta = [], []
        for i in range(n):
            pivots.append([_ck_tensor(tensors, f"pivot.{i}.{k}", p, ck, what=_NEB_CK).to(self.device).clone()
                           for k, p in zip(band.names, band.A)])
            momenta.append([_ck_tensor(tensors, f"momentum.{i}.{k}", p, ck, what=_NEB_CK).to(self.device).clone()
                            for k, p in zip(band.names, band.A)])
        state = _ck_tensor(tensors, f"rng.torch.{r}", None, ck, what=_NEB_CK)
        try:
            torch.set_rng_state(state)
            if self.device.type == "cuda" and f"rng.cuda.{r}" in tensors:
                torch.cuda.set_rng_state(tensors[f"rng.cuda.{r}"], self.device)
        except (RuntimeError, ValueError, TypeError) as e:
            raise CheckpointError(f"the AutoNEB checkpoint {ck} has a damaged random state ({e}); choose "
                                  "another `checkpoint`") from e
        band.pivots, band.momenta, band.weights = pivots, momenta, [float(w) for w in meta["weights"]]
        self.cycle, self.step, self.done = meta["cycle"], meta["step"], meta["done"]
        self.inserted, self.history = bool(meta["inserted"]), list(meta.get("history") or [])
        log.info("resuming AutoNEB from %s at cycle %d, step %d", ck, self.cycle, self.step)

    def _check(self, meta: Mapping[str, Any]) -> None:
        ck, hint = self.checkpoint, "resume with the same checkpoints and options, or choose another `checkpoint`"
        if list(meta["endpoints_sha256"]) != self._hashes():
            raise CheckpointError(f"the AutoNEB checkpoint {ck} was written for other endpoints; {hint}")
        saved, now = meta["config"], self.config.to_dict()
        for k in now:
            if saved.get(k) != now[k]:
                raise CheckpointError(f"the AutoNEB checkpoint {ck} was written with {k}={saved.get(k)!r}, this "
                                      f"run has {k}={now[k]!r}; {hint}")
        if meta["world_size"] != dist_.world_size():
            raise CheckpointError(f"the AutoNEB checkpoint {ck} was written by {meta['world_size']} processes, this "
                                  f"run has {dist_.world_size()}; resume with as many processes")
        if meta["steps_per_epoch"] != self.spe:
            raise CheckpointError(f"the AutoNEB checkpoint {ck} was written with {meta['steps_per_epoch']} batches "
                                  f"per epoch, this run has {self.spe} (other `data` or `batch_size`); {hint}")
        if meta["cycle"] > len(self.config.cycles) or len(meta["weights"]) - 1 > self.config.max_pivots:
            raise CheckpointError(f"the AutoNEB checkpoint {ck} is damaged (cycle or pivots out of range)")


def read_neb_checkpoint(file: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) of an AutoNEB checkpoint; `CheckpointError` naming the file when it
    is not one or its metadata is damaged."""
    tensors, meta, where = open_training_checkpoint(file, fmt=NEB_CHECKPOINT_FORMAT, what="AutoNEB checkpoint",
                                                    kind="an AutoNEB checkpoint")
    for key in ("cycle", "step", "done"):
        meta_field(meta, key, "int", where=where, lo=0)
    meta_field(meta, "steps_per_epoch", "int", where=where, lo=1)
    meta_field(meta, "world_size", "int", where=where, lo=1)
    meta_field(meta, "inserted", "bool", where=where)
    meta_field(meta, "config", "dict", where=where)
    meta_field(meta, "history", "list", where=where, default=[])
    w = meta_field(meta, "weights", "number-list", where=where)
    if not w or any(not (x > 0) for x in w):
        raise CheckpointError(f"{where}: metadata field 'weights' must hold positive numbers; the file is damaged")
    if len(meta_field(meta, "endpoints_sha256", "str-list", where=where)) != 2:
        raise CheckpointError(f"{where}: metadata field 'endpoints_sha256' must hold two hashes; the file is damaged")
    return tensors, meta
