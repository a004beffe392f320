"""Benchmark: the constructed paths (dropout, short), the packed pair and stability against
the default curve fit, on real MNIST digits, before / after side by side.

Pairs (seeds 0 and 1, or `--seeds`; `--train` MNIST digits from tests/benchmarks/_mnist.py, 28x28, batch 128;
SGD lr 0.1 cosine, channel dropout p = 0.2 while training):
- VGG-style BN CNN: `mce_digits_cnn` with 4 Conv-BN-ReLU-MaxPool blocks (16-32-32-64), a
  layered network (`--method dropout`);
- timm `resnet10t` at widths 16-32-48-64, stem 16 (`--method short`).

For each pair, each job runs in its own subprocess, one after the other, with one torch
thread: the default curve fit (`fit_curve`, `CurveConfig()` defaults: one Bezier bend, 20
epochs) as the yardstick, the path with its certificate (`build_dropout_path` /
`build_short_path` at their defaults), the build report's packed-pair row
(`baselines.packed_state` at its defaults), `pack_pair` at its defaults (the full search)
and `dropout_stability` of A. `--old TREE` runs the same jobs on another checkout of
mcensemble (PYTHONPATH=TREE), e.g. a scratch worktree of the commit before this change, so
the table puts both trees' figures side by side from one run. `--profile` adds where each
job's time went (cProfile, cumulative seconds of the named functions).

Run:  python tests/benchmarks/bench_fast_paths.py [--out FILE.md] [--old TREE] [--train N]
Not collected by pytest (file name does not start with test_).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch
from run_all import emit  # tests/benchmarks/run_all.py, beside this script

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

PAIRS = {
    "vgg": ("VGG-style BN CNN 16-32-32-64 (4 blocks)", "mce_digits_cnn",
            {"widths": (16, 32, 32, 64), "img_size": 28}, "dropout"),
    "resnet": ("timm resnet10t 16-32-48-64", "resnet10t", {"channels": (16, 32, 48, 64), "stem_width": 16},
               "short"),
}
JOBS = ("curve", "curve_cl", "path", "packed_row", "pack", "stability", "line_scan", "plane_scan", "build")
PROFILED = {  # label -> (file suffix, function name)
    "evaluation passes": ("mcensemble/evaluate.py", "evaluate"),
    "BatchNorm re-estimation": ("mcensemble/bn.py", "update_bn"),
    "half search": (None, "_search"),
    "joint half search": ("paths/short.py", "choose_halves"),
    "importance": ("mcensemble/stability.py", "_importance"),
    "segment checks": (None, "verify_short_segments"),
    "short measured segments": ("paths/short.py", "_measure"),
    "dropout path vertex checks": ("paths/dropout.py", "_check"),
    "D_k losses, one pass per side": ("mcensemble/stability.py", "_family_losses"),
    "D_k BatchNorm, one pass per side": ("mcensemble/stability.py", "_family_stats"),
    "vertex probes": ("paths/dropout.py", "_probe"),
    "unit graph traces": ("mcensemble/units.py", "_trace"),
}


def make_model(arch, kwargs):
    import timm
    from mcensemble import zoo  # noqa: F401
    return timm.create_model(arch, num_classes=10, in_chans=1, **kwargs)


def loaders(n_train, batch_size=128):
    sys.path.insert(0, HERE)
    from _mnist import mnist_datasets
    from torch.utils.data import DataLoader
    train, val = mnist_datasets((n_train, 1000), seed=0)
    return (DataLoader(train, batch_size=batch_size, shuffle=False),
            DataLoader(val, batch_size=batch_size, shuffle=False))


def train_data():
    """The training split as a data spec (`bench_fast_paths:train_data`; size from $BENCH_TRAIN)."""
    return loaders(int(os.environ["BENCH_TRAIN"]))[0].dataset


def val_data():
    return loaders(int(os.environ["BENCH_TRAIN"]))[1].dataset


def train_pair(arch, kwargs, epochs, n_train, channel_p=0.2, seeds=(0, 1)):
    from torch.utils.data import DataLoader
    from mcensemble.hooks import channel_dropout
    from mcensemble.train import TrainConfig, train_model
    train_ld, _ = loaders(n_train)
    states = []
    for seed in seeds:
        torch.manual_seed(seed)
        net = make_model(arch, kwargs)
        ld = DataLoader(train_ld.dataset, batch_size=128, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
        hook = (lambda m: channel_dropout(m, channel_p, example_input=torch.zeros(2, 1, 28, 28))) if channel_p else None
        train_model(net, ld, config=TrainConfig(epochs=epochs, lr=0.1, seed=seed), hook=hook, progress=False)
        states.append({k: v.detach().clone() for k, v in net.state_dict().items()})
    return states


# ----------------------------------------------------------------------------- worker
def _profile_summary(prof) -> dict[str, float]:
    import pstats
    st = pstats.Stats(prof)
    out = {}
    for label, (suffix, name) in PROFILED.items():
        best = 0.0
        for (file, _line, fn), (_cc, _nc, _tt, ct, _callers) in st.stats.items():
            if fn == name and (suffix is None or file.replace(os.sep, "/").endswith(suffix)):
                best = max(best, ct)  # outermost call's cumulative time (recursion counted once)
        if best:
            out[label] = best
    return out


def worker(args) -> None:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    blob = torch.load(args.pairfile, weights_only=True)
    name, arch, kwargs, method = PAIRS[args.pair]
    model = make_model(arch, kwargs).eval()
    a, b = blob["a"], blob["b"]
    train, _ = loaders(args.train)
    res: dict = {}
    prof = None
    if args.profile:
        import cProfile
        prof = cProfile.Profile(time.process_time)  # CPU seconds: the machine is shared
    t0, c0 = time.perf_counter(), time.process_time()
    if prof:
        prof.enable()
    if args.job == "curve":
        from mcensemble.paths.curve_base import CurveConfig
        from mcensemble.paths.fit import fit_curve
        curve = fit_curve(model, a, b, train, config=CurveConfig(), progress=False)
        curve.save(args.pairfile + ".curve.safetensors")
    elif args.job == "curve_cl":  # the same fit with `--channels-last` (inputs in channels_last)
        from mcensemble.paths.curve_base import CurveConfig
        from mcensemble.paths.fit import fit_curve
        from mcensemble.precision import use_precision
        with use_precision("fp32", channels_last=True):
            fit_curve(model, a, b, train, config=CurveConfig(), progress=False)
    elif args.job == "path":
        if method == "dropout":
            from mcensemble.paths.dropout import build_dropout_path as build
        else:
            from mcensemble.paths.short import build_short_path as build
        path = build(model, a, b, train, progress=False)
        c = path.certificate
        res.update(eps=c["eps"], max_loss=c["max_loss"], vertices=path.n_vertices)
    elif args.job == "packed_row":
        from mcensemble.baselines import packed_state
        packed, why = packed_state(model, a, b, train, progress=False)
        res["skipped"] = why
        if hasattr(packed, "certificate"):
            res.update(eps=packed.certificate["eps"], bound=packed.certificate["bound"])
    elif args.job == "pack":
        from mcensemble.pack import pack_pair
        out = pack_pair(model, a, b, train, method=method, progress=False)
        if hasattr(out, "certificate"):
            res.update(eps=out.certificate["eps"], bound=out.certificate["bound"])
    elif args.job in ("line_scan", "plane_scan"):  # on the curve the "curve" job fitted
        from mcensemble.paths import load_path
        path = load_path(args.pairfile + ".curve.safetensors")
        if args.job == "line_scan":  # what `scan --points 21` runs
            from mcensemble.evaluate import scan
            r = scan(path, model, train, points=21, bn_loader=train, progress=False)
            res.update(max_loss=max(p["loss"] for p in r.points))
        else:  # what `scan --plane` runs at the default grid (11 x 11)
            from mcensemble.paths import LinearPath
            from mcensemble.plane import scan_plane
            r = scan_plane(path, model, train, bn_loader=train, others={"linear": LinearPath(*path.endpoints)},
                           progress=False)
            res.update(max_loss=max(max(row) for row in r.loss), data=getattr(r, "data", "all"))
    elif args.job == "build":  # the default `build` (bezier curve, members, baselines) of the pair
        from mcensemble.checkpoints import save_checkpoint
        from mcensemble.pipeline import BuildOptions, DataOptions, ModelOptions, build_ensemble
        os.environ["BENCH_TRAIN"] = str(args.train)
        files = []
        for name_, sd in (("a", a), ("b", b)):
            f = f"{args.pairfile}.{name_}.safetensors"
            save_checkpoint(sd, f, metadata={"arch": arch, "num_classes": 10, "in_chans": 1, "model_args": kwargs})
            files.append(f)
        rep = build_ensemble(files, model=ModelOptions(), opts=BuildOptions(),
                             data=DataOptions(data="bench_fast_paths:train_data", val_data="bench_fast_paths:val_data",
                                              batch_size=128, progress=False),
                             out=f"{args.pairfile}.ensemble.safetensors").report
        t = rep["timings"]
        res.update(baselines_s=t["baselines_s"], total_s=t["total_s"], baselines_share=t["baselines_s"] / t["total_s"])
    elif args.job == "stability":
        from mcensemble.stability import dropout_stability
        if method != "dropout":
            res["skipped"] = "residual network"
        else:
            st = dropout_stability(model, a, train, progress=False)
            res.update(eps=st.eps)
    if prof:
        prof.disable()
    res.update(wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0)
    if prof:
        res["profile"] = _profile_summary(prof)
    print("RESULT " + json.dumps(res))


def run_job(tree, pair, job, pairfile, n_train, profile) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tree, HERE]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", job, "--pair", pair, "--pairfile", pairfile,
           "--train", str(n_train)] + (["--profile"] if profile else [])
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (p.stderr.strip().splitlines() or ["no output"])[-1][:200]}


def _f(v, fmt="{:.4f}"):
    return "-" if v is None else fmt.format(v)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the markdown table here too")
    p.add_argument("--old", help="another checkout of mcensemble to run the same jobs on (before / after)")
    p.add_argument("--train", type=int, default=2000, help="MNIST training examples (of 5,000)")
    p.add_argument("--epochs", type=int, default=8, help="epochs training each endpoint")
    p.add_argument("--pairs", default="vgg,resnet")
    p.add_argument("--jobs", default=",".join(JOBS))
    p.add_argument("--old-jobs", default="path,packed_row,pack,stability", help="jobs run on the --old tree too")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--repeat", type=int, default=1, help="run each job this many times, keep the fastest (CPU s)")
    p.add_argument("--seeds", default="0,1", help="the two training seeds of each pair (another pair: 2,3)")
    p.add_argument("--cache", help="keep the trained pairs in this folder and reuse them (same --train, --epochs); "
                                   "outside the repository, e.g. ~/.cache/mcensemble-bench")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--worker", choices=JOBS)
    p.add_argument("--pair", choices=sorted(PAIRS))
    p.add_argument("--pairfile")
    args = p.parse_args(argv)
    if args.worker:
        args.job = args.worker
        return worker(args)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    trees = [("before", os.path.abspath(args.old))] if args.old else []
    trees.append(("after", ROOT))
    jobs = args.jobs.split(",")
    seeds = tuple(int(v) for v in args.seeds.split(","))
    lines = ["# Benchmark: fast_paths", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
             f"{platform.python_version()}, torch {torch.__version__}, 1 torch thread per job.  ",
             f"Date: {time.strftime('%Y-%m-%d')}.  ",
             "Command: `python tests/benchmarks/bench_fast_paths.py --out FILE.md"
             f"{' --old TREE' if args.old else ''} --train {args.train} --epochs {args.epochs}"
             f"{' --profile' if args.profile else ''}{'' if seeds == (0, 1) else ' --seeds ' + args.seeds}"
             f"{'' if args.repeat == 1 else f' --repeat {args.repeat}'}`.", ""]
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.pairs.split(","):
            name, arch, kwargs, method = PAIRS[key]
            pf = os.path.join(tmp, f"{key}.pt")
            tag = "" if seeds == (0, 1) else f"-seeds{seeds[0]}{seeds[1]}"
            cached = os.path.join(args.cache, f"fast_paths-{key}-{args.train}-{args.epochs}{tag}.pt") if args.cache else None
            if cached and os.path.exists(cached):
                blob = torch.load(cached, weights_only=True)
            else:
                a, b = train_pair(arch, kwargs, args.epochs, args.train, seeds=seeds)
                blob = {"a": a, "b": b}
                if cached:
                    os.makedirs(args.cache, exist_ok=True)
                    torch.save(blob, cached)
            torch.save(blob, pf)
            got = {}
            for tree_name, tree in reversed(trees):  # this tree first: its curve fit is what the scans read
                for job in jobs:
                    if tree_name == "before" and (job.startswith("curve") or job not in args.old_jobs.split(",")):
                        continue  # the curve fit is the yardstick: timed once, on this tree
                    runs = [run_job(tree, key, job, pf, args.train, args.profile) for _ in range(args.repeat)]
                    # the fastest of the repeats: on a shared machine the others measure the sharing
                    got[tree_name, job] = min(runs, key=lambda r: r.get("cpu_s", float("inf")))
                    print(name, tree_name, job, got[tree_name, job], file=sys.stderr, flush=True)
            curve = got.get(("after", "curve"), {})
            lines += [f"## {name}: `--method {method}` ({args.train} training digits)", "",
                      "| tree | job | CPU s | x curve fit (CPU) | wall s | x curve fit (wall) | eps | max loss / bound |",
                      "|---|---|---|---|---|---|---|---|"]
            for (tree_name, job), r in sorted(got.items(), key=lambda kv: kv[0][0] != "before"):
                if "error" in r:
                    lines.append(f"| {tree_name} | {job} | error: {r['error']} | | | | |")
                    continue
                rc = r["cpu_s"] / curve["cpu_s"] if curve.get("cpu_s") else None
                rw = r["wall_s"] / curve["wall_s"] if curve.get("wall_s") else None
                lines.append(f"| {tree_name} | {job} | {r['cpu_s']:.1f} | {_f(rc, '{:.2f}x')} | {r['wall_s']:.1f} | "
                             f"{_f(rw, '{:.2f}x')} | {_f(r.get('eps'))} | {_f(r.get('max_loss', r.get('bound')))} |")
                if job == "build":
                    lines[-1] += (f" baselines {r['baselines_s']:.1f} s of {r['total_s']:.1f} s "
                                  f"({r['baselines_share']:.1%}) |")
            if args.profile:
                lines += ["", "Where the time went (cProfile, cumulative CPU seconds, outermost call of each):", ""]
                for (tree_name, job), r in got.items():
                    if r.get("profile"):
                        parts = ", ".join(f"{k} {v:.1f}" for k, v in r["profile"].items())
                        lines.append(f"- {tree_name} {job} ({r['cpu_s']:.1f} CPU s): {parts}")
            lines.append("")
    text = "\n".join(lines) + "\n"
    emit(text, args.out)


if __name__ == "__main__":
    main()
