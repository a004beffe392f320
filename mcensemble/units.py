"""The unit graph: which tensor axes of a state dict index the same hidden units.

A *unit group* is a set of hidden units (the neurons of an MLP layer, the channels of a
CNN feature map) together with every (tensor name, axis) of the state dict that indexes
them: the producing layers' output rows and biases, the per-unit vectors of norm layers
(BatchNorm weight / bias / running_mean / running_var, LayerNorm over channels, layer
scales), depthwise convolutions, and the consuming layers' input columns. Permuting a
group's units consistently along all of its axes leaves the network's function unchanged;
zeroing a unit's consumer columns silences it. Channel dropout, the dropout-stable path,
stability measurement and permutation alignment all work on this graph.

The graph is derived by tracing the model with `torch.fx` (honouring timm's not-trace
lists) and propagating shapes of an example input (`ShapeProp`). Every traced op is placed
by a dispatch table (module type / function / method -> handler); an op that touches a
hidden tensor and has no handler raises `UnitGraphError`, and the user can then pass the
groups by hand (`UnitGraph.to_dict()` / `from_dict()` JSON, `graph=`).
"""
from __future__ import annotations

import json
import logging
import math
import operator
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from ._io import atomic_path
from ._modes import modes_kept
from .errors import BadOptionError, UnitGraphError

__all__ = [
    "AxisRef", "UnitGroup", "UnitGraph", "ROLES",
    "build_unit_graph", "permute_state_dict",
]

log = logging.getLogger(__name__)

#: Roles of an AxisRef. "producer": output rows / bias of a layer that mixes units into
#: the group; "bn": a per-unit vector (norm weight / bias / running stats, layer scale);
#: "depthwise": a depthwise conv's axis 0 (it reads and writes the same unit);
#: "consumer": input columns of a layer that mixes the group's units into another group.
ROLES = ("producer", "bn", "depthwise", "consumer")
FORMAT = "mcensemble-units"




# ----------------------------------------------------------------------------- data model
@dataclass(frozen=True)
class AxisRef:
    """One axis of one state-dict tensor that indexes a group's units.

    Unit `i` owns indices `offset + i*block ... offset + (i+1)*block - 1` along `axis`
    (`block > 1` after a Flatten: a Linear reading a C x H x W map gives each channel
    H*W consecutive columns; `offset > 0` after a concatenation).
    """

    tensor: str
    axis: int
    role: str
    block: int = 1
    offset: int = 0

    @property
    def module(self) -> str:
        """Qualified name of the module owning the tensor ('' for the root)."""
        return self.tensor.rpartition(".")[0]

    def indices(self, units) -> torch.Tensor:
        """Axis indices owned by `units` (a sequence / LongTensor of unit indices), in order."""
        units = torch.as_tensor(units, dtype=torch.long).reshape(-1)
        span = torch.arange(self.block, device=units.device)
        return (self.offset + units[:, None] * self.block + span).reshape(-1)

    def to_dict(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "axis": self.axis, "role": self.role,
                "block": self.block, "offset": self.offset}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AxisRef":
        try:
            ref = cls(str(d["tensor"]), int(d["axis"]), str(d.get("role", "consumer")),
                      int(d.get("block", 1)), int(d.get("offset", 0)))
        except (KeyError, TypeError, ValueError) as e:
            raise UnitGraphError(f"bad unit-graph member {d!r}: needs 'tensor' and "
                                 f"'axis' (optional 'role', 'block', 'offset')") from e
        if ref.role not in ROLES or ref.block < 1 or ref.offset < 0 or ref.axis < 0:
            raise UnitGraphError(f"bad unit-graph member {d!r}: role must be one of "
                                 f"{ROLES}, block >= 1, offset >= 0, axis >= 0")
        return ref


