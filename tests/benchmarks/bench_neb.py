"""Benchmark: AutoNEB against trained curves on one pair, and `connect` over a zoo of six.

Part 1, one BatchNorm CNN pair (`mce_digits_cnn`, widths 16-32, two seeds, digits train
split): AutoNEB with its default schedule (`NebConfig()`), then a Bezier curve and a
PolyChain (one bend each, `CurveConfig` defaults otherwise) fitted for as many gradient
evaluations as AutoNEB used (one per curve step; AutoNEB: one per interior pivot per
step), on the same batches of 128. Each path is scanned at 21 evenly spaced t with
BatchNorm re-estimated at every t: the worst training loss (train split) and the worst test
NLL (digits' held-out split, used for nothing else), and the wall time of the fit.

Part 2, six `mce_digits_cnn` (widths 8-16, seeds 0..5): `connect_checkpoints` with AutoNEB:
the barrier matrix (straight lines, 11 t each), Kruskal's tree, each tree edge's saddle
(largest training loss on its path, 21 t) against that pair's straight-line maximum, and
the time per pair and per tree edge.

Run:  python tests/benchmarks/bench_neb.py [--out FILE.md] [--threads 1]
Not collected by pytest (file name does not start with test_).
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from run_all import emit  # tests/benchmarks/run_all.py, beside this script

from mcensemble.data import create_loader
from mcensemble.evaluate import scan
from mcensemble.paths import LinearPath
from mcensemble.paths.curve_base import CurveConfig
from mcensemble.paths.fit import fit_curve
from mcensemble.paths.neb import NebConfig, fit_neb
from mcensemble.train import TrainConfig, train_model

BATCH = 128


def cnn(widths):
    from mcensemble.zoo import DigitsCNN
    return lambda: DigitsCNN(widths=widths)


def train(make, seed: int, epochs: int) -> dict:
    torch.manual_seed(seed)
    m = make()
    loader = create_loader("digits", batch_size=64, shuffle=True, seed=seed)
    train_model(m, loader, config=TrainConfig(epochs=epochs, seed=seed), progress=False)
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def worst(path, make, train_loader, test_loader) -> tuple[float, float]:
    r = scan(path, make, train_loader, points=21, val_loader=test_loader, bn_loader=train_loader, progress=False)
    return max(p["loss"] for p in r.points), max(p["val_nll"] for p in r.points)


def part1(lines: list[str]) -> None:
    make = cnn((16, 32))
    a, b = train(make, 0, 10), train(make, 1, 10)
    fit_loader = create_loader("digits", batch_size=BATCH, shuffle=True, seed=0)
    train_loader = create_loader("digits", batch_size=256)
    test_loader = create_loader("digits", split="val", batch_size=256)
    evals = [0]

    def count(cycle, step, losses):
        evals[0] += len(losses) - 2  # one gradient evaluation per interior pivot
    t0 = time.perf_counter()
    neb = fit_neb(make(), a, b, fit_loader, bn_loader=train_loader, config=NebConfig(), progress=False,
                  callback=count)
    rows = [("AutoNEB (default schedule)", neb, time.perf_counter() - t0,
             f"{neb.n_pivots} pivots, {NebConfig().total_steps} steps")]
    spe = len(fit_loader)
    epochs = max(1, math.ceil(evals[0] / spe))
    for kind in ("bezier", "polychain"):
        t0 = time.perf_counter()
        p = fit_curve(make(), a, b, fit_loader, config=CurveConfig(kind=kind, bends=1, epochs=epochs), progress=False)
        rows.append((f"{kind}, 1 bend", p, time.perf_counter() - t0, f"{epochs * spe} steps"))
    rows.append(("straight line", LinearPath(a, b), 0.0, "-"))
    lines += [f"## One pair: BN-CNN 16-32, {evals[0]} gradient evaluations each (batch {BATCH})", "",
              "| path | worst train loss | worst test NLL | fit wall time | budget |", "|---|---:|---:|---:|---|"]
    ends = worst(LinearPath(a, a), make, train_loader, test_loader), worst(LinearPath(b, b), make, train_loader,
                                                                         test_loader)
    for name, path, secs, budget in rows:
        wl, wn = worst(path, make, train_loader, test_loader)
        lines.append(f"| {name} | {wl:.4f} | {wn:.4f} | {secs:.1f} s | {budget} |")
    lines += ["", f"Endpoints: train loss {ends[0][0]:.4f} / {ends[1][0]:.4f}, test NLL {ends[0][1]:.4f} / "
              f"{ends[1][1]:.4f}.", "",
              "Budget: gradient evaluations (forward + backward on one batch): one per curve step, one per "
              "interior pivot per AutoNEB step; the curves get the AutoNEB run's count rounded up to whole "
              "epochs. AutoNEB's wall time also holds what the curves do not spend in their fit: two forward "
              "passes per step for the ends' losses (the tangents need them), the dense scans before each "
              "later cycle, and the BatchNorm re-estimation of every pivot. Curves are fitted between the "
              "checkpoints as they are (no alignment), as AutoNEB is.", ""]


def part2(lines: list[str]) -> None:
    from mcensemble.checkpoints import save_checkpoint
    from mcensemble.connect import connect_checkpoints
    from mcensemble.options import BuildOptions, ConnectOptions, DataOptions, ModelOptions
    make = cnn((8, 16))
    with tempfile.TemporaryDirectory() as d:
        zoo = Path(d) / "zoo"
        zoo.mkdir()
        for seed in range(6):
            save_checkpoint(train(make, seed, 8), zoo / f"cnn{seed}.safetensors",
                            metadata={"arch": "mce_digits_cnn", "num_classes": 10, "in_chans": 1,
                                      "model_args": {"widths": [8, 16]}})
        t0 = time.perf_counter()
        rep = connect_checkpoints([zoo], out_dir=Path(d) / "out", model=ModelOptions(),
                                  data=DataOptions(data="digits", batch_size=BATCH),
                                  opts=ConnectOptions(points=11, path_points=21), build=BuildOptions(method="neb"))
        total = time.perf_counter() - t0
        import json
        pair_files = {(p["i"], p["j"]): Path(d) / "out" / "pairs" / f"pair-{p['i']}-{p['j']}.json"
                      for p in rep["pairs"]}
        line_max = {k: max(q["loss"] for q in json.loads(f.read_text())["points"]) for k, f in pair_files.items()}
    n = len(rep["matrix"])
    lines += ["## Six BN-CNNs (8-16): `connect --method neb`", "",
              "Barrier matrix (straight line, train loss above the chord, 11 t):", "",
              "| | " + " | ".join(str(j) for j in range(n)) + " |", "|---" * (n + 1) + "|"]
    for i, row in enumerate(rep["matrix"]):
        lines.append(f"| {i} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    lines += ["", "Minimum spanning tree, AutoNEB along each edge (21 t):", "",
              "| edge | line barrier | line max loss | AutoNEB saddle | pivots | fit + scan time |", "|---|---:|---:|---:|---:|---:|"]
    for e in rep["tree"]:
        lines.append(f"| {e['i']} - {e['j']} | {e['barrier']:.3f} | {line_max[e['i'], e['j']]:.3f} | "
                     f"{e['saddle']:.3f} | {len(e['vertices']) - 2} | {e['seconds']:.1f} s |")
    lines += ["", f"Time per pair (straight-line scan, 11 t, BN re-estimated at each): "
              f"{rep['seconds_per_pair']:.2f} s; per tree edge (AutoNEB + scan): "
              f"{sum(e['seconds'] for e in rep['tree']) / len(rep['tree']):.1f} s; whole run {total:.0f} s "
              f"({n * (n - 1) // 2} pairs, {len(rep['tree'])} edges).", ""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="Write the Markdown tables here (else stdout).")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    lines: list[str] = []
    part1(lines)
    part2(lines)
    text = "\n".join(lines) + "\n"
    emit(text, args.out, echo=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
