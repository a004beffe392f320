"""The flatness study behind the default curve fit (docs/benchmarks/quality.md, issue 10).

Trains BN CNN pairs (cached in --cache), fits one curve per variant within the default
budget (20 epochs, batches of 128) and prints, per variant, the worst training loss over
21 points t = 0, 0.05, .., 1 (BatchNorm re-estimated at each on the whole training set)
divided by the mean, and by the max, of the two endpoints' training losses.

Pairs: `seq` (the Sequential BN 1-D CNN of bench_quality.py on 1000 generated sequences),
`dcnn` (`mce_digits_cnn` on the 1437 digits training examples), `dcnn_small` (the same on 300
digits with 20% wrong labels); endpoints: 20 epochs, SGD lr 0.05 cosine, batch 64, seeds 0, 1.

Variants (JSON): `lr` (the bends' own learning rate), `k` (t values per batch, the batch
split in k stratified parts), `anti` (t and 1 - t), `align` (B aligned to A first), `bn`
("frozen": BN layers in eval mode with straight-line statistics), `wd`, `sched` ("cos"),
`bends`, `epochs`, `seed`; `{"library": true}` runs `fit_curve` itself with `CurveConfig()`
(plus the other keys as CurveConfig fields). The variant loop is `CurveFitter`'s step with
several t per batch; with k = 1 it is the library's step.

Run: python tests/benchmarks/quality_flat_variants.py seq '[{"lr": 0.05}, {"align": true, "lr": 0.16}]'
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quality import seq_cnn, seq_tensors  # noqa: E402
from mcensemble.align import align_states  # noqa: E402
from mcensemble.bn import update_bn  # noqa: E402
from mcensemble.data import digits_tensors  # noqa: E402
from mcensemble.paths.curves import BezierPath  # noqa: E402
from mcensemble.paths.curve_base import curve_coefficients  # noqa: E402
from mcensemble.paths.curve_base import CurveConfig
from mcensemble.paths.fit import CurveFitter, fit_curve  # noqa: E402
from mcensemble.paths.fit_run import lr_factor  # noqa: E402
from mcensemble.train import TrainConfig, train_model  # noqa: E402
from mcensemble.zoo import DigitsCNN  # noqa: E402


def pair(name: str, cache: Path):
    if name == "seq":
        x, y = seq_tensors(1000, 1)
        make = seq_cnn
    else:
        x, y = digits_tensors("train")
        make = DigitsCNN
        if name == "dcnn_small":
            x, y = x[:300], y[:300].clone()
            g = torch.Generator().manual_seed(5)
            flip = torch.rand(300, generator=g) < 0.2
            y[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=g)
    f = cache / f"pair_{name}.pt"
    if f.exists():
        a, b = torch.load(f)
    else:
        sds = []
        for s in (0, 1):
            torch.manual_seed(s)
            net = make()
            dl = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(s))
            train_model(net, dl, config=TrainConfig(epochs=20, seed=s), progress=False)
            sds.append({k: v.clone() for k, v in net.state_dict().items()})
        a, b = sds
        torch.save(sds, f)
    return make, a, b, x, y


def train_loss(net, state, x, y) -> float:
    net.load_state_dict(state)
    dl = DataLoader(TensorDataset(x, y), batch_size=256)
    update_bn(net, dl, progress=False)
    net.eval()
    with torch.no_grad():
        return sum(F.cross_entropy(net(xb), yb, reduction="sum").item() for xb, yb in dl) / len(x)


def fit_variant(make, a, b, x, y, *, epochs=20, lr=0.05, bs=128, k=1, anti=False, wd=5e-4, seed=0, sched="half",
                bends=1, bn="train"):
    net = make().train()
    if bn == "frozen":
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    f = CurveFitter(net, a, b, kind="bezier", bends=bends, momentum=0.9, weight_decay=wd)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n = len(x)
    spe = math.ceil(n / bs)
    total, step = epochs * spe, 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for j in range(spe):
            idx = perm[j * bs:(j + 1) * bs]
            u = float(torch.rand((), generator=gen))
            ts = [u, 1 - u] if anti else ([(i + u) / k for i in range(k)] if k > 1 else [u])
            chunks = idx[torch.randperm(len(idx), generator=gen)].chunk(len(ts))
            fr = lr_factor(step, total) if sched == "half" else 0.5 * (1 + math.cos(math.pi * step / total))
            grads = [None] * bends
            for t, ch in zip(ts, chunks):
                coeffs = curve_coefficients("bezier", t, bends)
                _, g = f._gradient(x[ch], y[ch], coeffs)
                for i in range(bends):
                    c = coeffs[i + 1] * len(ch) / len(idx)
                    if grads[i] is None:
                        grads[i] = torch._foreach_mul(g, c)
                    else:
                        torch._foreach_add_(grads[i], g, alpha=c)
            with torch.no_grad():
                for i in range(bends):
                    torch._foreach_mul_(f.momenta[i], 0.9)
                    torch._foreach_add_(f.momenta[i], grads[i])
                    torch._foreach_add_(f.train_bends[i], f.momenta[i], alpha=-lr * fr)
            step += 1
    return BezierPath(a, b, f.bend_state_dicts())


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    cache = Path(os.environ.get("FLAT_CACHE", "/tmp/mce_flat_pairs"))
    cache.mkdir(parents=True, exist_ok=True)
    make, a, b, x, y = pair(argv[0], cache)
    aligned = None
    for v in json.loads(argv[1]):
        t0, v, bb = time.time(), dict(v), b
        desc = dict(v)
        if v.pop("align", False):
            aligned = aligned or align_states(make(), a, b, example_input=x[:4]).state
            bb = aligned
        if v.pop("library", False):
            path = fit_curve(make(), a, bb, DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True),
                             config=CurveConfig(**v), progress=False)
        else:
            path = fit_variant(make, a, bb, x, y, **v)
        net = make()
        ls = [train_loss(net, path.state_at(i / 20), x, y) for i in range(21)]
        print(json.dumps({"pair": argv[0], **desc, "ratio_mean": round(max(ls) / (0.5 * (ls[0] + ls[-1])), 2),
                          "ratio_max": round(max(ls) / max(ls[0], ls[-1]), 2), "worst": round(max(ls), 4),
                          "worst_t": ls.index(max(ls)) / 20, "s": round(time.time() - t0, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
