"""The main jobs as functions: files -> checkpoints -> path -> scan / members -> ensemble.

The CLI is a thin layer over this module; training scripts can call it directly.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
from dataclasses import dataclass
from pathlib import Path as _FsPath
from typing import Any, Sequence

import torch

from .errors import BadOptionError, CheckpointError, MCEnsembleError
from .evaluate import barrier
from .paths.fit import CurveConfig

__all__ = ["ModelOptions", "DataOptions", "BuildOptions", "BuildResult", "PATH_BUILDERS", "OTHER_METHODS",
           "unit_graph_of", "load_endpoints", "connect", "align_chain", "scan_checkpoints", "scan_path_file", "RepairedPath",
           "build_ensemble", "build_fge", "evaluate_ensemble_file", "describe_checkpoint", "align_files",
           "stability_of_file", "pack_files", "train_default_endpoints", "fresh_run_dir"]

_log = logging.getLogger(__name__)


@dataclass
class ModelOptions:
    """What the user said about the model: a timm `arch` or a `module:function` entry, and overrides."""

    arch: str | None = None
    model: Any = None  # "module:function" string, nn.Module, zero-arg callable or ModelSpec
    num_classes: int | None = None
    in_chans: int | None = None
    ema: bool | None = None
    unit_graph: str | os.PathLike | None = None  # a JSON file of unit groups, instead of tracing


def unit_graph_of(net: torch.nn.Module, opts: ModelOptions):
    """The unit graph given by hand (`--unit-graph FILE.json`, checked against the model), or
    None (the tools then trace the model themselves)."""
    if opts.unit_graph is None:
        return None
    from .units import build_unit_graph
    return build_unit_graph(net, groups=os.fspath(opts.unit_graph))


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


def _model_arg(opts: ModelOptions):
    """The `model=` argument for load_checkpoint: a ModelSpec built from the flags, or what the user passed."""
    from .models import resolve_model_spec
    if opts.model is not None and not isinstance(opts.model, str):
        return opts.model
    if opts.arch is None and opts.model is None:
        return None
    return resolve_model_spec(arch=opts.arch, model=opts.model, num_classes=opts.num_classes,
                              in_chans=opts.in_chans)


def load_endpoints(files: Sequence[str | os.PathLike], opts: ModelOptions) -> list:
    """Load checkpoints and check they share one architecture (first differing tensor named)."""
    from .checkpoints import check_same_architecture, load_checkpoint
    if len(files) < 2:
        raise BadOptionError(f"need at least two checkpoints, got {len(files)}", option="CHECKPOINTS")
    model = _model_arg(opts)
    cks = [load_checkpoint(f, model=model, ema=opts.ema) for f in files]
    for i, ck in enumerate(cks[1:], start=1):
        check_same_architecture(cks[0].state_dict, ck.state_dict, names=(str(files[0]), str(files[i])))
    return cks


def _loaders(model: torch.nn.Module, d: DataOptions):
    from .data import check_input_fits, check_same_classes, create_loader
    if not d.data:
        raise BadOptionError("training data is needed: pass --data SPEC (e.g. --data digits)", option="--data")
    train = create_loader(d.data, split="train", batch_size=d.batch_size, shuffle=False, seed=d.seed, model=model)
    check_input_fits(model, train, spec=d.data)
    val = None
    if d.val_data:
        val = create_loader(d.val_data, split="val", batch_size=d.batch_size, shuffle=False, seed=d.seed, model=model)
        check_same_classes(train, val, train_spec=d.data, val_spec=d.val_data)
        check_input_fits(model, val, spec=d.val_data)
    return train, val


def scan_checkpoints(files: Sequence[str | os.PathLike], *, model: ModelOptions, data: DataOptions,
                     points: int = 11, opts: BuildOptions | None = None, plane: str | os.PathLike | None = None,
                     plane_grid: int = 11) -> dict[str, Any]:
    """Evaluate the path between two checkpoints (the straight line unless `opts.method` says
    otherwise; aligned first with `opts.align`). Returns the JSON-ready report. `plane`: also
    draw the plane through A, B and the bend (curve methods) as a PNG there."""
    opts = opts or BuildOptions(method="linear")
    if points < 2:
        raise BadOptionError(f"--points must be at least 2, got {points}", option="--points")
    if len(files) != 2:
        raise BadOptionError("scan takes exactly two checkpoints", option="CHECKPOINTS")
    _validate_build(opts)
    if opts.repair and opts.method != "linear":
        raise BadOptionError("--repair rescales points of the straight line: use it with --method linear",
                             option="--repair")
    if plane is not None and opts.method not in ("bezier", "polychain"):
        raise BadOptionError(f"a {opts.method} path has no bend: --plane needs --method bezier or polychain "
                             "(or --path FILE of such a path)", option="--plane")
    a, b = load_endpoints(files, model)
    net = a.build_model().to(data.device)
    train, val = _loaders(net, data)
    paths, _, aligned = connect([a.state_dict, b.state_dict], net, opts=opts, data=data, bn_loader=train,
                                graph=unit_graph_of(net, model))
    path = RepairedPath(paths[0], net, train, device=data.device) if opts.repair else paths[0]
    report = _scan_report(path, net, train, val, data, points, plane=plane, plane_grid=plane_grid)
    report["repair"] = opts.repair
    report["checkpoints"] = [{"file": str(f), **_describe(ck)} for f, ck in zip(files, (a, b))]
    report["method"] = opts.method
    if aligned:
        report["aligned"] = aligned[0]
    return report


class RepairedPath:
    """A straight line whose interior points get REPAIR (Jordan et al. 2022): each hidden
    channel's statistics rescaled to the interpolation of the endpoints' (see `align.Repair`)."""

    kind = "linear"

    def __init__(self, path, net, loader, *, device="cpu"):
        from .align import Repair
        self.path, self.endpoints, self.groups = path, path.endpoints, path.groups
        self.certificate = None
        self._repair = Repair(net, *path.endpoints, loader, device=device)

    def state_at(self, t: float) -> dict:
        state = self.path.state_at(t)
        return state if t in (0.0, 1.0) else self._repair(state, t)


def _scan_report(path, net, train, val, data: DataOptions, points: int, *, plane=None,
                 plane_grid: int = 11) -> dict[str, Any]:
    from .bn import has_batchnorm
    from .evaluate import scan
    if plane is not None and "bend.0" not in getattr(path, "groups", {}):
        raise BadOptionError(f"a {path.kind} path has no bend: --plane needs --method bezier or polychain "
                             "(or --path FILE of such a path)", option="--plane")
    result = scan(path, net, train, points=points, val_loader=val, bn_loader=train, device=data.device,
                  progress=data.progress)
    report = result.to_dict()
    from .distributed import is_main, world_size
    report["world_size"] = world_size()
    report["batchnorm"] = has_batchnorm(net)
    report["data"] = {"train": data.data, "val": data.val_data}
    if getattr(path, "certificate", None):
        report["certificate"] = path.certificate
    if plane is not None:
        from .paths import LinearPath
        from .plane import scan_plane
        from .plot import plot_plane
        res = scan_plane(path, net, train, bn_loader=train, resolution=plane_grid, device=data.device,
                         others={"linear": LinearPath(*path.endpoints)}, progress=data.progress)
        if is_main():
            plot_plane(res, plane, title=f"{path.kind} path: the plane through A, B and the bend")
        report["plane"] = {"file": str(plane), **res.to_dict()}
    return report


def scan_path_file(file: str | os.PathLike, *, model: ModelOptions, data: DataOptions,
                   points: int = 11, plane: str | os.PathLike | None = None, plane_grid: int = 11) -> dict[str, Any]:
    """Evaluate a saved path (`--path-out` of build). The model comes from --arch / --model
    or the timm architecture recorded in the file (a recorded module:function is not imported)."""
    from .models import as_factory, create_model
    from .paths import load_path
    path = load_path(file)
    spec = _model_arg(model)
    if spec is None:
        spec = path.model_spec
        if spec is None or spec.entry:
            raise BadOptionError(f"{file} does not name a timm architecture; pass --arch NAME or --model "
                                 "module:function", option="--model")
        net = create_model(spec, trust_entry=False)
    else:
        net = as_factory(spec)()
    net = net.eval().to(data.device)
    train, val = _loaders(net, data)
    report = _scan_report(path, net, train, val, data, points, plane=plane, plane_grid=plane_grid)
    report["path_file"] = str(file)
    report["method"] = path.kind
    return report


def _describe(ck) -> dict[str, Any]:
    md = ck.metadata
    return {k: md.get(k) for k in ("format", "arch", "weights", "sha256") if md.get(k) is not None}


def fresh_run_dir(root: str | os.PathLike = "mcensemble-runs", *, prefix: str = "run") -> _FsPath:
    """A new, empty folder under `root` named by the time (never reuses an existing one)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    root = _FsPath(root)
    for i in range(1000):
        d = root / (f"{prefix}-{stamp}" + (f"-{i}" if i else ""))
        try:
            d.mkdir(parents=True, exist_ok=False)
            return d
        except FileExistsError:
            continue
    raise CheckpointError(f"could not create a fresh folder under {root}")


