"""Data specs -> DataLoaders.

A data SPEC is one of:

- ``digits`` or ``digits,key=value,...``: scikit-learn's bundled 8x8 handwritten digits
  (offline). x is float32 ``[N, 1, 8, 8]`` in [0, 1] (pixel / 16), y int64. Fixed split:
  ``torch.randperm(1797)`` drawn from a generator seeded 0; the first 1437 indices are
  ``train``, the last 360 ``val``. Keys:
  ``size=S`` (bilinear resize to S x S), ``chans=C`` (repeat the channel C times),
  ``train=N`` (only the first N training examples), ``noise=P`` (replace a fraction P of
  the training labels by a different class, chosen at random), ``seed=K`` (the seed of
  that noise, default 0; the data set never depends on `create_loader`'s seed).
- a folder path in ImageFolder layout (``root/<class>/<image>``), read with
  ``timm.data.create_dataset("", root=path)`` and, when a model is given, the model's eval
  transforms (``timm.data.resolve_data_config`` + ``create_transform``); else ``ToTensor``.
- ``module:function``: the function is imported and called with no arguments; it returns a
  ``Dataset`` (wrapped in a DataLoader here) or a ``DataLoader`` (used as is).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import (BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler, SequentialSampler,
                              TensorDataset)

from . import distributed as dist_
from ._modes import modes_kept
from .bn import batch_input, split_batch
from .errors import BadOptionError, DataSpecError
from .models import _import_callable

__all__ = ["loader_settings", "DIGITS_TRAIN_SIZE", "DIGITS_VAL_SIZE", "digits_tensors", "create_dataset", "create_loader",
           "check_input_fits", "spec_name", "example_input", "folder_classes", "check_same_classes", "image_transform",
           "epoch_batches", "epoch_seed"]

logger = logging.getLogger(__name__)

# (num_workers, pin_memory) of the loaders `create_loader` makes: the CLI's --workers / --device
_LOADER_SETTINGS: contextvars.ContextVar[tuple[int, bool]] = contextvars.ContextVar(
    "mcensemble_loader_settings", default=(0, False))


@contextlib.contextmanager
def loader_settings(*, workers: int = 0, pin_memory: bool = False) -> Iterator[None]:
    """Inside the block, `create_loader` gives loaders `workers` worker processes and pins
    memory when `pin_memory` (and CUDA is available). `BadOptionError` for workers < 0."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise BadOptionError(f"`workers` must be an integer >= 0, got {workers!r}", option="workers")
    token = _LOADER_SETTINGS.set((workers, bool(pin_memory) and torch.cuda.is_available()))
    try:
        yield
    finally:
        _LOADER_SETTINGS.reset(token)

DIGITS_N = 1797
DIGITS_TRAIN_SIZE = 1437
DIGITS_VAL_SIZE = DIGITS_N - DIGITS_TRAIN_SIZE
DIGITS_CLASSES = 10
_DIGITS_KEYS = ("size", "chans", "train", "noise", "seed")
_SPLITS = ("train", "val")
_SPLIT_FOLDER_NAMES = {"train", "training", "val", "valid", "validation", "test", "eval", "evaluation"}
_ENTRY_RE = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*$")

FORMS = ("'digits' or 'digits,size=16,chans=3,train=500,noise=0.2,seed=0' (built-in 8x8 digits), "
         "a folder of class subfolders (ImageFolder layout), or 'module:function' returning a Dataset "
         "or DataLoader")


# --------------------------------------------------------------------------------------
# digits


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    x.requires_grad_(False)
    return x, y


@functools.lru_cache(maxsize=1)
def _digits_perm() -> torch.Tensor:
    return torch.randperm(DIGITS_N, generator=torch.Generator().manual_seed(0))


