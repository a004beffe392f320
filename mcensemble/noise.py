"""Noise stability of a checkpoint, per unit group (Arora et al. 2018, "Stronger
generalization bounds for deep nets via a compression approach"; the short path of
Theorem 2 rests on it).

Trained nets reject noise injected into a layer: the higher layers barely notice. Arora
et al. name the properties behind this; here they are estimated on one data batch
(`examples` labelled examples, eval mode) for every unit group g of the unit graph.

Notation. z = the group's units as its consumers read them (every consumer read: for a
layered net the layer's output after its activation, for a residual-stream group the stream
at every block and downsample layer that reads it; the identity path is not a read). M_j(z)
= a target reached from there: the network's logits, or another group's reads. J_j = the
Jacobian of z -> M_j at the clean z (forward-mode autodiff). Norms are per example, over
all reads together. A condition that must hold "for every x" becomes the minimum (maximum
for c) over the batch. The paper injects noise into layer i's pre-activation x^i; here it
goes where the units are read (after the activation), the place channel dropout acts, so
that the two noise kinds are compared at one place.

- Layer cushion mu_g: min over examples and over the group's producer layers A
  (Linear / convolution, bias left out) of ||A u|| / (||A||_F ||u||), u = the layer's input.
  ||A||_F is the exact Frobenius norm of the layer as an operator on its input (the sum of
  the layer with its weights squared, run on an input of ones: padding counted). In (0, 1].
- Interlayer cushion mu_{g->} (the paper's minimal interlayer cushion, without its
  1/sqrt(h) term): min over examples and over the reached targets j of
  ||J_j z|| / (||J_j||_F ||z||); ||J_j||_F^2 = E ||J_j v||^2 over v ~ N(0, I) (Hutchinson,
  `probes` draws per example). Targets not reached are skipped.
- Activation contraction c_g: max over examples and over the nonlinearities the
  group's units pass through (ReLU, GELU, SiLU, ... found in the torch.fx trace) of
  ||x|| / ||phi(x)||, x = the nonlinearity's input (pre-activation). None where the group
  meets no nonlinearity, or the model cannot be traced (a hand-given unit graph).
- Interlayer smoothness rho_delta, per noise kind: r_j = M_j(z + eta) - M_j(z) -
  J_j eta, the part of the noise's effect that the linearisation misses (for bias-free ReLU
  nets this is the paper's M(z + eta) - J(z + eta)); per example rho = min over targets of
  ||eta|| ||M_j(z)|| / (||z|| ||r_j||); rho_delta = the largest rho that holds for a
  1 - delta share of the examples (their delta-quantile). Infinite (null in JSON) when
  the noise met no nonlinearity (r = 0: a piecewise-linear net within one linear piece;
  ||r_j|| under 100 float eps of ||M_j|| counts as rounding, i.e. 0).

Noise kinds (`NOISE_KINDS`), added to every read of the group (eta from the clean reads):
"gaussian": eta = scale * ||z|| * v / ||v||, v ~ N(0, I), per read and example (relative
size exactly `scale`); "dropout": channel dropout of the group's units as in `stability`,
p = 0.5, one mask per example shared by all reads, kept units scaled by 1 / (1 - p):
eta = z * (mask / (1 - p) - 1) (relative size 1 at p = 0.5). On layered nets this is the
dropped network exactly; on a residual stream the propagated part is not masked again. Per
kind also: `relative_noise` (mean ||eta|| / ||z||), `output_change` (mean ||f(z + eta) -
f(z)|| / ||f(z)||, f the logits) and `loss_increase` (cross-entropy, noisy minus clean).
"""
from __future__ import annotations

import copy
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
import torch.autograd.forward_ad as fwAD
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoints import load_checkpoint
from .errors import BadOptionError, MCEnsembleError
from .hooks import _unit_axis
from .inputs import data_loaders, model_arg, unit_graph_of
from .options import DataOptions
from .stability import _subset, graph_for
from .units import UnitGraph, UnitGroup, _Builder, _Label, _trace

__all__ = ["NOISE_KINDS", "GroupNoise", "NoiseStability", "noise_stability", "noise_stability_of_file"]

log = logging.getLogger(__name__)

