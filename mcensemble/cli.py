"""The `mcensemble` commands: a thin layer over `mcensemble.pipeline`.

The group, `main`, lives in `cli_group` (torch-free, so `mcensemble --help` is quick) and
imports this module when a command runs or shows its help. User errors (`MCEnsembleError`)
become click errors with no traceback: a bad option value exits 2, any other failure exits
1. `mcensemble --debug ...` re-raises them instead.
"""
from __future__ import annotations

import json
from pathlib import Path as FsPath
from typing import Any, Callable

import click
import torch

from .cli_group import cli_words, main
from .options import BuildOptions, ConnectOptions, DataOptions, ModelOptions

__all__ = ["path_options"]


# ---------------------------------------------------------------------------------------------
# shared options


def _stack(*decorators: Callable) -> Callable:
    def apply(f: Callable) -> Callable:
        for d in reversed(decorators):
            f = d(f)
        return f
    return apply


model_options = _stack(
    click.option("--arch", metavar="NAME", help="timm architecture (when the checkpoint does not say it)."),
    click.option("--model", "model_entry", metavar="MODULE:FUNCTION",
                 help="Zero-argument function returning your nn.Module."),
    click.option("--num-classes", type=click.IntRange(min=1), help="Classifier outputs, if not in the checkpoint."),
    click.option("--in-chans", type=click.IntRange(min=1), help="Input channels, if not in the checkpoint."),
    click.option("--ema/--no-ema", default=None,
                 help="Use a timm checkpoint's EMA weights (default: EMA when present) or the raw weights."),
    click.option("--unit-graph", type=click.Path(exists=True, dir_okay=False, path_type=str), default=None,
                 help="Hidden unit groups as JSON (inspect --units-out writes one to edit) instead of tracing."),
)

data_options = _stack(
    click.option("--data", metavar="SPEC", default=None,
                 help="Training data: 'digits[,size=N,chans=C,train=N,noise=F]', an image folder, or module:function."),
    click.option("--val-data", metavar="SPEC", default=None, help="Held-out data (same forms as --data)."),
    click.option("--batch-size", type=click.IntRange(min=1), default=DataOptions.batch_size, show_default=True,
                 help="Batch size."),
)

test_data_option = click.option(
    "--test-data", metavar="SPEC", default=None,
    help="Data used for nothing else: every report row also gets its NLL, accuracy and ECE on it.")

ensemble_model_options = _stack(
    click.option("--model", "model_entry", metavar="MODULE:FUNCTION",
                 help="Zero-argument function returning the members' nn.Module (needed when the file names one)."),
    click.option("--trust-remote-code", is_flag=True,
                 help="Import the module:function recorded in the file (only for files you trust)."),
)


run_options = _stack(
    click.option("--device", default=DataOptions.device, show_default=True, callback=lambda ctx, p, v: _check_device(v),
                 help="torch device, e.g. cpu, cuda, cuda:1."),
    click.option("--seed", type=int, default=DataOptions.seed, show_default=True, help="Random seed."),
    click.option("--threads", type=click.IntRange(min=1), default=None,
                 help="CPU threads for torch (default: torch's choice; 1 is fastest for tiny models)."),
    click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
                 help="Forward passes under autocast in this dtype (bends, momenta, BN statistics stay float32; "
                      "fp16 curve fits use a GradScaler)."),
    click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Data-loader worker processes (memory is pinned on CUDA)."),
    click.option("--channels-last/--no-channels-last", default=False, show_default=True,
                 help="Run convolutional models in channels_last memory format."),
)


def _cuda_problem(device: Any) -> str | None:
    if not torch.cuda.is_available():
        return "CUDA is not available here (no NVIDIA GPU or driver, or a CPU-only torch); use --device cpu"
    n = torch.cuda.device_count()
    if device.index is not None and device.index >= n:
        return f"this machine has {n} CUDA device(s): cuda:0 .. cuda:{n - 1}"
    return None


def _mps_problem(device: Any) -> str | None:
    ok = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    return None if ok else "Apple MPS is not available here; use --device cpu"


# device type -> (device) -> why it cannot be used here, or None
_DEVICE_PROBLEMS: dict[str, Callable[[Any], str | None]] = {
    "cpu": lambda d: None, "cuda": _cuda_problem, "mps": _mps_problem}


def _check_device(value: str) -> str:
    """`--device`, checked when the command line is read (before any work): a malformed
    string, a device type mcensemble does not run on, or a device this machine does not
    have is a usage error (exit 2, one line). The one place devices are checked."""
    from .distributed import process_device
    try:
        device = process_device(value)
    except (RuntimeError, TypeError, ValueError) as e:
        raise click.BadParameter(f"{value!r} is not a torch device; give e.g. cpu, cuda, cuda:1 or mps",
                                 param_hint="'--device'") from e
    problem = _DEVICE_PROBLEMS.get(device.type, lambda d: f"mcensemble runs on {', '.join(_DEVICE_PROBLEMS)} "
                                                           "devices")(device)
    if problem:
        raise click.BadParameter(f"{value!r}: {problem}", param_hint="'--device'")
    return value


def _defaults_text(defaults: dict[str, Any]) -> str:
    """{"bezier": 1, "polychain": 1, "neb": 5} -> "1 (bezier, polychain), 5 (neb)"."""
    by_value: dict[str, list[str]] = {}
    for kind, value in defaults.items():
        by_value.setdefault(repr(value), []).append(kind)
    return "; ".join(f"{v} ({', '.join(kinds)})" for v, kinds in by_value.items())


