"""The library speaks Python: its exceptions live in `mcensemble.errors`, its messages name
parameters (`val_data`), never command-line flags (--val-data: the CLI translates), and user
input is refused with an `MCEnsembleError`, not a bare ValueError."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import mcensemble.errors as errors
from mcensemble.errors import BadOptionError, MCEnsembleError

PACKAGE = Path(__file__).resolve().parents[1] / "mcensemble"
#: the command line itself may name its flags
CLI = {"cli.py", "cli_group.py"}
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]+")
#: calls whose text reaches a user: exceptions and log records
SPEAKERS = re.compile(r"(Error|Exception|Interrupted|warning|warn|info|error|debug)$")


def _library_files():
    return [p for p in sorted(PACKAGE.rglob("*.py")) if p.name not in CLI]


def _text(node: ast.AST) -> str:
    """The literal text of a call argument (f-string parts included)."""
    return " ".join(n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str))


def _name(func: ast.AST) -> str:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def test_messages_name_parameters_not_flags():
    found = []
    for path in _library_files():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and SPEAKERS.search(_name(node.func)):
                for arg in [*node.args, *(k.value for k in node.keywords)]:
                    for flag in FLAG.findall(_text(arg)):
                        found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {flag}")
    assert not found, found


def test_every_exception_class_lives_in_errors():
    elsewhere = []
    for path in _library_files():
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    re.search(r"(Error|Exception|Interrupted)$", _name(b)) for b in node.bases):
                elsewhere.append(f"{path.relative_to(PACKAGE)}: {node.name}")
    assert not elsewhere, elsewhere
    assert all(issubclass(getattr(errors, n), MCEnsembleError) for n in errors.__all__)


def test_the_cli_translates_parameters_to_flags():
    import click

    import mcensemble.cli  # noqa: F401  (registers the commands)
    from mcensemble.cli_group import cli_words, main
    with click.Context(main.commands["build"]):
        assert cli_words("no `val_data`: pass `val_data` (and `test_data`)") == \
            "no --val-data: pass --val-data (and --test-data)"
        assert cli_words("exactly 3 members (`exact_members`)") == "exactly 3 members (--exact-members)"
        assert cli_words("`bends` must be >= 1") == "--bends must be >= 1"   # a path kind's own setting


@pytest.mark.parametrize("call, option", [
    (lambda: __import__("mcensemble.paths", fromlist=["LinearPath"]).ModePath({"endpoint.0": {}}), "groups"),
    (lambda: __import__("mcensemble.plot", fromlist=["plot_scan"]).plot_scan([], "x.png"), "scans"),
])
def test_user_input_is_a_bad_option_error(call, option):
    with pytest.raises(BadOptionError) as e:
        call()
    assert e.value.option == option
