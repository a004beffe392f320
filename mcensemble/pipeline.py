"""The main jobs as functions: files -> checkpoints -> path -> scan / members -> ensemble.

The CLI is a thin layer over this module; training scripts can call it directly. The
options live in `options`, the jobs' inputs in `inputs`, their reports in `reports`,
`inspect` in `describe` and the demo's training in `demo`; their names stay importable
from here.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ._io import sha256_file
from .align import RepairedPath, align_states
from .baselines import decision_sentence, soup_state
from .bn import has_batchnorm, labelled_batch
from .calibration import apply_temperature, calibrate_build, file_record
from .checkpoints import load_checkpoint, save_checkpoint
from .data import check_input_fits, create_loader, example_input
from .distributed import is_main, world_size
from .ensemble import EnsembleModel, load_ensemble, save_ensemble
from .errors import BadOptionError, MCEnsembleError
from .evaluate import evaluate, scan
from .inputs import data_loaders, load_endpoints, loader_for_test_data, model_arg, unit_graph_of
from .members import (Candidate, candidate_state, ensemble_metrics, evaluate_candidates, mean_log_prob,
                      predict_log_probs, select_members, uniform_points)
from .models import ModelSpec, as_factory, create_model, import_entry
from .options import BuildOptions, DataOptions, ModelOptions, check_count, make_config
from .pack import pack_pair, pack_report
from .paths import LinearPath, load_path
from .paths.base import ModePath, path_kind, setting_flags
from .plane import scan_plane
from .plot import plot_plane
from .reports import (TRAIN_ONLY_WARNING, build_baselines, build_report, choice_report, choice_summary, data_report,
                      describe_source, ens_metrics, eval_baselines, fge_baselines, source_entry)
from .snapshots import FgeConfig, fge_train
from .stability import dropout_stability
from .units import build_unit_graph

__all__ = ["BuildResult", "OTHER_METHODS", "TRAIN_ONLY_WARNING", "check_method", "method_flags", "path_config",
           "connect", "align_chain", "scan_checkpoints", "scan_path_file", "build_ensemble", "build_fge",
           "evaluate_ensemble_file", "align_files", "stability_of_file", "pack_files"]

_log = logging.getLogger(__name__)

#: methods that are not paths between checkpoints -> their settings (the path kinds are the
#: registry's: `paths.buildable_kinds()`)
OTHER_METHODS = {"fge": FgeConfig}


def check_method(method: str, *, others: Sequence[str] = tuple(OTHER_METHODS)) -> type[ModePath] | None:
    """The path kind `method` names (None for one of `others`, the caller's other methods);
    `BadOptionError` listing the buildable kinds and `others`, the closest one suggested."""
    if method in others:
        return None
    return path_kind(method, others=others)


def path_config(opts: BuildOptions, data: DataOptions) -> Any:
    """`opts.settings` as the method's own config (`CurveConfig`, `NebConfig`, `FgeConfig`,
    ...; None for a kind without settings), seeded by `data.seed`: validated before any work."""
    if opts.method in OTHER_METHODS:
        return make_config(OTHER_METHODS[opts.method], opts.settings)
    return path_kind(opts.method).config_from(opts.settings, seed=data.seed)


def method_flags() -> dict[str, dict[str, Any]]:
    """The methods' settings that the command line takes as flags (`paths.setting_flags`,
    FGE's included)."""
    return setting_flags(extra=tuple(OTHER_METHODS.values()))


def scan_checkpoints(files: Sequence[str | os.PathLike], *, model: ModelOptions, data: DataOptions,
                     points: int = 11, opts: BuildOptions | None = None, plane: str | os.PathLike | None = None,
                     plane_grid: int = 11) -> dict[str, Any]:
    """Evaluate the path between two checkpoints (the straight line unless `opts.method` says
    otherwise; aligned first with `opts.align`). Returns the JSON-ready report. `plane`: also
    draw the plane through A, B and the bend (curve methods) as a PNG there."""
    opts = opts or BuildOptions(method="linear")
    check_count(points, "points", minimum=2)
    if len(files) != 2:
        raise BadOptionError("scan takes exactly two checkpoints", option="CHECKPOINTS")
    kind = check_method(opts.method, others=())
    path_config(opts, data)
    if opts.repair and opts.method != "linear":
        raise BadOptionError("`repair` rescales points of the straight line: use it with `method` linear",
                             option="repair")
    if plane is not None and not kind.has_bends:
        raise BadOptionError(f"a {opts.method} path has no bend: `plane` needs `method` bezier or polychain "
                             "(or `path` FILE of such a path)", option="plane")
    a, b = load_endpoints(files, model)
    net = a.build_model().to(data.device)
    train, val = data_loaders(net, data)
    paths, _, aligned = connect([a.state_dict, b.state_dict], net, opts=opts, data=data, bn_loader=train,
                                graph=unit_graph_of(net, model))
    path = RepairedPath(paths[0], net, train, device=data.device) if opts.repair else paths[0]
    report = _scan_report(path, net, train, val, data, points, plane=plane, plane_grid=plane_grid)
    report["repair"] = opts.repair
    report["checkpoints"] = [{"file": str(f), **describe_source(ck)} for f, ck in zip(files, (a, b))]
    report["method"] = opts.method
    if aligned:
        report["aligned"] = aligned[0]
    return report


