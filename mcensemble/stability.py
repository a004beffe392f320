"""Dropout stability of a checkpoint (Kuditipudi et al. 2019).

A network is eps-dropout stable when, for every depth k of its unit graph, keeping a
chosen half of the units of every hidden group at depth >= k (the other units' outgoing
weights -- the group's consumer-role axes -- zeroed, the kept units' outgoing weights
doubled) raises the loss by at most eps. Write D_k for that network.

- Exactly `size // 2` units of a group are kept (an odd group drops one more than it
  keeps; a group of one unit keeps none), so the free half always has room for one copy
  of the kept half -- what the dropout-stable path needs.
- BatchNorm networks: the units whose inputs change (those of groups deeper than k) get
  their running statistics re-estimated on `bn_loader`, with every other BatchNorm layer
  left in eval mode with its own statistics (`reestimate_bn`).
- The kept halves are chosen, not drawn: units are ranked by importance (norm of the
  outgoing weights x mean input magnitude seen by the consumer on one batch), then a
  short local search swaps kept / dropped pairs when that lowers the loss of the D_k
  networks on a subset of the data (BatchNorm layers of affected groups use batch
  statistics there). One kept half per group serves every depth.
"""
from __future__ import annotations

import copy
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm import tqdm

from .bn import batch_input, first_input, has_batchnorm, labelled_batch, update_bn
from .data import example_input
from .errors import BadOptionError, DataSpecError
from .evaluate import evaluate, _log_probs
from .units import UnitGraph, UnitGroup, build_unit_graph
from ._layout import fast_layout
from ._partial import Family, Partial, copy_changed, distinct_bytes
from .precision import resolve_precision

__all__ = ["StabilityResult", "dropout_stability", "dropout_state", "dropout_network",
           "reestimate_bn", "default_kept", "graph_for", "check_kept", "changed_bn_modules", "swap_trial",
           "GuidedSwaps", "random_swaps", "unit_slopes"]

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
_BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class StabilityResult:
    """What `dropout_stability` measured. `kept[group]`: the kept units (sorted);
    `depths`: `[{"depth", "loss", "increase"}]`; `eps` = the largest increase (>= 0);
    `bn_stats[k]`: the re-estimated BatchNorm tensors of D_k (not in `to_dict()`); `search`:
    what the kept-half search did (trials, accepted, forwards, seconds; empty when `kept`
    was given)."""

    eps: float
    base_loss: float
    depths: list[dict[str, Any]]
    kept: dict[str, list[int]]
    bn_stats: dict[int, StateDict] = field(default_factory=dict, repr=False)
    graph: UnitGraph | None = field(default=None, repr=False)
    search: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {"eps": float(self.eps), "base_loss": float(self.base_loss),
               "depths": [dict(d) for d in self.depths],
               "kept": {k: list(map(int, v)) for k, v in self.kept.items()}}
        if self.search:
            out["search"] = dict(self.search)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StabilityResult":
        """Back from `to_dict()` (no BN statistics: a path re-estimates them)."""
        try:
            return cls(float(d["eps"]), float(d["base_loss"]), [dict(r) for r in d["depths"]],
                       {str(k): [int(u) for u in v] for k, v in d["kept"].items()})
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BadOptionError(f"not a stability report (needs eps, base_loss, depths, "
                                 f"kept): {e}", option="stability") from e


def graph_for(model: nn.Module, loader: Iterable[Any] | None = None, graph=None) -> UnitGraph:
    """The unit graph of `model`: `graph` when given (validated), else traced on the first
    two inputs of `loader` (or a probed example input)."""
    if graph is not None:
        return build_unit_graph(model, graph=graph)
    x = first_input(loader, 2)
    if x is None:
        x = example_input(model)
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    return build_unit_graph(model, x.to(dev))


def default_kept(group: UnitGroup, scores: torch.Tensor | None = None) -> list[int]:
    """`size // 2` units: the highest-scoring ones (the first ones without scores)."""
    h = group.size // 2
    if scores is None:
        return list(range(h))
    return sorted(torch.argsort(scores, descending=True, stable=True)[:h].tolist())


