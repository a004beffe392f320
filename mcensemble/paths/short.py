"""The short path (Kuditipudi et al. 2019, Theorem 2): five segments whatever the depth.

Choose jointly one half S of every unit group for A and, inside its complement, a half T
for B (T = S^c when the group's size is even). D_S(A) keeps S in every group at once (the
readers' columns of the other units zeroed, of the kept ones doubled; BatchNorm layers
whose inputs change get their statistics re-estimated on training data); D_T(B) likewise.
The path runs through six vertices:

1. A -> D_S(A): **measured**. Noise stability says this segment stays low; nothing here
   proves it, so its loss is evaluated at `points` (>= 17) evenly spaced states that
   `state_at(t)` returns, and the largest slope between neighbouring points is reported.
2. write D_T(B)'s units T -- their rows: the producing layers' rows (which hold their
   reads), every writer of a stream slot, their BatchNorm / depthwise entries -- into the
   slots T, which no reader of D_S(A) uses: **exact** (the output does not change).
3. switch the classifier from D_S(A)'s to D_T(B)'s: **convex** (only the classifier
   changes; logits are linear in it and the loss convex in the logits, so the loss is at
   most the larger of the two vertex losses). Its midpoint is the packed pair
   (`mcensemble.pack`).
4. write D_T(B)'s values into every other slot (S, and S^c minus T for odd groups), which
   nothing live reads now: **exact**; the state is then D_T(B) bit for bit.
5. D_T(B) -> B: **measured**, as segment 1.

Nothing needs an order of depths, so residual streams (one group per stage: every writer
of a stream slot is a row of that group) and squeeze-excite loops (the bottleneck is a
group; the gate's rows belong to the group it gates) are handled like layered networks.
Segments 2-4 are checked from the weights (which units are live, which rows changed) and
numerically on a batch; a failed check is an internal error, never a weaker certificate.
Networks with LayerNorm or GroupNorm over channels are refused before any work: such a
norm reads every channel, so no slot is ever free.

File: as the dropout path (endpoints plus per-vertex deltas), plus column-scaling deltas
(`C:<name>`: one int8 multiplier 0 / 1 / 2 per input column) for the dropout vertices.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn
from tqdm import tqdm

from .._io import meta_field
from .._partial import Partial, copy_changed
from ..bn import FixedSubset, first_input
from ..errors import BadOptionError, ShortPathError
from ..evaluate import evaluate
from ..options import check_count
from ..stability import (_importance, _subset, changed_bn_modules, check_kept, dropout_state, reestimate_bn,
                         swap_trial, unit_slopes)
from ..units import AxisRef, UnitGraph, UnitGroup, _mixes_units
from .base import StateDict, check_same_layout, register_path
from .dropout import (DropoutPath, _bytes, _changed_units, _decode, _encode, _logits, _rel_err, _same, mix_states,
                      working_copy)

__all__ = ["ShortPath", "ShortConfig", "ShortConstruction", "build_short_path", "prepare_short",
           "check_norms", "short_groups", "choose_halves", "verify_short_segments", "SEGMENT_KINDS"]

log = logging.getLogger(__name__)
_ROW_ROLES = ("producer", "bn", "depthwise")

#: the kind of each of the five segments, in order
SEGMENT_KINDS = ("measured", "exact", "convex", "exact", "measured")
_STEPS = ("A -> D_S(A)", "D_T(B)'s units T into the free slots T", "classifier from D_S(A) to D_T(B)",
          "D_T(B)'s other units into the slots nothing reads now", "D_T(B) -> B")




# ----------------------------------------------------------------------------- scope
def check_norms(model: nn.Module) -> None:
    """Refuse norms that read every channel (LayerNorm, GroupNorm with fewer groups than
    channels): a dead slot would change the live ones, so no slot is ever free."""
    for name, m in model.named_modules():
        if _mixes_units(m):
            raise ShortPathError(
                f"layer {name!r} is a {type(m).__name__}: it normalises over the channels, so every "
                "channel's value depends on all the others and no unit can be silenced by zeroing "
                "its readers' columns; the short path (and the dropout-stable path) need networks "
                "whose norms are per channel (BatchNorm), e.g. ResNet, EfficientNet, MobileNet, "
                "not ConvNeXt or ViT")


def short_groups(graph: UnitGraph, state: Mapping[str, torch.Tensor]) -> None:
    """`ShortPathError` naming the group or tensor when the graph cannot carry the path:
    no groups or classifier, a group of one unit, a float tensor that is neither a row of
    some group nor the classifier's."""
    if not graph.groups:
        raise ShortPathError("the network has no hidden unit groups: nothing to drop out")
    if not graph.classifier:
        raise ShortPathError("the unit graph names no classifier tensors")
    rows: set[str] = set()
    for g in graph.groups:
        if g.size < 2:
            raise ShortPathError(f"unit group {g.name!r} has {g.size} unit; half of it cannot be kept")
        if not g.refs("producer"):
            raise ShortPathError(f"unit group {g.name!r} has no producing layer in the unit graph")
        rows |= {r.tensor for r in g.refs(*_ROW_ROLES)}
    if set(graph.classifier) & rows:
        raise ShortPathError("the classifier shares tensors with a hidden layer: it cannot be "
                             "switched on its own")
    for name, t in state.items():
        if t.is_floating_point() and name not in rows and name not in graph.classifier:
            raise ShortPathError(
                f"tensor {name!r} belongs to no unit group's rows and is not the classifier: the "
                "short path cannot tell whose half it serves (pass the unit groups by hand with "
                "`graph` if the traced graph missed it)")


# ----------------------------------------------------------------------------- halves
def _split(g: UnitGroup, key: torch.Tensor, b_score: torch.Tensor) -> tuple[list[int], list[int]]:
    """S: the n//2 units with the highest `key`; T: the n//2 of the rest best for B."""
    h = g.size // 2
    order = torch.argsort(key, descending=True, stable=True).tolist()
    s, rest = order[:h], order[h:]
    rest = sorted(rest, key=lambda u: -float(b_score[u]))[:h]
    return sorted(s), sorted(rest)