def _scan_report(path, net, train, val, data: DataOptions, points: int, *, plane=None,
                 plane_grid: int = 11) -> dict[str, Any]:
    if plane is not None and "bend.0" not in getattr(path, "groups", {}):
        raise BadOptionError(f"a {path.kind} path has no bend: `plane` needs `method` bezier or polychain "
                             "(or `path` FILE of such a path)", option="plane")
    result = scan(path, net, train, points=points, val_loader=val, bn_loader=train, device=data.device,
                  progress=data.progress)
    report = result.to_dict()
    report["world_size"] = world_size()
    report["batchnorm"] = has_batchnorm(net)
    report["data"] = {"train": data.data, "val": data.val_data}
    if getattr(path, "certificate", None):
        report["certificate"] = path.certificate
    if plane is not None:
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
    path = load_path(file)
    spec = model_arg(model)
    if spec is None:
        spec = path.model_spec
        if spec is None or spec.entry:
            raise BadOptionError(f"{file} does not name a timm architecture; pass `arch` NAME or `model` "
                                 "module:function", option="model")
        net = create_model(spec, trust_entry=False)
    else:
        net = as_factory(spec)()
    net = net.eval().to(data.device)
    train, val = data_loaders(net, data)
    report = _scan_report(path, net, train, val, data, points, plane=plane, plane_grid=plane_grid)
    report["path_file"] = str(file)
    report["method"] = path.kind
    return report


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
    kind = path_kind(opts.method)
    config = kind.config_from(opts.settings, seed=data.seed)
    if opts.align or (opts.align is None and kind.align_by_default):
        try:
            states, aligned = align_chain(states, net, seed=data.seed, graph=graph, progress=data.progress,
                                          data=bn_loader)
        except MCEnsembleError as e:  # by default a curve is fitted between the checkpoints as they are
            if opts.align:
                raise
            _log.warning("cannot align the checkpoints before fitting the curve (%s); fitting it between "
                         "them as they are (`align` False skips alignment)", e)
    fit_loader = None
    if kind.trained:
        fit_loader = create_loader(data.data, split="train", batch_size=data.batch_size, shuffle=True,
                                   seed=data.seed, model=net)
    paths = [kind.from_options(net, a, b, config=config, opts=opts, data=data, fit_loader=fit_loader,
                               bn_loader=bn_loader, index=i, graph=graph)
             for i, (a, b) in enumerate(zip(states[:-1], states[1:]))]
    return paths, list(states), aligned


def _check_build_request(files: Sequence, opts: BuildOptions, data: DataOptions, path_out) -> bool:
    """Validate a build before any file is read; returns whether members are chosen greedily."""
    check_method(opts.method)
    path_config(opts, data)
    if path_out is not None and len(files) != 2:
        raise BadOptionError("`path_out` needs exactly two checkpoints (one path)", option="path_out")
    greedy = opts.selection == "greedy" or (opts.selection == "auto" and bool(data.val_data))
    if greedy and not data.val_data:
        raise BadOptionError("`selection` greedy needs `val_data`", option="selection")
    n_grid = max(len(files) - 1, 1) * (opts.candidates - 1) + 1
    if greedy and opts.members > n_grid:
        raise BadOptionError(f"`members` {opts.members} is more than the {n_grid} candidate points; "
                             "raise `candidates` or lower `members`", option="members")
    return greedy


