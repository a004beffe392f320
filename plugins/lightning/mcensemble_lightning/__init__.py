"""mcensemble for Lightning: `MCEnsembleCallback` (channel dropout while training, snapshot
ensembles - fast geometric ensembling or one per epoch - kept in Lightning checkpoints, and
an mcensemble ensemble file written when training ends)."""
from __future__ import annotations

from .callback import MCEnsembleCallback

__all__ = ["MCEnsembleCallback"]
__version__ = "0.1.0"
