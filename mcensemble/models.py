"""Model specs: a timm architecture name or a `module:function` entry point -> nn.Module.

A `ModelSpec` is what files record about "how to build the model"; it is plain JSON
(`to_dict` / `from_dict`). Building a spec never imports code a *file* names unless the
caller says so (`trust_entry=True`): timm names go through timm's registry only (no
`hf-hub:` names, no downloads: `pretrained=False` always).
"""
from __future__ import annotations

import copy
import difflib
import importlib
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Union

import torch
import torch.nn as nn

from .errors import BadOptionError, ModelSpecError

__all__ = [
    "ModelSpec", "ModelLike", "create_model", "as_factory", "check_timm_arch", "import_entry",
    "resolve_model_spec", "infer_model_kwargs",
]

logger = logging.getLogger(__name__)

ModelLike = Union[nn.Module, Callable[[], nn.Module], "ModelSpec"]

# "package.module:function" or "package.module:Class.method"
_IDENT = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_ENTRY_RE = re.compile(rf"^({_IDENT}):({_IDENT})$")

# timm kwargs a file may not pass through: they make timm download or read files.
_UNSAFE_TIMM_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path",
                       "cache_dir")


@dataclass(frozen=True)
class ModelSpec:
    """How to build a model: exactly one of `arch` (timm name) or `entry` ("module:function")."""

    arch: str | None = None
    entry: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "entry": self.entry, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelSpec":
        if not isinstance(d, Mapping):
            raise ModelSpecError(f"a model spec must be a dict with 'arch' or 'entry'; got {type(d).__name__}")
        kwargs = d.get("kwargs") or {}
        if not isinstance(kwargs, Mapping):
            raise ModelSpecError(f"a model spec's 'kwargs' must be a dict; got {type(kwargs).__name__}")
        return cls(arch=d.get("arch"), entry=d.get("entry"), kwargs=dict(kwargs))

    def describe(self) -> str:
        kw = ", ".join(f"{k}={v!r}" for k, v in sorted(self.kwargs.items()))
        if self.arch:
            return f"timm:{self.arch}({kw})"
        if self.entry:
            return f"{self.entry}({kw})" if kw else self.entry
        return "<unspecified model>"


# --------------------------------------------------------------------------------------
# timm registry


def check_timm_arch(name: str, *, option: str | None = "arch") -> str:
    """Return `name` if timm's registry knows it (pretrained tags like 'resnet18.a1_in1k'
    are accepted; mcensemble's own `mce_*` models are registered first), else raise
    `ModelSpecError` listing close names."""
    import timm

    from . import zoo  # noqa: F401  (registers the built-in mce_* architectures with timm)

    if isinstance(name, str) and name and timm.is_model(name):
        return name
    shown = name if isinstance(name, str) else repr(name)
    hint = ""
    if isinstance(name, str) and (":" in name or "/" in name):
        hint = (" mcensemble builds timm models from timm's registry only (no 'hf-hub:' names, no "
                "downloads): give the bare architecture name, e.g. 'resnet18'.")
    base = name.split(".")[0] if isinstance(name, str) else ""
    names = timm.list_models()
    close = difflib.get_close_matches(base, names, n=6, cutoff=0.6) if base else []
    if not close and base:
        close = [n for n in names if base.lower() in n.lower()][:6]
    suggest = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ModelSpecError(
        f"Unknown timm architecture {shown!r}.{suggest}{hint} See timm.list_models().", option=option)


# --------------------------------------------------------------------------------------
# module:function entry points


