"""Exception types. Every error a user can cause derives from `MCEnsembleError`.

The CLI turns `MCEnsembleError` into a click error (exit 1, no traceback);
`BadOptionError` (a bad option value or spec) becomes a usage error (exit 2).
Messages say what went wrong, name the file / tensor / option, and say what to do.
"""
from __future__ import annotations

__all__ = [
    "MCEnsembleError", "CheckpointError", "UnsafeCheckpointError", "NonFiniteError",
    "ArchitectureMismatchError", "BadOptionError", "ModelSpecError", "DataSpecError", "ExportError", "UnitGraphError",
    "DropoutPathError", "ShortPathError", "FitInterrupted",
]


class MCEnsembleError(Exception):
    """Base class of every error caused by user input (files, options, specs)."""


class CheckpointError(MCEnsembleError, ValueError):
    """A file is missing, truncated, corrupt, or not a checkpoint."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle needs a global outside the allow-list; nothing in it was executed."""


class NonFiniteError(CheckpointError):
    """A tensor holds NaN or Inf."""


class ArchitectureMismatchError(MCEnsembleError, ValueError):
    """Two state dicts (or a state dict and a model) do not share an architecture."""


class BadOptionError(MCEnsembleError, ValueError):
    """An option value is invalid. `option` names the Python parameter (e.g. 'members') when known; the CLI maps it to its flag."""

    def __init__(self, message: str, *, option: str | None = None):
        super().__init__(message)
        self.option = option


class ModelSpecError(BadOptionError):
    """A model spec (timm name or module:function) cannot be resolved."""


class DataSpecError(BadOptionError):
    """A data spec (digits, folder, module:function) cannot be resolved or does not fit the model."""


class ExportError(MCEnsembleError):
    """An ensemble cannot be exported, or the exported file does not compute the ensemble."""


class UnitGraphError(MCEnsembleError, ValueError):
    """The unit graph cannot be derived (untraceable model, an op that cannot be placed)
    or a hand-written graph does not fit the model."""


class DropoutPathError(MCEnsembleError, ValueError):
    """The dropout-stable path cannot be built for this network (unsupported unit graph)."""


class ShortPathError(MCEnsembleError, ValueError):
    """The short path cannot be built for this network (unsupported layers or unit graph)."""


class FitInterrupted(MCEnsembleError):
    """SIGINT / SIGTERM stopped a curve fit after a completed step; the fit was saved.

    `signum`: the signal; `exit_code`: 128 + signum (130 for SIGINT, 143 for SIGTERM);
    `checkpoint`: the file to resume from; `step`: steps done."""

    def __init__(self, message: str, *, signum: int, checkpoint: str | None = None, step: int = 0):
        super().__init__(message)
        self.signum, self.checkpoint, self.step = signum, checkpoint, step
        self.exit_code = 128 + int(signum)