def path_options(default_method: str, *, others: tuple[str, ...] = ()) -> Callable:
    """How consecutive checkpoints are connected (`scan`, `build`, `connect`): `--method`, one
    of the registered path kinds (`paths.buildable_kinds()`) or `others`, `--align`, and a flag
    for every setting a kind (or FGE) declares in its `flags` (default: the kind's own)."""
    from .paths import buildable_kinds
    from .pipeline import method_flags
    kinds = [*buildable_kinds(), *others]
    setting_options = [
        click.option("--" + name.replace("_", "-"), name, type=spec["type"], default=None,
                     help=f"{spec['help']} [default: {_defaults_text(spec['defaults'])}]")
        for name, spec in method_flags().items()
        if set(spec["defaults"]) & set(kinds)]
    return _stack(
        click.option("--method", default=default_method, show_default=True,
                     help=f"Path between consecutive checkpoints, a path kind: {', '.join(kinds)}."),
        click.option("--align/--no-align", default=None,
                     help="Permute each checkpoint's hidden units to match the previous one first (weight matching). "
                          "Default: on for bezier / polychain curves (the bends start from the aligned midpoints), "
                          "off otherwise."),
        *setting_options,
    )


def _path_opts(kw: dict[str, Any]) -> dict[str, Any]:
    """Pop `--method`, `--align` and the path settings given on the command line: the
    keywords of `BuildOptions` (`settings` holds only the flags that were given)."""
    from .pipeline import method_flags
    settings = {name: kw.pop(name) for name in method_flags() if name in kw}
    return {"method": kw.pop("method"), "align": kw.pop("align", None),
            "settings": {k: v for k, v in settings.items() if v is not None}}


def _model_opts(kw: dict):
    return ModelOptions(arch=kw.pop("arch"), model=kw.pop("model_entry"), num_classes=kw.pop("num_classes"),
                        in_chans=kw.pop("in_chans"), ema=kw.pop("ema"), unit_graph=kw.pop("unit_graph"))


def _data_opts(kw: dict, *, default_data: str | None = None):
    threads = kw.pop("threads", None)
    if threads:
        torch.set_num_threads(threads)
    device = kw.pop("device")
    precision, workers, channels_last = kw.pop("precision", None), kw.pop("workers", 0), kw.pop("channels_last", False)
    ctx = click.get_current_context(silent=True)
    if ctx is not None:  # under torchrun: join the process group until the command ends (else a no-op)
        from .data import loader_settings
        from .distributed import session
        from .precision import use_precision
        device = ctx.with_resource(session(device))
        # the whole command: forward passes at --precision, loaders with --workers
        ctx.with_resource(use_precision(precision, channels_last=channels_last))
        ctx.with_resource(loader_settings(workers=workers, pin_memory=str(device).startswith("cuda")))
    return DataOptions(data=kw.pop("data") or default_data, val_data=kw.pop("val_data"),
                       test_data=kw.pop("test_data", None),
                       batch_size=kw.pop("batch_size"), seed=kw.pop("seed"), device=device)


def _is_main() -> bool:
    """Rank 0 of several processes (torchrun), or the only process: the one that writes files."""
    from .distributed import is_main
    return is_main()


def _no_demo_under_torchrun() -> None:
    from .distributed import world_size
    if world_size() > 1:
        raise click.UsageError("the built-in demo runs in one process: under torchrun give checkpoints A B ...")


def _write_json(obj: Any, dest: str) -> None:
    from ._io import atomic_path, to_json
    if not _is_main():
        return
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(to_json(obj), indent=2, allow_nan=False))


def _write_report(rep: dict[str, Any], dest: str | None) -> None:
    """`--report FILE.json`: write the report (rank 0 only) and say where."""
    if dest:
        _write_json(rep, dest)
        click.echo(f"report: {dest}")


def _echo_table(rows: list[tuple], header: tuple) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    click.echo(fmt.format(*header))
    for r in rows:
        click.echo(fmt.format(*r))


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


# ---------------------------------------------------------------------------------------------
# inspect


@main.command()
@click.argument("file", type=click.Path(path_type=str))
@model_options
@click.option("--units", is_flag=True, help="Also print the unit graph (hidden unit groups and their tensors).")
@click.option("--units-out", metavar="FILE.json",
              help="Write the unit graph as JSON: edit it and pass it back with --unit-graph.")
@click.option("--verify", is_flag=True,
              help="Check an ensemble or path file's tensors against the SHA-256 recorded when it was written.")
def inspect(file: str, units: bool, units_out: str | None, verify: bool, **kw: Any) -> None:
    """Describe a checkpoint: format, architecture, parameters, dtypes, EMA, metadata.

    Exits non-zero with the reason if the file fails any safety or sanity check (with
    --verify: if a tensor's bytes differ from the hash recorded in the file, naming it).
    """
    from .describe import describe_checkpoint
    if verify:
        from ._io import verify_file
        fmt, n = verify_file(file)
        click.echo(f"{'integrity':>12}: " + (f"no hashes are recorded in this {fmt} file (written before "
                                              "mcensemble recorded them); nothing verified" if n is None
                                              else f"ok, all {n} tensors match their recorded SHA-256"))
    info = describe_checkpoint(file, _model_opts(kw), units=units, units_out=units_out)
    for key, value in info.items():
        if key == "units":
            continue
        if isinstance(value, dict):
            value = json.dumps(value, default=str)
        click.echo(f"{key:>12}: {cli_words(str(value))}")
    if units and info.get("units"):
        click.echo(info["units"])


# ---------------------------------------------------------------------------------------------
# scan


@main.command()
@click.argument("checkpoints", nargs=-1, type=click.Path(path_type=str))
@model_options
@data_options
@run_options
@path_options("linear")
@click.option("--path", "path_file", metavar="PATH.safetensors",
              help="Scan a saved path (build --path-out) instead of connecting A B.")
@click.option("--points", type=int, default=11, show_default=True, help="Points along the path (>= 2).")
@click.option("--plane", metavar="FILE.png",
              help="Also draw loss contours on the plane through A, B and the bend (bezier / polychain).")