@dataclass
class UnitGroup:
    """A group of `size` hidden units and every tensor axis that indexes them.

    `depth`: 1 + the depth of the deepest group read by the group's shallowest producer
    (1 = first hidden layer). `producers` / `consumers`: module names with role
    "producer" / "consumer" members (depthwise convs appear only in `members`).
    """

    name: str
    size: int
    members: list[AxisRef]
    depth: int = 1
    producers: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)

    def refs(self, *roles: str) -> list[AxisRef]:
        """Members with one of `roles` (all members when none are given)."""
        return [r for r in self.members if not roles or r.role in roles]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "depth": self.depth,
                "producers": list(self.producers), "consumers": list(self.consumers),
                "members": [m.to_dict() for m in self.members]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "UnitGroup":
        try:
            name, size, depth = str(d["name"]), int(d["size"]), int(d.get("depth", 1))
            raw = list(d["members"])
        except (KeyError, TypeError, ValueError) as e:
            raise UnitGraphError(f"bad unit group {d.get('name', '?')!r}: needs 'name', "
                                 f"'size', 'members' (optional 'depth')") from e
        members = [AxisRef.from_dict(m) for m in raw]
        prod = d.get("producers") or _modules_with(members, "producer")
        cons = d.get("consumers") or _modules_with(members, "consumer")
        return cls(name, size, members, depth, list(prod), list(cons))


def _modules_with(members: Sequence[AxisRef], role: str) -> list[str]:
    return list(dict.fromkeys(r.module for r in members if r.role == role))


