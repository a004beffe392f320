"""Make `mcensemble_hf` importable from a source checkout that has not installed it.

Fixtures here are prefixed `hf_` so that they never clash with the repository's own."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("mcensemble_hf") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture
def hf_offline(monkeypatch):
    """No network: the Hugging Face hub and telemetry are switched off."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