def _norm(s: torch.Tensor) -> torch.Tensor:
    tot = float(s.abs().sum())
    return s / tot if tot > 0 else s


@dataclass
class Halves:
    """The chosen halves: `s[group]` A's kept units, `t[group]` B's (disjoint from s)."""

    s: dict[str, list[int]]
    t: dict[str, list[int]]
    search: dict[str, Any] = field(default_factory=dict)


def _check_halves(graph: UnitGraph, s: Mapping[str, Any], t: Mapping[str, Any]) -> Halves:
    s, t = check_kept(graph, s), check_kept(graph, t)
    for g in graph.groups:
        if set(s[g.name]) & set(t[g.name]):
            raise BadOptionError(f"group {g.name!r}: A's and B's kept halves overlap; the short path "
                                 "needs B's half inside the complement of A's", option="halves")
    return Halves(s, t)


# ----------------------------------------------------------------------------- construction
@dataclass
class ShortConstruction:
    """Everything the path is made of: the graph, the halves, the six vertices, and the
    passes over the training data it took (`passes`: full passes, evaluation and BatchNorm
    re-estimation; `search_forwards`: forward passes on the search subset)."""

    work: nn.Module
    graph: UnitGraph
    halves: Halves
    vertices: list[StateDict]
    bn_modules: list[str]
    passes: int = 0
    search_forwards: int = 0
    eps: dict[str, float] = field(default_factory=dict)
    bn_data: str = "all the training data"  # where D_S(A)'s and D_T(B)'s BatchNorm statistics came from


class _Ctx:
    """Work model, data and counters shared by the steps of the construction."""

    def __init__(self, work: nn.Module, graph: UnitGraph, loader, device, progress):
        self.work, self.graph, self.loader, self.device, self.progress = work, graph, loader, device, progress
        self.of = _examples(loader)
        self.passes = 0
        self.forwards = 0
        self.bn: list[str] = []
        self.min_depth = min(graph.depths)

    def loss(self, sd: Mapping[str, torch.Tensor]) -> float:
        self.work.load_state_dict(sd)
        self.passes += self.share()
        return evaluate(self.work, self.loader, device=self.device).loss

    def share(self) -> float:
        """One pass over the current loader, in passes over the training data."""
        n = getattr(self.loader, "n", None) if not hasattr(self.loader, "dataset") else None
        return n / self.of if n is not None and self.of else 1.0

    def dropped(self, state: StateDict, kept: Mapping[str, list[int]], bn_loader=None) -> StateDict:
        """D_kept(state): every group at once, BatchNorm statistics of `self.bn` re-estimated
        (on `bn_loader`, default the current loader)."""
        sd = dropout_state(state, self.graph, kept, self.min_depth)
        if self.bn:
            data = self.loader if bn_loader is None else bn_loader
            sd.update(reestimate_bn(self.work, sd, data, self.bn, device=self.device))
            n = getattr(data, "n", None) if bn_loader is not None else None
            self.passes += n / self.of if n is not None and self.of else self.share()
        return sd


def prepare_short(model: nn.Module, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                  loader: Iterable[Any], *, graph=None, halves: tuple[Mapping, Mapping] | None = None,
                  device="cpu", progress: bool | None = None, search_steps: int = 4,
                  search_examples: int = 256, seed: int = 0, random_baseline: bool = True,
                  sample_examples: int | None = 1024, bn_examples: int | None = 2048) -> ShortConstruction:
    """Checks, the joint choice of halves and the six vertices (no certificate yet).
    `halves`: (A's kept units, B's kept units) per group to skip the search.
    `sample_examples`: the random-half baseline runs on a fixed subsample of about that many
    training examples (`mcensemble.bn.FixedSubset`; None: all of `loader`); D_S(A)'s and
    D_T(B)'s BatchNorm statistics are re-estimated on one of `bn_examples` (None: all)."""
    check_norms(model)
    a, b, work, graph = working_copy(model, a, b, loader, graph, device, what="the short path",
                                     uses="chooses the halves, re-estimates BatchNorm and measures segments")
    short_groups(graph, a)
    ctx = _Ctx(work, graph, loader, device, progress)
    if halves is not None:
        hv = _check_halves(graph, *halves)
    else:
        hv = choose_halves(ctx, a, b, steps=search_steps, examples=search_examples, seed=seed)
    probe = first_input(loader, 16)  # which BatchNorm inputs change: a few examples tell
    ctx.bn = sorted(set(changed_bn_modules(work, a, graph, hv.s, probe, device=device)) |
                    set(changed_bn_modules(work, b, graph, hv.t, probe, device=device)))
    bn_data = None
    if bn_examples is not None and ctx.bn:
        sub = FixedSubset(loader, bn_examples, what="the short path")
        bn_data = sub if sub.of is None or sub.batches < sub.of else None
    da, db = ctx.dropped(a, hv.s, bn_data), ctx.dropped(b, hv.t, bn_data)
    vertices = _vertices(graph, a, b, da, db, hv)
    con = ShortConstruction(work, graph, hv, vertices, list(ctx.bn))
    con.bn_data = "all the training data" if bn_data is None else \
        f"a fixed subsample of the training data ({bn_data.describe()})"
    con.eps = {"loss_a": ctx.loss(a), "loss_b": ctx.loss(b), "loss_da": ctx.loss(da), "loss_db": ctx.loss(db)}
    con.eps["eps"] = max(con.eps["loss_da"] - con.eps["loss_a"], con.eps["loss_db"] - con.eps["loss_b"], 0.0)
    if random_baseline:
        con.eps.update(_random_eps(ctx, a, b, seed, con.eps, sample_examples))
    con.passes, con.search_forwards = ctx.passes, ctx.forwards
    return con


def _examples(loader) -> int | None:
    """Examples in `loader` when its data set has a length, else None."""
    try:
        return len(loader.dataset)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        return getattr(loader, "n", None)


