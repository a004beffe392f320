"""Write docs/cli.md (every command's `--help`, from click) and docs/api.md (the Python API:
signatures and docstrings), so the references say what the code says.

    python docs/make_reference.py          # rewrite both files
    python docs/make_reference.py --check  # exit 1 if either is stale (tests/test_docs.py runs this)
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent

#: (module, names) the API reference lists, in order: the public surface of docs/design.md
API = [
    ("mcensemble", ["load_checkpoint", "save_checkpoint", "Checkpoint", "ModelSpec", "create_loader", "update_bn",
                    "load_path", "load_ensemble", "save_ensemble", "EnsembleModel"]),
    ("mcensemble.pipeline", ["build_ensemble", "build_fge", "scan_checkpoints", "scan_path_file",
                             "evaluate_ensemble_file", "align_files", "stability_of_file", "pack_files"]),
    ("mcensemble.options", ["ModelOptions", "DataOptions", "BuildOptions", "ConnectOptions"]),
    ("mcensemble.connect", ["connect_checkpoints"]),
    ("mcensemble.paths", ["ModePath", "register_path", "known_kinds", "buildable_kinds", "path_kind", "LinearPath"]),
    ("mcensemble.paths.curves", ["BezierPath", "PolyChainPath"]),
    ("mcensemble.paths.curve_base", ["CurveConfig"]),
    ("mcensemble.paths.fit", ["fit_curve"]),
    ("mcensemble.paths.dropout", ["DropoutPath", "DropoutConfig", "build_dropout_path"]),
    ("mcensemble.paths.short", ["ShortPath", "ShortConfig", "build_short_path"]),
    ("mcensemble.paths.neb", ["NebPath", "NebConfig", "fit_neb"]),
    ("mcensemble.evaluate", ["evaluate", "scan"]),
    ("mcensemble.units", ["build_unit_graph", "UnitGraph"]),
    ("mcensemble.align", ["align_states"]),
    ("mcensemble.hooks", ["channel_dropout"]),
    ("mcensemble.snapshots", ["SnapshotCollector", "fge_train", "FgeConfig"]),
    ("mcensemble.stability", ["dropout_stability"]),
    ("mcensemble.pack", ["pack_pair"]),
    ("mcensemble.precision", ["use_precision"]),
    ("mcensemble.errors", None),
]


def cli_md() -> str:
    import click

    import mcensemble.cli  # noqa: F401  (registers the commands)
    from mcensemble.cli_group import main
    out = ["# Command-line reference", "",
           "Generated from the commands' own `--help` by `python docs/make_reference.py`; a test keeps it "
           "current.", ""]

    def helptext(cmd: click.Command, name: str, parent: click.Context | None = None) -> str:
        ctx = click.Context(cmd, info_name=name, parent=parent, terminal_width=100, max_content_width=100,
                            **main.context_settings)
        return cmd.get_help(ctx)

    out += ["## mcensemble", "", "```text", helptext(main, "mcensemble"), "```", ""]
    root = click.Context(main, info_name="mcensemble", terminal_width=100, max_content_width=100,
                         **main.context_settings)
    for name in sorted(main.commands):
        out += [f"## mcensemble {name}", "", "```text", helptext(main.commands[name], name, root), "```", ""]
    return "\n".join(out)


def _doc(obj) -> str:
    return inspect.cleandoc(obj.__doc__ or "").strip()


def _signature(name: str, obj) -> str:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        sig = ""
    return f"{'class ' if inspect.isclass(obj) else ''}{name}{sig}"


def api_md() -> str:
    out = ["# Python API reference", "",
           "Generated from the signatures and docstrings by `python docs/make_reference.py`; a test keeps it "
           "current. How the pieces fit: [internals.md](internals.md); adding a path kind: "
           "[adding-a-path-kind.md](adding-a-path-kind.md).", ""]
    for module_name, names in API:
        module = importlib.import_module(module_name)
        out += [f"## {module_name}", ""]
        for name in names if names is not None else module.__all__:
            obj = getattr(module, name)
            out += [f"### `{module_name}.{name}`", "", "```python", _signature(name, obj), "```", ""]
            if _doc(obj):
                out += [_doc(obj), ""]
    return "\n".join(out)


FILES = {"cli.md": cli_md, "api.md": api_md}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="Only check that the files are current.")
    args = ap.parse_args()
    stale = []
    for name, render in FILES.items():
        text = render()
        path = DOCS / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale: {', '.join(stale)}; run python docs/make_reference.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
