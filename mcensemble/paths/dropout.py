"""The dropout-stable path (Kuditipudi et al. 2019, Theorem 1), built without training.

A piecewise-linear path from A to B whose segments are of three kinds only:

- ``classifier`` (a): only the classifier's tensors change; logits are linear in them
  and the loss is convex in the logits, so on any fixed data the loss along the segment
  is at most the larger of its two ends;
- ``inactive`` (b): only the rows (producer / bn roles) of *dead* units change -- units
  that no live consumer reads with a nonzero weight and the classifier does not read --
  so the network's output does not change;
- ``switch``: a live consumer moves its weights between two exact copies of the same
  units (identical rows), so the output does not change.

Hence the loss at every point is at most the largest vertex loss (`certificate
["max_loss"]`), and every vertex computes A, B, or some D_k (dropout network) of one of
them, so that is at most max(L(A), L(B)) + eps. Construction (D_k = dropout at every
hidden depth >= k, d = top depth, "chain" = the live copy of the dropped-out layers):

1. A -> D_d(A): classifier only.
2. k = d-1 .. 1: write a copy of D_k(A)'s units at depths > k into the free slots (the
   copy at depth k+1 reads A's kept half at depth k; above, copies read copies); switch
   the classifier onto it. Free slots alternate between the kept half and its image in
   the dropped half, so a group of n units needs 2 * (n // 2) <= n slots.
3. Write D_1(B) into D_1(A)'s free slots, each unit straight into the slot it has at the
   end of B's own construction (E_B) when that slot is free; switch the classifier from
   A's chain to B's (the midpoint is the packed pair, `mcensemble.pack`).
4. Relocate B's units, from the bottom depth up: copy each unit that is not yet in its E_B
   slot there (its target is in A's old chain, dead now; no unit ever needs parking),
   switch the consumers between the exact copies, then give every dead slot of the depth
   its E_B values. The result equals E_B bit for bit (checked).
5. B's steps 2 and 1 backwards, ending at B.

BatchNorm networks: copies are new units; their statistics are those of D_k of the
network they belong to (`stability.dropout_network`). Supported graphs: layered networks
(one unit group per depth, each read only by the next layer, the top one only by the
classifier: MLPs, VGG-style CNNs with BN and Flatten). Others raise `DropoutPathError`.

File: endpoints `endpoint.0` / `endpoint.1`; vertex i (1 <= i <= n-2) stored as the rows
that changed from vertex i-1: group `delta.<i>` with `R:<name>` (row indices along dim 0)
and `V:<name>` (those rows), or `F:<name>` (the whole tensor).
"""
from __future__ import annotations

import copy
import logging
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn
from tqdm import tqdm

from .._io import meta_field
from .._layout import fast_layout
from ..bn import FixedSubset, first_input
from ..errors import BadOptionError, DropoutPathError
from ..evaluate import evaluate
from ..options import check_count
from ..stability import check_kept, dropout_network, dropout_stability, dropout_state, graph_for
from ..units import AxisRef, UnitGraph, UnitGroup, _mixes_units
from .base import ModePath, StateDict, check_same_layout, register_path

__all__ = ["DropoutPath", "DropoutConfig", "build_dropout_path", "layered_chain", "mix_states",
           "verify_segments"]

log = logging.getLogger(__name__)
_ROW_ROLES = ("producer", "bn", "depthwise")
#: a vertex's loss is the function's it computes when their logits on the first
#: `PROBE_EXAMPLES` training examples agree to `PROBE_RTOL` (of the largest logit)
PROBE_EXAMPLES = 64
PROBE_RTOL = 1e-5




# ----------------------------------------------------------------------------- graph
def layered_chain(graph: UnitGraph, state: Mapping[str, torch.Tensor]) -> list[UnitGroup]:
    """The groups of a layered network, by depth 1..d; `DropoutPathError` naming the group
    and the reason when the graph is not one (residual streams, branches, concatenations)."""
    if not graph.groups:
        raise DropoutPathError("the network has no hidden unit groups: nothing to drop out")
    if not graph.classifier:
        raise DropoutPathError("the unit graph names no classifier tensors")
    chain: list[UnitGroup] = []
    for k, depth in enumerate(graph.depths, start=1):
        at = graph.at_depth(depth)
        if depth != k or len(at) != 1:
            names = ", ".join(g.name for g in at)
            raise DropoutPathError(
                f"unit group(s) {names} at depth {depth}: the dropout-stable path supports "
                "layered networks only (one unit group per depth, each read by the next layer); "
                "residual streams, squeeze-excite gates, branches and concatenations make cycles "
                "that Theorem 1's construction cannot handle: use `method` short (the short path, "
                "Theorem 2) for such networks")
        chain.append(at[0])
    rows = [{r.tensor for r in g.refs(*_ROW_ROLES)} for g in chain]
    for j, g in enumerate(chain):
        reader = rows[j + 1] if j + 1 < len(chain) else set(graph.classifier)
        what = f"layer {chain[j + 1].name!r}" if j + 1 < len(chain) else "the classifier"
        for r in g.refs("consumer"):
            if r.tensor not in reader:
                raise DropoutPathError(
                    f"unit group {g.name!r} is read by {r.module!r}, not only by {what}: a "
                    "skip connection or branch; only layered networks are supported (use `method` "
                    "short, the short path, for such networks)")
        if not g.refs("producer") or not g.refs("consumer"):
            raise DropoutPathError(f"unit group {g.name!r} has no producing or no consuming "
                                   "layer in the unit graph")
        if g.size < 2:
            raise DropoutPathError(f"unit group {g.name!r} has {g.size} unit; half of it "
                                   "cannot be kept")
    covered = set().union(*rows) | set(graph.classifier)
    for name, t in state.items():
        if t.is_floating_point() and name not in covered:
            raise DropoutPathError(
                f"tensor {name!r} belongs to no unit group's layer and is not the classifier; "
                "the dropout-stable path cannot move it (only layered networks are supported)")
    if set(graph.classifier) & set().union(*rows):
        raise DropoutPathError("the classifier shares tensors with a hidden layer")
    return chain


