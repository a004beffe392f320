"""Paths through parameter space: t in [0, 1] -> state dict.

`ModePath` (base class), `register_path` (the kind registry: `known_kinds`,
`buildable_kinds`, `path_kind`), `load_path` (read a path file), `LinearPath` (the straight
line). Every public name of a module in this package (`__all__`) is reachable from here,
imported on first use: `mcensemble.paths.fit_curve`, `mcensemble.paths.CurveConfig`,
`mcensemble.paths.NebConfig`, ... The modules are the only list: a new kind is a new
module (see docs/adding-a-path-kind.md).
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import (ModePath, buildable_kinds, check_same_layout, known_kinds, load_path, path_kind,
                   register_path, setting_flags, state_dict_sha256)
from .linear import LinearPath

__all__ = ["ModePath", "LinearPath", "load_path", "register_path", "known_kinds", "buildable_kinds", "path_kind",
           "setting_flags", "check_same_layout", "state_dict_sha256"]


def __getattr__(name: str):
    """A public name of one of this package's modules, imported when first asked for."""
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f".{info.name}", __name__)
        if name in getattr(module, "__all__", ()):
            value = getattr(module, name)
            globals()[name] = value
            return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *(n for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_")
                                 for n in getattr(importlib.import_module(f".{info.name}", __name__), "__all__", ()))})
