"""The plane through A, B and a bend: loss on a grid, and paths projected onto it.

The picture mode connectivity is known by (Garipov et al. 2018, fig. 1). With
u = B - A and the bend's offset P - A, an orthonormal basis (e1, e2) is built by
Gram-Schmidt over the floating *parameters* (BatchNorm running statistics are not
coordinates: they are re-estimated at every grid point for BN models). A grid point
(x, y) is the state A + x e1 + y e2.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ._layout import fast_layout
from .bn import has_batchnorm, update_bn
from .errors import BadOptionError
from .evaluate import _load_state_strict, evaluate
from .models import ModelLike, as_factory

__all__ = ["PlaneResult", "plane_basis", "project", "scan_plane"]

StateDict = dict[str, torch.Tensor]


@dataclass
class PlaneResult:
    """Loss on a grid of the plane, and where the named points and paths fall on it."""

    xs: list[float]
    ys: list[float]
    loss: list[list[float]]  # loss[j][i] at (xs[i], ys[j])
    acc: list[list[float]]
    points: dict[str, tuple[float, float]]  # "A", "B", "bend"
    paths: dict[str, list[tuple[float, float]]]  # label -> projected (x, y) along t
    bn_reestimated: bool
    data: str = "all the training data"  # which examples the grid's losses and BatchNorm used

    def to_dict(self) -> dict[str, Any]:
        return {"xs": self.xs, "ys": self.ys, "loss": self.loss, "acc": self.acc,
                "points": {k: list(v) for k, v in self.points.items()},
                "paths": {k: [list(p) for p in v] for k, v in self.paths.items()},
                "bn_reestimated": self.bn_reestimated, "data": self.data}


def _coords(model: nn.Module, a: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating parameters: the plane's coordinates."""
    names = [n for n, _ in model.named_parameters()]
    return [n for n in names if n in a and a[n].is_floating_point()]


def _flat(state: Mapping[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([state[n].detach().reshape(-1).double() for n in names])


def plane_basis(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], bend: Mapping[str, torch.Tensor],
                names: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(origin, e1, e2) as flat float64 vectors over `names`."""
    o, vb, vp = _flat(a, names), _flat(b, names), _flat(bend, names)
    u = vb - o
    if u.norm() == 0:
        raise BadOptionError("A and B are the same point: there is no plane through them", option="plane")
    e1 = u / u.norm()
    w = (vp - o) - ((vp - o) @ e1) * e1
    if w.norm() <= 1e-5 * u.norm():  # float32 weights: anything closer is rounding
        raise BadOptionError("the bend lies on the straight line A-B (an untrained curve?): no plane to draw",
                             option="plane")
    return o, e1, w / w.norm()


def project(state: Mapping[str, torch.Tensor], names: list[str], basis) -> tuple[float, float]:
    o, e1, e2 = basis
    d = _flat(state, names) - o
    return float(d @ e1), float(d @ e2)


def _state_on_plane(x: float, y: float, template: StateDict, names: list[str], basis) -> StateDict:
    o, e1, e2 = basis
    vec = o + x * e1 + y * e2
    out = {k: v.clone() for k, v in template.items()}
    i = 0
    for n in names:
        k = out[n].numel()
        out[n] = vec[i:i + k].reshape(out[n].shape).to(out[n].dtype)
        i += k
    return out


def scan_plane(path: Any, model: ModelLike, loader: Iterable, *, bn_loader: Iterable | None = None,
               resolution: int = 11, margin: float = 0.2, path_points: int = 21, others: Mapping[str, Any] = {},
               device: str | torch.device = "cpu", progress: bool | None = None,
               sample_examples: int | None = 2048) -> PlaneResult:
    """Evaluate the training loss on a `resolution` x `resolution` grid of the plane through
    the path's endpoints and its first bend; project the path (and `others`, label -> path)
    at `path_points` evenly spaced t. `model` (a ModelLike) is instantiated once via
    `as_factory`: an `nn.Module` is copied, the caller's model is never changed.
    `sample_examples`: each grid point's loss, and its BatchNorm re-estimation, on a fixed
    subsample of about that many examples of `loader` / `bn_loader` (`mcensemble.bn.FixedSubset`,
    the same examples at every point; None: all of them); `PlaneResult.data` says which."""
    if resolution < 2:
        raise BadOptionError(f"the plane grid needs at least 2 points a side, got {resolution}", option="plane_grid")
    if path_points < 2:
        raise BadOptionError(f"path_points must be at least 2 (the path's ends), got {path_points}",
                             option="path_points")
    groups = getattr(path, "groups", {})
    if "bend.0" not in groups:
        raise BadOptionError(f"a {path.kind} path has no bend: `plane` needs a bezier or polychain path "
                             "(`path_out` of a build with `method` bezier writes one)", option="plane")
    a, b = path.endpoints
    bend = {**a, **groups["bend.0"]}
    net = as_factory(model)()
    fast_layout(net, loader, device=device)  # a private copy: channels_last on CPU where it is faster
    names = _coords(net, a)
    basis = plane_basis(a, b, bend, names)
    pts = {"A": project(a, names, basis), "B": project(b, names, basis), "bend": project(bend, names, basis)}
    xs_all, ys_all = [p[0] for p in pts.values()], [p[1] for p in pts.values()]
    span = max(max(xs_all) - min(xs_all), max(ys_all) - min(ys_all))
    lo_x, hi_x = min(xs_all) - margin * span, max(xs_all) + margin * span
    lo_y, hi_y = min(ys_all) - margin * span, max(ys_all) + margin * span
    xs = [lo_x + (hi_x - lo_x) * i / (resolution - 1) for i in range(resolution)]
    ys = [lo_y + (hi_y - lo_y) * j / (resolution - 1) for j in range(resolution)]
    bn = has_batchnorm(net) and bn_loader is not None
    data, note = _sample(loader, sample_examples)
    if bn:
        bn_loader, bn_note = (data, note) if bn_loader is loader else _sample(bn_loader, sample_examples)
        note = f"loss on {note}; BatchNorm re-estimated at every point on {bn_note}"
    loss = [[0.0] * resolution for _ in ys]
    acc = [[0.0] * resolution for _ in ys]
    bar = tqdm(total=resolution * resolution, desc="plane", file=sys.stderr, leave=False,
               disable=None if progress is None else not progress)
    try:
        for j, y in enumerate(ys):
            for i, x in enumerate(xs):
                _load_state_strict(net, _state_on_plane(x, y, a, names, basis))
                net.to(device)
                if bn:
                    update_bn(net, bn_loader, device=device, progress=False)
                m = evaluate(net, data, device=device, progress=False)
                loss[j][i], acc[j][i] = m.loss, m.acc
                bar.update()
    finally:
        bar.close()
    ts = [k / (path_points - 1) for k in range(path_points)]
    paths = {label: [project(p.state_at(t), names, basis) for t in ts]
             for label, p in {path.kind: path, **others}.items()}
    return PlaneResult(xs=xs, ys=ys, loss=loss, acc=acc, points=pts, paths=paths, bn_reestimated=bn, data=note)


def _sample(loader: Iterable, examples: int | None) -> tuple[Iterable, str]:
    """(the fixed subsample of `loader`, or `loader` itself when it holds no more, and what it is)."""
    from .bn import FixedSubset
    if examples is None:
        return loader, "all the training data"
    sub = FixedSubset(loader, examples, what="the plane scan")
    if sub.of is not None and sub.batches >= sub.of:
        return loader, "all the training data"
    return sub, f"a fixed subsample of the training data ({sub.describe()})"
