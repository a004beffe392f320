"""Benchmark: ensemble quality at equal training epochs, side by side in one run.

For each task, model and seed (5 seeds by default), at equal training epochs E:

- endpoints A and B, and a third model C, trained independently (`train.train_model`:
  SGD, cosine, batch 64, E epochs each, seeds 10 s, 10 s + 1, 10 s + 2);
- the two-endpoint ensemble A + B (cost 2E) and the independent 3-model ensemble A + B + C (3E);
- FGE from A (`snapshots.fge_train`): E more epochs in 4 cycles, lr 0.04 -> 0.0004 (`build --method
  fge`'s default, its --lr), one snapshot
  per cycle, BN re-estimated (cost 2E: the budget of A + B, Garipov et al. 2018's "1 budget"
  comparison is FGE against the independent 2-model ensemble);
- the curve between A and B fitted with the library's defaults (`paths.fit.CurveConfig()`;
  B aligned to A first, as `build` does by default for curves) for E epochs (cost 3E, as A + B + C);
  11 points scanned (BN re-estimated on the training data), members chosen on the selection
  split with the build's selection (`members.select_members`: greedy with replacement behind
  a paired-bootstrap gate, member weights), at most 3, 5 and 8 distinct members;
- for comparison, the same with the previous default fit (B not aligned, the bends stepping
  at 0.05, i.e. `CurveConfig(lr=0.0125)`), at most 5 members.

Selection data (the build's validation data) is disjoint from the training and test data;
the test data is used for nothing else. Reported: test NLL / accuracy / ECE of every row,
the selection-split NLL of each built ensemble against the A + B ensemble of the same
(BN re-estimated) endpoints, the curve's flatness (worst training loss of the 11 points /
mean of the two endpoints', BN re-estimated at every point), and the three targets.

Tasks:
- `digits`: the built-in digits, `digits,train=300,noise=0.2` (300 training examples, a fifth
  of the labels wrong); selection: digits train-split examples 1077..1436 (clean, unseen);
  test: the digits val split (360). Models: `mce_digits_cnn` (BN CNN), `mce_digits_mlp`, timm
  `test_efficientnet` (BN, depthwise convolutions).
- `seq`: a generated 1-D sequence classification (`seq_tensors`): 6 motifs (sines, a step, a
  ramp, a bump, a chirp) of length 16 at a random shift in a sequence of 64, random amplitude,
  a random linear trend and Gaussian noise (sigma 0.5); 600 training, 400 selection and 2000 test
  sequences, each split from its own seed. Model: a Sequential BN 1-D CNN (`seq_cnn`); an MLP
  (`seq_mlp`) with `--only seq:seq_mlp`.

Run:  python tests/benchmarks/bench_quality.py [--seeds 5] [--out FILE.md] [--threads 1]
      [--only digits:mce_digits_cnn seq:seq_cnn ...]
Not collected by pytest (file name does not start with test_).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mcensemble import zoo  # noqa: F401,E402  (registers mce_* archs)
from mcensemble.data import create_dataset, digits_tensors  # noqa: E402
from mcensemble.snapshots import fge_train  # noqa: E402
from mcensemble.members import (candidate_state, ensemble_metrics, evaluate_candidates,  # noqa: E402
                                predict_log_probs, select_members)
from mcensemble.paths.curve_base import CurveConfig
from mcensemble.paths.fit import fit_curve  # noqa: E402
from mcensemble.snapshots import FgeConfig  # noqa: E402
from mcensemble.train import TrainConfig, train_model  # noqa: E402

DIGITS_TRAIN = "digits,train=300,noise=0.2"
#: digits train-split examples used as selection data: clean labels, unseen in training
SELECTION = (1077, 1437)
SEQ_LENGTH, SEQ_CLASSES, SEQ_NOISE = 64, 6, 0.5
SEQ_SIZES = {"train": (600, 1), "selection": (400, 2), "test": (2000, 3)}  # split -> (examples, seed)
KS = (3, 5, 8)
GRID = 11
FGE_CYCLES = 4
#: FGE's highest learning rate: what `build --method fge` uses by default (its --lr)
FGE_LR = FgeConfig.lr
#: CurveConfig.lr that reproduces the previous default fit (the bends at 0.05, 4 x 0.0125)
OLD_LR = 0.0125


# ----------------------------------------------------------------------------- the sequence task
def _motifs(length: int = 16) -> torch.Tensor:
    u = torch.arange(length, dtype=torch.float32)
    return torch.stack([
        torch.sin(2 * math.pi * u / 8),
        torch.sin(2 * math.pi * u / 5.3),
        torch.where(u < length / 2, 1.0, -1.0),
        2 * u / (length - 1) - 1,
        2 * torch.exp(-((u - length / 2) ** 2) / 8) - 0.5,
        torch.sin(2 * math.pi * u * u / (length * 10)),
    ])


def seq_tensors(n: int, seed: int, *, length: int = SEQ_LENGTH, noise: float = SEQ_NOISE) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` sequences (n, 1, length) and labels (n,): a class motif at a random shift and
    amplitude, on a random linear trend, plus Gaussian noise; reproducible from `seed`."""
    g = torch.Generator().manual_seed(seed)
    m = _motifs()[:SEQ_CLASSES]
    y = torch.randint(0, SEQ_CLASSES, (n,), generator=g)
    x = noise * torch.randn(n, 1, length, generator=g)
    shift = torch.randint(0, length - m.shape[1] + 1, (n,), generator=g)
    amp = 0.6 + 0.8 * torch.rand(n, generator=g)
    trend = (torch.rand(n, generator=g) - 0.5) * 2
    x += trend[:, None, None] * torch.linspace(-1, 1, length)[None, None]
    for i in range(n):
        s = int(shift[i])
        x[i, 0, s:s + m.shape[1]] += amp[i] * m[y[i]]
    return x, y


