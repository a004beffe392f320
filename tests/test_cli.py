"""The `mcensemble` command line, driven in-process with click's CliRunner: inspect, scan,
build, eval; exit codes (2: bad option, 1: other user error), one-line errors without
tracebacks (`--debug` re-raises), and nothing written when a command fails."""
from __future__ import annotations

import argparse
import importlib
import json
import math
import pickle
import re
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mcensemble
from mcensemble.data import digits_tensors
from mcensemble.errors import UnsafeCheckpointError
from mcensemble.models import create_model

from helpers import RunsShell, one_thread

pytestmark = pytest.mark.usefixtures("mce_one_thread")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METHODS = ["linear", "bezier", "polychain"] + (
    ["dropout"] if (Path(mcensemble.__file__).parent / "paths" / "dropout.py").exists() else [])


def _clean_failure(res, code: int) -> str:
    """The command failed with `code` through click (no stray exception, no traceback)."""
    assert res.exit_code == code, res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    return res.output


def _barrier(points: list[dict]) -> float:
    la, lb = points[0]["loss"], points[-1]["loss"]
    return max(p["loss"] - ((1 - p["t"]) * la + p["t"] * lb) for p in points)


# ----------------------------------------------------------------------------- inspect
@pytest.fixture(scope="module")
def saver_folder(tmp_path_factory) -> Path:
    """A timm output folder written by CheckpointSaver with a model EMA that differs from the raw weights."""
    from timm.utils import CheckpointSaver, ModelEmaV3
    from mcensemble.models import ModelSpec
    out = tmp_path_factory.mktemp("timm_out")
    torch.manual_seed(0)
    model = create_model(ModelSpec(arch="mce_digits_mlp", kwargs={"num_classes": 10, "in_chans": 1, "width": 16}))
    ema = ModelEmaV3(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    args = argparse.Namespace(model="mce_digits_mlp", num_classes=10, in_chans=1, model_kwargs={"width": 16})
    CheckpointSaver(model, opt, args=args, model_ema=ema, checkpoint_dir=str(out)).save_checkpoint(3, metric=0.5)
    return out


def _fields(output: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(r"^\s*([\w ]+?): (.*)$", output, re.M)}


def test_inspect_safetensors(mce_cli, mce_mlp_pair):
    res = mce_cli("inspect", mce_mlp_pair[0])
    assert res.exit_code == 0, res.output
    f = _fields(res.output)
    assert f["format"] == "safetensors"
    assert f["arch"] == "mce_digits_mlp"
    assert f["tensors"] == "6"
    assert f["parameters"].startswith(f"{64 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10:,}")
    assert f["dtypes"] == "float32 x6"
    assert "no EMA" in f["weights"]
    assert json.loads(f["metadata"])["model_args"] == {"width": 32}
    assert len(f["sha256"]) == 64


def test_inspect_timm_checkpoint_saver_file(mce_cli, saver_folder):
    best = saver_folder / "model_best.pth.tar"
    res = mce_cli("inspect", best)
    assert res.exit_code == 0, res.output
    f = _fields(res.output)
    assert f["format"] == "timm-train" and f["arch"] == "mce_digits_mlp"
    assert f["weights"] == "ema"
    md = json.loads(f["metadata"])
    assert md["has_ema"] is True and md["epoch"] == 3 and md["metric"] == 0.5
    raw = _fields(mce_cli("inspect", best, "--no-ema").output)
    assert raw["weights"] == "raw"
    assert raw["sha256"] == f["sha256"]  # one file, two sets of weights
    # a timm output folder means its model_best.pth.tar
    folder = _fields(mce_cli("inspect", saver_folder).output)
    assert folder["format"] == "timm-train" and folder["weights"] == "ema"


def _write_bad(kind: str, f: Path, marker: Path) -> None:
    if kind == "corrupt":
        f.write_bytes(b"\x80\x02" + bytes(range(256)) * 4)
    elif kind == "truncated":
        torch.save({"w": torch.zeros(100)}, f)
        f.write_bytes(f.read_bytes()[:200])
    elif kind == "evil-torch":
        torch.save({"weight": torch.zeros(2), "x": RunsShell(marker)}, f)
    elif kind == "evil-pickle":
        f.write_bytes(pickle.dumps(RunsShell(marker), protocol=2))


@pytest.mark.parametrize("kind, message", [
    ("missing", r"no such file or folder"),
    ("corrupt", r"not a torch checkpoint"),
    ("truncated", r"truncated or corrupt"),
    ("evil-torch", r"refused to load.*'posix.system'.*nothing in it was executed"),
    ("evil-pickle", r"refused to load.*system.*nothing in it was executed"),
])
def test_inspect_bad_files_fail_cleanly(mce_cli, tmp_path, kind, message):
    f, marker = tmp_path / "model.pt", tmp_path / "PWNED"
    _write_bad(kind, f, marker)
    out = _clean_failure(mce_cli("inspect", f), 1)
    assert re.search(message, out, re.S), out
    assert str(f) in out
    assert out.strip().startswith("Error:") and out.strip().count("\n") == 0  # one line
    assert not marker.exists()


def test_debug_shows_the_traceback(mce_cli, tmp_path):
    f, marker = tmp_path / "evil.pt", tmp_path / "PWNED"
    _write_bad("evil-torch", f, marker)
    res = mce_cli("--debug", "inspect", f)
    assert res.exit_code != 0
    assert isinstance(res.exception, UnsafeCheckpointError)  # re-raised, not turned into a click error
    tb = "".join(traceback.format_exception(*res.exc_info))
    assert "Traceback" in tb and "load_checkpoint" in tb
    assert not marker.exists()


# ----------------------------------------------------------------------------- scan
def test_scan_with_user_model(mce_cli, mce_user_models, tmp_path):
    a, b = mce_user_models / "a.safetensors", mce_user_models / "b.pt"
    rep_f, png = tmp_path / "r.json", tmp_path / "p.png"
    res = mce_cli("scan", a, b, "--model", "mce_user_models:mlp", "--data", "digits", "--points", "3",
                  "--report", rep_f, "--plot", png)
    assert res.exit_code == 0, res.output
    rep = json.loads(rep_f.read_text())
    assert {"points", "endpoints", "barrier"} <= set(rep)
    assert [p["t"] for p in rep["points"]] == [0.0, 0.5, 1.0]
    assert all({"t", "loss", "acc"} <= set(p) for p in rep["points"])
    assert rep["endpoints"]["A"]["t"] == 0.0 and rep["endpoints"]["B"]["t"] == 1.0
    assert rep["barrier"] == pytest.approx(_barrier(rep["points"]), abs=1e-9)
    assert rep["barrier"] > 0.0
    assert f"barrier (train loss): {rep['barrier']:.4f}" in res.output
    assert png.read_bytes()[:8] == PNG_MAGIC
    # the ends are the checkpoints' own losses
    user_mod = importlib.import_module("mce_user_models")
    net = user_mod.mlp()
    net.load_state_dict(torch.load(b, weights_only=True))
    x, y = digits_tensors("train")
    with torch.no_grad():
        assert rep["points"][-1]["loss"] == pytest.approx(F.cross_entropy(net(x), y).item(), rel=1e-5)


def test_scan_points_must_be_at_least_2(mce_cli, mce_mlp_pair, tmp_path):
    out = _clean_failure(mce_cli("scan", *mce_mlp_pair, "--points", "1", "--report", tmp_path / "r.json"), 2)
    assert "--points" in out and ">= 2" in out
    assert not (tmp_path / "r.json").exists()


def test_scan_mismatched_architectures_names_the_tensor(mce_cli, mce_user_models, tmp_path):
    """Same module, other width: the loader reads B into the spec's model and the check names the tensor."""
    wide = tmp_path / "wide.pt"
    torch.save(importlib.import_module("mce_user_models").wide_mlp().state_dict(), wide)
    res = mce_cli("scan", mce_user_models / "a.safetensors", wide, "--model", "mce_user_models:mlp",
                  "--data", "digits", "--report", tmp_path / "r.json")
    out = _clean_failure(res, 1)
    assert re.search(r"first differing tensor '1\.(weight|bias)'.*\(24(, 64|,)\).*\(48(, 64|,)\)", out), out
    assert not (tmp_path / "r.json").exists()


def test_scan_one_checkpoint_is_a_usage_error(mce_cli, mce_mlp_pair):
    out = _clean_failure(mce_cli("scan", mce_mlp_pair[0]), 2)
    assert "two checkpoints" in out


# ----------------------------------------------------------------------------- build
@pytest.fixture(scope="module")
def built(mce_mlp_pair, tmp_path_factory):
    """`build A B --method M` with tiny settings, run once per method; -> (result, files)."""
    from click.testing import CliRunner
    from mcensemble.cli_group import main
    cache: dict[str, tuple] = {}

    def run(method: str):
        if method not in cache:
            d = tmp_path_factory.mktemp(f"build-{method}")
            files = {k: d / n for k, n in (("out", "ens.safetensors"), ("report", "build.json"), ("plot", "build.png"),
                                          ("path_out", "path.safetensors"), ("soup", "soup.safetensors"))}
            with one_thread():
                res = CliRunner().invoke(main, [str(x) for x in (
                    "build", *mce_mlp_pair, "--method", method, "--epochs", 1, "--members", 2, "--exact-members", "--candidates", 3,
                    "--data", "digits", "--val-data", "digits", "--batch-size", 64,
                    "--out", files["out"], "--report", files["report"], "--plot", files["plot"],
                    "--path-out", files["path_out"], "--soup", files["soup"])])
            cache[method] = (res, files)
        return cache[method]
    return run


@pytest.mark.parametrize("method", METHODS)
def test_build_writes_everything(built, method):
    res, files = built(method)
    assert res.exit_code == 0, res.output
    for name, f in files.items():
        assert f.is_file() and f.stat().st_size > 0, name
        assert f"{f}" in res.output
    assert files["plot"].read_bytes()[:8] == PNG_MAGIC
    assert "ensemble (2 members)" in res.output


@pytest.mark.parametrize("method", METHODS)
def test_build_report(built, method, mce_mlp_pair):
    res, files = built(method)
    assert res.exit_code == 0, res.output
    rep = json.loads(files["report"].read_text())
    assert rep["method"] == method and rep["selection"] == "greedy-val-nll"
    assert set(rep["endpoints"]) == {"A", "B"}
    for m in rep["endpoints"].values():
        assert {"t", "loss", "acc", "val_nll", "val_acc"} <= set(m)
    assert len(rep["members"]) == 2
    assert all(0.0 <= m["t"] <= 1.0 and m["kind"] == method for m in rep["members"])
    assert {"train", "val"} <= set(rep["ensemble"])
    for split, n in (("train", 1437), ("val", 360)):
        e = rep["ensemble"][split]
        assert {"loss", "acc", "nll", "ece"} <= set(e) and e["n"] == n
    assert {"load_s", "path_s", "members_s", "write_s", "total_s"} <= set(rep["timings"])
    assert all(v >= 0 for v in rep["timings"].values())
    assert [c["file"] for c in rep["checkpoints"]] == [str(f) for f in mce_mlp_pair]
    assert rep["path"]["barrier"] >= 0 and rep["line"]["barrier"] > 0
    if method in ("bezier", "polychain"):
        assert rep["curve"] == {"kind": method, "bends": 1, "epochs": 1, "lr": 0.04, "weight_decay": 5e-4}


@pytest.mark.parametrize("method", METHODS)
def test_build_outputs_load(built, method, mce_mlp_pair):
    res, files = built(method)
    assert res.exit_code == 0, res.output
    ens = mcensemble.load_ensemble(files["out"])
    assert len(ens) == 2
    x, _ = digits_tensors("val")
    with torch.no_grad():
        lp = ens(x[:16])
    assert lp.shape == (16, 10) and torch.allclose(lp.exp().sum(1), torch.ones(16), atol=1e-5)
    path = mcensemble.load_path(files["path_out"])
    a = mcensemble.load_checkpoint(mce_mlp_pair[0]).state_dict
    s0 = path.state_at(0.0)
    assert set(s0) == set(a) and all(torch.allclose(s0[k], a[k]) for k in a)
    # the soup is an ordinary checkpoint
    net = mcensemble.load_checkpoint(files["soup"]).build_model()
    assert net(x[:4]).shape == (4, 10)
    rep = json.loads(files["report"].read_text())
    assert {"train", "val"} <= set(rep["soup"])


@pytest.mark.parametrize("args, option, message", [
    (["--members", "0"], "--members", ">= 1"),
    (["--method", "nope"], "--method", "linear, bezier, polychain"),
    (["--method", "bezeir"], "--method", "Did you mean 'bezier'"),
    (["--bends", "0", "--method", "bezier"], "--bends", ">= 1"),
    (["--bends", "0", "--method", "polychain"], "--bends", ">= 1"),
    (["--epochs", "0", "--method", "bezier"], "--epochs", ">= 1"),
    (["--candidates", "1"], "--candidates", ">= 2"),
    (["--members", "5", "--candidates", "3", "--val-data", "digits"], "--members", "more than the 3 candidate"),
    (["--selection", "greedy"], "--selection", "needs --val-data"),
    (["--data", "digits,size=16"], "digits,size=16", "cannot take"),
    (["--data", "digits,sise=16"], "sise", "valid keys"),
    (["--val-data", "nowhere/at/all"], "nowhere/at/all", ""),
])
def test_build_bad_options_exit_2_and_write_nothing(mce_cli, mce_mlp_pair, tmp_path, args, option, message):
    outs = {n: tmp_path / n for n in ("e.safetensors", "r.json", "p.png", "path.safetensors", "soup.safetensors")}
    res = mce_cli("build", *mce_mlp_pair, "--epochs", "1", "--method", "linear", *args,
                  "--out", outs["e.safetensors"], "--report", outs["r.json"], "--plot", outs["p.png"],
                  "--path-out", outs["path.safetensors"], "--soup", outs["soup.safetensors"])
    out = _clean_failure(res, 2)
    assert option in out and message.lower() in out.lower()
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary file


def test_build_data_that_does_not_fit_the_model(mce_cli, mce_mlp_pair, tmp_path):
    out = tmp_path / "e.safetensors"
    res = mce_cli("build", *mce_mlp_pair, "--method", "linear", "--data", "digits,size=16", "--out", out)
    msg = _clean_failure(res, 2)
    assert "digits,size=16" in msg and "(128, 1, 16, 16)" in msg and "mce_digits_mlp" in msg
    assert not out.exists()


def test_build_mismatched_architectures_exit_1(mce_cli, mce_mlp_pair, mce_cnn_pair, tmp_path):
    out = tmp_path / "e.safetensors"
    msg = _clean_failure(mce_cli("build", mce_mlp_pair[0], mce_cnn_pair[0], "--method", "linear", "--out", out), 1)
    assert "do not share an architecture" in msg and "layers.1.weight" in msg
    assert not out.exists()


def test_build_linear_plot_and_three_checkpoints(mce_cli, mce_mlp_pair, tmp_path):
    a, b = mce_mlp_pair
    rep_f, png = tmp_path / "r.json", tmp_path / "p.png"
    res = mce_cli("build", a, b, a, "--method", "linear", "--members", "3", "--candidates", "3",
                  "--report", rep_f, "--plot", png)
    assert res.exit_code == 0, res.output
    assert png.read_bytes()[:8] == PNG_MAGIC
    rep = json.loads(rep_f.read_text())
    assert list(rep["endpoints"]) == ["A", "B", "C"] and rep["selection"] == "uniform"
    assert "endpoint C" in res.output


def test_build_same_seed_same_members(mce_cli, mce_mlp_pair, tmp_path):
    from safetensors.torch import load_file
    files = []
    for i, seed in enumerate((7, 7)):
        out = tmp_path / f"e{i}.safetensors"
        res = mce_cli("build", *mce_mlp_pair, "--method", "bezier", "--epochs", "1", "--members", "3",
                      "--candidates", "3", "--seed", seed, "--out", out)
        assert res.exit_code == 0, res.output
        files.append(load_file(str(out)))
    assert files[0].keys() == files[1].keys() and len(files[0]) == 3 * 6
    for k in files[0]:
        assert torch.equal(files[0][k], files[1][k]), k


# ----------------------------------------------------------------------------- eval
def test_eval_per_member_and_ensemble(mce_cli, built, tmp_path):
    _, files = built("bezier")
    rep_f = tmp_path / "e.json"
    res = mce_cli("eval", files["out"], "--data", "digits", "--report", rep_f)
    assert res.exit_code == 0, res.output
    rep = json.loads(rep_f.read_text())
    assert rep["split"] == "val" and len(rep["members"]) == 2
    for m in [*rep["members"], rep["ensemble"]]:
        assert {"nll", "acc", "ece"} <= set(m) and m["n"] == 360
    ens = mcensemble.load_ensemble(files["out"])
    assert [m["t"] for m in rep["members"]] == [m["t"] for m in ens.metadata["members"]]
    # recompute from the members, each loaded on its own
    x, y = digits_tensors("val")
    lps = []
    for i in range(len(ens)):
        net = create_model(ens.model_spec)
        net.load_state_dict(ens.member_state_dict(i), strict=True)
        with torch.no_grad():
            lps.append(F.log_softmax(net.eval()(x), dim=-1))
        assert rep["members"][i]["nll"] == pytest.approx(F.nll_loss(lps[-1], y).item(), rel=1e-5)
    log_mean = torch.logsumexp(torch.stack(lps), 0) - math.log(len(lps))
    assert rep["ensemble"]["nll"] == pytest.approx(F.nll_loss(log_mean, y).item(), rel=1e-5)
    assert rep["ensemble"]["acc"] == pytest.approx((log_mean.argmax(1) == y).float().mean().item())
    # the ensemble module gives the same log-probabilities, at the temperature the build fitted and stored
    assert ens.temperature == ens.metadata["calibration"]["temperature"] != 1.0
    with torch.no_grad():
        assert torch.allclose(ens(x), torch.log_softmax(log_mean / ens.temperature, dim=1), atol=1e-5)
    assert "ensemble (2)" in res.output


def test_eval_needs_data_and_a_file(mce_cli, built, tmp_path):
    _, files = built("linear")
    out = _clean_failure(mce_cli("eval", files["out"]), 2)
    assert "--data" in out
    out = _clean_failure(mce_cli("eval", tmp_path / "none.safetensors", "--data", "digits"), 1)
    assert "none.safetensors" in out


def test_eval_untrusted_entry_is_not_imported(mce_cli, mce_user_models, tmp_path):
    """An ensemble whose file names `module:function` needs --model (or --trust-remote-code)."""
    out = tmp_path / "e.safetensors"
    res = mce_cli("build", mce_user_models / "a.safetensors", mce_user_models / "b.pt", "--model",
                  "mce_user_models:mlp", "--method", "linear", "--members", "2", "--candidates", "2", "--out", out)
    assert res.exit_code == 0, res.output
    msg = _clean_failure(mce_cli("eval", out, "--data", "digits"), 2)
    assert "mce_user_models:mlp" in msg and "--model" in msg
    for extra in (["--model", "mce_user_models:mlp"], ["--trust-remote-code"]):
        res = mce_cli("eval", out, "--data", "digits", *extra)
        assert res.exit_code == 0, res.output


# ----------------------------------------------------------------------------- the entry point
def test_python_m_mcensemble_help():
    p = subprocess.run([sys.executable, "-m", "mcensemble", "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    for cmd in ("inspect", "scan", "build", "eval"):
        assert cmd in p.stdout
    assert "--debug" in p.stdout


def test_library_parameters_are_named_by_their_flags():
    """Library errors name Python parameters; the CLI shows its flags through one table."""
    import mcensemble.cli  # noqa: F401  (registers the commands)
    from mcensemble.cli_group import PARAM_FLAGS, _flag_words, main
    flags = {o for cmd in main.commands.values() for p in cmd.params for o in [*p.opts, *p.secondary_opts]}
    assert set(PARAM_FLAGS.values()) <= flags
    assert _flag_words("members must be an integer >= 1, got 0", "members") == "--members must be an integer >= 1, got 0"
    assert _flag_words("`members` 4 is more than 3; raise `candidates`", "members") == "--members 4 is more than 3; " \
                                                                                         "raise --candidates"
    assert _flag_words("insert must be >= 1 (`halves` too)", "insert") == "insert must be >= 1 (`halves` too)"


def test_help_lists_the_commands_without_importing_torch():
    """`mcensemble --help` is answered by the torch-free group (the commands load on use)."""
    code = ("import sys\n"
            "from mcensemble.cli_group import main\n"
            "try:\n"
            "    main(['--help'])\n"
            "except SystemExit:\n"
            "    pass\n"
            "print('torch' in sys.modules, 'mcensemble.cli' in sys.modules, file=sys.stderr)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0 and p.stderr.strip() == "False False", p.stderr
    for name in ("inspect", "scan", "build", "eval", "align", "stability", "pack", "connect"):
        assert f"  {name}  " in p.stdout, name


def test_the_group_lists_each_command_as_click_would():
    import inspect as pyinspect

    import mcensemble.cli  # noqa: F401  (registers the commands)
    from mcensemble.cli_group import COMMANDS, main
    assert set(COMMANDS) == set(main.commands)
    for name, cmd in main.commands.items():
        first = " ".join(pyinspect.cleandoc(cmd.help).split("\n\n")[0].split())
        assert COMMANDS[name] == first, name
