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
    "update_bn": ("bn", "update_bn"),
    "load_path": ("paths", "load_path"),
    "load_ensemble": ("ensemble", "load_ensemble"),
    "save_ensemble": ("ensemble", "save_ensemble"),
    "EnsembleModel": ("ensemble", "EnsembleModel"),
    "MCEnsembleError": ("errors", "MCEnsembleError"),
}

#: Submodules reachable as attributes after a plain `import mcensemble`
#: (`mcensemble.hooks.channel_dropout(...)`), imported on first use. No name above is also a
#: submodule's: importing the submodule would replace it (`mcensemble.evaluate` is the module,
#: its function is `mcensemble.evaluate.evaluate`, whatever was imported first).
_SUBMODULES = frozenset({
    "align", "baselines", "bn", "calibration", "checkpoints", "connect", "data", "distributed", "ensemble", "errors",
    "evaluate", "export", "hooks", "members", "models", "noise", "pack", "paths", "pipeline", "plane", "plot",
    "precision", "predict", "runs", "snapshots", "stability", "train", "uncertainty", "units", "zoo",
})

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    import importlib
    if name in _EXPORTS:
        mod, attr = _EXPORTS[name]
        value = getattr(importlib.import_module(f".{mod}", __name__), attr)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)  # sets the attribute itself
    raise AttributeError(f"module 'mcensemble' has no attribute {name!r}")


def __dir__():
    return sorted({*__all__, *_SUBMODULES})