def seq_cnn(num_classes: int = SEQ_CLASSES, width: int = 16) -> nn.Sequential:
    """A Sequential 1-D CNN with BatchNorm (three Conv-BN-ReLU blocks, global max pooling)."""
    return nn.Sequential(
        nn.Conv1d(1, width, 5, padding=2, bias=False), nn.BatchNorm1d(width), nn.ReLU(), nn.MaxPool1d(2),
        nn.Conv1d(width, 2 * width, 5, padding=2, bias=False), nn.BatchNorm1d(2 * width), nn.ReLU(), nn.MaxPool1d(2),
        nn.Conv1d(2 * width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm1d(2 * width), nn.ReLU(),
        nn.AdaptiveMaxPool1d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))


def seq_mlp(num_classes: int = SEQ_CLASSES, width: int = 128) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(SEQ_LENGTH, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, num_classes))


def _timm(arch: str, **kw):
    def make() -> nn.Module:
        import timm
        return timm.create_model(arch, num_classes=10, in_chans=1, **kw)
    return make


# ----------------------------------------------------------------------------- tasks
def digits_splits() -> dict[str, TensorDataset]:
    x, y = digits_tensors("train")
    lo, hi = SELECTION
    return {"train": create_dataset(DIGITS_TRAIN, split="train"),
            "selection": TensorDataset(x[lo:hi].contiguous(), y[lo:hi].clone()),
            "test": create_dataset("digits", split="val")}


def seq_splits() -> dict[str, TensorDataset]:
    return {k: TensorDataset(*seq_tensors(n, seed)) for k, (n, seed) in SEQ_SIZES.items()}


#: task -> (splits, {model name: (factory, epochs E)})
TASKS = {
    "digits": (digits_splits, {"mce_digits_cnn": (_timm("mce_digits_cnn"), 30),
                               "mce_digits_mlp": (_timm("mce_digits_mlp"), 40),
                               "timm test_efficientnet": (_timm("test_efficientnet"), 10)}),
    "seq": (seq_splits, {"seq_cnn (BN, 1-D)": (seq_cnn, 15)}),
}
#: not run by default (the MLP on the sequences reaches only ~50% accuracy): --only 'seq:seq_mlp'
EXTRA = {"seq": {"seq_mlp": (seq_mlp, 20)}}
DATA_NOTE = {
    "digits": f"`{DIGITS_TRAIN}` (300 training examples, 20% wrong labels); selection: digits train-split "
              f"examples {SELECTION[0]}..{SELECTION[1] - 1} (clean, unseen); test: the digits val split (360).",
    "seq": f"generated 1-D sequences ({SEQ_CLASSES} motifs at random shifts, amplitude, trend, noise sigma "
           f"{SEQ_NOISE}); {SEQ_SIZES['train'][0]} training, {SEQ_SIZES['selection'][0]} selection, "
           f"{SEQ_SIZES['test'][0]} test sequences, each split from its own seed.",
}


