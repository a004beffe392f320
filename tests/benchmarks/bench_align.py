"""Benchmark: permutation alignment (weight matching) and REPAIR on trained pairs.

For each pair of independently trained networks (two seeds, same recipe) on the built-in
digits: the straight-line loss barrier `max_t L(t) - ((1-t) L(A) + t L(B))` over 11
evenly spaced t, on the training loss and on the validation loss, with BatchNorm
statistics re-estimated at every t (train split):
- plain: A -> B;
- aligned: A -> B permuted by weight matching (`align_states`);
- aligned + REPAIR: every point of the aligned line passed through `Repair`.
Time: `align_states` (unit graph tracing, matching, the function check), REPAIR's set-up
(endpoint statistics, once per pair) and one REPAIR call (one t), each against one
evaluation pass of the model over the training split (1,437
examples, batch 256), measured in the same run. Medians of a few repeats.

Run:  python tests/benchmarks/bench_align.py [--out FILE.md] [--threads 1]
Not collected by pytest (file name does not start with test_).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from run_all import emit  # tests/benchmarks/run_all.py, beside this script

from mcensemble.align import Repair, align_states
from mcensemble.data import create_loader
from mcensemble.evaluate import evaluate, evaluate_state, scan
from mcensemble.paths.linear import LinearPath, interpolate
from mcensemble.train import TrainConfig, train_model

POINTS = 11


def factory(key: str):
    if key == "mlp":
        from mcensemble.zoo import DigitsMLP
        return DigitsMLP
    if key == "cnn":
        from mcensemble.zoo import DigitsCNN
        return DigitsCNN
    import timm
    return lambda: timm.create_model(key, num_classes=10, in_chans=1)


PAIRS = {  # label: (model key, data spec, epochs)
    "mlp 2x128 (digits 8x8)": ("mlp", "digits", 20),
    "bn-cnn 32-64 (digits 8x8)": ("cnn", "digits", 10),
    "timm test_resnet (digits 16x16)": ("test_resnet", "digits,size=16", 10),
    "timm resnet10t (digits 16x16)": ("resnet10t", "digits,size=16", 10),
    "timm resnet18 (digits 16x16)": ("resnet18", "digits,size=16", 8),
}


def train_pair(make, spec: str, epochs: int):
    states = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = make()
        loader = create_loader(spec, batch_size=128, shuffle=True, seed=seed)
        train_model(m, loader, config=TrainConfig(epochs=epochs, seed=seed), progress=False)
        states.append({k: v.clone() for k, v in m.state_dict().items()})
    return states


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def repaired_barriers(make, a, b, train, val) -> tuple[float, float]:
    rep = Repair(make(), a, b, train)
    net = make()
    ts = [i / (POINTS - 1) for i in range(POINTS)]
    tr, va = [], []
    for t in ts:
        s = rep(interpolate(a, b, t), t)
        tr.append(evaluate_state(net, s, train).loss)
        va.append(evaluate(net, val).loss)

    def barrier(ls):
        return max(l - ((1 - t) * ls[0] + t * ls[-1]) for t, l in zip(ts, ls))
    return barrier(tr), barrier(va)


def bench_pair(label: str, key: str, spec: str, epochs: int, repeats: int) -> dict:
    make = factory(key)
    a, b = train_pair(make, spec, epochs)
    train = create_loader(spec, batch_size=256)
    val = create_loader(spec, split="val", batch_size=256)
    t_align, res = timed(lambda: align_states(make(), a, b, seed=0), repeats)
    net = make()
    net.load_state_dict(a)
    t_eval, _ = timed(lambda: evaluate(net, train), repeats)
    t_setup, rep = timed(lambda: Repair(make(), a, res.state, train), max(1, repeats // 2))
    mid = interpolate(a, res.state, 0.5)
    t_rep, _ = timed(lambda: rep(mid, 0.5), repeats)
    plain = scan(LinearPath(a, b), make(), train, points=POINTS, bn_loader=train, val_loader=val)
    aligned = scan(LinearPath(a, res.state), make(), train, points=POINTS, bn_loader=train,
                   val_loader=val)
    rep_tr, rep_va = repaired_barriers(make, a, res.state, train, val)
    row = dict(label=label, groups=len(res.graph.groups), sweeps=res.iterations,
               moved=res.moved, plain=(plain.barrier, plain.val_barrier),
               aligned=(aligned.barrier, aligned.val_barrier), repair=(rep_tr, rep_va),
               ends=(plain.points[0]["loss"], plain.points[-1]["loss"]),
               t_align=t_align, t_eval=t_eval, t_rep=t_rep, t_setup=t_setup)
    print(row, file=sys.stderr, flush=True)
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "Straight-line barrier (train loss / val loss; BN re-estimated at every t; 11 points)",
        "",
        "| pair | groups | sweeps | units moved | L(A), L(B) | plain | aligned | aligned + REPAIR "
        "| align time / eval pass | REPAIR set-up / eval pass | REPAIR per t / eval pass |",
        "|---|---:|---:|---:|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        f = lambda p: f"{p[0]:.3f} / {p[1]:.3f}"  # noqa: E731
        lines.append(
            f"| {r['label']} | {r['groups']} | {r['sweeps']} | {r['moved']:.0%} | "
            f"{r['ends'][0]:.3f}, {r['ends'][1]:.3f} | {f(r['plain'])} | {f(r['aligned'])} | "
            f"{f(r['repair'])} | {r['t_align'] / r['t_eval']:.2f}x ({r['t_align'] * 1e3:.0f} ms / "
            f"{r['t_eval'] * 1e3:.0f} ms) | {r['t_setup'] / r['t_eval']:.1f}x | "
            f"{r['t_rep'] / r['t_eval']:.1f}x |")
    lines += ["", "Vision transformers and hybrids (pass table over timm's families; barrier and "
              "curve flatness of a trained ViT and CoAtNet pair, aligned against unaligned): "
              "[zoo.md](zoo.md) (`bench_zoo.py`)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the markdown table to this file")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", nargs="*", help="model keys to run (mlp cnn test_resnet resnet10t resnet18)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    rows = [bench_pair(label, *cfg, repeats=args.repeats) for label, cfg in PAIRS.items()
            if not args.only or cfg[0] in args.only]
    text = table(rows)
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