def _import_callable(entry: str, *, error: type[BadOptionError], option: str | None, what: str) -> Callable:
    """Import the callable `entry` ("module:function") names. Failures raise `error`."""
    if not isinstance(entry, str):
        raise error(f"{what} entry point must be a 'module:function' string; got {type(entry).__name__}",
                    option=option)
    m = _ENTRY_RE.match(entry.strip())
    if not m:
        hint = ""
        mod_part = entry.rsplit(":", 1)[0]
        if mod_part.endswith(".py") or "/" in mod_part or "\\" in mod_part:
            hint = (" Give a module name, not a file path: for ./my_models.py with a function net(), "
                    "run from that folder and pass 'my_models:net'.")
        elif ":" not in entry:
            hint = f" For a function net() in {entry}.py, pass '{entry}:net'."
        raise error(f"{what} entry point {entry!r} is not of the form 'module:function' "
                    f"(e.g. 'my_models:net').{hint}", option=option)
    mod_name, attr_path = m.group(1), m.group(2)

    # Like `python -m`, make the current directory importable (appended, so installed
    # packages win); it is removed again afterwards.
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if missing and (mod_name == missing or mod_name.startswith(missing + ".")):
            hint = ""
            if mod_name.endswith(".py"):
                hint = f" Leave out the '.py': pass '{mod_name[:-3]}:{attr_path}'."
            raise error(
                f"{what} entry point {entry!r}: cannot find module {mod_name!r}. Make sure the module is "
                f"importable: run from its folder or add it to PYTHONPATH.{hint}", option=option) from e
        raise error(f"{what} entry point {entry!r}: importing module {mod_name!r} failed because it "
                    f"imports {missing or 'a module'!r}, which is not installed ({e}).", option=option) from e
    except Exception as e:  # the user's module raised while importing
        raise error(f"{what} entry point {entry!r}: importing module {mod_name!r} failed: "
                    f"{type(e).__name__}: {e}", option=option) from e
    finally:
        if added:
            try:
                sys.path.remove(cwd)
            except ValueError:
                pass

    obj: Any = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n, None)))
            close = difflib.get_close_matches(part, public, n=5)
            hint = f" Did you mean: {', '.join(close)}?" if close else (
                f" It has: {', '.join(public[:10])}." if public else "")
            raise error(f"{what} entry point {entry!r}: module {mod_name!r} "
                        f"({getattr(module, '__file__', None) or 'no file'}) has no attribute {attr_path!r}.{hint}",
                        option=option) from e
    if not callable(obj):
        raise error(f"{what} entry point {entry!r} names a {type(obj).__name__}, not a function: "
                    f"point it at a function that takes no arguments.", option=option)
    return obj


def import_entry(entry: str) -> Callable:
    """Import the callable a "module:function" string names (the current directory is
    importable, as with `python -m`). Every failure raises `ModelSpecError` with the cause."""
    return _import_callable(entry, error=ModelSpecError, option="model", what="model")


def _call_entry(entry: str, kwargs: Mapping[str, Any]) -> nn.Module:
    fn = import_entry(entry)
    try:
        model = fn(**kwargs)
    except Exception as e:
        raise ModelSpecError(f"model entry point {entry!r} raised {type(e).__name__}: {e}. It must take no "
                             f"arguments{' besides ' + ', '.join(kwargs) if kwargs else ''} and return an "
                             f"nn.Module.", option="model") from e
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"model entry point {entry!r} returned {type(model).__name__}, not an nn.Module: "
                             f"it must build and return the model (e.g. `return MyNet()`).", option="model")
    return model


# --------------------------------------------------------------------------------------
# building


