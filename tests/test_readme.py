"""The shell commands of the README and of docs/*.md (the benchmark tables aside) stay true to
the CLI: every `mcensemble SUB ...` they show names a real subcommand, and every option it
passes is one that subcommand declares (the commands themselves are run on real files by the
CLI and recipe tests). The generated references (docs/cli.md, docs/api.md) are current."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

import mcensemble.cli  # noqa: F401  (registers the commands)
from mcensemble.cli_group import main

ROOT = Path(__file__).resolve().parents[1]


#: the pages whose commands are checked: the README and the docs (benchmark tables are records)
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _shell_lines() -> list[str]:
    text = "\n".join(p.read_text() for p in PAGES)
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)           # continuation lines
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()           # trailing comments
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def _mcensemble_calls() -> list[list[str]]:
    calls = []
    for line in _shell_lines():
        for part in re.split(r"&&|;", line):
            words = shlex.split(part.replace("...", ""))
            for i, w in enumerate(words):
                if w == "mcensemble":                       # also `torchrun ... -m mcensemble`
                    calls.append(words[i + 1:])
                    break
    return calls


CALLS = _mcensemble_calls()


def _declared(cmd: click.Command) -> set[str]:
    names = set()
    for p in cmd.params:
        names.update(o.split("=")[0] for o in (*p.opts, *p.secondary_opts) if o.startswith("--"))
    return names | {"--help"}


def test_the_readme_shows_commands():
    subs = {c[0] for c in CALLS if c}
    assert {"build", "scan", "eval", "inspect", "stability", "pack", "align", "connect"} <= subs, subs


@pytest.mark.parametrize("words", CALLS, ids=[" ".join(c[:2]) for c in CALLS])
def test_each_readme_command_uses_real_options(words):
    if not words:  # `mcensemble build` with no arguments: the embedded default
        return
    sub, *args = words
    assert sub in main.commands, f"README runs `mcensemble {sub}`: no such subcommand"
    cmd = main.commands[sub]
    group_opts = _declared(main)
    unknown = [a.split("=")[0] for a in args
               if a.startswith("--") and a.split("=")[0] not in _declared(cmd) | group_opts]
    assert not unknown, f"README's `mcensemble {sub}` passes {unknown}, which `mcensemble {sub}` does not declare"


def test_readme_python_scripts_exist():
    for line in _shell_lines():
        m = re.match(r"python (tests/\S+\.py)", line)
        if m:
            assert (ROOT / m.group(1)).is_file(), m.group(1)


def test_the_generated_references_are_current():
    """docs/cli.md and docs/api.md are what `python docs/make_reference.py` writes now."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_reference", ROOT / "docs" / "make_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, render in module.FILES.items():
        assert (ROOT / "docs" / name).read_text() == render(), f"docs/{name} is stale: python docs/make_reference.py"


def test_the_readme_model_module_exists_as_shown(tmp_path, monkeypatch):
    """`--model mymodels:mlp` works as the README writes it: the README shows mymodels.py."""
    from mcensemble.models import ModelSpec, create_model
    text = (ROOT / "README.md").read_text()
    source = re.search(r"```python\n# mymodels\.py\n(.*?)```", text, re.S).group(1)
    (tmp_path / "mymodels.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    specs = set(re.findall(r"--model ([a-z_]\w*:\w+)", text))
    assert specs == {"mymodels:mlp"}
    model = create_model(ModelSpec(entry="mymodels:mlp"))
    import torch
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)      # digits in, 10 classes out
