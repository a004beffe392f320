"""The main jobs as functions: files -> checkpoints -> path -> scan / members -> ensemble.

The CLI is a thin layer over this module; training scripts can call it directly.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path as _FsPath
from typing import Any, Sequence

import torch

from .errors import BadOptionError, CheckpointError

__all__ = ["ModelOptions", "DataOptions", "load_endpoints", "scan_checkpoints", "train_default_endpoints",
           "fresh_run_dir"]

_log = logging.getLogger(__name__)


@dataclass
class ModelOptions:
    """What the user said about the model: a timm `arch` or a `module:function` entry, and overrides."""

    arch: str | None = None
    model: Any = None  # "module:function" string, nn.Module, zero-arg callable or ModelSpec
    num_classes: int | None = None
    in_chans: int | None = None
    ema: bool | None = None


@dataclass
class DataOptions:
    data: str | None = "digits"
    val_data: str | None = None
    batch_size: int = 128
    seed: int = 0
    device: str = "cpu"
    progress: bool | None = None
    extra: dict = field(default_factory=dict)


def _model_arg(opts: ModelOptions):
    """The `model=` argument for load_checkpoint: a ModelSpec built from the flags, or what the user passed."""
    from .models import resolve_model_spec
    if opts.model is not None and not isinstance(opts.model, str):
        return opts.model
    if opts.arch is None and opts.model is None:
        return None
    return resolve_model_spec(arch=opts.arch, model=opts.model, num_classes=opts.num_classes,
                              in_chans=opts.in_chans)


def load_endpoints(files: Sequence[str | os.PathLike], opts: ModelOptions) -> list:
    """Load checkpoints and check they share one architecture (first differing tensor named)."""
    from .checkpoints import check_same_architecture, load_checkpoint
    if len(files) < 2:
        raise BadOptionError(f"need at least two checkpoints, got {len(files)}", option="CHECKPOINTS")
    model = _model_arg(opts)
    cks = [load_checkpoint(f, model=model, ema=opts.ema) for f in files]
    for i, ck in enumerate(cks[1:], start=1):
        check_same_architecture(cks[0].state_dict, ck.state_dict, names=(str(files[0]), str(files[i])))
    return cks


def _loaders(model: torch.nn.Module, d: DataOptions):
    from .data import check_input_fits, create_loader
    if not d.data:
        raise BadOptionError("training data is needed: pass --data SPEC (e.g. --data digits)", option="--data")
    train = create_loader(d.data, split="train", batch_size=d.batch_size, shuffle=False, seed=d.seed, model=model)
    check_input_fits(model, train, spec=d.data)
    val = None
    if d.val_data:
        val = create_loader(d.val_data, split="val", batch_size=d.batch_size, shuffle=False, seed=d.seed, model=model)
        check_input_fits(model, val, spec=d.val_data)
    return train, val


def scan_checkpoints(files: Sequence[str | os.PathLike], *, model: ModelOptions, data: DataOptions,
                     points: int = 11) -> dict[str, Any]:
    """Evaluate the straight line between two checkpoints. Returns the JSON-ready report."""
    from .bn import has_batchnorm
    from .evaluate import scan
    from .paths import LinearPath
    if points < 2:
        raise BadOptionError(f"--points must be at least 2, got {points}", option="--points")
    a, b = load_endpoints(files, model)
    if len(files) != 2:
        raise BadOptionError("scan takes exactly two checkpoints", option="CHECKPOINTS")
    net = a.build_model().to(data.device)
    train, val = _loaders(net, data)
    path = LinearPath(a.state_dict, b.state_dict)
    result = scan(path, net, train, points=points, val_loader=val, bn_loader=train, device=data.device,
                  progress=data.progress)
    report = result.to_dict()
    report["checkpoints"] = [{"file": str(f), **_describe(ck)} for f, ck in zip(files, (a, b))]
    report["batchnorm"] = has_batchnorm(net)
    report["data"] = {"train": data.data, "val": data.val_data}
    return report


def _describe(ck) -> dict[str, Any]:
    md = ck.metadata
    return {k: md.get(k) for k in ("format", "arch", "weights", "sha256") if md.get(k) is not None}


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
                            progress: bool | None = None) -> list[_FsPath]:
    """Train `n` small models on the built-in digits from different seeds; save them as safetensors.

    This is the embedded default's first step: it makes checkpoints like the ones users bring.
    """
    from . import zoo  # noqa: F401  (registers the mce_* architectures with timm)
    from .checkpoints import save_checkpoint
    from .data import create_loader
    from .models import ModelSpec, create_model
    from .train import TrainConfig, train_model
    spec = ModelSpec(arch=arch, kwargs={"num_classes": 10, "in_chans": 1})
    files = []
    for i in range(n):
        torch.manual_seed(seed + i)
        net = create_model(spec)
        loader = create_loader(data, split="train", batch_size=batch_size, shuffle=True, seed=seed + i, model=net)
        train_model(net, loader, config=TrainConfig(epochs=epochs, seed=seed + i), progress=progress)
        dest = _FsPath(out_dir) / f"endpoint{i}.safetensors"
        save_checkpoint(net.state_dict(), dest, metadata={"arch": arch, "num_classes": 10, "in_chans": 1,
                                                           "seed": seed + i, "epochs": epochs, "data": data})
        files.append(dest)
    return files


def describe_checkpoint(file: str | os.PathLike, opts: ModelOptions, *, units: bool = False) -> dict[str, Any]:
    """What `mcensemble inspect` prints: format, architecture, sizes, dtypes, EMA, metadata."""
    from collections import Counter
    from .checkpoints import load_checkpoint
    ck = load_checkpoint(file, model=_model_arg(opts), ema=opts.ema)
    sd, md = ck.state_dict, dict(ck.metadata)
    dtypes = Counter(str(v.dtype).replace("torch.", "") for v in sd.values())
    info: dict[str, Any] = {
        "file": str(file),
        "format": md.pop("format", "?"),
        "arch": md.pop("arch", None) or (opts.arch or opts.model or "unknown (pass --arch or --model)"),
        "tensors": len(sd),
        "parameters": f"{sum(v.numel() for v in sd.values() if v.is_floating_point()):,} floating values",
        "dtypes": ", ".join(f"{k} x{n}" for k, n in sorted(dtypes.items())),
        "weights": md.pop("weights", None) or "plain state dict (no EMA)",
        "sha256": md.pop("sha256", None),
        "metadata": {k: v for k, v in md.items() if v is not None and k != "source"},
    }
    if units:
        from .units import build_unit_graph
        from .data import example_input
        net = ck.build_model()
        info["units"] = build_unit_graph(net, example_input(net)).describe()
    return info
