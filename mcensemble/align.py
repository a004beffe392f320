"""Permutation alignment over the unit graph, and REPAIR for interpolated networks.

Independently trained networks differ by a permutation of their hidden units. Weight
matching (Ainsworth et al. 2022, "Git Re-Basin") permutes B's units to match A's: it
maximises `sum_t <A_t, P(B)_t>` over the tensors of the unit graph by coordinate descent
over groups. For one group `g` with the others fixed, the objective is a linear
assignment with cost `C[i, j] = sum over g's member axes of <A unit i, P(B) unit j>`
(every other axis flattened, other groups' axes of B already permuted), solved with
`scipy.optimize.linear_sum_assignment`. Groups are visited in a seeded random order each
sweep, until a sweep improves no group. Residual streams are one group in the unit graph,
so they share one permutation; nothing is written by hand per architecture.

The permuted B computes exactly the same function as B (`align_states` checks this on an
example input). BatchNorm running statistics are permuted with their units but are not
part of the matching objective (they are statistics, not weights).

REPAIR (Jordan et al. 2022): on the straight line between two networks, the hidden
units' activations lose variance ("variance collapse"). `Repair` rescales the
interpolated network so that, per channel, the statistics of the pre-activations equal
the interpolation `(1-t) stats_A + t stats_B` of the endpoints' statistics:

- groups with BatchNorm: the BN weight is set to `sign(w_t) * ((1-t) std_A + t std_B)`
  and the bias to `(1-t) mean_A + t mean_B`, where mean / std are those of the BN
  outputs of A and B on the data (their BN statistics re-estimated first); then the BN
  statistics are re-estimated (`update_bn`), so that the BN outputs of the interpolated
  network have those statistics (in BN nets this is close to plain BN re-estimation);
- groups without BatchNorm: each producing Linear / Conv module's output rows and bias
  are rescaled and shifted to the target mean / std, one depth at a time (a pass over
  the data per depth), shallowest first.
"""
from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm import tqdm

from ._modes import modes_kept
from .bn import batch_input, has_batchnorm, update_bn
from .data import example_input as make_input
from .errors import BadOptionError, DataSpecError, UnitGraphError
from .evaluate import _load_state_strict
from .models import ModelLike, as_factory
from .paths.base import check_same_layout
from .paths.linear import interpolate
from .precision import resolve_precision
from .units import UnitGraph, UnitGroup, build_unit_graph, permute_state_dict

__all__ = ["AlignResult", "weight_matching", "align_states", "matching_objective", "Repair",
           "repair", "RepairedPath"]

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
_STAT_SUFFIXES = (".running_mean", ".running_var")


# ----------------------------------------------------------------------------- weight matching
@dataclass
class AlignResult:
    """Result of weight matching. `state`: B with its units permuted to match A (same
    keys as B; untouched tensors are B's own). `perms[name][i]`: the unit of B that
    becomes unit `i` (as `permute_state_dict` takes it). `history`: the objective before
    the first sweep and after each sweep (non-decreasing). `moved`: fraction of all
    hidden units whose index changed."""

    state: StateDict
    perms: dict[str, torch.Tensor]
    graph: UnitGraph
    iterations: int
    converged: bool
    objective_before: float
    objective_after: float
    history: list[float] = field(default_factory=list)

    @property
    def moved(self) -> float:
        n = sum(p.numel() for p in self.perms.values())
        changed = sum(int((p != torch.arange(p.numel())).sum()) for p in self.perms.values())
        return changed / n if n else 0.0

    def to_dict(self, *, include_perms: bool = False) -> dict[str, Any]:
        """JSON-ready summary (for `--report`); perms as lists when asked for."""
        d: dict[str, Any] = {
            "iterations": self.iterations, "converged": self.converged,
            "objective_before": self.objective_before, "objective_after": self.objective_after,
            "groups": len(self.perms), "moved": self.moved}
        if include_perms:
            d["perms"] = {k: v.tolist() for k, v in self.perms.items()}
        return d