#: the noise kinds, in report order
NOISE_KINDS = ("gaussian", "dropout")
_OUT = "<output>"
_P = 0.5

_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
                nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.PReLU)
_ACT_FUNCTIONS = frozenset({F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid,
                            F.tanh, F.leaky_relu, F.elu, F.selu, F.mish, F.softplus, F.hardtanh, torch.relu,
                            torch.relu_, torch.sigmoid, torch.tanh})
_ACT_METHODS = frozenset({"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"})


@dataclass
class GroupNoise:
    """One unit group's row: `noise[kind]` = {relative_noise, output_change, smoothness,
    loss_increase}. None: not measurable here (no producer layer, no nonlinearity, no
    consumer run); smoothness may be inf (null in JSON): the noise met no curvature."""

    name: str
    depth: int
    units: int
    layer_cushion: float | None
    interlayer_cushion: float | None
    activation_contraction: float | None
    noise: dict[str, dict[str, float | None]]

    def to_dict(self) -> dict[str, Any]:
        return {"group": self.name, "depth": self.depth, "units": self.units,
                "layer_cushion": self.layer_cushion, "interlayer_cushion": self.interlayer_cushion,
                "activation_contraction": self.activation_contraction,
                "noise": {k: dict(v) for k, v in self.noise.items()}}


@dataclass
class NoiseStability:
    """What `noise_stability` measured: one `GroupNoise` per group (graph order) and the
    settings. `network()`: the whole net's figures (min cushions and smoothness, max c)."""

    scale: float
    p: float
    delta: float
    probes: int
    examples: int
    base_loss: float
    groups: list[GroupNoise]
    graph: UnitGraph | None = field(default=None, repr=False)

    def network(self) -> dict[str, Any]:
        def pick(fn, vals):
            vals = [v for v in vals if v is not None]
            return fn(vals) if vals else None
        rows = self.groups
        return {"layer_cushion": pick(min, [g.layer_cushion for g in rows]),
                "interlayer_cushion": pick(min, [g.interlayer_cushion for g in rows]),
                "activation_contraction": pick(max, [g.activation_contraction for g in rows]),
                **{f"{k}_smoothness": pick(min, [g.noise[k]["smoothness"] for g in rows]) for k in NOISE_KINDS},
                **{f"{k}_output_change": pick(max, [g.noise[k]["output_change"] for g in rows])
                   for k in NOISE_KINDS}}

    def to_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "p": self.p, "delta": self.delta, "probes": self.probes,
                "examples": self.examples, "base_loss": self.base_loss, "network": self.network(),
                "groups": [g.to_dict() for g in self.groups]}