def _random_eps(ctx: _Ctx, a: StateDict, b: StateDict, seed: int, got: Mapping[str, float],
                examples: int | None = None) -> dict[str, float]:
    """eps of a random half (S random, T = the first n//2 of its complement), for comparison;
    with `examples`, everything (A, B, BatchNorm, the dropout networks) on a fixed subsample of
    that many training examples (`random_data` says which)."""
    s, t = random_halves(ctx.graph, seed + 1)
    sub = None if examples is None else FixedSubset(ctx.loader, examples, what="the short path")
    if sub is not None and ctx.of is not None and sub.n >= ctx.of:
        sub = None  # the subsample would be all the data
    full = ctx.loader
    try:
        if sub is not None:
            ctx.loader = sub
            la0, lb0 = ctx.loss(a), ctx.loss(b)
        else:
            la0, lb0 = got["loss_a"], got["loss_b"]
        la, lb = ctx.loss(ctx.dropped(a, s)), ctx.loss(ctx.dropped(b, t))
    finally:
        ctx.loader = full
    return {"loss_da_random": la, "loss_db_random": lb, "eps_random": max(la - la0, lb - lb0, 0.0),
            "random_data": "all the training data" if sub is None else
            f"a fixed subsample of the training data ({sub.describe()})"}


def random_halves(graph: UnitGraph, seed: int) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """A random half S of every group and T = the first n//2 units of its complement."""
    gen = torch.Generator().manual_seed(seed)
    s, t = {}, {}
    for g in graph.groups:
        perm = torch.randperm(g.size, generator=gen).tolist()
        h = g.size // 2
        s[g.name], t[g.name] = sorted(perm[:h]), sorted(perm[h:2 * h])
    return s, t


def _rows(g: UnitGroup):
    return g.refs(*_ROW_ROLES)


def _set_rows(state: StateDict, owned: set[str], src: Mapping[str, torch.Tensor], g: UnitGroup,
              units: list[int]) -> None:
    """Rows (producer / bn / depthwise members, whole rows: their reads included) of `src`'s
    `units` of group `g` into the same slots of `state`."""
    if not units:
        return
    for r in _rows(g):
        if r.tensor not in owned:
            state[r.tensor] = state[r.tensor].clone()
            owned.add(r.tensor)
        idx = r.indices(units)
        state[r.tensor].index_copy_(r.axis, idx, src[r.tensor].index_select(r.axis, idx))


def _vertices(graph: UnitGraph, a: StateDict, b: StateDict, da: StateDict, db: StateDict,
              hv: Halves) -> list[StateDict]:
    v2, owned = dict(da), set()
    for g in graph.groups:
        _set_rows(v2, owned, db, g, hv.t[g.name])
    v3 = dict(v2)
    for name in graph.classifier:
        v3[name] = db[name]
    for name, t in db.items():
        if not t.is_floating_point():
            v3[name] = t
    v4, owned = dict(v3), set()
    for g in graph.groups:
        rest = sorted(set(range(g.size)) - set(hv.t[g.name]))
        _set_rows(v4, owned, db, g, rest)
    for name, t in db.items():
        if not _same(v4[name], t):
            raise RuntimeError(f"internal error: segment 4 does not end at D_T(B) (tensor {name!r} differs)")
    return [a, da, v2, v3, db, b]


# ----------------------------------------------------------------------------- the search
def choose_halves(ctx: _Ctx, a: StateDict, b: StateDict, *, steps: int, examples: int,
                  seed: int, guided: bool = True, patience: int = 4) -> Halves:
    """Minimise max(L(D_S(A)), L(D_T(B))): units ranked by A's importance minus B's (each
    normalised per group), then up to `steps` swap trials per group, kept when the objective
    on `examples` training examples goes down (BatchNorm layers on batch statistics there).
    The trials come best predicted first (`_GuidedJointSwaps`), a group stopping after
    `patience` rejections in a row; `guided=False`: drawn at random by rank (`_swap`), all
    `steps` of them.
    A trial evaluates the side that binds the objective first and skips the other when the
    objective cannot go down whatever its loss (`_JointSearch`): same choices, fewer forwards."""
    if steps < 0 or examples < 1:
        raise BadOptionError("search_steps must be >= 0 and search_examples >= 1", option="search_steps")
    graph, work, t0 = ctx.graph, ctx.work, time.perf_counter()
    x, y = _subset(ctx.loader, examples)
    x, y = x.to(ctx.device), y.to(ctx.device)
    sa, sb = _importance(work, a, graph, x), _importance(work, b, graph, x)
    ctx.forwards += 2
    key = {g.name: _norm(sa[g.name]) - _norm(sb[g.name]) for g in graph.groups}
    s, t = {}, {}
    for g in graph.groups:
        s[g.name], t[g.name] = _split(g, key[g.name], sb[g.name])
    if steps == 0:
        return Halves(s, t, {"steps": 0, "start": "importance"})
    search = _JointSearch(ctx, (a, b), x, y, changed_bn_modules(work, a, graph, s, x[:16], device=ctx.device))
    # start from the better of the importance ranking and two random halves (the first of
    # them the one `eps_random` reports)
    starts = {"importance": (s, t), "random": random_halves(graph, seed + 1),
              "random-2": random_halves(graph, seed + 2)}
    scored, first, kept = {}, None, None
    for k, v in starts.items():
        scored[k] = search.start(*v)
        if first is None or scored[k] < scored[first]:
            first, kept = k, search.snapshot()
    search.restore(kept)
    gen = torch.Generator().manual_seed(seed)
    guide = _GuidedJointSwaps(search, sb) if guided else None
    start = search.best
    accepted = trials = 0
    bar = tqdm(total=steps * len(graph.groups), desc="short path: halves", leave=False, file=sys.stderr,
               disable=None if ctx.progress is None else not ctx.progress)
    try:
        for g in graph.groups:
            miss = 0
            for i in range(steps):
                new = None if guide is not None and miss >= patience else \
                    guide(g) if guide is not None else _swap(g, search.kept[0][g.name], key[g.name], sb[g.name], gen)
                if new is None:
                    bar.update(steps - i)
                    break
                trials += 1
                ok = search.trial(g, *new)
                accepted += ok
                miss = 0 if ok else miss + 1
                bar.update()
    finally:
        bar.close()
    s, t = search.kept
    return Halves(s, t, {"steps": steps, "examples": int(x.shape[0]), "start": first,
                         "order": "guided" if guided else "random", "trials": trials,
                         "gradients": guide.gradients if guide is not None else 0,
                         "start_objectives": scored, "objective_start": start,
                         "objective_end": search.best, "accepted": accepted,
                         "trial_forwards": search.trial_forwards, "skipped_forwards": search.skipped,
                         "partial_forwards": search.partial is not None, "seconds": time.perf_counter() - t0})


