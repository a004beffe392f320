"""Recipes: YAML files of `mcensemble build` options. The loader on its own, then through
the CLI (flags on the command line win; option names as keys; the `endpoints` section)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mcensemble.errors import BadOptionError
from mcensemble.recipes import DEFAULT_RECIPE, SECTIONS, load_recipe

pytestmark = pytest.mark.usefixtures("mce_one_thread")

VALID = ["members", "method", "val_data", "data", "epochs", "bends", "batch_size", "checkpoints"]


def _recipe(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    f = tmp_path / name
    f.write_text(text)
    return f


# ----------------------------------------------------------------------------- the loader
def test_keys_with_dashes_or_underscores(tmp_path):
    f = _recipe(tmp_path, "val-data: digits\nbatch_size: 32\n--members: 3\nmethod: linear\n"
                          "checkpoints: [a.pt, b.pt]\n")
    got = load_recipe(f, valid=VALID)
    assert got == {"val_data": "digits", "batch_size": 32, "members": 3, "method": "linear",
                   "checkpoints": ["a.pt", "b.pt"], "_extra": {}}


def test_unknown_key_names_it_and_the_nearest_valid_key(tmp_path):
    f = _recipe(tmp_path, "method: linear\nmembres: 3\n")
    with pytest.raises(BadOptionError, match=r"unknown key 'membres'.*did you mean 'members'\?") as info:
        load_recipe(f, valid=VALID)
    assert info.value.option == "recipe"
    assert str(f) in str(info.value)
    assert "val-data" in str(info.value)  # the valid keys are listed, as typed on the command line


def test_unknown_key_with_no_close_match_lists_valid_keys(tmp_path):
    f = _recipe(tmp_path, "zzzzzz: 1\n")
    with pytest.raises(BadOptionError, match=r"unknown key 'zzzzzz'") as info:
        load_recipe(f, valid=VALID)
    assert "did you mean" not in str(info.value)
    assert "valid keys:" in str(info.value) and "members" in str(info.value)


def test_endpoints_section(tmp_path):
    f = _recipe(tmp_path, "members: 2\nendpoints:\n  arch: mce_digits_mlp\n  n: 3\n  batch-size: 16\n")
    got = load_recipe(f, valid=VALID)
    assert got["_extra"] == {"endpoints": {"arch": "mce_digits_mlp", "n": 3, "batch_size": 16}}
    assert got["members"] == 2
    assert set(SECTIONS["endpoints"]) >= {"arch", "n", "epochs", "data", "batch_size"}


def test_endpoints_section_unknown_key_and_not_a_mapping(tmp_path):
    f = _recipe(tmp_path, "endpoints:\n  epocs: 1\n")
    with pytest.raises(BadOptionError, match=r"unknown key 'epocs' in section 'endpoints'.*did you mean 'epochs'"):
        load_recipe(f, valid=VALID)
    f = _recipe(tmp_path, "endpoints: 3\n")
    with pytest.raises(BadOptionError, match=r"'endpoints' must be a mapping"):
        load_recipe(f, valid=VALID)


@pytest.mark.parametrize("text, kind", [("- members\n- 3\n", "list"), ("just text\n", "str"), ("42\n", "int")])
def test_a_recipe_that_is_not_a_mapping_is_refused(tmp_path, text, kind):
    f = _recipe(tmp_path, text)
    with pytest.raises(BadOptionError, match=rf"must be a mapping of option: value, got {kind}") as info:
        load_recipe(f, valid=VALID)
    assert info.value.option == "recipe"


def test_empty_recipe_is_no_options(tmp_path):
    assert load_recipe(_recipe(tmp_path, "# nothing yet\n"), valid=VALID) == {"_extra": {}}


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(BadOptionError, match=r"is not valid YAML"):
        load_recipe(_recipe(tmp_path, "members: [3\n"), valid=VALID)
    with pytest.raises(BadOptionError, match=r"cannot read recipe .*nope\.yaml"):
        load_recipe(tmp_path / "nope.yaml", valid=VALID)


def test_yaml_python_tags_are_not_executed(tmp_path):
    marker = tmp_path / "PWNED"
    f = _recipe(tmp_path, f"members: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(BadOptionError, match=r"is not valid YAML"):
        load_recipe(f, valid=VALID)
    assert not marker.exists()


def test_the_default_recipe_only_uses_build_options():
    from mcensemble.cli_group import main
    build = main.commands["build"]
    names = {p.name for p in build.params} | {o[2:].replace("-", "_") for p in build.params for o in p.opts
                                               if o.startswith("--")}
    got = load_recipe(DEFAULT_RECIPE, valid=sorted(names))
    assert "endpoints" in got["_extra"]
    assert got["method"] == "bezier" and got["members"] >= 2


# ----------------------------------------------------------------------------- through the CLI
def _report(path: Path) -> dict:
    return json.loads(path.read_text())


def test_flags_on_the_command_line_beat_the_recipe(tmp_path, mce_cli, mce_mlp_pair):
    a, b = mce_mlp_pair
    f = _recipe(tmp_path, "members: 3\nmethod: linear\ncandidates: 3\nseed: 5\n")
    res = mce_cli("build", a, b, "--recipe", f, "--members", "2", "--out", tmp_path / "e.safetensors",
                  "--report", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    rep = _report(tmp_path / "r.json")
    assert len(rep["members"]) == 2      # the flag
    assert rep["method"] == "linear"     # the recipe
    assert rep["seed"] == 5              # the recipe
    # and without the flag the recipe's value is used
    res = mce_cli("build", a, b, "--recipe", f, "--out", tmp_path / "e3.safetensors", "--report", tmp_path / "r3.json")
    assert res.exit_code == 0, res.output
    assert len(_report(tmp_path / "r3.json")["members"]) == 3


def test_recipe_checkpoints_and_option_names(tmp_path, mce_cli, mce_user_models):
    """`checkpoints:` as a list, and `model:` (the option's name) for --model."""
    a, b = mce_user_models / "a.safetensors", mce_user_models / "b.pt"
    f = _recipe(tmp_path, f"checkpoints: ['{a}', '{b}']\nmodel: mce_user_models:mlp\nmethod: linear\n"
                          "members: 2\ncandidates: 2\n")
    res = mce_cli("build", "--recipe", f, "--out", tmp_path / "e.safetensors", "--report", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    rep = _report(tmp_path / "r.json")
    assert [c["file"] for c in rep["checkpoints"]] == [str(a), str(b)]
    import mcensemble
    assert len(mcensemble.load_ensemble(tmp_path / "e.safetensors", trust_remote_code=True)) == 2


@pytest.mark.parametrize("text, match", [
    ("membres: 3\n", r"unknown key 'membres'.*did you mean 'members'"),
    ("- 1\n- 2\n", r"must be a mapping"),
    ("members: lots\n", r"'lots' is not a valid integer.*from recipe"),
    ("selection: best\n", r"best.*from recipe"),
])
def test_bad_recipes_exit_2_and_write_nothing(tmp_path, mce_cli, mce_mlp_pair, text, match):
    import re
    a, b = mce_mlp_pair
    f = _recipe(tmp_path, text)
    out = tmp_path / "e.safetensors"
    res = mce_cli("build", a, b, "--recipe", f, "--method", "linear", "--out", out, "--report", tmp_path / "r.json")
    assert res.exit_code == 2, res.output
    assert re.search(match, res.output, re.S), res.output
    assert "Traceback" not in res.output
    assert not out.exists() and not (tmp_path / "r.json").exists()


def test_recipe_endpoints_section_trains_the_checkpoints(tmp_path, mce_cli, monkeypatch):
    """No checkpoints: the `endpoints` section trains them into a fresh run folder first."""
    monkeypatch.chdir(tmp_path)
    f = _recipe(tmp_path, "endpoints:\n  arch: mce_digits_mlp\n  n: 2\n  epochs: 1\n  data: digits,train=200\n"
                          "data: digits,train=200\nval-data: digits\nmethod: linear\nmembers: 2\nexact-members: true\n"
                          "candidates: 3\n"
                          "threads: 1\n")
    res = mce_cli("build", "--recipe", f)
    assert res.exit_code == 0, res.output
    (run,) = (tmp_path / "mcensemble-runs").iterdir()
    names = {p.name for p in run.iterdir()}
    assert {"endpoint0.safetensors", "endpoint1.safetensors", "ensemble.safetensors", "report.json",
            "path.png", "path.safetensors"} <= names
    rep = _report(run / "report.json")
    assert rep["selection"] == "greedy-val-nll" and len(rep["members"]) == 2
    assert rep["data"] == {"train": "digits,train=200", "val": "digits"}
    assert "val" in rep["ensemble"] and rep["ensemble"]["val"]["n"] == 360
    import mcensemble
    ck = mcensemble.load_checkpoint(run / "endpoint1.safetensors")
    assert ck.metadata["arch"] == "mce_digits_mlp" and ck.metadata["epochs"] == 1
    assert len(mcensemble.load_ensemble(run / "ensemble.safetensors")) == 2