def dropout_state(state: Mapping[str, torch.Tensor], graph: UnitGraph,
                  kept: Mapping[str, Any], depth: int, *, base: Mapping[str, torch.Tensor] | None = None,
                  only: Iterable[str] | None = None) -> StateDict:
    """D_depth without BatchNorm re-estimation: for every group at depth >= `depth`, the
    dropped units' consumer columns are set to +0 and the kept ones' doubled. Tensors not
    touched are shared with `state`. Incremental form: with `base` (an earlier result for
    the same `state`, `graph` and `depth`) and `only` (tensor names), only those tensors are
    recomputed from `state`; every other one is shared with `base` (bit for bit what a full
    call gives when the groups reading the other tensors kept the same units)."""
    out = dict(state if base is None else base)
    refs: dict[str, list] = {}
    for g in graph.groups:
        if g.depth >= depth:
            for r in g.refs("consumer"):
                refs.setdefault(r.tensor, []).append((g, r))
    names = refs if only is None else [n for n in only if n in refs]
    for name in names:
        out[name] = _scaled(state[name], refs[name], kept)
    return out


def _scaled(t: torch.Tensor, refs: list, kept: Mapping[str, Any]) -> torch.Tensor:
    """`t` with, for each (group, consumer ref), the kept units' indices along the ref's
    axis doubled and the dropped ones set to +0 (one pass: a multiplier per axis)."""
    scale = None
    for g, r in refs:
        keep = torch.as_tensor(list(kept[g.name]), dtype=torch.long)
        drop = torch.ones(g.size, dtype=torch.bool)
        drop[keep] = False
        m = torch.ones(t.shape[r.axis], dtype=t.dtype)
        m[r.indices(keep)] = 2
        m[r.indices(drop.nonzero().reshape(-1))] = 0
        m = m.reshape([-1 if d == r.axis else 1 for d in range(t.dim())])
        scale = m if scale is None else scale * m
    return torch.where(scale == 0, torch.zeros((), dtype=t.dtype), t * scale)


def _bn_modules(model: nn.Module, graph: UnitGraph, min_depth: int) -> list[str]:
    """BatchNorm modules holding statistics of groups deeper than `min_depth - 1`."""
    names = {r.module for g in graph.groups if g.depth >= min_depth
             for r in g.refs("bn") if r.tensor.endswith(".running_mean")}
    mods = dict(model.named_modules())
    return sorted(n for n in names if isinstance(mods.get(n), _BatchNorm))


@torch.no_grad()
def changed_bn_modules(model: nn.Module, state: Mapping[str, torch.Tensor], graph: UnitGraph,
                       kept: Mapping[str, Any], data, *, depth: int | None = None,
                       device="cpu") -> list[str]:
    """BatchNorm modules whose input changes when `state` is dropped out to D_depth (every
    group at once when `depth` is None): those of groups deeper than `depth` (a layered
    network's rule) plus those whose input differs on one batch of `data` (a batch tensor
    or a loader). The second part catches what depths miss in residual networks: the
    BatchNorm after each block's last convolution writes a stream group of depth 1, yet its
    input changes. `model` is used as a work copy (its weights are overwritten)."""
    if not has_batchnorm(model):
        return []
    depth = min(graph.depths) if depth is None else depth
    names = set(_bn_modules(model, graph, depth + 1))
    x = first_input(data)
    if x is None:
        return sorted(names)
    x = x[:64].to(device)
    mods = {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm)}
    seen: list[dict[str, torch.Tensor]] = []
    for sd in (state, dropout_state(state, graph, kept, depth)):
        got: dict[str, torch.Tensor] = {}
        handles = [m.register_forward_pre_hook(lambda _m, args, n=n: got.__setitem__(n, args[0].detach()))
                   for n, m in mods.items()]
        try:
            model.load_state_dict(sd)
            model.eval()(x)
        finally:
            for h in handles:
                h.remove()
        seen.append(got)
    names |= {n for n in mods if n in seen[0] and n in seen[1] and not torch.equal(seen[0][n], seen[1][n])}
    return sorted(names)


@torch.no_grad()
def reestimate_bn(model: nn.Module, state: Mapping[str, torch.Tensor], loader: Iterable[Any],
                  modules: list[str], *, device="cpu") -> StateDict:
    """Running statistics of the BatchNorm `modules` of `model` loaded with `state`,
    re-estimated on `loader` (cumulative average, `update_bn(modules=...)`), every other
    module in eval mode with its own statistics. Returns `{tensor name: statistics}`;
    `model` keeps `state`."""
    if not modules:
        return {}
    model.load_state_dict(state)
    update_bn(model, loader, device=device, progress=False, modules=modules)
    mods = dict(model.named_modules())
    return {f"{n}.{k}": getattr(mods[n], k).detach().cpu().clone()
            for n in modules for k in _BN_STATS if getattr(mods[n], k, None) is not None}