def _check_norms(model: nn.Module, chain: list[UnitGroup]) -> None:
    """Norms that mix units (LayerNorm over channels, GroupNorm with fewer groups than
    channels) let dead units change live ones: refused."""
    mods = dict(model.named_modules())
    for g in chain:
        for r in g.refs("bn"):
            m = mods.get(r.module)
            if m is not None and _mixes_units(m):
                raise DropoutPathError(
                    f"unit group {g.name!r} is normalised by {r.module!r} "
                    f"({type(m).__name__}), which mixes the units' statistics: copies and "
                    "dead units would change the live ones; not supported")


def _row_ref(g: UnitGroup, tensor: str) -> AxisRef:
    return next(r for r in g.refs(*_ROW_ROLES) if r.tensor == tensor)


# ----------------------------------------------------------------------------- editing
class _Track:
    """The current state and the last two vertices emitted (unchanged tensors shared). Each
    new vertex goes to `sink(prev, cur, kind)` when one is given (the path builder encodes
    it there), so a track holds a bounded number of states however long the path is."""

    def __init__(self, start: Mapping[str, torch.Tensor], sink=None):
        self.state: StateDict = dict(start)
        self.vertices: deque[StateDict] = deque([dict(start)], maxlen=2)
        self.kinds: list[dict[str, Any]] = []
        self.emitted = 0
        self._owned: set[str] = set()
        self._sink = sink

    def w(self, name: str) -> torch.Tensor:
        """Tensor `name` of the current state, writable (copied on first write)."""
        if name not in self._owned:
            self.state[name] = self.state[name].clone()
            self._owned.add(name)
        return self.state[name]

    def emit(self, kind: str, note: str, *, function: tuple[str, int] | None = None) -> None:
        """Close a segment (dropped when nothing changed). `function`: (side, k) when the new
        vertex computes D_k(side) (its units in other slots): the sink gets it."""
        prev = self.vertices[-1]
        changed = [n for n in self._owned if not _same(prev[n], self.state[n])]
        for n in self._owned - set(changed):
            self.state[n] = prev[n]
        self._owned = set()
        if changed:
            self.vertices.append(dict(self.state))
            self.kinds.append({"kind": kind, "step": note})
            self.emitted += 1
            if self._sink is not None:
                self._sink(prev, self.vertices[-1], self.kinds[-1], function)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bytes(a), _bytes(b)))


