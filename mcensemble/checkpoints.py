"""Read model weights from the checkpoint formats people already have; write safetensors.

Formats are recognised by *content*, not by file name. A small registry of readers, each
`reader(obj, ctx) -> (state_dict, metadata) | None`, turns what `torch.load` returned
into a state dict (timm training checkpoint, Lightning, SWA `AveragedModel`, wrapped or
plain state dict); safetensors files and timm hub / output folders have their own paths.

Safety: pickles are read only with `torch.load(weights_only=True)`, allowing
`argparse.Namespace` (timm's `args`) and nothing else. A pickle that needs any other
global is refused (`UnsafeCheckpointError`, naming the global) before anything in it runs.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import pickletools
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn as nn

from ._io import atomic_path, independent_tensors, meta_field, read_header, sha256_file, to_json
from .errors import ArchitectureMismatchError, CheckpointError, MCEnsembleError, NonFiniteError, UnsafeCheckpointError
from .models import ModelLike, ModelSpec, as_factory, infer_model_kwargs, resolve_model_spec

__all__ = [
    "Checkpoint", "load_checkpoint", "save_checkpoint", "check_same_architecture",
    "check_finite",
]

_logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

# Header key of our safetensors metadata; `format` value of a checkpoint we wrote.
META_KEY = "mcensemble"
SAVED_FORMAT = "mcensemble-checkpoint"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile (either order)
_TIMM_FOLDER_FILES = ("model_best.pth.tar", "last.pth.tar")
_HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# Metadata about *a file* (not the weights): kept under `origin` when re-saved.
_ORIGIN_KEYS = ("format", "source", "sha256", "folder", "picked", "weights_format", "header")


# --------------------------------------------------------------------------- Checkpoint
@dataclass
class Checkpoint:
    """Weights read from a file plus what the file says about them.

    `metadata` is JSON-ready: `format`, `source`, `sha256`, `arch`, `num_classes`,
    `in_chans`, `model_args`, `weights` ("ema" / "raw" / None), `epoch`, `metric`, ...
    """

    state_dict: StateDict
    metadata: dict[str, Any]
    path: Path | None = None
    model: ModelLike | None = field(default=None, repr=False)

    @property
    def model_spec(self) -> ModelSpec | None:
        """The `ModelSpec` given as `model=`, else the timm one the file describes (or None)."""
        if isinstance(self.model, ModelSpec):
            return self.model
        if not self.metadata.get("arch"):
            return None
        return resolve_model_spec(metadata=self.metadata)

    def build_model(self) -> nn.Module:
        """The model with these weights loaded strictly, in eval mode. A model the file
        describes (no `model=`) is first built on the meta device and checked against the
        weights, so that sizes in the metadata never allocate more than the weights fit."""
        name = self.metadata.get("source") or "checkpoint"
        if self.model is not None:
            factory = as_factory(self.model)
        else:
            spec = self.model_spec
            if spec is None:
                raise CheckpointError(
                    f"{name}: the file does not say which model it holds; pass `arch` NAME "
                    "(a timm architecture) or `model` module:function (model= in Python)")
            factory = as_factory(spec)
            shapes = meta_shapes(factory)
            if shapes is not None:
                state = _fit_prefix(self.state_dict, shapes, self.metadata.get("stripped_prefixes") or [])
                check_same_architecture(shapes, {k: _Shape(v.shape) for k, v in state.items()},
                                        names=(f"the model the file names ({spec.describe()})", name))
        net = factory()
        if not isinstance(net, nn.Module):
            raise CheckpointError(
                f"model factory for {name} returned {type(net).__name__}, not an nn.Module")
        own = net.state_dict()
        state = _fit_prefix(self.state_dict, own, self.metadata.get("stripped_prefixes") or [])
        check_same_architecture(own, state, names=(f"the model ({type(net).__name__})", name))
        net.load_state_dict(state, strict=True)
        return net.eval()


class _Shape(tuple):
    """A shape that `check_same_architecture` can read like a tensor's (`.shape`)."""

    @property
    def shape(self) -> tuple:
        return tuple(self)