def train_default_endpoints(out_dir: str | os.PathLike, *, arch: str = "mce_digits_cnn", n: int = 2,
                            epochs: int = 15, seed: int = 0, data: str = "digits", batch_size: int = 64,
                            channel_dropout: float = 0.0, progress: bool | None = None) -> list[_FsPath]:
    """Train `n` small models on the built-in digits from different seeds; save them as safetensors.

    This is the embedded default's first step: it makes checkpoints like the ones users bring.
    `channel_dropout`: p of `mcensemble.hooks.channel_dropout` during training (what makes
    models dropout-stable).
    """
    from . import zoo  # noqa: F401  (registers the mce_* architectures with timm)
    from .checkpoints import save_checkpoint
    from .data import create_loader
    from .models import ModelSpec, create_model
    from .train import TrainConfig, train_model
    spec = ModelSpec(arch=arch, kwargs={"num_classes": 10, "in_chans": 1})
    files = []
    for i in range(n):
        torch.manual_seed(seed + i)
        net = create_model(spec)
        loader = create_loader(data, split="train", batch_size=batch_size, shuffle=True, seed=seed + i, model=net)
        hook = None
        if channel_dropout:
            from .data import example_input
            from .hooks import channel_dropout as _cd
            hook = lambda m: _cd(m, channel_dropout, example_input=example_input(m, data=loader))  # noqa: E731
        train_model(net, loader, config=TrainConfig(epochs=epochs, seed=seed + i), progress=progress, hook=hook)
        dest = _FsPath(out_dir) / f"endpoint{i}.safetensors"
        save_checkpoint(net.state_dict(), dest, metadata={"arch": arch, "num_classes": 10, "in_chans": 1,
                                                           "seed": seed + i, "epochs": epochs, "data": data,
                                                           "channel_dropout": channel_dropout})
        files.append(dest)
    return files


def _mcensemble_header(file: str | os.PathLike) -> dict[str, Any] | None:
    """The `mcensemble` JSON of a safetensors header, or None (not safetensors, no such key)."""
    import json
    try:
        from safetensors import safe_open
        with safe_open(str(file), framework="pt") as f:
            raw = (f.metadata() or {}).get("mcensemble")
        return json.loads(raw) if raw else None
    except Exception:  # not safetensors / unreadable: the checkpoint reader gives the real error
        return None


def _describe_own_file(file: str | os.PathLike, doc: dict[str, Any]) -> dict[str, Any]:
    """`inspect` of an ensemble or path file: validated through their own readers."""
    from .models import ModelSpec
    spec = ModelSpec.from_dict(doc["model"]).describe() if doc.get("model") else "not recorded (pass model=)"
    info: dict[str, Any] = {"file": str(file), "format": f"{doc['format']} v{doc.get('format_version')}",
                            "model": spec}
    if doc["format"] == "mcensemble-ensemble":
        from .ensemble import read_ensemble_metadata
        doc = read_ensemble_metadata(file)
        info["members"] = len(doc.get("members") or [])
        info["t"] = ", ".join("?" if m.get("t") is None else f"{m['t']:.3f}" for m in doc.get("members") or [])
        info["combine"] = doc.get("combine")
    else:
        from .paths import load_path
        path = load_path(file)
        info["kind"] = path.kind
        if path.vertices is not None:
            info["vertices"] = len(path.vertices)
        if path.certificate:
            info["certificate"] = {k: path.certificate.get(k) for k in ("max_loss", "eps", "loss_a", "loss_b")}
    hashes = doc.get("tensor_sha256")
    info["hashes"] = (f"SHA-256 of {len(hashes)} tensors recorded (check them: inspect --verify)"
                      if isinstance(hashes, dict) and hashes else "none recorded (a file from before they were)")
    skip = {"format", "format_version", "model", "members", "groups", "vertices", "certificate", "tensor_sha256"}
    info["metadata"] = {k: v for k, v in doc.items() if k not in skip}
    return info


def describe_checkpoint(file: str | os.PathLike, opts: ModelOptions, *, units: bool = False,
                        units_out: str | os.PathLike | None = None) -> dict[str, Any]:
    """What `mcensemble inspect` prints: format, architecture, sizes, dtypes, EMA, metadata;
    with `units`, the unit graph (traced, or `opts.unit_graph` checked against the model);
    `units_out` writes it as JSON, to edit and pass back with `--unit-graph`."""
    from collections import Counter
    from .checkpoints import load_checkpoint
    doc = _mcensemble_header(file)
    if doc and doc.get("format") in ("mcensemble-ensemble", "mcensemble-path"):
        return _describe_own_file(file, doc)
    ck = load_checkpoint(file, model=_model_arg(opts), ema=opts.ema)
    sd, md = ck.state_dict, dict(ck.metadata)
    dtypes = Counter(str(v.dtype).replace("torch.", "") for v in sd.values())
    info: dict[str, Any] = {
        "file": str(file),
        "format": md.pop("format", "?"),
        "arch": md.pop("arch", None) or (opts.arch or opts.model or "unknown (pass --arch or --model)"),
        "tensors": len(sd),
        "parameters": f"{sum(v.numel() for v in sd.values() if v.is_floating_point()):,} floating values",
        "dtypes": ", ".join(f"{k} x{n}" for k, n in sorted(dtypes.items())),
        "weights": md.pop("weights", None) or "plain state dict (no EMA)",
        "sha256": md.pop("sha256", None),
        "metadata": {k: v for k, v in md.items() if v is not None and k != "source"},
    }
    if units or units_out:
        from .data import example_input
        from .units import build_unit_graph
        net = ck.build_model()
        graph = unit_graph_of(net, opts) or build_unit_graph(net, example_input(net))
        info["units"] = graph.describe()
        if units_out is not None:
            graph.save(units_out)
            info["units_file"] = str(units_out)
    return info