@click.option("--plane-grid", type=click.IntRange(min=2), default=11, show_default=True,
              help="Grid points per side of the --plane picture.")
@click.option("--repair", is_flag=True,
              help="REPAIR interior points of the straight line: rescale each channel to the endpoints' statistics.")
@click.option("--report", metavar="FILE.json", help="Write the scan as JSON.")
@click.option("--plot", metavar="FILE.png", help="Write loss and error along t as a PNG.")
def scan(checkpoints: tuple[str, ...], path_file: str | None, points: int, plane: str | None, plane_grid: int,
         repair: bool, report: str | None, plot: str | None, **kw: Any) -> None:
    """Loss and accuracy along a path between two checkpoints A B (the straight line unless
    --method says otherwise), or along a saved path (--path FILE).

    With no checkpoints, runs the embedded default: trains two small CNNs on the built-in
    digits (seconds) and scans between them, writing into a fresh folder.
    """
    from .demo import fresh_run_dir, train_default_endpoints
    from .pipeline import scan_checkpoints, scan_path_file
    if path_file and checkpoints:
        raise click.UsageError("give either checkpoints A B or --path FILE, not both")
    if len(checkpoints) not in (0, 2):
        raise click.UsageError(f"scan takes two checkpoints A B (or none for the built-in demo), got {len(checkpoints)}")
    opts = BuildOptions(repair=repair, **_path_opts(kw))
    model, data = _model_opts(kw), _data_opts(kw, default_data="digits")
    if path_file:
        rep = scan_path_file(path_file, model=model, data=data, points=points, plane=plane, plane_grid=plane_grid)
        _finish_scan(rep, report, plot, title=f"{rep['method']} path")
        return
    if not checkpoints:
        _no_demo_under_torchrun()
        out = fresh_run_dir(prefix="scan")
        click.echo(f"No checkpoints given: training two small CNNs on the built-in digits into {out}/", err=True)
        checkpoints = tuple(str(p) for p in train_default_endpoints(out, seed=data.seed))
        data.val_data = data.val_data or "digits"
        report = report or str(out / "scan.json")
        plot = plot or str(out / "scan.png")
    rep = scan_checkpoints(checkpoints, model=model, data=data, points=points, opts=opts, plane=plane,
                           plane_grid=plane_grid)
    _finish_scan(rep, report, plot, title="straight line A -> B" if opts.method == "linear" else f"{opts.method} path")


def _finish_scan(rep: dict[str, Any], report: str | None, plot: str | None, *, title: str) -> None:
    rows = [(_fmt(p["t"]), _fmt(p["loss"]), _fmt(p["acc"]), _fmt(p.get("val_loss", "")), _fmt(p.get("val_acc", "")))
            for p in rep["points"]]
    _echo_table(rows, ("t", "loss", "acc", "val_loss", "val_acc"))
    click.echo(f"barrier (train loss): {rep['barrier']:.4f}" +
               ("   BatchNorm statistics re-estimated at every point" if rep.get("bn_reestimated") else ""))
    _write_report(rep, report)
    if plot and _is_main():
        from .plot import plot_scan
        plot_scan(rep, plot, title=title)
        click.echo(f"plot: {plot}")
    if rep.get("plane"):
        click.echo(f"plane: {rep['plane']['file']}")
    if rep.get("certificate"):
        _echo_certificate(rep["certificate"], rep.get("method"))


def _echo_certificate(c: dict[str, Any], method: str | None) -> None:
    if method == "short":  # segments 1 and 5 are measured, not proven: say so line by line
        from .paths.short import certificate_lines
        click.echo(f"short path: eps {c.get('eps', float('nan')):.4f} (random half "
                   f"{c.get('eps_random', float('nan')):.4f}); per segment:")
        for line in certificate_lines(c):
            click.echo("  " + line)
        click.echo(f"proven segments: loss <= {c['proven_max_loss']:.4f}; measured segments: largest loss "
                   f"measured {c['measured_max_loss']:.4f} (not a proof)")
        return
    click.echo(f"certificate: loss <= {c['max_loss']:.4f} everywhere on the path (eps {c.get('eps', float('nan')):.4f})")


# ---------------------------------------------------------------------------------------------
# build


def _apply_recipe(ctx: click.Context, kw: dict[str, Any], recipe: str | None) -> dict[str, Any]:
    """Fill options not given on the command line from a recipe (flags win)."""
    if recipe is None:
        return {}
    from .recipes import load_recipe
    params = {p.name: p for p in ctx.command.params if p.name}
    # recipe keys are option names (`model` for --model) or parameter names (`model_entry`)
    names = {n: n for n in params if n != "recipe"}
    names.update({o[2:].replace("-", "_"): p.name for p in params.values() if p.name != "recipe"
                  for o in p.opts if o.startswith("--")})
    data = load_recipe(recipe, valid=list(names))
    extra = data.pop("_extra", {})
    for key, value in data.items():
        name = names[key]
        src = ctx.get_parameter_source(name)
        if src in (click.core.ParameterSource.DEFAULT, click.core.ParameterSource.DEFAULT_MAP, None):
            p = params[name]
            try:
                kw[name] = p.type_cast_value(ctx, value) if not (p.nargs == -1 and isinstance(value, list)) \
                    else tuple(str(v) for v in value)
                if p.callback is not None:  # the checks a flag gets (e.g. --device)
                    kw[name] = p.callback(ctx, p, kw[name])
            except click.BadParameter as e:
                raise click.BadParameter(f"{e.message} (from recipe {recipe})", param_hint=f"'{name}'") from e
    return extra


@main.command()
@click.argument("checkpoints", nargs=-1, type=click.Path(path_type=str))
@model_options
@data_options
@run_options
@path_options("bezier", others=("fge",))
@test_data_option
@click.option("--members", type=int, default=BuildOptions.members, show_default=True,
              help="Most distinct members chosen on --val-data (exactly this many with --exact-members or uniform).")
