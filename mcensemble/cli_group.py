"""The `mcensemble` click group, `main`: torch-free, so `mcensemble --help` (and a usage
error) is answered without importing torch or the pipeline. The commands are defined in
`mcensemble.cli` and imported when one is looked up.

User errors (`MCEnsembleError`) become click errors with no traceback: a bad option value
exits 2, any other failure exits 1. `mcensemble --debug ...` re-raises them instead.
"""
from __future__ import annotations

import logging
import re
import sys
from typing import Any

import click

from .errors import BadOptionError, MCEnsembleError

__all__ = ["main", "COMMANDS", "PARAM_FLAGS", "cli_words"]


#: library parameters (what `BadOptionError.option` and the `name`s in library messages say)
#: whose flag is not simply the command's option of that name (which `_flags` adds: a path
#: kind's settings, `--bends`, `--search-steps`, come from the kinds themselves)
PARAM_FLAGS: dict[str, str] = {
    "arch": "--arch", "model": "--model", "num_classes": "--num-classes", "in_chans": "--in-chans",
    "ema": "--ema", "graph": "--unit-graph", "unit_graph": "--unit-graph",
    "data": "--data", "val_data": "--val-data", "test_data": "--test-data", "batch_size": "--batch-size",
    "workers": "--workers", "seed": "--seed", "device": "--device", "precision": "--precision",
    "method": "--method", "kind": "--method",
    "align": "--align", "repair": "--repair", "points": "--points", "path_points": "--path-points",
    "plane": "--plane", "plane_grid": "--plane-grid", "path": "--path",
    "members": "--members", "candidates": "--candidates", "selection": "--selection", "dtype": "--save-dtype",
    "path_out": "--path-out", "out_dir": "--out-dir", "checkpoint": "--checkpoint-dir",
    "checkpoint_every": "--checkpoint-every", "resume": "--resume", "from_run": "--from-run", "top_k": "--top-k",
    "metric_mode": "--metric-mode", "recipe": "--recipe", "verify": "--verify",
    "trust_remote_code": "--trust-remote-code", "calibrate": "--calibrate", "out": "--out",
    "flag_above": "--flag-above", "flag_on": "--flag-on", "format": "--format", "input_shape": "--input-shape",
    "scale": "--noise-scale", "examples": "--noise-examples",
}


def _flags(ctx: click.Context | None) -> dict[str, str]:
    """Library parameter -> flag: the options of the running command, then `PARAM_FLAGS`."""
    own = {p.name: p.opts[0] for p in (ctx.command.params if ctx is not None else ())
           if isinstance(p, click.Option) and p.name and p.opts[0].startswith("--")}
    return {**own, **PARAM_FLAGS}


def _flag_words(message: str, option: str | None, flags: dict[str, str] = PARAM_FLAGS) -> str:
    """A library message in the CLI's words: each `name` of `flags` becomes its flag, and so
    does the error's own `option` opening the message ("members must be ..." -> "--members
    must be ...")."""
    message = re.sub(r"`(\w+)`", lambda m: flags.get(m.group(1), m.group(0)), message)
    if option in flags and re.match(rf"{re.escape(option)} must\b", message):
        message = flags[option] + message[len(option):]
    return message


def _click_error(e: MCEnsembleError, ctx: click.Context) -> click.ClickException:
    option = getattr(e, "option", None)
    flags = _flags(ctx)
    message = _flag_words(str(e), option, flags)
    if isinstance(e, BadOptionError):
        flag = flags.get(option or "", option)
        if flag and flag.startswith("--") and flag not in message:
            return click.BadParameter(message, ctx=ctx, param_hint=flag)
        return click.UsageError(message, ctx=ctx)
    exc = click.ClickException(message)
    exc.exit_code = getattr(e, "exit_code", 1)  # an interrupted fit: 130 (SIGINT) / 143 (SIGTERM)
    return exc


def cli_words(text: str) -> str:
    """A library sentence (which names Python parameters: `val_data`) in the running
    command's words (--val-data)."""
    return _flag_words(text, None, _flags(click.get_current_context(silent=True)))