# ---------------------------------------------------------------------------------------------
# build: checkpoints -> paths -> members -> ensemble


@dataclass
class BuildOptions:
    """How to connect the checkpoints and sample the ensemble.

    method: a key of `PATH_BUILDERS` ("linear", "bezier", "polychain", "dropout", "short");
    members: at most K distinct members for the greedy choice (exactly K with
    `exact_members`, and for uniform members); selection: "auto" (greedy on validation NLL
    when validation data is given, else uniform), "greedy" or "uniform"; candidates: points
    per path evaluated for the greedy choice (ends included); curve fitting: bends, epochs,
    lr, weight_decay (defaults: those of `paths.fit.CurveConfig`); packed: put the packed
    pair (a stability search on both checkpoints) among the report's baselines.
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
    strategy: str = "auto"
    align: bool | None = None  # None: align before fitting a curve (bezier / polychain), not otherwise
    repair: bool = False
    checkpoint_dir: str | None = None  # curve fits save their state here (curve-<i>.safetensors)
    checkpoint_every: int | None = None  # ... every N steps too (always at each epoch's end)
    resume: bool = False  # continue the fits saved in checkpoint_dir
    neb: Any = None  # a paths.neb.NebConfig for --method neb (None: its defaults, --weight-decay, --seed)
    save_dtype: str | None = None  # the ensemble file's member dtype ("fp32", "bf16", "fp16"; None: as trained)
    search_steps: int | None = None  # dropout / short: swap trials per group choosing the halves (None: 48 / 4)


def _linear_builder(net, a, b, *, opts: BuildOptions, data: DataOptions, fit_loader, bn_loader, index: int = 0,
                    graph=None):
    from .paths import LinearPath
    return LinearPath(a, b)


def _curve_builder(net, a, b, *, opts: BuildOptions, data: DataOptions, fit_loader, bn_loader, index: int = 0,
                   graph=None):
    from .paths.fit import fit_curve
    cfg = CurveConfig(kind=opts.method, bends=opts.bends, epochs=opts.epochs, lr=opts.lr,
                      weight_decay=opts.weight_decay, seed=data.seed)
    ck = None if opts.checkpoint_dir is None else os.path.join(opts.checkpoint_dir, f"curve-{index}.safetensors")
    return fit_curve(net, a, b, fit_loader, config=cfg, device=data.device, progress=data.progress,
                     checkpoint=ck, checkpoint_every=opts.checkpoint_every, resume=opts.resume)


def _dropout_builder(net, a, b, *, opts: BuildOptions, data: DataOptions, fit_loader, bn_loader, index: int = 0,
                     graph=None):
    from .paths.dropout import build_dropout_path
    return build_dropout_path(net, a, b, bn_loader, graph=graph, device=data.device, progress=data.progress,
                              search_steps=48 if opts.search_steps is None else opts.search_steps)


def _short_builder(net, a, b, *, opts: BuildOptions, data: DataOptions, fit_loader, bn_loader, index: int = 0,
                   graph=None):
    from .paths.short import build_short_path
    return build_short_path(net, a, b, bn_loader, graph=graph, device=data.device, progress=data.progress,
                            seed=data.seed, search_steps=4 if opts.search_steps is None else opts.search_steps)


def _neb_builder(net, a, b, *, opts: BuildOptions, data: DataOptions, fit_loader, bn_loader, index: int = 0,
                 graph=None):
    from .paths.neb import NebConfig, fit_neb
    cfg = opts.neb if opts.neb is not None else NebConfig(weight_decay=opts.weight_decay, seed=data.seed)
    ck = None if opts.checkpoint_dir is None else os.path.join(opts.checkpoint_dir, f"neb-{index}.safetensors")
    return fit_neb(net, a, b, fit_loader, config=cfg, bn_loader=bn_loader, device=data.device,
                   progress=data.progress, checkpoint=ck, checkpoint_every=opts.checkpoint_every, resume=opts.resume)


#: method name -> function(net, a, b, *, opts, data, fit_loader, bn_loader, index, graph) -> Path
#: (`index`: which consecutive pair; `graph`: a hand-given unit graph or None)
PATH_BUILDERS = {"linear": _linear_builder, "bezier": _curve_builder, "polychain": _curve_builder,
                 "dropout": _dropout_builder, "short": _short_builder, "neb": _neb_builder}

#: methods whose path is trained on shuffled batches of the training data (`connect` makes that loader)
TRAINED_METHODS = ("bezier", "polychain", "neb")


#: methods that are not paths between checkpoints
OTHER_METHODS = ("fge",)


def _validate_build(opts: BuildOptions) -> None:
    import difflib
    if opts.method not in PATH_BUILDERS:
        known = [*PATH_BUILDERS, *OTHER_METHODS]
        close = difflib.get_close_matches(opts.method, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise BadOptionError(f"unknown method {opts.method!r}; choose one of {', '.join(known)}.{hint}",
                             option="--method")
    if opts.members < 1:
        raise BadOptionError(f"--members must be at least 1, got {opts.members}", option="--members")
    if opts.selection not in ("auto", "greedy", "uniform"):
        raise BadOptionError(f"--selection must be auto, greedy or uniform, got {opts.selection!r}",
                             option="--selection")
    if opts.candidates < 2:
        raise BadOptionError(f"--candidates must be at least 2, got {opts.candidates}", option="--candidates")
    if opts.method in ("bezier", "polychain"):
        from .paths.fit import validate_curve_config
        validate_curve_config(CurveConfig(kind=opts.method, bends=opts.bends, epochs=opts.epochs, lr=opts.lr,
                                          weight_decay=opts.weight_decay))


@dataclass
class BuildResult:
    """What `build_ensemble` made: the paths, the chosen members and the JSON report."""

    paths: list
    members: list  # Candidate
    member_states: list
    report: dict[str, Any]
    model_spec: Any = None
    weights: list | None = None  # the members' weights (None: equal)


def align_chain(states: Sequence[dict], net: torch.nn.Module, *, seed: int = 0, graph=None,
                progress: bool | None = None, data: Any = None) -> tuple[list[dict], list[dict[str, Any]]]:
    """Permute each checkpoint's hidden units to match the one before it (weight matching on
    the unit graph, traced unless `graph` is given). The permuted states compute exactly the
    functions of the originals (checked on an input batch). `data` (a DataLoader or a data
    spec): where that batch, and the one the graph is traced with, come from (default: a
    shape guessed from the model, see `data.example_input`)."""
    from .align import align_states
    from .data import example_input
    from .units import build_unit_graph
    x = example_input(net, data=data)
    graph = graph if graph is not None else build_unit_graph(net, x[:1])
    out, info = [dict(states[0])], []
    for s in states[1:]:
        res = align_states(net, out[-1], s, graph=graph, example_input=x, seed=seed, progress=progress)
        out.append(res.state)
        info.append(res.to_dict())
    return out, info


def connect(states: Sequence[dict], net: torch.nn.Module, *, opts: BuildOptions, data: DataOptions,
            bn_loader, graph=None) -> tuple[list, list[dict], list[dict[str, Any]]]:
    """Paths between consecutive states by `opts.method` (after alignment with `opts.align`).
    `graph`: the unit graph given by hand (alignment, dropout paths), else traced when needed.

    Returns (paths, the endpoint states the paths use, alignment reports). With `--align`
    (by default for bezier / polychain curves, whose bends then start from the aligned
    midpoints: docs/benchmarks/quality.md), every checkpoint after the first is replaced by
    its permutation matching the previous one, so the paths end at permuted checkpoints that
    compute the same functions. A model that cannot be traced is then fitted unaligned, with
    a warning, unless `opts.align` is True."""
    aligned: list[dict[str, Any]] = []
    if opts.align or (opts.align is None and opts.method in ("bezier", "polychain")):
        try:
            states, aligned = align_chain(states, net, seed=data.seed, graph=graph, progress=data.progress,
                                          data=bn_loader)
        except MCEnsembleError as e:  # by default a curve is fitted between the checkpoints as they are
            if opts.align:
                raise
            _log.warning("cannot align the checkpoints before fitting the curve (%s); fitting it between "
                         "them as they are (pass --no-align to skip alignment)", e)
    fit_loader = None
    if opts.method in TRAINED_METHODS:
        from .data import create_loader
        fit_loader = create_loader(data.data, split="train", batch_size=data.batch_size, shuffle=True,
                                   seed=data.seed, model=net)
    builder = PATH_BUILDERS[opts.method]
    paths = [builder(net, a, b, opts=opts, data=data, fit_loader=fit_loader, bn_loader=bn_loader, index=i,
                     graph=graph) for i, (a, b) in enumerate(zip(states[:-1], states[1:]))]
    return paths, list(states), aligned


def _check_build_request(files: Sequence, opts: BuildOptions, data: DataOptions, path_out) -> bool:
    """Validate a build before any file is read; returns whether members are chosen greedily."""
    _validate_build(opts)
    if path_out is not None and len(files) != 2:
        raise BadOptionError("--path-out needs exactly two checkpoints (one path)", option="--path-out")
    greedy = opts.selection == "greedy" or (opts.selection == "auto" and bool(data.val_data))
    if greedy and not data.val_data:
        raise BadOptionError("--selection greedy needs --val-data", option="--selection")
    n_grid = max(len(files) - 1, 1) * (opts.candidates - 1) + 1
    if greedy and opts.members > n_grid:
        raise BadOptionError(f"--members {opts.members} is more than the {n_grid} candidate points; "
                             "raise --candidates or lower --members", option="--members")
    return greedy


def _choose_members(paths: list, ends: list, net, train, val, opts: BuildOptions, data: DataOptions, *,
                    greedy: bool) -> tuple[list, list, list[float], dict[str, Any], list]:
    """(grid, members, weights, choice, straight-line grid): `opts.candidates` points per
    path (joined paths share their ends) scanned for the report, the plot and the choice;
    members chosen on validation NLL among the grid (`members.select_members`: greedy with
    replacement behind a bootstrap gate, or exactly `opts.members` with `exact_members`), or
    uniform in t with equal weights. `choice`: the decision and its numbers, for the report."""
    from .members import evaluate_candidates, select_members, uniform_points
    n_paths, g = len(paths), opts.candidates
    grid_points = [(p, i / (g - 1), (p + i / (g - 1)) / n_paths) for p in range(n_paths) for i in range(g)
                   if p == 0 or i > 0]

    def scan_points(ps, points):
        return evaluate_candidates(ps, net, points, train_loader=train, val_loader=val, device=data.device,
                                   progress=data.progress)

    grid = scan_points(paths, grid_points)
    if greedy:
        sel = select_members(grid, _labels(val), max_members=opts.members, exact=opts.exact_members,
                             endpoints=[i for i, c in enumerate(grid) if c.t in (0.0, 1.0)], seed=data.seed)
        members, weights = [grid[i] for i in sel.indices], sel.weights
        choice = _choice_report(sel, grid, opts)
    else:
        members = scan_points(paths, uniform_points(opts.members, n_paths))
        weights = [1.0 / len(members)] * len(members)
        choice = {"rule": "uniform", "data": "val" if val is not None else None, "max_members": opts.members,
                  "exact": True, "n_members": len(members), "weights": weights, "guarantee": None}
    from .baselines import decision_sentence
    choice["decision"] = decision_sentence(choice)
    line = grid
    if opts.method != "linear":
        from .paths import LinearPath
        line = scan_points([LinearPath(a, b) for a, b in zip(ends[:-1], ends[1:])], grid_points)
    return grid, members, weights, choice, line


def _choice_report(sel, grid, opts: BuildOptions) -> dict[str, Any]:
    """The member choice for the report: the rule that won, the members and weights, the
    selection NLL of each cheaper choice and of the result, the bootstrap tests, the guarantee."""
    def where(i: int) -> dict[str, Any]:
        return {"t": grid[i].u, "path": grid[i].path, "path_t": grid[i].t}

    b = sel.baselines
    nll: dict[str, Any] = {"best_single": b["best_single"]["nll"], "best_single_t": grid[b["best_single"]["index"]].u,
                           "endpoints": [{**where(e["index"]), "nll": e["nll"]} for e in b["endpoints"]],
                           "chosen": sel.nll}
    if "endpoints_ensemble" in b:
        nll["endpoints_ensemble"] = b["endpoints_ensemble"]["nll"]
    greedy = dict(sel.greedy)
    if greedy:
        greedy["members"] = [{**where(i), "count": c} for i, c in zip(greedy.pop("indices"), greedy.pop("counts"))]
    return {"rule": sel.rule, "data": "val", "max_members": opts.members, "exact": opts.exact_members,
            "n_members": len(sel.indices), "weights": sel.weights, "counts": sel.counts,
            "members": [{**where(i), "count": c, "weight": w} for i, c, w in zip(sel.indices, sel.counts, sel.weights)],
            "selection_nll": nll, "greedy": greedy, "bootstrap": sel.tests, "guarantee": sel.guarantee}


def build_ensemble(files: Sequence[str | os.PathLike], *, model: ModelOptions, data: DataOptions,
                   opts: BuildOptions, out: str | os.PathLike | None = None, path_out: str | os.PathLike | None = None,
                   soup: str | os.PathLike | None = None) -> BuildResult:
    """Connect consecutive checkpoints by paths, choose members along them, write the ensemble.

    Everything is validated before any work; outputs are written atomically at the end (by
    rank 0 only under torchrun). The report carries the baselines (`report["baselines"]`).
    """
    import time
    from ._io import sha256_file
    from .bn import has_batchnorm
    from .distributed import is_main
    from .ensemble import EnsembleModel, save_ensemble
    from .members import candidate_state
    if opts.method == "fge":
        return build_fge(files, model=model, data=data, opts=opts, out=out, soup=soup)
    greedy = _check_build_request(files, opts, data, path_out)
    t0 = time.perf_counter()
    cks = load_endpoints(files, model)
    net = cks[0].build_model().to(data.device)
    train, val = _loaders(net, data)
    test = _test_loader(net, data)
    timings: dict[str, float] = {"load_s": time.perf_counter() - t0}
    paths, ends, aligned = connect([ck.state_dict for ck in cks], net, opts=opts, data=data, bn_loader=train,
                                   graph=unit_graph_of(net, model))
    timings["path_s"] = time.perf_counter() - t0 - timings["load_s"]
    t2 = time.perf_counter()
    grid, members, weights, choice, line = _choose_members(paths, ends, net, train, val, opts, data, greedy=greedy)
    states = [candidate_state(paths[c.path], c) for c in members]
    timings["members_s"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    ens = EnsembleModel(net, states, strategy=opts.strategy, device=data.device, weights=weights)
    report = _build_report(files, cks, paths, grid, members, weights, line, opts, data, greedy=greedy,
                           batchnorm=has_batchnorm(net), ensemble=_ens_metrics(ens, train, val, data.device, test))
    report["choice"] = choice
    if aligned:
        report["aligned"] = aligned
    soup_sd = _soup(net, states, weights, train, data)
    report["baselines"] = _build_baselines(net, grid, paths, ends, soup_sd, report, opts, data,
                                           graph=unit_graph_of(net, model), loaders=(train, val, test))
    timings["baselines_s"] = time.perf_counter() - t3
    spec, kind = cks[0].model_spec, paths[0].kind
    sources = [{"file": str(f), "sha256": ck.metadata.get("sha256") or sha256_file(ck.path)}
               for f, ck in zip(files, cks)]
    if out is not None and is_main():  # several processes: only rank 0 writes
        save_ensemble(out, states, model_spec=spec, members=[c.info(kind) for c in members], sources=sources,
                      weights=weights, dtype=opts.save_dtype, extra={"method": opts.method, "selection": report["selection"],
                                              "choice": _choice_summary(choice),
                                              "bn_reestimated": report["bn_reestimated"], "n_paths": len(paths)})
    if path_out is not None and is_main():
        paths[0].save(path_out, model_spec=spec, extra={"sources": sources})
    if soup is not None:
        report["soup"] = _write_soup(soup, soup_sd, net, train, val, cks[0], data)
    timings["write_s"] = time.perf_counter() - t3 - timings["baselines_s"]
    timings["total_s"] = time.perf_counter() - t0
    report["timings"] = timings
    return BuildResult(paths=paths, members=members, member_states=states, report=report, model_spec=spec,
                       weights=weights)


def _choice_summary(choice: dict[str, Any]) -> dict[str, Any]:
    """What the ensemble file records of the choice (the report has the rest)."""
    keys = ("rule", "data", "max_members", "exact", "n_members", "decision", "guarantee")
    out = {k: choice.get(k) for k in keys}
    if "selection_nll" in choice:
        out["selection_nll"] = {k: v for k, v in choice["selection_nll"].items() if k != "endpoints"}
    return out


def _test_loader(net, data: DataOptions):
    """The `--test-data` loader (digits: its held-out split), or None; warns when it is
    the same spec as the training or validation data."""
    if not data.test_data:
        return None
    from .data import check_input_fits, create_loader
    overlap = _test_overlap(data)
    if overlap:
        _log.warning(overlap)
    test = create_loader(data.test_data, split="val", batch_size=data.batch_size, shuffle=False, seed=data.seed,
                         model=net)
    check_input_fits(net, test, spec=data.test_data)
    return test


def _test_overlap(data: DataOptions) -> str | None:
    """A warning when --test-data names the validation data, or the training data (digits
    specs aside: their test and training splits differ)."""
    t = data.test_data
    digits = t is not None and (t == "digits" or t.startswith("digits,"))
    what = "validation" if t == data.val_data else "training" if t == data.data and not digits else None
    return None if not t or what is None else (f"--test-data {t} is also the {what} data: its numbers are not "
                                               "on data used for nothing else")


def _data_report(data: DataOptions) -> dict[str, Any]:
    d = {"train": data.data, "val": data.val_data}
    if data.test_data:
        d["test"] = data.test_data
    return d


def _soup(net, states, weights, train, data: DataOptions) -> dict[str, torch.Tensor]:
    from .baselines import soup_state
    return soup_state(net, states, weights, train, device=data.device)


def _report_splits(train, val, test) -> dict[str, Any]:
    """The splits every baseline row is scored on: "val" (else "train") and "test"."""
    splits = {"val": val} if val is not None else {"train": train}
    if test is not None:
        splits["test"] = test
    return splits


TRAIN_ONLY_WARNING = ("no --val-data: the members were not chosen on held-out data, and every number in the "
                      "report is on the training data, which also fitted the checkpoints and the path; pass "
                      "--val-data SPEC (and --test-data SPEC) for an honest comparison")



def _packed_row(sc, net, a, b, train, *, graph=None, data) -> dict[str, Any]:
    """The packed pair's report row: scored by `sc`, or skipped with the reason it does not apply."""
    from .baselines import packed_state, skipped_row  # the report's machinery, not CLI start-up's
    packed, why = packed_state(net, a, b, train, graph=graph, device=data.device, progress=data.progress)
    if packed is None:
        return skipped_row("packed pair", "packed", 1, why)
    sc.add("packed", packed)
    return sc.row("packed pair", "packed", ["packed"])