@click.option("--exact-members", is_flag=True,
              help="Exactly --members distinct members, equal weights (no bootstrap gate, no guarantee).")
@click.option("--packed/--no-packed", default=BuildOptions.packed, show_default=True,
              help="Score the packed pair among the baselines (cheap form: importance-ranked halves, eps on a "
                   "fixed subsample; `mcensemble pack` searches).")
@click.option("--selection", type=click.Choice(["auto", "greedy", "uniform"]), default=BuildOptions.selection,
              show_default=True,
              help="How members are chosen: greedy on validation NLL (auto, with --val-data) or uniform in t.")
@click.option("--candidates", type=int, default=BuildOptions.candidates, show_default=True,
              help="Points per path scanned for the report and the greedy choice.")
@click.option("--strategy", type=click.Choice(["auto", "loop", "vmap"]), default=BuildOptions.strategy,
              show_default=True,
              help="Ensemble inference: member loop, stack_module_state + vmap, or auto (time both on the first batch).")
@click.option("--out", metavar="ENS.safetensors", help="Write the ensemble here.")
@click.option("--calibrate/--no-calibrate", default=BuildOptions.calibrate, show_default=True,
              help="Fit a temperature on --val-data (after the members are averaged) and store it in the ensemble; "
                   "the report shows NLL, ECE and Brier before and after, for every row.")
@click.option("--save-dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Store the ensemble's members in this dtype (bf16 / fp16: half the file; loaded back into the "
                   "model's dtype). Default: as trained.")
@click.option("--path-out", metavar="PATH.safetensors", help="Write the path (endpoints, bends, metadata) here.")
@click.option("--soup", metavar="FILE.safetensors", help="Write the members' weight average (BN re-estimated).")
@click.option("--report", metavar="FILE.json", help="Write the build report as JSON.")
@click.option("--plot", metavar="FILE.png", help="Write loss and error along t, straight line against the path.")
@click.option("--from-run", multiple=True, metavar="DIR",
              help="A timm training output folder; its best checkpoints (by recorded metric) join the list. Repeatable.")
@click.option("--top-k", type=click.IntRange(min=1), default=None,
              help="Checkpoints taken per --from-run folder (default: 1 each with several folders, all with one).")
@click.option("--metric-mode", type=click.Choice(["max", "min"]), default="max", show_default=True,
              help="Whether a higher (max) or lower (min) recorded metric is better for --from-run.")
@click.option("--checkpoint-dir", metavar="DIR",
              help="Save the curve fits' state here (each epoch, every --checkpoint-every steps, on Ctrl-C / SIGTERM).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=None, metavar="N",
              help="Also save the curve fit every N steps.")
@click.option("--resume", is_flag=True, help="Continue the curve fits saved in --checkpoint-dir.")
@click.option("--recipe", metavar="FILE.yaml", help="Read options from a YAML recipe; flags on the command line win.")
@click.pass_context
def build(ctx: click.Context, **kw: Any) -> None:
    """Connect checkpoints A B [C ...] by low-loss paths and sample an ensemble along them.

    --method fge takes ONE checkpoint and trains it further with a cyclical learning rate,
    keeping a snapshot per cycle (fast geometric ensembling).

    With no checkpoints and no recipe, runs the embedded default: trains two small CNNs on
    the built-in digits, fits a Bezier curve between them, and writes the ensemble, report
    and plot into a fresh folder under mcensemble-runs/.
    """
    from .demo import fresh_run_dir, train_default_endpoints
    from .pipeline import build_ensemble
    from .recipes import DEFAULT_RECIPE
    recipe = kw.pop("recipe")
    if not kw["checkpoints"] and not kw["from_run"] and recipe is None:
        recipe = str(DEFAULT_RECIPE)
    extra = _apply_recipe(ctx, kw, recipe)
    checkpoints = kw.pop("checkpoints")
    from_run, top_k, metric_mode = kw.pop("from_run"), kw.pop("top_k"), kw.pop("metric_mode")
    if from_run:
        from .runs import checkpoints_from_runs
        picked = checkpoints_from_runs(list(from_run), top_k=top_k, metric_mode=metric_mode)
        click.echo("from runs: " + ", ".join(str(p) for p in picked), err=True)
        checkpoints = (*checkpoints, *(str(p) for p in picked))
    out, path_out, soup, report, plot = (kw.pop(k) for k in ("out", "path_out", "soup", "report", "plot"))
    if kw["resume"] and not kw["checkpoint_dir"]:
        raise click.UsageError("--resume needs --checkpoint-dir DIR (where the fit was saved)")
    opts = BuildOptions(**_path_opts(kw), **{k: kw.pop(k) for k in (
        "members", "exact_members", "packed", "selection", "candidates", "strategy", "save_dtype", "calibrate",
        "checkpoint_dir", "checkpoint_every", "resume")})
    model, data = _model_opts(kw), _data_opts(kw, default_data="digits")
    if not checkpoints:
        _no_demo_under_torchrun()
        if "endpoints" not in extra:
            raise click.UsageError("give checkpoints A B [...] (or a recipe with an 'endpoints' section)")
        run = fresh_run_dir(prefix="build")
        click.echo(f"Training {extra['endpoints'].get('n', 2)} endpoint models into {run}/", err=True)
        checkpoints = tuple(str(p) for p in train_default_endpoints(run, seed=data.seed, **extra["endpoints"]))
        out, report = out or str(run / "ensemble.safetensors"), report or str(run / "report.json")
        if opts.method != "fge":
            plot, path_out = plot or str(run / "path.png"), path_out or str(run / "path.safetensors")
    if opts.method == "fge" and (plot or path_out):
        raise click.UsageError("--method fge makes no path: --plot and --path-out do not apply")
    res = build_ensemble(checkpoints, model=model, data=data, opts=opts, out=out, path_out=path_out, soup=soup)
    rep = res.report
    _echo_build_table(rep)
    if rep.get("method") == "short":
        for c in rep.get("certificates") or []:
            _echo_certificate(c, "short")
    for label, dest in (("ensemble", out), ("path", path_out), ("soup", soup)):
        if dest:
            click.echo(f"{label}: {dest}")
    if not out:
        click.echo("ensemble: not written (no --out); pass --out ENS.safetensors to keep it", err=True)
    _write_report(rep, report)
    if plot and _is_main():
        from .plot import plot_scan
        curves = {"straight line": {"points": rep["line"]["points"], "barrier": rep["line"]["barrier"]}}
        if opts.method != "linear":
            curves[f"{opts.method} path"] = {"points": rep["path"]["points"], "barrier": rep["path"]["barrier"]}
        plot_scan(curves, plot, title=f"{opts.method}: loss along the path", baselines=rep.get("baselines"),
                  split=rep.get("split", "val"))
        click.echo(f"plot: {plot}")


