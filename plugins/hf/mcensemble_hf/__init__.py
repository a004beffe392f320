"""mcensemble for the Hugging Face `transformers.Trainer`: `MCEnsembleTrainerCallback`
(channel dropout while training, snapshot ensembles - one per epoch or fast geometric
ensembling - kept in the Trainer's checkpoints, and an mcensemble ensemble file written
when training ends)."""
from __future__ import annotations

from .callback import SNAPSHOTS_FILE, MCEnsembleTrainerCallback

__all__ = ["MCEnsembleTrainerCallback", "SNAPSHOTS_FILE"]
__version__ = "0.1.0"