def _build_baselines(net, grid, paths, ends, soup_sd, report, opts: BuildOptions, data: DataOptions, *, graph,
                     loaders) -> list[dict[str, Any]]:
    """Rows: each checkpoint (cost 1), their equal-weight ensemble (cost = their number),
    the soup (cost 1), the packed pair (cost 1, two checkpoints of a layered network) and
    the built ensemble (cost K), on the report's splits."""
    from .baselines import Scorer, skipped_row
    from .members import candidate_state
    train, val, test = loaders
    sc = Scorer(net, _report_splits(train, val, test), device=data.device)
    ends_c = _endpoint_cands(grid, len(paths))
    for name, c in ends_c:
        sc.add(name, candidate_state(paths[c.path], c), known={"val": c.val_log_probs})
    rows = [sc.row(f"endpoint {name}", "endpoint", [name], t=c.u) for name, c in ends_c]
    names = [n for n, _ in ends_c]
    rows.append(sc.row(f"{'+'.join(names)} ensemble", "endpoints-ensemble", names))
    sc.add("soup", soup_sd)
    rows.append(sc.row("soup", "soup", ["soup"], note=_soup_note(report)))
    if not opts.packed:
        rows.append(skipped_row("packed pair", "packed", 1, "not computed (packed=False / --no-packed)"))
    elif len(ends) != 2:
        rows.append(skipped_row("packed pair", "packed", 1, f"packs two checkpoints; {len(ends)} were given"))
    else:
        rows.append(_packed_row(sc, net, ends[0], ends[1], train, graph=graph, data=data))
    e = report["ensemble"]
    k = len(report["members"])
    rows.append({"name": f"built ensemble ({k} member{'s' if k != 1 else ''})", "kind": "ensemble",
                 "cost": sum(1 for m in report["members"] if m["weight"] > 0),
                 **{s: e[s] for s in sc.splits if s in e}})
    return rows