class _CliWords(logging.Formatter):
    """Log records in the command line's words (`cli_words`)."""

    def format(self, record: logging.LogRecord) -> str:
        return cli_words(super().format(record))


class _LibraryErrors:
    """Turns library errors into click errors (no traceback) with the context's own usage
    line; `--debug` re-raises them instead."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)  # type: ignore[misc]
        except MCEnsembleError as e:
            if ctx.meta.get("mcensemble.debug"):
                raise
            raise _click_error(e, ctx) from e


class _Command(_LibraryErrors, click.Command):
    """A subcommand: errors name `mcensemble CMD --help`."""


class _Group(_LibraryErrors, click.Group):
    """The group: also catches errors raised while a subcommand's resources close. Its
    commands live in `mcensemble.cli` (torch, the pipeline), imported only when a command
    is looked up; `--help` lists `COMMANDS` without importing it."""

    command_class = _Command

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*COMMANDS, *self.commands})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands:
            from . import cli  # noqa: F401  (registers the commands; imported here to keep --help quick)
        return self.commands.get(name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list from `COMMANDS` (what click shows from each command's help)."""
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(n) for n in names)
        rows = [(n, click.Command(n, help=COMMANDS[n]).get_short_help_str(limit) if n in COMMANDS and n not in self.commands
                 else self.commands[n].get_short_help_str(limit)) for n in names]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


#: command -> the first sentence of its help (what `mcensemble --help` lists; a test keeps it
#: equal to the command's own)
COMMANDS: dict[str, str] = {
    "inspect": "Describe a checkpoint: format, architecture, parameters, dtypes, EMA, metadata.",
    "scan": "Loss and accuracy along a path between two checkpoints A B (the straight line unless --method "
            "says otherwise), or along a saved path (--path FILE).",
    "build": "Connect checkpoints A B [C ...] by low-loss paths and sample an ensemble along them.",
    "eval": "Evaluate an ensemble file and each of its members: accuracy, NLL, ECE; and beside it the "
            "checkpoints it was built from (when the files are still there), their ensemble, the soup and the"
            " packed pair. With --val-data, --data is the training data those two need.",
    "predict": "Predict with an ensemble on INPUT (a folder of images, a data spec, or a .safetensors / .pt "
               "tensor file): one row per input with the top classes, their probabilities and the uncertainty"
               " (entropy, expected entropy, mutual information, member disagreement).",
    "export": "Export an ensemble as ONE self-contained file computing its calibrated, weighted "
              "probabilities, (batch, classes), for any batch size: ONNX, a torch.export program or "
              "TorchScript.",
    "align": "Permute B's hidden units to match A's (weight matching on the unit graph).",
    "stability": "Dropout stability of a checkpoint (Kuditipudi et al. 2019): for each depth k, the loss "
                 "increase when only a chosen half of every hidden unit group at depth >= k is kept (outgoing"
                 " weights doubled, BatchNorm statistics re-estimated); eps is the largest. With --noise: the"
                 " noise-stability quantities per unit group instead.",
    "pack": "Pack two checkpoints into ONE model of the same architecture and size whose output is the mean "
            "of the logits of their dropout halves: a 2-member ensemble at one model's cost, loadable with "
            "load_state_dict or timm.",
    "connect": "Connect many checkpoints (files, or folders of them): the barrier of every pair, the minimum "
               "spanning tree of the barriers, and a path (--method) along each tree edge with its saddle "
               "loss (Draxler et al. 2018). Finished pairs and edges in --out-dir are reused.",
}


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug) to stderr.")
@click.version_option(package_name="mcensemble")
@click.pass_context
def main(ctx: click.Context, debug: bool, verbose: int) -> None:
    """Build mode-connectivity ensembles from the checkpoints you already have."""
    ctx.meta["mcensemble.debug"] = debug
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_CliWords("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    logging.getLogger("mcensemble").setLevel(logging.INFO if verbose == 0 else level)
    # the command line is the whole process: denormals flushed for every command (on CPU they made
    # curve-fitting steps many times slower); the library scopes this to its own training calls.
    # Imported here, not at the top: `mcensemble --help` never gets this far and stays quick.
    import torch
    torch.set_flush_denormal(True)