def _echo_build_table(rep: dict[str, Any]) -> None:
    """The path table (checkpoints, the straight line's middle, the path's worst point) on
    the training data, then what each choice costs and gives (`_echo_baselines`)."""
    if rep["method"] != "fge":
        def row(name: str, m: dict[str, Any]) -> tuple:
            return (name, _fmt(m["loss"]), _fmt(m["acc"]))

        line_pts = rep["line"]["points"]
        mid = min(line_pts, key=lambda p: abs(p["t"] - 0.5))
        rows = [row(f"endpoint {n}", m) for n, m in rep["endpoints"].items()]
        rows.append(row(f"straight line t={mid['t']:.2f}", mid))
        if rep["method"] != "linear":
            w = rep["path"]["worst"]
            rows.append(row(f"{rep['method']} worst t={w['t']:.2f}", w))
        _echo_table(rows, ("", "train loss", "train acc"))
        click.echo("")
    _echo_baselines(rep)
    _echo_calibration(rep)
    if rep["method"] == "fge":
        return
    click.echo("members at t = " + ", ".join(f"{m['u']:.2f}" + (f" (w {m['weight']:.2f})" if "weight" in m else "")
                                             for m in rep["members"]) +
               ("   (BatchNorm statistics re-estimated at every point)" if rep.get("bn_reestimated") else ""))
    choice = rep.get("choice") or {}
    if choice.get("decision"):
        click.echo(f"selection: {cli_words(choice['decision'])}")
    if choice.get("guarantee"):
        click.echo(f"guarantee: {cli_words(choice['guarantee'])}")


def _echo_baselines(rep: dict[str, Any], *, label: str | None = None) -> None:
    """One row per choice (cost, NLL, accuracy, ECE on the report's split, and on --test-data),
    skipped baselines with their reason. `label`: the split's name in the header (default: the
    split's key in the rows)."""
    rows_in = rep.get("baselines") or []
    split = rep.get("split", "val")
    test = any("test" in r for r in rows_in)
    name = label or split
    header = ("", "cost", f"{name} nll", f"{name} acc", f"{name} ece") + (("test nll", "test acc", "test ece")
                                                                                if test else ())
    rows, skipped = [], []
    for r in rows_in:
        if "skipped" in r:
            skipped.append(f"{r['name']}: skipped ({r['skipped']})")
            continue
        cells = [r["name"], str(r["cost"])]
        for s in (split, "test") if test else (split,):
            m = r.get(s) or {}
            cells += [_fmt(m.get("nll", "")), _fmt(m.get("acc", "")), _fmt(m.get("ece", ""))]
        rows.append(tuple(cells))
    if rows:
        _echo_table(rows, header)
    from .pack import certificate_line
    for r in rows_in:
        if r.get("certificate") and "skipped" not in r:
            click.echo(f"{r['name']}: {certificate_line(r['certificate'])}")
    for line in skipped:
        click.echo(cli_words(line))
    for r in rows_in:
        vs = r.get("vs_reference")
        if vs:
            parts = [f"{s} {vs[s]['gain']:+.4f} (95% interval {vs[s]['ci95'][0]:+.4f} to {vs[s]['ci95'][1]:+.4f}, "
                     f"{vs[s]['examples']} examples)" for s in (split, "test") if s in vs]
            click.echo(f"{r['name']} against the reference, {vs['reference']}: NLL gain " + "; ".join(parts)
                       + " (positive: lower NLL than the reference)")
            if vs.get("built_by"):
                click.echo(f"built by: {vs['built_by']}")


def _echo_calibration(rep: dict[str, Any]) -> None:
    """The temperature of each row that has one, and NLL, ECE and Brier before -> after on
    the test split (else on the split the temperature was fitted on, which flatters it)."""
    cal = rep.get("calibration") or {}
    if "skipped" in cal:
        click.echo(f"calibration: skipped ({cal['skipped']})")
    rows_in = [r for r in rep.get("baselines") or [] if "calibration" in r]
    if not rows_in:
        return
    first = rows_in[0]["calibration"]
    split = "test" if "test" in first else first["fit"]
    click.echo("")
    click.echo(f"calibration: a temperature per row fitted on {first['fit']}, metrics on {split}"
               + ("" if split == "test" else " (the same data: pass --test-data for an honest comparison)"))

    def pair(m: dict[str, Any], key: str) -> str:
        return f"{m['before'][key]:.4f} -> {m['after'][key]:.4f}"
    rows = [(r["name"], f"{r['calibration']['temperature']:.3f}", pair(r["calibration"][split], "nll"),
             pair(r["calibration"][split], "ece"), pair(r["calibration"][split], "brier")) for r in rows_in]
    _echo_table(rows, ("", "T", f"{split} nll", f"{split} ece", f"{split} brier"))