def _soup_note(report) -> str:
    from .baselines import SOUP_NOTE
    return SOUP_NOTE if report.get("batchnorm") else SOUP_NOTE.split(",")[0] + " (no BatchNorm)"


def _build_report(files, cks, paths, grid, members, weights, line, opts: BuildOptions, data: DataOptions, *,
                  greedy: bool, batchnorm: bool, ensemble: dict[str, Any]) -> dict[str, Any]:
    """The JSON report of `build`: endpoints, members, the ensemble, both scans. BatchNorm
    statistics are re-estimated at every point of a BN model."""
    from .distributed import world_size
    bn = batchnorm
    report: dict[str, Any] = {
        "method": opts.method, "selection": "greedy-val-nll" if greedy else "uniform",
        "checkpoints": [{"file": str(f), **_describe(ck)} for f, ck in zip(files, cks)],
        "data": _data_report(data), "seed": data.seed,
        "batchnorm": bn, "bn_reestimated": bn,
        "endpoints": {name: _cand_metrics(c) for name, c in _endpoint_cands(grid, len(paths))},
        "members": [{**c.info(paths[0].kind), "weight": w} for c, w in zip(members, weights)],
        "ensemble": ensemble,
        "path": _scan_summary(grid), "line": _scan_summary(line), "world_size": world_size(),
        "split": "val" if data.val_data else "train", "warnings": [],
    }
    if not data.val_data:
        _log.warning(TRAIN_ONLY_WARNING)
        report["warnings"].append(TRAIN_ONLY_WARNING)
    if _test_overlap(data):
        report["warnings"].append(_test_overlap(data))
    if opts.method in ("bezier", "polychain"):
        report["curve"] = {"kind": opts.method, "bends": opts.bends, "epochs": opts.epochs, "lr": opts.lr,
                           "weight_decay": opts.weight_decay}
        fits = [p.metadata.get("fit") or {} for p in paths]
        if any("precision" in f for f in fits):  # --precision bf16 / fp16; fp16: GradScaler's skipped steps
            report["curve"]["precision"] = fits[0]["precision"]
        if any("skipped_steps" in f for f in fits):
            report["curve"]["skipped_steps"] = [f.get("skipped_steps", 0) for f in fits]
    if opts.method == "neb":  # each band's schedule and what every cycle inserted
        report["neb"] = [p.metadata.get("neb") for p in paths]
    if getattr(paths[0], "certificate", None):
        report["certificates"] = [p.certificate for p in paths]
    return report


