"""`mcensemble` command line: a click group, a thin layer over `mcensemble.pipeline`.

User errors (`MCEnsembleError`) become click errors with no traceback: a bad option value
exits 2, any other failure exits 1. `mcensemble --debug ...` re-raises them instead.
"""
from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path as FsPath
from typing import Any, Callable

import click

from .errors import BadOptionError, MCEnsembleError

__all__ = ["main"]


class _Group(click.Group):
    """Turns library errors into click errors; `--debug` shows the traceback instead."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MCEnsembleError as e:
            if ctx.meta.get("mcensemble.debug"):
                raise
            if isinstance(e, BadOptionError):
                raise click.UsageError(str(e), ctx=ctx) from e
            raise click.ClickException(str(e)) from e


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug) to stderr.")
@click.version_option(package_name="mcensemble")
@click.pass_context
def main(ctx: click.Context, debug: bool, verbose: int) -> None:
    """Build mode-connectivity ensembles from the checkpoints you already have."""
    ctx.meta["mcensemble.debug"] = debug
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("mcensemble").setLevel(logging.INFO if verbose == 0 else level)


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
)

data_options = _stack(
    click.option("--data", metavar="SPEC", default=None,
                 help="Training data: 'digits[,size=N,chans=C,train=N,noise=F]', an image folder, or module:function."),
    click.option("--val-data", metavar="SPEC", default=None, help="Held-out data (same forms as --data)."),
    click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True, help="Batch size."),
)

run_options = _stack(
    click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu, cuda, cuda:1."),
    click.option("--seed", type=int, default=0, show_default=True, help="Random seed."),
)


def _model_opts(kw: dict):
    from .pipeline import ModelOptions
    return ModelOptions(arch=kw.pop("arch"), model=kw.pop("model_entry"), num_classes=kw.pop("num_classes"),
                        in_chans=kw.pop("in_chans"), ema=kw.pop("ema"))


def _data_opts(kw: dict, *, default_data: str | None = None):
    from .pipeline import DataOptions
    return DataOptions(data=kw.pop("data") or default_data, val_data=kw.pop("val_data"),
                       batch_size=kw.pop("batch_size"), seed=kw.pop("seed"), device=kw.pop("device"))


def _write_json(obj: Any, dest: str) -> None:
    from ._io import atomic_path
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default))


def _json_default(o: Any) -> Any:
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, FsPath):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


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
def inspect(file: str, units: bool, **kw: Any) -> None:
    """Describe a checkpoint: format, architecture, parameters, dtypes, EMA, metadata.

    Exits non-zero with the reason if the file fails any safety or sanity check.
    """
    from .pipeline import describe_checkpoint
    info = describe_checkpoint(file, _model_opts(kw), units=units)
    for key, value in info.items():
        if key == "units":
            continue
        if isinstance(value, dict):
            value = json.dumps(value, default=str)
        click.echo(f"{key:>12}: {value}")
    if units and info.get("units"):
        click.echo(info["units"])


# ---------------------------------------------------------------------------------------------
# scan


@main.command()
@click.argument("checkpoints", nargs=-1, type=click.Path(path_type=str))
@model_options
@data_options
@run_options
@click.option("--points", type=int, default=11, show_default=True, help="Points along the path (>= 2).")
@click.option("--report", metavar="FILE.json", help="Write the scan as JSON.")
@click.option("--plot", metavar="FILE.png", help="Write loss and error along t as a PNG.")
def scan(checkpoints: tuple[str, ...], points: int, report: str | None, plot: str | None, **kw: Any) -> None:
    """Loss and accuracy along the straight line between two checkpoints A B.

    With no checkpoints, runs the embedded default: trains two small CNNs on the built-in
    digits (seconds) and scans between them, writing into a fresh folder.
    """
    from .pipeline import scan_checkpoints, train_default_endpoints, fresh_run_dir
    if points < 2:
        raise click.BadParameter(f"must be at least 2, got {points}", param_hint="--points")
    if len(checkpoints) not in (0, 2):
        raise click.UsageError(f"scan takes two checkpoints A B (or none for the built-in demo), got {len(checkpoints)}")
    model, data = _model_opts(kw), _data_opts(kw, default_data="digits")
    if not checkpoints:
        out = fresh_run_dir(prefix="scan")
        click.echo(f"No checkpoints given: training two small CNNs on the built-in digits into {out}/", err=True)
        checkpoints = tuple(str(p) for p in train_default_endpoints(out, seed=data.seed))
        data.val_data = data.val_data or "digits"
        report = report or str(out / "scan.json")
        plot = plot or str(out / "scan.png")
    rep = scan_checkpoints(checkpoints, model=model, data=data, points=points)
    rows = [(_fmt(p["t"]), _fmt(p["loss"]), _fmt(p["acc"]), _fmt(p.get("val_loss", "")), _fmt(p.get("val_acc", "")))
            for p in rep["points"]]
    _echo_table(rows, ("t", "loss", "acc", "val_loss", "val_acc"))
    click.echo(f"barrier (train loss): {rep['barrier']:.4f}" +
               ("   BatchNorm statistics re-estimated at every point" if rep.get("bn_reestimated") else ""))
    if report:
        _write_json(rep, report)
        click.echo(f"report: {report}")
    if plot:
        from .plot import plot_scan
        plot_scan(rep, plot, title="straight line A -> B")
        click.echo(f"plot: {plot}")
