"""Benchmark: the unit graph over timm's families, and what alignment buys on ViTs.

1. Pass table over small real architectures (pretrained=False, 224x224, eval mode): does
   `build_unit_graph` place every op (time), does a random permutation of every unit group
   leave the logits unchanged (relative difference of the logits of 2 random images,
   every floating state tensor randomised first so that a missed axis shows), and does
   weight matching bring a randomly permuted copy back bit for bit (sweeps, time).
2. The payoff on trained pairs (two seeds, same recipe) of a small timm ViT (test_vit
   narrowed to 4 blocks of width 48 with 3 heads, 28x28, patch 7) and a hybrid
   (test_coatnet at 32x32, MNIST padded) on 2,000 real MNIST
   digits (tests/benchmarks/_mnist.py; validation: 1,000 others; AdamW, as ViTs are
   trained): the straight-line
   barrier `max_t L(t) - ((1-t) L(A) + t L(B))` (11 points, BatchNorm re-estimated) and the
   same barrier along the default curve (one Bezier bend, `CurveConfig` defaults but for
   the epochs) fitted at the same small budgets (2 and 10 epochs), between A and B as they
   are and between A and B aligned by weight matching.

Run:  python tests/benchmarks/bench_zoo.py [--out FILE.md] [--threads 1] [--only table|payoff]
      [--pairs test_vit test_coatnet] [--curve-epochs 2 10]
Not collected by pytest (file name does not start with test_).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/helpers.py
from helpers import perturbed_state  # noqa: E402
from run_all import emit  # tests/benchmarks/run_all.py, beside this script

REAL = ["resnet18", "efficientnet_b0", "mobilenetv3_small_100", "convnext_atto", "regnetx_002",
        "densenet121", "vit_tiny_patch16_224", "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224",
        "swin_tiny_patch4_window7_224", "mixer_s16_224"]
#: further families, beyond the issue's list (what places and what does not yet)
MORE = ["pvt_v2_b0", "crossvit_tiny_240", "levit_128s", "poolformer_s12", "caformer_s18",
        "beit_base_patch16_224", "eva02_tiny_patch14_224", "mobilevit_xs", "edgenext_xx_small"]


def randomised(model: torch.nn.Module, seed: int) -> dict:
    return perturbed_state(model, seed, 0.02)


def pass_row(name: str) -> dict:
    import timm

    from mcensemble.align import weight_matching
    from mcensemble.units import build_unit_graph, permute_state_dict
    row = {"name": name}
    model = timm.create_model(name, pretrained=False).eval()
    row["params"] = sum(p.numel() for p in model.parameters())
    x = torch.randn(2, *model.pretrained_cfg["input_size"], generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    try:
        graph = build_unit_graph(model, x[:1])
    except Exception as e:  # noqa: BLE001 (the table reports whatever went wrong)
        row["error"] = f"{type(e).__name__}: {e}"
        return row
    row["t_graph"] = time.perf_counter() - t0
    row["groups"] = len(graph.groups)
    row["units"] = sum(g.size for g in graph.groups)
    state = randomised(model, 1)
    gen = torch.Generator().manual_seed(2)
    q = {g.name: torch.randperm(g.size, generator=gen) for g in graph.groups}
    permuted = permute_state_dict(state, graph, q)
    with torch.no_grad():  # in float64: random states blow activations up, float32 rounding would show
        d64 = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
        p64 = {k: v.double() if v.is_floating_point() else v for k, v in permuted.items()}
        outs = []
        for st in (d64, p64):  # a fresh model each (LeViT caches its attention biases in eval)
            m64 = timm.create_model(name, pretrained=False).eval().double()
            outs.append(torch.func.functional_call(m64, st, (x.double(),)))
        ref, got = outs
        del m64, d64, p64
        fwd = []
        for _ in range(3):
            t0 = time.perf_counter()
            torch.func.functional_call(model, state, (x,))
            fwd.append(time.perf_counter() - t0)
    row["t_fwd"] = sorted(fwd)[1]
    row["rel"] = float((ref - got).norm() / ref.norm())
    t0 = time.perf_counter()
    res = weight_matching(graph, state, permuted, max_iter=20)
    row["t_match"] = time.perf_counter() - t0
    row["sweeps"] = res.iterations
    row["recovered"] = all(torch.equal(res.state[k], v) for k, v in state.items())
    print(row, file=sys.stderr, flush=True)
    return row


def pass_table(rows: list[dict]) -> str:
    lines = [("Pass table (pretrained=False, 224x224, eval mode; every floating state tensor "
              "randomised; logits of 2 random images in float64, exact = relative difference "
              "below 1e-9; times against one float32 forward pass of those 2 images, same run)"), "",
             ("| architecture | params | graph builds | groups | permutation exact (rel. diff) "
              "| permuted copy recovered | graph time / forward | matching time / forward (sweeps) |"),
             "|---|---:|---|---:|---|---|---:|---:|"]
    for r in rows:
        if "error" in r:  # the op and why, without the hint to pass the groups by hand
            why = r["error"].split("cannot place ")[-1].split("; pass the unit groups")[0]
            lines.append(f"| {r['name']} | {r['params'] / 1e6:.1f}M | no: {why} | | | | | |")
            continue
        lines.append(
            f"| {r['name']} | {r['params'] / 1e6:.1f}M | yes | {r['groups']} | "
            f"{'yes' if r['rel'] < 1e-9 else 'NO'} ({r['rel']:.0e}) | "
            f"{'yes' if r['recovered'] else 'NO'} | {r['t_graph'] / r['t_fwd']:.1f}x | "
            f"{r['t_match'] / r['t_fwd']:.0f}x ({r['sweeps']}) |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- payoff
PAIRS = {  # label: (arch, model kwargs, pad, training epochs)
    "timm test_vit, 4 blocks, width 48, 3 heads (MNIST 28x28, patch 7)": (
        "test_vit", {"img_size": 28, "patch_size": 7, "embed_dim": 48, "depth": 4, "num_heads": 3}, 0, 15),
    "timm test_coatnet (MNIST padded to 32x32)": ("test_coatnet", {"img_size": 32}, 2, 6),
}


def train_adamw(model: torch.nn.Module, loader, epochs: int) -> None:
    """AdamW (lr 2e-3, weight decay 0.05, cosine decay): how ViTs are trained."""
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * len(loader))
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
    model.eval()


def mnist(pad: int):
    from _mnist import mnist_datasets
    from torch.utils.data import TensorDataset
    parts = mnist_datasets((2000, 1000), seed=0)
    out = []
    for p in parts:
        x, y = p.tensors
        out.append(TensorDataset(F.pad(x, (pad,) * 4) if pad else x, y))
    return out


def payoff_row(label: str, arch: str, kwargs: dict, pad: int, epochs: int, *,
               curve_epochs: list[int]) -> dict:
    import timm
    from torch.utils.data import DataLoader

    from mcensemble.align import align_states
    from mcensemble.evaluate import scan
    from mcensemble.paths.curve_base import CurveConfig
    from mcensemble.paths.fit import fit_curve
    from mcensemble.paths.linear import LinearPath

    def make():
        return timm.create_model(arch, num_classes=10, in_chans=1, **kwargs)

    train_set, val_set = mnist(pad)
    train = DataLoader(train_set, batch_size=256)
    val = DataLoader(val_set, batch_size=256)
    states = []
    t0 = time.perf_counter()
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = make()
        loader = DataLoader(train_set, batch_size=64, shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
        train_adamw(m, loader, epochs)
        states.append({k: v.clone() for k, v in m.state_dict().items()})
    t_train = time.perf_counter() - t0
    a, b = states
    res = align_states(make(), a, b, example_input=train_set.tensors[0][:4], seed=0)
    fit_loader = DataLoader(train_set, batch_size=64, shuffle=True)
    row = {"label": label, "groups": len(res.graph.groups), "moved": res.moved, "t_train": t_train,
           "epochs": epochs}
    for key, end in (("plain", b), ("aligned", res.state)):
        line = scan(LinearPath(a, end), make(), train, points=11, bn_loader=train, val_loader=val, progress=False)
        row[key] = {"line": (line.barrier, line.val_barrier),
                    "ends": (line.points[0]["loss"], line.points[-1]["loss"]),
                    "acc": (line.points[0].get("val_acc"), line.points[-1].get("val_acc"))}
        for ce in curve_epochs:
            curve = fit_curve(make(), a, end, fit_loader, config=CurveConfig(epochs=ce, seed=0),
                              progress=False)
            cur = scan(curve, make(), train, points=11, bn_loader=train, val_loader=val, progress=False)
            row[key][f"curve{ce}"] = (cur.barrier, cur.val_barrier)
    print(row, file=sys.stderr, flush=True)
    return row


def payoff_table(rows: list[dict], curve_epochs: list[int]) -> str:
    heads = "".join(f" curve {ce} ep: plain | curve {ce} ep: aligned |" for ce in curve_epochs)
    lines = [("Barriers `max_t L(t) - ((1-t) L(A) + t L(B))` on trained pairs (train loss / val "
              "loss, 11 points, BatchNorm re-estimated; endpoints trained with AdamW on 2,000 MNIST "
              "digits; curve: one Bezier bend fitted for the given epochs, otherwise the "
              "`CurveConfig` defaults)"), "",
             "| pair | epochs | groups | units moved | L(A), L(B) | val acc A, B | line: plain "
             "| line: aligned |" + heads,
             "|---|---:|---:|---:|---|---|---|---|" + "---|---|" * len(curve_epochs)]
    def f(p):
        return f"{p[0]:.3f} / {p[1]:.3f}"
    for r in rows:
        p, al = r["plain"], r["aligned"]
        lines.append(f"| {r['label']} | {r['epochs']} | {r['groups']} | {r['moved']:.0%} | "
                     f"{p['ends'][0]:.3f}, {p['ends'][1]:.3f} | {p['acc'][0]:.1%}, {p['acc'][1]:.1%} | "
                     f"{f(p['line'])} | {f(al['line'])} |" +
                     "".join(f" {f(p[f'curve{ce}'])} | {f(al[f'curve{ce}'])} |" for ce in curve_epochs))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the markdown tables to this file")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--only", choices=("table", "payoff"))
    ap.add_argument("--pairs", nargs="*", help="payoff pairs to run (arch names, e.g. test_vit)")
    ap.add_argument("--curve-epochs", type=int, nargs="+", default=[2, 10],
                    help="curve-fit budgets in epochs (default 2 10)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    parts = []
    if args.only in (None, "table"):
        parts.append(pass_table([pass_row(n) for n in REAL + MORE]))
    if args.only in (None, "payoff"):
        rows = [payoff_row(k, *v, curve_epochs=args.curve_epochs) for k, v in PAIRS.items()
                if not args.pairs or v[0] in args.pairs]
        parts.append(payoff_table(rows, args.curve_epochs))
    text = "\n".join(parts)
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