# ---------------------------------------------------------------------------------------------
# eval


@main.command(name="eval")
@click.argument("ensemble", type=click.Path(path_type=str))
@ensemble_model_options
@data_options
@test_data_option
@run_options
@click.option("--calibrate", is_flag=True,
              help="Fit a temperature per row on the evaluation data; show NLL, ECE and Brier before and after "
                   "(on --test-data when given).")
@click.option("--out", metavar="ENS.safetensors", help="With --calibrate: write the ensemble with its fitted temperature.")
@click.option("--report", metavar="FILE.json", help="Write the evaluation as JSON.")
def eval_cmd(ensemble: str, model_entry: str | None, trust_remote_code: bool, calibrate: bool, out: str | None,
             report: str | None, **kw: Any) -> None:
    """Evaluate an ensemble file and each of its members: accuracy, NLL, ECE; and beside it
    the checkpoints it was built from (when the files are still there), their ensemble, the
    soup and the packed pair. With --val-data, --data is the training data those two need."""
    from .pipeline import evaluate_ensemble_file
    data = _data_opts(kw)
    if not data.data:
        raise click.UsageError("pass --data SPEC (e.g. --data digits) to evaluate on", ctx=click.get_current_context())
    rep = evaluate_ensemble_file(ensemble, model=model_entry, trust_remote_code=trust_remote_code, data=data,
                                 calibrate=calibrate, out=out)
    rows = [(f"member {i} (t={m.get('t') if m.get('t') is not None else '?'}, w {m['weight']:.2f})", _fmt(m["nll"]),
             _fmt(m["acc"]), _fmt(m["ece"])) for i, m in enumerate(rep["members"])]
    e = rep["ensemble"]
    rows.append((f"ensemble ({len(rep['members'])})", _fmt(e["nll"]), _fmt(e["acc"]), _fmt(e["ece"])))
    if "ensemble_calibrated" in rep:
        c = rep["ensemble_calibrated"]
        rows.append((f"ensemble, T {rep['temperature']:.3f} (the file's)", _fmt(c["nll"]), _fmt(c["acc"]),
                     _fmt(c["ece"])))
    split = rep["split"]
    click.echo(f"scored on {rep['data']} ({split} split)")
    _echo_table(rows, ("", f"{split} nll", f"{split} acc", f"{split} ece"))
    click.echo("")
    _echo_baselines({**rep, "split": "eval"}, label=split)
    _echo_calibration(rep)
    if rep.get("out"):
        click.echo(f"calibrated ensemble (T {rep['calibration']['temperature']:.3f}): {rep['out']}")
    _write_report(rep, report)


# ---------------------------------------------------------------------------------------------
# predict, export

@main.command()
@click.argument("ensemble", type=click.Path(path_type=str))
@click.argument("inputs", metavar="INPUT", type=click.Path(path_type=str))
@click.option("--out", required=True, metavar="FILE.csv|FILE.parquet", help="Where the table goes (Parquet needs pyarrow).")
@ensemble_model_options
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True, help="Classes per row, best first.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Batch size.")
@click.option("--split", type=click.Choice(["train", "val"]), default="val", show_default=True,
              help="Which split of a data spec INPUT (digits); folders and tensor files have one.")
@click.option("--flag-above", type=float, default=None, metavar="X",
              help="Add a `flagged` column: true where --flag-on is above X.")
@click.option("--flag-on", type=click.Choice(["entropy", "expected_entropy", "mutual_information", "disagreement"]),
              default="mutual_information", show_default=True, help="The uncertainty --flag-above compares.")
@click.option("--device", default="cpu", show_default=True, callback=lambda ctx, p, v: _check_device(v),
              help="torch device, e.g. cpu, cuda, cuda:1.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
              help="Forward passes under autocast in this dtype (probabilities in float32).")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True, help="Data-loader worker processes.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for torch.")
def predict(ensemble: str, inputs: str, out: str, model_entry: str | None, trust_remote_code: bool, threads: int | None,
            **kw: Any) -> None:
    """Predict with an ensemble on INPUT (a folder of images, a data spec, or a .safetensors /
    .pt tensor file): one row per input with the top classes, their probabilities and the
    uncertainty (entropy, expected entropy, mutual information, member disagreement)."""
    from .predict import predict_file
    if threads:
        torch.set_num_threads(threads)
    rep = predict_file(ensemble, inputs, out, model=model_entry, trust_remote_code=trust_remote_code, **kw)
    flagged = f", {rep['flagged']} flagged ({rep['flag']['on']} > {rep['flag']['above']:g})" if "flagged" in rep else ""
    click.echo(f"{rep['rows']} predictions{flagged}: {rep['out']}")