@dataclass
class UnitGraph:
    """The hidden unit groups of a network (sorted by depth) and its classifier tensors."""

    groups: list[UnitGroup]
    classifier: list[str] = field(default_factory=list)

    @property
    def depths(self) -> list[int]:
        return sorted({g.depth for g in self.groups})

    def group(self, name: str) -> UnitGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise UnitGraphError(f"no unit group named {name!r}; groups: "
                             f"{', '.join(g.name for g in self.groups)}")

    def at_depth(self, depth: int) -> list[UnitGroup]:
        return [g for g in self.groups if g.depth == depth]

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": 1, "classifier": list(self.classifier),
                "groups": [g.to_dict() for g in self.groups]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "UnitGraph":
        if not isinstance(d, Mapping) or not isinstance(d.get("groups"), list):
            raise UnitGraphError("a unit graph is a JSON object with a 'groups' list "
                                 "(see UnitGraph.to_dict())")
        groups = [UnitGroup.from_dict(g) for g in d["groups"]]
        names = [g.name for g in groups]
        if len(set(names)) != len(names):
            raise UnitGraphError(f"unit group names must be unique, got {names}")
        return cls(groups, [str(c) for c in d.get("classifier", [])])

    def save(self, file: str | os.PathLike) -> None:
        with atomic_path(file) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, file: str | os.PathLike) -> "UnitGraph":
        try:
            with open(file) as f:
                return cls.from_dict(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            raise UnitGraphError(f"cannot read unit graph {os.fspath(file)!r}: {e}") from e

    def validate(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Check every member against a state dict (tensor exists, axis and range fit)."""
        for g in self.groups:
            if g.size < 1:
                raise UnitGraphError(f"unit group {g.name!r} has size {g.size}")
            for r in g.members:
                t = state_dict.get(r.tensor)
                if t is None:
                    raise UnitGraphError(f"unit group {g.name!r} names tensor {r.tensor!r}, "
                                         f"which the model's state dict does not have")
                if r.axis >= t.dim() or r.offset + g.size * r.block > t.shape[r.axis]:
                    raise UnitGraphError(
                        f"unit group {g.name!r} ({g.size} units, block {r.block}, offset "
                        f"{r.offset}) does not fit axis {r.axis} of {r.tensor!r} with shape "
                        f"{tuple(t.shape)}")
        for name in self.classifier:
            if name not in state_dict:
                raise UnitGraphError(f"classifier tensor {name!r} is not in the state dict")

    def describe(self, *, verbose: bool = False) -> str:
        """Human-readable table (for `mcensemble inspect --units`); `verbose` lists members."""
        lines = [f"{len(self.groups)} hidden unit groups at {len(self.depths)} depths; "
                 f"classifier: {', '.join(self.classifier) or '-'}",
                 f"{'depth':>5}  {'group':<28} {'units':>6}  producers -> consumers"]
        for g in self.groups:
            lines.append(f"{g.depth:>5}  {g.name:<28} {g.size:>6}  "
                         f"{_short(g.producers)} -> {_short(g.consumers)}")
            for r in g.members if verbose else ():
                extra = "".join(f", {k} {v}" for k, v in (("block", r.block), ("offset", r.offset))
                                if v != (1 if k == "block" else 0))
                lines.append(f"{'':>7}{r.role:<10} {r.tensor} axis {r.axis}{extra}")
        return "\n".join(lines)


def _short(names: Sequence[str], n: int = 3) -> str:
    if not names:
        return "-"
    more = f" (+{len(names) - n})" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def permute_state_dict(state_dict: Mapping[str, torch.Tensor], graph: UnitGraph,
                       perms: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A new state dict with the units of each named group permuted: unit `i` of group
    `name` becomes the old unit `perms[name][i]`, along every member axis (blocks and
    offsets respected). Tensors not touched are shared, not copied."""
    out = dict(state_dict)
    for name, perm in perms.items():
        g = graph.group(name)
        perm = torch.as_tensor(perm, dtype=torch.long).cpu()
        if sorted(perm.tolist()) != list(range(g.size)):
            raise BadOptionError(f"permutation for unit group {name!r} must be a permutation "
                                 f"of range({g.size})", option="perms")
        for r in g.members:
            t = out[r.tensor]
            idx = torch.arange(t.shape[r.axis])
            idx[r.offset:r.offset + g.size * r.block] = r.indices(perm)
            out[r.tensor] = t.index_select(r.axis, idx.to(t.device))
    return out


# ----------------------------------------------------------------------------- building
def build_unit_graph(model: nn.Module, example_input=None, *, graph=None) -> UnitGraph:
    """The unit graph of `model`.

    `graph` given (a `UnitGraph`, its `to_dict()` form, a list of `UnitGroup`, or a path
    to a JSON file): validated against `model.state_dict()` and returned; nothing is
    traced. Otherwise the model is traced with torch.fx and `example_input` (a tensor or a
    tuple of tensors, e.g. one batch of shape [1, C, H, W]) is run through it in eval mode
    under `no_grad` to learn shapes; every module's `training` flag is restored afterwards.
    """
    if not isinstance(model, nn.Module):
        raise BadOptionError(f"model must be an nn.Module, got {type(model).__name__}",
                             option="model")
    if graph is not None:
        graph = _as_graph(graph)
        graph.validate(model.state_dict())
        return graph
    if example_input is None:
        raise BadOptionError("build_unit_graph needs example_input (one input batch) to "
                             "trace the model, or graph= by hand", option="example_input")
    inputs = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
    gm = _trace(model, tuple(inputs))
    return _Builder(gm, model.state_dict()).run()


def _as_graph(groups) -> UnitGraph:
    if isinstance(groups, UnitGraph):
        return groups
    if isinstance(groups, (str, os.PathLike)):
        return UnitGraph.load(groups)
    if isinstance(groups, Mapping):
        return UnitGraph.from_dict(groups)
    if isinstance(groups, (list, tuple)) and all(isinstance(g, UnitGroup) for g in groups):
        return UnitGraph(list(groups))
    raise BadOptionError("graph must be a UnitGraph, its to_dict() form, a list of "
                         f"UnitGroup or a JSON file, got {type(groups).__name__}",
                         option="graph")


class _Tracer(fx.Tracer):
    """fx tracer that keeps timm's not-trace modules opaque and wraps its functions."""

    def __init__(self):
        try:
            from timm.layers import _fx as timm_fx
            leaves, fns = set(timm_fx.get_notrace_modules()), tuple(timm_fx.get_notrace_functions())
        except ImportError:  # pragma: no cover - timm is a dependency
            leaves, fns = set(), ()
        super().__init__(autowrap_functions=fns)
        self._leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m) in self._leaves or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module, inputs: tuple) -> fx.GraphModule:
    with modes_kept(model, False):
        try:
            gm = fx.GraphModule(model, _Tracer().trace(model))
        except Exception as e:
            raise UnitGraphError(
                f"cannot trace {type(model).__name__} with torch.fx ({type(e).__name__}: {e}); "
                f"pass the unit groups by hand (graph=, see UnitGraph.from_dict)") from e
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(*inputs)
        except Exception as e:
            shapes = [tuple(x.shape) if torch.is_tensor(x) else type(x).__name__ for x in inputs]
            raise UnitGraphError(f"example input {shapes} does not run through "
                                 f"{type(model).__name__}: {e}") from e
    return gm


