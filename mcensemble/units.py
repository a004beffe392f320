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

Every rule is exact. Besides layers, norms and residuals, the rules place what vision
transformers and their hybrids do: class / register tokens and position embeddings follow
the stream's channels; multi-head attention permutes heads as blocks of head_dim channels,
shared by q, k, v, the output projection and relative-position biases; GroupNorm permutes
within its groups; weights computed from state tensors (weight standardisation) carry the
permutation to the stored tensors; chunk / split cut a layer's units into pieces. A rule
may refine a group made earlier (cut it, or make blocks of it): that only narrows the
permutations it allows. docs/internals.md lists the rules.
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


def _mixes_units(m: nn.Module) -> bool:
    """Whether norm layer `m` reads several units for its statistics (LayerNorm / RMSNorm
    over channels, GroupNorm with fewer groups than channels, timm's RmsNorm, SimpleNorm and
    EvoNorm S variants): a permutation commutes with it, but a zeroed unit changes the others."""
    if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
        return True
    if isinstance(m, nn.GroupNorm):
        return m.num_groups != m.num_channels
    return type(m).__name__.startswith(("RmsNorm", "SimpleNorm", "EvoNorm2dS"))


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


#: timm not-trace modules whose forward traces fine and is better placed op by op
_TRACE_THROUGH = frozenset({"NormFreeBlock"})


class _Tracer(fx.Tracer):
    """fx tracer that keeps timm's not-trace modules opaque and wraps its functions."""

    def __init__(self):
        try:
            from timm.layers import _fx as timm_fx
            leaves, fns = set(timm_fx.get_notrace_modules()), tuple(timm_fx.get_notrace_functions())
        except ImportError:  # pragma: no cover - timm is a dependency
            leaves, fns = set(), ()
        super().__init__(autowrap_functions=fns)
        self._leaves = {c for c in leaves if c.__name__ not in _TRACE_THROUGH}

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
class _Multi:
    """The units' axis split over several tensor axes `axes` (outermost first, sizes
    `sizes`): the units are laid out by `segs` over those axes flattened row-major (a
    fused qkv reshaped to (3, heads, head_dim): the head_dim already made a block)."""

    axes: tuple
    sizes: tuple
    segs: tuple


@dataclass(frozen=True)
class _Tuple:
    """The labels of the tensors of a tuple output (unbind / chunk / split)."""

    items: tuple


@dataclass(frozen=True)
class _Param:
    """A state tensor, or a tensor computed from state tensors only (a view of a
    position embedding, a standardised conv weight): per axis, the `(tensor, axis, per)`
    state axes its index follows (index `i` is entry `i // per` of the state axis)."""

    dims: tuple

    def at(self, k: int) -> tuple:
        return self.dims[k] if 0 <= k < len(self.dims) else ()


