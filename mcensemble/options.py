"""What a job is asked to do: the option dataclasses, validated once when they are made.

Torch-free (it imports only `errors` and `_io`), so the CLI reads its defaults from here without
importing torch. `CurveConfig` (how a curve is fitted) is nested in `BuildOptions` as
`BuildOptions.curve` for the curve methods.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ._io import is_int as _is_int
from .errors import BadOptionError

__all__ = ["CURVE_KINDS", "CurveConfig", "validate_curve_config", "check_count", "ModelOptions", "DataOptions",
           "BuildOptions", "ConnectOptions", "SELECTIONS"]

#: the curve kinds `CurveConfig.kind` takes (`paths.curves` holds their coefficients)
CURVE_KINDS = ("bezier", "polychain")

#: how `build` chooses members
SELECTIONS = ("auto", "greedy", "uniform")


def _is_number(x: Any) -> bool:
    """An int or float that is not a bool (infinite allowed: each check says what it takes)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_count(value: Any, name: str, *, minimum: int) -> int:
    """`value` if it is an integer >= `minimum`, else `BadOptionError(option=name)` (the one
    check of a count: members, candidates, points, ...)."""
    if not _is_int(value) or value < minimum:
        raise BadOptionError(f"{name} must be an integer >= {minimum}, got {value!r}", option=name)
    return value


@dataclass(frozen=True)
class CurveConfig:
    """How to fit a curve (validated when made: `BadOptionError` naming the field).

    kind: "bezier" or "polychain"; bends: number of bends n >= 1; epochs: passes over the
    loader (one step per batch); lr: the SGD learning rate *of the curve's points*: the bends'
    own learning rate is ``lr * bend_lr_scale(kind, bends)`` (4 x lr for one Bezier bend,
    see `paths.curves.bend_lr_scale`), so that where the curve moves most with its bends
    (t = 0.5 for one bend) a step moves theta(t) as far as a step at `lr` moves a trained
    model. Held for the first half of the steps, then decayed linearly to 1% of it at the
    last step; momentum: SGD momentum; weight_decay: coefficient of
    ``weight_decay / 2 * ||theta(t)||^2`` (parameters at the sampled point, not the bends);
    seed: seeds the draws of t and the torch RNG used inside (dropout, shuffling), without
    disturbing the caller's RNG state; max_grad_norm: clip the total gradient norm over all
    bends (None: no clipping).
    """

    kind: str = "bezier"
    bends: int = 1
    epochs: int = 20
    lr: float = 0.04
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        validate_curve_config(self)


def validate_curve_config(config: CurveConfig) -> None:
    """Raise `BadOptionError` (naming the option) for an invalid config; `CurveConfig` runs
    it when made."""
    if config.kind not in CURVE_KINDS:
        raise BadOptionError(f"unknown curve kind {config.kind!r}; choose one of {', '.join(CURVE_KINDS)}",
                             option="method")
    if not _is_int(config.bends) or config.bends < 1:
        raise BadOptionError(f"`bends` must be an integer >= 1, got {config.bends!r}", option="bends")
    if not _is_int(config.epochs) or config.epochs < 1:
        raise BadOptionError(f"`epochs` must be an integer >= 1, got {config.epochs!r}", option="epochs")
    if not _is_number(config.lr) or not config.lr > 0 or config.lr == float("inf"):
        raise BadOptionError(f"`lr` must be a positive number, got {config.lr!r}", option="lr")
    if not _is_number(config.momentum) or not 0 <= config.momentum < 1:
        raise BadOptionError(f"`momentum` must be in [0, 1), got {config.momentum!r}", option="momentum")
    if not _is_number(config.weight_decay) or not config.weight_decay >= 0:
        raise BadOptionError(f"`weight_decay` must be >= 0, got {config.weight_decay!r}", option="weight_decay")
    if config.max_grad_norm is not None and (not _is_number(config.max_grad_norm) or not config.max_grad_norm > 0):
        raise BadOptionError(f"`max_grad_norm` must be a positive number or None, got {config.max_grad_norm!r}",
                             option="max_grad_norm")
    if not _is_int(config.seed):
        raise BadOptionError(f"`seed` must be an integer, got {config.seed!r}", option="seed")


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

    method: a path kind ("linear", "bezier", "polychain", "dropout", "short", "neb"; see
    `pipeline.PATH_BUILDERS`) or "fge"; members: at most K distinct members for the greedy
    choice (exactly K with `exact_members`, and for uniform members); selection: "auto"
    (greedy on validation NLL when validation data is given, else uniform), "greedy" or
    "uniform"; candidates: points per path evaluated for the greedy choice (ends included);
    curve fitting: bends, epochs, lr, weight_decay (defaults: those of `CurveConfig`; for
    bezier / polychain they make `curve`, a validated `CurveConfig` whose seed the build
    sets); packed: put the packed pair (its cheap form: no swap search) among the
    report's baselines.
    """

    method: str = "bezier"
    members: int = 4
    exact_members: bool = False
    packed: bool = True
    selection: str = "auto"
    candidates: int = 11
    bends: int = CurveConfig.bends
    epochs: int = CurveConfig.epochs
    lr: float = CurveConfig.lr
    weight_decay: float = CurveConfig.weight_decay
    strategy: str = "loop"  # the ensemble's forward: loop (default), vmap or auto (time both)
    align: bool | None = None  # None: align before fitting a curve (bezier / polychain), not otherwise
    repair: bool = False
    checkpoint_dir: str | None = None  # curve fits save their state here (curve-<i>.safetensors)
    checkpoint_every: int | None = None  # ... every N steps too (always at each epoch's end)
    resume: bool = False  # continue the fits saved in checkpoint_dir
    neb: Any = None  # a paths.neb.NebConfig for --method neb (None: its defaults, --weight-decay, --seed)
    save_dtype: str | None = None  # the ensemble file's member dtype ("fp32", "bf16", "fp16"; None: as trained)
    search_steps: int | None = None  # dropout / short: swap trials per group choosing the halves (None: 48 / 4)
    calibrate: bool = True  # fit a temperature on the selection data (val) and store it in the ensemble file
    curve: CurveConfig | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        check_count(self.members, "members", minimum=1)
        if self.search_steps is not None:
            check_count(self.search_steps, "search_steps", minimum=0)
        if self.selection not in SELECTIONS:
            raise BadOptionError(f"`selection` must be auto, greedy or uniform, got {self.selection!r}",
                                 option="selection")
        check_count(self.candidates, "candidates", minimum=2)
        if self.method in CURVE_KINDS:
            object.__setattr__(self, "curve", CurveConfig(kind=self.method, bends=self.bends, epochs=self.epochs,
                                                          lr=self.lr, weight_decay=self.weight_decay))


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
