"""Recipes: YAML files whose keys are `mcensemble build` options.

Keys are option names with dashes or underscores (`val-data` or `val_data`); values are what
you would type after the flag (lists for repeated arguments such as `checkpoints`). Flags on
the command line win over the file. An `endpoints:` section (used by the embedded default)
trains the checkpoints first: `arch`, `n`, `epochs`, `data`, `batch_size`,
`channel_dropout` (p of `mcensemble.hooks.channel_dropout` while they train).
Parsed with `yaml.safe_load`; an unknown key is an error naming it and the nearest valid key.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Sequence

from ..errors import BadOptionError

__all__ = ["DEFAULT_RECIPE", "load_recipe", "SECTIONS"]

DEFAULT_RECIPE = Path(__file__).with_name("default.yaml")

#: Recipe sections that are not CLI options -> their valid keys.
SECTIONS = {"endpoints": ("arch", "n", "epochs", "data", "batch_size", "channel_dropout")}


def _norm(key: Any) -> str:
    return str(key).strip().lstrip("-").replace("-", "_")


def _unknown(key: str, valid: Sequence[str], where: str) -> BadOptionError:
    close = difflib.get_close_matches(key, list(valid), n=1)
    hint = f"; did you mean {close[0].replace('_', '-')!r}?" if close else ""
    return BadOptionError(f"unknown key {key.replace('_', '-')!r} in {where}{hint} "
                          f"(valid keys: {', '.join(sorted(v.replace('_', '-') for v in valid))})", option="recipe")


def load_recipe(file: str | os.PathLike, *, valid: Sequence[str]) -> dict[str, Any]:
    """Read a recipe: option name (underscored) -> value, plus `_extra` for sections."""
    import yaml
    try:
        text = Path(file).read_text()
    except OSError as e:
        raise BadOptionError(f"cannot read recipe {file}: {e.strerror or e}", option="recipe") from e
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise BadOptionError(f"recipe {file} is not valid YAML: {e}", option="recipe") from e
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise BadOptionError(f"recipe {file} must be a mapping of option: value, got {type(doc).__name__}",
                             option="recipe")
    out: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for raw, value in doc.items():
        key = _norm(raw)
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise BadOptionError(f"recipe {file}: '{key}' must be a mapping", option="recipe")
            sect = {_norm(k): v for k, v in value.items()}
            for k in sect:
                if k not in SECTIONS[key]:
                    raise _unknown(k, SECTIONS[key], f"section '{key}' of recipe {file}")
            extra[key] = sect
        elif key in valid:
            out[key] = value
        else:
            raise _unknown(key, [*valid, *SECTIONS], f"recipe {file}")
    out["_extra"] = extra
    return out