class _Builder:
    """Walks the traced graph once, labelling every tensor with its unit segments and
    collecting AxisRefs into union-find groups.

    A group can be *refined* after it was created, which only ever narrows the
    permutations it allows (so every rule stays exact): `split_group` cuts it into
    consecutive pieces, each its own group (a chunk / split of a layer's output, the
    channels of one GroupNorm group); `coarsen_group` turns every `f` consecutive units
    into one unit (heads of `head_dim` channels, permuted as blocks). Labels keep the old
    group ids; `expand` rewrites them into the current leaf groups."""

    def __init__(self, gm: fx.GraphModule, state: Mapping[str, torch.Tensor]):
        self.gm, self.state = gm, state
        self.labels: dict[fx.Node, Any] = {}
        self.parent: list[int] = []
        self.size: list[int] = []
        self.refs: list[list[AxisRef]] = []
        self.name: list[str] = []
        self.events: list[tuple[int, tuple[int, ...]]] = []  # (new gid, gids it reads)
        self.key2gid: dict[tuple, int] = {}
        self.xform: dict[int, tuple] = {}  # root -> ("split", ((gid, units), ...)) | ("coarse", gid, f)
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
        if ra in self.xform or rb in self.xform:
            self.unify(((ra, self.size[ra], 1),), ((rb, self.size[rb], 1),))
            return
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

    def _derived(self, root: int, size: int, name: str) -> int:
        gid = self.new_group(size, name, None)
        self.events.pop()  # it reads what the group it comes from reads
        for g, reads in [e for e in self.events if self.find(e[0]) == root]:
            self.events.append((gid, reads))
        return gid

    def _take_refs(self, root: int) -> list[AxisRef]:
        out = []
        for g in range(len(self.parent)):
            if self.refs[g] and self.find(g) == root:
                out.extend(self.refs[g])
                self.refs[g] = []
        for r in out:  # registered again, in their refined form
            self.key2gid.pop((r.tensor, r.axis, r.offset, r.block), None)
        return out

    def split_group(self, gid: int, sizes: Sequence[int]) -> None:
        """Cut the (leaf) group of `gid` into consecutive pieces of `sizes` units."""
        root = self.find(gid)
        if root in self.xform or sum(sizes) != self.size[root]:
            raise self.fail("internal: a refined group is cut again")
        pieces = tuple((self._derived(root, k, f"{self.name[root]}[{i}]"), k)
                       for i, k in enumerate(sizes))
        self.xform[root] = ("split", pieces)
        for ref in self._take_refs(root):
            self.add_ref(root, ref)

    def coarsen_group(self, gid: int, f: int) -> None:
        """Make every `f` consecutive units of the (leaf) group of `gid` one unit."""
        root = self.find(gid)
        if root in self.xform or self.size[root] % f:
            raise self.fail("internal: a refined group is made blocks again")
        self.xform[root] = ("coarse", self._derived(root, self.size[root] // f,
                                                     f"{self.name[root]}/{f}"), f)
        for ref in self._take_refs(root):
            self.add_ref(root, ref)

    def expand(self, segs: tuple) -> tuple:
        """`segs` in terms of the current leaf groups (roots never split or coarsened)."""
        out: list[tuple] = []
        for gid, n, blk in segs:
            root = None if gid is None else self.find(gid)
            x = self.xform.get(root)
            if x is None:
                out.append((root, n, blk))
            elif x[0] == "coarse":
                out.extend(self.expand(((x[1], n // x[2], blk * x[2]),)))
            else:
                out.extend(self.expand(tuple((p, k, blk) for p, k in x[1])))
        return tuple(out)

    def add_ref(self, gid: int, ref: AxisRef) -> None:
        root = self.find(gid)
        x = self.xform.get(root)
        if x is not None and x[0] == "coarse":
            self.add_ref(x[1], AxisRef(ref.tensor, ref.axis, ref.role, ref.block * x[2], ref.offset))
            return
        if x is not None:
            start = 0
            for p, k in x[1]:
                self.add_ref(p, AxisRef(ref.tensor, ref.axis, ref.role, ref.block,
                                        ref.offset + start * ref.block))
                start += k
            return
        key = (ref.tensor, ref.axis, ref.offset, ref.block)
        if key in self.key2gid:  # a tensor axis used twice (shared module): one group
            self.union(gid, self.key2gid[key])
        else:
            self.key2gid[key] = gid
        self.refs[gid].append(ref)

    def add_refs(self, label: _Label, tensor: str, axis: int, role: str) -> None:
        offset = 0
        for gid, units, block in self.expand(label.segs):
            if gid is not None:
                self.add_ref(gid, AxisRef(tensor, axis, role, block, offset))
            offset += units * block

    def cut(self, segs: tuple, pos: int) -> None:
        """Refine the groups of `segs` so that a segment boundary falls at index `pos`."""
        off = 0
        for gid, n, blk in self.expand(segs):
            if off < pos < off + n * blk:
                if gid is None or (pos - off) % blk:
                    raise self.fail(f"it cuts a unit (index {pos} of the units' axis falls "
                                    f"inside a {'channel block' if gid is not None else 'non-hidden span'})")
                self.split_group(gid, [(pos - off) // blk, n - (pos - off) // blk])
                return
            off += n * blk

    def slice_segs(self, segs: tuple, start: int, stop: int) -> tuple:
        """The segments covering indices `start:stop` (groups cut at both ends)."""
        self.cut(segs, start)
        self.cut(segs, stop)
        out, off = [], 0
        for s in self.expand(segs):
            if start <= off < stop:
                out.append(s)
            off += s[1] * s[2]
        return tuple(out)

    def unify(self, sa: tuple, sb: tuple) -> None:
        """Tie two unit layouts of one axis position by position (refining groups where
        one side is cut finer than the other)."""
        for _ in range(10_000):
            la, lb = self.expand(sa), self.expand(sb)
            diff = None
            for x, y in zip(la, lb):
                if x[1:] != y[1:] or (x[0] is None) != (y[0] is None):
                    diff = (x, y)
                    break
            if diff is None:
                if len(la) != len(lb):
                    raise self.fail("combines tensors whose unit layouts differ")
                for x, y in zip(la, lb):
                    if x[0] is not None and self.find(x[0]) != self.find(y[0]):
                        self.union(x[0], y[0])
                return
            x, y = diff
            if x[0] is None or y[0] is None:
                raise self.fail("combines hidden units with non-hidden channels (e.g. the input)")
            spx, spy = x[1] * x[2], y[1] * y[2]
            if spx == spy:
                fine, coarse = (x, y) if x[2] < y[2] else (y, x)
                if coarse[2] % fine[2] or fine[0] == coarse[0]:
                    raise self.fail("combines tensors whose unit layouts differ")
                self.coarsen_group(fine[0], coarse[2] // fine[2])
            else:
                big, small = (x, y) if spx > spy else (y, x)
                cut = small[1] * small[2]
                if cut % big[2]:
                    raise self.fail("combines tensors whose unit layouts differ")
                self.split_group(big[0], [cut // big[2], big[1] - cut // big[2]])
        raise self.fail("combines tensors whose unit layouts differ")

    def coarsen(self, segs: tuple, f: int) -> tuple:
        """Every `f` consecutive indices of the axis made one unit (blocks): the segments
        of the new axis whose index `i` is that block (each with block 1)."""
        out = []
        for gid, n, blk in self.expand(segs):
            if f % blk or n % (f // blk):
                raise self.fail(f"it splits the units' axis into blocks of {f}, which cut "
                                f"a unit group of {n} units")
            if gid is None:
                out.append((None, n * blk // f, 1))
                continue
            if f // blk > 1:
                self.coarsen_group(gid, f // blk)
            (g2, n2, _), = self.expand(((gid, n, blk),))
            out.append((g2, n2, 1))
        return tuple(out)

    def merge(self, a: _Label, b: _Label) -> None:
        self.unify(a.segs, b.segs)

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
        return self.fresh(self.labels.get(arg) if isinstance(arg, fx.Node) else None)

    def fresh(self, lab):
        """`lab` with its segments in terms of the current leaf groups."""
        if isinstance(lab, _Label):
            return _Label(lab.dim, self.expand(lab.segs))
        if isinstance(lab, _Multi):
            return _Multi(lab.axes, lab.sizes, self.expand(lab.segs))
        if isinstance(lab, _Tuple):
            return _Tuple(tuple(self.fresh(x) for x in lab.items))
        return lab

    def arg(self, i: int, name: str, default=None):
        n = self.node
        return n.args[i] if len(n.args) > i else n.kwargs.get(name, default)

    # -- the walk
    def run(self) -> UnitGraph:
        for node in self.gm.graph.nodes:
            self.node = node
            self.labels[node] = self.step(node)
        self.node = None
        self.labels = {n: self.fresh(lab) for n, lab in self.labels.items()}
        return self.finish()

    def step(self, node: fx.Node):
        if node.op == "placeholder":
            return None
        if node.op == "get_attr":
            shape = self.shape(node)
            return None if shape is None else _Param(tuple(((node.target, i, 1),)
                                                           for i in range(len(shape))))
        if node.op == "output":
            fx.node.map_arg(node.args, lambda n: self.outputs.append(self.labels.get(n)))
            return None
        if "tensor_meta" not in node.meta:  # shapes, asserts, flags: no tensor comes out
            return None
        handler, target = _lookup(self.gm, node)
        hidden = any(isinstance(self.labels.get(a), (_Label, _Multi, _Tuple))
                     for a in node.all_input_nodes)
        if handler is None:
            if hidden:
                raise self.fail("no rule for this op")
            log.debug("unit graph: %s (node %r) reads no hidden units; ignored",
                      _op_name(self.gm, node), node.name)
            return None
        return handler(self, target)

    def finish(self) -> UnitGraph:
        roots = [r for r in dict.fromkeys(self.find(g) for g in range(len(self.parent)))
                 if r not in self.xform]
        refs: dict[int, dict[tuple, AxisRef]] = {r: {} for r in roots}
        for g, lst in enumerate(self.refs):
            for r in lst if self.find(g) in refs else ():
                refs[self.find(g)].setdefault((r.tensor, r.axis, r.offset, r.block), r)
        for r in (r for d in refs.values() for r in d.values()):
            if r.tensor not in self.state:
                raise UnitGraphError(f"unit-graph member {r.tensor!r} is not in the state dict "
                                     f"(a constant or non-persistent buffer indexes hidden "
                                     f"units); pass the unit groups by hand")
        out = {self.find(s[0]) for lab in self.outputs if isinstance(lab, _Label)
               for s in self.expand(lab.segs) if s[0] is not None}
        depth = self.depths()
        seen: dict[str, int] = {}
        for r in roots:  # refined groups are named after the group they came from
            k = seen[self.name[r]] = seen.get(self.name[r], 0) + 1
            if k > 1:
                self.name[r] = f"{self.name[r]}#{k}"
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


def _axis_map(ins: tuple, outs: tuple, d: int):
    """Where axis `d` of shape `ins` goes under a reshape to `outs`: ("keep", e),
    ("merge", e, m) (axis e holds d merged with the axes after it, m entries per index of
    d), ("split", (e1, ..., ek)) (d split over consecutive axes, leading size-1 axes left out), ("repeat", e, m)
    (d the innermost of axes merged into e: m copies of d side by side), or None."""
    outer, size, inner = math.prod(ins[:d]), ins[d], math.prod(ins[d + 1:])
    for e1 in reversed(range(len(outs))):  # past size-1 axes: an unsqueeze keeps the axis
        if math.prod(outs[:e1]) != outer:
            continue
        p = 1
        for ek in range(e1, len(outs)):
            p *= outs[ek]
            rest = math.prod(outs[ek + 1:])
            if p == size and rest == inner:
                # leading size-1 axes are an unsqueeze; inner ones a factor (one head)
                first = next((e for e in range(e1, ek + 1) if outs[e] != 1), ek)
                return ("keep", first) if first == ek else ("split", tuple(range(first, ek + 1)))
            if p > size:
                if ek == e1 and p % size == 0 and inner % (p // size) == 0 \
                        and rest == inner // (p // size):
                    return ("merge", e1, p // size)
                break
    for e in range(len(outs)):  # d the innermost of axes merged into e: d repeated
        m = outs[e] // size if size and outs[e] % size == 0 else 0
        if m > 1 and math.prod(outs[e + 1:]) == inner and any(
                math.prod(ins[j:d]) == m and math.prod(ins[:j]) == math.prod(outs[:e])
                for j in range(d)):
            return ("repeat", e, m)
    return None


def _vec(name: str | None) -> _Param | None:
    return None if name is None else _Param((((name, 0, 1),),))


def _module_param(m: nn.Module, t: str, attr: str) -> _Param | None:
    p = getattr(m, attr, None)
    return None if p is None else _Param(tuple(((f"{t}.{attr}", i, 1),) for i in range(p.dim())))


def _wparam(b: _Builder, arg) -> _Param | None:
    """The state axes a weight / bias argument follows (None: no such argument)."""
    if arg is None:
        return None
    lab = b.label(arg) if isinstance(arg, fx.Node) else None
    if isinstance(lab, _Param):
        return lab
    if isinstance(arg, fx.Node) and lab is None and b.shape(arg) is not None:
        raise b.fail(f"its weight or bias comes from {_op_name(b.gm, arg)} (node {arg.name!r}), "
                     f"which no rule follows back to state tensors")
    if lab is not None:
        raise b.fail("its weight is computed from hidden units")
    return None


# ----------------------------------------------------------------------------- handlers
# Each handler is called with the builder (whose `.node` is the current node) and the
# dispatch target (the module for call_module), and returns the output's label.
Handler = Callable[[_Builder, Any], Any]


def _passthrough(b: _Builder, _=None):
    """Per-channel ops (activations, dropout, pooling, identity, casts): units pass
    through; a tracked state tensor stays tracked when its shape is kept."""
    src = b.node.args[0] if b.node.args else None
    x = b.label(src)
    ins, outs = b.shape(src), b.shape(b.node)
    if isinstance(x, _Param):
        return x if ins is not None and ins == outs else None
    if isinstance(x, _Multi):
        if ins != outs:
            raise b.fail("expected an op that keeps the shape")
        return x
    if not isinstance(x, _Label):
        return None
    if ins is None or outs is None or len(ins) != len(outs) or ins[x.dim] != outs[x.dim]:
        raise b.fail("expected an op that keeps the channel axis")
    return x


def _dense(b: _Builder, w: _Param, bias: _Param | None, w_shape, groups: int,
           chan_last: bool, name: str):
    """Linear / convolution: consumes the input's units, produces a new group (or, when
    depthwise, passes the input's units through). `w` / `bias`: the state axes the
    (possibly computed) weight follows; its first tensor's axis 0 are the producer rows,
    further tensors on the output axis (e.g. a weight-standardisation gain) are "bn"."""
    node = b.node
    x = b.label(node.args[0])
    ins, outs = b.shape(node.args[0]), b.shape(node)
    in_dim, out_dim = (len(ins) - 1, len(outs) - 1) if chan_last else (1, 1)
    if isinstance(x, (_Multi, _Tuple)):
        raise b.fail("its input holds units on several axes")
    if isinstance(x, _Label) and x.dim != in_dim:
        if chan_last and groups == 1 and outs[x.dim] == ins[x.dim]:
            # a Linear along another axis (MLP-Mixer's token mixing) acts alike on every
            # unit: they pass through; its own hidden units stay fixed (no group)
            return x
        raise b.fail(f"the layer mixes axis {in_dim}, but the hidden units sit on axis {x.dim}")

    def refs(lab: _Label, p: _Param | None, dim: int, roles: tuple[str, str]):
        for i, (t, ax, per) in enumerate(p.at(dim) if p is not None else ()):
            if per != 1:
                raise b.fail("its weight merges the units' axis with others")
            b.add_refs(lab, t, ax, roles[min(i, 1)])

    out_ch = w_shape[0]
    if groups == 1:
        if isinstance(x, _Label):
            refs(x, w, 1, ("consumer", "consumer"))
        gid = b.new_group(out_ch, name, x if isinstance(x, _Label) else None)
        lab = _Label(out_dim, ((gid, out_ch, 1),))
        refs(lab, w, 0, ("producer", "bn"))
        refs(lab, bias, 0, ("producer", "producer"))
        return lab
    if groups == ins[in_dim] == out_ch:  # depthwise: one filter per unit
        if not isinstance(x, _Label):
            return None
        refs(x, w, 0, ("depthwise", "bn"))
        refs(x, bias, 0, ("depthwise", "depthwise"))
        return x
    # grouped: the filters of conv group k read only input group k through the same
    # weight columns, so the input groups share one permutation (tied), and the outputs
    # may be permuted only within their conv group (cut into `groups` pieces)
    cin = ins[in_dim]
    if isinstance(x, _Label):
        for k in range(1, groups):
            b.cut(x.segs, k * cin // groups)
        parts = [b.slice_segs(x.segs, k * cin // groups, (k + 1) * cin // groups)
                 for k in range(groups)]
        for part in parts[1:]:
            b.unify(parts[0], part)
        refs(_Label(x.dim, b.expand(parts[0])), w, 1, ("consumer", "consumer"))
    gid = b.new_group(out_ch, name, x if isinstance(x, _Label) else None)
    lab = _Label(out_dim, ((gid, out_ch, 1),))
    refs(lab, w, 0, ("producer", "bn"))
    refs(lab, bias, 0, ("producer", "producer"))
    b.split_group(gid, [out_ch // groups] * groups)
    return b.fresh(lab)


def _h_linear(b: _Builder, m: nn.Linear):
    t = b.node.target
    return _dense(b, _module_param(m, t, "weight"), _module_param(m, t, "bias"),
                  m.weight.shape, 1, True, t)


def _h_conv(b: _Builder, m: nn.modules.conv._ConvNd):
    if m.transposed:
        raise b.fail("transposed convolutions are not supported")
    t = b.node.target
    return _dense(b, _module_param(m, t, "weight"), _module_param(m, t, "bias"),
                  m.weight.shape, m.groups, False, t)


def _norm_refs(b: _Builder, params: Sequence[_Param | None], *, chan_last: bool):
    """Per-unit vectors (norm weight / bias / running stats) on the units of args[0]. A
    channels-last norm over an axis other than the units' (LayerNorm over head_dim when
    the units are heads) treats every unit alike: it passes them through."""
    x = b.label(b.node.args[0])
    if x is None or isinstance(x, _Param):
        return None
    nd = len(b.shape(b.node.args[0]))
    if isinstance(x, _Multi) and chan_last and nd - 1 not in x.axes:
        return _passthrough(b)
    if not isinstance(x, _Label):
        raise b.fail("its input holds units on several axes")
    if x.dim != (nd - 1 if chan_last else 1):
        if chan_last:
            return _passthrough(b)
        raise b.fail(f"the norm's per-unit axis is not the axis the units sit on ({x.dim})")
    for p in params:
        for t, ax, per in p.at(0) if p is not None else ():
            if per != 1:
                raise b.fail("its weight merges the units' axis with others")
            b.add_refs(x, t, ax, "bn")
    return _passthrough(b)


def _h_batchnorm(b: _Builder, m: nn.modules.batchnorm._BatchNorm):
    t = b.node.target
    return _norm_refs(b, [_vec(f"{t}.{a}") for a in ("weight", "bias", "running_mean", "running_var")
                          if getattr(m, a, None) is not None], chan_last=False)


def _h_layernorm(b: _Builder, m: nn.LayerNorm):
    if len(m.normalized_shape) != 1:
        raise b.fail("LayerNorm over more than the channel axis")
    t = b.node.target
    return _norm_refs(b, [_vec(f"{t}.{a}") for a in ("weight", "bias")
                          if getattr(m, a, None) is not None], chan_last=True)


def _group_norm(b: _Builder, groups: int, params):
    """GroupNorm: units may be permuted only within a group of C/G channels (each group's
    statistics are symmetric in its channels), so every group boundary cuts the unit
    groups there; the per-channel weight / bias become "bn" members."""
    x = b.label(b.node.args[0])
    if x is None or isinstance(x, _Param):
        return _passthrough(b)
    if not isinstance(x, _Label):
        raise b.fail("its input holds units on several axes")
    if x.dim != 1:
        raise b.fail(f"the norm's channel axis is not the axis the units sit on ({x.dim})")
    c = b.shape(b.node.args[0])[1]
    for k in range(1, groups):
        b.cut(x.segs, k * c // groups)
    return _norm_refs(b, params, chan_last=False)


def _h_groupnorm(b: _Builder, m: nn.GroupNorm):
    t = b.node.target
    return _group_norm(b, m.num_groups, [_vec(f"{t}.weight"), _vec(f"{t}.bias")] if m.affine else [])


def _h_f_group_norm(b: _Builder, _):
    return _group_norm(b, b.arg(1, "num_groups"),
                       [_wparam(b, b.arg(2, "weight")), _wparam(b, b.arg(3, "bias"))])


def _h_prelu(b: _Builder, m: nn.PReLU):
    params = [_vec(f"{b.node.target}.weight")] if m.num_parameters > 1 else []
    return _norm_refs(b, params, chan_last=False) if params else _passthrough(b)


def _h_f_batch_norm(b: _Builder, _):
    params = [_wparam(b, b.arg(i, k)) for i, k in
              ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))]
    x = b.label(b.node.args[0])
    if isinstance(x, _Param):
        # a computed weight (weight standardisation, NFNet's ScaledStdConv): each output
        # channel (axis 1) is standardised over the other axes, which commutes with
        # permuting them; the per-channel gain / bias follow axis 1
        dims = list(x.dims)
        dims[1] = dims[1] + tuple(e for p in params if p is not None for e in p.at(0))
        return _Param(tuple(dims))
    return _norm_refs(b, params, chan_last=False)


def _h_f_layer_norm(b: _Builder, _):
    if len(tuple(b.arg(1, "normalized_shape"))) != 1:
        raise b.fail("layer_norm over more than the channel axis")
    return _norm_refs(b, [_wparam(b, b.arg(2, "weight")), _wparam(b, b.arg(3, "bias"))],
                      chan_last=True)


def _h_f_rms_norm(b: _Builder, _):
    if len(tuple(b.arg(1, "normalized_shape"))) != 1:
        raise b.fail("rms_norm over more than the channel axis")
    return _norm_refs(b, [_wparam(b, b.arg(2, "weight"))], chan_last=True)


def _h_f_linear(b: _Builder, _):
    w = _wparam(b, b.arg(1, "weight"))
    return _dense(b, w, _wparam(b, b.arg(2, "bias")), b.shape(b.node.args[1]), 1, True,
                  _module_of(b.node))


def _h_f_conv(b: _Builder, _):
    w = _wparam(b, b.arg(1, "weight"))
    return _dense(b, w, _wparam(b, b.arg(2, "bias")), b.shape(b.node.args[1]),
                  b.arg(6, "groups", 1), False, _module_of(b.node))


def _h_elementwise(b: _Builder, _=None):
    """add / sub / mul / div: tensors carrying units are tied (residuals, gating);
    per-unit state tensors (layer scale, position embeddings, EVOS weights) become "bn"
    members; broadcast size-1 axes are free. With state tensors only, the result stays
    tracked (a gain times a scale)."""
    node = b.node
    outs = b.shape(node)
    nd = len(outs)
    operands = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]
    labs = {a: b.label(a) for a in operands}
    if any(isinstance(lab, (_Multi, _Tuple)) for lab in labs.values()):
        raise b.fail("an operand holds units on several axes")
    hidden = [(a, lab) for a, lab in labs.items() if isinstance(lab, _Label)]
    if not hidden:
        if not any(isinstance(lab, _Param) for lab in labs.values()) or any(
                lab is None and b.shape(a) and math.prod(b.shape(a)) > 1 for a, lab in labs.items()):
            return None
        dims = []
        for k in range(nd):
            ent: tuple = ()
            for a, lab in labs.items():
                s = b.shape(a) or ()
                j = k - (nd - len(s))
                if isinstance(lab, _Param) and j >= 0 and s[j] == outs[k]:
                    ent += lab.at(j)
            dims.append(ent)
        return _Param(tuple(dims))
    dims = {lab.dim + nd - len(b.shape(a)) for a, lab in hidden}
    if len(dims) != 1:
        raise b.fail("its operands hold units on different axes")
    dim = dims.pop()
    full = [lab for a, lab in hidden if b.shape(a)[lab.dim] == outs[dim]]
    base = full[0]
    for lab in full[1:]:
        b.merge(base, lab)
    for a in operands:
        s, lab = b.shape(a), labs[a]
        k = dim - (nd - len(s)) if s is not None else -1
        if isinstance(lab, _Label) or s is None or k < 0 or s[k] == 1:
            continue
        if isinstance(lab, _Param) and lab.at(k):
            for t, ax, per in lab.at(k):
                if per != 1:
                    raise b.fail("a state operand merges the units' axis with others")
                b.add_refs(base, t, ax, "bn")
            continue
        raise b.fail(f"an operand of shape {s} that carries no hidden units varies along "
                     f"the units' axis")
    return _Label(dim, b.expand(base.segs))


def _h_reshape(b: _Builder, _=None):
    """view / reshape / flatten: axes before the units' axis may merge or split freely;
    merging the units' axis with the ones after it gives each unit a block; splitting it
    into (outer..., inner) makes each block of `inner` channels one unit (heads of
    head_dim channels, permuted as blocks) and leaves the units on the outer axes."""
    src = b.node.args[0]
    x = b.label(src)
    ins, outs = b.shape(src), b.shape(b.node)
    if ins is None or outs is None:
        return None
    if isinstance(x, _Param):
        dims = [()] * len(outs)
        for d, ent in enumerate(x.dims):
            m = _axis_map(ins, outs, d) if ent else None
            if m is None:
                continue
            if m[0] == "keep":
                dims[m[1]] = ent
            elif m[0] == "merge":
                dims[m[1]] = tuple((t, ax, per * m[2]) for t, ax, per in ent)
            elif m[0] == "split":
                rest = math.prod(outs[e] for e in m[1][1:])
                dims[m[1][0]] = tuple((t, ax, per // rest) for t, ax, per in ent
                                      if per % rest == 0)
        return _Param(tuple(dims))
    if isinstance(x, _Multi):
        maps = [_axis_map(ins, outs, a) for a in x.axes]
        if any(m is None or m[0] != "keep" for m in maps):
            raise b.fail(f"reshape {ins} -> {outs} moves the axes the units sit on")
        return _Multi(tuple(m[1] for m in maps), x.sizes, x.segs)
    if not isinstance(x, _Label):
        return None
    m = _axis_map(ins, outs, x.dim)
    if m is None:
        raise b.fail(f"reshape {ins} -> {outs} merges the units' axis {x.dim} with the axes before it")
    if m[0] == "keep":
        return _Label(m[1], x.segs)
    if m[0] == "merge":
        return _Label(m[1], tuple((g, n, blk * m[2]) for g, n, blk in x.segs))
    if m[0] == "repeat":  # (..., 2, 2, C) -> (..., 4C): the units once per outer index
        return _Label(m[1], x.segs * m[2])
    axes = m[1]
    segs = b.coarsen(x.segs, outs[axes[-1]])
    if len(axes) == 2:
        return _Label(axes[0], segs)
    return _Multi(axes[:-1], tuple(outs[e] for e in axes[:-1]), segs)


def _h_reduce(b: _Builder, _=None):
    """mean / sum / amax / var / std over axes other than the units' axis (e.g.
    squeeze-excite pooling, group statistics)."""
    x = b.label(b.node.args[0])
    if isinstance(x, (_Multi, _Tuple)):
        raise b.fail("its input holds units on several axes")
    if not isinstance(x, _Label):
        return None
    dims = b.arg(1, "dim")
    ins, outs = b.shape(b.node.args[0]), b.shape(b.node)
    nd = len(ins)
    if dims is None:
        raise b.fail("it reduces over every axis, units included")
    dims = {d % nd for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
    if x.dim in dims:
        raise b.fail("it reduces over the units' axis")
    keep = len(outs) == nd
    return _Label(x.dim if keep else x.dim - sum(d < x.dim for d in dims), x.segs)


def _perm_dims(b: _Builder, nd: int) -> list[int]:
    dims = b.node.args[1:] or (b.node.kwargs.get("dims"),)
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = dims[0]
    return [d % nd for d in dims]


def _moved(x, order: list[int]):
    """`x` after its axes are reordered so that new axis i is old axis order[i]."""
    if isinstance(x, _Label):
        return _Label(order.index(x.dim), x.segs)
    if isinstance(x, _Multi):
        return _Multi(tuple(order.index(a) for a in x.axes), x.sizes, x.segs)
    if isinstance(x, _Param):
        return _Param(tuple(x.at(o) for o in order))
    return None


def _h_permute(b: _Builder, _=None):
    x = b.label(b.node.args[0])
    nd = len(b.shape(b.node))
    return _moved(x, _perm_dims(b, nd))


def _h_transpose(b: _Builder, _=None):
    x = b.label(b.node.args[0])
    nd = len(b.shape(b.node))
    d0, d1 = (d % nd for d in (b.arg(1, "dim0"), b.arg(2, "dim1")))
    order = list(range(nd))
    order[d0], order[d1] = d1, d0
    return _moved(x, order)


def _h_cat(b: _Builder, _=None):
    """Concatenation along the units' axis lays segments side by side; along another
    axis (class / register tokens before the patch tokens) it ties the pieces like a
    residual addition, and state tensors joined to them (the tokens) follow the units."""
    tensors, nd = list(b.arg(0, "tensors")), len(b.shape(b.node))
    dim = b.arg(1, "dim", 0) % nd
    labels = [b.label(t) for t in tensors]
    if any(isinstance(lab, (_Multi, _Tuple)) for lab in labels):
        raise b.fail("an input holds units on several axes")
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
    for lab in hidden[1:]:
        b.merge(hidden[0], lab)
    for t, lab in zip(tensors, labels):
        if isinstance(lab, _Label):
            continue
        if not (isinstance(lab, _Param) and lab.at(c)):
            raise b.fail("it joins hidden units with non-hidden channels")
        for name, ax, per in lab.at(c):
            if per != 1:
                raise b.fail("a state operand merges the units' axis with others")
            b.add_refs(hidden[0], name, ax, "bn")
    return b.fresh(hidden[0])


def _h_stack(b: _Builder, _=None):
    """stack along a new axis: the pieces are tied (like cat along another axis)."""
    tensors, nd = list(b.arg(0, "tensors")), len(b.shape(b.node))
    dim = b.arg(1, "dim", 0) % nd
    labels = [b.label(t) for t in tensors]
    if not any(isinstance(lab, (_Label, _Multi, _Tuple)) for lab in labels):
        return None
    if not all(isinstance(lab, _Label) for lab in labels) or len({lab.dim for lab in labels}) != 1:
        raise b.fail("it stacks hidden units with other tensors, or units on different axes")
    for lab in labels[1:]:
        b.merge(labels[0], lab)
    d = labels[0].dim
    return _Label(d + (dim <= d), b.expand(labels[0].segs))


def _h_expand(b: _Builder, _=None):
    x = b.label(b.node.args[0])
    ins, outs = b.shape(b.node.args[0]), b.shape(b.node)
    lead = len(outs) - len(ins)
    if isinstance(x, _Label):
        if ins[x.dim] != outs[x.dim + lead]:
            raise b.fail("it expands the units' axis")
        return _Label(x.dim + lead, x.segs)
    if isinstance(x, _Multi):
        return _Multi(tuple(a + lead for a in x.axes), x.sizes, x.segs)
    if isinstance(x, _Param):
        return _Param(((),) * lead + tuple(e if ins[k] == outs[k + lead] else ()
                                           for k, e in enumerate(x.dims)))
    return None


def _h_softmax(b: _Builder, m=None):
    """softmax: over another axis (attention weights over keys) or over the units' axis
    (permutation-equivariant), the units pass through."""
    x = b.label(b.node.args[0])
    if x is None or isinstance(x, _Param):
        return None
    nd = len(b.shape(b.node))
    dim = (m.dim if isinstance(m, nn.Module) else b.arg(1, "dim"))
    if dim is None:
        raise b.fail("softmax without a dim")
    dim %= nd
    if isinstance(x, _Multi) and dim in x.axes:
        raise b.fail("it normalises over one of the axes the units span")
    return x  # over the units' own axis it is equivariant: it commutes with permuting them


def _h_roll(b: _Builder, _=None):
    """torch.roll over spatial axes (Swin's shifted windows)."""
    x = b.label(b.node.args[0])
    if x is None or isinstance(x, _Param):
        return None
    if not isinstance(x, _Label):
        raise b.fail("its input holds units on several axes")
    dims = b.arg(2, "dims")
    nd = len(b.shape(b.node))
    dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
    if not dims or x.dim in {d % nd for d in dims}:
        raise b.fail("it rolls the units' axis")
    return x


def _index_map(b: _Builder, idx, ins: tuple) -> dict[int, tuple]:
    """For a tensor indexed by `idx`: old axis -> ("keep", new axis, slice) / ("int", i)
    / ("adv",) (indexed by a tensor)."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    used = sum(1 for i in idx if i is not None and i is not Ellipsis)
    full: list = []
    for i in idx:
        full.extend([slice(None)] * (len(ins) - used) if i is Ellipsis else [i])
    out, d, e, adv = {}, 0, 0, False
    for i in full:
        if i is None:
            e += 1
        elif isinstance(i, int):
            out[d] = ("int", i)
            d += 1
        elif isinstance(i, slice):
            out[d] = ("keep", e, i)
            d, e = d + 1, e + 1
        elif isinstance(i, fx.Node) and b.shape(i) is not None and not adv \
                and i.meta["tensor_meta"].dtype in (torch.int64, torch.int32):
            out[d] = ("adv",)
            d, e, adv = d + 1, e + len(b.shape(i)), True
        else:
            raise b.fail(f"an index {i!r} it has no rule for")
    for d2 in range(d, len(ins)):
        out[d2] = ("keep", e, slice(None))
        e += 1
    return out


def _h_getitem(b: _Builder, _=None):
    """Indexing: an item of unbind / chunk / split; x[:, 0] (class-token pooling),
    x[:, k:] (patch tokens); a table indexed by a tensor (relative position bias); a part
    of a fused qkv; a slice of the units' axis cuts its groups there."""
    src, idx = b.node.args[0], b.node.args[1]
    x = b.label(src)
    if isinstance(x, _Tuple):
        if not isinstance(idx, int):
            raise b.fail(f"an index {idx!r} of a tuple")
        return x.items[idx]
    ins = b.shape(src)
    if x is None or ins is None:
        return None
    m = _index_map(b, idx, ins)
    outs = b.shape(b.node)
    if outs is None or max((h[1] for h in m.values() if h[0] == "keep"), default=-1) >= len(outs):
        raise b.fail(f"an index {idx!r} it has no rule for")
    if isinstance(x, _Param):
        dims = [()] * len(b.shape(b.node))
        for d, how in m.items():
            if how[0] == "keep" and how[2] == slice(None):
                dims[how[1]] = x.at(d)
        return _Param(tuple(dims))
    if isinstance(x, _Label):
        how = m[x.dim]
        if how[0] != "keep":
            raise b.fail("it indexes the units' axis")
        sl = how[2]
        if sl == slice(None):
            return _Label(how[1], x.segs)
        start, stop, step = sl.indices(ins[x.dim])
        if step != 1:
            raise b.fail("it takes a strided slice of the units' axis")
        return _Label(how[1], b.slice_segs(x.segs, start, stop))
    if isinstance(x, _Multi):
        return _multi_index(b, x, {a: m[a] for a in x.axes})
    return None


def _multi_index(b: _Builder, x: _Multi, how: dict):
    """`x` indexed: an integer on its outermost axis picks a part (q of a fused qkv)."""
    first = how[x.axes[0]]
    if any(h[0] != "keep" or h[2] != slice(None) for a, h in how.items() if a != x.axes[0]):
        raise b.fail("it indexes an inner axis of the units")
    if first[0] == "int":
        inner, i = math.prod(x.sizes[1:]), first[1] % x.sizes[0]
        segs = b.slice_segs(x.segs, i * inner, (i + 1) * inner)
        axes = tuple(how[a][1] for a in x.axes[1:])
        return _Label(axes[0], segs) if len(axes) == 1 else _Multi(axes, x.sizes[1:], segs)
    if first[0] == "keep" and first[2] == slice(None):
        return _Multi(tuple(how[a][1] for a in x.axes), x.sizes, x.segs)
    raise b.fail("it indexes the units' outer axis")


def _split_sizes(b: _Builder, dim: int) -> list[int]:
    meta = b.node.meta.get("tensor_meta")
    if not isinstance(meta, (tuple, list)) or not all(isinstance(m, TensorMetadata) for m in meta):
        raise b.fail("its outputs have no shapes")
    return [int(m.shape[dim]) for m in meta]


def _pieces(b: _Builder, dim: int, keep_dim: bool):
    """unbind / chunk / split of args[0] along `dim`: a _Tuple of the pieces' labels."""
    src = b.node.args[0]
    x, ins = b.label(src), b.shape(src)
    if x is None or ins is None:
        return None
    dim %= len(ins)
    sizes = [1] * ins[dim] if not keep_dim else _split_sizes(b, dim)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]

    def shift(a):
        return a if keep_dim or a < dim else a - 1

    if isinstance(x, _Param):
        dims = [e for k, e in enumerate(x.dims) if keep_dim or k != dim]
        if keep_dim:
            dims[dim] = ()
        return _Tuple(tuple(_Param(tuple(dims)) for _ in sizes))
    if isinstance(x, _Label):
        if x.dim != dim:
            return _Tuple(tuple(_Label(shift(x.dim), x.segs) for _ in sizes))
        if not keep_dim:
            raise b.fail("it unbinds the units' axis")
        for s in starts[1:]:
            b.cut(x.segs, s)
        return _Tuple(tuple(_Label(dim, b.slice_segs(x.segs, s, s + k))
                            for s, k in zip(starts, sizes)))
    if isinstance(x, _Multi):
        if dim not in x.axes:
            return _Tuple(tuple(_Multi(tuple(shift(a) for a in x.axes), x.sizes, x.segs)
                                for _ in sizes))
        if dim != x.axes[0]:
            raise b.fail("it splits an inner axis of the units")
        inner = math.prod(x.sizes[1:])
        for s in starts[1:]:
            b.cut(x.segs, s * inner)
        items = []
        for s, k in zip(starts, sizes):
            segs = b.slice_segs(x.segs, s * inner, (s + k) * inner)
            if k == 1:
                axes = tuple(shift(a) for a in x.axes[1:])
                items.append(_Label(axes[0], segs) if len(axes) == 1 else
                             _Multi(axes, x.sizes[1:], segs))
            else:
                items.append(_Multi(x.axes, (k,) + x.sizes[1:], segs))
        return _Tuple(tuple(items))
    return None


def _h_unbind(b: _Builder, _=None):
    return _pieces(b, b.arg(1, "dim", 0), False)


def _h_chunk(b: _Builder, _=None):
    return _pieces(b, b.arg(2, "dim", 0), True)


def _attn_operands(b: _Builder, args: Sequence, nd: int, what: str, given=None):
    """Tie the hidden labels of `args` sitting on one batch axis (heads), counted from the
    end; returns (base label, axis from the end) or None. State operands (relative
    position bias tables) varying along that axis follow it. `given`: labels to use
    instead of the arguments' own."""
    given = given or {}
    labs = [(a, given.get(a, b.label(a))) for a in args if isinstance(a, fx.Node)]
    if any(isinstance(lab, (_Multi, _Tuple)) for _, lab in labs):
        raise b.fail("an operand holds units on several axes")
    hidden = [(a, lab, lab.dim - len(b.shape(a))) for a, lab in labs if isinstance(lab, _Label)]
    if not hidden:
        return None
    rels = {r for _, _, r in hidden}
    if len(rels) != 1 or rels.pop() >= -2:
        raise b.fail(f"{what}: the units must sit on one batch (head) axis of every operand")
    rel = hidden[0][2]
    heads = b.shape(b.node)[nd + rel]
    full = [lab for a, lab, _ in hidden if b.shape(a)[lab.dim] == heads]
    if not full:
        raise b.fail(f"{what}: no operand has the output's heads")
    for lab in full[1:]:
        b.merge(full[0], lab)
    for a, lab in labs:
        s = b.shape(a)
        if isinstance(lab, _Label) or s is None or len(s) + rel < 0 or s[len(s) + rel] == 1:
            continue
        if isinstance(lab, _Param) and lab.at(len(s) + rel):
            for t, ax, per in lab.at(len(s) + rel):
                if per != 1:
                    raise b.fail("a state operand merges the heads' axis with others")
                b.add_refs(full[0], t, ax, "bn")
            continue
        raise b.fail(f"{what}: an operand of shape {s} that carries no hidden units varies "
                     f"along the heads")
    return b.fresh(full[0]), rel


def _h_sdpa(b: _Builder, _=None):
    """scaled_dot_product_attention: q, k, v (and a mask) carry the heads on one batch
    axis; one permutation of the heads (each a block of head_dim channels) is shared by
    them, the mask (relative position bias) and the output."""
    args = [b.arg(i, k) for i, k in enumerate(("query", "key", "value", "attn_mask"))]
    nd = len(b.shape(b.node))
    last = [isinstance(lab, _Label) and lab.dim == len(b.shape(a)) - 1
            for a, lab in ((a, b.label(a)) for a in args[:3])]
    given = {}
    if any(last) and not all(last[:2]) and any(isinstance(b.label(a), _Label) for a in args[:3]):
        # one head, seen from both sides (q reshaped to (..., 1, head_dim) keeps its units
        # on head_dim; a fused kv split into (2, 1, head_dim) made the head one block):
        # head_dim made one block, the single head is the unit on both sides
        for a, is_last in zip(args[:3], last):
            s = b.shape(a) if isinstance(a, fx.Node) else None
            if is_last and s is not None and len(s) >= 3 and s[-3] == 1:
                given[a] = _Label(len(s) - 3, b.coarsen(b.label(a).segs, s[-1]))
        last = [False] * 3
    if any(last):
        # the units on head_dim, the same permutation in every head: one shared by q and
        # k (their dot product is invariant), v's carried to the output
        q, k, v = (b.label(a) for a in args[:3])
        if not (last[0] == last[1] and (last[2] or v is None)) or (
                args[3] is not None and b.label(args[3]) is not None
                and not isinstance(b.label(args[3]), _Param)):
            raise b.fail("attention with units on head_dim of some operands only")
        if last[0]:
            b.merge(q, k)
        return _Label(nd - 1, b.label(args[2]).segs) if last[2] else None
    got = _attn_operands(b, args, nd, "attention", given)
    return None if got is None else _Label(nd + got[1], got[0].segs)


def _h_matmul(b: _Builder, _=None):
    """a @ b with the units on a batch axis (heads) of both: tied, and kept; on the rows
    of a or the columns of b: kept; on a contracted axis: no rule."""
    x, y = b.node.args[0], b.node.args[1]
    lx, ly = b.label(x), b.label(y)
    nd = len(b.shape(b.node))
    free = (type(None), _Param)  # no hidden units (a weight, a fixed matrix)
    if isinstance(lx, _Label) and lx.dim - len(b.shape(x)) == -2 and isinstance(ly, free):
        return _Label(nd - 2, lx.segs)
    if isinstance(ly, _Label) and ly.dim - len(b.shape(y)) == -1 and isinstance(lx, free):
        return _Label(nd - 1, ly.segs)
    got = _attn_operands(b, [x, y], nd, "matmul")
    return None if got is None else _Label(nd + got[1], got[0].segs)


def _h_last_axis_fn(b: _Builder, _=None):
    """Functions that move tokens / windows and keep the channel (last) axis
    (window_reverse, grid_reverse, resample_abs_pos_embed)."""
    x = b.label(b.node.args[0])
    ins, outs = b.shape(b.node.args[0]), b.shape(b.node)
    if ins is None or outs is None or ins[-1] != outs[-1]:
        if isinstance(x, (_Label, _Multi)):
            raise b.fail("it changes the channel axis")
        return None
    if isinstance(x, _Param):
        return _Param(((),) * (len(outs) - 1) + (x.at(len(ins) - 1),))
    if isinstance(x, _Label) and x.dim == len(ins) - 1:
        return _Label(len(outs) - 1, x.segs)
    if x is None:
        return None
    raise b.fail("the units are not on the channel (last) axis")


def _h_nchw_fn(b: _Builder, _=None):
    """Functions that move windows and keep the channel axis 1 (window_reverse_nchw)."""
    x = b.label(b.node.args[0])
    ins, outs = b.shape(b.node.args[0]), b.shape(b.node)
    if isinstance(x, _Label) and x.dim == 1 and ins[1] == outs[1]:
        return x
    if x is None or isinstance(x, _Param):
        return None
    raise b.fail("the units are not on the channel axis 1")


def _timm_functions() -> dict[Any, Handler]:
    try:
        from timm.layers import _fx as timm_fx
        fns = timm_fx.get_notrace_functions()
    except ImportError:  # pragma: no cover - timm is a dependency
        return {}
    out: dict[Any, Handler] = {}
    for fn in fns:
        name = getattr(fn, "__name__", "")
        if name.endswith("_nchw"):
            out[fn] = _h_nchw_fn
        elif name in ("window_reverse", "grid_reverse", "resample_abs_pos_embed",
                      "resample_abs_pos_embed_nhwc"):
            out[fn] = _h_last_axis_fn
    return out


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
    nn.Softmax: _h_softmax,
}

_PASS_FUNCTIONS = (
    F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid,
    F.tanh, F.leaky_relu, F.elu, F.selu, F.mish, F.softplus, F.hardtanh, F.dropout,
    F.dropout1d, F.dropout2d, F.dropout3d, F.max_pool1d, F.max_pool2d, F.max_pool3d,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.pad, F.interpolate,
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.clamp, torch.clone,
    operator.neg, operator.pos, torch.neg, torch.abs, torch.sqrt, torch.rsqrt, torch.exp,
    torch.square,
)

FUNCTION_HANDLERS: dict[Any, Handler] = {
    **{fn: _passthrough for fn in _PASS_FUNCTIONS},
    **{fn: _h_elementwise for fn in (
        operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
        operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
        operator.pow, torch.pow)},
    **{fn: _h_reduce for fn in (torch.mean, torch.sum, torch.amax, torch.amin)},
    torch.flatten: _h_reshape, torch.reshape: _h_reshape,
    torch.permute: _h_permute, torch.transpose: _h_transpose,
    torch.cat: _h_cat, torch.concat: _h_cat, torch.stack: _h_stack,
    F.batch_norm: _h_f_batch_norm, F.layer_norm: _h_f_layer_norm,
    F.linear: _h_f_linear, F.conv1d: _h_f_conv, F.conv2d: _h_f_conv, F.conv3d: _h_f_conv,
    F.group_norm: _h_f_group_norm, F.rms_norm: _h_f_rms_norm,
    **{fn: _h_reduce for fn in (torch.var, torch.std)},
    operator.getitem: _h_getitem, torch.unbind: _h_unbind,
    torch.split: _h_chunk, torch.chunk: _h_chunk,
    F.scaled_dot_product_attention: _h_sdpa,
    operator.matmul: _h_matmul, torch.matmul: _h_matmul, torch.bmm: _h_matmul,
    F.softmax: _h_softmax, torch.softmax: _h_softmax, torch.roll: _h_roll,
    **_timm_functions(),
}

METHOD_HANDLERS: dict[str, Handler] = {
    **{m: _passthrough for m in (
        "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clone",
        "contiguous", "float", "to", "type_as", "abs", "neg", "detach", "sqrt", "rsqrt",
        "exp", "square")},
    **{m: _h_elementwise for m in (
        "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow")},
    **{m: _h_reduce for m in ("mean", "sum", "amax", "amin", "var", "std")},
    **{m: _h_reshape for m in ("view", "reshape", "flatten", "squeeze", "unsqueeze",
                               "view_as", "reshape_as")},
    "permute": _h_permute, "transpose": _h_transpose, "unbind": _h_unbind,
    "chunk": _h_chunk, "split": _h_chunk, "matmul": _h_matmul, "bmm": _h_matmul,
    "softmax": _h_softmax, "expand": _h_expand, "expand_as": _h_expand, "roll": _h_roll,
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
