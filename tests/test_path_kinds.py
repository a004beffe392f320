"""The path-kind registry is the only list of kinds: a toy kind registered from one file
(the worked example of docs/adding-a-path-kind.md, loaded from the doc itself) is picked up by
`build`, `scan`, `connect`, the command line, the report and the file fuzz test."""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from collections import Counter
from pathlib import Path

import click
import pytest
import torch

from mcensemble.errors import BadOptionError
from mcensemble.options import BuildOptions, DataOptions, ModelOptions
from mcensemble.paths import base as base_mod
from mcensemble.paths import buildable_kinds, known_kinds, load_path, path_kind, setting_flags

DOC = Path(__file__).resolve().parents[1] / "docs" / "adding-a-path-kind.md"
DATA = "digits,train=200"

pytestmark = pytest.mark.usefixtures("mce_one_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The doc's example kind, written to its own file and imported (then unregistered). The
    commands are loaded first, so the kind never leaks into their options (docs/cli.md)."""
    import mcensemble.cli  # noqa: F401
    source = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    file = tmp_path_factory.mktemp("toy") / "toy_midpoint_kind.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location("toy_midpoint_kind", file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    base_mod._REGISTRY.pop("midpoint", None)
    sys.modules.pop(spec.name, None)


def test_the_registry_lists_it_with_its_settings(toy):
    assert "midpoint" in known_kinds() and buildable_kinds()["midpoint"] is toy.MidpointPath
    assert setting_flags()["scale"]["defaults"] == {"midpoint": 1.0}
    assert path_kind("midpoint").config_from({"scale": 0.5, "bends": 3}) == toy.MidpointConfig(scale=0.5)
    with pytest.raises(BadOptionError, match="scale") as e:
        path_kind("midpoint").config_from({"scale": 5})
    assert e.value.option == "scale"
    with pytest.raises(BadOptionError, match="midpoint"):      # the list in the message is the registry's
        path_kind("nope")


def test_build_makes_it_and_reports_its_section(toy, mce_mlp_pair, tmp_path):
    from mcensemble.pipeline import build_ensemble
    res = build_ensemble(mce_mlp_pair, model=ModelOptions(), data=DataOptions(data=DATA, progress=False),
                         opts=BuildOptions(method="midpoint", settings={"scale": 0.5}, members=3, candidates=3,
                                           packed=False),
                         out=tmp_path / "e.safetensors", path_out=tmp_path / "p.safetensors")
    assert res.report["method"] == "midpoint" and res.report["midpoint"] == {"scale": 0.5}
    path = load_path(tmp_path / "p.safetensors")
    assert type(path) is toy.MidpointPath and path.vertex_t == [0.0, 0.5, 1.0]
    a, b = path.endpoints
    k = next(k for k in a if a[k].is_floating_point())
    torch.testing.assert_close(path.state_at(0.5)[k], 0.5 * (a[k] + b[k]) / 2)


def test_scan_and_connect_take_it(toy, mce_mlp_pair, tmp_path):
    from mcensemble.connect import connect_checkpoints
    from mcensemble.options import ConnectOptions
    from mcensemble.pipeline import scan_checkpoints
    data = DataOptions(data=DATA, progress=False)
    rep = scan_checkpoints(list(mce_mlp_pair), model=ModelOptions(), data=data, points=3,
                           opts=BuildOptions(method="midpoint", settings={"scale": 0.8}))
    assert rep["method"] == "midpoint" and rep["kind"] == "midpoint"
    rep = connect_checkpoints(list(mce_mlp_pair), out_dir=tmp_path / "c", data=data,
                              opts=ConnectOptions(points=3, path_points=3),
                              build=BuildOptions(method="midpoint", settings={"scale": 0.8}))
    assert rep["method"] == "midpoint" and [e["kind"] for e in rep["tree"]] == ["midpoint"]


def test_the_command_line_takes_it_and_its_flag(toy, mce_mlp_pair, tmp_path, mce_cli):
    from mcensemble.cli import path_options

    @click.command()
    @path_options("linear")
    def probe(**kw):
        click.echo(json.dumps(kw))
    assert "--scale" in {o for p in probe.params for o in p.opts}       # options made after the kind registered
    r = mce_cli("scan", *mce_mlp_pair, "--method", "midpoint", "--points", "3", "--data", DATA, "--threads", "1",
                "--report", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "r.json").read_text())["kind"] == "midpoint"


def test_the_fuzz_machinery_builds_and_mutates_it(toy, tmp_path):
    import test_fuzz_files as fuzz
    assert "midpoint" in fuzz.kinds()
    seed = fuzz.built_path_file("midpoint", tmp_path / "midpoint.safetensors")
    fuzz.loader("midpoint")(seed)
    results = fuzz.fuzz_kind("midpoint", seed, tmp_path, 24)
    outcomes = Counter(r["outcome"] for r in results)
    assert outcomes["other"] == 0, [r for r in results if r["outcome"] == "other"][:3]
    assert outcomes["loaded"] > 0 and outcomes["MCEnsembleError"] > 0, outcomes