def _bytes(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    return t.reshape(-1).view(torch.uint8) if t.numel() else t.reshape(-1).to(torch.uint8)


def _copy_rows(tr: _Track, src: Mapping[str, torch.Tensor], g: UnitGroup,
               units: list[int], slots: list[int]) -> None:
    """Rows (producer / bn roles) of `src`'s `units` into the current state's `slots`."""
    if not units:
        return
    for r in g.refs(*_ROW_ROLES):
        val = src[r.tensor].index_select(r.axis, r.indices(units))
        tr.w(r.tensor).index_copy_(r.axis, r.indices(slots), val)


def _remap_cols(tr: _Track, src: Mapping[str, torch.Tensor], below: UnitGroup, g: UnitGroup | None,
                units: list[int], slots: list[int], cmap: Mapping[int, int]) -> None:
    """In the rows `slots` of `g` (all rows of the classifier when `g` is None), the
    columns of group `below`: zero, then `src`'s columns of unit v (rows `units`) at the
    columns of slot cmap[v]."""
    vs = sorted(cmap)
    ps = [cmap[v] for v in vs]
    for c in below.refs("consumer"):
        full = torch.arange(c.offset, c.offset + below.size * c.block)
        if g is None:
            dst = tr.w(c.tensor).movedim(c.axis, 0)
            dst[full] = 0
            dst[c.indices(ps)] = src[c.tensor].movedim(c.axis, 0)[c.indices(vs)]
            continue
        r = _row_ref(g, c.tensor)
        rd, rs = r.indices(slots)[:, None], r.indices(units)[:, None]
        dst = tr.w(c.tensor).movedim((r.axis, c.axis), (0, 1))
        dst[rd, full[None, :]] = 0
        dst[rd, c.indices(ps)[None, :]] = src[c.tensor].movedim((r.axis, c.axis), (0, 1))[
            rs, c.indices(vs)[None, :]]


def _set_classifier(tr: _Track, src: Mapping[str, torch.Tensor], graph: UnitGraph,
                    top: UnitGroup, cmap: Mapping[int, int]) -> None:
    """The classifier of `src` reading top unit v from slot cmap[v] (zero elsewhere)."""
    cols = {c.tensor for c in top.refs("consumer")}
    for name in graph.classifier:
        if name not in cols:
            tr.w(name).copy_(src[name])
    _remap_cols(tr, src, top, None, [], [], cmap)


# ----------------------------------------------------------------------------- construction
class _Side:
    """One endpoint: its state, kept halves per depth, and its D_k states (cached)."""

    def __init__(self, name: str, state: StateDict, stab, chain: list[UnitGroup]):
        self.name, self.state, self.stab = name, state, stab
        self.kept = [list(stab.kept[g.name]) for g in chain]
        self.free = [sorted(set(range(g.size)) - set(k)) for g, k in zip(chain, self.kept)]
        self._dk: dict[int, StateDict] = {}

    def slots(self, j: int, parity: int) -> dict[int, int]:
        """Slot of each kept unit of depth index j (0-based): itself, or its image in the
        dropped half."""
        if parity == 0:
            return {u: u for u in self.kept[j]}
        return dict(zip(self.kept[j], self.free[j]))


class _Construction:
    def __init__(self, work: nn.Module, graph: UnitGraph, chain: list[UnitGroup], bn_loader,
                 device, *, lowest_only: bool = False):
        self.work, self.graph, self.chain = work, graph, chain
        self.bn_loader, self.device, self.lowest_only = bn_loader, device, lowest_only

    def dk(self, side: _Side, k: int) -> StateDict:
        """D_k of a side (k is a 1-based depth), BN statistics as stability measured them
        (re-estimated when it did not; with `lowest_only`, the packed pair's case, only D_1's:
        the other D_k only fill slots that are dead once D_1 is in place)."""
        if k not in side._dk:
            stats = side.stab.bn_stats.get(self.chain[k - 1].depth)
            if stats is not None or self.bn_loader is None or (self.lowest_only and k > 1):
                sd = dropout_state(side.state, self.graph, side.stab.kept, self.chain[k - 1].depth)
                sd.update(stats or {})
            else:
                sd, _ = dropout_network(self.work, side.state, self.graph, side.stab.kept,
                                        self.chain[k - 1].depth, bn_loader=self.bn_loader,
                                        device=self.device)
            side._dk = {k: sd}  # one D_k per side: the construction asks for k = d .. 1 in turn
        return side._dk[k]

    def write_chain(self, tr: _Track, side: _Side, k: int, lo: int,
                    place: list[dict[int, int] | None]) -> None:
        """Rows of D_k(side)'s kept units at depths lo..d (1-based) into slots `place`;
        each reads the units below at place[j-1] (A's own slots for j-1 = k)."""
        src = self.dk(side, k)
        for j in range(lo - 1, len(self.chain)):
            g, units = self.chain[j], side.kept[j]
            slots = [place[j][u] for u in units]
            _copy_rows(tr, src, g, units, slots)
            if j > 0:
                _remap_cols(tr, src, self.chain[j - 1], g, units, slots, place[j - 1])

    def forward(self, side: _Side, sink=None) -> tuple[_Track, list[dict[int, int]]]:
        """Steps 1-2 from `side`'s endpoint to D_1(side); returns the track (its vertices
        going to `sink`, `_Track`) and where the final chain sits (depth index -> unit -> slot)."""
        d = len(self.chain)
        tr = _Track(side.state, sink)
        top = self.chain[-1]
        place = [side.slots(j, 0) for j in range(d)]
        _set_classifier(tr, self.dk(side, d), self.graph, top, place[-1])
        tr.emit("classifier", f"{side.name} -> D_{d}({side.name})", function=(side.name, d))
        for k in range(d - 1, 0, -1):
            new = [side.slots(j, 0) if j < k else side.slots(j, (j + 1 - k) % 2)
                   for j in range(d)]
            self.write_chain(tr, side, k, k + 1, new)
            tr.emit("inactive", f"copy of D_{k}({side.name}) into free slots")
            _set_classifier(tr, self.dk(side, k), self.graph, top, new[-1])
            tr.emit("classifier", f"classifier onto D_{k}({side.name})", function=(side.name, k))
            place = new
        return tr, place

    def cross(self, tr: _Track, a: _Side, b: _Side, pa: list[dict[int, int]],
              pb: list[dict[int, int]]) -> list[dict[int, int]]:
        """Step 3: D_1(B) into D_1(A)'s free slots, classifier switched from A to B.
        Returns where B's units sit (each in its E_B slot when that was free)."""
        q = []
        for j, g in enumerate(self.chain):
            live_a = set(pa[j].values())
            free = [s for s in range(g.size) if s not in live_a]
            qj = {u: t for u, t in pb[j].items() if t not in live_a}
            rest = [s for s in free if s not in set(qj.values()) and s not in set(pb[j].values())]
            for u in b.kept[j]:
                if u not in qj:
                    qj[u] = rest.pop(0)
            q.append(qj)
        self.write_chain(tr, b, 1, 1, q)
        tr.emit("inactive", "copy of D_1(B) into D_1(A)'s free slots")
        _set_classifier(tr, self.dk(b, 1), self.graph, self.chain[-1], q[-1])
        for name, t in b.state.items():
            if not t.is_floating_point():
                tr.w(name).copy_(t)
        tr.emit("classifier", "classifier from D_1(A) to D_1(B)", function=(b.name, 1))
        return q

    def relocate(self, tr: _Track, q: list[dict[int, int]], pb: list[dict[int, int]],
                 end: StateDict) -> None:
        """Step 4: move B's units from `q` to their E_B slots `pb`, bottom depth first, then
        give the dead slots their E_B values; the state ends equal to `end` (E_B)."""
        d = len(self.chain)
        for j, g in enumerate(self.chain):
            moves = {u: (q[j][u], pb[j][u]) for u in q[j] if q[j][u] != pb[j][u]}
            live = set(q[j].values())
            if moves:
                if any(t in live for _, t in moves.values()):  # never happens: see cross()
                    raise RuntimeError("internal error: relocation target is occupied")
                snap = dict(tr.state)
                _copy_rows(tr, snap, g, [s for s, _ in moves.values()],
                           [t for _, t in moves.values()])
                tr.emit("inactive", f"copy B's units of {g.name!r} to their final slots")
                for c in g.refs("consumer"):
                    v = tr.w(c.tensor).movedim(c.axis, 0)
                    src = c.indices([s for s, _ in moves.values()])
                    v[c.indices([t for _, t in moves.values()])] = v[src]
                    v[src] = 0
                what = "the classifier" if j == d - 1 else repr(self.chain[j + 1].name)
                tr.emit("switch", f"{what} switched between copies of {g.name!r}")
            targets = set(pb[j].values())
            dead = [s for s in range(g.size) if s not in targets]
            _copy_rows(tr, end, g, dead, dead)
            tr.emit("inactive", f"dead slots of {g.name!r} set to their final values")
        for name, t in end.items():
            if not _same(tr.state[name], t):
                raise RuntimeError(f"internal error: relocation does not end at D_1(B) "
                                   f"(tensor {name!r} differs)")
        tr.state = dict(end)
        tr.vertices[-1] = end


# ----------------------------------------------------------------------------- verification
def _unit_nz(t: torch.Tensor, row: AxisRef | None, n_rows: int, col: AxisRef, n_cols: int) -> torch.Tensor:
    """(n_rows, n_cols) bool: does unit row i read unit column s with a nonzero weight
    (one row standing for the whole tensor when `row` is None: the classifier)."""
    if row is None:
        m = (t != 0).movedim(col.axis, 0)
        m = m.reshape(m.shape[0], -1).any(1)[None, :]
    else:
        m = (t != 0).movedim((row.axis, col.axis), (0, 1))
        m = m.reshape(m.shape[0], m.shape[1], -1).any(-1)[row.indices(range(n_rows))]
        m = m.reshape(n_rows, row.block, -1).any(1)
    m = m[:, col.indices(range(n_cols))]
    return m.reshape(m.shape[0], n_cols, col.block).any(2)


def _live(v: StateDict, graph: UnitGraph, chain: list[UnitGroup]) -> list[torch.Tensor]:
    """Per depth, which slots are live (read, through live units, by the classifier)."""
    d = len(chain)
    live: list[torch.Tensor] = [torch.zeros(0, dtype=torch.bool)] * d
    top = chain[-1]
    live[-1] = torch.zeros(top.size, dtype=torch.bool)
    for c in top.refs("consumer"):
        live[-1] |= _unit_nz(v[c.tensor], None, 0, c, top.size).any(0)
    for j in range(d - 2, -1, -1):
        g, up = chain[j], chain[j + 1]
        live[j] = torch.zeros(g.size, dtype=torch.bool)
        for c in g.refs("consumer"):
            nz = _unit_nz(v[c.tensor], _row_ref(up, c.tensor), up.size, c, g.size)
            live[j] |= nz[live[j + 1]].any(0)
    return live


def _changed_units(va: StateDict, vb: StateDict, g: UnitGroup) -> set[int]:
    out: set[int] = set()
    for r in g.refs(*_ROW_ROLES):
        x, y = va[r.tensor], vb[r.tensor]
        if x is y or _same(x, y):
            continue
        diff = (x != y) | (x.signbit() != y.signbit()) if x.is_floating_point() else x != y
        rows = diff.movedim(r.axis, 0).reshape(x.shape[r.axis], -1).any(1).nonzero().reshape(-1)
        rows = rows[(rows >= r.offset) & (rows < r.offset + g.size * r.block)]
        out |= {int(i) for i in (rows - r.offset) // r.block}
    return out


def _check_segment(va: StateDict, vb: StateDict, kind: str, graph: UnitGraph,
                   chain: list[UnitGroup]) -> str | None:
    """Why the segment va -> vb is not of its kind, or None when it is."""
    changed = {k for k in va if va[k].is_floating_point() and not _same(va[k], vb[k])}
    cls = set(graph.classifier)
    if kind == "classifier":
        return None if changed <= cls else f"changes {sorted(changed - cls)}"
    if kind == "inactive":
        if changed & cls:
            return "changes the classifier"
        la, lb = _live(va, graph, chain), _live(vb, graph, chain)
        for j, g in enumerate(chain):
            bad = [u for u in _changed_units(va, vb, g) if la[j][u] or lb[j][u]]
            if bad:
                return f"changes live units {bad[:5]} of {g.name!r}"
        return None
    return _check_switch(va, vb, changed, chain)


def _copy_classes(v: StateDict, g: UnitGroup) -> tuple[torch.Tensor, int]:
    """Class id per unit of `g`: units with identical rows (bit for bit) share one."""
    key: dict[bytes, int] = {}
    ids = []
    for u in range(g.size):
        parts = [_bytes(v[r.tensor].index_select(r.axis, r.indices([u]))) for r in g.refs(*_ROW_ROLES)]
        ids.append(key.setdefault(bytes(torch.cat(parts).cpu().numpy()), len(key)))
    return torch.tensor(ids), len(key)


def _check_switch(va: StateDict, vb: StateDict, changed: set[str],
                  chain: list[UnitGroup]) -> str | None:
    """Only the consumer columns of one group change and every live consumer row keeps its
    total weight on each class of exact copies (whose rows do not change); rows of dead
    consumer units may change freely."""
    for j, g in enumerate(chain):
        cons = {c.tensor for c in g.refs("consumer")}
        if not changed or not changed <= cons:
            continue
        if _changed_units(va, vb, g):
            return f"changes rows of {g.name!r} while switching its consumers"
        cls_of, n_cls = _copy_classes(va, g)
        up = chain[j + 1] if j + 1 < len(chain) else None
        if up is not None:
            la, lb = _live(va, None, chain), _live(vb, None, chain)
            live_up = (la[j + 1] | lb[j + 1]).nonzero().reshape(-1)
        for c in g.refs("consumer"):
            sums = []
            for v in (va, vb):
                if up is None:
                    m = v[c.tensor].movedim(c.axis, 0)
                else:
                    r = _row_ref(up, c.tensor)
                    m = v[c.tensor].movedim((c.axis, r.axis), (0, 1))[:, r.indices(live_up)]
                m = m[c.indices(range(g.size))].double().reshape(g.size, c.block, -1)
                sums.append(torch.zeros(n_cls, *m.shape[1:], dtype=m.dtype).index_add_(0, cls_of, m))
            if not torch.allclose(sums[0], sums[1], rtol=1e-6, atol=1e-12):
                return f"{c.tensor!r} does not move weight between exact copies of {g.name!r}"
        return None
    return f"changes {sorted(changed)}, not the consumers of one group"


def verify_segments(vertices: list[StateDict], kinds: list[dict[str, Any]], graph: UnitGraph,
                    chain: list[UnitGroup]) -> None:
    """Check every segment is of its kind (classifier only / dead rows only / a move
    between exact copies); RuntimeError naming the segment otherwise."""
    for i, k in enumerate(kinds):
        why = _check_segment(vertices[i], vertices[i + 1], k["kind"], graph, chain)
        if why:
            raise RuntimeError(f"internal error: segment {i} ({k['kind']}: {k['step']}) {why}")


@torch.no_grad()
def _logits(work: nn.Module, sd: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """`work`'s logits on `x` with state `sd` loaded, in float64."""
    work.load_state_dict(sd)
    out = work(x)
    return (out[0] if isinstance(out, (tuple, list)) else out).double()


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest absolute deviation of `got` from `want`, relative to `want`'s largest entry."""
    scale = max(float(want.abs().max()), 1e-12)
    return float((got - want).abs().max()) / scale


class _Recorder:
    """The path as the construction makes it, one vertex at a time: each segment checked
    (`_check_segment`), each vertex's delta against the vertex before it on the path kept
    (`_encode`), so no list of full states is ever held, and each vertex's loss taken from
    the function it computes. Every vertex computes A, B or some D_k of one of them, its
    units possibly in other slots (the module docstring); the stability measurement
    already took those functions' losses on all the data, so a vertex's loss is its
    function's, once a probe batch shows the vertex's logits equal the function's (to
    `PROBE_RTOL`, relative; a vertex that fails the probe is evaluated on all the data
    instead: `measured`). A's track runs forward along the path; B's track runs backward (B,
    D_d(B), ..., E_B), so there a vertex's delta is taken against the one after it on its
    track, one step late (E_B itself is A's track's last vertex)."""

    def __init__(self, work: nn.Module, con: "_Construction", loader, sides: Iterable["_Side"],
                 progress: bool | None, *, measured: Iterable[bool]):
        self.work, self.con, self.loader = work, con, loader
        self.sides = {s.name: s for s in sides}
        #: per side: did its stability measurement take its losses on `loader` (else they are
        #: evaluated here, once per function)
        self.own = dict(zip(self.sides, measured))
        self._inputs = {id(t) for s in self.sides.values() for t in s.state.values()}
        self._bar = tqdm(desc="dropout path vertices", leave=False, file=sys.stderr,
                         disable=None if progress is None else not progress)
        x = first_input(loader, PROBE_EXAMPLES)
        self.x = None if x is None else x.to(con.device)
        self.deltas: list[list[StateDict]] = [[], []]  # per track, in track order
        self.losses: list[list[float]] = [[], []]
        self.labels: list[list[str]] = [[], []]  # the function each vertex computes: "A", "D_2(B)", ...
        self.measured: list[list[bool]] = [[], []]  # evaluated itself (failed the probe)
        self.deviation = 0.0  # largest relative logit deviation of a vertex from its function
        self._canon: dict[tuple[str, int], torch.Tensor] = {}
        self._fn_loss: dict[tuple[str, int], float] = {}
        self._fn = [("A", 0), ("B", 0)]  # per track: the function its newest vertex computes
        self._b_pending: tuple[tuple[str, int], bool] | None = None  # B's newest vertex: (function, probe ok)

    def loss(self, sd: Mapping[str, torch.Tensor]) -> float:
        self.work.load_state_dict(sd)
        self._bar.update(1)
        return evaluate(self.work, self.loader, device=self.con.device).loss

    def _canonical(self, fn: tuple[str, int]) -> StateDict:
        side = self.sides[fn[0]]
        return side.state if fn[1] == 0 else self.con.dk(side, fn[1])

    def _probe(self, sd: StateDict, fn: tuple[str, int]) -> bool:
        """Do `sd`'s logits on the probe batch equal those of the function `fn` computes?"""
        if self.x is None:
            return False
        if fn not in self._canon:
            self._canon[fn] = _logits(self.work, self._canonical(fn), self.x)
        dev = _rel_err(_logits(self.work, sd, self.x), self._canon[fn])
        self.deviation = max(self.deviation, dev)
        return dev <= PROBE_RTOL

    def function_loss(self, fn: tuple[str, int]) -> float:
        """The loss of A, B or D_k(side) on all the data: the stability measurement's (or
        evaluated once, when it took none)."""
        if fn not in self._fn_loss:
            st, loss = self.sides[fn[0]].stab, float("nan")
            if self.own[fn[0]]:
                loss = st.base_loss if fn[1] == 0 else next(
                    (r["loss"] for r in st.depths if r["depth"] == self.con.chain[fn[1] - 1].depth), loss)
            self._fn_loss[fn] = loss if loss == loss else self.loss(self._canonical(fn))
        return self._fn_loss[fn]

    def _record(self, track: int, sd: StateDict, fn: tuple[str, int], ok: bool) -> None:
        self.losses[track].append(self.function_loss(fn) if ok else self.loss(sd))
        self.labels[track].append(_label(fn))
        self.measured[track].append(not ok)

    def start(self, a: StateDict) -> None:
        self._record(0, a, ("A", 0), True)

    def _check(self, va: StateDict, vb: StateDict, kind: Mapping[str, Any], where: str) -> None:
        why = _check_segment(va, vb, kind["kind"], self.con.graph, self.con.chain)
        if why:
            raise RuntimeError(f"internal error: {where} ({kind['kind']}: {kind['step']}) {why}")

    def _delta(self, prev: StateDict, cur: StateDict) -> StateDict:
        """`_encode`, whole tensors that are the caller's own inputs copied (the path owns its data)."""
        d = DropoutPath._encode_delta(prev, cur)
        return {k: (t.clone() if id(t) in self._inputs else t) for k, t in d.items()}

    def a_sink(self, prev: StateDict, cur: StateDict, kind: Mapping[str, Any], function=None) -> None:
        self._check(prev, cur, kind, f"segment {len(self.losses[0]) - 1}")
        fn = self._fn[0] = function or self._fn[0]
        self._record(0, cur, fn, self._probe(cur, fn))
        self.deltas[0].append(self._delta(prev, cur))

    def b_sink(self, prev: StateDict, cur: StateDict, kind: Mapping[str, Any], function=None) -> None:
        k = len(self.deltas[1]) + (1 if self._b_pending else 0)
        self._check(cur, prev, kind, f"segment {k} counted from B's end")
        if self._b_pending is not None:  # prev is not B itself: its loss, one step late
            self._record(1, prev, *self._b_pending)
            self.deltas[1].append(self._delta(cur, prev))
        fn = self._fn[1] = function or self._fn[1]
        self._b_pending = (fn, self._probe(cur, fn))

    def assemble(self, a: StateDict, b: StateDict) -> tuple[dict[str, StateDict], list[float]]:
        """The path's groups (endpoints copied) and its vertex losses, in path order
        (`self.vertex_labels`: the function each vertex computes; `self.measured_vertices`:
        the indices evaluated themselves)."""
        da, db = self.deltas
        la, lb = self.losses
        (ta, tb), (ma, mb) = self.labels, self.measured
        if self._b_pending is None:  # B's track never moved: A's track ends at B itself
            da, la, ta, ma = da[:-1], la[:-1], ta[:-1], ma[:-1]
        self.vertex_labels = ta + tb[::-1] + [_label(("B", 0))]
        self.measured_vertices = [i for i, m in enumerate(ma + mb[::-1]) if m]
        mid = da + db[::-1]
        groups = {"endpoint.0": {k: v.clone() for k, v in a.items()},
                  "endpoint.1": {k: v.clone() for k, v in b.items()}}
        groups.update({f"delta.{i}": d for i, d in enumerate(mid, start=1)})
        self._bar.close()
        return groups, la + lb[::-1] + [self.function_loss(("B", 0))]


def _label(fn: tuple[str, int]) -> str:
    return fn[0] if fn[1] == 0 else f"D_{fn[1]}({fn[0]})"


def working_copy(model: nn.Module, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                 loader: Iterable[Any] | None, graph, device, *, what: str, uses: str):
    """The set-up both unit-switching paths (dropout-stable, short) share: training data is
    required (`BadOptionError` saying `what` `uses` it for), A and B share a layout; returns
    `(a, b, work, graph)`: A and B detached on the CPU, an eval-mode copy of `model` on
    `device`, and its unit graph (given or traced) validated against A."""
    if loader is None:
        raise BadOptionError(f"{what} needs training data (`data`): it {uses} on it", option="data")
    check_same_layout(a, b)
    a = {k: v.detach().cpu() for k, v in a.items()}
    b = {k: v.detach().cpu() for k, v in b.items()}
    work = copy.deepcopy(model).to(device).eval()
    graph = graph_for(work, loader, graph)
    graph.validate(a)
    fast_layout(work, loader)
    return a, b, work, graph


def _prepare(model: nn.Module, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
             loader: Iterable[Any], *, graph=None, stability_a=None, stability_b=None,
             device="cpu", progress: bool | None = None, search_steps: int = 48,
             lowest_only: bool = False, bn_loader=None):
    """Shared set-up of `build_dropout_path` and `mcensemble.pack.pack_pair`: checks the
    layout and the graph, measures stability where not given (`lowest_only`: D_1 alone,
    all the packed pair needs; `bn_loader`: BatchNorm data, default `loader`). Returns
    `(work model, construction, side A, side B)`. Private (it was `prepare`): the
    construction and the sides are this module's internal types, so only mcensemble's own
    modules call it; the public entry points are `build_dropout_path` and `pack_pair`."""
    a, b, work, graph = working_copy(model, a, b, loader, graph, device, what="the dropout-stable path",
                                     uses="measures stability, re-estimates BatchNorm and certifies vertices")
    chain = layered_chain(graph, a)
    _check_norms(work, chain)
    stab = []
    for st, sd in ((stability_a, a), (stability_b, b)):
        if st is None:
            st = dropout_stability(work, sd, loader, graph=graph, device=device,
                                   search_steps=search_steps, progress=progress,
                                   depths=[chain[0].depth] if lowest_only else None,
                                   bn_loader=bn_loader)
        else:
            check_kept(graph, st.kept)
        stab.append(st)
    con = _Construction(work, graph, chain, loader if bn_loader is None else bn_loader, device,
                        lowest_only=lowest_only)
    return work, con, _Side("A", a, stab[0], chain), _Side("B", b, stab[1], chain)


def build_dropout_path(model: nn.Module, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                       loader: Iterable[Any], *, graph=None, stability_a=None, stability_b=None,
                       device="cpu", progress: bool | None = None,
                       search_steps: int = 48, bn_examples: int | None = 2048) -> "DropoutPath":
    """The dropout-stable path from state dict `a` to `b` (module docstring), certified on
    `loader` (also used for BatchNorm re-estimation and, unless `stability_a` /
    `stability_b` (`StabilityResult`s measured on the same data) are given, for measuring
    stability and choosing the kept halves). `model`: an nn.Module of the architecture
    (not changed; a copy does the work). Unsupported graphs -> `DropoutPathError`.

    Every vertex computes A, B or some D_k of one of them (its units possibly in other
    slots), so the vertices' losses are those the stability measurement takes on all of
    `loader`, once per function (the D_k of a side in one pass over the data, sharing what
    lies below depth k: `mcensemble._partial.Family`), each vertex checked against its
    function on a probe batch (`certificate["vertex_functions"]`, `["probe"]`). The D_k's
    BatchNorm statistics are re-estimated on a fixed subsample of `bn_examples` training
    examples (`mcensemble.bn.FixedSubset`; None: all of `loader`); every loss uses all of
    `loader` (`certificate["data"]`)."""
    t0 = time.perf_counter()
    bn_loader = None
    if bn_examples is not None and loader is not None:
        sub = FixedSubset(loader, bn_examples, what="the dropout-stable path")
        bn_loader = sub if sub.of is None or sub.batches < sub.of else None
    bn_note = "all the training data" if bn_loader is None else \
        f"a fixed subsample of the training data ({bn_loader.describe()})"
    given = (stability_a is not None, stability_b is not None)
    work, con, side_a, side_b = _prepare(model, a, b, loader, graph=graph, stability_a=stability_a,
                                         stability_b=stability_b, device=device,
                                         progress=progress, search_steps=search_steps,
                                         bn_loader=bn_loader)
    rec = _Recorder(work, con, loader, (side_a, side_b), progress, measured=[not g for g in given])
    rec.start(side_a.state)
    tr, pa = con.forward(side_a, rec.a_sink)
    side_a._dk.clear()
    trb, pb = con.forward(side_b, rec.b_sink)
    end = trb.vertices[-1]
    rec_b_kinds = trb.kinds[::-1]
    del trb
    q = con.cross(tr, side_a, side_b, pa, pb)
    side_b._dk.clear()
    con.relocate(tr, q, pb, end)
    kinds = tr.kinds + rec_b_kinds
    del tr, end  # the last states: freed before the endpoints are copied into the path
    groups, losses = rec.assemble(side_a.state, side_b.state)
    n = len(losses)
    ts = [i / (n - 1) for i in range(n)]
    segments = [dict(k, t0=ts[i], t1=ts[i + 1]) for i, k in enumerate(kinds)]
    stab = (side_a.stab, side_b.stab)
    eps = max(float(s.eps) for s in stab)
    cert = {"max_loss": max(losses), "eps": eps, "loss_a": losses[0], "loss_b": losses[-1],
            "bound": max(losses[0], losses[-1]) + eps, "vertex_losses": losses,
            "vertex_functions": rec.vertex_labels, "measured_vertices": rec.measured_vertices,
            "probe": {"examples": 0 if rec.x is None else int(rec.x.shape[0]), "rtol": PROBE_RTOL,
                      "largest_deviation": rec.deviation},
            "segments": segments, "stability": [s.to_dict() for s in stab],
            "data": {"losses": "all the training data: each vertex's loss is that of the function it computes "
                               "(A, B or a D_k of one of them, taken once; checked on the probe batch)",
                     "batchnorm": bn_note if not all(given) else "as the given stability results",
                     "search": "the first search_examples training examples (stability.search)"}}
    meta = {"construction_seconds": time.perf_counter() - t0,
            "unit_groups": [g.name for g in con.chain]}
    log.info("dropout path: %d segments, max vertex loss %.4f (A %.4f, B %.4f, eps %.4f)",
             n - 1, cert["max_loss"], losses[0], losses[-1], eps)
    return DropoutPath._from_groups(groups, n, certificate=cert, metadata=meta)


def mix_states(va: Mapping[str, torch.Tensor], vb: Mapping[str, torch.Tensor], s: float) -> StateDict:
    """`(1 - s) va + s vb` as the path interpolates a segment: entries equal at both ends
    are kept bit for bit; non-floating tensors are va's for s < 0.5, else vb's."""
    out: StateDict = {}
    for k, x in va.items():
        y = vb[k]
        if x is y or not x.is_floating_point():
            out[k] = (x if s < 0.5 or x is y else y).clone()
            continue
        half = x.dtype in (torch.float16, torch.bfloat16)
        xa, xb = (x.float(), y.float()) if half else (x, y)
        out[k] = torch.where(x == y, x, ((1.0 - s) * xa + s * xb).to(x.dtype))
    return out


# ----------------------------------------------------------------------------- the path
def _encode(prev: StateDict, cur: StateDict) -> StateDict:
    """The tensors of `cur` that differ from `prev`: changed rows (dim 0) when at most half
    of them changed, else the whole tensor."""
    out: StateDict = {}
    for name, t in cur.items():
        p = prev[name]
        if t is p or _same(p, t):
            continue
        if t.dim() >= 1 and t.shape[0] > 1:
            diff = (_bytes(p).reshape(t.shape[0], -1) != _bytes(t).reshape(t.shape[0], -1)).any(1)
            rows = diff.nonzero().reshape(-1)
            if 2 * len(rows) <= t.shape[0]:
                out[f"R:{name}"] = rows
                out[f"V:{name}"] = t[rows].contiguous()
                continue
        out[f"F:{name}"] = t
    return out


def _decode(prev: StateDict, delta: Mapping[str, torch.Tensor]) -> StateDict:
    """The vertex after `prev`, from its delta (`_encode`'s output); `ValueError` / `KeyError`
    on a delta that does not fit `prev` (a damaged file): wrong names, shapes, dtypes or rows."""
    cur = dict(prev)
    for key, t in delta.items():
        kind, _, name = key.partition(":")
        if kind not in ("F", "V", "R"):
            raise KeyError(f"bad vertex delta entry {key!r}")
        if name not in prev:
            raise KeyError(f"vertex delta names tensor {name!r}, which the endpoints do not have")
        ref = prev[name]
        if kind == "F":
            if tuple(t.shape) != tuple(ref.shape) or t.dtype != ref.dtype:
                raise ValueError(f"vertex delta for {name!r} has shape {tuple(t.shape)} ({t.dtype}), "
                                 f"expected {tuple(ref.shape)} ({ref.dtype})")
            cur[name] = t
        elif kind == "V":
            rows = _delta_rows(delta, name, ref)
            if t.dtype != ref.dtype or tuple(t.shape) != (len(rows), *ref.shape[1:]):
                raise ValueError(f"vertex delta rows for {name!r} have shape {tuple(t.shape)} ({t.dtype}), "
                                 f"expected {(len(rows), *ref.shape[1:])} ({ref.dtype})")
            x = ref.clone()
            x[rows] = t
            cur[name] = x
        elif f"V:{name}" not in delta:
            raise KeyError(f"vertex delta has row indices for {name!r} but no rows")
    return cur


def _delta_rows(delta: Mapping[str, torch.Tensor], name: str, ref: torch.Tensor) -> torch.Tensor:
    """The row indices `R:<name>` of a delta, checked: 1-D integers in [0, rows of `ref`)."""
    r = delta.get(f"R:{name}")
    if r is None:
        raise KeyError(f"vertex delta has rows for {name!r} but no row indices")
    if ref.dim() < 1 or r.dim() != 1 or r.is_floating_point() or r.is_complex() or r.dtype == torch.bool:
        raise ValueError(f"vertex delta row indices for {name!r} must be a 1-D integer tensor, "
                         f"got shape {tuple(r.shape)} ({r.dtype})")
    r = r.long()
    if r.numel() and (int(r.min()) < 0 or int(r.max()) >= ref.shape[0]):
        raise ValueError(f"vertex delta row indices for {name!r} run outside 0 .. {ref.shape[0] - 1}")
    return r


@dataclass(frozen=True)
class DropoutConfig:
    """The dropout-stable path's settings. search_steps: swap trials per unit group when
    choosing the kept halves (0: the importance ranking alone)."""

    search_steps: int = 48

    def __post_init__(self) -> None:
        check_count(self.search_steps, "search_steps", minimum=0)


@register_path("dropout")
class DropoutPath(ModePath):
    """A piecewise-linear path through `vertices` (state dicts; the first is A, the last
    B), equally spaced in t. `certificate`: `max_loss` (largest vertex loss: a bound on
    the loss everywhere on the path, on the data it was computed on), `eps`, `loss_a`,
    `loss_b`, `bound`, `vertex_losses`, `segments` (`kind` in classifier / inactive /
    switch, `step`, `t0`, `t1`), `stability`. Stored as endpoints plus per-vertex row
    deltas."""

    #: how a vertex is stored against the one before it, and read back (a subclass may
    #: store more compactly: the short path adds per-column multipliers)
    _encode_delta = staticmethod(_encode)
    _decode_delta = staticmethod(_decode)

    def __init__(self, vertices: list[Mapping[str, torch.Tensor]], *, certificate=None,
                 metadata: Mapping[str, Any] | None = None, copy: bool = True):
        if len(vertices) < 2:
            raise ValueError(f"a {self.kind} path needs at least two vertices")
        check_same_layout(vertices[0], vertices[-1])
        groups: dict[str, Mapping[str, torch.Tensor]] = {"endpoint.0": vertices[0],
                                                         "endpoint.1": vertices[-1]}
        for i in range(1, len(vertices) - 1):
            groups[f"delta.{i}"] = self._encode_delta(vertices[i - 1], vertices[i])
        self._init(groups, len(vertices), certificate, metadata, copy)

    @classmethod
    def _from_groups(cls, groups: dict[str, StateDict], n: int, *, certificate=None,
                     metadata: Mapping[str, Any] | None = None) -> "DropoutPath":
        """The path from its groups as built (endpoints and deltas, owned: not copied)."""
        self = cls.__new__(cls)
        self._init(groups, n, certificate, metadata, False)
        return self

    def _init(self, groups, n, certificate, metadata, copy) -> None:
        ModePath.__init__(self, groups, metadata=metadata, copy=copy)
        self.n_vertices = n
        self.vertex_t = [i / (n - 1) for i in range(n)]
        if certificate is not None:
            self.certificate = dict(certificate)
        self._states: list[StateDict] | None = None
        self._cursor: dict[int, StateDict] = {}

    def vertex_states(self) -> list[StateDict]:
        """Every vertex's state dict (shared tensors between vertices; do not modify). Holds
        them all (kept for later calls); `state_at` does not need this: it decodes from the
        nearest vertex it last decoded."""
        if self._states is None:
            self._states = list(self._decoded())
        return self._states

    def _decoded(self, stop: int | None = None, start: tuple[int, StateDict] | None = None):
        """(Vertex i's state, in order from `start` (index, state; default A) up to `stop`
        (default the last), each decoded from the one before; only the one yielded is held."""
        a, b = self.endpoints
        last = self.n_vertices - 1 if stop is None else stop
        i, st = start or (0, a)
        yield st
        while i < last:
            i += 1
            st = b if i == self.n_vertices - 1 else self._decode_delta(st, self.groups.get(f"delta.{i}", {}))
            yield st

    def _validate(self) -> None:
        """Decode every delta once (`ValueError` / `KeyError` on a damaged one), holding two vertices at most."""
        for _ in self._decoded():
            pass

    def _vertex(self, i: int) -> StateDict:
        """Vertex i (do not modify), decoded forward from the nearest of the last two vertices
        decoded at or before it (or A): a sweep in t decodes each delta once and holds two
        vertices, not the path."""
        if self._states is not None:
            return self._states[i]
        if i in self._cursor:
            return self._cursor[i]
        j = max((k for k in self._cursor if k < i), default=None)
        start = None if j is None else (j, self._cursor[j])
        window: list[StateDict] = []
        for st in self._decoded(i, start):
            window = [*window[-1:], st]
        self._cursor = dict(zip(range(i + 1 - len(window), i + 1), window))  # vertices i-1 and i
        return window[-1]

    def _state_at(self, t: float) -> StateDict:
        pos = t * (self.n_vertices - 1)
        i = round(pos)
        if abs(pos - i) < 1e-9:
            return {k: v.clone() for k, v in self._vertex(i).items()}
        i = min(int(pos), self.n_vertices - 2)
        va = self._vertex(i)
        return mix_states(va, self._vertex(i + 1), pos - i)

    config_class = DropoutConfig
    flags = {"search_steps": "--method dropout / short: swap trials per unit group when choosing the kept halves "
                             "(0: the importance ranking alone, fastest)."}

    @classmethod
    def from_options(cls, net, a, b, *, config: DropoutConfig, opts, data, fit_loader, bn_loader,
                     index: int = 0, graph=None) -> "DropoutPath":
        """`build --method dropout`: `build_dropout_path` with BN statistics from `bn_loader`."""
        return build_dropout_path(net, a, b, bn_loader, graph=graph, device=data.device, progress=data.progress,
                                  search_steps=config.search_steps)

    def _file_fields(self) -> dict[str, Any]:
        return {"n_vertices": self.n_vertices}

    @classmethod
    def _from_file(cls, groups: dict[str, StateDict], meta: dict[str, Any]) -> "DropoutPath":
        # every vertex between the ends has a delta group (empty when nothing changed), so the
        # groups listed in the file bound n_vertices before anything is built from it
        n = meta_field(meta, "n_vertices", "int", lo=2, hi=len(groups))
        want = {"endpoint.0", "endpoint.1", *(f"delta.{i}" for i in range(1, n - 1))}
        if set(groups) != want:
            raise ValueError(f"a dropout path of {n} vertices has groups endpoint.0, endpoint.1 and "
                             f"delta.1 .. delta.{n - 2}; the file has {sorted(groups)[:8]}")
        check_same_layout(groups["endpoint.0"], groups["endpoint.1"])
        self = cls.__new__(cls)
        self._init(groups, n, meta.get("certificate"), meta, False)
        self._validate()  # every delta, now
        return self