def _loader(ds, *, shuffle: bool = False, seed: int = 0, batch_size: int = 64) -> DataLoader:
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen)


def train_one(make, ds, epochs: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = make()
    train_model(net, _loader(ds, shuffle=True, seed=seed), config=TrainConfig(epochs=epochs, seed=seed), progress=False)
    return net.eval()


def _state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _aligned(make, a, b, example) -> dict[str, torch.Tensor]:
    """B aligned to A as `build` does for curves by default (falls back to B when tracing fails)."""
    from mcensemble.pipeline import align_chain
    try:
        return align_chain([a, b], make(), data=example)[0][1]
    except Exception as e:  # noqa: BLE001 - report and go on unaligned, as build's auto mode does
        print(f"  alignment failed ({type(e).__name__}: {e}); curve fitted unaligned", file=sys.stderr)
        return b


def run_one(make, splits, epochs: int, seed: int) -> dict:
    """Every row for one (model, seed)."""
    t0 = time.perf_counter()
    train_ds, sel_ds, test_ds = splits["train"], splits["selection"], splits["test"]
    bn_loader, sel_loader, test_loader = (_loader(d, batch_size=512) for d in (train_ds, sel_ds, test_ds))
    nets = [train_one(make, train_ds, epochs, 10 * seed + i) for i in range(3)]
    t_train = time.perf_counter() - t0
    singles, labels = zip(*(predict_log_probs(n, test_loader) for n in nets))
    labels = labels[0]
    rows = {"endpoint A": ensemble_metrics([singles[0]], labels), "endpoint B": ensemble_metrics([singles[1]], labels),
            "A + B ensemble (cost 2)": ensemble_metrics(singles[:2], labels),
            "independent 3-model ensemble (cost 3)": ensemble_metrics(singles, labels)}

    t1 = time.perf_counter()
    fge_net = copy.deepcopy(nets[0]).train()
    col = fge_train(fge_net, _loader(train_ds, shuffle=True, seed=seed), cycles=FGE_CYCLES, epochs=epochs,
                    lr_max=FGE_LR, seed=seed, progress=False)
    fge_lps = []
    for st in col.member_states(bn_loader=bn_loader):
        fge_net.load_state_dict(st)
        fge_lps.append(predict_log_probs(fge_net, test_loader)[0])
    rows[f"FGE from A, {FGE_CYCLES} snapshots (cost 2)"] = ensemble_metrics(fge_lps, labels)
    t_fge = time.perf_counter() - t1

    t2 = time.perf_counter()
    a, b = _state(nets[0]), _state(nets[1])
    b_al = _aligned(make, a, b, _loader(train_ds, batch_size=8))
    loaders = (_loader(train_ds, shuffle=True, seed=seed), bn_loader, sel_loader, test_loader)
    curve = _curve(make, a, b_al, CurveConfig(epochs=epochs, seed=seed), loaders, KS, seed)
    t_fit = time.perf_counter() - t2
    for k in KS:
        rows[f"curve ensemble, <= {k} members (cost 3)"] = curve["test"][k]
    # the previous default fit, for comparison: unaligned, the bends at 0.05 (CurveConfig.lr 0.0125)
    old = _curve(make, a, b, CurveConfig(epochs=epochs, seed=seed, lr=OLD_LR), loaders, (5,), seed)
    rows["curve ensemble, <= 5, previous fit defaults (cost 3)"] = old["test"][5]
    return {"rows": rows, "built": curve["built"], "ends_sel_nll": curve["ends_sel_nll"], "flat": curve["flat"],
            "flat_max": curve["flat_max"], "flat_old": old["flat"], "train_s": t_train, "fge_s": t_fge, "fit_s": t_fit,
            "total_s": time.perf_counter() - t0}


def _curve(make, a, b, config: CurveConfig, loaders, ks, seed: int) -> dict:
    """Fit a curve from A to B, scan GRID points (BN re-estimated), choose members on the
    selection split for each K in `ks`: test metrics, selection NLLs, flatness."""
    fit_loader, bn_loader, sel_loader, test_loader = loaders
    path = fit_curve(make(), a, b, fit_loader, config=config, progress=False)
    net = make()
    pts = [(0, i / (GRID - 1), i / (GRID - 1)) for i in range(GRID)]
    grid = evaluate_candidates([path], net, pts, train_loader=bn_loader, val_loader=sel_loader, progress=False)
    sel_labels = predict_log_probs(net, sel_loader)[1]
    test_lps, labels = [], None
    for c in grid:
        net.load_state_dict(candidate_state(path, c))
        lp, labels = predict_log_probs(net, test_loader)
        test_lps.append(lp)
    out: dict = {"test": {}, "built": {},
                 "ends_sel_nll": ensemble_metrics([grid[0].val_log_probs, grid[-1].val_log_probs], sel_labels).nll}
    for k in ks:
        s = select_members(grid, sel_labels, max_members=k, endpoints=[0, GRID - 1], seed=seed)
        out["test"][k] = ensemble_metrics([test_lps[i] for i in s.indices], labels, s.weights)
        # the A + B selection NLL as the selection computes it (float64), so that the comparison is exact
        ends = s.baselines.get("endpoints_ensemble", {}).get("nll", out["ends_sel_nll"])
        out["built"][k] = {"sel_nll": s.nll, "ends_sel_nll": ends, "n": len(s.indices), "rule": s.rule,
                           "t": [grid[i].u for i in s.indices]}
    losses = [c.train.loss for c in grid]
    out["flat"] = max(losses) / (0.5 * (losses[0] + losses[-1]))
    out["flat_max"] = max(losses) / max(losses[0], losses[-1])
    return out


# ----------------------------------------------------------------------------- report
def _ms(values: list[float], fmt: str = "{:.3f}") -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def _model_section(task: str, name: str, epochs: int, rs: list[dict]) -> tuple[list[str], dict]:
    lines = [f"### {task}: {name} (E = {epochs} epochs)", "",
             "| model (test data) | accuracy | NLL | ECE |", "|---|---|---|---|"]
    for row in rs[0]["rows"]:
        ms = [r["rows"][row] for r in rs]
        lines.append(f"| {row} | {_ms([m.acc for m in ms])} | {_ms([m.nll for m in ms])} | {_ms([m.ece for m in ms])} |")
    ab = "A + B ensemble (cost 2)"
    c5 = "curve ensemble, <= 5 members (cost 3)"
    fge = f"FGE from A, {FGE_CYCLES} snapshots (cost 2)"
    never_worse = {k: sum(r["built"][k]["sel_nll"] <= r["built"][k]["ends_sel_nll"] for r in rs) for k in KS}
    beats = sum(r["rows"][c5].nll < r["rows"][ab].nll for r in rs)
    c5_mean, ab_mean = (statistics.mean(r["rows"][x].nll for r in rs) for x in (c5, ab))
    fge_ratio = statistics.mean(r["rows"][fge].nll for r in rs) / ab_mean
    lines += [
        "",
        "Selection split: built ensemble's NLL not above the A + B ensemble's (same BN-re-estimated endpoints) in "
        + ", ".join(f"{never_worse[k]}/{len(rs)} seeds at <= {k}" for k in KS) + ". Distinct members chosen: "
        + ", ".join(f"<= {k}: {_ms([r['built'][k]['n'] for r in rs], '{:.1f}')}" for k in KS)
        + "; rules: " + ", ".join(f"<= {k}: " + "/".join(r["built"][k]["rule"] for r in rs) for k in KS) + ".",
        "",
        f"Held-out: curve ensemble (<= 5) NLL {c5_mean:.3f} vs A + B {ab_mean:.3f} (mean; lower in {beats}/{len(rs)} "
        f"seeds). FGE / (A + B) NLL: {fge_ratio:.3f}. Curve flatness (worst of {GRID} points / mean of the "
        f"endpoints' training loss): {_ms([r['flat'] for r in rs], '{:.2f}')} (/ the worse endpoint's: "
        f"{_ms([r['flat_max'] for r in rs], '{:.2f}')}); previous fit defaults: {_ms([r['flat_old'] for r in rs], '{:.2f}')}.",
        "",
        f"Time per seed: {_ms([r['total_s'] for r in rs], '{:.1f}')} s (3 trainings "
        f"{_ms([r['train_s'] for r in rs], '{:.1f}')} s, FGE {_ms([r['fge_s'] for r in rs], '{:.1f}')} s, "
        f"alignment + curve fit {_ms([r['fit_s'] for r in rs], '{:.1f}')} s).",
        "",
    ]
    summary = {"never_worse": all(v == len(rs) for v in never_worse.values()), "curve5_beats": c5_mean < ab_mean,
               "fge_ratio": fge_ratio, "c5": c5_mean, "ab": ab_mean}
    return lines, summary


def table(results: dict, *, seeds: list[int], wall: float, argv: list[str]) -> str:
    cfg = CurveConfig()
    lines = [
        "## Quality at equal training epochs", "",
        f"Command: `python tests/benchmarks/bench_quality.py {' '.join(argv)}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s); wall time {wall:.0f} s. Mean ± std over seeds {seeds}.", "",
        "Every row at equal epochs E per model (see the module docstring of the benchmark): endpoints A, B and C "
        f"E epochs each; FGE E more epochs from A; the curve E epochs with the default fit "
        f"(`CurveConfig()`: {cfg.kind}, {cfg.bends} bend, lr {cfg.lr}, B aligned to A first). Members: the build's "
        "selection (greedy with replacement behind a paired bootstrap, weights) on the selection split, at most K "
        "distinct members.", "",
    ]
    summaries = {}
    for task, models in results.items():
        lines += [f"Data `{task}`: {DATA_NOTE[task]}", ""]
        for name, (epochs, rs) in models.items():
            sec, summaries[(task, name)] = _model_section(task, name, epochs, rs)
            lines += sec
    lines += ["### Targets", "", "| task, model | built <= A + B on selection (all seeds, all K) | "
              "curve (<= 5) beats A + B on test NLL (mean) | FGE / (A + B) test NLL (target <= 1.05) |", "|---|---|---|---|"]
    for (task, name), s in summaries.items():
        lines.append(f"| {task}, {name} | {'yes' if s['never_worse'] else 'NO'} | "
                     f"{'yes' if s['curve5_beats'] else 'no'} ({s['c5']:.3f} vs {s['ab']:.3f}) | {s['fge_ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 is fastest)")
    p.add_argument("--only", nargs="*", default=None, help="task:model names to run (default: all)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_flush_denormal(True)
    torch.set_num_threads(a.threads)
    seeds = list(range(a.seeds))
    t0 = time.perf_counter()
    results: dict[str, dict[str, tuple[int, list[dict]]]] = {}
    for task, (splits_fn, models) in TASKS.items():
        splits = None
        if a.only:
            models = {**models, **EXTRA.get(task, {})}
        for name, (make, epochs) in models.items():
            if a.only and f"{task}:{name}" not in a.only and f"{task}:{name.split()[0]}" not in a.only:
                continue
            splits = splits or splits_fn()
            for s in seeds:
                r = run_one(make, splits, epochs, s)
                results.setdefault(task, {}).setdefault(name, (epochs, []))[1].append(r)
                print(f"[{time.perf_counter() - t0:6.0f}s] {task} {name} seed {s}: "
                      + ", ".join(f"{k}: {m.nll:.3f}" for k, m in r["rows"].items())
                      + f"; flat {r['flat']:.2f}", file=sys.stderr, flush=True)
    cmd = [f"--seeds {a.seeds}", f"--threads {a.threads}"] + ([f"--only {' '.join(a.only)}"] if a.only else [])
    md = table(results, seeds=seeds, wall=time.perf_counter() - t0, argv=cmd)
    print(md)
    if a.out:
        Path(a.out).write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