def dropout_network(model: nn.Module, state: Mapping[str, torch.Tensor], graph: UnitGraph,
                    kept: Mapping[str, Any], depth: int, *, bn_loader: Iterable[Any] | None = None,
                    device="cpu") -> tuple[StateDict, StateDict]:
    """(D_depth state, its re-estimated BN tensors): `dropout_state` plus, for BatchNorm
    networks with a `bn_loader`, the statistics of the BatchNorm layers whose input changes
    (`changed_bn_modules`) re-estimated (`model` is used as a work copy: its weights are overwritten)."""
    sd = dropout_state(state, graph, kept, depth)
    stats: StateDict = {}
    if bn_loader is not None and has_batchnorm(model):
        stats = reestimate_bn(model, sd, bn_loader,
                              changed_bn_modules(model, state, graph, kept, bn_loader, depth=depth,
                                                 device=device), device=device)
        sd.update(stats)
    return sd, stats


def _subset(loader: Iterable[Any], n: int, *, what: str = "dropout stability") -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n` labelled examples of `loader` as one (inputs, int64 targets) pair;
    `DataSpecError` when the loader yields nothing (`what` names the job in messages)."""
    xs, ys, got = [], [], 0
    for batch in loader:
        x, y = labelled_batch(batch, what=what)
        xs.append(x)
        ys.append(y.long())
        got += x.shape[0]
        if got >= n:
            break
    if not xs:
        raise DataSpecError(f"{what}: the data loader yielded no batches", option="data")
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


def _importance(work: nn.Module, state: Mapping[str, torch.Tensor], graph: UnitGraph,
                x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per group: sum over the unit's consumer columns of ||outgoing weights|| x the mean
    |input| the consumer sees there (weight norm alone where the input is not seen)."""
    mods = dict(work.named_modules())
    seen: dict[str, torch.Tensor] = {}

    def hook(name, axis):
        def fn(_m, args):
            a = args[0].detach().abs().movedim(axis, 0)
            seen[name] = a.reshape(a.shape[0], -1).mean(1) if a.dim() > 1 else a
        return fn

    handles = []
    for g in graph.groups:
        for r in g.refs("consumer"):
            m = mods.get(r.module)
            axis = -1 if isinstance(m, nn.Linear) else 1 if isinstance(m, nn.modules.conv._ConvNd) else None
            if axis is not None and r.module not in {h[0] for h in handles}:
                handles.append((r.module, m.register_forward_pre_hook(hook(r.module, axis))))
    work.load_state_dict(state)
    try:
        with torch.no_grad():
            work(x)
    finally:
        for _, h in handles:
            h.remove()
    scores = {}
    for g in graph.groups:
        s = torch.zeros(g.size, dtype=torch.float64)
        for r in g.refs("consumer"):
            w = state[r.tensor].detach().double().movedim(r.axis, 0)
            norms = w.reshape(w.shape[0], -1).norm(dim=1)
            act = seen.get(r.module)
            col = norms if act is None else norms * act.double().cpu()
            s += col[r.indices(range(g.size))].reshape(g.size, r.block).sum(1)
        scores[g.name] = s
    return scores


@torch.no_grad()
def _proxy_loss(work: nn.Module, sd: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                bn_train: list[str]) -> float:
    """Loss of `sd` on (x, y); the BatchNorm modules `bn_train` use batch statistics (a
    cheap stand-in for re-estimation while searching)."""
    work.load_state_dict(sd)
    mods = dict(work.named_modules())
    try:
        for n in bn_train:
            mods[n].train()
        return float(F.cross_entropy(work(x), y))
    finally:
        for n in bn_train:
            mods[n].eval()


def unit_slopes(work: nn.Module, g: UnitGroup, state: Mapping[str, torch.Tensor], graph: UnitGraph,
                kept: Mapping[str, Any], depth: int, forward, y: torch.Tensor) -> torch.Tensor:
    """dL/dm_u for every unit u of g (float64), L the cross entropy on labels `y` of what
    `forward()` returns with `work` holding the dropout network D_depth of `state` (halves
    `kept`), m_u the multiplier of u's consumer columns there (2 kept, 0 dropped): the sum
    over u's columns of the loss gradient times the tensor's value with every other group's
    multipliers applied. One backward pass; only g's consumer tensors take a gradient."""
    refs = g.refs("consumer")
    names = list(dict.fromkeys(r.tensor for r in refs))
    params = work.state_dict(keep_vars=True)  # parameters and buffers (a consumer tensor may be either)
    flags = {n: p.requires_grad for n, p in params.items() if p.is_floating_point()}
    for n in flags:
        params[n].requires_grad_(n in names)
    try:
        with torch.enable_grad():
            out = forward()
            loss = F.cross_entropy(out[0] if isinstance(out, (tuple, list)) else out, y)
            grads = dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names])))
    finally:
        for n, f in flags.items():
            params[n].requires_grad_(f)
    others: dict[str, list] = {}
    for h in graph.groups:
        if h is not g and h.depth >= depth:
            for r in h.refs("consumer"):
                if r.tensor in grads:
                    others.setdefault(r.tensor, []).append((h, r))
    total = torch.zeros(g.size, dtype=torch.float64)
    for r in refs:
        w = state[r.tensor] if r.tensor not in others else _scaled(state[r.tensor], others[r.tensor], kept)
        t = (grads[r.tensor].detach().double().cpu() * w.double()).movedim(r.axis, 0)
        t = t.reshape(t.shape[0], -1).sum(1)
        total += t[r.indices(range(g.size))].reshape(g.size, r.block).sum(1)
    return total


#: the kept-half search keeps every group's frontier values for every D_k (taken in one pass
#: each) while they take at most this many bytes; above, one group's at a time
FRONTIER_BYTES = 1 << 30


class _DepthSearch:
    """The objective max_{k<=depth} L(D_k) + 1e-3 sum_k L(D_k) on (x, y) for the accepted
    kept halves, and swap trials against it. Each D_k (BatchNorm modules of groups deeper
    than k on batch statistics) is kept; a trial of group g recomputes only g's consumer
    tensors (`dropout_state(base=, only=)`), copies only changed tensors into the work
    model and, with a torch.fx trace (`Partial`), runs only the part of the network those
    tensors reach, from the values flowing out of the rest (one short pass per group and
    depth). The depths are tried worst first and a trial stops as soon as the objective
    cannot fall whatever the untried losses (>= 0): the same decisions as evaluating every
    D_k in full, in fewer forwards."""

    def __init__(self, work: nn.Module, state: Mapping[str, torch.Tensor], graph: UnitGraph,
                 kept: dict[str, list[int]], x: torch.Tensor, y: torch.Tensor):
        self.work, self.state, self.graph, self.kept, self.x, self.y = work, state, graph, kept, x, y
        bn = has_batchnorm(work)
        mods = dict(work.named_modules())
        self.bn = {k: [mods[n] for n in _bn_modules(work, graph, k + 1)] if bn else [] for k in graph.depths}
        self.dst = work.state_dict(keep_vars=True)
        self.stats = {k for k in self.dst if k.rsplit(".", 1)[-1] in _BN_STATS}  # dirtied by batch statistics
        self.loaded: dict[str, torch.Tensor] = {}
        self.partial = Partial.make(work, x)
        self.dropped = {k: dropout_state(state, graph, kept, k) for k in graph.depths}
        self.frontiers: dict[int, dict[str, dict]] = {}  # depth -> group -> its frontier values under D_k
        # every group's frontier from each D_k's first pass, when they fit in FRONTIER_BYTES
        # (else each is computed when its group is searched, and dropped after: `forget`)
        keep = graph.groups if self.partial is not None and \
            self.partial.frontier_bytes(graph.groups) * len(graph.depths) <= FRONTIER_BYTES else ()
        self.losses = {k: self._loss(k, self.dropped[k], keep=keep) for k in graph.depths}
        self.forwards = len(self.losses)
        self.skipped = 0

    @staticmethod
    def value(ls) -> float:
        ls = list(ls)
        return max(ls) + 1e-3 * sum(ls)

    def _load(self, sd: Mapping[str, torch.Tensor]) -> None:
        self.loaded = copy_changed(self.dst, sd, self.loaded, self.stats)

    @torch.no_grad()
    def _loss(self, k: int, sd, g: UnitGroup | None = None, *, keep: Iterable[UnitGroup] = ()) -> float:
        """Loss of D_k state `sd` on (x, y): from g's frontier when given, else a full pass
        that keeps the frontier values of the groups `keep` (D_k's own: `sd` is D_k)."""
        self._load(sd)
        for m in self.bn[k]:
            m.train()
        try:
            if self.partial is None:
                out = self.work(self.x)
            elif g is None or self.partial.plan(g) is None:
                out, fronts = self.partial.keeping([h for h in keep if self.partial.plan(h) is not None])
                self.frontiers.setdefault(k, {}).update(fronts)
            else:
                out = self.partial(g, self.frontiers[k][g.name])
            return float(F.cross_entropy(out[0] if isinstance(out, (tuple, list)) else out, self.y))
        finally:
            for m in self.bn[k]:
                m.eval()

    @torch.no_grad()
    def _frontier(self, k: int, g: UnitGroup) -> None:
        if self.partial is None or self.partial.plan(g) is None or g.name in self.frontiers.get(k, {}):
            return
        self._load(self.dropped[k])
        for m in self.bn[k]:
            m.train()
        try:
            self.frontiers.setdefault(k, {})[g.name] = self.partial.frontier(g, None)
        finally:
            for m in self.bn[k]:
                m.eval()

    def forget(self, g: UnitGroup) -> None:
        """Drop g's frontier values (its trials are over)."""
        for fronts in self.frontiers.values():
            fronts.pop(g.name, None)

    def objective(self, depth: int) -> float:
        return self.value(v for k, v in self.losses.items() if k <= depth)

    def unit_gradients(self, g: UnitGroup) -> torch.Tensor:
        """`unit_slopes` of g in the worst D_k over g's depths on (x, y): one backward pass,
        over the part of the network g's consumers reach when the model traces."""
        k = max((k for k in self.graph.depths if k <= g.depth), key=lambda k: self.losses[k])
        self._frontier(k, g)
        self._load(self.dropped[k])

        def forward():
            if self.partial is not None and self.partial.plan(g) is not None:
                return self.partial(g, self.frontiers[k][g.name])
            return self.work(self.x)

        for m in self.bn[k]:
            m.train()
        try:
            return unit_slopes(self.work, g, self.state, self.graph, self.kept, k, forward, self.y)
        finally:
            for m in self.bn[k]:
                m.eval()

    def trial(self, g: UnitGroup, new: list[int]) -> bool:
        """Try `new` as g's kept half; keep it (True) when the objective over the depths
        <= g's falls by more than 1e-7."""
        depths = sorted((k for k in self.graph.depths if k <= g.depth), key=lambda k: -self.losses[k])
        best = self.value(self.losses[k] for k in depths)
        names = {r.tensor for r in g.refs("consumer")}
        cand = dict(self.kept)
        cand[g.name] = new
        got: dict[int, float] = {}
        sds = {}
        for k in depths:
            if got and self.value(got.values()) >= best - 1e-7:
                self.skipped += len(depths) - len(got)
                return False
            sds[k] = dropout_state(self.state, self.graph, cand, k, base=self.dropped[k], only=names)
            self._frontier(k, g)
            got[k] = self._loss(k, sds[k], g)
            self.forwards += 1
        if self.value(got.values()) >= best - 1e-7:
            return False
        self.kept[g.name] = new
        self.dropped.update(sds)
        self.losses.update(got)
        for k in got:  # frontiers of other groups whose upstream part reads g's consumer tensors
            fronts = self.frontiers.get(k, {})
            for h in [h for h in fronts if h != g.name and self.partial.upstream_reads(h, names)]:
                del fronts[h]
        return True


def random_swaps(search: "_DepthSearch", g: UnitGroup, scores: torch.Tensor,
                 gen: torch.Generator) -> list[int] | None:
    """The next trial of the random order: a swap drawn by rank (`swap_trial`)."""
    return swap_trial(g.size, search.kept[g.name], scores, gen)


class GuidedSwaps:
    """The next trial of the guided order: the untried swap whose first-order change of the
    objective is lowest. With m_u the multiplier of unit u's consumer columns in D_k (2 kept,
    0 dropped), the swap of a kept unit i for a dropped unit o changes the loss of the worst
    D_k over g's depths by about 2 (dL/dm_o - dL/dm_i); dL/dm_u is the sum over u's
    columns of weight x gradient (one backward pass over the part of the network g's
    consumers reach, `_DepthSearch.unit_gradients`), taken again after every accepted swap.
    None once every swap of the current half has been tried."""

    def __init__(self) -> None:
        self.gradients = 0
        self._at: tuple[str, tuple[int, ...]] | None = None
        self._tried: set[tuple[int, int]] = set()
        self._grad: torch.Tensor | None = None

    def __call__(self, search: "_DepthSearch", g: UnitGroup, scores: torch.Tensor,
                 gen: torch.Generator) -> list[int] | None:
        kept = search.kept[g.name]
        at = (g.name, tuple(kept))
        if at != self._at:
            self._at, self._tried = at, set()
            self._grad = search.unit_gradients(g)
            self.gradients += 1
        grad = self._grad
        inside = torch.zeros(g.size, dtype=torch.bool)
        inside[kept] = True
        ks, ds = inside.nonzero().reshape(-1), (~inside).nonzero().reshape(-1)
        delta = grad[ds][None, :] - grad[ks][:, None]  # (kept i, dropped o): about half the change
        for i, o in self._tried:
            delta[(ks == i).nonzero().reshape(-1), (ds == o).nonzero().reshape(-1)] = float("inf")
        flat = int(torch.argmin(delta))
        if not torch.isfinite(delta.reshape(-1)[flat]):
            return None
        i, o = int(ks[flat // len(ds)]), int(ds[flat % len(ds)])
        self._tried.add((i, o))
        return sorted([u for u in kept if u != i] + [o])


def _search(work: nn.Module, state: Mapping[str, torch.Tensor], graph: UnitGraph,
            kept: dict[str, list[int]], scores: dict[str, torch.Tensor], x: torch.Tensor,
            y: torch.Tensor, steps: int, seed: int, bar, patience: int | None = None,
            guided: bool = True) -> dict[str, Any]:
    """Local search, group by group from the top: swap a kept unit for a dropped one; keep
    the swap when max_k<=depth L(D_k) (+ a small share of their sum) goes down on (x, y)
    (`_DepthSearch`). The trials come in the guided order (`GuidedSwaps`: the predicted
    best swap first) or, with `guided=False`, drawn at random by importance rank
    (`random_swaps`: weak kept units and strong dropped ones first). A group's trials stop
    after `steps`, after `patience` rejections in a row (None: never), or when no untried
    swap is left. `kept` is changed in place. Returns what the search did (trials,
    accepted, forwards, gradients)."""
    gen = torch.Generator().manual_seed(seed)
    search = _DepthSearch(work, state, graph, kept, x, y)
    propose = GuidedSwaps() if guided else random_swaps
    start = search.objective(max(graph.depths))
    trials = accepted = 0
    for g in sorted(graph.groups, key=lambda g: -g.depth):
        h = len(kept[g.name])
        if h == 0 or g.size - h == 0 or steps <= 0:
            continue
        miss = 0
        for i in range(steps):
            new = None if patience is not None and miss >= patience else propose(search, g, scores[g.name], gen)
            if new is None:
                bar.update(steps - i)
                break
            trials += 1
            if search.trial(g, new):
                accepted += 1
                miss = 0
            else:
                miss += 1
            bar.update()
        search.forget(g)
    return {"steps": steps, "patience": patience, "order": "guided" if guided else "random",
            "examples": int(x.shape[0]), "trials": trials, "accepted": accepted,
            "gradients": getattr(propose, "gradients", 0), "forwards": search.forwards,
            "skipped_forwards": search.skipped, "partial_forwards": search.partial is not None,
            "objective_start": start, "objective_end": search.objective(max(graph.depths))}


def dropout_stability(model: nn.Module, state: Mapping[str, torch.Tensor], loader: Iterable[Any], *,
                      graph=None, bn_loader: Iterable[Any] | None = None, device="cpu",
                      search_steps: int = 48, search_examples: int = 512, kept=None,
                      seed: int = 0, progress: bool | None = None, search_patience: int | None = 4,
                      search_guided: bool = True, depths: Iterable[int] | None = None,
                      measure: bool = True) -> StabilityResult:
    """Measure the dropout stability of `state` (a state dict of `model`'s architecture).

    For each depth k of the unit graph, the loss on `loader` of D_k (the kept halves
    of every group at depth >= k, outgoing weights doubled; BatchNorm statistics of the
    groups deeper than k re-estimated on `bn_loader`, default `loader`) minus the loss of
    the full network. `kept` (group -> units) skips the choice; else importance ranking
    plus up to `search_steps` swap trials per group on `search_examples` examples (the first
    ones of `loader`), a group's trials stopping after `search_patience` rejections in a row
    (None: all `search_steps`). The trials come best predicted first (`GuidedSwaps`: a
    first-order estimate from one backward pass, taken again after each accepted swap), or,
    with `search_guided=False`, drawn at random by importance rank (`random_swaps`).
    `depths`: the depths to measure (default every depth of the unit graph; the packed pair
    needs only the lowest). The D_k's BatchNorm statistics and losses are taken in one pass
    over the data for all of them (`_partial.Family`) where the model traces. `measure=False`:
    choose the halves and re-estimate BatchNorm only, no loss (losses and eps NaN).
    `model` is not changed (a copy does the work).
    """
    if search_steps < 0 or search_examples < 1:
        raise BadOptionError("search_steps must be >= 0 and search_examples >= 1",
                             option="search_steps")
    if search_patience is not None and search_patience < 1:
        raise BadOptionError(f"search_patience must be >= 1 or None, got {search_patience!r}",
                             option="search_patience")
    state = {k: v.detach().cpu() for k, v in state.items()}
    work = copy.deepcopy(model).to(device).eval()
    graph = graph_for(work, loader, graph)
    graph.validate(state)
    fast_layout(work, loader)
    bn_loader = loader if bn_loader is None else bn_loader
    measured = list(graph.depths) if depths is None else sorted(set(int(k) for k in depths))
    if not measured or any(k not in graph.depths for k in measured):
        raise BadOptionError(f"depths must be some of the unit graph's depths {list(graph.depths)}, "
                             f"got {measured}", option="depths")
    total = search_steps * len(graph.groups) if kept is None else 0
    bar = tqdm(total=total + len(measured), desc="dropout stability", leave=False,
               file=sys.stderr, disable=None if progress is None else not progress)
    search: dict[str, Any] = {}
    t0 = time.perf_counter()
    try:
        if kept is None:
            x, y = _subset(loader, search_examples)
            x, y = x.to(device), y.to(device)
            scores = _importance(work, state, graph, x)
            kept = {g.name: default_kept(g, scores[g.name]) for g in graph.groups}
            if search_steps > 0:
                search = _search(work, state, graph, kept, scores, x, y, search_steps, seed, bar,
                                 patience=search_patience, guided=search_guided)
            else:
                search = {"steps": 0, "examples": int(x.shape[0]), "trials": 0, "accepted": 0}
            search["seconds"] = time.perf_counter() - t0
        kept = check_kept(graph, kept)
        nan = float("nan")
        states = {k: dropout_state(state, graph, kept, k) for k in measured}
        fam = _family(work, state, states, loader, device)
        rows, stats = [], {}
        if fam is not None:  # every D_k in one pass over the data, sharing what lies below depth k
            if bn_loader is not None and has_batchnorm(work):
                stats = _family_stats(fam, bn_loader, {k: changed_bn_modules(
                    work, state, graph, kept, bn_loader, depth=k, device=device) for k in measured}, device)
            for k in measured:
                states[k].update(stats.setdefault(k, {}))
            fam.replan()
            base, losses = _family_losses(fam, loader, device) if measure else (nan, {})
            for k in measured:
                loss = losses.get(k, nan)
                rows.append({"depth": int(k), "loss": loss, "increase": loss - base})
                bar.update()
        else:
            base = evaluate(_loaded(work, state), loader, device=device).loss if measure else nan
            for k in measured:
                sd, stats[k] = dropout_network(work, state, graph, kept, k, bn_loader=bn_loader,
                                               device=device)
                loss = evaluate(_loaded(work, sd), loader, device=device).loss if measure else nan
                rows.append({"depth": int(k), "loss": loss, "increase": loss - base})
                bar.update()
    finally:
        bar.close()
    eps = max([0.0] + [r["increase"] for r in rows]) if measure else nan
    return StabilityResult(eps, base, rows, kept, stats, graph, search)


#: the dropout networks of one checkpoint are evaluated together (`_partial.Family`) while
#: the tensors they change take at most this many bytes; one at a time above that
FAMILY_BYTES = 1 << 30


def _family(work: nn.Module, base: StateDict, states: dict[int, StateDict], loader: Iterable[Any],
            device) -> Family | None:
    """The D_k `states` of `base` as one `Family` (None: evaluate them one at a time, as
    when the model does not trace, under mixed precision, or above `FAMILY_BYTES`)."""
    if not states or resolve_precision(None, device).enabled:
        return None
    size = distinct_bytes(t for sd in states.values() for n, t in sd.items() if t is not base[n])
    if size > FAMILY_BYTES:
        return None
    x = first_input(loader)
    return None if x is None else Family.make(work, x.to(device), base, states)


def _family_batches(loader: Iterable[Any], device, labelled: bool):
    prec = resolve_precision(None, device)
    for batch in loader:
        if labelled:
            x, y = labelled_batch(batch, what="dropout stability")
            yield prec.input(x.to(device)), y.to(device).long()
        else:
            yield prec.input(batch_input(batch).to(device)), None


@torch.no_grad()
def _family_stats(fam: Family, loader: Iterable[Any], modules: dict[int, list[str]],
                  device) -> dict[int, StateDict]:
    """`reestimate_bn` of every state of `fam` in one pass over `loader`: per state, its
    BatchNorm `modules` on batch statistics, accumulated as `update_bn` does (cumulative
    average, momentum None), every other module in eval mode with its own statistics."""
    mods = dict(fam.work.named_modules())
    use = {k: [n for n in names if mods[n].track_running_stats] for k, names in modules.items()}
    acc = {k: {n: {b: (torch.ones_like if b == "running_var" else torch.zeros_like)(getattr(mods[n], b))
                   for b in _BN_STATS if getattr(mods[n], b, None) is not None} for n in names}
           for k, names in use.items()}
    fam.replan({k: {f"{n}.running_mean" for n in names} for k, names in use.items()})  # they run in every pass
    fam.always = {f"{n}.{b}" for n in mods if isinstance(mods[n], _BatchNorm) for b in _BN_STATS}
    momenta = {n: m.momentum for n, m in mods.items() if isinstance(m, _BatchNorm)}

    def before(k):
        for n, bufs in acc[k].items():
            for b, t in bufs.items():
                getattr(mods[n], b).copy_(t)
            mods[n].momentum = None
            mods[n].train()

    def after(k):
        for n, bufs in acc[k].items():
            for b, t in bufs.items():
                t.copy_(getattr(mods[n], b))
            mods[n].momentum = momenta[n]
            mods[n].eval()

    seen = 0
    try:
        for x, _ in _family_batches(loader, device, False):
            fam.run(x, before=before, after=after)
            seen += 1
    finally:
        fam.always = set()
    if not seen:
        raise DataSpecError("dropout stability: the BatchNorm data loader yielded no batches; give a non-empty "
                            "data set", option="data")
    return {k: {f"{n}.{b}": t.cpu() for n, bufs in acc[k].items() for b, t in bufs.items()} for k in acc}


@torch.no_grad()
def _family_losses(fam: Family, loader: Iterable[Any], device) -> tuple[float, dict[int, float]]:
    """Mean cross entropy on `loader` of the base and of every state of `fam` (as `evaluate`
    sums it: float64 totals of float32 per-batch sums)."""
    totals: dict[Any, float] = {None: 0.0, **{k: 0.0 for k in fam.states}}
    n = 0
    for x, y in _family_batches(loader, device, True):
        out, outs = fam.run(x)
        for k, o in ((None, out), *outs.items()):
            totals[k] += float(F.nll_loss(_log_probs(o, y), y, reduction="sum").double())
        n += y.shape[0]
    if n == 0:
        raise DataSpecError("dropout stability: the data loader yielded no examples; give a non-empty data set",
                            option="data")
    return totals.pop(None) / n, {k: v / n for k, v in totals.items()}


def _loaded(work: nn.Module, sd: Mapping[str, torch.Tensor]) -> nn.Module:
    work.load_state_dict(sd)
    return work


def check_kept(graph: UnitGraph, kept: Mapping[str, Any]) -> dict[str, list[int]]:
    """`kept` as sorted lists, after checking it names `size // 2` distinct units of every
    group (`BadOptionError(option="kept")` naming the group otherwise)."""
    out = {}
    for g in graph.groups:
        if g.name not in kept:
            raise BadOptionError(f"kept halves name no units for group {g.name!r}", option="kept")
        units = sorted(int(u) for u in kept[g.name])
        if len(units) != g.size // 2 or len(set(units)) != len(units) or \
                any(not 0 <= u < g.size for u in units):
            raise BadOptionError(f"group {g.name!r} ({g.size} units) needs exactly {g.size // 2} "
                                 f"distinct kept units in 0..{g.size - 1}", option="kept")
        out[g.name] = units
    return out


def swap_trial(size: int, kept: list[int], score: torch.Tensor, gen: torch.Generator) -> list[int]:
    """One local-search trial on a kept half of `size` units: a kept unit traded for a dropped
    one, drawn by rank (weak kept units and strong dropped units first, weight 1 / rank).
    Returns the new kept units, sorted. The one swap move of the kept-half searches (here and
    the short path's joint search)."""
    k_units = torch.tensor(kept)
    mask = torch.ones(size, dtype=torch.bool)
    mask[k_units] = False
    d_units = mask.nonzero().reshape(-1)
    ki = k_units[torch.argsort(score[k_units])]
    di = d_units[torch.argsort(score[d_units], descending=True)]
    wk = 1.0 / torch.arange(1, len(ki) + 1, dtype=torch.float64)
    wd = 1.0 / torch.arange(1, len(di) + 1, dtype=torch.float64)
    i = int(ki[torch.multinomial(wk, 1, generator=gen)])
    o = int(di[torch.multinomial(wd, 1, generator=gen)])
    return sorted([u for u in kept if u != i] + [o])
