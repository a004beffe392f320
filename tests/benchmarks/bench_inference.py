"""Ensemble inference speed: K single-model passes vs the loop and vmap strategies.

    python tests/benchmarks/bench_inference.py [--out FILE.md] [--batch 64] [--device cpu]
        [--threads N] [--ks 2,4,8] [--no-timm]

For each model and K, all three are timed on the same batch in one run (interleaved
rounds, median of each), and reported as ratios to the baseline (K plain forward passes of K
separate models, no combination). Also shows which strategy "auto" picks. Target
(DESIGN.md): ensemble inference <= 1.1x the baseline.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn

from mcensemble.ensemble import EnsembleModel


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256),
                         nn.ReLU(), nn.Linear(256, 10))


def make_cnn() -> nn.Module:
    def block(i, o):
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]
    return nn.Sequential(*block(1, 16), *block(16, 32), nn.MaxPool2d(2), *block(32, 64),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def make_timm() -> nn.Module:
    import timm
    return timm.create_model("test_resnet", num_classes=10, in_chans=1)


MODELS = {
    "mlp (64-256-256-10)": (make_mlp, (1, 8, 8)),
    "bn-cnn (3 conv+BN, 8x8)": (make_cnn, (1, 8, 8)),
    "timm test_resnet (16x16)": (make_timm, (1, 16, 16)),
}


def states_for(factory, k):
    out = []
    for i in range(k):
        torch.manual_seed(i)
        out.append(factory().state_dict())
    return out


def timeit(fn, sync) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def bench(factory, in_shape, k, batch, device, rounds):
    states = states_for(factory, k)
    singles = []
    for st in states:
        m = factory().to(device).eval()
        m.load_state_dict(st)
        singles.append(m)
    ens = EnsembleModel(factory, states, device=device)
    x = torch.randn(batch, *in_shape, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def baseline():
        for m in singles:
            m(x)

    def strat(name):
        def run():
            ens.strategy = name
            ens(x)
        return run

    fns = {"baseline": baseline, "loop": strat("loop"), "vmap": strat("vmap")}
    times = {n: [] for n in fns}
    with torch.no_grad():
        for f in fns.values():          # warm-up
            f(), f()
        for _ in range(rounds):
            for n, f in fns.items():
                times[n].append(timeit(f, sync))
        fresh = EnsembleModel(factory, states, device=device)   # what "auto" picks
        fresh(x)
    med = {n: statistics.median(v) for n, v in times.items()}
    return med, fresh.strategy


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="append the markdown table to this file")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's; 1 is steadier on a busy machine)")
    ap.add_argument("--ks", default="2,4,8")
    ap.add_argument("--no-timm", action="store_true")
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]
    lines = [
        f"### Ensemble inference, {args.device}, batch {args.batch} "
        f"(torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads)",
        "",
        "| model | K | K single passes (ms) | loop / baseline | vmap / baseline | auto picks |",
        "|---|---|---|---|---|---|",
    ]
    t_start = time.perf_counter()
    for name, (factory, in_shape) in MODELS.items():
        if args.no_timm and name.startswith("timm"):
            continue
        for k in ks:
            med, pick = bench(factory, in_shape, k, args.batch, args.device, args.rounds)
            base = med["baseline"]
            lines.append(f"| {name} | {k} | {base * 1e3:.2f} | {med['loop'] / base:.2f}x | "
                         f"{med['vmap'] / base:.2f}x | {pick} |")
            print(lines[-1], file=sys.stderr, flush=True)
    lines.append("")
    lines.append(f"(ratios: median of {args.rounds} interleaved rounds; ensemble times include "
                 f"the log-mean-prob combination; total {time.perf_counter() - t_start:.0f}s)")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        with open(args.out, "a") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