def meta_shapes(factory: Callable[[], Any]) -> dict[str, Any] | None:
    """{name: shape} of the state dict of `factory()` built on the meta device (no memory
    is allocated, whatever sizes the factory was given), or None when the model cannot be
    built there (then nothing can be checked in advance)."""
    try:
        with torch.device("meta"):
            net = factory()
        return {k: _Shape(v.shape) for k, v in net.state_dict().items()}
    except MCEnsembleError:
        raise
    except Exception as e:  # noqa: BLE001 - the real build reports its own error
        _logger.debug("cannot build the model on the meta device (%s); sizes not pre-checked", e)
        return None


def _fit_prefix(state: StateDict, own: Mapping[str, Any], prefixes: list[str]) -> StateDict:
    """Put back prefixes stripped on load when the model wants them (e.g. a Lightning module
    whose only child really is named `model`); otherwise return `state` unchanged."""
    if set(state) == set(own):
        return state
    candidate = state
    for prefix in reversed(prefixes):
        candidate = {prefix + k: v for k, v in candidate.items()}
        if set(candidate) == set(own):
            return candidate
    return state


# --------------------------------------------------------------------------- checks
def _shape(t: Any) -> str:
    return str(tuple(t.shape)) if hasattr(t, "shape") else type(t).__name__


def _few(keys: list[str], n: int = 5) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(repr(k) for k in keys[:n]) + more


def check_same_architecture(a: Mapping[str, Any], b: Mapping[str, Any], *,
                            names: tuple[str, str] = ("A", "B"), dtypes: bool = False) -> None:
    """Raise `ArchitectureMismatchError` unless `a` and `b` have the same keys and shapes
    (and, with `dtypes=True`, dtypes). The one architecture check: state dicts, checkpoints,
    path ends and a model's own state all go through it.

    The message names the first tensor (in `a`'s order) that differs, with both shapes,
    and lists the keys missing from `b` and unexpected in `b`.
    """
    na, nb = names
    missing = [k for k in a if k not in b]
    unexpected = [k for k in b if k not in a]
    differing = [k for k in a if k in b and _shape(a[k]) != _shape(b[k])]
    if not (missing or unexpected or differing):
        if dtypes:
            for k, ta in a.items():
                if getattr(ta, "dtype", None) != getattr(b[k], "dtype", None):
                    raise ArchitectureMismatchError(
                        f"{na} and {nb} differ at tensor {k!r}: dtype {ta.dtype} in {na}, {b[k].dtype} in "
                        f"{nb} (shape {_shape(ta)}); convert both to one dtype first")
        return
    parts = []
    if differing:
        k = differing[0]
        parts.append(f"first differing tensor {k!r}: {na} has shape {_shape(a[k])}, "
                     f"{nb} has shape {_shape(b[k])}"
                     + (f" ({len(differing)} tensors differ in shape)" if len(differing) > 1 else ""))
    if missing:
        parts.append(f"missing from {nb}: {_few(missing)}")
    if unexpected:
        parts.append(f"unexpected in {nb}: {_few(unexpected)}")
    raise ArchitectureMismatchError(
        f"{na} and {nb} do not share an architecture: " + "; ".join(parts)
        + ". Check `arch` / `model` and `num_classes` / `in_chans`, or that both files "
        "come from the same model.")


def check_finite(state_dict: Mapping[str, Any], *, source: str) -> None:
    """Raise `NonFiniteError` naming the first floating tensor holding NaN or Inf."""
    bad = []
    for name, t in state_dict.items():
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()):
            if not bool(torch.isfinite(t).all()):
                bad.append(name)
    if bad:
        t = state_dict[bad[0]]
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        others = f"; {len(bad) - 1} more tensors are non-finite too" if len(bad) > 1 else ""
        raise NonFiniteError(
            f"{source}: tensor {bad[0]!r} holds non-finite values ({n_nan} NaN, {n_inf} Inf "
            f"of {t.numel()}){others}. The weights are unusable; use an earlier checkpoint.")


