"""Ensemble inference speed: K single passes vs the eager loop, vmap, torch.compile and onnxruntime.

    python tests/benchmarks/bench_inference.py [--out FILE.md] [--batch 64] [--device cpu]
        [--threads 1] [--ks 2,4,8] [--rounds 15] [--models bn-cnn,test_resnet,...] [--no-compile] [--no-onnx]

For each model and K, on the same batch, in one run (interleaved rounds, median of each):

- baseline: K plain forward passes of K separate models (no combination);
- eager: `EnsembleModel` (the member loop, the default strategy), log mean probability;
- vmap: the "vmap" strategy (`torch.func.vmap` over the stacked member weights, what
  `torch.func.stack_module_state` builds): the GPU strategy, also timed on CPU;
- compiled: the member loop with each member's forward under `torch.compile` (one compiled
  function per architecture, shared by the K members: compiled once, at K = 2), plus the
  combination;
- onnxruntime: the file `mcensemble export --format onnx` writes (the whole ensemble,
  probabilities out), in an onnxruntime session with the same thread count.

Ratios are to the baseline. Targets (issue 20, CPU): eager <= 1.02x; the best of the others
<= 0.8x at K = 4 on the timm test models at batch 64. With `--device cuda` every column runs
on the GPU (onnxruntime through its CUDA provider when onnxruntime-gpu is installed, else
left out); the timm test models are tiny, so read GPU figures as launch overhead.
"""
from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

from mcensemble.ensemble import EnsembleModel, combine_mean_prob


def make_cnn() -> nn.Module:
    def block(i, o):
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]
    return nn.Sequential(*block(1, 16), *block(16, 32), nn.MaxPool2d(2), *block(32, 64),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def timm_model(arch: str):
    def make() -> nn.Module:
        import timm
        return timm.create_model(arch, num_classes=10, in_chans=1)
    return make


MODELS = {
    "bn-cnn": ("bn-cnn (3 conv+BN, 8x8)", make_cnn, (1, 8, 8)),
    "test_resnet": ("timm test_resnet (16x16)", timm_model("test_resnet"), (1, 16, 16)),
    "test_efficientnet": ("timm test_efficientnet (16x16)", timm_model("test_efficientnet"), (1, 16, 16)),
    "test_convnext": ("timm test_convnext (32x32)", timm_model("test_convnext"), (1, 32, 32)),
}


def states_for(factory, k):
    out = []
    for i in range(k):
        torch.manual_seed(i)
        m = factory()
        with torch.no_grad():  # BN statistics as a trained model has them (not 0 / 1)
            for mod in m.modules():
                if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                    mod.running_mean.uniform_(-0.2, 0.2)
                    mod.running_var.uniform_(0.5, 1.5)
        out.append(m.state_dict())
    return out


def timeit(fn, sync) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def onnx_session(ens, x, threads, device):
    """An onnxruntime session over the exported ensemble, or None when it cannot run here."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    from mcensemble.export import export_ensemble
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return None
        providers = ["CUDAExecutionProvider"]
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "ens.onnx"
        export_ensemble(ens, f, format="onnx", example=x[:2].cpu(), verify=False)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(f), so, providers=providers)
    feed = {"input": x.cpu().numpy()}
    return lambda: sess.run(["probs"], feed)


def bench(factory, in_shape, k, batch, device, rounds, threads, compiled_member, use_onnx):
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

    fns = {"baseline": baseline, "eager": strat("loop"), "vmap": strat("vmap")}
    if compiled_member is not None:
        fns["compiled"] = lambda: combine_mean_prob(torch.stack([compiled_member(m, x) for m in ens.members]))
    if use_onnx:
        sess = onnx_session(ens, x, threads, device)
        if sess is not None:
            fns["onnxruntime"] = sess
    times = {n: [] for n in fns}
    with torch.no_grad():
        for f in fns.values():          # warm-up (compiles at the first K)
            f(), f()
        for _ in range(rounds):
            for n, f in fns.items():
                times[n].append(timeit(f, sync))
    return {n: statistics.median(v) for n, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="append the markdown table to this file")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1, help="torch (and onnxruntime) threads")
    ap.add_argument("--ks", default="2,4,8")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile column")
    ap.add_argument("--no-onnx", action="store_true", help="leave out the onnxruntime column")
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    logging.getLogger("torch").setLevel(logging.ERROR)
    ks = [int(k) for k in args.ks.split(",")]
    cols = ["eager", "vmap", *(() if args.no_compile else ("compiled",)), *(() if args.no_onnx else ("onnxruntime",))]
    lines = [
        f"### Ensemble inference, {args.device}, batch {args.batch} "
        f"(torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads)",
        "",
        "| model | K | K single passes (ms) | " + " | ".join(f"{c} / baseline" for c in cols) + " | best other |",
        "|---|---|---|" + "---|" * len(cols) + "---|",
    ]
    t_start = time.perf_counter()
    compile_s = {}
    for key in args.models.split(","):
        name, factory, in_shape = MODELS[key]
        member_fn = None
        if not args.no_compile:
            # one compiled function per architecture: the K members are its inputs (their weights
            # are graph inputs), so it compiles once, not once per member or per K
            member_fn = torch.compile(lambda m, x: m(x), dynamic=False)
        for k in ks:
            t0 = time.perf_counter()
            med = bench(factory, in_shape, k, args.batch, args.device, args.rounds, args.threads, member_fn,
                        not args.no_onnx)
            if k == ks[0]:
                compile_s[key] = time.perf_counter() - t0
            base = med["baseline"]
            others = {c: med[c] / base for c in cols if c in med and c != "eager"}
            best = min(others, key=others.get) if others else None
            cells = [f"{med[c] / base:.2f}x" if c in med else "-" for c in cols]
            lines.append(f"| {name} | {k} | {base * 1e3:.2f} | " + " | ".join(cells) +
                         (f" | {best} {others[best]:.2f}x |" if best else " | - |"))
            print(lines[-1], file=sys.stderr, flush=True)
    lines.append("")
    compiled = "" if args.no_compile else ("; the first K of each model took (compiling included) "
                                           + ", ".join(f"{k} {v:.0f}s" for k, v in compile_s.items()))
    lines.append(f"(ratios: median of {args.rounds} interleaved rounds; the ensemble columns include the "
                 f"combination{compiled}; total {time.perf_counter() - t_start:.0f}s)")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        with open(args.out, "a") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
