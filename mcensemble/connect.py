"""Many checkpoints at once (Draxler et al. 2018): the barrier matrix and the minimum spanning tree.

`connect_checkpoints(inputs, out_dir=...)`:

1. The barrier of every pair (i, j): the straight line from i to j scanned at `points` t
   (BatchNorm statistics re-estimated at every point), barrier = the largest training loss
   above the chord. With `align`, j's hidden units are first permuted to match i's.
2. Kruskal's minimum spanning tree of the barrier matrix (ties broken by (i, j)).
3. A path along every tree edge by `opts.method` (any kind of `paths.buildable_kinds()`: linear,
   bezier, polychain, neb, dropout, short), scanned at `path_points` t: the edge's saddle
   is the largest training loss along it.

The output folder holds `connect.json` (the matrix, the tree with its saddles, times per
pair), `barriers.png` (heat map) and `tree.png`, one JSON record per finished pair
(`pairs/`) and per finished tree edge (`edges/`, with the path in `paths/`). A record whose
checkpoints (SHA-256) and settings match is reused, so an interrupted run resumes where it
stopped. Under torchrun the pairs are shared out between the processes (each writes its own
records); tree edges are built by all processes together (curve fits and AutoNEB average
their gradients over the processes), and only rank 0 writes the shared files.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path as FsPath
from typing import Any, Sequence

import torch

from tqdm.auto import tqdm

from . import distributed as dist_
from ._io import atomic_path, sha256_file, to_json
from .align import align_states
from .bn import has_batchnorm, labelled_batch
from .data import check_input_fits, create_loader, example_input
from .ensemble import save_ensemble
from .errors import BadOptionError, CheckpointError
from .evaluate import evaluate_state, scan
from .members import candidate_state, ensemble_metrics, evaluate_candidates, select_members
from .options import BuildOptions, ConnectOptions, DataOptions, ModelOptions
from .paths import load_path, path_kind
from .paths.linear import interpolate
from .inputs import load_endpoints, unit_graph_of
from .plot import plot_barrier_matrix, plot_tree
from .reports import choice_report
from .baselines import decision_sentence

__all__ = ["connect_checkpoints", "minimum_spanning_tree", "checkpoint_files",
           "CHECKPOINT_SUFFIXES", "CONNECT_FORMAT"]

log = logging.getLogger(__name__)

CONNECT_FORMAT = "mcensemble-connect"
#: file names taken from a folder of checkpoints
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".pth.tar", ".ckpt", ".bin")


def checkpoint_files(inputs: Sequence[str | os.PathLike]) -> list[FsPath]:
    """Files and folders -> checkpoint paths. A folder that is itself one checkpoint (a timm
    run or hub folder: `config.json`, `model_best.pth.tar`, `last.pth.tar`) stays one; any
    other folder gives its files ending in `CHECKPOINT_SUFFIXES`, sorted by name."""
    out: list[FsPath] = []
    for src in inputs:
        p = FsPath(src)
        if not p.exists():
            raise BadOptionError(f"{p}: no such file or folder", option="CHECKPOINTS")
        if p.is_dir() and not any((p / n).exists() for n in ("config.json", "model_best.pth.tar", "last.pth.tar")):
            found = sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(CHECKPOINT_SUFFIXES))
            if not found:
                raise BadOptionError(f"{p} holds no checkpoint files (names ending in "
                                     f"{', '.join(CHECKPOINT_SUFFIXES)}); give the files themselves",
                                     option="CHECKPOINTS")
            out += found
        else:
            out.append(p)
    if len(out) < 2:
        raise BadOptionError(f"connect needs at least two checkpoints, got {len(out)}", option="CHECKPOINTS")
    if len({os.path.realpath(p) for p in out}) != len(out):
        raise BadOptionError("a checkpoint is given twice; give each once", option="CHECKPOINTS")
    return out


def minimum_spanning_tree(matrix: Sequence[Sequence[float]]) -> list[tuple[int, int]]:
    """Kruskal's minimum spanning tree of a symmetric matrix of edge weights: the edges
    (i < j), in the order they were taken (lightest first; ties by (i, j))."""
    n = len(matrix)
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    tree = []
    for _, i, j in sorted((float(matrix[i][j]), i, j) for i in range(n) for j in range(i + 1, n)):
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[ri] = rj
            tree.append((i, j))
    return tree


# ---------------------------------------------------------------------------------------------


#: the straight lines' interior points re-estimate BatchNorm on a fixed subsample of this
#: many training examples (their losses use all of it)
BN_EXAMPLES = 2048


class _Job:
    """What every step needs: the checkpoints, the model, the loaders, the settings."""

    def __init__(self, files, cks, net, train, out_dir: FsPath, opts, build, data, graph):
        self.files, self.cks, self.net, self.train = files, cks, net, train
        self.out, self.opts, self.build, self.data, self.graph = out_dir, opts, build, data, graph
        self.sha = [ck.metadata.get("sha256") or sha256_file(f) for f, ck in zip(files, cks)]
        self._example = None
        self._bn = None

    def bn_data(self):
        """The barrier matrix's BatchNorm data: a fixed subsample of `BN_EXAMPLES` training
        examples (bounded, as `update_bn` users do), read once."""
        if self._bn is None:
            from .bn import FixedSubset
            self._bn = FixedSubset(self.train, BN_EXAMPLES, what="connect")
        return self._bn

    def settings(self, kind: str) -> dict[str, Any]:
        """What a record must match to be reused."""
        d = {"data": self.data.data, "batch_size": self.data.batch_size, "seed": self.data.seed,
             "align": self.opts.align}
        if kind == "pair":
            d["points"] = self.opts.points
            d["bn_examples"] = BN_EXAMPLES
        else:
            b = self.build
            config = path_kind(b.method).config_from(b.settings, seed=self.data.seed)
            # as JSON gives it back (tuples -> lists), to compare with a stored record
            settings = json.loads(json.dumps(dataclasses.asdict(config))) if config is not None else None
            d.update(method=b.method, path_points=self.opts.path_points, settings=settings)
        return d

    def states(self, i: int, j: int) -> tuple[dict, dict]:
        a, b = self.cks[i].state_dict, self.cks[j].state_dict
        if self.opts.align:
            if self._example is None:
                self._example = example_input(self.net, data=self.train)
            b = align_states(self.net, a, b, graph=self.graph, example_input=self._example, seed=self.data.seed,
                             progress=False).state
        return a, b

    def record(self, kind: str, i: int, j: int) -> FsPath:
        return self.out / f"{kind}s" / f"{kind}-{i}-{j}.json"

    def reusable(self, kind: str, i: int, j: int) -> dict[str, Any] | None:
        f = self.record(kind, i, j)
        try:
            rec = json.loads(f.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(rec, dict) or rec.get("sha256") != [self.sha[i], self.sha[j]] \
                or rec.get("settings") != self.settings(kind):
            log.info("%s does not match this run: recomputing it", f)
            return None
        if kind == "edge" and not (self.out / str(rec.get("path_file", ""))).is_file():
            return None
        return rec

    def write(self, kind: str, i: int, j: int, rec: dict[str, Any]) -> None:
        f = self.record(kind, i, j)
        f.parent.mkdir(parents=True, exist_ok=True)
        rec = {**rec, "sha256": [self.sha[i], self.sha[j]], "settings": self.settings(kind)}
        with atomic_path(f) as tmp:
            tmp.write_text(json.dumps(to_json(rec), indent=1, allow_nan=False))


def _pair(job: _Job, i: int, j: int) -> dict[str, Any]:
    """Scan the straight line i -> j in this process alone (no collectives)."""
    t0 = time.perf_counter()
    a, b = job.states(i, j)
    bn = job.bn_data() if has_batchnorm(job.net) else None
    n = job.opts.points
    ts = [k / (n - 1) for k in range(n)]
    pts = []
    for t in ts:
        m = evaluate_state(job.net, interpolate(a, b, t), job.train, bn_loader=bn, device=job.data.device,
                           progress=False)
        pts.append({"t": t, "loss": m.loss, "acc": m.acc})
    la, lb = pts[0]["loss"], pts[-1]["loss"]
    gaps = [p["loss"] - ((1 - p["t"]) * la + p["t"] * lb) for p in pts]
    k = max(range(n), key=lambda q: gaps[q])
    rec = {"i": i, "j": j, "barrier": max(gaps[k], 0.0), "barrier_t": ts[k], "points": pts,
           "seconds": time.perf_counter() - t0}
    job.write("pair", i, j, rec)
    return rec


def _pairs(job: _Job, progress) -> list[dict[str, Any]]:
    n = len(job.files)
    all_pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    found = dist_.broadcast_object({p: job.reusable("pair", *p) for p in all_pairs})  # rank 0 decides
    todo = [p for p in all_pairs if found[p] is None]
    mine = dist_.shard(todo)
    done = [_pair(job, i, j) for i, j in tqdm(mine, desc="pairs", leave=False,
                                               disable=None if progress is None else not progress)]
    computed = dict(zip(todo, dist_.gather_sharded(done, len(todo))))
    out = []
    for p in all_pairs:
        rec = found[p] if found[p] is not None else computed[p]
        out.append({**rec, "reused": found[p] is not None})
    return out


def _edge(job: _Job, i: int, j: int, index: int) -> dict[str, Any]:
    """Build and scan the path along tree edge i - j (all processes together)."""
    t0 = time.perf_counter()
    a, b = job.states(i, j)
    kind = path_kind(job.build.method)
    fit_loader = None
    if kind.trained:
        fit_loader = create_loader(job.data.data, split="train", batch_size=job.data.batch_size, shuffle=True,
                                   seed=job.data.seed, model=job.net)
    path = kind.from_options(job.net, a, b, config=kind.config_from(job.build.settings, seed=job.data.seed),
                             opts=job.build, data=job.data, fit_loader=fit_loader, bn_loader=job.train,
                             index=index, graph=job.graph)
    built = time.perf_counter() - t0
    res = scan(path, job.net, job.train, points=job.opts.path_points,
               bn_loader=job.train if has_batchnorm(job.net) else None, device=job.data.device, progress=False)
    k = max(range(len(res.points)), key=lambda q: res.points[q]["loss"])
    rel = f"paths/edge-{i}-{j}.safetensors"
    rec = {"i": i, "j": j, "kind": path.kind, "saddle": res.points[k]["loss"], "saddle_t": res.points[k]["t"],
           "path_barrier": res.barrier, "points": [{"t": p["t"], "loss": p["loss"], "acc": p["acc"]} for p in res.points],
           "path_file": rel, "vertices": path.vertex_t, "build_seconds": built, "seconds": time.perf_counter() - t0}
    if dist_.is_main():
        (job.out / "paths").mkdir(parents=True, exist_ok=True)
        path.save(job.out / rel, model_spec=job.cks[i].model_spec,
                  extra={"sources": [{"file": str(job.files[q]), "sha256": job.sha[q]} for q in (i, j)]})
        job.write("edge", i, j, rec)
    dist_.barrier()
    return rec, path


def connect_checkpoints(inputs: Sequence[str | os.PathLike], *, out_dir: str | os.PathLike, model=None,
                        data=None, opts: ConnectOptions = ConnectOptions(), build=None,
                        ensemble: str | os.PathLike | None = None) -> dict[str, Any]:
    """The barrier matrix of the checkpoints in `inputs` (files or folders, see
    `checkpoint_files`), its minimum spanning tree, and a path along every tree edge
    (module docstring). `model`: a `options.ModelOptions`; `data`: an `options.DataOptions`
    (the training data: barriers, saddles, BatchNorm, fitting); `build`: a
    `options.BuildOptions` saying how the tree's paths are made (`method` and its
    `settings`; default AutoNEB). Writes `connect.json`, `barriers.png` and `tree.png` into
    `out_dir` (rank 0) and returns the report. `ensemble`: also write an ensemble file
    there, its members chosen across all the tree's paths on `data.val_data` (required)
    by `members.select_members` (report key `ensemble`)."""
    model = model or ModelOptions()
    data = data or DataOptions()
    build = build or BuildOptions(method="neb")
    if not isinstance(opts, ConnectOptions):
        raise BadOptionError(f"opts must be a ConnectOptions, got {type(opts).__name__}", option="opts")
    path_kind(build.method).config_from(build.settings, seed=data.seed)  # both checked before any work
    out = FsPath(out_dir)
    if out.exists() and not out.is_dir():
        raise BadOptionError(f"`out_dir` {out} is a file; give a folder", option="out_dir")
    if ensemble is not None and not data.val_data:
        raise BadOptionError("an ensemble from the tree chooses its members on held-out data: pass `val_data` SPEC",
                             option="val_data")
    files = checkpoint_files(inputs)
    t0 = time.perf_counter()
    cks = load_endpoints(files, model)
    net = cks[0].build_model().to(data.device)
    train = _train_loader(net, data)
    if dist_.is_main():
        out.mkdir(parents=True, exist_ok=True)
    dist_.barrier()
    job = _Job(files, cks, net, train, out, opts, build, data, unit_graph_of(net, model))
    pairs = _pairs(job, data.progress)
    n = len(files)
    matrix = [[0.0] * n for _ in range(n)]
    for p in pairs:
        matrix[p["i"]][p["j"]] = matrix[p["j"]][p["i"]] = p["barrier"]
    t_pairs = time.perf_counter() - t0
    tree, paths = [], []
    for index, (i, j) in enumerate(minimum_spanning_tree(matrix)):
        found = dist_.broadcast_object(job.reusable("edge", i, j))
        if found is None:
            rec, path = _edge(job, i, j, index)
        else:
            rec, path = found, (load_path(out / found["path_file"]) if ensemble is not None else None)
        paths.append(path)
        tree.append({**{k: v for k, v in rec.items() if k not in ("sha256", "settings")},
                     "barrier": matrix[i][j], "reused": found is not None})
    report = _report(job, pairs, matrix, tree, timings={"pairs_s": t_pairs, "total_s": time.perf_counter() - t0})
    if ensemble is not None:
        report["ensemble"] = _tree_ensemble(job, tree, paths, ensemble)
        report["timings"]["total_s"] = time.perf_counter() - t0
    if dist_.is_main():
        _write_outputs(job, report)
    return report


def _tree_ensemble(job: _Job, tree: list[dict[str, Any]], paths: list, dest) -> dict[str, Any]:
    """Members chosen across all the tree's paths: `opts.candidates` points per path (each
    checkpoint once), evaluated on the training data (BN re-estimated) and the validation
    data, chosen by `members.select_members` (the checkpoints are its endpoints), written
    to `dest` (rank 0)."""
    data, g, n_paths = job.data, job.opts.candidates, len(paths)
    val = create_loader(data.val_data, split="val", batch_size=data.batch_size, shuffle=False, seed=data.seed,
                        model=job.net)
    check_input_fits(job.net, val, spec=data.val_data)
    points, seen, ckpt_of = [], set(), {}
    for p, e in enumerate(tree):
        for k in range(g):
            t = k / (g - 1)
            node = e["i"] if k == 0 else e["j"] if k == g - 1 else None
            if node is not None and node in seen:
                continue
            if node is not None:
                seen.add(node)
                ckpt_of[len(points)] = node
            points.append((p, t, (p + t) / n_paths))
    cands = evaluate_candidates(paths, job.net, points, train_loader=job.train, val_loader=val,
                                device=data.device, progress=data.progress)
    labels = torch.cat([labelled_batch(b, what="choosing members on `val_data`")[1] for b in val])
    sel = select_members(cands, labels, max_members=job.opts.members, endpoints=sorted(ckpt_of), seed=data.seed)
    chosen = [cands[i] for i in sel.indices]
    states = [candidate_state(paths[c.path], c) for c in chosen]
    members = [{**c.info(paths[c.path].kind), "edge": [tree[c.path]["i"], tree[c.path]["j"]],
                "checkpoint": ckpt_of.get(i), "weight": w} for i, c, w in zip(sel.indices, chosen, sel.weights)]
    val_metrics = ensemble_metrics([c.val_log_probs for c in chosen], labels, sel.weights).to_dict()
    if dist_.is_main():
        save_ensemble(dest, states, model_spec=job.cks[0].model_spec, members=members,
                      sources=[{"file": str(f), "sha256": s} for f, s in zip(job.files, job.sha)], weights=sel.weights,
                      extra={"method": job.build.method, "selection": "tree", "rule": sel.rule,
                             "tree": [[e["i"], e["j"]] for e in tree]})
    best = min(cands, key=lambda c: c.val.nll)
    choice = choice_report(sel, cands, max_members=job.opts.members)
    return {"file": str(dest), "rule": sel.rule, "members": members, "val": val_metrics,
            "reference": choice["reference"], "confirmation": choice["confirmation"],
            "decision": decision_sentence(choice),
            "candidates": len(cands), "best_single_val_nll": best.val.nll,
            "checkpoints_val_nll": {str(ckpt_of[i]): cands[i].val.nll for i in sorted(ckpt_of)},
            "guarantee": sel.guarantee}


def _train_loader(net, data):
    if not data.data:
        raise BadOptionError("training data is needed: pass `data` SPEC (e.g. `data` digits)", option="data")
    train = create_loader(data.data, split="train", batch_size=data.batch_size, shuffle=False, seed=data.seed,
                          model=net)
    check_input_fits(net, train, spec=data.data)
    return train


def _report(job: _Job, pairs, matrix, tree, *, timings) -> dict[str, Any]:
    computed = [p["seconds"] for p in pairs if not p["reused"]]
    return {
        "format": CONNECT_FORMAT, "format_version": 1,
        "checkpoints": [{"index": q, "file": str(f), "sha256": s} for q, (f, s) in enumerate(zip(job.files, job.sha))],
        "method": job.build.method, "align": job.opts.align, "points": job.opts.points,
        "path_points": job.opts.path_points, "data": job.data.data, "seed": job.data.seed,
        "matrix": matrix,
        "matrix_batchnorm": None if not has_batchnorm(job.net) else
        f"re-estimated at every point on a fixed subsample of the training data ({job.bn_data().describe()})",
        "pairs": [{k: p[k] for k in ("i", "j", "barrier", "barrier_t", "seconds", "reused")} for p in pairs],
        "tree": tree,
        "tree_max_saddle": max((e["saddle"] for e in tree), default=None),
        "seconds_per_pair": (sum(computed) / len(computed)) if computed else None,
        "timings": timings, "world_size": dist_.world_size(),
        "files": {"report": "connect.json", "matrix_png": "barriers.png", "tree_png": "tree.png"},
    }


def _write_outputs(job: _Job, report: dict[str, Any]) -> None:
    labels = [FsPath(f).name for f in job.files]
    try:
        plot_barrier_matrix(report["matrix"], job.out / "barriers.png", labels=labels,
                            tree=[(e["i"], e["j"]) for e in report["tree"]],
                            title="barrier of the straight line between every pair")
        plot_tree(len(labels), report["tree"], job.out / "tree.png", labels=labels,
                  title=f"minimum spanning tree: {report['method']} paths, saddle loss on each edge")
    except OSError as e:
        raise CheckpointError(f"cannot write the pictures into {job.out}: {e}") from e
    with atomic_path(job.out / "connect.json") as tmp:
        tmp.write_text(json.dumps(to_json(report), indent=2, allow_nan=False))
