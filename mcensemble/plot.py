"""PNG figures. Uses matplotlib's object API (`Figure` + `FigureCanvasAgg`), never
pyplot, so no global backend or figure state is touched."""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence, Union

from ._io import atomic_path
from .errors import BadOptionError

__all__ = ["plot_scan", "plot_plane", "plot_barrier_matrix", "plot_tree"]

_KIND_LABELS = {"linear": "straight line", "bezier": "bezier", "polychain": "polychain"}

ScanLike = Any  # ScanResult or its to_dict() form
Scans = Union[ScanLike, Sequence[ScanLike], Mapping[str, ScanLike]]


def _as_dict(r: ScanLike) -> dict[str, Any]:
    if hasattr(r, "to_dict"):
        return r.to_dict()
    if isinstance(r, Mapping) and "points" in r:
        return dict(r)
    raise BadOptionError(f"`scans` must hold ScanResults or their to_dict() form, got {type(r).__name__}",
                         option="scans")


def _curves(scans: Scans, labels: Sequence[str] | None) -> list[tuple[str, dict[str, Any]]]:
    if isinstance(scans, Mapping) and "points" not in scans:
        items = [(str(k), _as_dict(v)) for k, v in scans.items()]
    else:
        seq = [scans] if hasattr(scans, "to_dict") or isinstance(scans, Mapping) else list(scans)
        items = []
        for i, r in enumerate(seq):
            d = _as_dict(r)
            label = d.get("label") or _KIND_LABELS.get(d.get("kind") or "", d.get("kind")) or f"path {i + 1}"
            items.append((label, d))
    if labels is not None:
        if len(labels) != len(items):
            raise BadOptionError(f"{len(labels)} `labels` given for {len(items)} scans", option="labels")
        items = [(str(lab), d) for lab, (_, d) in zip(labels, items)]
    if not items:
        raise BadOptionError("`scans` is empty: plot_scan needs at least one scan result", option="scans")
    return items


def plot_scan(result_or_list: Scans, dest: str | os.PathLike, *, title: str | None = None,
              labels: Sequence[str] | None = None, baselines: Sequence[Mapping[str, Any]] | None = None,
              split: str = "val") -> None:
    """Write a PNG of loss (left) and error = 1 - accuracy (right) against t.

    `result_or_list`: a `ScanResult` (or its dict), a list of them, or a mapping
    label -> result to draw several paths in one figure. Labels default to the result's
    `label`, else its kind ("linear" -> "straight line"). Training curves are solid with
    dots; validation curves (when the scan has `val_*`) dashed with crosses. Written
    atomically.

    `baselines`: a build report's rows (`report["baselines"]`): a third panel gives each
    row's NLL on `split` (and on "test" where rows have it), labelled with its cost;
    skipped rows are listed with the reason.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure


    curves = _curves(result_or_list, labels)
    fig = Figure(figsize=(15 if baselines else 10, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    if baselines:
        ax_loss, ax_err, ax_base = fig.subplots(1, 3, width_ratios=[1, 1, 1.1])
        _plot_baselines(ax_base, baselines, split)
    else:
        ax_loss, ax_err = fig.subplots(1, 2)
    colors = [f"C{i % 10}" for i in range(len(curves))]
    for (label, d), color in zip(curves, colors):
        pts = d["points"]
        ts = [p["t"] for p in pts]
        ax_loss.plot(ts, [p["loss"] for p in pts], "-o", color=color, ms=3, label=f"{label} (train)")
        ax_err.plot(ts, [1 - p["acc"] for p in pts], "-o", color=color, ms=3, label=f"{label} (train)")
        if pts and "val_loss" in pts[0]:
            ax_loss.plot(ts, [p["val_loss"] for p in pts], "--x", color=color, ms=4, label=f"{label} (val)")
            ax_err.plot(ts, [1 - p["val_acc"] for p in pts], "--x", color=color, ms=4, label=f"{label} (val)")
    for ax, ylabel in ((ax_loss, "loss (cross entropy)"), (ax_err, "error (1 - accuracy)")):
        ax.set_xlabel("t")
        ax.set_ylabel(ylabel)
        ax.set_xlim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    ax_loss.set_title("loss along the path", fontsize="medium")
    ax_err.set_title("error along the path", fontsize="medium")
    if len(curves) == 1:
        d = curves[0][1]
        note = f"barrier {d['barrier']:.4g}"
        if d.get("val_barrier") is not None:
            note += f", val barrier {d['val_barrier']:.4g}"
        if d.get("has_batchnorm") and not d.get("bn_reestimated"):
            note += " (BN statistics not re-estimated)"
        fig.suptitle(f"{title}\n{note}" if title else note)
    elif title:
        fig.suptitle(title)
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png")


def _plot_baselines(ax, rows: Sequence[Mapping[str, Any]], split: str) -> None:
    """Horizontal bars: NLL of each baseline row on `split` (and "test"), cost in the label."""
    shown = [r for r in rows if "skipped" not in r and isinstance(r.get(split), Mapping)]
    if not shown:
        raise BadOptionError(f"no row of `baselines` has metrics on `split` {split!r}", option="baselines")
    names = [f"{r['name']} (cost {r['cost']})" for r in shown]
    ys = list(range(len(shown)))[::-1]
    test = any(isinstance(r.get("test"), Mapping) for r in shown)
    h = 0.4 if test else 0.7
    ax.barh([y + (h / 2 if test else 0) for y in ys], [r[split]["nll"] for r in shown], height=h,
            color="C0", label=split)
    if test:
        ax.barh([y - h / 2 for y in ys], [r["test"]["nll"] if isinstance(r.get("test"), Mapping) else 0
                                         for r in shown], height=h, color="C1", label="test")
    ax.set_yticks(ys, names, fontsize="small")
    ax.set_xlabel("NLL (lower is better)")
    ax.set_title("what each choice costs and gives", fontsize="medium")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize="small")
    skipped = [f"{r['name']}: {r['skipped']}" for r in rows if "skipped" in r]
    if skipped:
        ax.text(0.0, -0.25, "\n".join(s if len(s) < 90 else s[:87] + "..." for s in skipped),
                transform=ax.transAxes, fontsize="x-small", va="top")


def plot_plane(result: Any, dest: str | os.PathLike, *, title: str | None = None) -> None:
    """Write a PNG of training-loss contours on the plane through A, B and the bend, with
    the projected paths (the curve, the straight line) and the three points marked.

    `result`: a `mcensemble.plane.PlaneResult` or its `to_dict()`. Written atomically.
    """

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure


    d = result.to_dict() if hasattr(result, "to_dict") else dict(result)
    fig = Figure(figsize=(6, 5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    # log-scaled contour levels: the valley is orders of magnitude below the ridge
    z = [[math.log10(max(v, 1e-6)) for v in row] for row in d["loss"]]
    cs = ax.contourf(d["xs"], d["ys"], z, levels=20, cmap="viridis_r")
    fig.colorbar(cs, ax=ax, label="log10 train loss")
    for i, (label, pts) in enumerate(d["paths"].items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=f"C{(i + 1) % 10}", lw=2,
                label=_KIND_LABELS.get(label, label))
    for name, (x, y) in d["points"].items():
        ax.plot([x], [y], "o" if name != "bend" else "s", color="white", mec="black", ms=8)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 6), color="white", fontweight="bold")
    ax.set_xlabel("along B - A")
    ax.set_ylabel("towards the bend")
    ax.legend(fontsize="small", loc="lower right")
    if title:
        ax.set_title(title, fontsize="medium")
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png")


def plot_barrier_matrix(matrix: Sequence[Sequence[float]], dest: str | os.PathLike, *,
                        labels: Sequence[str] | None = None, tree: Sequence[tuple[int, int]] = (),
                        title: str | None = None) -> None:
    """Write a heat map of a symmetric barrier matrix (`mcensemble connect`), each cell
    labelled with its value; the cells of `tree` edges (i, j) are outlined. Written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle


    n = len(matrix)
    labels = list(labels) if labels is not None else [str(i) for i in range(n)]
    if len(labels) != n:
        raise BadOptionError(f"{len(labels)} `labels` given for a {n} x {n} matrix", option="labels")
    size = 3 + 0.6 * n
    fig = Figure(figsize=(size + 1, size), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    im = ax.imshow([list(map(float, row)) for row in matrix], cmap="magma_r")
    fig.colorbar(im, ax=ax, label="barrier (train loss above the chord)")
    top = max((float(v) for row in matrix for v in row), default=0.0)
    for i in range(n):
        for j in range(n):
            v = float(matrix[i][j])
            ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize="x-small",
                    color="white" if top and v > 0.6 * top else "black")
    for i, j in tree:
        for r, c in ((i, j), (j, i)):
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, ec="C2", lw=2))
    ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize="small")
    ax.set_yticks(range(n), labels, fontsize="small")
    ax.set_title(title or "barriers (green: minimum spanning tree)", fontsize="medium")
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png")


