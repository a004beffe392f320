"""Benchmark: quality of a curve ensemble at equal training budget.

For each architecture (the built-in MLP `mce_digits_mlp` and BN CNN `mce_digits_cnn`) and
each seed:

- train endpoints A and B (E epochs each, `mcensemble.train.train_model`, batch 64) on a
  hard digits setting (default `digits,train=300,noise=0.2`: 300 training examples, a
  fifth of their labels wrong; see SETTING_NOTE);
- connect them with a Bezier curve (one bend, F curve epochs) with
  `mcensemble.pipeline.build_ensemble`, K = 4 members chosen greedily on validation NLL.
  The validation data of the build is a *selection* split disjoint from both the training
  examples and the test split: 360 clean digits training-split examples the endpoints never
  saw (indices 1077..1436 of the digits train split). The same curve's uniform members
  (t = 0, 1/3, 2/3, 1) are reported too, and greedy members chosen on the test split
  itself (optimistic: selection and report on the same data);
- train a third model C (E epochs, another seed). Budget: A and B cost 2E epochs, the curve
  F epochs; with F = E the curve ensemble costs 3E epochs, as much as the independent
  ensemble A + B + C (3 models of E epochs). Curve steps cost about as much as training
  steps (bench_curve_step.py); the candidate evaluations of the build (BN re-estimation and
  forward passes at 11 points) are not counted;
- report on the held-out `digits` val split (360 examples, never used for training or
  selection): each endpoint, the curve ensemble, the independent 3-model ensemble, the
  2-model A + B ensemble. Accuracy, NLL, ECE (15 bins) of the mean-probability ensemble.
  Endpoints are the trained checkpoints as they are (their own BN running statistics);
  curve members have BN re-estimated on the training data (as the build does).
- one point of the curve alone: the grid point with the lowest selection-split NLL (it
  shows how much of the gain is one better model rather than averaging);
- also: the curve's worst training loss on the 11-point grid against the straight line's
  midpoint training loss (both from the build report, BN re-estimated at every point).

Mean +- std over seeds (seed s: A from seed 10 s, B from 10 s + 1, C from 10 s + 2).

Run:  python tests/benchmarks/bench_quality.py [--seeds 5] [--out FILE.md] [--threads 1]
      [--data SPEC] [--epochs E] [--curve-epochs F] [--arch mce_digits_cnn ...]
Not collected by pytest (file name does not start with test_).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mcensemble import zoo  # noqa: F401,E402  (registers mce_* archs)
from mcensemble.checkpoints import save_checkpoint  # noqa: E402
from mcensemble.data import create_loader, digits_tensors  # noqa: E402
from mcensemble.members import (ensemble_metrics, evaluate_candidates, predict_log_probs,  # noqa: E402
                                select_greedy_nll, uniform_points)
from mcensemble.models import ModelSpec, create_model  # noqa: E402
from mcensemble.pipeline import BuildOptions, DataOptions, ModelOptions, build_ensemble  # noqa: E402
from mcensemble.train import TrainConfig, train_model  # noqa: E402

DEFAULT_DATA = "digits,train=300,noise=0.2"
SETTING_NOTE = (
    "Plain `digits` is too easy (CNN val NLL ~0.03; two CNNs barely beat the better one). "
    "Label noise on the full training split (`noise=0.3`) makes models underconfident on clean "
    "test labels, so averaging (which lowers confidence further) does not help NLL. A small "
    "training subset alone (`train=300`) leaves the models well calibrated and similar (the MLP "
    "pair barely beats its better member). A small subset with label noise (`train=300,noise=0.2`, "
    "trained long enough to fit the noise) gives overconfident, diverse models: there ensembling "
    "clearly lowers NLL, most of all for the CNN."
)

#: indices of the digits train split used as the build's selection (validation) data: clean
#: labels, disjoint from the first N <= 1077 training examples and from the test split.
SELECTION = (1077, 1437)

_DATA_MODULE = "_mce_bench_quality_data"


def _selection_dataset():
    x, y = digits_tensors("train")
    lo, hi = SELECTION
    return torch.utils.data.TensorDataset(x[lo:hi].contiguous(), y[lo:hi].clone())


def selection_spec() -> str:
    """A `module:function` data spec for the selection split (a module registered in sys.modules)."""
    if _DATA_MODULE not in sys.modules:
        mod = types.ModuleType(_DATA_MODULE)
        mod.selection = _selection_dataset
        sys.modules[_DATA_MODULE] = mod
    return f"{_DATA_MODULE}:selection"


def _train_size(spec: str) -> int:
    for part in spec.split(",")[1:]:
        k, _, v = part.partition("=")
        if k.strip() == "train":
            return int(v)
    return 1437


def train_one(arch: str, data: str, epochs: int, seed: int, dest: Path) -> Path:
    """Train one model (SGD, cosine, batch 64) from `seed` and save it as safetensors."""
    torch.manual_seed(seed)
    net = create_model(ModelSpec(arch=arch, kwargs={"num_classes": 10, "in_chans": 1}))
    loader = create_loader(data, split="train", batch_size=64, shuffle=True, seed=seed, model=net)
    train_model(net, loader, config=TrainConfig(epochs=epochs, seed=seed), progress=False)
    save_checkpoint(net.state_dict(), dest, metadata={"arch": arch, "num_classes": 10, "in_chans": 1,
                                                       "seed": seed, "epochs": epochs, "data": data})
    return dest


def _load_net(file: Path) -> torch.nn.Module:
    from mcensemble.checkpoints import load_checkpoint
    return load_checkpoint(file).build_model()


def line_midpoint(report: dict) -> dict:
    pts = report["line"]["points"]
    return min(pts, key=lambda p: abs(p["t"] - 0.5))


def run_pair(arch: str, *, data: str, epochs: int, curve_epochs: int, seed: int, members: int = 4,
             workdir: Path, independent: int | None = None, extra_rows: bool = True) -> dict:
    """Everything for one (architecture, seed): metrics dicts keyed by row name, and loss figures."""
    if _train_size(data) > SELECTION[0]:
        raise SystemExit(f"--data {data!r} uses training examples that overlap the selection split "
                         f"{SELECTION}; use train=N with N <= {SELECTION[0]}")
    t0 = time.perf_counter()
    n_models = independent if independent is not None else 2 + max(1, round(curve_epochs / epochs))
    files = [train_one(arch, data, epochs, 10 * seed + i, workdir / f"{arch}-s{seed}-m{i}.safetensors")
             for i in range(n_models)]
    t_train = time.perf_counter() - t0

    t1 = time.perf_counter()
    res = build_ensemble(files[:2], model=ModelOptions(),
                         data=DataOptions(data=data, val_data=selection_spec(), batch_size=64, seed=seed,
                                          progress=False),
                         opts=BuildOptions(method="bezier", members=members, selection="greedy",
                                           epochs=curve_epochs))
    t_build = time.perf_counter() - t1
    rep = res.report

    test = create_loader("digits", split="val", batch_size=512)
    net = _load_net(files[0])
    # the checkpoints as they are
    singles, labels = [], None
    for f in files:
        lp, labels = predict_log_probs(_load_net(f), test)
        singles.append(lp)
    # curve members (greedy on the selection split): states hold re-estimated BN buffers
    curve_lp = []
    for st in res.member_states:
        net.load_state_dict(st, strict=True)
        curve_lp.append(predict_log_probs(net, test)[0])
    rows = {
        "endpoint A": ensemble_metrics([singles[0]], labels),
        "endpoint B": ensemble_metrics([singles[1]], labels),
        "better endpoint (test NLL)": min((ensemble_metrics([s], labels) for s in singles[:2]), key=lambda m: m.nll),
        f"curve ensemble, K={members}, greedy on selection split": ensemble_metrics(curve_lp, labels),
    }
    train_loader = create_loader(data, split="train", batch_size=64)
    if extra_rows:
        uni = evaluate_candidates(res.paths, net, uniform_points(members, 1), train_loader=train_loader,
                                  val_loader=test, progress=False)
        rows[f"curve ensemble, K={members}, uniform t"] = ensemble_metrics([c.val_log_probs for c in uni], labels)
        g = 11
        grid = evaluate_candidates(res.paths, net, [(0, i / (g - 1), i / (g - 1)) for i in range(g)],
                                   train_loader=train_loader, val_loader=test, progress=False)
        pick = select_greedy_nll(grid, members, labels)
        rows[f"curve ensemble, K={members}, greedy on test split (optimistic)"] = ensemble_metrics(
            [grid[i].val_log_probs for i in pick], labels)
        # one point of the curve: the grid point with the lowest selection-split NLL (build report)
        best = min(rep["path"]["points"], key=lambda p: p["val_nll"])
        one = min(grid, key=lambda c: abs(c.u - best["t"]))
        rows["best single curve point (on selection split)"] = ensemble_metrics([one.val_log_probs], labels)
    rows[f"independent ensemble, {n_models} x {epochs} ep"] = ensemble_metrics(singles, labels)
    rows["A + B ensemble"] = ensemble_metrics(singles[:2], labels)
    mid = line_midpoint(rep)
    return {
        "rows": rows,
        "curve_worst_train_loss": rep["path"]["worst"]["loss"],
        "curve_worst_t": rep["path"]["worst"]["t"],
        "line_mid_train_loss": mid["loss"],
        "line_worst_train_loss": rep["line"]["worst"]["loss"],
        "endpoint_train_loss": max(rep["endpoints"]["A"]["loss"], rep["endpoints"]["B"]["loss"]),
        "members_t": [m["t"] for m in rep["members"]],
        "n_models": n_models,
        "train_s": t_train, "build_s": t_build, "total_s": time.perf_counter() - t0,
    }


def _ms(values: list[float], fmt: str = "{:.3f}") -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def table(results: dict[str, list[dict]], *, data: str, epochs: int, curve_epochs: int, seeds: list[int],
          members: int, wall: float) -> str:
    lines = [
        "## Quality at equal training budget",
        "",
        f"Command: `python tests/benchmarks/bench_quality.py --seeds {len(seeds)} --data '{data}' "
        f"--epochs {epochs} --curve-epochs {curve_epochs} --threads {torch.get_num_threads()}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; wall time {wall:.0f} s.",
        "",
        f"Training data `{data}`; selection (build validation) data: digits train-split examples "
        f"{SELECTION[0]}..{SELECTION[1] - 1} (clean labels, unseen in training); test: the `digits` val split "
        f"(360 examples, used for nothing else). Endpoints: {epochs} epochs each (SGD, cosine, batch 64). Curve: "
        f"Bezier, 1 bend, {curve_epochs} epochs, K = {members}. Budget: 2 x {epochs} + {curve_epochs} epochs for "
        f"the curve ensemble; the independent ensemble is A, B and one more model of {epochs} epochs. "
        f"Mean ± std over seeds {seeds}.",
        "",
        f"Why this setting: {SETTING_NOTE}",
        "",
    ]
    for arch, rs in results.items():
        lines += [f"### {arch}", "", "| model (test split) | accuracy | NLL | ECE |", "|---|---|---|---|"]
        for name in rs[0]["rows"]:
            ms = [r["rows"][name] for r in rs]
            lines.append(f"| {name} | {_ms([m.acc for m in ms])} | {_ms([m.nll for m in ms])} | "
                         f"{_ms([m.ece for m in ms])} |")
        below = sum(r["rows"][f"curve ensemble, K={members}, greedy on selection split"].nll
                    < min(r["rows"]["endpoint A"].nll, r["rows"]["endpoint B"].nll) for r in rs)
        beats_ind = sum(r["rows"][f"curve ensemble, K={members}, greedy on selection split"].nll
                        < r["rows"][f"independent ensemble, {r['n_models']} x {epochs} ep"].nll for r in rs)
        ratio = [r["curve_worst_train_loss"] / r["line_mid_train_loss"] for r in rs]
        lines += [
            "",
            f"Curve ensemble (greedy, selection split) test NLL below both endpoints' in {below}/{len(rs)} seeds; "
            f"below the independent ensemble's in {beats_ind}/{len(rs)}.",
            "",
            "| training loss (train data, BN re-estimated) | value |", "|---|---|",
            f"| endpoints (worse of A, B) | {_ms([r['endpoint_train_loss'] for r in rs], '{:.4f}')} |",
            f"| straight line, midpoint t = 0.5 | {_ms([r['line_mid_train_loss'] for r in rs], '{:.4f}')} |",
            f"| straight line, worst of 11 points | {_ms([r['line_worst_train_loss'] for r in rs], '{:.4f}')} |",
            f"| curve, worst of 11 points | {_ms([r['curve_worst_train_loss'] for r in rs], '{:.4f}')} |",
            f"| curve worst / line midpoint | {_ms(ratio, '{:.3f}')} |",
            "",
            "Members' t (greedy): " + "; ".join(",".join(f"{t:.1f}" for t in r["members_t"]) for r in rs)
            + f". Time per seed: {_ms([r['total_s'] for r in rs], '{:.1f}')} s "
              f"(training {_ms([r['train_s'] for r in rs], '{:.1f}')} s, "
              f"build {_ms([r['build_s'] for r in rs], '{:.1f}')} s).",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--epochs", type=int, default=100, help="epochs per endpoint (E)")
    p.add_argument("--curve-epochs", type=int, default=100, help="curve-fitting epochs (F)")
    p.add_argument("--members", type=int, default=4)
    p.add_argument("--arch", nargs="+", default=["mce_digits_mlp", "mce_digits_cnn"])
    p.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 is fastest)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_flush_denormal(True)
    if a.threads:
        torch.set_num_threads(a.threads)
    seeds = list(range(a.seeds))
    t0 = time.perf_counter()
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as d:
        for arch in a.arch:
            for s in seeds:
                r = run_pair(arch, data=a.data, epochs=a.epochs, curve_epochs=a.curve_epochs, seed=s,
                             members=a.members, workdir=Path(d))
                results.setdefault(arch, []).append(r)
                print(f"[{time.perf_counter() - t0:6.0f}s] {arch} seed {s}: " + ", ".join(
                    f"{k}: {m.nll:.3f}" for k, m in r["rows"].items())
                    + f"; curve worst {r['curve_worst_train_loss']:.4f} vs line mid {r['line_mid_train_loss']:.4f}",
                    file=sys.stderr, flush=True)
    md = table(results, data=a.data, epochs=a.epochs, curve_epochs=a.curve_epochs, seeds=seeds,
               members=a.members, wall=time.perf_counter() - t0)
    print(md)
    if a.out:
        Path(a.out).write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