def _scan_summary(cands) -> dict[str, Any]:
    return {"points": [_cand_metrics(c) for c in cands], "worst": _cand_metrics(max(cands, key=_train_loss)),
            "barrier": _barrier(cands)}


def _train_loss(c) -> float:
    return c.train.loss


def _barrier(cands) -> float:
    """The largest of the joined paths' barriers (`evaluate.barrier` of each path's scanned
    points; 0 when no path has both ends scanned)."""
    by_path: dict[int, dict[float, float]] = {}
    for c in cands:  # joined paths share their ends: path p starts where path p - 1 ends
        by_path.setdefault(c.path, {})[c.t] = c.train.loss
        if c.t == 1.0:
            by_path.setdefault(c.path + 1, {}).setdefault(0.0, c.train.loss)
    heights = [barrier(sorted(pts), [pts[t] for t in sorted(pts)])[0]
               for pts in by_path.values() if 0.0 in pts and 1.0 in pts]
    return max([0.0, *heights])


def _labels(loader) -> torch.Tensor:
    from .bn import labelled_batch
    return torch.cat([labelled_batch(b, what="choosing members on --val-data")[1] for b in loader])


def _cand_metrics(c) -> dict[str, Any]:
    d: dict[str, Any] = {"t": c.u, "path": c.path, "path_t": c.t}
    if c.train is not None:
        d.update(loss=c.train.loss, acc=c.train.acc, nll=c.train.nll, ece=c.train.ece)
    if c.val is not None:
        d.update(val_loss=c.val.loss, val_acc=c.val.acc, val_nll=c.val.nll, val_ece=c.val.ece)
    return d


def _endpoint_cands(grid, n_paths: int):
    """(name, candidate) for every checkpoint: the grid points at u = p / n_paths."""
    names = [chr(ord("A") + i) if n_paths < 26 else f"ckpt{i}" for i in range(n_paths + 1)]
    ends = [c for c in grid if c.t in (0.0, 1.0)]
    return list(zip(names, sorted(ends, key=lambda c: c.u)))


def _ens_metrics(ens, train, val, device, test=None) -> dict[str, Any]:
    from .evaluate import evaluate
    out = {"train": evaluate(ens, train, device=device, progress=False).to_dict()}
    if val is not None:
        out["val"] = evaluate(ens, val, device=device, progress=False).to_dict()
    if test is not None:
        out["test"] = evaluate(ens, test, device=device, progress=False).to_dict()
    out["strategy"] = ens.strategy
    return out


def _write_soup(dest, soup_sd, net, train, val, ck, data: DataOptions) -> dict[str, Any]:
    """Write the soup (`baselines.soup_state`: the members' weighted average, BN
    re-estimated) as one plain checkpoint; its training and validation metrics."""
    from .checkpoints import save_checkpoint
    from .distributed import is_main
    from .evaluate import evaluate
    net.load_state_dict(soup_sd, strict=True)
    md = {k: ck.metadata.get(k) for k in ("arch", "num_classes", "in_chans", "model_args")
          if ck.metadata.get(k) is not None}
    md["kind"] = "soup"
    if is_main():
        save_checkpoint({k: v.detach().cpu() for k, v in soup_sd.items()}, dest, metadata=md)
    res = {"file": str(dest), "train": evaluate(net, train, device=data.device, progress=False).to_dict()}
    if val is not None:
        res["val"] = evaluate(net, val, device=data.device, progress=False).to_dict()
    return res


