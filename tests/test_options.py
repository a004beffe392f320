"""mcensemble.options: torch-free (the CLI reads its defaults from it), validated when made."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from mcensemble.errors import BadOptionError
from mcensemble.options import BuildOptions, CurveConfig, check_count


def test_importing_options_does_not_import_torch():
    code = "import sys, mcensemble.options; print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("kw, option", [
    (dict(members=0), "members"), (dict(members=1.5), "members"), (dict(candidates=1), "candidates"),
    (dict(selection="best"), "selection"), (dict(method="bezier", bends=0), "bends"),
    (dict(method="polychain", lr=-1.0), "lr"),
])
def test_build_options_are_checked_when_made(kw, option):
    with pytest.raises(BadOptionError) as e:
        BuildOptions(**kw)
    assert e.value.option == option


def test_curve_settings_nest_as_a_frozen_curve_config():
    opts = BuildOptions(method="polychain", bends=2, epochs=3, lr=0.1, weight_decay=0.0)
    assert opts.curve == CurveConfig(kind="polychain", bends=2, epochs=3, lr=0.1, weight_decay=0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.curve.epochs = 5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.epochs = 5  # type: ignore[misc]
    # not a curve: the curve settings are unused (FGE reads epochs / lr), nothing to validate
    assert BuildOptions(method="linear", epochs=0).curve is None
    assert dataclasses.replace(opts, method="bezier").curve.kind == "bezier"


def test_check_count():
    assert check_count(3, "n", minimum=2) == 3
    for bad in (1, True, 2.0, "3"):
        with pytest.raises(BadOptionError, match="n must be an integer >= 2"):
            check_count(bad, "n", minimum=2)

