"""Benchmark: `--method neb` (mcensemble.paths.neb) side by side with Draxler et al.'s own
PyTorch-AutoNEB, on the same endpoints, data and budget of gradient evaluations.

Pairs (built-in digits, endpoints trained here once, seeds 0 and 1, and shared by both sides):
  cnn     `mce_digits_cnn` widths 16-32 (VGG-style BN CNN) on `digits` (8x8)
  resnet  timm `test_resnet` (in_chans 1) on `digits,size=16`

Our side: `fit_neb` with the default `NebConfig()` (cycles (30, 0.1), (30, 0.1), (30, 0.01);
2 pivots inserted evenly, then up to 2 more per cycle where the dense scan scores > 0.1;
SGD momentum 0.9, weight decay 5e-4, batch 128). Its gradient evaluations (forward +
backward on one batch, one per interior pivot per step) are counted with the callback.

Their side (only with --anchor DIR, the scratch copy of their repository): their
`torch_autoneb.neb` cycle by cycle with the same schedule written as their configs:
spring_constant inf, weight_decay 5e-4 (their NEB-level decay), SGD lr/momentum as ours,
EvalConfig(batch_size=128), insert `equal` count 2, then `highest` count 2 on
`dense_train_loss` (threshold 0.1), subsample_pivot_count 9 (= our dense_points). Their last
cycle's step count is set so that their gradient evaluations equal ours (their insertion
decides their pivot count, as ours does). The model is their `ModelWrapper(DataModel(
CompareModel(net, CrossEntropyLoss()), {"train": digits train split}))`. One adapter only:
their `DataModel` builds its loaders with num_workers=4 and pin_memory; the benchmark makes
them num_workers=0 without pinning (the same in-process loading our side uses on this
2-core machine). Nothing else of theirs is changed.

Both sides run in a fresh subprocess each (so peak RSS is theirs alone: `ru_maxrss`, and
its rise over the RSS just before the fit). Each returns its final pivots; the parent builds
a `NebPath` from them (their pivots: flat coordinates unflattened in their `ModelWrapper`
order, parameters then buffers; vertex t = their target distances, i.e. arc length) and
scans BOTH with the same `mcensemble.evaluate.scan`: --points evenly spaced t, BatchNorm
re-estimated at every t on the train split; the saddle is the highest training loss.

Get their code (never into this repository):
    git clone https://github.com/fdraxler/PyTorch-AutoNEB /tmp/scratch-autoneb
    (results in docs/benchmarks/neb.md were taken at commit 13c8ba891bd55e4813f9fb7be69e09aca5a34cbd)
It needs networkx, pyyaml, scipy, matplotlib, torchvision, tqdm importable.

Run:  python tests/benchmarks/bench_neb_anchor.py [--anchor DIR] [--pairs cnn,resnet] [--seeds 2] [--out FILE.md]
      [--threads 1]
 or:  MCE_AUTONEB_DIR=DIR python tests/benchmarks/run_all.py --only neb_anchor   (docs/benchmarks/neb_anchor.md)
Without --anchor (and $MCE_AUTONEB_DIR) only our side runs.
Not collected by pytest (file name does not start with test_).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from run_all import emit  # tests/benchmarks/run_all.py, beside this script

BATCH = 128
PAIRS = {
    "cnn": ("BN-CNN 16-32 (`mce_digits_cnn`)", "digits", 10),
    "resnet": ("timm `test_resnet`", "digits,size=16", 10),
}


def make_model(pair: str):
    if pair == "cnn":
        from mcensemble.zoo import DigitsCNN
        return DigitsCNN(widths=(16, 32))
    import timm
    return timm.create_model("test_resnet", num_classes=10, in_chans=1)


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def train(pair: str, seed: int) -> dict:
    from mcensemble.data import create_loader
    from mcensemble.train import TrainConfig, train_model
    _, spec, epochs = PAIRS[pair]
    torch.manual_seed(seed)
    m = make_model(pair)
    loader = create_loader(spec, batch_size=64, shuffle=True, seed=seed)
    train_model(m, loader, config=TrainConfig(epochs=epochs, seed=seed), progress=False)
    return {k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}


# ------------------------------------------------------------------------------------------
# the two sides (each runs in its own subprocess)

def timed(*owner_names) -> dict:
    """Wrap ``owner.name`` (pairs of arguments) to sum the seconds spent in it."""
    acc: dict = {}
    for owner, name in zip(owner_names[::2], owner_names[1::2]):
        real = getattr(owner, name)
        acc[name] = 0.0

        def wrapper(*a, _real=real, _name=name, **k):
            t0 = time.perf_counter()
            try:
                return _real(*a, **k)
            finally:
                acc[_name] += time.perf_counter() - t0
        setattr(owner, name, wrapper)
    return acc


def side_ours(pair: str, a: dict, b: dict, _budget: int, _anchor: str | None) -> tuple[list[dict], list[float], dict]:
    from mcensemble.data import create_loader
    from mcensemble.paths.neb import NebConfig, fit_neb
    spec = PAIRS[pair][1]
    fit_loader = create_loader(spec, batch_size=BATCH, shuffle=True, seed=0)
    bn_loader = create_loader(spec, batch_size=256)
    import mcensemble.paths.neb as neb_mod
    evals = [0]
    aux = timed(neb_mod.Band, "dense", neb_mod, "_reestimate_bn")

    def count(cycle, step, losses):
        evals[0] += len(losses) - 2
    path = fit_neb(make_model(pair), a, b, fit_loader, bn_loader=bn_loader, config=NebConfig(), progress=False,
                   callback=count)
    pivots = [dict(path.groups[f"pivot.{i}"]) for i in range(path.n_pivots)]
    return pivots, list(path.weights), {"evals": evals[0], "pivots": path.n_pivots, "dense_seconds": aux["dense"],
                                        "final_seconds": aux["_reestimate_bn"]}


def side_theirs(pair: str, a: dict, b: dict, budget: int, anchor: str) -> tuple[list[dict], list[float], dict]:
    sys.path.insert(0, anchor)
    from torch import nn, optim
    from torch.utils.data import DataLoader
    import torch_autoneb as ta
    import torch_autoneb.models as tam
    from torch_autoneb.config import EvalConfig, NEBConfig, OptimConfig
    from mcensemble.data import create_dataset

    def ensure_data_loader(data_provider, batch_size, **kwargs):  # their loader, in process
        kwargs.update(num_workers=0, pin_memory=False)
        return DataLoader(data_provider, batch_size=batch_size, **kwargs)
    tam.ensure_data_loader = ensure_data_loader

    last = []
    real = ta.neb_model.NEB.analyse

    def analyse(self, *a, **k):  # their per-cycle dense analysis over the whole train split
        t0 = time.perf_counter()
        try:
            return real(self, *a, **k)
        finally:
            last.append(time.perf_counter() - t0)
    ta.neb_model.NEB.analyse = analyse
    torch.manual_seed(0)
    net = make_model(pair)
    names = [n for n, _ in net.named_parameters()] + [n for n, _ in net.named_buffers()]
    train_ds = create_dataset(PAIRS[pair][1], split="train")
    wrapper = tam.ModelWrapper(tam.DataModel(tam.CompareModel(net, nn.CrossEntropyLoss()), {"train": train_ds}))

    def coords(sd):
        net.load_state_dict(sd)
        return wrapper.get_coords().view(1, -1)

    def cfg(steps, lr, method, args):
        oc = OptimConfig(nsteps=steps, algorithm_type=optim.SGD, algorithm_args={"lr": lr, "momentum": 0.9},
                         scheduler_type=None, scheduler_args=None, eval_config=EvalConfig(BATCH))
        return NEBConfig(spring_constant=math.inf, weight_decay=5e-4, insert_method=method, insert_args=args,
                         subsample_pivot_count=9, optim_config=oc)
    data = {"path_coords": torch.cat([coords(a), coords(b)]), "target_distances": torch.ones(1)}
    highest = {"count": 2, "key": "dense_train_loss"}
    schedule = [(30, 0.1, ta.fill.equal, {"count": 2}), (30, 0.1, ta.fill.highest, highest),
                (None, 0.01, ta.fill.highest, highest)]
    used, cycles = 0, []
    for steps, lr, method, args in schedule:
        if steps is None:  # last cycle: the rest of our budget
            start, _ = method(data, **args)
            steps = max(1, round((budget - used) / (start.shape[0] - 2)))
        data = ta.neb(data, wrapper, cfg(steps, lr, method, args))
        n = data["path_coords"].shape[0] - 2
        used += steps * n
        cycles.append({"steps": steps, "pivots": n})
    pc, w = data["path_coords"], data["target_distances"]
    template = net.state_dict()
    pivots = []
    for i in range(1, pc.shape[0] - 1):
        sd, off = {}, 0
        for k in names:
            t = template[k]
            sd[k] = pc[i, off:off + t.numel()].view(t.shape).to(t.dtype).clone()
            off += t.numel()
        pivots.append(sd)
    w = (w / w.sum()).tolist()
    return pivots, w, {"evals": used, "pivots": pc.shape[0] - 2, "cycles": cycles,
                       "dense_seconds": sum(last[:-1]), "final_seconds": last[-1],
                       "their_saddle_train_loss": data.get("saddle_train_loss")}


def run_side(args) -> int:
    from safetensors.torch import load_file, save_file
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    d = Path(args.work)
    a, b = load_file(d / "a.safetensors"), load_file(d / "b.safetensors")
    fn = side_ours if args.side == "ours" else side_theirs
    # imports and data first, so that the wall time and the RSS rise are the fit's alone
    import mcensemble.paths.neb  # noqa: F401
    from mcensemble.data import create_dataset
    make_model(args.pairs)
    create_dataset(PAIRS[args.pairs][1], split="train")
    if args.side == "theirs":
        sys.path.insert(0, args.anchor)
        import torch_autoneb  # noqa: F401
    before = rss_kib()
    t0 = time.perf_counter()
    pivots, weights, info = fn(args.pairs, a, b, args.budget, args.anchor)
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    save_file({f"{i}/{k}": v.contiguous() for i, p in enumerate(pivots) for k, v in p.items()},
              str(d / f"{args.side}.safetensors"))
    (d / f"{args.side}.json").write_text(json.dumps({**info, "weights": weights, "seconds": secs,
                                                     "rss_before_kib": before, "peak_rss_kib": peak}))
    return 0


# ------------------------------------------------------------------------------------------
# the parent: endpoints, the sides in turn, the same scan for both

def spawn(side: str, pair: str, work: Path, budget: int, args) -> dict:
    from safetensors.torch import load_file
    cmd = [sys.executable, __file__, "--side", side, "--pairs", pair, "--work", str(work), "--budget", str(budget),
           "--threads", str(args.threads)] + (["--anchor", args.anchor] if args.anchor else [])
    env = {**os.environ, "TQDM_DISABLE": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.stderr.write(r.stdout + r.stderr)
        raise SystemExit(f"{side} side failed on {pair}")
    info = json.loads((work / f"{side}.json").read_text())
    flat = load_file(work / f"{side}.safetensors")
    info["pivot_states"] = [{k.split("/", 1)[1]: v for k, v in flat.items() if k.startswith(f"{i}/")}
                            for i in range(info["pivots"])]
    return info


def saddle(pair: str, a: dict, b: dict, info: dict, points: int) -> tuple[float, float]:
    from mcensemble.data import create_loader
    from mcensemble.evaluate import scan
    from mcensemble.paths.neb import NebPath
    spec = PAIRS[pair][1]
    train_loader = create_loader(spec, batch_size=256)
    val_loader = create_loader(spec, split="val", batch_size=256)
    path = NebPath(a, b, info["pivot_states"], info["weights"])
    r = scan(path, lambda: make_model(pair), train_loader, points=points, val_loader=val_loader,
             bn_loader=train_loader, progress=False)
    return max(p["loss"] for p in r.points), max(p["val_nll"] for p in r.points)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="Write the Markdown tables here (else stdout).")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--anchor", default=os.environ.get("MCE_AUTONEB_DIR") or None,
                    help="Folder of a checkout of fdraxler/PyTorch-AutoNEB (default: $MCE_AUTONEB_DIR).")
    ap.add_argument("--pairs", default="cnn,resnet")
    ap.add_argument("--seeds", type=int, default=2, help="endpoint pairs per kind: seeds (0, 1), (2, 3), ...")
    ap.add_argument("--points", type=int, default=41, help="t values of the scan that measures each saddle")
    ap.add_argument("--side", choices=("ours", "theirs"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        return run_side(args)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    from safetensors.torch import save_file
    from mcensemble.data import create_loader
    from mcensemble.evaluate import scan
    from mcensemble.paths import LinearPath
    pairs = [p.strip() for p in args.pairs.split(",") if p.strip()]
    rows, notes, ratios = [], [], {}
    for pair in pairs:
        for k in range(args.seeds):
            with tempfile.TemporaryDirectory() as d:
                work = Path(d)
                a, b = train(pair, 2 * k), train(pair, 2 * k + 1)
                save_file(a, str(work / "a.safetensors"))
                save_file(b, str(work / "b.safetensors"))
                sides = [("mcensemble `--method neb`", spawn("ours", pair, work, 0, args))]
                if args.anchor:
                    sides.append(("PyTorch-AutoNEB (authors)", spawn("theirs", pair, work, sides[0][1]["evals"], args)))
            tl = create_loader(PAIRS[pair][1], batch_size=256)
            r = scan(LinearPath(a, b), lambda: make_model(pair), tl, points=args.points, bn_loader=tl, progress=False)
            label = f"{PAIRS[pair][0]}, seeds {2 * k}-{2 * k + 1}"
            notes.append(f"- {label}: endpoints' train loss {r.points[0]['loss']:.4f} / {r.points[-1]['loss']:.4f}, "
                         f"straight line's max {max(p['loss'] for p in r.points):.4f}.")
            got = []
            for name, info in sides:
                s, nll = saddle(pair, a, b, info, args.points)
                got.append((s, info["seconds"], info["peak_rss_kib"]))
                rows.append(f"| {label} | {name} | {s:.4f} | {nll:.4f} | {info['seconds']:.1f} s | "
                            f"{info['dense_seconds']:.1f} s + {info['final_seconds']:.1f} s | "
                            f"{info['peak_rss_kib'] / 1024:.0f} MiB (+{(info['peak_rss_kib'] - info['rss_before_kib']) / 1024:.0f}) "
                            f"| {info['evals']} | {info['pivots']} |")
                if "cycles" in info:
                    cyc = ", ".join(f"({c['steps']}, {c['pivots']})" for c in info["cycles"])
                    notes.append(f"  their cycles (steps, interior pivots): {cyc}; their own saddle estimate (eval "
                                 f"mode, BN statistics carried along the band): {info['their_saddle_train_loss']:.4f}.")
            if len(got) == 2:
                ratios.setdefault(PAIRS[pair][0], []).append(tuple(o / t for o, t in zip(*got)))
    lines = ["| pair | implementation | saddle (train loss) | worst test NLL | fit wall time | of which: dense scans + "
             "final step | peak RSS (rise in fit) | gradient evaluations | pivots |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|", *rows, "", *notes, ""]
    for name, rs in ratios.items():
        lines.append(f"- {name}: ours / theirs per seed pair: saddle "
                     f"{', '.join(f'{r[0]:.2f}x' for r in rs)}; wall time {', '.join(f'{r[1]:.2f}x' for r in rs)}; "
                     f"peak RSS {', '.join(f'{r[2]:.2f}x' for r in rs)}.")
    from run_all import machine as machine_line
    machine = f"Machine: {machine_line()}, {args.threads} thread(s)."
    text = "\n".join([machine, ""] + lines) + "\n"
    emit(text, args.out, echo=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