@dataclass(frozen=True)
class _Label:
    """Where a traced tensor's units live: axis `dim`, split into segments
    `(gid or None, units, block)` laid out one after another along it."""

    dim: int
    segs: tuple


@dataclass(frozen=True)
class _Param:
    """A state tensor (get_attr) with one non-1 axis `axis`, sitting at `dim` of `ndim`."""

    name: str
    axis: int
    dim: int
    ndim: int


class _Builder:
    """Walks the traced graph once, labelling every tensor with its unit segments and
    collecting AxisRefs into union-find groups."""

    def __init__(self, gm: fx.GraphModule, state: Mapping[str, torch.Tensor]):
        self.gm, self.state = gm, state
        self.labels: dict[fx.Node, Any] = {}
        self.parent: list[int] = []
        self.size: list[int] = []
        self.refs: list[list[AxisRef]] = []
        self.name: list[str] = []
        self.events: list[tuple[int, tuple[int, ...]]] = []  # (new gid, gids it reads)
        self.key2gid: dict[tuple, int] = {}
        self.outputs: list[Any] = []
        self.node: fx.Node | None = None

    # -- union-find and members
    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            raise self.fail(f"ties unit groups of different sizes ({self.size[ra]} and "
                            f"{self.size[rb]})")
        ra, rb = min(ra, rb), max(ra, rb)
        self.parent[rb] = ra

    def new_group(self, size: int, name: str, reads: _Label | None) -> int:
        gid = len(self.parent)
        self.parent.append(gid)
        self.size.append(size)
        self.refs.append([])
        self.name.append(name)
        self.events.append((gid, tuple(s[0] for s in reads.segs if s[0] is not None)
                            if reads else ()))
        return gid

    def add_ref(self, gid: int, ref: AxisRef) -> None:
        key = (ref.tensor, ref.axis, ref.offset, ref.block)
        if key in self.key2gid:  # a tensor axis used twice (shared module): one group
            self.union(gid, self.key2gid[key])
        else:
            self.key2gid[key] = gid
        self.refs[gid].append(ref)

    def add_refs(self, label: _Label, tensor: str, axis: int, role: str) -> None:
        offset = 0
        for gid, units, block in label.segs:
            if gid is not None:
                self.add_ref(gid, AxisRef(tensor, axis, role, block, offset))
            offset += units * block

    def merge(self, a: _Label, b: _Label) -> None:
        if [s[1:] for s in a.segs] != [s[1:] for s in b.segs]:
            raise self.fail("combines tensors whose unit layouts differ")
        for (ga, _, _), (gb, _, _) in zip(a.segs, b.segs):
            if (ga is None) != (gb is None):
                raise self.fail("combines hidden units with non-hidden channels (e.g. the input)")
            if ga is not None:
                self.union(ga, gb)

    # -- node access
    def fail(self, what: str) -> UnitGraphError:
        n = self.node
        op = _op_name(self.gm, n) if n is not None else "?"
        where = f" (node {n.name!r}, module {_module_of(n)!r})" if n is not None else ""
        return UnitGraphError(f"cannot place op {op}{where} on the unit graph: {what}; "
                              f"pass the unit groups by hand (graph=, see UnitGraph.from_dict)")

    def shape(self, arg) -> tuple | None:
        meta = arg.meta.get("tensor_meta") if isinstance(arg, fx.Node) else None
        return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None

    def label(self, arg) -> Any:
        return self.labels.get(arg) if isinstance(arg, fx.Node) else None

    def arg(self, i: int, name: str, default=None):
        n = self.node
        return n.args[i] if len(n.args) > i else n.kwargs.get(name, default)

    # -- the walk
    def run(self) -> UnitGraph:
        for node in self.gm.graph.nodes:
            self.node = node
            self.labels[node] = self.step(node)
        self.node = None
        return self.finish()

    def step(self, node: fx.Node):
        if node.op == "placeholder":
            return None
        if node.op == "get_attr":
            return _param_label(node.target, self.shape(node))
        if node.op == "output":
            fx.node.map_arg(node.args, lambda n: self.outputs.append(self.labels.get(n)))
            return None
        if "tensor_meta" not in node.meta:  # shapes, asserts, flags: no tensor comes out
            return None
        handler, target = _lookup(self.gm, node)
        hidden = any(isinstance(self.labels.get(a), _Label) for a in node.all_input_nodes)
        if handler is None:
            if hidden:
                raise self.fail("no rule for this op")
            log.debug("unit graph: %s (node %r) reads no hidden units; ignored",
                      _op_name(self.gm, node), node.name)
            return None
        return handler(self, target)

    def finish(self) -> UnitGraph:
        roots = list(dict.fromkeys(self.find(g) for g in range(len(self.parent))))
        refs: dict[int, dict[tuple, AxisRef]] = {r: {} for r in roots}
        for g, lst in enumerate(self.refs):
            for r in lst:
                refs[self.find(g)].setdefault((r.tensor, r.axis, r.offset, r.block), r)
        for r in (r for d in refs.values() for r in d.values()):
            if r.tensor not in self.state:
                raise UnitGraphError(f"unit-graph member {r.tensor!r} is not in the state dict "
                                     f"(a constant or non-persistent buffer indexes hidden "
                                     f"units); pass the unit groups by hand")
        out = {self.find(s[0]) for lab in self.outputs if isinstance(lab, _Label)
               for s in lab.segs if s[0] is not None}
        depth = self.depths()
        groups = [UnitGroup(self.name[r], self.size[r], list(refs[r].values()), depth[r],
                            _modules_with(list(refs[r].values()), "producer"),
                            _modules_with(list(refs[r].values()), "consumer"))
                  for r in roots if r not in out]
        groups.sort(key=lambda g: g.depth)  # stable: creation (topological) order within
        classifier = [ref.tensor for r in roots if r in out for ref in refs[r].values()
                      if ref.role != "consumer"]
        return UnitGraph(groups, list(dict.fromkeys(classifier)))

    def depths(self) -> dict[int, int]:
        """depth(group) = min over its producers of 1 + max depth of the groups they read
        (a fixed point, so merges and squeeze-excite loops settle)."""
        inf = float("inf")
        depth = {self.find(g): inf for g in range(len(self.parent))}
        for _ in range(len(self.events) + 1):
            changed = False
            for gid, reads in self.events:
                cand = 1 + max((depth[self.find(r)] for r in reads), default=0)
                root = self.find(gid)
                if cand < depth[root]:
                    depth[root], changed = cand, True
            if not changed:
                break
        return {r: int(d) if d != inf else 1 for r, d in depth.items()}