def digits_tensors(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """The plain digits split (no options): x float32 [N, 1, 8, 8] in [0, 1], y int64.
    Fresh clones (the cached arrays are never handed out)."""
    if split not in _SPLITS:
        raise BadOptionError(f"split must be one of {', '.join(_SPLITS)}; got {split!r}", option="split")
    x, y = _digits_arrays()
    perm = _digits_perm()
    idx = perm[:DIGITS_TRAIN_SIZE] if split == "train" else perm[DIGITS_TRAIN_SIZE:]
    return x[idx].clone(), y[idx].clone()


@dataclass(frozen=True)
class _DigitsOptions:
    size: int | None = None
    chans: int | None = None
    train: int | None = None
    noise: float = 0.0
    seed: int = 0


def _parse_digits(spec: str) -> _DigitsOptions:
    parts = [p.strip() for p in spec.split(",")]
    opts: dict[str, Any] = {}
    for part in parts[1:]:
        if not part:
            continue
        key, eq, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key:
            raise DataSpecError(f"data {spec!r}: {part!r} is not key=value. Valid keys for digits: "
                                f"{', '.join(_DIGITS_KEYS)} (e.g. digits,size=16,chans=3).", option="data")
        if key not in _DIGITS_KEYS:
            raise DataSpecError(f"data {spec!r}: unknown key {key!r}. Valid keys for digits: "
                                f"{', '.join(_DIGITS_KEYS)}.", option="data")
        if key in opts:
            raise DataSpecError(f"data {spec!r}: key {key!r} is given twice.", option="data")
        try:
            if key == "noise":
                v: Any = float(value)
                ok = 0.0 <= v <= 1.0
                want = "a fraction between 0 and 1"
            else:
                v = int(value)
                lo = 0 if key == "seed" else 1
                hi = DIGITS_TRAIN_SIZE if key == "train" else None
                ok = v >= lo and (hi is None or v <= hi)
                want = (f"an integer from {lo} to {hi}" if hi else f"an integer >= {lo}")
        except ValueError:
            ok, want = False, ("a fraction between 0 and 1" if key == "noise" else "an integer")
        if not ok:
            raise DataSpecError(f"data {spec!r}: {key}={value!r} must be {want}.", option="data")
        opts[key] = v
    return _DigitsOptions(**opts)


def _digits_dataset(spec: str, split: str) -> TensorDataset:
    o = _parse_digits(spec)
    x, y = digits_tensors(split)
    if split == "train":
        if o.train is not None:
            x, y = x[:o.train], y[:o.train]
        if o.noise > 0:
            g = torch.Generator().manual_seed(o.seed)
            n = int(round(o.noise * len(y)))
            which = torch.randperm(len(y), generator=g)[:n]
            shift = torch.randint(1, DIGITS_CLASSES, (n,), generator=g)
            y = y.clone()
            y[which] = (y[which] + shift) % DIGITS_CLASSES
    if o.size is not None and o.size != x.shape[-1]:
        x = F.interpolate(x, size=(o.size, o.size), mode="bilinear", align_corners=False)
    if o.chans is not None and o.chans != 1:
        x = x.repeat(1, o.chans, 1, 1)
    return TensorDataset(x.contiguous(), y)


# --------------------------------------------------------------------------------------
# folders


def _model_in_chans(model: nn.Module) -> int | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("first_conv")
    if isinstance(name, (list, tuple)):
        name = name[0] if name else None
    if isinstance(name, str):
        try:
            mod = model.get_submodule(name)
            if isinstance(mod, nn.modules.conv._ConvNd):
                return mod.in_channels
        except AttributeError:
            pass
    for mod in model.modules():
        if isinstance(mod, nn.modules.conv._ConvNd):
            return mod.in_channels
    return None


def _folder_dataset(spec: str, model: nn.Module | None) -> Dataset:
    import timm.data

    root = os.fspath(spec)
    try:
        subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir())
    except OSError as e:
        raise DataSpecError(f"data {spec!r}: cannot read folder: {e}", option="data") from e
    if subdirs and all(s.lower() in _SPLIT_FOLDER_NAMES for s in subdirs):
        raise DataSpecError(
            f"data {spec!r} holds split folders ({', '.join(subdirs)}), which would be read as classes: "
            f"pass one of them, e.g. {os.path.join(root, subdirs[0])!r}.", option="data")

    _check_has_images(spec, root, subdirs)
    transform, img_mode = image_transform(model)
    try:
        ds = timm.data.create_dataset("", root=root, search_split=False, input_img_mode=img_mode,
                                      transform=transform)
    except Exception as e:  # noqa: BLE001 - timm raises several kinds; all mean "not readable"
        raise DataSpecError(f"data {spec!r}: timm cannot read this folder as a data set "
                            f"(ImageFolder layout: <folder>/<class>/<image>): {e}", option="data") from e
    if len(ds) == 0:
        raise DataSpecError(f"data {spec!r}: no images found (expected <folder>/<class>/<image>).",
                            option="data")
    return ds


