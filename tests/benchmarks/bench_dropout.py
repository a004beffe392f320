"""Benchmark: dropout stability, the dropout-stable path and the packed pair on digits.

Pairs (seeds 0 and 1, the full digits training split, SGD lr 0.1, cosine, batch 64):
- MLP: `mce_digits_mlp` (2 x 128 ReLU) trained with nn.Dropout p=0.5, 30 epochs;
- CNN: `mce_digits_cnn` (32-64 channels, BatchNorm), 20 epochs, trained without and with
  `mcensemble.hooks.channel_dropout` (p=0.3);
- timm EfficientNet: timm's `EfficientNet` class built by its block builder (stem 8, a
  depthwise-separable block to 16, an inverted-residual block to 24, head 32; no
  squeeze-excite, no skip connections), on 16x16 digits, channel dropout p=0.25, 20 epochs.

For each pair: eps (max over A and B), the path's certificate (largest vertex loss) and
the worst loss of a dense check (`--per-segment` points on every segment) against the
straight line's worst loss (11 points, BatchNorm re-estimated at each), all on the training
data; construction time against one evaluation pass over the training data; path file
size against one model's; and the packed pair against A, B and their 2-member ensemble on
the validation split (accuracy, NLL, forward time for the whole split).

Run:  python tests/benchmarks/bench_dropout.py [--out FILE.md] [--threads 1]
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


def timm_efficientnet(**_):
    """timm's EfficientNet class without squeeze-excite or skip connections (a layered net)."""
    from timm.models._efficientnet_builder import decode_arch_def
    from timm.models.efficientnet import EfficientNet
    arch = [["ds_r1_k3_s1_c16"], ["ir_r1_k3_s2_e2_c24"]]
    return EfficientNet(block_args=decode_arch_def(arch), num_classes=10, in_chans=1, stem_size=8,
                        num_features=32)


def _make(arch, kwargs):
    if callable(arch):
        return arch(**kwargs)
    import timm
    from mcensemble import zoo  # noqa: F401
    return timm.create_model(arch, num_classes=10, in_chans=1, **kwargs)


def train_pair(arch, kwargs, epochs, channel_p, data="digits", size=8):
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
        train_model(net, ld, config=TrainConfig(epochs=epochs, lr=0.1, seed=seed), hook=hook,
                    progress=False)
        states.append({k: v.detach().clone() for k, v in net.state_dict().items()})
    return net.eval(), states[0], states[1]


def loss_of(model, state, ld, bn_loader=None):
    from mcensemble.bn import update_bn
    from mcensemble.evaluate import evaluate
    model.load_state_dict(state)
    if bn_loader is not None:
        update_bn(model, bn_loader)
    return evaluate(model, ld).loss


def forward_time(model, states, x, repeats=30):
    """Best time of one forward pass of every state (one model copy per state)."""
    import copy
    nets = []
    for sd in states:
        net = copy.deepcopy(model).eval()
        net.load_state_dict(sd)
        nets.append(net)
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            t = time.perf_counter()
            for net in nets:
                net(x)
            best = min(best, time.perf_counter() - t)
    return best


def run_pair(name, arch, kwargs, epochs, channel_p, per_segment, data="digits", size=8):
    from mcensemble.bn import has_batchnorm
    from mcensemble.data import create_loader
    from mcensemble.evaluate import evaluate
    from mcensemble.pack import pack_pair, pack_report
    from mcensemble.paths import LinearPath
    from mcensemble.paths.dropout import build_dropout_path
    model, a, b = train_pair(arch, kwargs, epochs, channel_p, data, size)
    train = create_loader(data, batch_size=256)
    val = create_loader(data, split="val", batch_size=360)
    model.load_state_dict(a)
    t = time.perf_counter()
    evaluate(model, train)
    t_eval = time.perf_counter() - t
    t = time.perf_counter()
    path = build_dropout_path(model, a, b, train)
    t_build = time.perf_counter() - t
    cert = path.certificate
    n = path.n_vertices
    ts = sorted({min(1.0, (i + f / (per_segment - 1)) / (n - 1))
                 for i in range(n - 1) for f in range(per_segment)})
    dense = max(loss_of(model, path.state_at(t), train) for t in ts)
    bn = train if has_batchnorm(model) else None
    line = LinearPath(a, b)
    line_losses = [loss_of(model, line.state_at(i / 10), train, bn if 0 < i < 10 else None)
                   for i in range(11)]
    with tempfile.TemporaryDirectory() as d:
        f = os.path.join(d, "p.safetensors")
        path.save(f)
        file_bytes = os.path.getsize(f)
    model_bytes = sum(v.numel() * v.element_size() for v in a.values())
    packed = pack_pair(model, a, b, train).state
    rep = pack_report(model, packed, a, b, val)
    x = next(iter(val))[0]
    t_one = forward_time(model, [packed], x)
    t_two = forward_time(model, [a, b], x)
    return {
        "name": name, "eps": cert["eps"], "loss_a": cert["loss_a"], "loss_b": cert["loss_b"],
        "cert": cert["max_loss"], "dense": dense, "line_worst": max(line_losses),
        "line_mid": line_losses[5], "segments": n - 1, "t_build": t_build, "t_eval": t_eval,
        "file_mb": file_bytes / 2**20, "model_mb": model_bytes / 2**20, "rep": rep,
        "t_one": t_one, "t_two": t_two,
        "stab": cert["stability"],
    }