def _module_of(node: fx.Node) -> str:
    """The module a node belongs to: its target for call_module, else the innermost
    module on the tracer's stack ('<root>' = the model's own forward)."""
    if node.op == "call_module":
        return node.target
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else "<root>"


def _op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return getattr(node.target, "__name__", str(node.target))


def _param_label(name: str, shape: tuple | None) -> _Param | None:
    if not shape:
        return None
    big = [i for i, s in enumerate(shape) if s != 1]
    return _Param(name, big[0], big[0], len(shape)) if len(big) == 1 else None


# ----------------------------------------------------------------------------- handlers
# Each handler is called with the builder (whose `.node` is the current node) and the
# dispatch target (the module for call_module), and returns the output's label.
Handler = Callable[[_Builder, Any], Any]


def _passthrough(b: _Builder, _=None):
    """Per-channel ops (activations, dropout, pooling, identity): units pass through."""
    x = b.label(b.node.args[0]) if b.node.args else None
    if not isinstance(x, _Label):
        return None
    ins, outs = b.shape(b.node.args[0]), b.shape(b.node)
    if ins is None or outs is None or len(ins) != len(outs) or ins[x.dim] != outs[x.dim]:
        raise b.fail("expected an op that keeps the channel axis")
    return x


def _dense(b: _Builder, w_name: str, bias_name: str | None, w_shape, groups: int,
           chan_last: bool):
    """Linear / convolution: consumes the input's units, produces a new group (or, when
    depthwise, passes the input's units through)."""
    node = b.node
    x = b.label(node.args[0])
    ins, outs = b.shape(node.args[0]), b.shape(node)
    in_dim, out_dim = (len(ins) - 1, len(outs) - 1) if chan_last else (1, 1)
    if isinstance(x, _Label) and x.dim != in_dim:
        raise b.fail(f"the layer mixes axis {in_dim}, but the hidden units sit on axis {x.dim}")
    out_ch = w_shape[0]
    if groups == 1:
        if isinstance(x, _Label):
            b.add_refs(x, w_name, 1, "consumer")
        gid = b.new_group(out_ch, w_name.rpartition(".")[0], x if isinstance(x, _Label) else None)
        b.add_ref(gid, AxisRef(w_name, 0, "producer"))
        if bias_name:
            b.add_ref(gid, AxisRef(bias_name, 0, "producer"))
        return _Label(out_dim, ((gid, out_ch, 1),))
    if groups == ins[in_dim] == out_ch:  # depthwise: one filter per unit
        if not isinstance(x, _Label):
            return None
        b.add_refs(x, w_name, 0, "depthwise")
        if bias_name:
            b.add_refs(x, bias_name, 0, "depthwise")
        return x
    raise b.fail(f"grouped convolution (groups={groups}) is not supported")