def image_transform(model: nn.Module | None) -> tuple[Any, str]:
    """(transform, PIL mode) that turn an image file into the model's input: timm's eval
    transforms for the model (`resolve_data_config` + `create_transform`; one channel: mode
    "L" and the mean / std averaged), else `ToTensor` of an RGB image."""
    import timm.data
    if model is None:
        from torchvision import transforms
        return transforms.ToTensor(), "RGB"
    cfg = timm.data.resolve_data_config({}, model=model)
    chans = _model_in_chans(model) or cfg["input_size"][0]
    if chans == 1 and cfg["input_size"][0] != 1:
        cfg["input_size"] = (1, *cfg["input_size"][1:])
        cfg["mean"] = (float(sum(cfg["mean"]) / len(cfg["mean"])),)
        cfg["std"] = (float(sum(cfg["std"]) / len(cfg["std"])),)
    return timm.data.create_transform(**cfg, is_training=False), "L" if chans == 1 else "RGB"


def _check_has_images(spec: str, root: str, subdirs: list[str]) -> None:
    """`DataSpecError` naming the folder when no image timm reads is anywhere under it."""
    from timm.data.readers.img_extensions import get_img_extensions
    exts = tuple(get_img_extensions())
    for _, _, files in os.walk(root, followlinks=True):
        if any(f.lower().endswith(exts) for f in files):
            return
    where = (f"its class folders ({', '.join(subdirs[:5])}{' ...' if len(subdirs) > 5 else ''}) hold"
             if subdirs else "it has no class folders and holds")
    raise DataSpecError(f"data {spec!r}: the folder has no images: {where} no {' / '.join(exts)} files. "
                        "Give a folder laid out as <folder>/<class>/<image>.", option="data")


def folder_classes(data: Any) -> list[str] | None:
    """The class names of a folder data set (a DataLoader or Dataset over one), in label
    order; None for any other data (digits, module:function)."""
    ds = data.dataset if isinstance(data, DataLoader) else data
    c2i = getattr(getattr(ds, "reader", None), "class_to_idx", None)
    if not isinstance(c2i, dict) or not c2i:
        return None
    return [c for c, _ in sorted(c2i.items(), key=lambda kv: kv[1])]