# --------------------------------------------------------------------------- helpers
def _is_state_dict(x: Any) -> bool:
    return (isinstance(x, Mapping) and len(x) > 0 and all(isinstance(k, str) for k in x)
            and all(isinstance(v, torch.Tensor) for v in x.values()))


def _strip_prefixes(state: Mapping[str, torch.Tensor], prefixes: Iterable[str]) -> tuple[StateDict, list[str]]:
    """Strip each prefix (repeatedly, any order) while *every* key carries it."""
    state, stripped, prefixes = dict(state), [], tuple(prefixes)
    while state:
        p = next((p for p in prefixes if all(k.startswith(p) for k in state)), None)
        if p is None:
            break
        state = {k[len(p):]: v for k, v in state.items()}
        stripped.append(p)
    return state, stripped


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0].split(". ")[0] if text else type(e).__name__)[:200]


# --------------------------------------------------------------------------- pickles
def _torch_load(path: Path) -> Any:
    """`torch.load(weights_only=True)` allowing only `argparse.Namespace`."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        culprit = _unsafe_global(path, str(e))
        if culprit:
            raise UnsafeCheckpointError(
                f"{path}: refused to load, the pickle needs the global {culprit!r}, which is "
                "not allowed (only tensors, plain containers and argparse.Namespace are). The "
                "file was not loaded and nothing in it was executed. If you trust it, load it "
                "yourself and re-save the weights as a plain state dict "
                "(torch.save(model.state_dict(), ...)) or as safetensors.") from e
        raise CheckpointError(
            f"{path}: not a torch checkpoint, the weights-only unpickler cannot read it "
            f"({_torch_detail(str(e))})") from e


_TORCH_BOILERPLATE = ("Weights only load failed", "Check the documentation", "(1)", "(2)",
                      "Please file an issue", "In PyTorch 2.6")


def _torch_detail(message: str) -> str:
    """The informative line of torch's long weights-only error text."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(_TORCH_BOILERPLATE)]
    line = (useful or lines or ["unknown error"])[-1]
    return line.replace("WeightsUnpickler error:", "").strip()[:200] or "unknown error"


_GLOBAL_PATTERNS = (r"GLOBAL ([\w.]+) was not an allowed global",
                    r"unsupported GLOBAL ([\w.]+)", r"GLOBAL ([\w.]+)")


def _unsafe_global(path: Path, message: str) -> str | None:
    """The global torch refused, from its message, else by scanning the pickle (no execution)."""
    for pat in _GLOBAL_PATTERNS:
        m = re.search(pat, message)
        if m:
            return m.group(1)
    try:
        if hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
            found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
            if found:
                return found[0]
    except Exception:  # not a zip checkpoint: scan the raw pickle below
        pass
    return _scan_pickle_globals(path)


def _scan_pickle_globals(path: Path) -> str | None:
    """First GLOBAL / STACK_GLOBAL other than argparse.Namespace, read with pickletools."""
    strings: list[str] = []
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("GLOBAL", "INST"):
                    name = str(arg).replace(" ", ".")
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    name = f"{strings[-2]}.{strings[-1]}"
                else:
                    if isinstance(arg, str):
                        strings.append(arg)
                    continue
                if name != "argparse.Namespace":
                    return name
    except Exception:
        return None
    return None


# --------------------------------------------------------------------------- readers
@dataclass
class _Ctx:
    path: Path
    ema: bool | None


_Reader = Callable[[Any, _Ctx], "tuple[StateDict, dict[str, Any]] | None"]
_READERS: list[tuple[str, _Reader]] = []