def evaluate_ensemble_file(file: str | os.PathLike, *, model: Any = None, trust_remote_code: bool = False,
                           data: DataOptions) -> dict[str, Any]:
    """Each member's and the (weighted) ensemble's accuracy, NLL and ECE on the evaluation
    data (`data.val_data`, else `data.data`; digits: its val split), and the baselines
    (`report["baselines"]`): the checkpoints the file records as sources (when the files are
    still there and unchanged) and their ensemble, the soup and the packed pair (both need
    training data: `data.data` when `data.val_data` is given; a soup without BatchNorm does
    not), each on the evaluation data and on `data.test_data`."""
    from .data import check_input_fits, create_loader
    from .ensemble import load
    from .members import ensemble_metrics, predict_log_probs
    if isinstance(model, str):
        from .models import ModelSpec, import_entry
        import_entry(model)  # fail early, naming the spec
        model = ModelSpec(entry=model)
    ens = load(file, model=model, trust_remote_code=trust_remote_code, device=data.device)
    spec = data.val_data or data.data
    split = "val" if data.val_data or (data.data or "").startswith("digits") else "train"
    net = ens.members[0]
    loader = create_loader(spec, split=split, batch_size=data.batch_size, model=net)
    check_input_fits(net, loader, spec=spec)
    per, labels = [], None
    for member in ens.members:
        lp, labels = predict_log_probs(member, loader, device=data.device)
        per.append(lp)
    info = ens.metadata.get("members")
    info = info if isinstance(info, list) and len(info) == len(per) else [{} for _ in per]
    members = [{**ensemble_metrics([lp], labels).to_dict(), "t": m.get("t") if isinstance(m, dict) else None,
                "weight": w} for m, lp, w in zip(info, per, ens.weights)]
    rep = {"file": str(file), "data": spec, "split": split, "members": members,
           "ensemble": ensemble_metrics(per, labels, ens.weights).to_dict(), "strategy": ens.strategy,
           "test_data": data.test_data}
    train = None
    if data.val_data and data.data:
        train = create_loader(data.data, split="train", batch_size=data.batch_size, model=net)
    rep["baselines"] = _eval_baselines(ens, file, per, loader, train, _test_loader(net, data), model, data)
    return rep


def _source_states(ens, file, model) -> tuple[list[tuple[str, dict]], list[tuple[str, str]]]:
    """(name, state dict) of each recorded source checkpoint still there and unchanged (a
    relative name is also looked for next to the ensemble file), and why others were not used."""
    from ._io import sha256_file
    from .checkpoints import load_checkpoint
    found, why = [], []
    for i, src in enumerate(ens.metadata.get("sources") or []):
        name = chr(ord("A") + i) if i < 26 else f"ckpt{i}"
        f = src.get("file") if isinstance(src, dict) else None
        cands = [] if not f else [_FsPath(f), _FsPath(file).parent / f]
        path = next((p for p in cands if p.exists()), None)
        if path is None:
            why.append((name, f"source {f!r} is not there"))
            continue
        try:
            ck = load_checkpoint(path, model=model if model is not None else ens.model_spec)
            sha = ck.metadata.get("sha256") or sha256_file(ck.path)
        except Exception as e:  # noqa: BLE001 - a baseline that cannot be read is skipped, with the reason
            why.append((name, f"{path} could not be read ({type(e).__name__}: {str(e).splitlines()[0][:200]})"))
            continue
        if src.get("sha256") and sha != src["sha256"]:
            why.append((name, f"{path} changed since the build (sha256 differs)"))
            continue
        found.append((name, ck.state_dict))
    return found, why


def _eval_baselines(ens, file, per, loader, train, test, model, data: DataOptions) -> list[dict[str, Any]]:
    """`eval`'s rows: the recorded checkpoints (as saved) and their ensemble, the soup, the
    packed pair and the file's ensemble, on the evaluation data ("eval") and `--test-data`."""
    import copy
    from .baselines import Scorer, skipped_row, soup_state, weighted_average
    from .bn import has_batchnorm
    splits = {"eval": loader, **({"test": test} if test is not None else {})}
    net = ens.members[0]
    sc = Scorer(net, splits, device=data.device)
    for i, member in enumerate(ens.members):
        sc.add(("member", i), model=member, known={"eval": per[i]})
    srcs, why = _source_states(ens, file, model)
    rows: list[dict[str, Any]] = []
    names: list[str] = []
    for name, st in srcs:
        try:
            sc.add(name, st)
        except Exception as e:  # noqa: BLE001 - e.g. a source of another architecture
            why.append((name, f"does not load into the ensemble's model ({str(e).splitlines()[0][:200]})"))
            continue
        rows.append(sc.row(f"endpoint {name}", "endpoint", [name]))
        names.append(name)
    if len(names) >= 2:
        rows.append(sc.row(f"{'+'.join(names)} ensemble", "endpoints-ensemble", names))
    rows += [skipped_row(f"endpoint {name}", "endpoint", 1, reason) for name, reason in why]
    bn = has_batchnorm(net)
    need_train = "needs training data: pass --data TRAIN --val-data EVAL"
    if train is None and bn:
        rows.append(skipped_row("soup", "soup", 1, need_train + " (BatchNorm is re-estimated on it)"))
    else:
        states = ens.member_states()
        soup = soup_state(copy.deepcopy(net), states, ens.weights, train, device=data.device) if bn else \
            weighted_average(states, ens.weights)
        sc.add("soup", soup)
        rows.append(sc.row("soup", "soup", ["soup"]))
    if len(srcs) != 2:
        rows.append(skipped_row("packed pair", "packed", 1, f"packs two recorded checkpoints; {len(srcs)} found"))
    elif train is None:
        rows.append(skipped_row("packed pair", "packed", 1, need_train))
    else:
        rows.append(_packed_row(sc, copy.deepcopy(net), srcs[0][1], srcs[1][1], train, data=data))
    k = len(ens)
    rows.append(sc.row(f"ensemble ({k} member{'s' if k != 1 else ''})", "ensemble",
                       [("member", i) for i in range(k)], weights=ens.weights))
    return rows


def align_files(a_file: str | os.PathLike, b_file: str | os.PathLike, out: str | os.PathLike, *,
                model: ModelOptions, seed: int = 0, progress: bool | None = None,
                data: Any = None) -> dict[str, Any]:
    """Write B with its hidden units permuted to match A (`mcensemble align`). The result
    computes the same function as B (checked on an example input before writing: a batch of
    `data`, a data spec or DataLoader, when given; else a shape guessed from the model)."""
    from .align import align_states
    from .checkpoints import save_checkpoint
    a, b = load_endpoints([a_file, b_file], model)
    net = a.build_model()
    from .data import example_input
    res = align_states(net, a.state_dict, b.state_dict, graph=unit_graph_of(net, model), seed=seed,
                       example_input=example_input(net, data=data), progress=progress)
    md = {k: b.metadata.get(k) for k in ("arch", "num_classes", "in_chans", "model_args") if b.metadata.get(k) is not None}
    info = res.to_dict()
    md["alignment"] = {**info, "aligned_to": {"file": str(a_file), "sha256": a.metadata.get("sha256")},
                       "source": {"file": str(b_file), "sha256": b.metadata.get("sha256")}}
    save_checkpoint(res.state, out, metadata=md)
    return {"file": str(out), **info}


