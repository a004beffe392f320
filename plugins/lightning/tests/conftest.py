"""Make `mcensemble_lightning` importable from a source checkout that has not installed it."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("mcensemble_lightning") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