def _reader(fmt: str) -> Callable[[_Reader], _Reader]:
    def register(fn: _Reader) -> _Reader:
        _READERS.append((fmt, fn))
        return fn
    return register


def _no_ema(ctx: _Ctx, what: str) -> None:
    if ctx.ema:
        raise CheckpointError(
            f"{ctx.path}: EMA weights were asked for (`ema` / ema=True) but this {what} has "
            "none; drop `ema` to use its weights")


@_reader("timm-train")
def _read_timm_train(obj: Any, ctx: _Ctx):
    if not (isinstance(obj, dict) and _is_state_dict(obj.get("state_dict"))
            and any(k in obj for k in ("arch", "args", "state_dict_ema", "model_ema"))):
        return None
    ema_key = next((k for k in ("state_dict_ema", "model_ema") if _is_state_dict(obj.get(k))), None)
    if ctx.ema and ema_key is None:
        _no_ema(ctx, "timm training checkpoint")
    use_ema = ema_key is not None and ctx.ema is not False
    state = obj[ema_key] if use_ema else obj["state_dict"]
    _logger.info("%s: using the %s weights (%s)%s", ctx.path, "EMA" if use_ema else "raw",
                 ema_key if use_ema else "state_dict",
                 "; `ema` False reads the raw ones" if use_ema else "")
    meta = {"weights": "ema" if use_ema else "raw", "has_ema": ema_key is not None,
            "epoch": obj.get("epoch"), "metric": obj.get("metric")}
    meta.update(_timm_args_meta(obj))
    return state, meta


def _timm_args_meta(obj: dict) -> dict[str, Any]:
    """arch / num_classes / in_chans / model_args from timm's train.py `args`."""
    args = obj.get("args")
    a = vars(args) if isinstance(args, argparse.Namespace) else dict(args) if isinstance(args, Mapping) else {}
    arch = a.get("model") or obj.get("arch")
    if not a.get("model") and arch and not _is_timm_name(arch):
        arch = None  # CheckpointSaver without args saves type(model).__name__.lower()
    in_chans = a.get("in_chans")
    if in_chans is None and a.get("input_size"):
        in_chans = a["input_size"][0]
    model_args = dict(a.get("model_kwargs") or {})
    if a.get("gp"):
        model_args.setdefault("global_pool", a["gp"])
    meta = {"arch": arch, "num_classes": a.get("num_classes"), "in_chans": in_chans,
            "model_args": model_args, "saved_arch": obj.get("arch")}
    if a:
        meta["train_args"] = a
    return meta


def _is_timm_name(name: str) -> bool:
    import timm
    return bool(timm.is_model(name))


@_reader("lightning")
def _read_lightning(obj: Any, ctx: _Ctx):
    if not (isinstance(obj, dict) and _is_state_dict(obj.get("state_dict"))
            and ("pytorch-lightning_version" in obj or "global_step" in obj)):
        return None
    _no_ema(ctx, "Lightning checkpoint")
    state = obj["state_dict"]
    firsts = {k.split(".", 1)[0] for k in state}
    meta: dict[str, Any] = {k: obj.get(k) for k in ("pytorch-lightning_version", "epoch", "global_step")}
    if len(firsts) == 1 and all("." in k for k in state):
        prefix = firsts.pop() + "."
        state = {k[len(prefix):]: v for k, v in state.items()}
        meta["stripped_prefixes"] = [prefix]
    hp = obj.get("hyper_parameters")
    if isinstance(hp, Mapping):
        meta["hyper_parameters"] = hp
    return state, meta


@_reader("swa")
def _read_swa(obj: Any, ctx: _Ctx):
    if not (isinstance(obj, dict) and isinstance(obj.get("n_averaged"), torch.Tensor)
            and _is_state_dict(obj) and len(obj) > 1):
        return None
    _no_ema(ctx, "AveragedModel state")
    state = {k: v for k, v in obj.items() if k != "n_averaged"}
    return state, {"n_averaged": int(obj["n_averaged"].item())}