def create_model(spec: ModelSpec, *, trust_entry: bool = True) -> nn.Module:
    """Build the model a spec describes, in eval mode, with freshly initialised weights.

    timm names go through timm's registry (`check_timm_arch`) with `pretrained=False`. An
    `entry` ("module:function") is imported and called only when `trust_entry` is true:
    specs read from files must not make mcensemble run code.
    """
    if not isinstance(spec, ModelSpec):
        raise ModelSpecError(f"expected a ModelSpec; got {type(spec).__name__}")
    if spec.arch and spec.entry:
        raise ModelSpecError(f"model spec names both a timm architecture ({spec.arch!r}) and an entry point "
                             f"({spec.entry!r}); give one.")
    if spec.arch:
        import timm

        check_timm_arch(spec.arch)
        kwargs = {k: v for k, v in spec.kwargs.items() if k not in _UNSAFE_TIMM_KWARGS}
        dropped = sorted(set(spec.kwargs) - set(kwargs))
        if dropped:
            logger.warning("ignoring model kwargs %s for timm:%s (mcensemble never downloads or reads weights "
                           "when building a model)", ", ".join(dropped), spec.arch)
        try:
            model = timm.create_model(spec.arch, pretrained=False, **kwargs)
        except (TypeError, ValueError, AssertionError, RuntimeError, KeyError) as e:
            raise ModelSpecError(f"cannot build timm model {spec.describe()}: {type(e).__name__}: {e}. "
                                 f"Check `num_classes` / `in_chans` and the checkpoint's model_args.",
                                 option="arch") from e
    elif spec.entry:
        if not trust_entry:
            raise ModelSpecError(
                f"this file says the model is built by {spec.entry!r}, but mcensemble does not import code "
                f"named by a file. Pass the model yourself: model= in Python (an nn.Module or a function "
                f"returning one) or `model` {spec.entry} on the command line.", option="model")
        model = _call_entry(spec.entry, spec.kwargs)
    else:
        raise ModelSpecError("no model given: pass `arch` NAME (a timm architecture) or `model` module:function "
                             "(model= in Python).", option="arch")
    return model.eval()


def as_factory(model: ModelLike) -> Callable[[], nn.Module]:
    """Turn an nn.Module (deep-copied per call), a zero-argument callable or a ModelSpec
    into a zero-argument factory returning a fresh nn.Module."""
    if isinstance(model, ModelSpec):
        return lambda: create_model(model)
    if isinstance(model, nn.Module):
        return lambda: copy.deepcopy(model)
    if callable(model):
        return model
    raise BadOptionError(
        f"model= must be an nn.Module, a zero-argument callable returning one, or a ModelSpec; got {type(model).__name__}",
        option="model")


# --------------------------------------------------------------------------------------
# resolving CLI flags and checkpoint metadata


def _positive_int(value: Any, option: str, source: str) -> int:
    if isinstance(value, bool):
        ok = False
    else:
        try:
            ivalue = int(value)
            ok = ivalue == value or (isinstance(value, str) and value.strip().isdigit())
        except (TypeError, ValueError):
            ok = False
    if not ok or ivalue < 1:
        raise BadOptionError(f"{option} must be a positive integer; {source} gives {value!r}", option=option)
    return ivalue


