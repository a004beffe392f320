"""Benchmark: the short path (Theorem 2) on layered, residual and squeeze-excite networks.

Pairs (seeds 0 and 1, the digits training split, SGD lr 0.1, cosine, batch 64), trained
with and without `mcensemble.hooks.channel_dropout` (one mask per group and forward: a
residual stage's stream shares one mask, internal and squeeze-excite units per block):
- MLP `mce_digits_mlp` (2 x 128, nn.Dropout 0.5) and BN-CNN `mce_digits_cnn` (32-64), 8x8;
- timm `test_resnet` (basic + bottleneck blocks, deep stem), `resnet10t` at widths
  16-32-48-64 (deep tiered stem), `test_efficientnet` (squeeze-excite, inverted residuals,
  SiLU) and `mobilenetv3_small_050` (hard-swish, hard-sigmoid gates), 16x16.

For each pair, on the training data: eps of the chosen halves against a random half's,
each segment's bound (exact / convex from the weights; measured = the largest loss at 17
states of the path, NOT a proof), the dense worst (every segment at `--per-segment`
points) against the straight line's worst (11 points) and a one-bend Bezier curve's
(`--bezier-epochs` epochs, 11 points), both with BatchNorm re-estimated at interior points;
the build time in evaluation passes over the training data; the path file against one
model; and the packed pair on the validation split.

Run:  python tests/benchmarks/bench_short_path.py [--out FILE.md] [--threads 1] [--quick]
      [--only NAME-PREFIX ...] [--plot FILE.png]
The README's picture: --only "test_resnet, channel" --plot docs/short-path.png
Not collected by pytest (file name does not start with test_).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
from run_all import emit  # tests/benchmarks/run_all.py, beside this script

SEGS = ("1 meas.", "2 exact", "3 convex", "4 exact", "5 meas.")


def _make(arch, kwargs):
    import timm

    from mcensemble import zoo  # noqa: F401
    return timm.create_model(arch, num_classes=10, in_chans=1, **kwargs)


def train_pair(arch, kwargs, epochs, channel_p, data, size):
    from mcensemble.data import create_loader
    from mcensemble.hooks import channel_dropout
    from mcensemble.train import TrainConfig, train_model
    states = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = _make(arch, kwargs)
        ld = create_loader(data, batch_size=64, shuffle=True, seed=seed)
        hook = None
        if channel_p:
            def hook(m):
                return channel_dropout(m, channel_p, example_input=torch.zeros(2, 1, size, size))
        train_model(net, ld, config=TrainConfig(epochs=epochs, lr=0.1, seed=seed), hook=hook, progress=False)
        states.append({k: v.detach().clone() for k, v in net.state_dict().items()})
    return net.eval(), states[0], states[1]


def loss_of(model, state, ld, bn_loader=None):
    from mcensemble.bn import update_bn
    from mcensemble.evaluate import evaluate
    model.load_state_dict(state)
    if bn_loader is not None:
        update_bn(model, bn_loader)
    return evaluate(model, ld).loss


def curve_worst(model, path, train, bn) -> float:
    return max(loss_of(model, path.state_at(i / 10), train, bn if 0 < i < 10 else None) for i in range(11))


def run_pair(name, arch, kwargs, epochs, channel_p, *, data, size, per_segment, bezier_epochs):
    from mcensemble.bn import has_batchnorm
    from mcensemble.data import create_loader
    from mcensemble.evaluate import evaluate
    from mcensemble.pack import pack_report
    from mcensemble.paths import LinearPath
    from mcensemble.paths.curve_base import CurveConfig
    from mcensemble.paths.fit import fit_curve
    from mcensemble.paths.short import build_short_path
    model, a, b = train_pair(arch, kwargs, epochs, channel_p, data, size)
    train = create_loader(data, batch_size=256)
    val = create_loader(data, split="val", batch_size=360)
    model.load_state_dict(a)
    t = time.perf_counter()
    evaluate(model, train)
    t_eval = time.perf_counter() - t
    t = time.perf_counter()
    path = build_short_path(model, a, b, train)
    t_build = time.perf_counter() - t
    cert = path.certificate
    dense, curve = [], []
    for i, seg in enumerate(cert["segments"]):
        if seg["kind"] == "measured":  # the 17 measured states are the dense check there
            dense.append(seg["bound"])
            curve += [tuple(p) for p in seg["points"]]
            continue
        ts = [(i + f / (per_segment - 1)) / 5 for f in range(per_segment)]
        pts = [(t, loss_of(model, path.state_at(t), train)) for t in ts]
        dense.append(max(p[1] for p in pts))
        curve += pts
    bn = train if has_batchnorm(model) else None
    line = LinearPath(a, b)
    line_pts = [(i / 10, loss_of(model, line.state_at(i / 10), train, bn if 0 < i < 10 else None))
                for i in range(11)]
    line_worst = max(p[1] for p in line_pts)
    bez_worst = None
    if bezier_epochs:
        fit_ld = create_loader(data, batch_size=64, shuffle=True, seed=0)
        bez = fit_curve(model, a, b, fit_ld, config=CurveConfig(epochs=bezier_epochs), progress=False)
        bez_worst = curve_worst(model, bez, train, bn)
    with tempfile.TemporaryDirectory() as d:
        f = os.path.join(d, "p.safetensors")
        path.save(f)
        file_bytes = os.path.getsize(f)
    model_bytes = sum(v.numel() * v.element_size() for v in a.values())
    packed = _packed(path)
    rep = pack_report(model, packed, a, b, val)
    return {"name": name, "cert": cert, "dense": dense, "line": line_worst, "bezier": bez_worst,
            "t_build": t_build, "t_eval": t_eval, "passes": path.metadata["evaluation_passes"],
            "file_ratio": file_bytes / model_bytes, "file_mb": file_bytes / 2**20, "rep": rep,
            "search": path.metadata["search"], "curve": sorted(set(curve)), "line_pts": line_pts}


def plot(row, dest) -> None:
    """Loss along the short path (dense; measured segments shaded) against the straight line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(8, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, seg in enumerate(row["cert"]["segments"]):
        color = {"measured": "0.85", "exact": "#d8ecd8", "convex": "#d8e4f4"}[seg["kind"]]
        ax.axvspan(seg["t0"], seg["t1"], color=color, lw=0)
        ax.text((seg["t0"] + seg["t1"]) / 2, 0.98, f"{i + 1}: {seg['kind']}", ha="center", va="top",
                transform=ax.get_xaxis_transform(), fontsize=8)
    t, loss = zip(*row["curve"])
    ax.plot(t, loss, ".-", color="C0", label="short path (stored BN statistics)")
    t, loss = zip(*row["line_pts"])
    ax.plot(t, loss, "o-", color="C3", label="straight line (BN re-estimated)")
    ax.set_xlabel("t")
    ax.set_ylabel("train loss")
    ax.set_title(f"{row['name']}: the short path's five segments")
    ax.legend(loc="center left", fontsize=8)
    fig.savefig(dest)


def _packed(path):
    """The midpoint of segment 3 (what `pack_pair(method="short")` returns for these halves)."""
    vs = path.vertex_states()
    from mcensemble.paths.dropout import mix_states
    return mix_states(vs[2], vs[3], 0.5)


def table(rows, per_segment) -> str:
    out = ["## Short path (training data, loss = mean cross entropy)", "",
           "| pair | L(A) | L(B) | eps (random half) | " + " | ".join(f"seg {s}" for s in SEGS) +
           " | max_loss | dense worst (proven segs) | straight line worst | Bezier worst | "
           "build s (x eval pass) | passes | file / model |",
           "|---" * 17 + "|"]
    for r in rows:
        c = r["cert"]
        bounds = " | ".join(f"{s['bound']:.4f}" for s in c["segments"])
        proven = max(d for d, s in zip(r["dense"], c["segments"]) if s["proven"])
        bez = "-" if r["bezier"] is None else f"{r['bezier']:.4f}"
        out.append(f"| {r['name']} | {c['loss_a']:.4f} | {c['loss_b']:.4f} | {c['eps']:.4f} "
                   f"({c['eps_random']:.4f}) | {bounds} | {c['max_loss']:.4f} | {proven:.4f} | "
                   f"{r['line']:.4f} | {bez} | {r['t_build']:.1f} ({r['t_build'] / r['t_eval']:.0f}x) | "
                   f"{r['passes']} | {r['file_ratio']:.2f}x |")
    out += ["", "Measured segments (1 and 5): the bound is the largest loss at 17 states of the path "
            "(`state_at(t)`, stored BatchNorm statistics); it is a measurement, not a proof. Largest "
            "slope |dL/ds| between neighbouring points (A side; B side):", ""]
    for r in rows:
        m = [s for s in r["cert"]["segments"] if s["kind"] == "measured"]
        out.append(f"- {r['name']}: {m[0]['max_slope']:.3f}; {m[1]['max_slope']:.3f}  (search: start "
                   f"{r['search'].get('start', '-')}, objective {r['search'].get('objective_start', 0):.4f} -> "
                   f"{r['search'].get('objective_end', 0):.4f})")
    out += ["", "## Packed pair (midpoint of segment 3; validation split, 360 examples)", "",
            "| pair | A acc / NLL | B acc / NLL | ensemble(A, B) acc / NLL | packed acc / NLL |",
            "|---|---|---|---|---|"]
    for r in rows:
        rep = r["rep"]
        cell = lambda k: f"{rep[k]['acc']:.4f} / {rep[k]['nll']:.4f}"  # noqa: E731
        out.append(f"| {r['name']} | {cell('A')} | {cell('B')} | {cell('ensemble')} | {cell('packed')} |")
    out += ["", f"Dense worst: exact and convex segments at {per_segment} points each (their bound is "
            "proven from the weights: the dense worst never exceeds it); the measured segments' 17 "
            "points are their own dense check. Straight line and Bezier: BatchNorm re-estimated at "
            "interior points. Build time includes the joint half search (4 swap trials per group), "
            "BatchNorm re-estimation of both dropout networks, the random-half baseline, the checks "
            "of segments 2-4 and the 2 x 15 interior measured points."]
    return "\n".join(out) + "\n"


PAIRS = [
    # name, arch, kwargs, epochs, channel p, data, size
    ("MLP 2x128, dropout 0.5", "mce_digits_mlp", {"drop_rate": 0.5}, 30, 0.0, "digits", 8),
    ("BN-CNN 32-64, channel dropout 0.3", "mce_digits_cnn", {}, 20, 0.3, "digits", 8),
    ("test_resnet, plain", "test_resnet", {}, 15, 0.0, "digits,size=16", 16),
    ("test_resnet, channel dropout 0.2", "test_resnet", {}, 15, 0.2, "digits,size=16", 16),
    ("resnet10t 16-64, channel dropout 0.2", "resnet10t",
     {"channels": (16, 32, 48, 64), "stem_width": 16}, 15, 0.2, "digits,size=16", 16),
    ("test_efficientnet, plain", "test_efficientnet", {}, 15, 0.0, "digits,size=16", 16),
    ("test_efficientnet, channel dropout 0.2", "test_efficientnet", {}, 15, 0.2, "digits,size=16", 16),
    ("mobilenetv3_small_050, channel dropout 0.2", "mobilenetv3_small_050", {}, 8, 0.2, "digits,size=16", 16),
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the markdown table here too")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--per-segment", type=int, default=5)
    p.add_argument("--bezier-epochs", type=int, default=3, help="0: no Bezier column")
    p.add_argument("--quick", action="store_true", help="the first three pairs only")
    p.add_argument("--only", nargs="*", help="pairs whose name starts with one of these")
    p.add_argument("--plot", help="PNG of the first timm ResNet pair run (the README's picture)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    rows = []
    pairs = PAIRS[:3] if args.quick else PAIRS
    if args.only:
        pairs = [p for p in pairs if any(p[0].startswith(o) for o in args.only)]
    for name, arch, kw, epochs, cp, data, size in pairs:
        t = time.perf_counter()
        bez = args.bezier_epochs if "mobilenet" not in arch else 0
        rows.append(run_pair(name, arch, kw, epochs, cp, data=data, size=size, per_segment=args.per_segment,
                             bezier_epochs=bez))
        print(f"{name}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    if args.plot:
        resnets = [r for r in rows if "resnet" in r["name"]]
        if resnets:
            plot(resnets[-1], args.plot)
    text = table(rows, args.per_segment)
    text += f"\nCPU, {args.threads} thread(s), torch {torch.__version__}.\n"
    emit(text, args.out)


if __name__ == "__main__":
    main()