def _h_linear(b: _Builder, m: nn.Linear):
    t = b.node.target
    return _dense(b, f"{t}.weight", m.bias is not None and f"{t}.bias", m.weight.shape, 1, True)


def _h_conv(b: _Builder, m: nn.modules.conv._ConvNd):
    if m.transposed:
        raise b.fail("transposed convolutions are not supported")
    t = b.node.target
    return _dense(b, f"{t}.weight", m.bias is not None and f"{t}.bias", m.weight.shape,
                  m.groups, False)


def _norm_refs(b: _Builder, names: Sequence[str | None], *, chan_last: bool):
    """Per-unit vectors (norm weight / bias / running stats) on the units of args[0]."""
    x = b.label(b.node.args[0])
    if not isinstance(x, _Label):
        return None
    nd = len(b.shape(b.node.args[0]))
    if x.dim != (nd - 1 if chan_last else 1):
        raise b.fail(f"the norm's per-unit axis is not the axis the units sit on ({x.dim})")
    for name in names:
        if name:
            b.add_refs(x, name, 0, "bn")
    return _passthrough(b)


def _h_batchnorm(b: _Builder, m: nn.modules.batchnorm._BatchNorm):
    t = b.node.target
    names = [f"{t}.{a}" for a in ("weight", "bias", "running_mean", "running_var")
             if getattr(m, a, None) is not None]
    return _norm_refs(b, names, chan_last=False)


def _h_layernorm(b: _Builder, m: nn.LayerNorm):
    if len(m.normalized_shape) != 1:
        raise b.fail("LayerNorm over more than the channel axis")
    t = b.node.target
    return _norm_refs(b, [f"{t}.weight" if m.weight is not None else None,
                          f"{t}.bias" if m.bias is not None else None], chan_last=True)


def _h_groupnorm(b: _Builder, m: nn.GroupNorm):
    if m.num_groups not in (1, m.num_channels):
        raise b.fail(f"GroupNorm with {m.num_groups} groups ties units group-wise")
    t = b.node.target
    return _norm_refs(b, [f"{t}.weight", f"{t}.bias"] if m.affine else [], chan_last=False)


def _h_prelu(b: _Builder, m: nn.PReLU):
    names = [f"{b.node.target}.weight"] if m.num_parameters > 1 else []
    return _norm_refs(b, names, chan_last=False) if names else _passthrough(b)


def _attr_name(b: _Builder, arg) -> str | None:
    if arg is None:
        return None
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        return arg.target
    raise b.fail("its weight is computed, not a state tensor")


def _h_f_batch_norm(b: _Builder, _):
    names = [_attr_name(b, b.arg(i, k)) for i, k in
             ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))]
    return _norm_refs(b, names, chan_last=False)


def _h_f_layer_norm(b: _Builder, _):
    if len(tuple(b.arg(1, "normalized_shape"))) != 1:
        raise b.fail("layer_norm over more than the channel axis")
    names = [_attr_name(b, b.arg(2, "weight")), _attr_name(b, b.arg(3, "bias"))]
    return _norm_refs(b, names, chan_last=True)