_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")


@_reader("torch")
def _read_torch(obj: Any, ctx: _Ctx):
    if _is_state_dict(obj):
        _no_ema(ctx, "state dict")
        return dict(obj), {}
    if isinstance(obj, dict):
        key = next((k for k in _WRAPPER_KEYS if _is_state_dict(obj.get(k))), None)
        if key is not None:
            _no_ema(ctx, "checkpoint")
            meta = {k: obj.get(k) for k in ("epoch", "metric") if k in obj}
            return dict(obj[key]), {**meta, "state_dict_key": key}
    return None


def _read_pickle(path: Path, ctx: _Ctx) -> tuple[StateDict, dict[str, Any]]:
    obj = _torch_load(path)
    for fmt, reader in _READERS:
        got = reader(obj, ctx)
        if got is not None:
            state, meta = got
            return state, {"format": fmt, **meta}
    what = f"a dict with keys {_few([str(k) for k in obj], 8)}" if isinstance(obj, dict) else \
        f"a {type(obj).__name__}"
    raise CheckpointError(
        f"{path}: not a checkpoint: the file holds {what} and no state dict of tensors")


# --------------------------------------------------------------------------- safetensors
def _read_safetensors(path: Path, ctx: _Ctx, header: dict[str, str]) -> tuple[StateDict, dict[str, Any]]:
    from safetensors.torch import load_file
    state = load_file(str(path), device="cpu")
    meta: dict[str, Any] = {"format": "safetensors"}
    ours = header.pop(META_KEY, None)
    if ours is not None:
        try:
            stored = json.loads(ours)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: the '{META_KEY}' header is not valid JSON ({e})") from e
        if not isinstance(stored, dict):
            raise CheckpointError(f"{path}: the '{META_KEY}' header holds a {type(stored).__name__}, "
                                  "not a JSON object; re-save the weights with save_checkpoint")
        fmt = stored.get("format")
        if fmt in ("mcensemble-path", "mcensemble-ensemble"):
            raise CheckpointError(
                f"{path}: this is an {fmt} file, not a checkpoint; read it with "
                f"{'mcensemble.load_path' if fmt.endswith('path') else 'mcensemble.load_ensemble'}")
        meta.update({k: v for k, v in stored.items()
                     if k not in _ORIGIN_KEYS and k not in ("format_version", "origin")})
        if stored.get("origin"):
            meta["origin"] = stored["origin"]
    if header:
        meta["header"] = header
    if ctx.ema and meta.get("weights") != "ema":
        _no_ema(ctx, "safetensors file")
    return state, meta


def _read_file(path: Path, ctx: _Ctx) -> tuple[StateDict, dict[str, Any]]:
    """Dispatch one file on its leading bytes; wrap low-level read errors."""
    try:
        head = read_header(path)
        if head.format == "empty":
            raise CheckpointError(f"{path}: not a checkpoint, the file is empty")
        if head.format == "safetensors":
            return _read_safetensors(path, ctx, dict(head.metadata))
        if head.format not in ("torch-zip", "pickle"):
            raise CheckpointError(
                f"{path}: not a checkpoint (neither safetensors, a torch.save zip, nor a pickle)")
        return _read_pickle(path, ctx)
    except MCEnsembleError:
        raise
    except Exception as e:  # torch / safetensors / OS errors on corrupt or truncated files
        if isinstance(e, RuntimeError) and "magic number" in str(e):  # legacy-format reader
            raise CheckpointError(f"{path}: not a checkpoint, a pickle not written by torch.save") from e
        raise CheckpointError(
            f"{path}: cannot be read, the file is truncated or corrupt ({_first_line(e)})") from e