def _input_shape(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        shape = tuple(int(v) for v in value.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(s < 1 for s in shape):
        raise click.BadParameter(f"{value!r} is not a shape: give positive integers, e.g. 3,224,224")
    return shape


@main.command()
@click.argument("ensemble", type=click.Path(path_type=str))
@click.option("--format", "format_", type=click.Choice(["onnx", "exported-program", "torchscript"]), required=True,
              help="onnx (onnxruntime; pip install mcensemble[export]), exported-program (torch.export.load) or "
                   "torchscript (torch.jit.load).")
@click.option("--out", required=True, metavar="FILE", help="Where the artifact goes (e.g. ens.onnx, ens.pt2, ens.pt).")
@ensemble_model_options
@click.option("--input-shape", callback=_input_shape, metavar="C,H,W",
              help="One input's shape without the batch axis (default: from --data, else guessed from the model).")
@click.option("--data", metavar="SPEC", default=None, help="Data whose inputs the model takes (its first batch's shape).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Run the artifact with its own runtime and compare it with the ensemble (1e-4 relative).")
def export(ensemble: str, format_: str, out: str, model_entry: str | None, trust_remote_code: bool,
           input_shape: tuple[int, ...] | None, data: str | None, verify: bool) -> None:
    """Export an ensemble as ONE self-contained file computing its calibrated, weighted
    probabilities, (batch, classes), for any batch size: ONNX, a torch.export program or
    TorchScript."""
    from .export import export_file
    rep = export_file(ensemble, out, format=format_, model=model_entry, trust_remote_code=trust_remote_code,
                      input_shape=input_shape, data=data, verify=verify)
    shape = "x".join(str(s) for s in rep["input_shape"])
    checked = (f", checked against the ensemble (max relative difference {rep['verified_max_rel_diff']:.2g})"
               if "verified_max_rel_diff" in rep else "")
    click.echo(f"{rep['format']}: {rep['members']} member(s), T {rep['temperature']:.3f}, input {shape} -> "
               f"{rep['classes']} probabilities{checked}: {rep['file']}")


# ---------------------------------------------------------------------------------------------
# align


@main.command()
@click.argument("a", type=click.Path(path_type=str))
@click.argument("b", type=click.Path(path_type=str))
@model_options
@click.option("--out", required=True, metavar="B_ALIGNED.safetensors", help="Where to write the permuted B.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the group order in weight matching.")
@click.option("--report", metavar="FILE.json", help="Write the alignment summary as JSON.")
@click.option("--data", metavar="SPEC", default=None,
              help="Data whose inputs the model takes (same forms as build's --data): one batch traces the "
                   "model and checks the result. Default: an input shape guessed from the model.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
              help="The check's forward passes under autocast in this dtype (weight matching itself uses "
                   "the weights only: the same result at every precision).")
def align(a: str, b: str, out: str, seed: int, report: str | None, data: str | None, precision: str,
          **kw: Any) -> None:
    """Permute B's hidden units to match A's (weight matching on the unit graph).

    The written B computes exactly the same function as B; paths from A to it are shorter
    and usually lower."""
    from .pipeline import align_files
    from .precision import use_precision
    with use_precision(precision):
        rep = align_files(a, b, out, model=_model_opts(kw), seed=seed, data=data)
    click.echo(f"aligned {b} to {a}: {rep['groups']} unit groups, {rep['moved']:.0%} of units moved, "
               f"{rep['iterations']} sweeps, objective {rep['objective_before']:.4g} -> {rep['objective_after']:.4g}")
    click.echo(f"wrote {out}")
    _write_report(rep, report)


# ---------------------------------------------------------------------------------------------
# stability, pack


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=str))
@model_options
@data_options
@run_options
@click.option("--search-steps", type=click.IntRange(min=0), default=48, show_default=True,
              help="Swap trials per unit group when choosing the kept halves (0: importance ranking only).")
@click.option("--report", metavar="FILE.json", help="Write eps and the per-depth losses as JSON.")
@click.option("--noise", is_flag=True,
              help="Measure noise stability instead (Arora et al. 2018), per unit group: layer and interlayer "
                   "cushion, activation contraction, and interlayer smoothness and output change under Gaussian "
                   "and under channel-dropout noise.")
@click.option("--noise-scale", type=float, default=0.1, show_default=True,
              help="With --noise: size of the Gaussian noise relative to the norm of the group's activations.")
@click.option("--noise-examples", type=int, default=256, show_default=True,
              help="With --noise: how many training examples (the first ones) are measured.")
def stability(checkpoint: str, search_steps: int, report: str | None, noise: bool, noise_scale: float,
              noise_examples: int, **kw: Any) -> None:
    """Dropout stability of a checkpoint (Kuditipudi et al. 2019): for each depth k, the loss
    increase when only a chosen half of every hidden unit group at depth >= k is kept
    (outgoing weights doubled, BatchNorm statistics re-estimated); eps is the largest.
    With --noise: the noise-stability quantities per unit group instead."""
    from .pipeline import stability_of_file
    _noise_flags_need_noise(noise)
    data = _data_opts(kw, default_data="digits")
    if noise:
        from .noise import noise_stability_of_file
        rep = noise_stability_of_file(checkpoint, model=_model_opts(kw), data=data, scale=noise_scale,
                                      examples=noise_examples)
        _echo_noise(rep)
        _write_report(rep, report)
        return
    rep = stability_of_file(checkpoint, model=_model_opts(kw), data=data, search_steps=search_steps)
    rows = [(d["depth"], _fmt(d["loss"]), _fmt(d["increase"])) for d in rep["depths"]]
    _echo_table(rows, ("depth >=", "loss", "increase"))
    click.echo(f"base loss {rep['base_loss']:.4f}   eps {rep['eps']:.4f}")
    _write_report(rep, report)


def _noise_flags_need_noise(noise: bool) -> None:
    ctx = click.get_current_context()
    for name in ("noise_scale", "noise_examples"):
        if not noise and ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT:
            flag = "--" + name.replace("_", "-")
            raise click.BadParameter("applies only with --noise", ctx=ctx, param_hint=f"'{flag}'")


def _echo_noise(rep: dict[str, Any]) -> None:
    """`stability --noise`: one row per unit group, then the network's figures."""
    def f(x: Any) -> str:
        return "-" if x is None else _fmt(float(x))
    rows = [(g["group"], g["depth"], g["units"], f(g["layer_cushion"]), f(g["interlayer_cushion"]),
             f(g["activation_contraction"]), f(g["noise"]["gaussian"]["output_change"]),
             f(g["noise"]["gaussian"]["smoothness"]), f(g["noise"]["dropout"]["output_change"]),
             f(g["noise"]["dropout"]["smoothness"])) for g in rep["groups"]]
    _echo_table(rows, ("group", "depth", "units", "layer cushion", "interlayer cushion", "contraction",
                       "gauss change", "gauss smooth", "dropout change", "dropout smooth"))
    n = rep["network"]
    click.echo(f"network: layer cushion {f(n['layer_cushion'])}, interlayer cushion {f(n['interlayer_cushion'])}, "
               f"contraction {f(n['activation_contraction'])}, smoothness {f(n['gaussian_smoothness'])} (gaussian) "
               f"{f(n['dropout_smoothness'])} (dropout); noise scale {rep['scale']}, dropout p {rep['p']}, "
               f"{rep['examples']} examples, base loss {rep['base_loss']:.4f}")


