"""mcensemble.options: torch-free (the CLI reads its defaults from it), validated when made."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from mcensemble.errors import BadOptionError
from mcensemble.options import BuildOptions, check_count, make_config


def test_importing_options_does_not_import_torch():
    code = "import sys, mcensemble.options; print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("kw, option", [
    (dict(members=0), "members"), (dict(members=1.5), "members"), (dict(candidates=1), "candidates"),
    (dict(selection="best"), "selection"),
])
def test_build_options_are_checked_when_made(kw, option):
    with pytest.raises(BadOptionError) as e:
        BuildOptions(**kw)
    assert e.value.option == option


def test_each_kind_reads_its_own_frozen_config_from_the_settings():
    from mcensemble.paths import path_kind
    from mcensemble.paths.curve_base import CurveConfig
    from mcensemble.paths.dropout import DropoutConfig
    opts = BuildOptions(method="polychain", settings={"bends": 2, "epochs": 3, "lr": 0.1, "weight_decay": 0.0,
                                                      "search_steps": 7})
    cfg = path_kind("polychain").config_from(opts.settings, seed=5)
    assert cfg == CurveConfig(kind="polychain", bends=2, epochs=3, lr=0.1, weight_decay=0.0, seed=5)
    assert path_kind("dropout").config_from(opts.settings) == DropoutConfig(search_steps=7)  # one mapping, every kind
    assert path_kind("linear").config_from(opts.settings) is None                            # no settings at all
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.method = "bezier"  # type: ignore[misc]
    assert path_kind("bezier").config_from(cfg).kind == "bezier"        # a config passes through, its kind set
    assert path_kind("bezier").config_from(CurveConfig(bends=3)).bends == 3


@pytest.mark.parametrize("kind, settings, option", [
    ("bezier", {"bends": 0}, "bends"), ("polychain", {"lr": -1.0}, "lr"),
    ("dropout", {"search_steps": -1}, "search_steps"), ("short", {"search_steps": 1.5}, "search_steps"),
    ("neb", {"weight_decay": -1.0}, "weight_decay"),
])
def test_a_kind_checks_its_settings(kind, settings, option):
    from mcensemble.paths import path_kind
    with pytest.raises(BadOptionError) as e:
        path_kind(kind).config_from(settings)
    assert e.value.option == option


def test_make_config():
    @dataclasses.dataclass(frozen=True)
    class Toy:
        size: int = 1
        seed: int = 0
    assert make_config(None, {"size": 2}) is None
    assert make_config(Toy, {"size": 2, "other": 3}, seed=4) == Toy(size=2, seed=4)
    assert make_config(Toy, Toy(size=3), seed=1) == Toy(size=3, seed=1)
    with pytest.raises(BadOptionError, match="settings"):
        make_config(Toy, [("size", 2)])


def test_check_count():
    assert check_count(3, "n", minimum=2) == 3
    for bad in (1, True, 2.0, "3"):
        with pytest.raises(BadOptionError, match="n must be an integer >= 2"):
            check_count(bad, "n", minimum=2)