class _JointSearch:
    """The joint search's objective max(l_A, l_B) + 1e-3 (l_A + l_B), l = the proxy loss of
    D_S(A) / D_T(B) on (x, y) with the BatchNorm modules `bn` on batch statistics. Keeps
    the accepted halves, their dropped states and losses; a trial recomputes only the
    tensors the swapped group reads and loads only the tensors that changed."""

    def __init__(self, ctx: _Ctx, states: tuple[StateDict, StateDict], x, y, bn: list[str]):
        self.ctx, self.states, self.x, self.y, self.bn = ctx, states, x, y, bn
        mods = dict(ctx.work.named_modules())
        self.bn_mods = [mods[n] for n in bn]
        self.bn_keys = {f"{n}.{k}" for n in bn for k in ("running_mean", "running_var", "num_batches_tracked")}
        self.dst = ctx.work.state_dict(keep_vars=True)
        self.loaded: dict[str, torch.Tensor] = {}
        self.kept: tuple[dict, dict] = ({}, {})
        self.dropped: list[StateDict] = [{}, {}]
        self.losses = [math.inf, math.inf]
        self.best = math.inf
        self.trial_forwards = self.skipped = 0
        self.partial = Partial.make(ctx.work, x)
        self.frontiers: dict[int, tuple[str, dict]] = {}  # side -> (group, frontier values)

    @staticmethod
    def value(la: float, lb: float) -> float:
        return max(la, lb) + 1e-3 * (la + lb)

    def _forward(self, side: int, g: UnitGroup | None) -> Any:
        """The loaded state's output; with `g` (a trial of group g, the state otherwise the
        accepted one), only the part of the network g's consumer tensors reach is run, from
        the frontier values `_frontier` computed for this side and g."""
        if self.partial is None:
            return self.ctx.work(self.x)
        if g is None or self.partial.plan(g) is None:
            return self.partial()
        return self.partial(g, self.frontiers[side][1])

    def _frontier(self, side: int, g: UnitGroup) -> None:
        """Make sure `frontiers[side]` holds g's frontier values under the accepted state
        (computed from the previous group's when they cover it: a short pass)."""
        if self.partial is None or self.partial.plan(g) is None or self.frontiers.get(side, (None,))[0] == g.name:
            return
        self._load(self.dropped[side])
        prev = self.frontiers.get(side)
        with torch.no_grad():
            self._bn_train(True)
            try:
                self.frontiers[side] = (g.name, self.partial.frontier(g, prev))
            finally:
                self._bn_train(False)

    def _bn_train(self, on: bool) -> None:
        for m in self.bn_mods:
            m.train(on)

    def _load(self, sd: StateDict) -> None:
        """Copy into the work model only the tensors that are not the very ones loaded last
        (BatchNorm statistics of modules on batch statistics get dirty: always copied)."""
        self.loaded = copy_changed(self.dst, sd, self.loaded, self.bn_keys)

    @torch.no_grad()
    def _loss(self, sd: StateDict, side: int = 0, g: UnitGroup | None = None) -> float:
        """Proxy loss of `sd` (for a trial of group g: only the part of the network g reaches)."""
        self._load(sd)
        self.ctx.forwards += 1
        self._bn_train(True)
        try:
            out = self._forward(side, g)
            return float(torch.nn.functional.cross_entropy(out[0] if isinstance(out, (tuple, list)) else out,
                                                          self.y))
        finally:
            self._bn_train(False)

    def start(self, s: Mapping[str, list[int]], t: Mapping[str, list[int]]) -> float:
        """Make (s, t) the accepted halves (every tensor recomputed); their objective."""
        self.kept = ({k: list(v) for k, v in s.items()}, {k: list(v) for k, v in t.items()})
        self.dropped = [dropout_state(st, self.ctx.graph, kp, self.ctx.min_depth)
                        for st, kp in zip(self.states, self.kept)]
        self.frontiers.clear()
        self.losses = [self._loss(sd) for sd in self.dropped]
        self.best = self.value(*self.losses)
        return self.best

    def snapshot(self) -> tuple:
        return self.kept, list(self.dropped), list(self.losses), self.best

    def restore(self, snap: tuple) -> None:
        self.kept, self.dropped, self.losses, self.best = snap[0], list(snap[1]), list(snap[2]), snap[3]
        self.frontiers.clear()

    def unit_gradients(self, g: UnitGroup, side: int) -> torch.Tensor:
        """`stability.unit_slopes` of g in the accepted D_S(A) (side 0) or D_T(B) (side 1) on
        (x, y): one backward pass, over the part of the network g's consumers reach."""
        self._frontier(side, g)
        self._load(self.dropped[side])
        self._bn_train(True)
        try:
            return unit_slopes(self.ctx.work, g, self.states[side], self.ctx.graph, self.kept[side],
                               self.ctx.min_depth, lambda: self._forward(side, g), self.y)
        finally:
            self._bn_train(False)

    def trial(self, g: UnitGroup, new_s: list[int], new_t: list[int]) -> bool:
        """Try A's half `new_s` and B's `new_t` of group `g`; keep them (True) when the
        objective goes down by more than 1e-7. The side with the larger loss goes first;
        the other is skipped when the objective, with its loss at its least (0: a cross
        entropy), cannot go below the best."""
        names = {r.tensor for r in g.refs("consumer")}
        cand = [dict(k) for k in self.kept]
        cand[0][g.name], cand[1][g.name] = new_s, new_t
        sds: list[StateDict | None] = [None, None]
        got: dict[int, float] = {}
        for side in sorted((0, 1), key=lambda i: -self.losses[i]):
            if got and self.value(*(got.get(i, 0.0) for i in (0, 1))) >= self.best - 1e-7:
                self.skipped += 1
                return False
            sds[side] = dropout_state(self.states[side], self.ctx.graph, cand[side], self.ctx.min_depth,
                                      base=self.dropped[side], only=names)
            self._frontier(side, g)
            got[side] = self._loss(sds[side], side, g)
            self.trial_forwards += 1
        val = self.value(got[0], got[1])
        if val >= self.best - 1e-7:
            return False
        self.kept, self.dropped, self.losses, self.best = tuple(cand), sds, [got[0], got[1]], val
        for side in (0, 1):  # frontiers kept for another group may have seen g's old halves
            if self.frontiers.get(side, (g.name,))[0] != g.name:
                del self.frontiers[side]
        return True