def build_fge(files: Sequence[str | os.PathLike], *, model: ModelOptions, data: DataOptions, opts: BuildOptions,
              out: str | os.PathLike | None = None, soup: str | os.PathLike | None = None) -> BuildResult:
    """Fast geometric ensembling (Garipov et al. 2018) from ONE checkpoint: train it further
    with a cyclical learning rate for `opts.epochs` epochs split into `opts.members` cycles,
    one snapshot at each cycle's low point (`lr / 100`), BN re-estimated for each member."""
    import time
    from .checkpoints import load_checkpoint
    from .data import create_loader
    from .ensemble import EnsembleModel, save_ensemble
    from .hooks import fge_train
    if len(files) != 1:
        raise BadOptionError(f"--method fge starts from one checkpoint, got {len(files)}", option="--method")
    if opts.members < 1:
        raise BadOptionError(f"--members must be at least 1, got {opts.members}", option="--members")
    t0 = time.perf_counter()
    ck = load_checkpoint(files[0], model=_model_arg(model), ema=model.ema)
    net = ck.build_model().to(data.device)
    train, val = _loaders(net, data)
    test = _test_loader(net, data)
    start = _ens_metrics(EnsembleModel(net, [ck.state_dict], device=data.device), train, val, data.device, test)
    loader = create_loader(data.data, split="train", batch_size=data.batch_size, shuffle=True, seed=data.seed,
                           model=net)
    col = fge_train(net, loader, cycles=opts.members, epochs=opts.epochs, lr_max=opts.lr,
                    weight_decay=opts.weight_decay, device=data.device, seed=data.seed, progress=data.progress)
    states = col.member_states(bn_loader=train)
    ens = EnsembleModel(net, states, strategy=opts.strategy, device=data.device)
    members = [{"t": None, "kind": "snapshot", **{k: v for k, v in info.items() if k != "t"}} for info in col.info]
    sources = [{"file": str(files[0]), "sha256": ck.metadata.get("sha256")}]
    report: dict[str, Any] = {
        "method": "fge", "selection": "all-snapshots", "checkpoints": [{"file": str(files[0]), **_describe(ck)}],
        "data": _data_report(data), "seed": data.seed,
        "batchnorm": _has_bn(net), "bn_reestimated": _has_bn(net), "start": start, "members": members,
        "ensemble": _ens_metrics(ens, train, val, data.device, test),
        "fge": {"cycles": opts.members, "epochs": opts.epochs, "lr_max": opts.lr, "lr_min": opts.lr / 100},
        "split": "val" if val is not None else "train", "warnings": [] if val is not None else [TRAIN_ONLY_WARNING],
    }
    if val is None:
        _log.warning(TRAIN_ONLY_WARNING)
    soup_sd = _soup(net, states, None, train, data)
    report["baselines"] = _fge_baselines(net, ck, soup_sd, report, (train, val, test), data)
    from .distributed import is_main
    if out is not None and is_main():  # several processes: only rank 0 writes
        save_ensemble(out, states, model_spec=ck.model_spec, members=members, sources=sources,
                      dtype=opts.save_dtype,
                      extra={"method": "fge", "selection": "all-snapshots", "bn_reestimated": report["bn_reestimated"]})
    if soup is not None:
        report["soup"] = _write_soup(soup, soup_sd, net, train, val, ck, data)
    report["timings"] = {"total_s": time.perf_counter() - t0}
    return BuildResult(paths=[], members=members, member_states=states, report=report, model_spec=ck.model_spec)


def _fge_baselines(net, ck, soup_sd, report, loaders, data: DataOptions) -> list[dict[str, Any]]:
    """FGE's rows: the start checkpoint (cost 1), the snapshots' soup (cost 1), the packed
    pair (does not apply: one checkpoint) and the FGE ensemble (cost K)."""
    from .baselines import Scorer, skipped_row
    sc = Scorer(net, _report_splits(*loaders), device=data.device)
    sc.add("start", ck.state_dict)
    sc.add("soup", soup_sd)
    e, k = report["ensemble"], len(report["members"])
    return [sc.row("start checkpoint", "endpoint", ["start"]),
            sc.row("soup", "soup", ["soup"], note=_soup_note(report)),
            skipped_row("packed pair", "packed", 1, "FGE starts from one checkpoint: there is no pair to pack"),
            {"name": f"FGE ensemble ({k} snapshots)", "kind": "ensemble", "cost": k,
             **{s: e[s] for s in sc.splits if s in e}}]


def _has_bn(net) -> bool:
    from .bn import has_batchnorm
    return has_batchnorm(net)


def stability_of_file(file: str | os.PathLike, *, model: ModelOptions, data: DataOptions,
                      search_steps: int = 48) -> dict[str, Any]:
    """`mcensemble stability`: eps of dropout stability, per depth, for one checkpoint."""
    from .checkpoints import load_checkpoint
    from .stability import dropout_stability
    ck = load_checkpoint(file, model=_model_arg(model), ema=model.ema)
    net = ck.build_model().to(data.device)
    train, _ = _loaders(net, DataOptions(data=data.data, batch_size=data.batch_size, seed=data.seed,
                                         device=data.device))
    res = dropout_stability(net, ck.state_dict, train, graph=unit_graph_of(net, model), bn_loader=train,
                            device=data.device,
                            search_steps=search_steps, seed=data.seed, progress=data.progress)
    return {"file": str(file), "data": data.data, **res.to_dict()}


def pack_files(a_file: str | os.PathLike, b_file: str | os.PathLike, out: str | os.PathLike, *,
               model: ModelOptions, data: DataOptions, method: str = "dropout",
               search_steps: int | None = None) -> dict[str, Any]:
    """`mcensemble pack`: the packed pair (one model of A's architecture whose logits are the
    mean of D_1(A)'s and D_1(B)'s), written as a plain checkpoint; quality against A, B and
    their 2-member ensemble on the validation data (else the training data). `method`:
    "dropout" (layered networks) or "short" (D_S(A) and D_T(B), every group dropped at once:
    residual and squeeze-excite networks too). `search_steps`: swap trials per group choosing
    the halves (None: 48 dropout, 4 short)."""
    from .checkpoints import save_checkpoint
    from .pack import pack_pair, pack_report
    if method not in ("dropout", "short"):
        raise BadOptionError(f"pack --method must be dropout or short, got {method!r}", option="--method")
    a, b = load_endpoints([a_file, b_file], model)
    net = a.build_model().to(data.device)
    train, val = _loaders(net, data)
    packed = pack_pair(net, a.state_dict, b.state_dict, train, graph=unit_graph_of(net, model), device=data.device,
                       progress=data.progress, method=method, search_steps=search_steps)
    md = {k: a.metadata.get(k) for k in ("arch", "num_classes", "in_chans", "model_args") if a.metadata.get(k) is not None}
    md["kind"] = "packed-pair"
    md["method"] = method
    md["sources"] = [{"file": str(f), "sha256": ck.metadata.get("sha256")} for f, ck in ((a_file, a), (b_file, b))]
    save_checkpoint(packed, out, metadata=md)
    split = "val" if val is not None else "train"
    return {"file": str(out), "split": split,
            **pack_report(net, packed, a.state_dict, b.state_dict, val or train, device=data.device)}