# --------------------------------------------------------------------------- folders
def _read_folder(folder: Path, ctx: _Ctx) -> tuple[Path, StateDict, dict[str, Any]]:
    config = folder / "config.json"
    if config.is_file():
        return _read_hub_folder(folder, config, ctx)
    weights, note = _pick_timm_file(folder)
    if weights is None:
        weights = next((folder / n for n in _HUB_WEIGHTS if (folder / n).is_file()), None)
    if weights is None:
        raise CheckpointError(
            f"{folder}: folder holds no checkpoint I recognise (looked for config.json with "
            f"{' / '.join(_HUB_WEIGHTS)}, {' / '.join(_TIMM_FOLDER_FILES)}, checkpoint-*.pth.tar); "
            "pass the checkpoint file itself")
    state, meta = _read_file(weights, ctx)
    meta["folder"] = str(folder)
    if note:
        meta["picked"] = note
    return weights, state, meta


def _pick_timm_file(folder: Path) -> tuple[Path | None, str | None]:
    """timm output folder: model_best.pth.tar, else last.pth.tar, else the newest epoch."""
    if (folder / "model_best.pth.tar").is_file():
        return folder / "model_best.pth.tar", None
    if (folder / "last.pth.tar").is_file():
        _logger.warning("%s: no model_best.pth.tar, using last.pth.tar", folder)
        return folder / "last.pth.tar", "last.pth.tar (no model_best.pth.tar in the folder)"
    numbered = []
    for p in folder.glob("checkpoint-*.pth.tar"):
        m = re.fullmatch(r"checkpoint-(\d+)\.pth\.tar", p.name)
        if m and p.is_file():
            numbered.append((int(m.group(1)), p))
    if numbered:
        p = max(numbered)[1]
        _logger.warning("%s: no model_best.pth.tar or last.pth.tar, using %s", folder, p.name)
        return p, f"{p.name} (newest epoch; no model_best.pth.tar or last.pth.tar)"
    return None, None


def _read_hub_folder(folder: Path, config: Path, ctx: _Ctx):
    try:
        cfg = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config}: unreadable config.json ({_first_line(e)})") from e
    weights = next((folder / n for n in _HUB_WEIGHTS if (folder / n).is_file()), None)
    if weights is None or not isinstance(cfg, dict):
        raise CheckpointError(
            f"{folder}: config.json found but no {' or '.join(_HUB_WEIGHTS)} next to it")
    _no_ema(ctx, "hub folder")
    state, inner = _read_file(weights, ctx)
    model_args = dict(cfg.get("model_args") or {})
    pcfg = cfg.get("pretrained_cfg") or {}
    in_chans = model_args.get("in_chans")
    if in_chans is None and pcfg.get("input_size"):
        in_chans = pcfg["input_size"][0]
    meta = {**inner, "format": "timm-hub", "weights_format": inner.get("format"),
            "folder": str(folder), "arch": cfg.get("architecture"),
            "num_classes": cfg.get("num_classes", model_args.get("num_classes")),
            "in_chans": in_chans, "model_args": model_args, "pretrained_cfg": pcfg}
    return weights, state, meta


# --------------------------------------------------------------------------- public
def _complete_model_meta(state: StateDict, meta: dict[str, Any]) -> None:
    """Fill `num_classes` / `in_chans` from tensor shapes when the arch is a timm name."""
    for k in ("arch", "num_classes", "in_chans"):
        meta.setdefault(k, None)
    meta["model_args"] = dict(meta.get("model_args") or {})
    arch = meta["arch"]
    if not arch:
        return
    # explicit model_args win over duplicates at the top level, keep them in one place
    for k in ("num_classes", "in_chans"):
        if meta[k] is None and meta["model_args"].get(k) is not None:
            meta[k] = meta["model_args"][k]
        meta["model_args"].pop(k, None)
    try:
        inferred = infer_model_kwargs(state, arch)
    except (MCEnsembleError, ImportError) as e:
        _logger.debug("cannot infer model kwargs for %s: %s", arch, e)
        return
    for k, v in inferred.items():
        if meta.get(k) is not None and meta[k] != v:
            _logger.warning("%s: the file says %s=%s but the weights have %s=%s; using %s",
                            meta.get("source"), k, meta[k], k, v, v)
        meta[k] = v