def _choose_members(paths: list, ends: list, net, train, val, opts: BuildOptions, data: DataOptions, *,
                    greedy: bool) -> tuple[list, list, list[float], dict[str, Any], list]:
    """(grid, members, weights, choice, straight-line grid): `opts.candidates` points per
    path (joined paths share their ends) scanned for the report, the plot and the choice;
    members chosen on validation NLL among the grid (`members.select_members`: greedy with
    replacement behind a bootstrap gate, or exactly `opts.members` with `exact_members`), or
    uniform in t with equal weights. `choice`: the decision and its numbers, for the report."""
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
        choice = choice_report(sel, grid, max_members=opts.members, exact=opts.exact_members)
    else:
        members = scan_points(paths, uniform_points(opts.members, n_paths))
        weights = [1.0 / len(members)] * len(members)
        choice = {"rule": "uniform", "data": "val" if val is not None else None, "max_members": opts.members,
                  "exact": True, "n_members": len(members), "weights": weights, "guarantee": None}
    choice["decision"] = decision_sentence(choice)
    line = grid
    if opts.method != "linear":
        line = scan_points([LinearPath(a, b) for a, b in zip(ends[:-1], ends[1:])], grid_points)
    return grid, members, weights, choice, line


def _labels(loader) -> torch.Tensor:
    return torch.cat([labelled_batch(b, what="choosing members on `val_data`")[1] for b in loader])


def build_ensemble(files: Sequence[str | os.PathLike], *, model: ModelOptions, data: DataOptions,
                   opts: BuildOptions, out: str | os.PathLike | None = None, path_out: str | os.PathLike | None = None,
                   soup: str | os.PathLike | None = None) -> BuildResult:
    """Connect consecutive checkpoints by paths, choose members along them, write the ensemble.

    Everything is validated before any work; outputs are written atomically at the end (by
    rank 0 only under torchrun). The report carries the baselines (`report["baselines"]`).
    """
    if opts.method == "fge":
        return build_fge(files, model=model, data=data, opts=opts, out=out, soup=soup)
    greedy = _check_build_request(files, opts, data, path_out)
    t0 = time.perf_counter()
    cks = load_endpoints(files, model)
    net = cks[0].build_model().to(data.device)
    train, val = data_loaders(net, data)
    test = loader_for_test_data(net, data)
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
    report = build_report(files, cks, paths, grid, members, weights, line, opts, data, greedy=greedy,
                           batchnorm=has_batchnorm(net), ensemble=ens_metrics(ens, train, val, data.device, test))
    report["choice"] = choice
    report["calibration"] = calibrate_build(ens, val, test, enabled=opts.calibrate, device=data.device)
    if aligned:
        report["aligned"] = aligned
    soup_sd = _soup(net, states, weights, train, data)
    report["baselines"] = build_baselines(net, grid, paths, ends, soup_sd, report, opts, data,
                                           graph=unit_graph_of(net, model), loaders=(train, val, test),
                                           members=members, weights=weights)
    timings["baselines_s"] = time.perf_counter() - t3
    spec, kind = cks[0].model_spec, paths[0].kind
    sources = [(f, ck.metadata.get("sha256") or sha256_file(ck.path)) for f, ck in zip(files, cks)]
    if out is not None and is_main():  # several processes: only rank 0 writes
        save_ensemble(out, states, model_spec=spec, members=[c.info(kind) for c in members],
                      sources=[source_entry(f, sha, out) for f, sha in sources],
                      weights=weights, dtype=opts.save_dtype, calibration=file_record(report["calibration"]),
                      extra={"method": opts.method, "selection": report["selection"],
                                              "choice": choice_summary(choice),
                                              "bn_reestimated": report["bn_reestimated"], "n_paths": len(paths)})
    if path_out is not None and is_main():
        paths[0].save(path_out, model_spec=spec, extra={"sources": [source_entry(f, sha, path_out)
                                                                   for f, sha in sources]})
    if soup is not None:
        report["soup"] = _write_soup(soup, soup_sd, net, train, val, cks[0], data)
    timings["write_s"] = time.perf_counter() - t3 - timings["baselines_s"]
    timings["total_s"] = time.perf_counter() - t0
    report["timings"] = timings
    return BuildResult(paths=paths, members=members, member_states=states, report=report, model_spec=spec,
                       weights=weights)


def _soup(net, states, weights, train, data: DataOptions) -> dict[str, torch.Tensor]:
    return soup_state(net, states, weights, train, device=data.device)