def _h_f_linear(b: _Builder, _):
    w = _attr_name(b, b.arg(1, "weight"))
    return _dense(b, w, _attr_name(b, b.arg(2, "bias")), b.shape(b.node.args[1]), 1, True)


def _h_f_conv(b: _Builder, _):
    w = _attr_name(b, b.arg(1, "weight"))
    return _dense(b, w, _attr_name(b, b.arg(2, "bias")), b.shape(b.node.args[1]),
                  b.arg(6, "groups", 1), False)


def _h_elementwise(b: _Builder, _=None):
    """add / sub / mul / div: tensors carrying units are tied (residuals, gating);
    per-unit parameters become "bn" members; broadcast size-1 axes are free."""
    node = b.node
    outs = b.shape(node)
    nd = len(outs)
    operands = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]
    hidden = [(a, b.labels[a]) for a in operands if isinstance(b.labels.get(a), _Label)]
    if not hidden:
        return None
    dims = {lab.dim + nd - len(b.shape(a)) for a, lab in hidden}
    if len(dims) != 1:
        raise b.fail("its operands hold units on different axes")
    dim = dims.pop()
    full = [lab for a, lab in hidden if b.shape(a)[lab.dim] == outs[dim]]
    base = full[0]
    for lab in full[1:]:
        b.merge(base, lab)
    for a in operands:
        s, lab = b.shape(a), b.labels.get(a)
        k = dim - (nd - len(s)) if s is not None else -1
        if isinstance(lab, _Label) or s is None or k < 0 or s[k] == 1:
            continue
        if isinstance(lab, _Param) and lab.dim == k:
            b.add_refs(base, lab.name, lab.axis, "bn")
            continue
        raise b.fail(f"an operand of shape {s} that carries no hidden units varies along "
                     f"the units' axis")
    return _Label(dim, base.segs)


def _h_reshape(b: _Builder, _=None):
    """view / reshape / flatten: keeping the axes up to the units' axis is free;
    flattening the units' axis with the ones after it gives each unit a block."""
    x = b.label(b.node.args[0])
    ins, outs = b.shape(b.node.args[0]), b.shape(b.node)
    if isinstance(x, _Param):
        return _param_label(x.name, outs) and _Param(x.name, x.axis, *_one_big(outs))
    if not isinstance(x, _Label):
        return None
    d = x.dim
    if outs[:d + 1] == ins[:d + 1]:
        return x
    tail = len(ins) - d  # the unit axis and the ones after it kept, leading axes merged
    if len(outs) >= tail and outs[len(outs) - tail:] == ins[d:]:
        return _Label(len(outs) - tail, x.segs)
    if outs[:d] == ins[:d] and len(outs) == d + 1 and outs[d] == math.prod(ins[d:]):
        f = math.prod(ins[d + 1:])
        return _Label(d, tuple((g, n, blk * f) for g, n, blk in x.segs))
    raise b.fail(f"reshape {ins} -> {outs} splits or moves the units' axis {d}")


def _one_big(shape) -> tuple[int, int]:
    return next(i for i, s in enumerate(shape) if s != 1), len(shape)