@main.command()
@click.argument("a", type=click.Path(path_type=str))
@click.argument("b", type=click.Path(path_type=str))
@model_options
@data_options
@run_options
@click.option("--out", required=True, metavar="FILE.safetensors", help="Where to write the packed model.")
@click.option("--method", type=click.Choice(["dropout", "short"]), default="dropout", show_default=True,
              help="dropout: the dropout-stable path's halves (layered networks); short: every group halved "
                   "at once (the short path's; residual and squeeze-excite networks too).")
@click.option("--search-steps", type=click.IntRange(min=0), default=None,
              help="Swap trials per unit group when choosing the halves (default 48 for dropout, 4 for short; "
                   "0: the importance ranking alone, fastest).")
@click.option("--report", metavar="FILE.json", help="Write the comparison as JSON.")
def pack(a: str, b: str, out: str, method: str, search_steps: int | None, report: str | None, **kw: Any) -> None:
    """Pack two checkpoints into ONE model of the same architecture and size whose output is
    the mean of the logits of their dropout halves: a 2-member ensemble at one model's cost,
    loadable with load_state_dict or timm."""
    from .pipeline import pack_files
    data = _data_opts(kw, default_data="digits")
    rep = pack_files(a, b, out, model=_model_opts(kw), data=data, method=method, search_steps=search_steps)
    from .pack import certificate_line
    rows = [(name, _fmt(m["nll"]), _fmt(m["acc"]), _fmt(m["ece"])) for name, m in rep.items()
            if name in ("packed", "A", "B", "ensemble")]
    _echo_table(rows, ("", f"{rep['split']} nll", f"{rep['split']} acc", f"{rep['split']} ece"))
    click.echo(f"certificate: {certificate_line(rep['certificate'])}")
    click.echo(f"packed model: {out}")
    _write_report(rep, report)


# ---------------------------------------------------------------------------------------------
# connect


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=str))
@model_options
@data_options
@run_options
@path_options("neb")
@click.option("--points", type=int, default=ConnectOptions.points, show_default=True,
              help="Points per pair on the straight line (the barrier matrix).")
@click.option("--path-points", type=int, default=ConnectOptions.path_points, show_default=True,
              help="Points along each tree edge's path (its saddle).")
@click.option("--out-dir", required=True, metavar="DIR",
              help="Where connect.json, barriers.png, tree.png and the finished pairs and paths go (rerun to resume).")
@click.option("--out", metavar="ENS.safetensors",
              help="Also write an ensemble whose members are chosen across all the tree's paths on --val-data.")
@click.option("--members", type=int, default=ConnectOptions.members, show_default=True,
              help="Most distinct members of --out.")
@click.option("--candidates", type=int, default=ConnectOptions.candidates, show_default=True,
              help="Points per tree path evaluated for --out's choice (ends included).")
def connect(inputs: tuple[str, ...], points: int, path_points: int, out_dir: str, out: str | None, members: int,
            candidates: int, **kw: Any) -> None:
    """Connect many checkpoints (files, or folders of them): the barrier of every pair, the
    minimum spanning tree of the barriers, and a path (--method) along each tree edge with
    its saddle loss (Draxler et al. 2018). Finished pairs and edges in --out-dir are reused."""
    from .connect import connect_checkpoints
    path = _path_opts(kw)
    align = bool(path.pop("align"))
    build = BuildOptions(align=False, **path)
    opts = ConnectOptions(points=points, path_points=path_points, align=align, members=members,
                          candidates=candidates)
    model, data = _model_opts(kw), _data_opts(kw, default_data="digits")
    rep = connect_checkpoints(inputs, out_dir=out_dir, model=model, data=data, opts=opts, build=build, ensemble=out)
    n = len(rep["checkpoints"])
    for c in rep["checkpoints"]:
        click.echo(f"[{c['index']}] {c['file']}")
    _echo_table([(str(i), *(_fmt(v) for v in row)) for i, row in enumerate(rep["matrix"])],
                ("barrier", *(str(j) for j in range(n))))
    click.echo("")
    # a barrier is a rise above the chord between the ends; a saddle is the path's highest loss
    _echo_table([(f"{e['i']} - {e['j']}", _fmt(e["barrier"]), _fmt(e["path_barrier"]), "|", _fmt(e["saddle"]),
                  f"{e['saddle_t']:.2f}", e["path_file"]) for e in rep["tree"]],
                ("tree edge", "barrier: line", f"barrier: {rep['method']}", "|", "saddle loss", "at t", "path"))
    click.echo("barrier = the highest training loss above the chord between the ends; saddle loss = the highest "
               "training loss on the path")
    click.echo(f"largest saddle loss on the tree: {rep['tree_max_saddle']:.4f}")
    if rep.get("ensemble"):
        e = rep["ensemble"]
        click.echo(f"ensemble: {len(e['members'])} member(s) ({e['rule']}), val NLL {e['val']['nll']:.4f} "
                   f"(best single point {e['best_single_val_nll']:.4f}): {e['file']}")
        click.echo(f"selection: {e['decision']}")
    for name in ("connect.json", "barriers.png", "tree.png"):
        click.echo(f"{name}: {FsPath(out_dir) / name}")