def _write_soup(dest, soup_sd, net, train, val, ck, data: DataOptions) -> dict[str, Any]:
    """Write the soup (`baselines.soup_state`: the members' weighted average, BN
    re-estimated) as one plain checkpoint; its training and validation metrics."""
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
                           data: DataOptions, calibrate: bool = False,
                           out: str | os.PathLike | None = None) -> dict[str, Any]:
    """Each member's and the (weighted) ensemble's accuracy, NLL and ECE on the evaluation
    data (`data.val_data`, else `data.data`; digits: its val split), and the baselines
    (`report["baselines"]`): the checkpoints the file records as sources (when the files are
    still there and unchanged) and their ensemble, the soup and the packed pair (both need
    training data: `data.data` when `data.val_data` is given; a soup without BatchNorm does
    not), each on the evaluation data and on `data.test_data`. These are all uncalibrated (T =
    1); a file's own temperature gives `report["ensemble_calibrated"]`. `calibrate`: every row also
    gets a temperature fitted on the evaluation data (`report["calibration"]`: the file's
    ensemble's, NLL / ECE / Brier before and after); `out`: write the ensemble with that
    temperature there (needs `calibrate`)."""
    if out is not None and not calibrate:
        raise BadOptionError("`out` writes the ensemble with the temperature `calibrate` fits: pass both",
                             option="out")
    if isinstance(model, str):
        import_entry(model)  # fail early, naming the spec
        model = ModelSpec(entry=model)
    ens = load_ensemble(file, model=model, trust_remote_code=trust_remote_code, device=data.device)
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
           "ensemble": ensemble_metrics(per, labels, ens.weights).to_dict(), "temperature": ens.temperature,
           "strategy": ens.strategy, "test_data": data.test_data}
    if ens.temperature != 1.0:  # the file's ensemble as it predicts: its temperature applied
        mix = apply_temperature(mean_log_prob(torch.stack(per), ens.weights), ens.temperature)
        rep["ensemble_calibrated"] = ensemble_metrics([mix], labels).to_dict()
    train = None
    if data.val_data and data.data:
        train = create_loader(data.data, split="train", batch_size=data.batch_size, model=net)
    rep["baselines"] = eval_baselines(ens, file, per, loader, train, loader_for_test_data(net, data), model, data,
                                      calibrate=calibrate)
    if calibrate:
        rep["calibration"] = rep["baselines"][-1]["calibration"]
        if out is not None and is_main():
            ens.temperature = rep["calibration"]["temperature"]
            ens.metadata["calibration"] = {**file_record(rep["calibration"]), "data": str(spec)}
            ens.save(out)
            rep["out"] = str(out)
    return rep