def resolve_model_spec(*, arch: str | None = None, model: str | None = None, num_classes: int | None = None,
                       in_chans: int | None = None, metadata: Mapping[str, Any] | None = None) -> ModelSpec | None:
    """Combine CLI flags with what a checkpoint's metadata says; flags win.

    `model` is a "module:function" string (`--model`) and `arch` a timm name (`--arch`):
    giving both is a `BadOptionError`. `metadata` keys used: `arch`, `num_classes`,
    `in_chans`, `model_args` (a metadata never names an entry point: files do not make
    mcensemble import code). Kwargs are built as metadata `model_args`, then metadata
    `num_classes` / `in_chans`, then the flags; `model_args` are dropped when `--arch`
    names a different architecture than the metadata. `num_classes` / `in_chans` only go
    into timm specs (an entry function takes no arguments). Returns None when nothing
    names a model. Nothing is imported here (the entry is only checked for form).
    """
    if arch and model:
        raise BadOptionError(f"give either `arch` (a timm name) or `model` (module:function), not both "
                             f"(got `arch` {arch} and `model` {model})", option="model")
    if num_classes is not None:
        num_classes = _positive_int(num_classes, "num_classes", "the option")
    if in_chans is not None:
        in_chans = _positive_int(in_chans, "in_chans", "the option")
    meta = dict(metadata or {})

    if model:
        if not isinstance(model, str) or not _ENTRY_RE.match(model.strip()):
            hint = ""
            if isinstance(model, str) and ":" not in model:
                import timm
                if timm.is_model(model):
                    hint = f" {model!r} is a timm architecture: pass `arch` {model}."
            raise ModelSpecError(f"`model` takes 'module:function' (e.g. my_models:net); got {model!r}.{hint}",
                                 option="model")
        if num_classes is not None or in_chans is not None:
            logger.info("`num_classes` / `in_chans` are not passed to %s (a model function takes no arguments)",
                        model)
        return ModelSpec(entry=model.strip())

    meta_arch = meta.get("arch") or None
    if arch:
        check_timm_arch(arch, option="arch")
        chosen = arch
    elif meta_arch:
        if not isinstance(meta_arch, str):
            raise ModelSpecError(f"the checkpoint's metadata names arch {meta_arch!r}, not a timm name: "
                                 f"pass `arch` NAME or `model` module:function", option="arch")
        try:
            check_timm_arch(meta_arch, option="arch")
        except ModelSpecError as e:
            raise ModelSpecError(f"the checkpoint's metadata says arch {meta_arch!r}, but: {e} "
                                 f"Pass `arch` NAME or `model` module:function to override.",
                                 option="arch") from e
        chosen = meta_arch
    else:
        return None

    kwargs: dict[str, Any] = {}
    model_args = meta.get("model_args") or {}
    if not isinstance(model_args, Mapping):
        logger.warning("ignoring the checkpoint's model_args (%s, not a dict)", type(model_args).__name__)
        model_args = {}
    if model_args and meta_arch and meta_arch != chosen:
        logger.warning("not applying the checkpoint's model_args %s (they are for %s, not %s)",
                       dict(model_args), meta_arch, chosen)
    else:
        kwargs.update({k: v for k, v in model_args.items() if k not in _UNSAFE_TIMM_KWARGS})
    for key in ("num_classes", "in_chans"):
        if meta.get(key) is not None:
            kwargs[key] = _positive_int(meta[key], key, "the checkpoint's metadata")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    return ModelSpec(arch=chosen, kwargs=kwargs)


def _first_name(value: Any) -> str | None:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return value if isinstance(value, str) and value else None


def _timm_cfg_names(arch: str) -> tuple[str | None, str | None]:
    """(classifier, first_conv) module names from the arch's pretrained_cfg."""
    import timm

    cfg: Any = None
    try:
        cfg = timm.models.get_pretrained_cfg(arch)
    except Exception:  # noqa: BLE001 - fall back to building the model below
        cfg = None
    if cfg is not None:
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(getattr(cfg, "__dict__", {}) or {})
    if not cfg or not cfg.get("classifier") or not cfg.get("first_conv"):
        try:
            with torch.device("meta"):  # no memory, no init cost
                built = timm.create_model(arch, pretrained=False)
            cfg = {**(cfg or {}), **{k: v for k, v in (getattr(built, "pretrained_cfg", None) or {}).items() if v}}
        except Exception as e:  # noqa: BLE001 - nothing more to learn; caller reads what it can
            logger.debug("could not build %s on the meta device: %s", arch, e)
    cfg = cfg or {}
    return _first_name(cfg.get("classifier")), _first_name(cfg.get("first_conv"))


def infer_model_kwargs(state_dict: Mapping[str, torch.Tensor], arch: str) -> dict[str, int]:
    """Read `num_classes` / `in_chans` of a timm `arch` off a state dict.

    The classifier and stem names come from the arch's `pretrained_cfg` (`classifier`,
    `first_conv`); num_classes = rows of `<classifier>.weight`, in_chans = input channels of
    `<first_conv>.weight`. Returns only what could be read (possibly `{}`).
    """
    check_timm_arch(arch)
    classifier, first_conv = _timm_cfg_names(arch)
    out: dict[str, int] = {}
    w = state_dict.get(f"{classifier}.weight") if classifier else None
    if isinstance(w, torch.Tensor) and w.ndim >= 2:
        out["num_classes"] = int(w.shape[0])
    w = state_dict.get(f"{first_conv}.weight") if first_conv else None
    if isinstance(w, torch.Tensor) and w.ndim >= 3:
        out["in_chans"] = int(w.shape[1])
    return out