def plot_tree(n: int, edges: Sequence[Mapping[str, Any]], dest: str | os.PathLike, *,
              labels: Sequence[str] | None = None, title: str | None = None) -> None:
    """Write a picture of a spanning tree over `n` checkpoints (on a circle): `edges` are
    dicts with `i`, `j` and `saddle` (the largest loss along that edge's path, also its
    colour) and optionally `barrier` (the straight line's). Written atomically."""

    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure


    labels = list(labels) if labels is not None else [str(i) for i in range(n)]
    if len(labels) != n:
        raise BadOptionError(f"{len(labels)} `labels` given for {n} checkpoints", option="labels")
    pos = [(math.cos(2 * math.pi * k / n + math.pi / 2), math.sin(2 * math.pi * k / n + math.pi / 2))
           for k in range(n)]
    fig = Figure(figsize=(6.5, 6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    saddles = [float(e["saddle"]) for e in edges]
    norm = Normalize(vmin=min(saddles, default=0.0), vmax=max(saddles, default=1.0) or 1.0)
    cmap = colormaps["viridis"]
    for e, s in zip(edges, saddles):
        (x0, y0), (x1, y1) = pos[e["i"]], pos[e["j"]]
        ax.plot([x0, x1], [y0, y1], "-", color=cmap(norm(s)), lw=3, zorder=1)
        text = f"{s:.3g}" + (f"\n(line {float(e['barrier']):.2g})" if "barrier" in e else "")
        ax.annotate(text, ((x0 + x1) / 2, (y0 + y1) / 2), ha="center", va="center", fontsize="small",
                    bbox={"boxstyle": "round", "fc": "white", "alpha": 0.8})
    for k, (x, y) in enumerate(pos):
        ax.plot([x], [y], "o", ms=14, color="white", mec="black", zorder=2)
        ax.annotate(labels[k], (x, y), textcoords="offset points", xytext=(0, 12), ha="center", fontsize="small")
    sm = ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, ax=ax, label="saddle: largest train loss along the path")
    ax.set_xlim(-1.4, 1.4)
    ax.set_ylim(-1.4, 1.4)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title or "minimum spanning tree", fontsize="medium")
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png")