# ----------------------------------------------------------------------------- reads
def _norm(ts: list[torch.Tensor | None]) -> torch.Tensor | None:
    """Per-example norm of tensors taken together (None: nothing there)."""
    ts = [t for t in ts if t is not None]
    if not ts:
        return None
    return torch.sqrt(sum(t.detach().double().flatten(1).pow(2).sum(1) for t in ts))


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den per example; inf where den is 0 (the bound puts no limit there)."""
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, math.inf))


class _Tap:
    """Forward pre-hooks on every consumer of the unit graph: each pass records every
    group's units as read (primal and forward-AD tangent, in call order), and can add a
    fixed perturbation (`add`) or a tangent (`tangent`), one tensor per read, to the reads
    of one group."""

    def __init__(self, model: nn.Module, graph: UnitGraph):
        entries: dict[str, list[tuple[str, int, int]]] = {}
        for g in graph.groups:
            for r in g.refs("consumer"):
                entries.setdefault(r.module, []).append((g.name, r.offset, g.size * r.block))
        self._handles = []
        self.reads: dict[str, list[torch.Tensor]] = {}
        self.tangents: dict[str, list[torch.Tensor | None]] = {}
        self.axes: dict[str, list[int]] = {}
        self.group: str | None = None
        self.add: list[torch.Tensor] | None = None
        self.tangent: list[torch.Tensor] | None = None
        try:
            for name, ent in entries.items():
                mod = model.get_submodule(name)
                self._handles.append(mod.register_forward_pre_hook(self._hook(ent, _unit_axis(mod, name))))
        except AttributeError as e:
            self.remove()
            raise BadOptionError(f"the unit graph names consumer {name!r}, which the model does not have",
                                 option="graph") from e
        except MCEnsembleError:
            self.remove()
            raise

    def _hook(self, entries: list[tuple[str, int, int]], axis: int):
        def pre_hook(_m, args):
            x = args[0]
            prim, tan = fwAD.unpack_dual(x)
            extra: dict[str, torch.Tensor] = {}
            for group, off, n in entries:
                self.reads.setdefault(group, []).append(prim.narrow(axis, off, n).detach())
                self.tangents.setdefault(group, []).append(None if tan is None else tan.narrow(axis, off, n))
                self.axes.setdefault(group, []).append(axis % prim.dim())
                i = len(self.reads[group]) - 1
                for kind, src in (("add", self.add), ("tangent", self.tangent)):
                    if group == self.group and src is not None:
                        full = extra.setdefault(kind, torch.zeros_like(prim))
                        full.narrow(axis, off, n).add_(src[i])
            if not extra:
                return None
            if "add" in extra:
                x = x + extra["add"]
            if "tangent" in extra:
                x = x + fwAD.make_dual(torch.zeros_like(prim), extra["tangent"])
            return (x, *args[1:])
        return pre_hook

    def run(self, model: nn.Module, x: torch.Tensor, *, group: str | None = None, add=None, tangent=None):
        """(logits, their tangent or None) of one pass; `self.reads` / `self.tangents` filled."""
        self.reads, self.tangents, self.axes = {}, {}, {}
        self.group, self.add, self.tangent = group, add, tangent
        try:
            with torch.no_grad():
                if tangent is None:
                    return model(x), None
                with fwAD.dual_level():
                    out = fwAD.unpack_dual(model(x))
                    tangents = {k: [None if t is None else t.clone() for t in v] for k, v in self.tangents.items()}
                    self.tangents = tangents
                    return out.primal.clone(), (None if out.tangent is None else out.tangent.clone())
        finally:
            self.group = self.add = self.tangent = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


# ----------------------------------------------------------------------------- measuring
@dataclass
class _Run:
    """One measurement's shared state: the work model, its tap, the batch and the clean pass."""

    work: nn.Module
    tap: _Tap
    x: torch.Tensor
    y: torch.Tensor
    out: torch.Tensor
    reads: dict[str, list[torch.Tensor]]
    axes: dict[str, list[int]]
    scale: float
    probes: int
    delta: float

    def targets(self, group: str, out, reads: Mapping[str, list]) -> dict[str, list]:
        """What a group's noise can reach: the logits and every other group's reads."""
        return {**{j: v for j, v in reads.items() if j != group}, _OUT: [out]}


