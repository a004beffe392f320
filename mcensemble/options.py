"""What a job is asked to do: the option dataclasses, validated once when they are made.

Torch-free (it imports only `errors` and `_io`), so the CLI reads its defaults from here without
importing torch. A path kind's own settings are its config dataclass (in its module, e.g.
`paths.curves.CurveConfig`), made by `make_config` from `BuildOptions.settings`.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from ._io import is_int as _is_int
from .errors import BadOptionError

__all__ = ["make_config", "check_count", "ModelOptions", "DataOptions",
           "BuildOptions", "ConnectOptions", "SELECTIONS"]

#: how `build` chooses members
SELECTIONS = ("auto", "greedy", "uniform")


def check_count(value: Any, name: str, *, minimum: int) -> int:
    """`value` if it is an integer >= `minimum`, else `BadOptionError(option=name)` (the one
    check of a count: members, candidates, points, ...)."""
    if not _is_int(value) or value < minimum:
        raise BadOptionError(f"{name} must be an integer >= {minimum}, got {value!r}", option=name)
    return value


def make_config(config_class: type | None, settings: Any = None, *, seed: int | None = None) -> Any:
    """A frozen settings dataclass from `settings`: an instance of `config_class` (kept, its
    `seed` replaced when `seed` is given), or a mapping of field values (names that are not
    fields are left out: one mapping carries every kind's settings). None when
    `config_class` is None. The dataclass validates itself (`BadOptionError` naming the field)."""
    if config_class is None:
        return None
    names = {f.name for f in dataclasses.fields(config_class)}
    if isinstance(settings, config_class):
        return dataclasses.replace(settings, seed=seed) if seed is not None and "seed" in names else settings
    if settings is not None and not isinstance(settings, Mapping):
        raise BadOptionError(f"`settings` must be a mapping of setting: value or a {config_class.__name__}, "
                             f"got {type(settings).__name__}", option="settings")
    values = {k: v for k, v in (settings or {}).items() if k in names}
    if seed is not None and "seed" in names:
        values["seed"] = seed
    return config_class(**values)


@dataclass
class ModelOptions:
    """What the user said about the model: a timm `arch` or a `module:function` entry, and overrides."""

    arch: str | None = None
    model: Any = None  # "module:function" string, nn.Module, zero-arg callable or ModelSpec
    num_classes: int | None = None
    in_chans: int | None = None
    ema: bool | None = None
    unit_graph: str | os.PathLike | None = None  # a JSON file of unit groups, instead of tracing


@dataclass
class DataOptions:
    """Data and run settings: specs for training and held-out data (see `data.create_loader`),
    batch size, seed (shuffling, t draws, selection), device, and progress bars (None: on a TTY).
    `test_data`: held-out data used for nothing but the report's test columns (build, eval)."""

    data: str | None = "digits"
    val_data: str | None = None
    test_data: str | None = None
    batch_size: int = 128
    seed: int = 0
    device: str = "cpu"
    progress: bool | None = None


@dataclass(frozen=True)
class BuildOptions:
    """How to connect the checkpoints and sample the ensemble (validated when made).

    method: a path kind (`paths.buildable_kinds()`: "linear", "bezier", "polychain",
    "dropout", "short", "neb", and any kind registered with `from_options`) or "fge";
    settings: the method's own settings, a mapping of field values (`{"bends": 2,
    "epochs": 5}`; fields of other kinds are ignored) or the kind's config itself (e.g. a
    `paths.CurveConfig`, `paths.NebConfig`); members: at most K distinct members for the
    greedy choice (exactly K with `exact_members`, and for uniform members); selection:
    "auto" (greedy on validation NLL when validation data is given, else uniform), "greedy"
    or "uniform"; candidates: points per path evaluated for the greedy choice (ends
    included); packed: put the packed pair (its cheap form: no swap search) among the
    report's baselines.
    """

    method: str = "bezier"
    settings: Any = field(default_factory=dict)
    members: int = 4
    exact_members: bool = False
    packed: bool = True
    selection: str = "auto"
    candidates: int = 11
    strategy: str = "loop"  # the ensemble's forward: loop (default), vmap or auto (time both)
    align: bool | None = None  # None: the kind's own default (on for bezier / polychain curves)
    repair: bool = False
    checkpoint_dir: str | None = None  # trained paths save their state here (<kind>-<i>.safetensors)
    checkpoint_every: int | None = None  # ... every N steps too (always at each epoch's end)
    resume: bool = False  # continue the fits saved in checkpoint_dir
    save_dtype: str | None = None  # the ensemble file's member dtype ("fp32", "bf16", "fp16"; None: as trained)
    calibrate: bool = True  # fit a temperature on the selection data (val) and store it in the ensemble file

    def __post_init__(self) -> None:
        check_count(self.members, "members", minimum=1)
        if self.selection not in SELECTIONS:
            raise BadOptionError(f"`selection` must be auto, greedy or uniform, got {self.selection!r}",
                                 option="selection")
        check_count(self.candidates, "candidates", minimum=2)
        if self.settings is None:
            object.__setattr__(self, "settings", {})
        elif isinstance(self.settings, Mapping):
            object.__setattr__(self, "settings", dict(self.settings))


@dataclass(frozen=True)
class ConnectOptions:
    """points: t per pair on the straight line (>= 2); path_points: t along each tree path
    (>= 2); align: permute each pair's second checkpoint to match the first before its scan
    and its path; members, candidates: the ensemble from the tree (`connect_checkpoints(
    ensemble=...)`): at most `members` distinct members chosen on the validation data among
    `candidates` points per tree path (ends included). How the tree's paths are made comes
    from a `BuildOptions`."""

    points: int = 11
    path_points: int = 21
    align: bool = False
    members: int = 4
    candidates: int = 11

    def __post_init__(self) -> None:
        for name in ("points", "path_points", "candidates"):
            check_count(getattr(self, name), name, minimum=2)
        check_count(self.members, "members", minimum=1)
