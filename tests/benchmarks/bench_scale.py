"""Benchmark: mcensemble at a real model size, timm `resnet50` on CPU with synthetic data.

Side by side in one run (issue 11):

- one curve-fitting step (Bezier, 1 bend) against one plain SGD step: fp32 at 128x128 batch
  16, fp32 and bf16 (autocast) at 128x128 batch 4 (bf16 is emulated, slow, on CPUs without
  native bf16), 224x224 batch 8 with --with-224; warm-up, then the kinds interleaved (the
  order rotating every round), median of the rounds;
- peak memory (RSS high-water mark above what the caller holds, each in a fresh subprocess,
  glibc's allocator reuse disabled) of plain steps, building a CurveFitter + curve steps (with
  and without --max-grad-norm), fit_curve, aligning a pair, writing a K=4 ensemble file
  (fp32, bf16, EnsembleModel.save) and lazy K=4 inference, against one model's weights; and
  building a dropout-stable path on a deep MLP (`DROPOUT_NET`), against that MLP's weights;
  with `--before DIR`, the same rows with the mcensemble package in DIR side by side;
- `align_states` (weight matching) time for a resnet50 pair;
- K=4 ensemble inference (`EnsembleModel`, loop strategy) against 4 single-model passes,
  fp32 and bf16, interleaved;
- the ensemble file's size with fp32 and bf16 members (`save_ensemble(dtype=)`).

Run:  python tests/benchmarks/bench_scale.py [--out FILE.md] [--threads 2] [--with-224] [--repeats N]
      (`--with-224 --steps-only`: only the curve-step rows at 224x224 batch 8;
       `--memory-only [--before DIR]`: only the memory table, DIR from
       `git archive <commit> mcensemble | tar -x -C DIR`;
       `--dropout-memory [--before DIR]`: only the dropout path's row)
(or `python tests/benchmarks/run_all.py --only scale`). Not collected by pytest.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_curve_step import peak_rss_kib, reset_peak_rss  # noqa: E402

ARCH = os.environ.get("MCE_SCALE_ARCH", "resnet50")  # another timm name only to smoke-test this script
K = 4
DROPOUT_NET = {"width": 1024, "depth": 10}  # the dropout path's memory row (a layered network)


def make_model():
    import timm
    return timm.create_model(ARCH, num_classes=10)


def states(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(n):
        torch.manual_seed(seed + i)
        out.append({k: v.detach().clone() for k, v in make_model().state_dict().items()})
    return out


def model_bytes() -> int:
    return sum(v.numel() * v.element_size() for v in make_model().state_dict().values())


def batch(size: int, n: int):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def plain_stepper(model, x, y, precision: str):
    from mcensemble.precision import resolve_precision
    prec = resolve_precision(precision)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def step():
        with prec.autocast():
            out = model(x)
        loss = F.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def curve_stepper(model, a, b, x, y, precision: str):
    from mcensemble.paths.fit import CurveFitter
    fitter = CurveFitter(model, a, b, precision=precision)
    gen = torch.Generator().manual_seed(0)

    def step():
        fitter.step(x, y, float(torch.rand((), generator=gen, dtype=torch.float64)), 0.01)
    return step


def interleaved(fns: dict, repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each fn, rounds interleaved with a rotating order."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(v) for n, v in times.items()}


def time_steps(size: int, n: int, repeats: int, precisions=("fp32", "bf16")) -> dict[str, float]:
    a, b = states(2)
    x, y = batch(size, n)
    fns = {}
    for prec in precisions:
        plain_model, curve_model = make_model().train(), make_model().train()
        fns[f"plain {prec}"] = plain_stepper(plain_model, x, y, prec)
        fns[f"curve {prec}"] = curve_stepper(curve_model, a, b, x, y, prec)
    return interleaved(fns, repeats, warmup=1)


def time_inference(size: int, n: int, repeats: int, precisions=("fp32", "bf16")) -> dict[str, float]:
    from mcensemble.ensemble import EnsembleModel
    from mcensemble.precision import resolve_precision
    sts = states(K)
    ens = EnsembleModel(make_model, sts, strategy="loop")
    singles = []
    for s in sts:
        m = make_model().eval()
        m.load_state_dict(s)
        singles.append(m)
    x, _ = batch(size, n)
    fns = {}
    for prec in precisions:
        p = resolve_precision(prec)

        def ens_fn(p=p):
            with torch.no_grad(), p.autocast():
                ens(x)

        def singles_fn(p=p):
            with torch.no_grad(), p.autocast():
                for m in singles:
                    m(x)
        fns[f"ensemble {prec}"] = ens_fn
        fns[f"4 singles {prec}"] = singles_fn
    return interleaved(fns, repeats, warmup=1)


def file_sizes(folder: Path) -> dict[str, int]:
    from mcensemble.ensemble import save_ensemble
    sts = states(K)
    out = {}
    for dtype in ("fp32", "bf16"):
        f = save_ensemble(folder / f"ens-{dtype}.safetensors", sts, dtype=dtype)
        out[dtype] = f.stat().st_size
    return out


# ------------------------------------------------------------------------------------ memory

def dropout_setup():
    """A deep layered network for the dropout path (whose vertex count grows with depth):
    `DROPOUT_NET` hidden layers on 8x8 inputs, two random endpoints, 64 random examples."""
    from torch.utils.data import DataLoader, TensorDataset
    from mcensemble.zoo import DigitsMLP
    sts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = DigitsMLP(**DROPOUT_NET)
        sts.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)
    return model, sts, DataLoader(TensorDataset(x, y), batch_size=32)


def _tiny_loader(x, y):
    from torch.utils.data import DataLoader, TensorDataset
    return DataLoader(TensorDataset(torch.cat([x, x]), torch.cat([y, y])), batch_size=len(x))


def _memory_fn(mode: str, x, y, folder: Path, info: dict):
    """(what the caller holds, the measured operation) for a worker mode."""
    kind, _, prec = mode.partition(" ")
    if kind in ("plain", "curve", "curve-clip"):
        model = make_model().train()
        if kind == "plain":
            return model, lambda: [step() for step in [plain_stepper(model, x, y, prec)] * 2]
        a, b = states(2)
        clip = 1e30 if kind == "curve-clip" else None  # a bound never reached: the materialised path

        def fn():
            from mcensemble.paths.fit import CurveFitter
            fitter = CurveFitter(model, a, b, precision=prec, max_grad_norm=clip)
            for t in (0.3, 0.6):
                fitter.step(x, y, t, 0.01)
        return (model, a, b), fn
    if kind == "fit":
        from mcensemble.paths.curve_base import CurveConfig
        from mcensemble.paths.fit import fit_curve
        model, (a, b) = make_model(), states(2)
        return (model, a, b), lambda: info.setdefault("path", fit_curve(
            model, a, b, _tiny_loader(x, y), config=CurveConfig(epochs=1), progress=False,
            checkpoint=folder / "fit.safetensors", checkpoint_every=1))
    if kind == "align":
        from mcensemble.align import align_states
        a, b = states(2)

        def fn():
            t0 = time.perf_counter()
            res = align_states(make_model, a, b, example_input=torch.randn(2, 3, 64, 64), progress=False)
            info.update(seconds=time.perf_counter() - t0, iterations=res.iterations,
                        objective_before=res.objective_before, objective_after=res.objective_after)
        return (a, b), fn
    if kind == "dropout":
        from mcensemble.paths.dropout import build_dropout_path
        model, (a, b), loader = dropout_setup()
        return (model, a, b, loader), lambda: info.setdefault("path", build_dropout_path(
            model, a, b, loader, search_steps=0, progress=False))
    if kind == "write":
        from mcensemble.ensemble import save_ensemble
        sts = states(K)
        return sts, lambda: save_ensemble(folder / "e.safetensors", sts, dtype=prec)
    if kind == "ens-save":
        from mcensemble.ensemble import EnsembleModel
        ens = EnsembleModel(make_model, states(K), strategy="loop")
        return ens, lambda: ens.save(folder / "e.safetensors")
    if kind == "lazy":
        import mcensemble
        from mcensemble.ensemble import save_ensemble
        save_ensemble(folder / "e.safetensors", states(K))
        ens = mcensemble.load_ensemble(folder / "e.safetensors", model=make_model, lazy=True)

        def fn():
            with torch.no_grad():
                ens(x)
        return ens, fn
    raise SystemExit(f"unknown mode {mode}")


def memory_worker(mode: str, size: int, n: int) -> None:
    """Fresh process: set up what the caller holds, reset the RSS high-water mark, run the
    operation; print JSON {base, peak} in KiB (and the alignment's figures)."""
    import gc
    torch.set_flush_denormal(True)
    x, y = batch(size, n)
    info: dict = {}
    held, fn = _memory_fn(mode, x, y, Path(tempfile.mkdtemp()), info)  # noqa: F841  (held: kept alive)
    gc.collect()
    reset_peak_rss()
    base = peak_rss_kib()
    fn()
    info.pop("path", None)
    print(json.dumps({"base": base, "peak": peak_rss_kib(), **info}))


def measure_memory(mode: str, size: int, n: int, threads: int, src: str | None = None) -> tuple[float, dict]:
    """Extra peak RSS (bytes) of `mode` in a fresh process. glibc is told to serve every
    allocation above 64 KiB with its own mapping (MALLOC_MMAP_THRESHOLD_), so that freed
    tensors leave the resident set at once and the high-water mark counts live tensors, not
    the allocator's reuse of memory freed during set-up. `src`: run the worker against the
    mcensemble package in that folder (a checkout of an earlier version: the "before" column)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MALLOC_MMAP_THRESHOLD_="65536")
    if src:
        env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    r = subprocess.run([sys.executable, __file__, "--memory-worker", mode, "--size", str(size), "--batch", str(n),
                        "--threads", str(threads)], capture_output=True, text=True, env=env, check=True)
    d = json.loads(r.stdout.strip().splitlines()[-1])
    return (d["peak"] - d["base"]) * 1024, d


# ------------------------------------------------------------------------------------ report

# (label, size, batch, precisions, rounds): what is timed side by side. bf16 runs at a smaller
# batch: on a CPU without native bf16 (AVX-512 BF16 / AMX) autocast bf16 is several times slower
# than fp32, and the whole benchmark must stay near 10 minutes on 2 shared cores.
STEP_GROUPS = [
    ("128x128, batch 16", 128, 16, ("fp32",), 3),
    ("128x128, batch 4", 128, 4, ("fp32", "bf16"), 2),
]
STEP_GROUPS_224 = [("224x224, batch 8", 224, 8, ("fp32",), 2)]
INFERENCE_GROUPS = [("128x128, batch 8", 128, 8, ("fp32",), 2), ("128x128, batch 2", 128, 2, ("fp32", "bf16"), 2)]
MEMORY_MODES = [  # (worker mode, size, batch, label); 32x32 batch 2: activations are negligible
    ("plain fp32", 32, 2, "2 plain SGD steps (torch.optim.SGD, momentum; its grads and momenta)"),
    ("curve fp32", 32, 2, "CurveFitter (1 bend) built + 2 curve steps (bend, momentum, theta(t), gradients)"),
    ("curve-clip fp32", 32, 2, "the same with --max-grad-norm (every gradient held until the norm is known)"),
    ("fit", 32, 2, "fit_curve: 2 steps, a checkpoint after each, the path returned (copies of A and B)"),
    ("align", 32, 2, "align_states on a pair (weight matching + the check of the function)"),
    ("write fp32", 32, 2, f"save_ensemble of K={K} fp32 states"),
    ("write bf16", 32, 2, f"save_ensemble of K={K} fp32 states as bf16 (--save-dtype bf16)"),
    ("ens-save", 32, 2, f"EnsembleModel.save, K={K}"),
    ("lazy", 32, 2, f"lazy K={K} inference, one batch"),
    ("plain fp32", 128, 16, "2 plain SGD steps, 128x128 batch 16 (with activations)"),
    ("curve fp32", 128, 16, "CurveFitter built + 2 curve steps, 128x128 batch 16 (with activations)"),
]


def _memory_table(threads: int, before: str | None) -> tuple[list[str], dict]:
    cols = "| what (the caller holds the models / states it is given) | before | after |" if before else \
        "| what (the caller holds the models / states it is given) | extra peak RSS | x one model |"
    lines = [cols, "|---|---|---|"]
    mb, align_info = model_bytes(), {}
    for mode, size, n, label in MEMORY_MODES:
        cells = []
        for src in ([before] if before else []) + [None]:
            extra, d = measure_memory(mode, size, n, threads, src)
            if mode == "align" and src is None:
                align_info = d
            print(f"memory {mode} {size}/{n} {'before' if src else 'after'}: {extra / 2**20:.0f} MiB",
                  file=sys.stderr, flush=True)
            cells.append(f"{extra / 2**20:.0f} MiB = **{extra / mb:.1f}x**" if before else
                         f"{extra / 2**20:.0f} MiB | **{extra / mb:.1f}x**")
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return lines, align_info


def _dropout_memory_lines(threads: int, before: str | None) -> list[str]:
    """The dropout path's row, against its own (layered) network's size."""
    from mcensemble.zoo import DigitsMLP
    mb = sum(v.numel() * v.element_size() for v in DigitsMLP(**DROPOUT_NET).state_dict().values())
    cells = []
    for src in ([before] if before else []) + [None]:
        extra, _ = measure_memory("dropout", 8, 2, threads, src)
        print(f"memory dropout {'before' if src else 'after'}: {extra / 2**20:.0f} MiB", file=sys.stderr, flush=True)
        cells.append(f"{extra / 2**20:.0f} MiB = **{extra / mb:.1f}x**")
    net = f"DigitsMLP, {DROPOUT_NET['depth']} hidden layers of {DROPOUT_NET['width']}"
    return ["", f"The dropout path needs a layered network: one model = {net} ({mb / 2**20:.1f} MiB).", "",
            "| what (the caller holds the model, A, B and the data) | " +
            ("before | after |" if before else "extra peak RSS |"), "|---|---|" + ("---|" if before else ""),
            f"| build_dropout_path ({net}; search_steps 0), the path returned | {' | '.join(cells)} |"]


def _step_table(groups, repeats_override) -> list[str]:
    lines = ["| input, batch | precision | plain step | curve step | curve / plain |", "|---|---|---|---|---|"]
    for label, size, n, precs, rounds in groups:
        t = time_steps(size, n, repeats_override or rounds, precs)
        print(f"steps {label}: {t}", file=sys.stderr, flush=True)
        for prec in precs:
            p, c = t[f"plain {prec}"], t[f"curve {prec}"]
            lines.append(f"| {label} | {prec} | {p * 1e3:.0f} ms | {c * 1e3:.0f} ms | **{c / p:.2f}x** |")
        if len(precs) == 2:
            lines.append(f"| {label} | bf16 / fp32 | {t['plain bf16'] / t['plain fp32']:.2f}x | "
                         f"{t['curve bf16'] / t['curve fp32']:.2f}x | |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the markdown to this file")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=None, help="rounds per timing group (default: the group's)")
    ap.add_argument("--with-224", action="store_true", help="also time 224x224 batch 8 (fp32; several minutes)")
    ap.add_argument("--steps-only", action="store_true", help="only the curve-step table")
    ap.add_argument("--memory-only", action="store_true", help="only the peak-memory table")
    ap.add_argument("--dropout-memory", action="store_true", help="only the dropout path's memory row")
    ap.add_argument("--before", metavar="DIR", help="also measure memory with the mcensemble package in DIR "
                    "(e.g. `git archive <commit> mcensemble | tar -x -C DIR`), side by side")
    ap.add_argument("--size", type=int, default=128, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=16, help=argparse.SUPPRESS)
    ap.add_argument("--memory-worker", metavar="MODE", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    if args.memory_worker:
        memory_worker(args.memory_worker, args.size, args.batch)
        return 0
    t_start = time.perf_counter()
    mb = model_bytes()
    lines = [f"timm `{ARCH}` ({mb / 2**20:.1f} MiB of fp32 weights and buffers), synthetic data, CPU, "
             f"{args.threads} torch thread(s), torch {torch.__version__}. The machine was shared with other "
             "jobs while this ran: absolute times are noisy and slower than on an idle machine; the ratios "
             "compare runs interleaved round by round (median of the rounds after 1 warm-up round; the "
             "order rotates every round). This CPU has no native bf16 (no AVX-512 BF16 / AMX), so bf16 "
             "autocast is emulated and slower than fp32 here; its rows show that the path works and what "
             "the curve step adds, not a speed-up.", ""]
    if not (args.memory_only or args.dropout_memory):
        lines += ["## Curve step against a plain step (Bezier, 1 bend; SGD momentum 0.9 both)", ""]
        groups = [] if args.steps_only and args.with_224 else STEP_GROUPS
        lines += _step_table(groups + (STEP_GROUPS_224 if args.with_224 else []), args.repeats)
    if args.steps_only:
        return _finish(lines, t_start, args.out)

    lines += ["", "## Peak memory against one model", "",
              "Resident-set high-water mark above what the caller holds (the model, the endpoint or member "
              "states, the batch), each in a fresh subprocess with glibc serving allocations over 64 KiB by "
              f"their own mappings (`MALLOC_MMAP_THRESHOLD_=65536`). One model = its fp32 weights and buffers, "
              f"{mb / 2**20:.1f} MiB." + (f" Before: the package in `{args.before}`." if args.before else ""), ""]
    mem_lines, align_info = ([], {}) if args.dropout_memory else _memory_table(args.threads, args.before)
    lines += mem_lines + _dropout_memory_lines(args.threads, args.before)
    if args.memory_only or args.dropout_memory:
        return _finish(lines, t_start, args.out)

    lines += ["", "## Alignment", "",
              f"`align_states` (weight matching; unit graph traced on a 64x64 input; the check that the aligned B "
              f"computes B's function included) of two randomly initialised `{ARCH}`s: "
              f"**{align_info.get('seconds', float('nan')):.1f} s**, {align_info.get('iterations')} sweeps, "
              f"objective {align_info.get('objective_before', float('nan')):.4g} -> "
              f"{align_info.get('objective_after', float('nan')):.4g} (in the memory subprocess above)."]

    lines += ["", f"## K={K} ensemble inference against {K} single-model passes (no_grad)", "",
              f"| input, batch | precision | EnsembleModel K={K} (loop) | {K} single models | ratio |",
              "|---|---|---|---|---|"]
    for label, size, n, precs, rounds in INFERENCE_GROUPS:
        inf = time_inference(size, n, args.repeats or rounds, precs)
        print(f"inference {label}: {inf}", file=sys.stderr, flush=True)
        for prec in precs:
            e, s_ = inf[f"ensemble {prec}"], inf[f"4 singles {prec}"]
            lines.append(f"| {label} | {prec} | {e * 1e3:.0f} ms | {s_ * 1e3:.0f} ms | **{e / s_:.2f}x** |")

    with tempfile.TemporaryDirectory() as d:
        sizes = file_sizes(Path(d))
    lines += ["", f"## Ensemble file (K={K})", "", "| members stored as | file size | vs fp32 |", "|---|---|---|"]
    for dtype, size in sizes.items():
        lines.append(f"| {dtype} | {size / 2**20:.1f} MiB | {size / sizes['fp32']:.3f} |")
    return _finish(lines, t_start, args.out)


def _finish(lines: list[str], t_start: float, out: str | None) -> int:
    lines += ["", f"Total benchmark time: {time.perf_counter() - t_start:.0f} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        Path(out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