def _h_reduce(b: _Builder, _=None):
    """mean / sum / amax over axes other than the units' axis (e.g. squeeze-excite pooling)."""
    x = b.label(b.node.args[0])
    if not isinstance(x, _Label):
        return None
    dims, keep = b.arg(1, "dim"), b.arg(2, "keepdim", False)
    nd = len(b.shape(b.node.args[0]))
    if dims is None:
        raise b.fail("it reduces over every axis, units included")
    dims = {d % nd for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
    if x.dim in dims:
        raise b.fail("it reduces over the units' axis")
    return _Label(x.dim if keep else x.dim - sum(d < x.dim for d in dims), x.segs)


def _h_permute(b: _Builder, _=None):
    x = b.label(b.node.args[0])
    if not isinstance(x, _Label):
        return None
    dims = b.node.args[1:] or (b.node.kwargs.get("dims"),)
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = dims[0]
    nd = len(b.shape(b.node))
    return _Label([d % nd for d in dims].index(x.dim), x.segs)


def _h_transpose(b: _Builder, _=None):
    x = b.label(b.node.args[0])
    if not isinstance(x, _Label):
        return None
    nd = len(b.shape(b.node))
    d0, d1 = (d % nd for d in (b.arg(1, "dim0"), b.arg(2, "dim1")))
    return _Label({d0: d1, d1: d0}.get(x.dim, x.dim), x.segs)


def _h_cat(b: _Builder, _=None):
    """Concatenation along the units' axis lays segments side by side; along another
    axis it ties the pieces like a residual addition."""
    tensors, nd = list(b.arg(0, "tensors")), len(b.shape(b.node))
    dim = b.arg(1, "dim", 0) % nd
    labels = [b.label(t) for t in tensors]
    hidden = [lab for lab in labels if isinstance(lab, _Label)]
    if not hidden:
        return None
    if len({lab.dim for lab in hidden}) != 1:
        raise b.fail("its inputs hold units on different axes")
    c = hidden[0].dim
    if dim == c:
        segs = [s for t, lab in zip(tensors, labels) for s in
                (lab.segs if isinstance(lab, _Label) else ((None, b.shape(t)[c], 1),))]
        return _Label(c, tuple(segs))
    if len(hidden) != len(labels):
        raise b.fail("it joins hidden units with non-hidden channels")
    for lab in hidden[1:]:
        b.merge(hidden[0], lab)
    return hidden[0]


_PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.padding._ConstantPadNd, nn.modules.padding._ReflectionPadNd,
    nn.modules.padding._ReplicationPadNd, nn.Upsample,
)

MODULE_HANDLERS: dict[type, Handler] = {
    **{cls: _passthrough for cls in _PASS_MODULES},
    nn.Linear: _h_linear,
    nn.modules.conv._ConvNd: _h_conv,
    nn.modules.batchnorm._BatchNorm: _h_batchnorm,
    nn.LayerNorm: _h_layernorm,
    nn.GroupNorm: _h_groupnorm,
    nn.PReLU: _h_prelu,
    nn.Flatten: _h_reshape,
}

_PASS_FUNCTIONS = (
    F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid,
    F.tanh, F.leaky_relu, F.elu, F.selu, F.mish, F.softplus, F.hardtanh, F.dropout,
    F.dropout1d, F.dropout2d, F.dropout3d, F.max_pool1d, F.max_pool2d, F.max_pool3d,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.pad, F.interpolate,
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.clamp, torch.clone,
    operator.neg, operator.pos, torch.neg, torch.abs,
)

FUNCTION_HANDLERS: dict[Any, Handler] = {
    **{fn: _passthrough for fn in _PASS_FUNCTIONS},
    **{fn: _h_elementwise for fn in (
        operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
        operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div)},
    **{fn: _h_reduce for fn in (torch.mean, torch.sum, torch.amax, torch.amin)},
    torch.flatten: _h_reshape, torch.reshape: _h_reshape,
    torch.permute: _h_permute, torch.transpose: _h_transpose,
    torch.cat: _h_cat, torch.concat: _h_cat,
    F.batch_norm: _h_f_batch_norm, F.layer_norm: _h_f_layer_norm,
    F.linear: _h_f_linear, F.conv1d: _h_f_conv, F.conv2d: _h_f_conv, F.conv3d: _h_f_conv,
}

METHOD_HANDLERS: dict[str, Handler] = {
    **{m: _passthrough for m in (
        "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clone",
        "contiguous", "float", "to", "type_as", "abs", "neg", "detach")},
    **{m: _h_elementwise for m in (
        "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_")},
    **{m: _h_reduce for m in ("mean", "sum", "amax", "amin")},
    **{m: _h_reshape for m in ("view", "reshape", "flatten", "squeeze", "unsqueeze")},
    "permute": _h_permute, "transpose": _h_transpose,
}


def _lookup(gm: fx.GraphModule, node: fx.Node) -> tuple[Handler | None, Any]:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        for cls in type(mod).__mro__:
            if cls in MODULE_HANDLERS:
                return MODULE_HANDLERS[cls], mod
        return None, mod
    if node.op == "call_method":
        return METHOD_HANDLERS.get(node.target), None
    try:
        return FUNCTION_HANDLERS.get(node.target), None
    except TypeError:  # unhashable target
        return None, None