def align_files(a_file: str | os.PathLike, b_file: str | os.PathLike, out: str | os.PathLike, *,
                model: ModelOptions, seed: int = 0, progress: bool | None = None,
                data: Any = None) -> dict[str, Any]:
    """Write B with its hidden units permuted to match A (`mcensemble align`). The result
    computes the same function as B (checked on an example input before writing: a batch of
    `data`, a data spec or DataLoader, when given; else a shape guessed from the model)."""
    a, b = load_endpoints([a_file, b_file], model)
    net = a.build_model()
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
    with a cyclical learning rate (`FgeConfig` from `opts.settings`: epochs, lr, weight
    decay) split into `opts.members` cycles, one snapshot at each cycle's low point
    (`lr / 100`), BN re-estimated for each member."""
    cfg = path_config(opts, data)
    if len(files) != 1:
        raise BadOptionError(f"`method` fge starts from one checkpoint, got {len(files)}", option="method")
    t0 = time.perf_counter()
    ck = load_checkpoint(files[0], model=model_arg(model), ema=model.ema)
    net = ck.build_model().to(data.device)
    train, val = data_loaders(net, data)
    test = loader_for_test_data(net, data)
    start = ens_metrics(EnsembleModel(net, [ck.state_dict], device=data.device), train, val, data.device, test)
    loader = create_loader(data.data, split="train", batch_size=data.batch_size, shuffle=True, seed=data.seed,
                           model=net)
    col = fge_train(net, loader, cycles=opts.members, epochs=cfg.epochs, lr_max=cfg.lr,
                    weight_decay=cfg.weight_decay, device=data.device, seed=data.seed, progress=data.progress)
    states = col.member_states(bn_loader=train)
    members = [{"t": None, "kind": "snapshot", **{k: v for k, v in info.items() if k != "t"}} for info in col.info]
    weights, choice = None, None
    if val is not None:  # the checkpoint is the reference: snapshots ship only when confirmed
        states, members, weights, choice = _choose_snapshots(net, ck.state_dict, states, members, val, opts, data)
    ens = EnsembleModel(net, states, strategy=opts.strategy, device=data.device, weights=weights)
    report: dict[str, Any] = {
        "method": "fge", "selection": "all-snapshots", "checkpoints": [{"file": str(files[0]), **describe_source(ck)}],
        "data": data_report(data), "seed": data.seed,
        "batchnorm": has_batchnorm(net), "bn_reestimated": has_batchnorm(net), "start": start, "members": members,
        "ensemble": ens_metrics(ens, train, val, data.device, test),
        "fge": {"cycles": opts.members, "epochs": cfg.epochs, "lr_max": cfg.lr, "lr_min": cfg.lr / 100},
        "split": "val" if val is not None else "train", "warnings": [] if val is not None else [TRAIN_ONLY_WARNING],
        "calibration": calibrate_build(ens, val, test, enabled=opts.calibrate, device=data.device),
    }
    if choice is not None:
        report["selection"], report["choice"] = "confirmed-val-nll", choice
    if val is None:
        _log.warning(TRAIN_ONLY_WARNING)
    soup_sd = _soup(net, states, None, train, data)
    report["baselines"] = fge_baselines(net, ck, soup_sd, report, (train, val, test), data)
    if out is not None and is_main():  # several processes: only rank 0 writes
        extra = {"method": "fge", "selection": report["selection"], "bn_reestimated": report["bn_reestimated"]}
        if choice is not None:
            extra["choice"] = choice_summary(choice)
        save_ensemble(out, states, model_spec=ck.model_spec, members=members, weights=weights,
                      sources=[source_entry(files[0], ck.metadata.get("sha256"), out)],
                      dtype=opts.save_dtype, calibration=file_record(report["calibration"]), extra=extra)
    if soup is not None:
        report["soup"] = _write_soup(soup, soup_sd, net, train, val, ck, data)
    report["timings"] = {"total_s": time.perf_counter() - t0}
    return BuildResult(paths=[], members=members, member_states=states, report=report, model_spec=ck.model_spec)


def _choose_snapshots(net, start: dict, states: list, members: list, val, opts: BuildOptions, data: DataOptions):
    """FGE with selection data: the start checkpoint (the reference) and the snapshots are
    candidates of `members.select_members` (candidate u = 0 the checkpoint, u = i snapshot i);
    snapshots ship only when confirmed on examples that did not pick them.
    Returns (states, member records, weights, the choice for the report)."""
    cands = []
    for i, st in enumerate([start, *states]):
        net.load_state_dict(st, strict=True)
        lp, labels = predict_log_probs(net, val, device=data.device)
        cands.append(Candidate(path=0, t=float(i), u=float(i), val_log_probs=lp))
    sel = select_members(cands, labels, max_members=opts.members, endpoints=[0], seed=data.seed)
    records = [{"t": None, "kind": "checkpoint"}, *members]
    choice = choice_report(sel, cands, max_members=opts.members)
    choice["decision"] = decision_sentence(choice)
    return ([[start, *states][i] for i in sel.indices], [records[i] for i in sel.indices], sel.weights, choice)


def stability_of_file(file: str | os.PathLike, *, model: ModelOptions, data: DataOptions,
                      search_steps: int = 48) -> dict[str, Any]:
    """`mcensemble stability`: eps of dropout stability, per depth, for one checkpoint."""
    ck = load_checkpoint(file, model=model_arg(model), ema=model.ema)
    net = ck.build_model().to(data.device)
    train, _ = data_loaders(net, DataOptions(data=data.data, batch_size=data.batch_size, seed=data.seed,
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
    if method not in ("dropout", "short"):
        raise BadOptionError(f"pack `method` must be dropout or short, got {method!r}", option="method")
    a, b = load_endpoints([a_file, b_file], model)
    net = a.build_model().to(data.device)
    train, val = data_loaders(net, data)
    packed = pack_pair(net, a.state_dict, b.state_dict, train, graph=unit_graph_of(net, model), device=data.device,
                       progress=data.progress, method=method, search_steps=search_steps)
    md = {k: a.metadata.get(k) for k in ("arch", "num_classes", "in_chans", "model_args") if a.metadata.get(k) is not None}
    md["kind"] = "packed-pair"
    md["method"] = method
    md["certificate"] = packed.certificate
    md["sources"] = [source_entry(f, ck.metadata.get("sha256"), out) for f, ck in ((a_file, a), (b_file, b))]
    save_checkpoint(packed.state, out, metadata=md)
    split = "val" if val is not None else "train"
    return {"file": str(out), "split": split, **packed.to_dict(),
            **pack_report(net, packed.state, a.state_dict, b.state_dict, val or train, device=data.device)}
