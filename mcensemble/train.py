"""A plain supervised training loop: the embedded default, tests and benchmarks use it
to make endpoints. mcensemble does not need it for users' own checkpoints."""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ._modes import keeps_process_state
from .bn import labelled_batch
from .errors import BadOptionError

__all__ = ["TrainConfig", "train_model"]


@dataclass
class TrainConfig:
    """SGD with momentum, cosine learning-rate decay over all steps."""

    epochs: int = 20
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0


@keeps_process_state
def train_model(model: nn.Module, loader: DataLoader, *, config: TrainConfig = TrainConfig(),
                device: str | torch.device = "cpu", progress: bool | None = None,
                hook: Callable[[nn.Module], object] | None = None) -> nn.Module:
    """Train `model` in place with cross entropy; returns it in eval mode.

    `hook(model)` is called once before training and may return a handle with
    `.remove()` (e.g. `mcensemble.hooks.channel_dropout`), removed at the end.
    """
    if config.epochs < 1:
        raise BadOptionError(f"epochs must be >= 1, got {config.epochs}", option="epochs")
    torch.set_flush_denormal(True)
    torch.manual_seed(config.seed)
    model.to(device).train()
    handle = hook(model) if hook is not None else None
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay, nesterov=True)
    total = config.epochs * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    bar = tqdm(total=total, desc="train", file=sys.stderr, disable=None if progress is None else not progress,
               leave=False)
    try:
        for _ in range(config.epochs):
            for batch in loader:
                x, y = labelled_batch(batch, what="training")
                loss = F.cross_entropy(model(x.to(device)), y.to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update()
    finally:
        bar.close()
        if handle is not None:
            handle.remove()
    return model.eval()