def _objective_names(graph: UnitGraph, state: Mapping[str, torch.Tensor],
                     groups: Iterable[UnitGroup] | None = None) -> list[str]:
    names = dict.fromkeys(r.tensor for g in (graph.groups if groups is None else groups)
                          for r in g.members)
    return [n for n in names if not n.endswith(_STAT_SUFFIXES) and state[n].is_floating_point()]


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a.reshape(-1).double(), b.reshape(-1).double()))


def matching_objective(graph: UnitGraph, a_state: Mapping[str, torch.Tensor],
                       b_state: Mapping[str, torch.Tensor]) -> float:
    """`sum_t <A_t, B_t>` over the floating tensors of the unit graph's groups (BatchNorm
    running statistics left out): what weight matching maximises."""
    return sum(_dot(a_state[n], b_state[n]) for n in _objective_names(graph, a_state))


def _unit_rows(t: torch.Tensor, ref, size: int) -> torch.Tensor:
    """`[size, -1]`: row i holds every entry of `t` that belongs to unit i along `ref`."""
    return t.movedim(ref.axis, 0).narrow(0, ref.offset, size * ref.block).reshape(size, -1)


def _work(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class _Matcher:
    """State of the coordinate descent: A and the current permuted B (half precision
    raised to float32), the per-tensor inner products <A_t, B_t> (float64) and the
    permutations so far. Cost matrices are computed in float32 (fast); whether a step
    improves the objective is decided on float64 inner products."""

    def __init__(self, graph: UnitGraph, a_state, b_state, perms: dict[str, torch.Tensor]):
        self.names = _objective_names(graph, a_state)
        self.a = {n: _work(a_state[n]) for n in self.names}
        bcur = permute_state_dict(b_state, graph, perms) if any(
            not torch.equal(p, torch.arange(p.numel())) for p in perms.values()) else dict(b_state)
        self.b = {n: _work(bcur[n]) for n in self.names}  # B's own tensors unless half precision
        self.bcur, self.perms = bcur, perms
        self.dots = {n: _dot(self.a[n], self.b[n]) for n in self.names}
        # |A_t| |B_t| does not change under permutations: the scale of a step's tolerance
        self.norms = {n: math.sqrt(_dot(self.a[n], self.a[n]) * _dot(self.b[n], self.b[n]))
                      for n in self.names}

    def objective(self) -> float:
        return sum(self.dots.values())

    def cost(self, g: UnitGroup) -> torch.Tensor:
        c = torch.zeros(g.size, g.size, dtype=torch.float64, device=self.a[self.names[0]].device)
        for r in g.members:
            if r.tensor in self.a:
                c += (_unit_rows(self.a[r.tensor], r, g.size)
                      @ _unit_rows(self.b[r.tensor], r, g.size).T).double()
        return c

    def improve(self, g: UnitGroup, tol: float) -> float:
        """One coordinate step: the best permutation of `g` given the others. Applied when
        the objective, computed exactly (so a group on two axes of one tensor, where the
        step is only an approximation, is safe too), rises by more than `tol` (relative)."""
        from scipy.optimize import linear_sum_assignment

        cost = self.cost(g).cpu()
        if not torch.isfinite(cost).all():
            raise BadOptionError(f"weight matching: non-finite weights in unit group {g.name!r}",
                                 option="state")
        _, cols = linear_sum_assignment(cost.numpy(), maximize=True)
        sigma = torch.as_tensor(cols, dtype=torch.long)
        if torch.equal(sigma, torch.arange(g.size)):
            return 0.0
        names = list(dict.fromkeys(r.tensor for r in g.members if r.tensor in self.a))
        weights = UnitGraph([UnitGroup(g.name, g.size, [r for r in g.members if r.tensor in self.a])])
        new = permute_state_dict({n: self.b[n] for n in names}, weights, {g.name: sigma})
        dots = {n: _dot(self.a[n], new[n]) for n in names}
        gain = sum(dots[n] - self.dots[n] for n in names)
        scale = sum(self.norms[n] for n in names)
        if not gain > tol * max(scale, 1e-300):
            return 0.0
        self.dots.update(dots)
        # the group's tensors that `new` already holds permuted (B's own dtype: the same
        # tensors) are not permuted a second time: one copy of the group, not two
        shared = {n for n in names if new[n].dtype == self.bcur[n].dtype}
        rest = {r.tensor: self.bcur[r.tensor] for r in g.members if r.tensor not in shared}
        self.b.update(new)
        self.bcur.update({n: new[n] for n in shared})
        del new
        if rest:
            others = UnitGroup(g.name, g.size, [r for r in g.members if r.tensor not in shared])
            self.bcur.update(permute_state_dict(rest, UnitGraph([others]), {g.name: sigma}))
        self.perms[g.name] = self.perms[g.name][sigma]
        return gain


def weight_matching(graph: UnitGraph, a_state: Mapping[str, torch.Tensor],
                    b_state: Mapping[str, torch.Tensor], *, max_iter: int = 100, seed: int = 0,
                    init_perms: Mapping[str, Any] | None = None, tol: float = 1e-9,
                    progress: bool | None = None) -> AlignResult:
    """Git Re-Basin weight matching of B to A over `graph` (coordinate descent over the
    groups, one linear assignment per step, groups in a random order seeded by `seed` each
    sweep) until a sweep improves no group or `max_iter` sweeps ran. `init_perms`: start
    from these permutations (default identity). Returns an `AlignResult` whose `state` is
    the permuted B. The states are not modified. Memory: A's and B's grouped tensors are
    """
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise BadOptionError(f"max_iter must be a positive integer, got {max_iter!r}",
                             option="max_iter")
    graph.validate(a_state)
    graph.validate(b_state)
    perms = {g.name: torch.arange(g.size) for g in graph.groups}
    for name, p in (init_perms or {}).items():
        perms[graph.group(name).name] = torch.as_tensor(p, dtype=torch.long).cpu().clone()
    m = _Matcher(graph, a_state, b_state, perms)
    history = [m.objective()]
    gen = torch.Generator().manual_seed(int(seed))
    groups = [g for g in graph.groups if g.size > 1]
    converged, it = not groups, 0
    bar = tqdm(range(max_iter if groups else 0), desc="weight matching", unit="sweep",
               leave=False, file=sys.stderr, disable=None if progress is None else not progress)
    for it in bar:
        order = torch.randperm(len(groups), generator=gen).tolist()
        gain = sum(m.improve(groups[i], tol) for i in order)
        history.append(m.objective())
        if gain == 0.0:
            converged = True
            break
    bar.close()
    log.debug("weight matching: %d sweeps, objective %.6g -> %.6g", it + 1, history[0], history[-1])
    return AlignResult(state=m.bcur, perms=m.perms, graph=graph, iterations=len(history) - 1,
                       converged=converged, objective_before=history[0],
                       objective_after=history[-1], history=history)


def _output(model: nn.Module, state: Mapping[str, torch.Tensor], x) -> torch.Tensor:
    out = torch.func.functional_call(model, dict(state), x if isinstance(x, tuple) else (x,))
    if isinstance(out, (tuple, list)):
        out = out[0]
    elif isinstance(out, Mapping):
        out = out.get("logits", next(iter(out.values())))
    return out.float()


def align_states(model: ModelLike, a_state: Mapping[str, torch.Tensor],
                 b_state: Mapping[str, torch.Tensor], *, graph: UnitGraph | None = None,
                 example_input: Any = None, max_iter: int = 100, seed: int = 0,
                 verify: bool = True, progress: bool | None = None,
                 precision: str | None = None) -> AlignResult:
    """Permute B's hidden units to match A's (weight matching, see `weight_matching`).

    `model`: a ModelLike of the architecture (never changed). `graph`: its unit graph
    (default: traced with `build_unit_graph` on `example_input`, which defaults to
    `data.example_input(model)`). `verify`: check on the example input that the permuted
    B computes the same outputs as B (else `UnitGraphError`: the unit graph is wrong for
    this model; pass one by hand). `precision` (None: `current_precision()`, the CLI's
    --precision): the check's two forward passes run under autocast in that dtype, and then
    agree to a relative 3e-2 instead of 1e-4 (the permutation changes the order of the
    half-precision roundings; a wrong unit graph changes the outputs by far more). Weight
    matching itself runs no forward pass: it is the same at every precision.

    Memory: the model is built for tracing and again for the check, never held while
    matching; besides the caller's A and B, matching holds the permuted B (one model) and one
    permuted copy of the group being changed."""

    check_same_layout(a_state, b_state)
    factory = as_factory(model)
    net = factory().eval()
    if graph is None or verify:
        if example_input is None:
            example_input = make_input(net)
        example_input = (tuple(example_input) if isinstance(example_input, (tuple, list))
                         else (example_input,))
    if graph is None:
        graph = build_unit_graph(net, tuple(x[:1] for x in example_input))
    del net  # not held while matching (memory: one model less); a fresh instance checks the result
    res = weight_matching(graph, a_state, b_state, max_iter=max_iter, seed=seed, progress=progress)
    if verify:
        with torch.random.fork_rng(devices=[]):  # building it must not move the caller's RNG
            net = factory().eval()
        device = next(iter(b_state.values())).device if b_state else "cpu"
        prec = resolve_precision(precision, device)
        with torch.no_grad(), prec.autocast():
            ref, got = (_output(net, s, tuple(prec.input(x) for x in example_input)) for s in (b_state, res.state))
        err = float((ref - got).abs().max()) if ref.numel() else 0.0
        if not err <= (3e-2 if prec.enabled else 1e-4) * max(1.0, float(ref.abs().max())):
            raise UnitGraphError(
                f"the permuted B computes other outputs than B (max difference {err:.3g}): the "
                "unit graph misses a tensor axis of this model; pass the groups by hand "
                "(UnitGraph JSON, groups=)")
    return res


# ----------------------------------------------------------------------------- REPAIR
@dataclass(frozen=True)
class _Point:
    """A place where REPAIR sets per-channel statistics: a BatchNorm module ("bn": its
    input is measured, its weight / bias are set) or a producing Linear / Conv ("producer":
    its output is measured, its rows / bias rescaled)."""

    module: str
    kind: str
    depth: int


def _repair_points(net: nn.Module, graph: UnitGraph) -> list[_Point]:
    points: dict[str, _Point] = {}
    for g in graph.groups:
        bns = [r.module for r in g.refs("bn") if isinstance(_submodule(net, r.module), _BatchNorm)]
        bns = [m for m in bns if _submodule(net, m).affine and _submodule(net, m).track_running_stats]
        if bns:
            for m in bns:
                points.setdefault(m, _Point(m, "bn", g.depth))
            continue
        for r in g.refs("producer"):
            mod = _submodule(net, r.module)
            ok = isinstance(mod, nn.Linear) or (isinstance(mod, nn.modules.conv._ConvNd)
                                                and not mod.transposed and mod.groups == 1)
            if ok and r.tensor == f"{r.module}.weight" and not any(
                    isinstance(_submodule(net, b.module), _BatchNorm) for b in g.refs("bn")):
                points.setdefault(r.module, _Point(r.module, "producer", g.depth))
    return list(points.values())


def _submodule(net: nn.Module, name: str) -> nn.Module | None:
    try:
        return net.get_submodule(name)
    except AttributeError:
        return None


@torch.no_grad()
def _channel_stats(net: nn.Module, points: list[_Point], loader: Iterable[Any], device,
                   max_batches: int | None, precision: str | None = None
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean and variance (over batch and spatial axes, float64) of each point's
    input (bn) or output (producer), in eval mode, over the loader; the forward passes under
    autocast at `precision` (None: `current_precision()`), the sums accumulated in float64."""
    prec = resolve_precision(precision, device)
    acc: dict[str, list] = {}

    def record(name: str, y: torch.Tensor, chan_last: bool) -> None:
        c = -1 if chan_last else 1
        y = y.movedim(c, 0).reshape(y.shape[c], -1).double()
        s = acc.setdefault(name, [0.0, 0.0, 0])
        s[0], s[1], s[2] = s[0] + y.sum(1), s[1] + (y * y).sum(1), s[2] + y.shape[1]

    handles = []
    for p in points:
        mod = net.get_submodule(p.module)
        if p.kind == "bn":
            handles.append(mod.register_forward_pre_hook(
                lambda m, args, n=p.module: record(n, args[0], False)))
        else:
            handles.append(mod.register_forward_hook(
                lambda m, args, out, n=p.module, cl=isinstance(mod, nn.Linear): record(n, out, cl)))
    seen = 0
    try:
        with modes_kept(net, False):
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                with prec.autocast():
                    net(prec.input(batch_input(batch).to(device)))
                seen += 1
    finally:
        for h in handles:
            h.remove()
    if not seen:
        raise DataSpecError("REPAIR: the data loader yielded no batches to measure channel "
                            "statistics on; give a non-empty training data set", option="data")
    out = {}
    for name, (s, ss, n) in acc.items():
        mean = s / n
        out[name] = (mean, (ss / n - mean * mean).clamp_min(0.0))
    return out


def _bn_output_stats(bn: _BatchNorm, mean: torch.Tensor, var: torch.Tensor):
    """Mean and std of an eval-mode BN's affine output, given its input's statistics."""
    rstd = (bn.running_var.double() + bn.eps).rsqrt()
    w, b = bn.weight.double(), bn.bias.double()
    return w * (mean - bn.running_mean.double()) * rstd + b, w.abs() * var.sqrt() * rstd


class Repair:
    """REPAIR for interpolated states between `a_state` and `b_state` (same architecture,
    B usually already aligned). The endpoints' channel statistics are measured once, on
    `loader` (up to `max_batches` batches), at construction; `repair(state, t)` (or
    `self(state, t)`) returns a new state dict for the network at `t`, with BatchNorm
    statistics re-estimated on the same loader. Cost per call: one pass when every group
    has BatchNorm; one more pass per depth holding BN-less groups, plus a final BN pass.
    `points` lists what is corrected (module, kind "bn" / "producer", depth). `precision`
    ("fp32", "bf16", "fp16"; None: `current_precision()`, the CLI's --precision): the
    forward passes that measure statistics run under autocast; the statistics are summed in
    float64 (channel statistics) and float32 (BatchNorm re-estimation)."""

    def __init__(self, model: ModelLike, a_state: Mapping[str, torch.Tensor],
                 b_state: Mapping[str, torch.Tensor], loader: Iterable[Any], *,
                 graph: UnitGraph | None = None, example_input: Any = None,
                 device: str | torch.device = "cpu", max_batches: int | None = None,
                 precision: str | None = None):

        self.precision = resolve_precision(precision, device).name  # checked before any work

        self.net = as_factory(model)().to(device).eval()
        if graph is None:
            x = example_input if example_input is not None else make_input(self.net)
            graph = build_unit_graph(self.net, x[:1] if isinstance(x, torch.Tensor) else x)
        self.graph, self.loader, self.device, self.max_batches = graph, loader, device, max_batches
        self.points = _repair_points(self.net, graph)
        if not self.points:
            log.info("REPAIR: no BatchNorm or Linear / Conv producer to correct; only BatchNorm "
                     "statistics are re-estimated")
        self._load = _load_state_strict
        self.targets = [self._endpoint_stats(s) for s in (a_state, b_state)]

    @torch.no_grad()
    def _endpoint_stats(self, state) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        self._load(self.net, state)
        if has_batchnorm(self.net):  # as the endpoints of a scan: statistics re-estimated
            update_bn(self.net, self.loader, device=self.device, max_batches=self.max_batches,
                      progress=False, precision=self.precision)
        raw = _channel_stats(self.net, self.points, self.loader, self.device, self.max_batches,
                             self.precision)
        out = {}
        for p in self.points:
            mean, var = raw[p.module]
            out[p.module] = (_bn_output_stats(self.net.get_submodule(p.module), mean, var)
                             if p.kind == "bn" else (mean, var.sqrt()))
        return out

    def _target(self, name: str, t: float):
        (ma, sa), (mb, sb) = self.targets[0][name], self.targets[1][name]
        return (1 - t) * ma + t * mb, (1 - t) * sa + t * sb

    @torch.no_grad()
    def __call__(self, state: Mapping[str, torch.Tensor], t: float) -> StateDict:
        try:
            t = float(t)
        except (TypeError, ValueError) as e:
            raise BadOptionError(f"t must be a number in [0, 1], got {t!r}", option="t") from e
        if not 0.0 <= t <= 1.0:
            raise BadOptionError(f"t must be in [0, 1], got {t}", option="t")
        self._load(self.net, state)
        for p in (p for p in self.points if p.kind == "bn"):
            bn = self.net.get_submodule(p.module)
            mean, std = self._target(p.module, t)
            sign = torch.where(bn.weight < 0, -1.0, 1.0).double()
            bn.weight.copy_(sign * std)
            bn.bias.copy_(mean)
        has_bn = has_batchnorm(self.net)
        if has_bn:
            update_bn(self.net, self.loader, device=self.device, max_batches=self.max_batches,
                      progress=False, precision=self.precision)
        producers = [p for p in self.points if p.kind == "producer"]
        for depth in sorted({p.depth for p in producers}):
            at = [p for p in producers if p.depth == depth]
            now = _channel_stats(self.net, at, self.loader, self.device, self.max_batches, self.precision)
            for p in at:
                self._rescale(p, now[p.module], t)
        if producers and has_bn:
            update_bn(self.net, self.loader, device=self.device, max_batches=self.max_batches,
                      progress=False, precision=self.precision)
        return {k: v.detach().clone() for k, v in self.net.state_dict().items()}

    def _rescale(self, p: _Point, now, t: float) -> None:
        mod = self.net.get_submodule(p.module)
        mean_t, var_t = now
        mean, std = self._target(p.module, t)
        scale = std / (var_t.sqrt() + 1e-8)
        mod.weight.mul_(scale.view(-1, *[1] * (mod.weight.dim() - 1)).to(mod.weight))
        if mod.bias is not None:
            mod.bias.copy_((mod.bias.double() - mean_t) * scale + mean)

    repair = __call__


def repair(model: ModelLike, a_state: Mapping[str, torch.Tensor], b_state: Mapping[str, torch.Tensor],
           t: float, loader: Iterable[Any], *, graph: UnitGraph | None = None,
           device: str | torch.device = "cpu", max_batches: int | None = None) -> StateDict:
    """The REPAIRed state at `t` of the straight line from A to B (one-off; build a
    `Repair` once to repair many points of the same pair)."""
    r = Repair(model, a_state, b_state, loader, graph=graph, device=device, max_batches=max_batches)
    return r(interpolate(a_state, b_state, t), t)


class RepairedPath:
    """A straight line whose interior points get REPAIR (Jordan et al. 2022): each hidden
    channel's statistics rescaled to the interpolation of the endpoints' (see `Repair`).
    `path`: a `paths.LinearPath`; `net`, `loader`, `device`: as for `Repair`."""

    kind = "linear"

    def __init__(self, path, net, loader, *, device="cpu"):
        self.path, self.endpoints, self.groups = path, path.endpoints, path.groups
        self.certificate = None
        self._repair = Repair(net, *path.endpoints, loader, device=device)

    def state_at(self, t: float) -> dict:
        state = self.path.state_at(t)
        return state if t in (0.0, 1.0) else self._repair(state, t)
