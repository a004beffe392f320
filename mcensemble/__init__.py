"""mcensemble: mode-connectivity ensembles from the checkpoints you already have."""
from __future__ import annotations

__version__ = "0.1.0"

# Public names, re-exported lazily so `import mcensemble` stays cheap and a CLI start-up
# does not import every module. name -> (module, attribute)
_EXPORTS = {
    "load_checkpoint": ("checkpoints", "load_checkpoint"),
    "save_checkpoint": ("checkpoints", "save_checkpoint"),
    "Checkpoint": ("checkpoints", "Checkpoint"),
    "ModelSpec": ("models", "ModelSpec"),
    "create_loader": ("data", "create_loader"),
    "evaluate": ("evaluate", "evaluate"),
    "update_bn": ("bn", "update_bn"),
    "load_path": ("paths", "load_path"),
    "load": ("ensemble", "load"),
    "EnsembleModel": ("ensemble", "EnsembleModel"),
    "MCEnsembleError": ("errors", "MCEnsembleError"),
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib
        mod, attr = _EXPORTS[name]
        value = getattr(importlib.import_module(f".{mod}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mcensemble' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
