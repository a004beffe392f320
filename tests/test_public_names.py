"""Every `mcensemble.<name>...` the README writes resolves after a plain `import mcensemble`,
exactly as written (issue: `mcensemble.hooks` raised AttributeError)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
#: dotted names as the README writes them: mcensemble.hooks.channel_dropout, mcensemble.load_ensemble, ...
NAMES = sorted(set(re.findall(r"\bmcensemble(?:\.[A-Za-z_]\w*)+", README.read_text())))


def test_readme_names_something():
    assert "mcensemble.hooks.channel_dropout" in NAMES and "mcensemble.load_ensemble" in NAMES


def test_every_readme_name_resolves_from_a_plain_import():
    # a fresh interpreter: in this one, other tests have imported the submodules already
    code = ("import mcensemble, operator, sys\n"
            "bad = []\n"
            "for name in sys.argv[1:]:\n"
            "    try:\n"
            "        operator.attrgetter(name.split('.', 1)[1])(mcensemble)\n"
            "    except AttributeError as e:\n"
            "        bad.append(f'{name}: {e}')\n"
            "print('\\n'.join(bad)); sys.exit(1 if bad else 0)\n")
    names = [n for n in NAMES if not n.startswith(("mcensemble.runs/", "mcensemble.safetensors"))]
    res = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("name", ["nothing_here", "_private"])
def test_unknown_attribute_is_an_attribute_error(name):
    import mcensemble
    with pytest.raises(AttributeError, match=name):
        getattr(mcensemble, name)


def test_one_home_per_name():
    """A module's `__all__` lists what it defines, not names from a sibling (the two package
    facades, `mcensemble` and `mcensemble.paths`, list their submodules' names)."""
    import importlib
    import pkgutil

    import mcensemble.paths
    modules = [f"mcensemble.{m.name}" for m in pkgutil.iter_modules(mcensemble.__path__)]
    modules += [f"mcensemble.paths.{m.name}" for m in pkgutil.iter_modules(mcensemble.paths.__path__)]
    borrowed = []
    for name in modules:
        module = importlib.import_module(name)
        for attr in getattr(module, "__all__", ()):
            home = getattr(getattr(module, attr), "__module__", name)
            own = home == name or (hasattr(module, "__path__") and home.startswith(name + "."))
            if home.startswith("mcensemble") and not own:
                borrowed.append(f"{name}.{attr} (from {home})")
    assert not borrowed, borrowed


def test_no_deprecation_layer():
    package = README.parent / "mcensemble"
    hits = [str(p) for p in package.rglob("*.py") if "DeprecationWarning" in p.read_text()]
    assert not hits, hits


@pytest.mark.parametrize("first", ["import mcensemble", "import mcensemble.pipeline", "import mcensemble.evaluate",
                                   "from mcensemble import evaluate"])
def test_evaluate_is_the_module_whatever_was_imported_first(first):
    """No public name is also a submodule's: `mcensemble.evaluate` was the function or the
    module depending on import order."""
    code = (f"{first}\n"
            "import types, mcensemble, mcensemble.pipeline\n"
            "from mcensemble import evaluate\n"
            "assert isinstance(mcensemble.evaluate, types.ModuleType) and evaluate is mcensemble.evaluate\n"
            "assert callable(mcensemble.evaluate.evaluate) and callable(mcensemble.evaluate.scan)\n"
            "clash = set(mcensemble._EXPORTS) & set(mcensemble._SUBMODULES)\n"
            "assert not clash, clash\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


BENCH = Path(__file__).resolve().parent / "benchmarks"
#: `from mcensemble... import a, b` lines of the benchmark scripts (most import inside their
#: job functions, so a rename elsewhere breaks them only when that job is run)
_IMPORT = re.compile(r"^\s*from (mcensemble[\w.]*) import \(?([\w, \n]+?)\)?\s*(?:#.*)?$", re.M)


def _bench_imports():
    for f in sorted(BENCH.glob("*.py")):
        for m in _IMPORT.finditer(f.read_text()):
            for name in m.group(2).replace("\n", " ").split(","):
                name = name.strip().split(" as ")[0].strip()
                if name:
                    yield f.name, m.group(1), name


def test_benchmarks_import_only_names_that_exist():
    import importlib
    found = list(_bench_imports())
    assert len(found) > 20  # the pattern still matches the scripts' imports
    bad = []
    for file, module, name in found:
        mod = importlib.import_module(module)
        if not hasattr(mod, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                bad.append(f"{file}: from {module} import {name}")
    assert not bad, "benchmark scripts import names that moved or were removed:\n" + "\n".join(bad)
