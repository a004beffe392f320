"""The embedded default's first step: train small models on the built-in digits, into a
fresh folder (what `mcensemble build` / `scan` with no checkpoints run)."""
from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path as _FsPath

import torch

from . import zoo  # noqa: F401  (registers the mce_* architectures with timm)
from .checkpoints import save_checkpoint
from .data import create_loader, example_input
from .errors import CheckpointError
from .hooks import channel_dropout as _cd
from .models import ModelSpec, create_model
from .train import TrainConfig, train_model

__all__ = ["fresh_run_dir", "train_default_endpoints"]


def fresh_run_dir(root: str | os.PathLike = "mcensemble-runs", *, prefix: str = "run") -> _FsPath:
    """A new, empty folder under `root` named by the time (never reuses an existing one)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    root = _FsPath(root)
    for i in range(1000):
        d = root / (f"{prefix}-{stamp}" + (f"-{i}" if i else ""))
        try:
            d.mkdir(parents=True, exist_ok=False)
            return d
        except FileExistsError:
            continue
    raise CheckpointError(f"could not create a fresh folder under {root}")


def train_default_endpoints(out_dir: str | os.PathLike, *, arch: str = "mce_digits_cnn", n: int = 2,
                            epochs: int = 15, seed: int = 0, data: str = "digits", batch_size: int = 64,
                            channel_dropout: float = 0.0, progress: bool | None = None) -> list[_FsPath]:
    """Train `n` small models on the built-in digits from different seeds; save them as safetensors.

    This is the embedded default's first step: it makes checkpoints like the ones users bring.
    `channel_dropout`: p of `mcensemble.hooks.channel_dropout` during training (what makes
    models dropout-stable).
    """
    spec = ModelSpec(arch=arch, kwargs={"num_classes": 10, "in_chans": 1})
    files = []
    for i in range(n):
        torch.manual_seed(seed + i)
        net = create_model(spec)
        loader = create_loader(data, split="train", batch_size=batch_size, shuffle=True, seed=seed + i, model=net)
        hook = None
        if channel_dropout:
            hook = lambda m: _cd(m, channel_dropout, example_input=example_input(m, data=loader))  # noqa: E731
        train_model(net, loader, config=TrainConfig(epochs=epochs, seed=seed + i), progress=progress, hook=hook)
        dest = _FsPath(out_dir) / f"endpoint{i}.safetensors"
        save_checkpoint(net.state_dict(), dest, metadata={"arch": arch, "num_classes": 10, "in_chans": 1,
                                                           "seed": seed + i, "epochs": epochs, "data": data,
                                                           "channel_dropout": channel_dropout})
        files.append(dest)
    return files
