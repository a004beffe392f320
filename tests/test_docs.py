"""The docs keep one home per fact and stay true: docs/design.md's picture lists every module."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_design_picture_lists_every_module():
    text = (ROOT / "docs" / "design.md").read_text()
    picture = re.search(r"## Shape\n.*?```\n(.*?)```", text, re.S).group(1)
    listed = set(re.findall(r"^\s+([\w/]+?\.py|[\w]+/)\s", picture, re.M))
    package = ROOT / "mcensemble"
    modules = {p.name for p in package.glob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    modules |= {p.name for p in (package / "paths").glob("*.py") if p.name != "__init__.py"}
    modules |= {f"{p.name}/" for p in package.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert not modules - listed, f"docs/design.md does not show {sorted(modules - listed)}"
    assert not {m for m in listed if m.endswith(".py")} - modules, "docs/design.md shows modules that are gone"