def _b_half(g: UnitGroup, s: Iterable[int], b_score: torch.Tensor) -> list[int]:
    """B's half T inside the complement of A's half `s`: its size // 2 units strongest for B."""
    inside = set(s)
    rest = sorted((u for u in range(g.size) if u not in inside), key=lambda u: -float(b_score[u]))
    return sorted(rest[:g.size // 2])


class _GuidedJointSwaps:
    """The joint search's trials, best predicted first: for a swap of A's kept unit i for a
    unit o of the complement (B's half re-derived, `_b_half`), the first-order change of
    each side's loss from its unit slopes (`stability.unit_slopes`: 2 (dL/dm_o - dL/dm_i)
    for A; for B, 2 x the slopes of the units entering T minus those leaving it), and so of
    the objective. Slopes are taken again after every accepted swap; None once every swap
    of the current halves has been tried."""

    def __init__(self, search: "_JointSearch", b_score: Mapping[str, torch.Tensor]):
        self.search, self.b_score = search, b_score
        self.gradients = 0
        self._at: tuple | None = None
        self._order: list[tuple[int, int]] = []

    def __call__(self, g: UnitGroup) -> tuple[list[int], list[int]] | None:
        search = self.search
        s, t = search.kept[0][g.name], search.kept[1][g.name]
        at = (g.name, tuple(s), tuple(t))
        if at != self._at:
            self._at = at
            ga, gb = search.unit_gradients(g, 0), search.unit_gradients(g, 1)
            self.gradients += 2
            la, lb = search.losses
            inside = torch.zeros(g.size, dtype=torch.bool)
            inside[s] = True
            si, ci = inside.nonzero().reshape(-1), (~inside).nonzero().reshape(-1)  # A's half, its complement C
            da = 2 * (ga[ci][None, :] - ga[si][:, None])  # (i in S, o in C)
            # B's half: C itself (even sizes) or C less its weakest unit for B (odd sizes);
            # after the swap C' = C - o + i
            db = 2 * (gb[si][:, None] - gb[ci][None, :])
            if len(ci) > len(t):
                bs = self.b_score[g.name].double()
                order = ci[torch.argsort(bs[ci], stable=True)]
                w1, w2 = int(order[0]), int(order[1]) if len(order) > 1 else int(order[0])
                rest = torch.where(ci == w1, w2, w1)  # weakest of C - o, per o
                out = torch.where(bs[si][:, None] < bs[rest][None, :], si[:, None], rest[None, :])  # weakest of C'
                db = db - 2 * (gb[out] - gb[w1])  # T' = C' - out, T = C - w1
            now = search.value(la, lb)
            pred = torch.maximum(la + da, lb + db) + 1e-3 * (la + da + lb + db) - now
            flat = torch.argsort(pred.reshape(-1), stable=True)
            self._order = [(int(si[k // len(ci)]), int(ci[k % len(ci)])) for k in flat.tolist()]
        if not self._order:
            return None
        i, o = self._order.pop(0)
        new_s = sorted([u for u in s if u != i] + [o])
        return new_s, _b_half(g, new_s, self.b_score[g.name])


def _swap(g: UnitGroup, s: list[int], key: torch.Tensor, b_score: torch.Tensor,
          gen: torch.Generator) -> tuple[list[int], list[int]]:
    """One trial: a kept unit of A (weak first) traded for a unit of the complement
    (strong for A first), by rank-weighted draws; B's half re-derived."""
    new_s = swap_trial(g.size, s, key, gen)
    rest = sorted(set(range(g.size)) - set(new_s), key=lambda u: -float(b_score[u]))[:g.size // 2]
    return new_s, sorted(rest)


# ----------------------------------------------------------------------------- verification
def _unit_nz(t: torch.Tensor, row: AxisRef | None, n_rows: int, col: AxisRef, n_cols: int) -> torch.Tensor:
    """(n_rows, n_cols) bool: does row unit i read column unit s with a nonzero weight (one
    row for the whole tensor when `row` is None: the classifier)."""
    nz = t != 0
    if row is None:
        m = nz.movedim(col.axis, 0)
        m = m.reshape(m.shape[0], -1).any(1)[None, :]
    else:
        m = nz.movedim((row.axis, col.axis), (0, 1))
        m = m.reshape(m.shape[0], m.shape[1], -1).any(-1)[row.indices(range(n_rows))]
        m = m.reshape(n_rows, row.block, -1).any(1)
    m = m[:, col.indices(range(n_cols))]
    return m.reshape(m.shape[0], n_cols, col.block).any(2)


def _edges(graph: UnitGraph) -> list[tuple[UnitGroup | None, AxisRef | None, UnitGroup, AxisRef]]:
    """(reader group or None for the classifier, its row member, read group, consumer member)."""
    owner: dict[str, tuple[UnitGroup, AxisRef]] = {}
    for g in graph.groups:
        for r in g.refs("producer"):
            owner.setdefault(r.tensor, (g, r))
    out = []
    for g in graph.groups:
        for c in g.refs("consumer"):
            if c.tensor in owner:
                h, r = owner[c.tensor]
                out.append((h, r, g, c))
            elif c.tensor in graph.classifier:
                out.append((None, None, g, c))
            else:
                raise ShortPathError(f"tensor {c.tensor!r} reads group {g.name!r} but produces no "
                                     "group and is not the classifier")
    return out


def live_units(v: Mapping[str, torch.Tensor], graph: UnitGraph, edges=None) -> dict[str, torch.Tensor]:
    """Per group, the units the output depends on: read with a nonzero weight by the
    classifier or by a live unit (a fixed point, so residual and squeeze-excite loops settle)."""
    edges = _edges(graph) if edges is None else edges
    live = {g.name: torch.zeros(g.size, dtype=torch.bool) for g in graph.groups}
    nz = [_unit_nz(v[c.tensor], r, h.size if h else 0, c, g.size) for h, r, g, c in edges]
    changed = True
    while changed:
        changed = False
        for (h, _, g, _), m in zip(edges, nz):
            rows = m if h is None else m[live[h.name]]
            new = live[g.name] | rows.any(0)
            if not torch.equal(new, live[g.name]):
                live[g.name], changed = new, True
    return live


def _stray_rows(va: StateDict, vb: StateDict, graph: UnitGraph, changed: set[str]) -> list[str]:
    """Changed tensors (not the classifier) with changed entries outside every group's rows."""
    claimed: dict[str, torch.Tensor] = {}
    for g in graph.groups:
        for r in _rows(g):
            n = va[r.tensor].shape[r.axis]
            m = claimed.setdefault(f"{r.tensor}|{r.axis}", torch.zeros(n, dtype=torch.bool))
            m[r.indices(range(g.size))] = True
    bad = []
    for name in changed:
        x, y = va[name], vb[name]
        diff = (_bytes(x).reshape(x.numel(), -1) != _bytes(y).reshape(y.numel(), -1)).any(1)
        ok = False
        for key, m in claimed.items():
            t, _, ax = key.rpartition("|")
            if t == name:
                d = diff.reshape(x.shape).movedim(int(ax), 0).reshape(x.shape[int(ax)], -1).any(1) \
                    if x.dim() else diff
                ok = ok or not bool((d & ~m).any())
        if not ok:
            bad.append(name)
    return bad


def _why_not(va: StateDict, vb: StateDict, kind: str, graph: UnitGraph, edges) -> str | None:
    """Why segment va -> vb is not of its kind (from the weights alone), or None."""
    changed = {k for k in va if va[k].is_floating_point() and not _same(va[k], vb[k])}
    cls = set(graph.classifier)
    if kind == "convex":
        return None if changed <= cls else f"changes {sorted(changed - cls)[:5]} besides the classifier"
    if kind != "exact":
        return None
    if changed & cls:
        return "changes the classifier"
    stray = _stray_rows(va, vb, graph, changed)
    if stray:
        return f"changes {stray[:5]} outside the rows of the unit groups"
    la, lb = live_units(va, graph, edges), live_units(vb, graph, edges)
    for g in graph.groups:
        bad = sorted(u for u in _changed_units(va, vb, g) if la[g.name][u] or lb[g.name][u])
        if bad:
            return f"changes live units {bad[:5]} of {g.name!r}"
    return None


def verify_short_segments(work: nn.Module, vertices: list[StateDict], graph: UnitGraph,
                          x: torch.Tensor | None = None, *, rtol: float = 1e-5) -> list[dict[str, Any]]:
    """Check segments 2-4 from the weights (exact: only rows of units dead at both ends
    change; convex: only the classifier changes) and, when a batch `x` is given,
    numerically: logits constant along exact segments (both ends and the midpoint), linear
    along the convex one (at the midpoint). Returns per segment the largest relative logit deviation seen;
    `RuntimeError` naming the segment when a check fails."""
    edges = _edges(graph)
    out = []
    vertex_logits: dict[int, torch.Tensor] = {}

    def logits(j: int) -> torch.Tensor:  # each vertex's logits once (segments share ends)
        if j not in vertex_logits:
            vertex_logits[j] = _logits(work, vertices[j], x)
        return vertex_logits[j]

    for i, kind in enumerate(SEGMENT_KINDS):
        if kind == "measured":
            out.append({})
            continue
        va, vb = vertices[i], vertices[i + 1]
        why = _why_not(va, vb, kind, graph, edges)
        if why:
            raise RuntimeError(f"internal error: segment {i + 1} ({kind}: {_STEPS[i]}) {why}")
        if x is None:
            out.append({})
            continue
        z0, z1 = logits(i), logits(i + 1)
        want = z0 if kind == "exact" else (z0 + z1) / 2
        dev = _rel_err(_logits(work, mix_states(va, vb, 0.5), x), want)
        if kind == "exact":
            dev = max(dev, _rel_err(z1, z0))
        if dev > rtol:
            raise RuntimeError(f"internal error: segment {i + 1} ({kind}: {_STEPS[i]}) changes the logits "
                               f"by {dev:.2e} (relative) on a batch")
        out.append({"logit_deviation": dev})
    return out


# ----------------------------------------------------------------------------- the path
def build_short_path(model: nn.Module, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                     loader: Iterable[Any], *, graph=None, halves: tuple[Mapping, Mapping] | None = None,
                     device="cpu", progress: bool | None = None, search_steps: int = 4,
                     search_examples: int = 256, points: int = 17, seed: int = 0,
                     random_baseline: bool = True, sample_examples: int | None = 1024,
                     bn_examples: int | None = 2048) -> "ShortPath":
    """The short path from state dict `a` to `b` (module docstring) with its certificate on
    `loader` (training data: also used to choose the halves and re-estimate BatchNorm).
    `points`: states evaluated on each measured segment (>= 17, ends included). The
    vertices' losses are taken on all of `loader`; the measured segments' interior points
    and the random-half baseline on a fixed subsample of about `sample_examples` training
    examples (None: all of `loader`), the dropout vertices' BatchNorm statistics on one of
    `bn_examples` (the certificate's `data` says which data each number used). `model`: an nn.Module of the architecture (not changed). Refused networks ->
    `ShortPathError`."""
    if isinstance(points, bool) or not isinstance(points, int) or points < 17:
        raise BadOptionError(f"points must be an integer >= 17, got {points!r}", option="points")
    t0 = time.perf_counter()
    con = prepare_short(model, a, b, loader, graph=graph, halves=halves, device=device, progress=progress,
                        search_steps=search_steps, search_examples=search_examples, seed=seed,
                        random_baseline=random_baseline, sample_examples=sample_examples,
                        bn_examples=bn_examples)
    x, _ = _subset(loader, 64)
    checks = verify_short_segments(con.work, con.vertices, con.graph, x.to(device))
    meta = {"unit_groups": [g.name for g in con.graph.groups], "bn_reestimated": con.bn_modules,
            "search": con.halves.search}
    path = ShortPath(con.vertices, metadata=meta)
    cert, passes = _certificate(con, path, loader, device, points, checks, progress, sample_examples)
    path.certificate = cert
    path.metadata.update(construction_seconds=time.perf_counter() - t0,
                         evaluation_passes=con.passes + passes, search_forwards=con.search_forwards)
    log.info("short path: eps %.4f (random half %.4f), max loss %.4f (measured segments included)",
             cert["eps"], cert.get("eps_random", float("nan")), cert["max_loss"])
    return path


def _certificate(con: ShortConstruction, path: "ShortPath", loader, device, points: int, checks,
                 progress, sample_examples: int | None = None) -> tuple[dict[str, Any], float]:
    """The certificate and the evaluation passes it took (in full passes over `loader`)."""
    e = con.eps
    # vertices 2 and 3 end exact segments (2: from D_S(A); 4: to D_T(B)), checked from the
    # weights and on a batch: their losses are their neighbours'
    vl = [e["loss_a"], e["loss_da"], e["loss_da"], e["loss_db"], e["loss_db"], e["loss_b"]]
    work, passes = con.work, 0.0
    n_all = _examples(loader)
    sub = None if sample_examples is None else FixedSubset(loader, sample_examples, what="the short path")
    if sub is not None and n_all is not None and sub.n >= n_all:
        sub = None
    data = loader if sub is None else sub
    share = 1.0 if sub is None or not n_all else sub.n / n_all
    n = len(con.vertices) - 1
    segments = []
    bar = tqdm(total=2 * (points - (2 if sub is None else 0)), desc="short path: measured segments", leave=False,
               file=sys.stderr, disable=None if progress is None else not progress)
    try:
        for i, kind in enumerate(SEGMENT_KINDS):
            seg: dict[str, Any] = {"kind": kind, "step": _STEPS[i], "t0": i / n, "t1": (i + 1) / n,
                                   "proven": kind != "measured", **checks[i]}
            if kind == "measured":
                m = _measure(path, work, data, device, i, n, points, vl[i], vl[i + 1], bar, full=sub is None)
                passes += (points - (2 if sub is None else 0)) * share
                m["bound"] = max(m["bound"], vl[i], vl[i + 1])  # the ends: all the data
                seg.update(m)
            else:  # exact: constant; convex: at most the larger end
                seg["bound"] = vl[i] if kind == "exact" else max(vl[i], vl[i + 1])
            segments.append(seg)
    finally:
        bar.close()
    measured_on = "all the training data" if sub is None else \
        f"a fixed subsample of the training data ({sub.describe()}), the ends included"
    cert = {"max_loss": max(s["bound"] for s in segments),
            "proven_max_loss": max(s["bound"] for s in segments if s["proven"]),
            "measured_max_loss": max(s["bound"] for s in segments if not s["proven"]),
            "loss_a": e["loss_a"], "loss_b": e["loss_b"], "eps": e["eps"], "vertex_losses": vl,
            "segments": segments,
            "note": "segments of kind 'measured' are evaluated at the listed points, not proven",
            "data": {"vertices": "all the training data (vertices 2 and 3: their exact neighbours')",
                     "measured_points": measured_on, "search": f"the first {con.halves.search.get('examples', 0)} "
                     "training examples" if con.halves.search.get("steps") else None,
                     "random_half": e.get("random_data"), "batchnorm": con.bn_data}}
    for k in ("eps_random", "loss_da_random", "loss_db_random"):
        if k in e:
            cert[k] = e[k]
    return cert, passes


def _measure(path: "ShortPath", work: nn.Module, loader, device, i: int, n: int, points: int,
             l0: float, l1: float, bar, *, full: bool = True) -> dict[str, Any]:
    """Loss at `points` evenly spaced states of segment i on `loader`; the ends are `l0`,
    `l1` when `loader` is the data they were measured on (`full`), else evaluated too."""
    pts = []
    for j in range(points):
        s = j / (points - 1)
        t = (i + s) / n
        if full and (j == 0 or j == points - 1):
            loss = l0 if j == 0 else l1
        else:
            work.load_state_dict(path.state_at(t))
            loss = evaluate(work, loader, device=device).loss
            bar.update()
        pts.append([t, loss])
    slope = max(abs(b[1] - a[1]) * (points - 1) for a, b in zip(pts[:-1], pts[1:]))
    return {"bound": max(p[1] for p in pts), "points": pts, "max_slope": slope}


# ----------------------------------------------------------------------------- storage
def _encode_cols(prev: torch.Tensor, cur: torch.Tensor) -> torch.Tensor | None:
    """int8 multipliers m (0, 1 or 2 per index of axis 1) with cur == prev scaled by m
    (m == 0: +0) bit for bit, or None."""
    if cur.dim() < 2 or not cur.is_floating_point():
        return None
    p, c = prev.movedim(1, 0).reshape(prev.shape[1], -1), cur.movedim(1, 0).reshape(cur.shape[1], -1)
    bp, bc = _bytes(p).reshape(p.shape[0], -1), _bytes(c).reshape(c.shape[0], -1)
    m = torch.full((p.shape[0],), -1, dtype=torch.int8)
    m[(bp == bc).all(1)] = 1
    m[(m < 0) & (_bytes(torch.zeros_like(c)).reshape(c.shape[0], -1) == bc).all(1)] = 0
    m[(m < 0) & (_bytes(p * 2).reshape(p.shape[0], -1) == bc).all(1)] = 2
    if bool((m < 0).any()) or not _same(_apply_cols(prev, m), cur):
        return None
    return m


def _apply_cols(prev: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    x = prev.clone()
    v = x.movedim(1, 0)
    m = m.long()
    v[m == 2] *= 2
    v[m == 0] = 0
    return x


def _encode_short(prev: StateDict, cur: StateDict) -> StateDict:
    out = _encode(prev, cur)
    for key in [k for k in out if k.startswith("F:")]:
        name = key[2:]
        m = _encode_cols(prev[name], cur[name])
        if m is not None:
            del out[key]
            out[f"C:{name}"] = m
    return out


def _decode_short(prev: StateDict, delta: Mapping[str, torch.Tensor]) -> StateDict:
    cols = {k: t for k, t in delta.items() if k.startswith("C:")}
    cur = _decode(prev, {k: t for k, t in delta.items() if k not in cols})
    for key, m in cols.items():
        name = key[2:]
        if name not in prev:
            raise KeyError(f"vertex delta names tensor {name!r}, which the endpoints do not have")
        p = prev[name]
        if p.dim() < 2 or m.dim() != 1 or m.shape[0] != p.shape[1] or m.dtype != torch.int8 or \
                bool(((m < 0) | (m > 2)).any()):
            raise ValueError(f"vertex delta {key!r} is not a multiplier (0, 1, 2) per column of {name!r}")
        cur[name] = _apply_cols(p, m)
    return cur


@dataclass(frozen=True)
class ShortConfig:
    """The short path's settings. search_steps: swap trials per unit group when choosing the
    halves (0: the importance ranking alone); seed: seeds those searches (`build` sets it
    from its own seed)."""

    search_steps: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        check_count(self.search_steps, "search_steps", minimum=0)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise BadOptionError(f"`seed` must be an integer, got {self.seed!r}", option="seed")


@register_path("short")
class ShortPath(DropoutPath):
    """The short path: six vertices (A, D_S(A), two intermediate states, D_T(B), B), equally
    spaced in t. `certificate`: `max_loss` (over every segment's bound), `proven_max_loss`
    (segments 2-4, from the weights), `measured_max_loss` (segments 1 and 5: the largest
    loss measured, NOT a proof), `eps` (of the chosen halves), `eps_random` (of a random
    half), `loss_a`, `loss_b`, `vertex_losses`, `segments` (`kind` in exact / convex /
    measured, `proven`, `bound`, `step`, `t0`, `t1`; measured ones also `points` [[t, loss]]
    and `max_slope`, the largest |dL/ds| between neighbouring points, s the segment's own
    parameter). Stored as endpoints plus row / column-scaling deltas."""

    _encode_delta = staticmethod(_encode_short)
    _decode_delta = staticmethod(_decode_short)

    config_class = ShortConfig

    @classmethod
    def from_options(cls, net, a, b, *, config: ShortConfig, opts, data, fit_loader, bn_loader,
                     index: int = 0, graph=None) -> "ShortPath":
        """`build --method short`: `build_short_path` on `bn_loader`, its searches seeded by `config.seed`."""
        return build_short_path(net, a, b, bn_loader, graph=graph, device=data.device, progress=data.progress,
                                seed=config.seed, search_steps=config.search_steps)

    @classmethod
    def _from_file(cls, groups: dict[str, StateDict], meta: dict[str, Any]) -> "ShortPath":
        # every vertex between the ends has a delta group, so the groups bound n_vertices
        n = meta_field(meta, "n_vertices", "int", where="short path", lo=2, hi=len(groups))
        want = {"endpoint.0", "endpoint.1", *(f"delta.{i}" for i in range(1, n - 1))}
        if set(groups) != want:
            raise ValueError(f"a short path of {n} vertices has groups endpoint.0, endpoint.1 and "
                             f"delta.1 .. delta.{n - 2}; the file has {sorted(groups)[:8]}")
        cert = meta_field(meta, "certificate", "dict", where="short path", default=None, nullable=True)
        if cert is not None:
            meta_field(cert, "segments", "list", where="short path certificate")
            meta_field(cert, "max_loss", "number", where="short path certificate")
        check_same_layout(groups["endpoint.0"], groups["endpoint.1"])
        self = cls.__new__(cls)
        self._init(groups, n, cert, meta, False)
        self._validate()  # every delta, now
        return self


def certificate_lines(cert: Mapping[str, Any]) -> list[str]:
    """Plain-text lines describing a short path's certificate (for the CLI and reports):
    exact / convex segments as bounds, measured ones as measurements, never as proofs."""
    lines = []
    for i, s in enumerate(cert.get("segments", []), start=1):
        what = {"exact": "exact (output unchanged, checked from the weights)",
                "convex": "convex (at most its larger end, from the weights)",
                "measured": f"MEASURED at {len(s.get('points', []))} points, not proven; "
                            f"largest slope {s.get('max_slope', math.nan):.3g}"}.get(s.get("kind"), s.get("kind"))
        lines.append(f"segment {i}: loss <= {s['bound']:.4f}  {what}")
    return lines
