"""Partial forward passes: after a change to the tensors one unit group's consumers read,
rerun only the part of the network those tensors reach (torch.fx), from the values flowing
out of the rest. Shared by the kept-half searches (`mcensemble.stability`, the short
path's joint search in `mcensemble.paths.short`)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .errors import MCEnsembleError
from .units import UnitGroup, _trace

__all__ = ["Partial", "Family", "copy_changed", "distinct_bytes", "reach"]


def copy_changed(dst: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor],
                 skip) -> dict[str, torch.Tensor]:
    """Copy into `dst` (a work model's own tensors) the tensors of `sd` that are not the very
    ones loaded last (`loaded`), and return what is loaded now, less the names in `skip`
    (BatchNorm statistics that batch statistics dirty: always copied)."""
    with torch.no_grad():
        for k, v in sd.items():
            if loaded.get(k) is not v:
                dst[k].copy_(v)
    return {k: v for k, v in sd.items() if k not in skip}


def _keeping_interpreter(gm):
    """A torch.fx interpreter of `gm` that keeps, in `kept`, the values of the nodes in `keep`."""
    import torch.fx as fx

    class _Keep(fx.Interpreter):
        keep: Any = ()
        kept: dict = {}

        def run_node(self, n):
            v = super().run_node(n)
            if n in self.keep:
                self.kept[n] = v
            return v

    return _Keep(gm)


def _owns(node, names: set[str]) -> set[str]:
    """The tensors of `names` (state-dict names) that a traced `node` holds: those of its
    module (call_module) or the attribute itself (get_attr)."""
    if node.op not in ("call_module", "get_attr"):
        return set()
    return {t for t in names if t == node.target or t.startswith(f"{node.target}.")}


def distinct_bytes(tensors) -> int:
    """Bytes held by the distinct tensors among `tensors` (each counted once)."""
    seen, size = set(), 0
    for t in tensors:
        if torch.is_tensor(t) and id(t) not in seen:
            seen.add(id(t))
            size += t.numel() * t.element_size()
    return size


def reach(nodes: list, names: set[str]) -> tuple[set, set] | None:
    """(U, F) for the tensors `names` (state-dict names) in a traced graph's `nodes`: the
    nodes they do not reach, and those of them read by a node they reach. None when a
    tensor is not found in the trace."""
    hit, found = set(), set()
    for n in nodes:
        own = _owns(n, names)
        found |= own
        if own or any(a in hit for a in n.all_input_nodes):
            hit.add(n)
    if found != names:
        return None
    u = {n for n in nodes if n not in hit}
    return u, {n for n in u if any(v in hit for v in n.users)}


class Partial:
    """Forward passes of the work model (traced with torch.fx) that redo only what a unit
    group's consumer tensors reach. `frontier` runs the loaded state over the part of the
    network g does not reach (from an earlier group's frontier when that covers it) and
    keeps the values flowing out of it; `__call__` then runs only the part g reaches.
    `make` gives None when the model does not trace (the search then runs full passes)."""

    def __init__(self, gm, x: torch.Tensor):
        self.interp, self.x = _keeping_interpreter(gm), x
        self.nodes = list(gm.graph.nodes)
        self.plans: dict[str, tuple[set, set] | None] = {}

    @classmethod
    def make(cls, work: nn.Module, x: torch.Tensor) -> "Partial | None":
        try:
            return cls(_trace(work, (x[:2],)), x)
        except MCEnsembleError:  # a hand-given unit graph for a model fx cannot trace: full passes
            return None

    def plan(self, g: UnitGroup) -> tuple[set, set] | None:
        """(U, F): the nodes g's consumer tensors do not reach, and those of them read by a
        node they reach. None when a tensor is not found in the trace."""
        if g.name not in self.plans:
            self.plans[g.name] = reach(self.nodes, {r.tensor for r in g.refs("consumer")})
        return self.plans[g.name]

    def keeping(self, groups) -> tuple[Any, dict[str, dict]]:
        """A full pass of the loaded state: its output, and each of `groups`' frontier values
        (`{group name: values}`, as `frontier` gives them) taken on the way."""
        fs = {g.name: self.plan(g)[1] for g in groups}
        self.interp.keep, self.interp.kept = set().union(*fs.values()), {}
        out = self.interp.run(self.x)
        return out, {name: {n: self.interp.kept[n] for n in f} for name, f in fs.items()}

    @torch.no_grad()
    def frontier_bytes(self, groups) -> int:
        """About how many bytes `keeping(groups)` holds on x: measured on two examples."""
        fs = set().union(*(self.plan(g)[1] for g in groups if self.plan(g) is not None))
        if not fs:
            return 0
        self.interp.keep, self.interp.kept = fs, {}
        probe = self.x[:2]
        self.interp.run(probe)
        size = distinct_bytes(t for v in self.interp.kept.values()
                              for t in (v if isinstance(v, (tuple, list)) else (v,)))
        self.interp.kept = {}
        return size * self.x.shape[0] // max(1, probe.shape[0])

    def upstream_reads(self, group: str, names: set[str]) -> bool:
        """Does a node that the consumer tensors of `group` (planned before) do not reach
        own one of the tensors `names`? Then a change to them changes that group's frontier."""
        u, _ = self.plans[group]
        return any(_owns(n, names) for n in u)

    def frontier(self, g: UnitGroup, prev: tuple[str, dict] | None) -> dict:
        """g's frontier values under the loaded state. `prev` = (group h, h's frontier
        values), computed under a state that differs from the loaded one only in tensors
        h reads: used when it covers g's frontier (F_g inside F_h or outside U_h)."""
        u, f = self.plan(g)
        env = {n: None for n in self.nodes if n not in u}
        if prev is not None and self.plans.get(prev[0]):
            uh, fh = self.plans[prev[0]]
            if all(n in fh or n not in uh for n in f):
                env.update({n: None for n in uh if n not in fh})
                env.update({n: v for n, v in prev[1].items() if n in u})
        self.interp.keep, self.interp.kept = f, {}
        self.interp.run(self.x, initial_env=dict(env))
        return {n: self.interp.kept[n] if n in self.interp.kept else env[n] for n in f}

    def __call__(self, g: UnitGroup | None = None, front: dict | None = None) -> Any:
        """The loaded state's output on x: a full pass, or only the part g reaches, from g's
        frontier values `front` (the part g does not reach unchanged since)."""
        env = {}
        if g is not None:
            u, _ = self.plan(g)
            env = {n: None for n in u}
            env.update(front)
        self.interp.keep, self.interp.kept = (), {}
        return self.interp.run(self.x, initial_env=env)


class Family:
    """Several states of one work model that differ from a base state only in some tensors
    (the changed ones are other tensor objects, the rest the base's own): per batch the base
    runs in full, keeping the values flowing out of the part of the network each state's
    changed tensors do not reach, and each state runs only the part they reach. The
    dropout networks D_k of a layered network share everything below depth k, so their
    losses and BatchNorm statistics cost a fraction of a full pass each. `make` gives None
    when the model does not trace; a state whose tensors are not all found in the trace
    runs in full."""

    def __init__(self, work: nn.Module, gm, base: dict[str, torch.Tensor], states: dict[Any, dict[str, torch.Tensor]]):
        self.work, self.base, self.states = work, base, states
        self.interp = _keeping_interpreter(gm)
        self.nodes = list(gm.graph.nodes)
        self.dst = work.state_dict(keep_vars=True)
        #: tensors copied in at every load whatever was loaded before (running statistics that
        #: a pass in train mode changes)
        self.always: set[str] = set()
        self.replan()

    def replan(self, extra: dict[Any, set[str]] | None = None) -> None:
        """Which part of the network each state reruns: what its changed tensors, and the
        tensors `extra[key]` names, reach (everything, a full pass, when one of them is not
        found in the trace). Call again after changing the states."""
        self.plans = {}
        for key, sd in self.states.items():
            names = {n for n, t in sd.items() if t is not self.base[n]} | set((extra or {}).get(key, ()))
            self.plans[key] = reach(self.nodes, names) or (set(), set())
        self.keep = set().union(*(f for _, f in self.plans.values()))

    @classmethod
    def make(cls, work: nn.Module, x: torch.Tensor, base: dict[str, torch.Tensor],
             states: dict[Any, dict[str, torch.Tensor]]) -> "Family | None":
        try:
            return cls(work, _trace(work, (x[:2],)), base, states)
        except MCEnsembleError:
            return None

    def run(self, x: torch.Tensor, *, before=None, after=None) -> tuple[Any, dict[Any, Any]]:
        """The base's output on `x` and each state's, `{key: output}`. `before(key)` /
        `after(key)` run around each state's pass (BatchNorm re-estimation switches the
        state's modules to train mode there); the base always runs first."""
        loaded: dict[str, torch.Tensor] = {}
        loaded = copy_changed(self.dst, self.base, loaded, self.always)
        self.interp.keep, self.interp.kept = self.keep, {}
        out = self.interp.run(x)
        front = dict(self.interp.kept)
        outs = {}
        for key, sd in self.states.items():
            loaded = copy_changed(self.dst, sd, loaded, self.always)
            u, f = self.plans[key]
            env = {n: None for n in u}
            env.update({n: front[n] for n in f})
            if before is not None:
                before(key)
            try:
                self.interp.keep, self.interp.kept = (), {}
                outs[key] = self.interp.run(x, initial_env=env)
            finally:
                if after is not None:
                    after(key)
        copy_changed(self.dst, self.base, loaded, self.always)  # the work model holds the base again
        return out, outs
