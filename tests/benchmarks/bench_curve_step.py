"""Benchmark: one curve-fitting step against one plain training step.

Same model, same batch, same optimiser type (SGD, momentum 0.9), same device, measured
side by side in one run: warm-up, then plain and curve steps interleaved, median of the
repeats. Target (DESIGN.md): curve / plain <= 1.2.

Memory: peak resident set size (VmHWM in /proc/self/status, reset after set-up through
/proc/self/clear_refs; `resource.getrusage(...).ru_maxrss` elsewhere) of fresh
subprocesses that set up the model, endpoints and batch and then run 10 steps of one kind;
the table gives the peak over the set-up baseline (the steps' extra memory: optimiser state,
curve control points, activations, kernel workspaces, allocator caches). tracemalloc does not see torch
allocations, hence RSS. Also the bytes of tensor state each method keeps alive besides the
model's own weights (counted: plain = gradients + momentum; curve = A, B, bends, momentum,
theta(t), dL/dtheta).

Run:  python tests/benchmarks/bench_curve_step.py [--out FILE.md] [--repeats 30] [--threads 1]
Not collected by pytest (file name does not start with test_).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from run_all import emit  # tests/benchmarks/run_all.py, beside this script

MODELS = {
    # name: (factory, input shape without batch)
    "mlp (digits, 2x128)": ("mlp", (1, 8, 8)),
    "bn-cnn (digits, 32-64)": ("cnn", (1, 8, 8)),
    "timm test_resnet 16x16": ("test_resnet", (1, 16, 16)),
}


def make_model(key: str) -> nn.Module:
    if key == "mlp":
        from mcensemble.zoo import DigitsMLP
        return DigitsMLP()
    if key == "cnn":
        from mcensemble.zoo import DigitsCNN
        return DigitsCNN()
    import timm
    return timm.create_model(key, num_classes=10, in_chans=1)


def setup(key: str, shape, batch: int, seed: int = 0):
    torch.manual_seed(seed)
    model = make_model(key).train()
    a = {k: v.clone() for k, v in make_model(key).state_dict().items()}
    b = {k: v.clone() for k, v in make_model(key).state_dict().items()}
    x = torch.randn(batch, *shape)
    y = torch.randint(0, 10, (batch,))
    return model, a, b, x, y


def plain_stepper(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss
    return step


def curve_stepper(model, a, b, x, y, bends: int = 1, kind: str = "bezier"):
    from mcensemble.paths.fit import CurveFitter
    fitter = CurveFitter(model, a, b, kind=kind, bends=bends, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(0)

    def step():
        t = float(torch.rand((), generator=gen, dtype=torch.float64))
        return fitter.step(x, y, t, 0.01)
    return step, fitter


def time_pair(key, shape, batch, repeats, warmup, bends):
    model, a, b, x, y = setup(key, shape, batch)
    plain = plain_stepper(model, x, y)
    curve, _ = curve_stepper(model, a, b, x, y, bends=bends)
    for _ in range(warmup):
        plain()
        curve()
    tp, tc = [], []
    for i in range(repeats):
        # interleave, alternating which goes first, so drift in machine load hits both
        order = (("p", plain), ("c", curve)) if i % 2 == 0 else (("c", curve), ("p", plain))
        for name, fn in order:
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            (tp if name == "p" else tc).append(dt)
    return statistics.median(tp), statistics.median(tc)


def tensor_bytes(key, shape, bends):
    model = make_model(key)
    sd = model.state_dict()
    p_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    f_bytes = sum(v.numel() * v.element_size() for v in sd.values() if v.is_floating_point())
    plain = 2 * p_bytes                                   # grads + momentum
    curve = (2 + bends) * f_bytes + bends * p_bytes + f_bytes + p_bytes  # A, B, bends; momentum; theta; dL/dtheta
    return p_bytes, plain, curve


def reset_peak_rss() -> bool:
    """Linux: reset this process's peak RSS (VmHWM) to its current RSS, so that the import
    of torch / timm does not set the peak. Returns False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_kib() -> int:
    """Peak resident set size in KiB: VmHWM from /proc/self/status, else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory_worker(key: str, mode: str, batch: int, steps: int, bends: int) -> None:
    """Run in a fresh process: print JSON {base, peak} in KiB (max RSS)."""
    torch.set_flush_denormal(True)
    shape = dict(MODELS.values())[key]
    model, a, b, x, y = setup(key, shape, batch)
    reset_peak_rss()
    base = peak_rss_kib()
    if mode == "plain":
        fn = plain_stepper(model, x, y)
    else:
        fn, _ = curve_stepper(model, a, b, x, y, bends=bends)
    for _ in range(steps):
        fn()
    peak = peak_rss_kib()
    print(json.dumps({"base": base, "peak": peak}))


def measure_memory(key, batch, bends, threads):
    out = {}
    for mode in ("plain", "curve"):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        r = subprocess.run([sys.executable, __file__, "--memory-worker", key, mode, "--batch", str(batch),
                            "--bends", str(bends), "--threads", str(threads)],
                           capture_output=True, text=True, env=env, check=True)
        out[mode] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the markdown table to this file")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--bends", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: steadier)")
    ap.add_argument("--no-memory", action="store_true", help="skip the RSS subprocesses")
    ap.add_argument("--memory-worker", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    if args.memory_worker:
        memory_worker(args.memory_worker[0], args.memory_worker[1], args.batch, 10, args.bends)
        return 0

    rows = []
    for label, (key, shape) in MODELS.items():
        tp, tc = time_pair(key, shape, args.batch, args.repeats, args.warmup, args.bends)
        p_bytes, plain_b, curve_b = tensor_bytes(key, shape, args.bends)
        row = {"model": label, "plain_ms": tp * 1e3, "curve_ms": tc * 1e3, "ratio": tc / tp,
               "params_mib": p_bytes / 2**20, "plain_state_mib": plain_b / 2**20, "curve_state_mib": curve_b / 2**20}
        if not args.no_memory:
            mem = measure_memory(key, args.batch, args.bends, args.threads)
            row["plain_rss_mib"] = (mem["plain"]["peak"] - mem["plain"]["base"]) / 1024
            row["curve_rss_mib"] = (mem["curve"]["peak"] - mem["curve"]["base"]) / 1024
            row["base_rss_mib"] = mem["plain"]["base"] / 1024
        rows.append(row)
        print(f"{label}: plain {tp * 1e3:.2f} ms, curve {tc * 1e3:.2f} ms, ratio {tc / tp:.2f}", file=sys.stderr)

    lines = [
        f"Curve step (Bezier, {args.bends} bend) vs plain SGD step; batch {args.batch}, CPU, "
        f"{args.threads} thread(s), torch {torch.__version__}, median of {args.repeats} interleaved repeats "
        f"after {args.warmup} warm-up. Target ratio <= 1.2.",
        "",
        "| model | plain step (ms) | curve step (ms) | ratio | params (MiB) | kept state plain / curve (MiB) "
        "| extra peak RSS plain / curve (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        rss = (f"{r['plain_rss_mib']:.1f} / {r['curve_rss_mib']:.1f}" if "plain_rss_mib" in r else "n/a")
        lines.append(f"| {r['model']} | {r['plain_ms']:.2f} | {r['curve_ms']:.2f} | {r['ratio']:.2f} | "
                     f"{r['params_mib']:.2f} | {r['plain_state_mib']:.2f} / {r['curve_state_mib']:.2f} | {rss} |")
    lines += ["", "Kept state: tensor bytes alive besides the model's own weights (plain: grads + momentum; "
              "curve: A, B, bends, momentum, theta(t), dL/dtheta). Extra peak RSS: peak RSS of a fresh "
              "process over 10 steps (peak reset after set-up) minus its RSS after set-up (model, endpoints, "
              "batch; before any forward pass), so it includes activations, kernel workspaces and allocator caches."]
    table = "\n".join(lines)
    emit(table + "\n", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
