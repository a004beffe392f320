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

__all__ = ["Partial", "copy_changed"]


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


class Partial:
    """Forward passes of the work model (traced with torch.fx) that redo only what a unit
    group's consumer tensors reach. `frontier` runs the loaded state over the part of the
    network g does not reach (from an earlier group's frontier when that covers it) and
    keeps the values flowing out of it; `__call__` then runs only the part g reaches.
    `make` gives None when the model does not trace (the search then runs full passes)."""

    def __init__(self, gm, x: torch.Tensor):
        import torch.fx as fx

        class _Keep(fx.Interpreter):
            keep: Any = ()
            kept: dict = {}

            def run_node(self, n):
                v = super().run_node(n)
                if n in self.keep:
                    self.kept[n] = v
                return v

        self.interp, self.x = _Keep(gm), x
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
            names = {r.tensor for r in g.refs("consumer")}
            hit, found = set(), set()
            for n in self.nodes:
                own = {t for t in names if t == n.target or t.startswith(f"{n.target}.")} \
                    if n.op in ("call_module", "get_attr") else set()
                found |= own
                if own or any(a in hit for a in n.all_input_nodes):
                    hit.add(n)
            u = {n for n in self.nodes if n not in hit}
            self.plans[g.name] = None if found != names else (u, {n for n in u if any(v in hit for v in n.users)})
        return self.plans[g.name]

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