# metadata fields the readers use, and their JSON types (checked with `meta_field`)
_FIELD_TYPES = (("arch", "str"), ("num_classes", "int"), ("in_chans", "int"), ("model_args", "dict"),
                ("weights", "str"), ("stripped_prefixes", "str-list"), ("has_ema", "bool"))


def _check_field_types(meta: Mapping[str, Any], source: str) -> None:
    """`CheckpointError` naming the field when what a file says about its weights has the
    wrong type (a damaged or crafted header: `"model_args": 1.5`, `"num_classes": "x"`)."""
    for key, expect in _FIELD_TYPES:
        meta_field(meta, key, expect, where=source, default=None, nullable=True,
                   lo=1 if expect == "int" else None)


def load_checkpoint(src: str | os.PathLike, *, model: ModelLike | None = None,
                    ema: bool | None = None) -> Checkpoint:
    """Read weights and metadata from a checkpoint file or folder (format read from content).

    `ema`: None takes EMA weights when the file has them (as timm does), False the raw
    weights, True insists on EMA. `model` (nn.Module / factory / ModelSpec) is what
    `build_model()` will build; without it a timm architecture named by the file is used.
    """
    if not isinstance(src, (str, os.PathLike)):
        raise CheckpointError(f"load_checkpoint expects a path, got {type(src).__name__}")
    path = Path(src)
    ctx = _Ctx(path=path, ema=ema)
    if path.is_dir():
        weights, state, meta = _read_folder(path, ctx)
    elif path.is_file():
        weights = path
        state, meta = _read_file(path, ctx)
    else:
        raise CheckpointError(f"{path}: no such file or folder")
    state, stripped = _strip_prefixes(state, _WRAPPER_PREFIXES)
    if stripped:
        meta["stripped_prefixes"] = list(meta.get("stripped_prefixes") or []) + stripped
    meta.setdefault("weights", None)
    _check_field_types(meta, str(weights))
    meta.update(source=str(weights), sha256=sha256_file(weights))
    meta.setdefault("epoch", None)
    meta.setdefault("metric", None)
    hint = " (EMA weights; `ema` False reads the raw ones)" if meta.get("has_ema") \
        and meta["weights"] == "ema" else ""
    check_finite(state, source=f"{weights}{hint}")
    _complete_model_meta(state, meta)
    return Checkpoint(state_dict=state, metadata=to_json(meta), path=weights, model=model)


def _independent_tensors(state_dict: Mapping[str, Any]) -> StateDict:
    """CPU, contiguous tensors that own their storage (safetensors refuses shared memory)."""
    for name, t in state_dict.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise CheckpointError(
                f"cannot save {name!r}: a state dict maps names to tensors, got {type(t).__name__}")
    return independent_tensors(state_dict)


def save_checkpoint(state_dict: Mapping[str, torch.Tensor], dest: str | os.PathLike, *,
                    metadata: Mapping[str, Any] | None = None) -> Path:
    """Write `state_dict` as safetensors, `metadata` as JSON under the `mcensemble` header
    key, atomically. A loaded checkpoint's `format` / `source` / `sha256` go under
    `origin`. Returns the destination path."""
    from safetensors.torch import save_file
    tensors = _independent_tensors(state_dict)
    meta = dict(to_json(dict(metadata or {})))
    origin = meta.pop("origin", None) or {k: meta[k] for k in _ORIGIN_KEYS if k in meta}
    for k in _ORIGIN_KEYS:
        meta.pop(k, None)
    record = {"format": SAVED_FORMAT, "format_version": 1, **meta}
    if origin:
        record["origin"] = origin
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(record)})
    return dest