def _randn(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """N(0, 1) shaped like `like`, drawn on the generator's device in float32."""
    return torch.randn(like.shape, generator=gen, device=gen.device, dtype=torch.float32).to(like.device, like.dtype)


def _per_example(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def _eta(kind: str, run: _Run, group: UnitGroup, gen: torch.Generator) -> list[torch.Tensor]:
    """The noise of `kind` on each clean read of `group` (see the module docstring)."""
    z = run.reads[group.name]
    if kind == "gaussian":
        out = []
        for t in z:
            v = _randn(t, gen)
            k = run.scale * _norm([t]) / _norm([v]).clamp_min(1e-300)
            out.append(v * _per_example(k, t))
        return out
    m = torch.bernoulli(torch.full((z[0].shape[0], group.size), 1.0 - _P, device=gen.device), generator=gen)
    m = m / (1.0 - _P) - 1.0
    out = []
    for t, axis in zip(z, run.axes[group.name]):
        shape = [t.shape[0]] + [1] * (t.dim() - 1)
        shape[axis] = t.shape[axis]
        block = t.shape[axis] // group.size
        out.append(t * m.repeat_interleave(block, dim=1).to(t.device, t.dtype).view(shape))
    return out


def _interlayer_cushion(run: _Run, group: str, gen: torch.Generator) -> float | None:
    """min over examples and reached targets j of ||J_j z|| / (||J_j||_F ||z||)."""
    z = run.reads[group]
    f2: dict[str, torch.Tensor] = {}
    for _ in range(run.probes):
        _, tout = run.tap.run(run.work, run.x, group=group, tangent=[_randn(t, gen) for t in z])
        for j, ts in run.targets(group, tout, run.tap.tangents).items():
            n = _norm(ts)
            if n is not None:
                f2[j] = f2.get(j, 0) + n ** 2
    _, tout = run.tap.run(run.work, run.x, group=group, tangent=z)
    jz = run.targets(group, tout, run.tap.tangents)
    zn = _norm(z)
    worst = torch.full_like(zn, math.inf)
    for j, s in f2.items():
        num = _norm(jz.get(j, []))
        num = torch.zeros_like(zn) if num is None else num
        worst = torch.minimum(worst, _ratio(num, torch.sqrt(s / run.probes) * zn))
    val = float(worst.min())
    return val if math.isfinite(val) else None


def _noise_effect(run: _Run, group: str, eta: list[torch.Tensor], base: float) -> dict[str, float | None]:
    """How `eta` on the group's reads reaches the targets: smoothness, output change, loss."""
    z = run.reads[group]
    nout, _ = run.tap.run(run.work, run.x, group=group, add=eta)
    noisy = run.targets(group, nout, run.tap.reads)
    _, jout = run.tap.run(run.work, run.x, group=group, tangent=eta)
    lin = run.targets(group, jout, run.tap.tangents)
    en, zn = _norm(eta), _norm(z)
    tol = 100 * torch.finfo(run.out.dtype).eps
    rho = torch.full_like(zn, math.inf)
    for j, clean in run.targets(group, run.out, run.reads).items():
        r = [n - c - (t if t is not None else 0) for n, c, t in zip(noisy[j], clean, lin.get(j) or [None] * len(clean))]
        rn, cn = _norm(r), _norm(clean)
        rn = torch.where(rn <= tol * (cn + _norm(noisy[j])), torch.zeros_like(rn), rn)  # rounding, not curvature
        rho = torch.minimum(rho, _ratio(en * cn, zn * rn))
    k = int(math.floor(run.delta * (rho.numel() - 1)))
    smooth = float(torch.sort(rho).values[k])
    seen = zn > 0
    return {"relative_noise": float((en[seen] / zn[seen]).mean()) if bool(seen.any()) else 0.0,
            "output_change": float((_norm([nout - run.out]) / _norm([run.out]).clamp_min(1e-300)).mean()),
            "smoothness": smooth,
            "loss_increase": float(F.cross_entropy(nout.double(), run.y)) - base}


def _op_fro(m: nn.Module, u: torch.Tensor) -> torch.Tensor:
    """||A||_F of a Linear / convolution (bias left out) as an operator on one input like
    u[0]: the layer with its weights squared, run on ones, summed (zero padding counted)."""
    params = {"weight": m.weight.detach() ** 2}
    if getattr(m, "bias", None) is not None:
        params["bias"] = torch.zeros_like(m.bias)
    out = torch.func.functional_call(m, params, (torch.ones_like(u[:1]),))
    return out.double().sum().clamp_min(0).sqrt()


def _layer_cushions(run: _Run, graph: UnitGraph) -> dict[str, float | None]:
    """Per group: min over examples and producers of ||A u|| / (||A||_F ||u||)."""
    seen: dict[str, list[torch.Tensor]] = {}
    fro: dict[tuple, torch.Tensor] = {}

    def hook(name: str):
        def fn(m, args, out):
            u = args[0]
            key = (name, tuple(u.shape[1:]))
            if key not in fro:
                fro[key] = torch.tensor(math.nan)  # the norm's own call runs this hook too
                fro[key] = _op_fro(m, u)
            if torch.isnan(fro[key]):
                return
            au = out
            if getattr(m, "bias", None) is not None:
                shape = [1] * out.dim()
                shape[-1 if isinstance(m, nn.Linear) else 1] = -1
                au = out - m.bias.view(shape)
            seen.setdefault(name, []).append(_ratio(_norm([au]), fro[key] * _norm([u])))
        return fn

    handles = []
    for name in {p for g in graph.groups for p in g.producers}:
        m = run.work.get_submodule(name) if name else run.work
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            handles.append(m.register_forward_hook(hook(name)))
    try:
        run.tap.run(run.work, run.x)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for g in graph.groups:
        vals = [float(v.min()) for p in g.producers for v in seen.get(p, [])]
        vals = [v for v in vals if math.isfinite(v)]
        out[g.name] = min(vals) if vals else None
    return out


def _act_module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The activation module a call_module node runs: the module itself, or the `act` of a
    norm-act layer (timm's BatchNormAct2d, which BatchNorm's tracing keeps whole)."""
    if node.op != "call_module":
        return None
    m = gm.get_submodule(node.target)
    inner = m if isinstance(m, _ACT_MODULES) else getattr(m, "act", None)
    return inner if isinstance(inner, _ACT_MODULES) else None


def _is_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return _act_module(gm, node) is not None
    if node.op == "call_method":
        return node.target in _ACT_METHODS
    if node.op == "call_function":
        try:
            return node.target in _ACT_FUNCTIONS
        except TypeError:  # unhashable target
            return False
    return False


def _activation_sites(model: nn.Module, graph: UnitGraph, x: torch.Tensor):
    """(traced module, {activation node: [(group, axis, offset, length)]}), from the same
    trace and unit labels the unit graph is built from; None when the model cannot be traced."""
    try:
        gm = _trace(model, (x[:2],))
        b = _Builder(gm, model.state_dict())
        b.run()
    except MCEnsembleError as e:
        log.info("noise stability: no activation contraction (%s)", e)
        return None
    names = {g.name for g in graph.groups}
    sites: dict[fx.Node, list[tuple[str, int, int, int]]] = {}
    for node in gm.graph.nodes:
        src = node.args[0] if node.args else None
        lab = b.labels.get(src) if isinstance(src, fx.Node) else None
        if not isinstance(lab, _Label) or not _is_activation(gm, node):
            continue
        off = 0
        for gid, units, block in lab.segs:
            name = b.name[b.find(gid)] if gid is not None else None
            if name in names:
                sites.setdefault(node, []).append((name, lab.dim, off, units * block))
            off += units * block
    return gm, sites


def _contractions(model: nn.Module, graph: UnitGraph, x: torch.Tensor) -> dict[str, float | None]:
    """Per group: max over examples and its nonlinearities of ||x|| / ||phi(x)||. Run it
    before any hook is on `model` (a traced hook would end in the trace)."""
    found = _activation_sites(model, graph, x)
    if found is None:
        return {}
    gm, sites = found
    worst: dict[str, float] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n):
            spec = sites.get(n)
            if spec is None:
                return super().run_node(n)
            seen: dict[str, Any] = {}

            def pre(t):  # norms taken before an in-place activation overwrites its input
                seen["pre"] = [_norm([t.narrow(d, o, k)]) for _, d, o, k in spec]
            act = _act_module(gm, n)
            if act is None:
                pre(self.env[n.args[0]])
                out = seen["post"] = super().run_node(n)
            else:
                hs = [act.register_forward_pre_hook(lambda _m, a: pre(a[0])),
                      act.register_forward_hook(lambda _m, _a, o: seen.__setitem__("post", o))]
                try:
                    out = super().run_node(n)
                finally:
                    for h in hs:
                        h.remove()
            for (name, d, o, k), pn in zip(spec, seen["pre"]):
                c = _ratio(pn, _norm([seen["post"].narrow(d, o, k)]))[pn > 0]
                if c.numel():
                    worst[name] = max(worst.get(name, -math.inf), float(c.max()))
            return out

    with torch.no_grad():
        _Recorder(gm).run(x)
    return {g.name: worst.get(g.name) for g in graph.groups}


def _check_options(scale: float, examples: int, probes: int, delta: float) -> None:
    """BadOptionError naming the keyword of a bad setting (the CLI shows its flag)."""
    checks = (("scale", scale, lambda v: math.isfinite(v) and v >= 0, "a number >= 0"),
              ("examples", examples, lambda v: v == int(v) and v >= 2, "an integer >= 2"),
              ("probes", probes, lambda v: v == int(v) and v >= 1, "an integer >= 1"),
              ("delta", delta, lambda v: 0 <= v < 1, "in [0, 1)"))
    for kw, value, ok, want in checks:
        try:
            good = not isinstance(value, bool) and bool(ok(float(value)))
        except (TypeError, ValueError, OverflowError):
            good = False
        if not good:
            raise BadOptionError(f"noise stability: `{kw}` must be {want}, got {value!r}", option=kw)


def noise_stability(model: nn.Module, loader: Iterable[Any], *, graph=None, scale: float = 0.1,
                    examples: int = 256, probes: int = 8, delta: float = 0.1, seed: int = 0,
                    device="cpu", progress: bool | None = None) -> NoiseStability:
    """Measure the noise-stability quantities of `model` (its own weights, eval mode) on the
    first `examples` labelled examples of `loader`, per group of the unit graph (`graph`
    given, or traced): layer and interlayer cushion, activation contraction, and per noise
    kind (gaussian of relative size `scale`, channel dropout p = 0.5) interlayer smoothness
    rho_delta, relative output change and loss increase (see the module docstring for the
    estimators). `probes`: Hutchinson draws for ||J||_F. Deterministic for a `seed`;
    `model` is not changed (a copy does the work)."""
    _check_options(scale, examples, probes, delta)
    work = copy.deepcopy(model).to(device).eval()
    graph = graph_for(work, loader, graph)
    graph.validate(work.state_dict())
    x, y = _subset(loader, int(examples), what="noise stability")
    x, y = x.to(device), y.to(device)
    contr = _contractions(work, graph, x)
    tap = _Tap(work, graph)
    bar = tqdm(total=len(graph.groups), desc="noise stability", leave=False, file=sys.stderr,
               disable=None if progress is None else not progress)
    try:
        out, _ = tap.run(work, x)
        run = _Run(work, tap, x, y, out, tap.reads, tap.axes, float(scale), int(probes), float(delta))
        base = float(F.cross_entropy(out.double(), y))
        layer = _layer_cushions(run, graph)
        rows = []
        for i, g in enumerate(graph.groups):
            rows.append(_group_row(run, g, int(seed) * 1_000_003 + 8 * i, base, layer.get(g.name), contr.get(g.name)))
            bar.update()
    finally:
        bar.close()
        tap.remove()
    return NoiseStability(float(scale), _P, float(delta), int(probes), int(x.shape[0]), base, rows, graph)


def _group_row(run: _Run, g: UnitGroup, seed: int, base: float, layer, contr) -> GroupNoise:
    """The group's row; the probes and each noise kind draw from generators of their own
    (seeds `seed`, `seed + 1`, ...), so no draw depends on how many came before."""
    def gen(k: int) -> torch.Generator:
        return torch.Generator(device=run.x.device).manual_seed(seed + k)
    if not run.reads.get(g.name):
        log.warning("noise stability: no consumer of group %r ran on the batch; nothing measured", g.name)
        none = {"relative_noise": None, "output_change": None, "smoothness": None, "loss_increase": None}
        return GroupNoise(g.name, g.depth, g.size, layer, None, contr, {k: dict(none) for k in NOISE_KINDS})
    mu = _interlayer_cushion(run, g.name, gen(0))
    noise = {k: _noise_effect(run, g.name, _eta(k, run, g, gen(1 + i)), base) for i, k in enumerate(NOISE_KINDS)}
    return GroupNoise(g.name, g.depth, g.size, layer, mu, contr, noise)


def noise_stability_of_file(file: str | os.PathLike, *, model, data, scale: float = 0.1, examples: int = 256,
                            probes: int = 8, delta: float = 0.1) -> dict[str, Any]:
    """`mcensemble stability --noise`: `noise_stability` of one checkpoint file on the
    training data of `data` (an `options.DataOptions`; `model` an `options.ModelOptions`);
    the JSON-ready report."""
    _check_options(scale, examples, probes, delta)
    ck = load_checkpoint(file, model=model_arg(model), ema=model.ema)
    net = ck.build_model().to(data.device)
    train, _ = data_loaders(net, DataOptions(data=data.data, batch_size=data.batch_size, seed=data.seed,
                                         device=data.device))
    res = noise_stability(net, train, graph=unit_graph_of(net, model), scale=scale, examples=examples,
                          probes=probes, delta=delta, seed=data.seed, device=data.device, progress=data.progress)
    return {"file": str(file), "data": data.data, **res.to_dict()}