def table(rows) -> str:
    out = ["## Dropout-stable path (training data, loss = mean cross entropy)", "",
           "| pair | L(A) | L(B) | eps | path certificate (max vertex) | path dense worst | "
           "straight line worst (midpoint) | segments | build s | build / eval pass | "
           "file MiB | file / model | file / (vertices x model) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(
            f"| {r['name']} | {r['loss_a']:.4f} | {r['loss_b']:.4f} | {r['eps']:.4f} | "
            f"{r['cert']:.4f} | {r['dense']:.4f} | {r['line_worst']:.4f} ({r['line_mid']:.4f}) | "
            f"{r['segments']} | {r['t_build']:.2f} | {r['t_build'] / r['t_eval']:.0f}x | "
            f"{r['file_mb']:.3f} | {r['file_mb'] / r['model_mb']:.1f}x | "
            f"{r['file_mb'] / r['model_mb'] / (r['segments'] + 1):.2f} |")
    out += ["", "Per-depth loss increase of D_k (A; B):", ""]
    for r in rows:
        inc = "; ".join(", ".join(f"k={d['depth']}: {d['increase']:+.4f}" for d in s["depths"])
                        for s in r["stab"])
        out.append(f"- {r['name']}: {inc}")
    out += ["", "## Packed pair (validation split, 360 examples)", "",
            "| pair | A acc / NLL | B acc / NLL | ensemble(A, B) acc / NLL | packed acc / NLL | "
            "packed forward ms | 2 forwards ms |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        rep = r["rep"]
        cell = lambda k: f"{rep[k]['acc']:.4f} / {rep[k]['nll']:.4f}"  # noqa: E731
        out.append(f"| {r['name']} | {cell('A')} | {cell('B')} | {cell('ensemble')} | "
                   f"{cell('packed')} | {1e3 * r['t_one']:.2f} | {1e3 * r['t_two']:.2f} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the markdown table here too")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--per-segment", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    pairs = [
        ("MLP 2x128, dropout 0.5", "mce_digits_mlp", {"drop_rate": 0.5}, 30, 0.0),
        ("BN-CNN 32-64, plain", "mce_digits_cnn", {}, 20, 0.0),
        ("BN-CNN 32-64, channel dropout 0.3", "mce_digits_cnn", {}, 20, 0.3),
        ("timm EfficientNet (16x16), channel dropout 0.25", timm_efficientnet, {}, 20, 0.25, "digits,size=16", 16),
    ]
    rows = []
    for pair in pairs:
        t = time.perf_counter()
        rows.append(run_pair(*pair[:5], per_segment=args.per_segment, data=pair[5] if len(pair) > 5 else "digits",
                             size=pair[6] if len(pair) > 6 else 8))
        print(f"{pair[0]}: {time.perf_counter() - t:.1f} s", file=sys.stderr)
    text = table(rows)
    text += (f"\nCPU, {args.threads} thread(s), torch {torch.__version__}. Straight line: BN "
             "re-estimated at interior points. Build time includes measuring the stability of "
             "both endpoints (kept-half search) and evaluating every vertex.\n")
    emit(text, args.out)


if __name__ == "__main__":
    main()