def check_same_classes(train: Any, val: Any, *, train_spec: Any, val_spec: Any) -> None:
    """`DataSpecError` when two folder data sets (train: --data, val: --val-data) do not
    have the same classes: labels are class indices in sorted name order, so a class
    missing on one side would silently shift every label after it."""
    a, b = folder_classes(train), folder_classes(val)
    if a is None or b is None or a == b:
        return
    only_a, only_b = [c for c in a if c not in b], [c for c in b if c not in a]

    def few(names: list[str]) -> str:
        return ", ".join(repr(n) for n in names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
    parts = ([f"only in `data`: {few(only_a)}"] if only_a else []) + \
        ([f"only in `val_data`: {few(only_b)}"] if only_b else [])
    raise DataSpecError(f"`data` {str(train_spec)!r} and `val_data` {str(val_spec)!r} do not have the "
                        f"same classes ({'; '.join(parts)}); labels are class indices in name order, so both "
                        "folders need the same class subfolders.", option="val_data")


# --------------------------------------------------------------------------------------
# spec dispatch


def spec_name(spec: Any) -> str:
    """A short, human description of a data spec (for logs and reports)."""
    s = os.fspath(spec) if isinstance(spec, os.PathLike) else str(spec)
    if s == "digits" or s.startswith("digits,"):
        return f"digits ({s})" if s != "digits" else "digits (scikit-learn 8x8)"
    if os.path.isdir(s):
        return f"folder {s}"
    return s


def _kind(spec: Any) -> str:
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise DataSpecError(f"data spec must be a non-empty string; got {spec!r}. Accepted forms: {FORMS}.",
                            option="data")
    s = spec.strip()
    if s == "digits" or s.startswith("digits,"):
        return "digits"
    if os.path.isdir(s):
        return "folder"
    if os.path.exists(s):
        raise DataSpecError(f"data {spec!r} is a file, not a folder. Accepted forms: {FORMS}.", option="data")
    if _ENTRY_RE.match(s):
        return "entry"
    raise DataSpecError(f"data {spec!r}: no such folder, and not a known data spec. Accepted forms: {FORMS}.",
                        option="data")


def _entry_data(spec: str) -> Dataset | DataLoader:

    fn = _import_callable(spec, error=DataSpecError, option="data", what="data")
    try:
        out = fn()
    except Exception as e:
        raise DataSpecError(f"data {spec!r}: the function raised {type(e).__name__}: {e}. It must take no "
                            f"arguments and return a Dataset or DataLoader.", option="data") from e
    if isinstance(out, (DataLoader, Dataset)):
        return out
    raise DataSpecError(f"data {spec!r} returned {type(out).__name__}; it must return a torch Dataset or "
                        f"DataLoader (e.g. TensorDataset(x, y)).", option="data")


def create_dataset(spec: Any, *, split: str = "train", model: nn.Module | None = None) -> Dataset | DataLoader:
    """The Dataset a spec names (a `module:function` may give a DataLoader instead)."""
    if split not in _SPLITS:
        raise BadOptionError(f"split must be one of {', '.join(_SPLITS)}; got {split!r}", option="split")
    kind = _kind(spec)
    s = os.fspath(spec).strip() if isinstance(spec, os.PathLike) else spec.strip()
    if kind == "digits":
        return _digits_dataset(s, split)
    if kind == "folder":
        return _folder_dataset(s, model)
    return _entry_data(s)


def create_loader(spec: Any, *, split: str = "train", batch_size: int = 128, shuffle: bool = False, seed: int = 0,
                  model: nn.Module | None = None, drop_last: bool = False) -> DataLoader:
    """A DataLoader over the data a spec names (num_workers 0 and no pinned memory, unless
    inside `loader_settings`: the CLI's --workers, and pinned memory on CUDA).

    `split` ("train" / "val") picks the digits split; folders and functions give what
    they give. Shuffling draws from a generator seeded with `seed` (reproducible). A
    DataLoader returned by a `module:function` spec is returned as is (its own batch
    size and order). `model` (optional) picks a folder's eval transforms.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise BadOptionError(f"`batch_size` must be a positive integer; got {batch_size!r}", option="batch_size")
    data = create_dataset(spec, split=split, model=model)
    if isinstance(data, DataLoader):
        logger.debug("data %s gave a DataLoader; using it as is (batch size, shuffling, split ignored)", spec)
        return data
    if shuffle and isinstance(data, IterableDataset):
        logger.info("data %s is an IterableDataset; it is not shuffled", spec)
        shuffle = False
    gen = torch.Generator().manual_seed(int(seed)) if shuffle else None
    workers, pin = _LOADER_SETTINGS.get()
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=gen, num_workers=workers,
                      pin_memory=pin, drop_last=drop_last, persistent_workers=workers > 0)


# --------------------------------------------------------------------------------------
# fit check


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    return f"timm:{arch}" if arch else type(model).__name__


def _shape(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return "(" + ", ".join(str(d) for d in x.shape) + ")"
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(_shape(v) for v in x) + "]"
    return type(x).__name__


def check_input_fits(model: nn.Module, loader: DataLoader, *, spec: Any) -> None:
    """Run one batch through `model` (eval, no_grad; every module's mode is restored) and
    raise `DataSpecError` when it cannot take the inputs or a label is not below its
    number of outputs."""
    name = spec_name(spec) if not isinstance(spec, str) else spec
    try:
        batch = next(iter(loader))
    except StopIteration:
        raise DataSpecError(f"data {name!r} gives no batches (is it empty, or smaller than one batch with "
                            f"drop_last?).", option="data") from None
    except Exception as e:  # noqa: BLE001 - reading user data can fail in many ways
        raise DataSpecError(f"data {name!r}: reading the first batch failed: {type(e).__name__}: {e}",
                            option="data") from e
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise DataSpecError(f"data {name!r} must give (inputs, labels) batches; got {_shape(batch)}.",
                            option="data")
    x, y = batch[0], batch[1]
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    xs = x[:8] if isinstance(x, torch.Tensor) else x
    if isinstance(xs, torch.Tensor):
        xs = xs.to(device)
    try:
        with modes_kept(model, False), torch.no_grad():
            out = model(xs)
    except Exception as e:  # noqa: BLE001 - any failure of the user's model on this input
        raise DataSpecError(
            f"data {name!r} gives inputs of shape {_shape(x)} that the model ({_model_name(model)}) cannot take: "
            f"{type(e).__name__}: {e}. Pass `in_chans` / `num_classes` or a data spec with size=/chans= "
            f"(e.g. digits,size=16,chans=3).", option="data") from e
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise DataSpecError(f"the model ({_model_name(model)}) gives {_shape(out)} on data {name!r}; "
                            f"mcensemble needs class scores of shape (batch, classes).", option="data")
    n_out = out.shape[1]
    if isinstance(y, torch.Tensor) and not y.is_floating_point() and y.numel():
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= n_out:
            raise DataSpecError(
                f"data {name!r} has labels from {lo} to {hi} (in the first batch) but the model "
                f"({_model_name(model)}) has {n_out} outputs: pass `num_classes` {max(hi + 1, n_out)} "
                f"or data whose labels are 0..{n_out - 1}.", option="data")


# --------------------------------------------------------------------------------------
# example inputs (for tracing)

_CANDIDATE_SIZES = (8, 16, 32, 28, 64, 96, 128, 160, 224)


def _runs(model: nn.Module, x: torch.Tensor) -> bool:
    try:
        with modes_kept(model, False), torch.no_grad():
            model(x)
        return True
    except Exception:  # noqa: BLE001 - probing shapes
        return False


def example_input(model: nn.Module, *, data: Any = None, batch_size: int = 2) -> torch.Tensor:
    """A small input batch the model accepts (for tracing, e.g. the unit graph).

    From `data` (a DataLoader or a data spec) when given: its first batch's inputs. Else
    from a timm `pretrained_cfg["input_size"]` (channels from the model's stem), else by
    probing: `[B, in_features]` for a model whose first layer is Linear, `[B, C, S, S]` with
    S in 8, 16, 32, ... for a conv net. Zeros/random values on the model's device. Raises
    `DataSpecError` when no shape is found (pass data).
    """
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    if data is not None:
        loader = data if isinstance(data, DataLoader) else create_loader(data, batch_size=batch_size, model=model)
        what = spec_name(data) if not isinstance(data, DataLoader) else "loader"
        batch = next(iter(loader), None)
        if batch is None:
            raise DataSpecError(f"data {what} gives no batches; give a non-empty data set",
                                option="data")
        x = batch_input(batch)
        if isinstance(x, torch.Tensor):
            return x[:batch_size].to(device)
        raise DataSpecError(f"data {what} does not give tensor inputs", option="data")
    g = torch.Generator().manual_seed(0)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    chans = _model_in_chans(model)
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    candidates: list[tuple[int, ...]] = []
    if size and len(size) == 3:
        candidates.append((chans or size[0], *size[1:]))
    first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))), None)
    if isinstance(first, nn.Linear):
        candidates.append((first.in_features,))
    elif isinstance(first, nn.Conv1d):
        candidates += [(first.in_channels, s) for s in _CANDIDATE_SIZES]
    elif isinstance(first, nn.Conv2d):
        candidates += [(first.in_channels, s, s) for s in _CANDIDATE_SIZES]
    for shape in candidates:
        x = torch.rand(batch_size, *shape, generator=g).to(device)
        if _runs(model, x):
            return x
    raise DataSpecError(f"cannot guess an input shape for {_model_name(model)}: pass data (`data` SPEC) that "
                        f"the model takes.", option="data")


# ----------------------------------------------------------------------------- the data order of a fit
def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch `epoch`'s data order (and of its loader's worker seeds)."""
    return (int(seed) * 1_000_003 + int(epoch) + 1) % (1 << 63)


def _owns_order(loader) -> bool:
    """A DataLoader over a map-style dataset with a plain random / sequential sampler:
    `epoch_batches` then draws the order itself and skips batches without loading them."""
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return False
    bs, sampler = loader.batch_sampler, loader.sampler
    if type(bs) is not BatchSampler or type(sampler) not in (RandomSampler, SequentialSampler):
        return False
    return not (isinstance(sampler, RandomSampler) and (sampler.replacement or sampler._num_samples is not None))


def epoch_batches(loader, epoch: int, seed: int, *, skip: int = 0) -> Iterator[tuple[Any, Any] | None]:
    """This process's ``(input, target)`` batches of epoch `epoch`, after the first `skip`.

    A DataLoader over a map-style dataset (what `data.create_loader` gives): a shuffling
    one takes the permutation drawn from ``epoch_seed(seed, epoch)``, a sequential one the
    dataset's order; batches of the loader's batch size (its `drop_last`, `collate_fn`,
    workers), skipped ones never loaded. Any other loader is iterated as it is (its
    `generator`, when it has one, reseeded from ``epoch_seed``); skipped batches are read and
    dropped. With several processes each takes rows rank, rank + world, ... of every batch
    (None when that leaves nothing)."""
    world, r = dist_.world_size(), dist_.rank()
    if _owns_order(loader):
        yield from _owned_batches(loader, epoch, seed, skip, world, r)
        return
    gen = getattr(loader, "generator", None)
    if isinstance(gen, torch.Generator):
        gen.manual_seed(epoch_seed(seed, epoch))
    with torch.random.fork_rng(devices=[]):  # iterator creation must not draw from the fit's RNG
        it = iter(loader)
    for j, batch in enumerate(it):
        if j < skip:
            continue
        x, y = split_batch(batch)
        if world > 1:
            x, y = x[r::world], (y[r::world] if y is not None else None)
            if len(x) == 0:
                yield None
                continue
        yield x, y


def _owned_batches(loader: DataLoader, epoch, seed, skip, world, r):
    n = len(loader.dataset)
    gen = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    if isinstance(loader.sampler, RandomSampler):
        order = torch.randperm(n, generator=gen).tolist()
    else:
        order = list(range(n))
    bs = loader.batch_size
    batches = [order[i:i + bs] for i in range(0, n, bs)]
    if loader.drop_last and batches and len(batches[-1]) < bs:
        batches.pop()
    mine = [batch[r::world] for batch in batches[skip:]]
    kw: dict[str, Any] = {}
    if loader.num_workers > 0:
        kw = {"prefetch_factor": loader.prefetch_factor, "worker_init_fn": loader.worker_init_fn,
              "multiprocessing_context": loader.multiprocessing_context, "timeout": loader.timeout}
    sub = DataLoader(loader.dataset, batch_sampler=[m for m in mine if m], collate_fn=loader.collate_fn,
                     num_workers=loader.num_workers, pin_memory=loader.pin_memory, generator=gen, **kw)
    it = iter(sub)
    for m in mine:
        if not m:
            yield None
            continue
        x, y = split_batch(next(it))
        yield x, y
