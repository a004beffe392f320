"""Paths through parameter space: t in [0, 1] -> state dict.

`ModePath` (base class), `register_path` (kind registry), `load_path` (read a path file),
`LinearPath` (the straight line). Curve kinds (`BezierPath`, `PolyChainPath`,
`fit_curve`), the short path (`ShortPath`, `build_short_path`), AutoNEB
(`NebPath`, `NebConfig`, `fit_neb`) and others live in sibling
modules, imported on first use.
"""
from __future__ import annotations

from .base import (ModePath, check_same_layout, known_kinds, load_path, register_path,
                   state_dict_sha256)
from .linear import LinearPath

# name -> submodule, imported lazily (modules added by other parts of mcensemble)
_LAZY = {"BezierPath": "curves", "PolyChainPath": "curves", "fit_curve": "fit", "CurveConfig": "fit",
         "ShortPath": "short", "build_short_path": "short",
         "NebPath": "neb", "NebConfig": "neb", "fit_neb": "neb"}

__all__ = ["ModePath", "LinearPath", "load_path", "register_path", "known_kinds", "check_same_layout",
           "state_dict_sha256"]


def _lazy_available() -> list[str]:
    import importlib.util
    return [n for n, m in _LAZY.items() if importlib.util.find_spec(f"{__name__}.{m}") is not None]


__all__ += _lazy_available()


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
