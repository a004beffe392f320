"""mcensemble.pipeline through its Python API: scans, builds (determinism, the ensemble's
combination, BN, soups, joined paths), validation before any work, the default endpoints."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import mcensemble
from mcensemble.data import digits_tensors
from mcensemble.errors import ArchitectureMismatchError, BadOptionError
from mcensemble.models import create_model
from mcensemble.demo import fresh_run_dir, train_default_endpoints
from mcensemble.options import BuildOptions, DataOptions, ModelOptions
from mcensemble.pipeline import build_ensemble, scan_checkpoints

pytestmark = pytest.mark.usefixtures("mce_one_thread")


def _barrier(points: list[dict], key: str = "loss") -> float:
    la, lb = points[0][key], points[-1][key]
    return max(p[key] - ((1 - p["t"]) * la + p["t"] * lb) for p in points)


def _members(file) -> list[dict[str, torch.Tensor]]:
    raw = load_file(str(file))
    k = 1 + max(int(name.split(".")[1]) for name in raw)
    return [{n.split(".", 2)[2]: v for n, v in raw.items() if n.startswith(f"member.{i}.")} for i in range(k)]


def _member_models(ens) -> list[torch.nn.Module]:
    nets = []
    for i in range(len(ens)):
        net = create_model(ens.model_spec)
        net.load_state_dict(ens.member_state_dict(i), strict=True)
        nets.append(net.eval())
    return nets


@torch.no_grad()
def _log_mean_prob(nets, x) -> torch.Tensor:
    lps = torch.stack([F.log_softmax(n(x), dim=-1) for n in nets])
    return torch.logsumexp(lps, dim=0) - math.log(len(nets))


# ----------------------------------------------------------------------------- scan
def test_scan_report_and_barrier(mce_mlp_pair):
    rep = scan_checkpoints(mce_mlp_pair, model=ModelOptions(), data=DataOptions(data="digits", val_data="digits"),
                           points=5)
    assert [p["t"] for p in rep["points"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert rep["endpoints"]["A"] == rep["points"][0] and rep["endpoints"]["B"] == rep["points"][-1]
    assert rep["barrier"] == pytest.approx(_barrier(rep["points"]), abs=1e-9)
    assert rep["val_barrier"] == pytest.approx(_barrier(rep["points"], "val_loss"), abs=1e-9)
    assert rep["barrier"] > 0  # independently trained MLPs: the straight line goes over a hill
    assert all(p["n"] == 1437 and p["val_n"] == 360 for p in rep["points"])
    assert rep["batchnorm"] is False and rep["bn_reestimated"] is False
    assert [c["arch"] for c in rep["checkpoints"]] == ["mce_digits_mlp"] * 2
    assert rep["checkpoints"][0]["sha256"] != rep["checkpoints"][1]["sha256"]
    # the ends are the checkpoints' own losses
    ck = mcensemble.load_checkpoint(mce_mlp_pair[1])
    x, y = digits_tensors("train")
    with torch.no_grad():
        loss_b = F.cross_entropy(ck.build_model()(x), y).item()
    assert rep["points"][-1]["loss"] == pytest.approx(loss_b, rel=1e-5)


def test_scan_bn_model_reestimates_statistics(mce_cnn_pair):
    rep = scan_checkpoints(mce_cnn_pair, model=ModelOptions(), data=DataOptions(data="digits"), points=3)
    assert rep["batchnorm"] is True and rep["bn_reestimated"] is True


def test_scan_needs_points_and_matching_architectures(mce_mlp_pair, tmp_path):
    from mcensemble.checkpoints import save_checkpoint
    from mcensemble.models import ModelSpec
    with pytest.raises(BadOptionError, match="points must be an integer >= 2"):
        scan_checkpoints(mce_mlp_pair, model=ModelOptions(), data=DataOptions(), points=1)
    narrow = tmp_path / "narrow.safetensors"
    md = {"arch": "mce_digits_mlp", "num_classes": 10, "in_chans": 1, "model_args": {"width": 16}}
    save_checkpoint(create_model(ModelSpec(arch="mce_digits_mlp", kwargs={**md["model_args"], "num_classes": 10,
                                                                            "in_chans": 1})).state_dict(),
                    narrow, metadata=md)
    with pytest.raises(ArchitectureMismatchError, match=r"first differing tensor 'head.weight'.*\(10, 32\).*\(10, 16\)"):
        scan_checkpoints([mce_mlp_pair[0], narrow], model=ModelOptions(), data=DataOptions())


# ----------------------------------------------------------------------------- build
def _build(files, tmp_path, name, *, seed=0, val=None, **opts):
    out = tmp_path / f"{name}.safetensors"
    res = build_ensemble(files, model=ModelOptions(), data=DataOptions(data="digits", val_data=val, seed=seed),
                         opts=BuildOptions(**opts), out=out)
    return res, out


def test_same_seed_same_ensemble_other_seed_other_curve(mce_mlp_pair, tmp_path):
    kw = dict(method="bezier", settings={"epochs": 1}, members=3, candidates=3)
    _, f1 = _build(mce_mlp_pair, tmp_path, "s0", seed=0, **kw)
    _, f2 = _build(mce_mlp_pair, tmp_path, "s0-again", seed=0, **kw)
    _, f3 = _build(mce_mlp_pair, tmp_path, "s1", seed=1, **kw)
    m1, m2, m3 = _members(f1), _members(f2), _members(f3)
    assert len(m1) == 3
    for a, b in zip(m1, m2):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k  # bit for bit
    # the middle member comes from the fitted curve, which depends on the seed
    assert any(not torch.equal(m1[1][k], m3[1][k]) for k in m1[1])
    assert mcensemble.load_ensemble(f1).metadata["members"] == mcensemble.load_ensemble(f2).metadata["members"]


def test_ensemble_output_is_the_log_mean_of_member_probabilities(mce_mlp_pair, tmp_path):
    res, out = _build(mce_mlp_pair, tmp_path, "lin", method="linear", members=3, candidates=3)
    ens = mcensemble.load_ensemble(out)
    assert len(ens) == 3
    nets = _member_models(ens)
    x, _ = digits_tensors("val")
    with torch.no_grad():
        got = ens(x[:64])
    assert got.shape == (64, 10)
    assert torch.allclose(got, _log_mean_prob(nets, x[:64]), atol=1e-5)
    assert torch.allclose(got.exp().sum(-1), torch.ones(64), atol=1e-5)
    # the members are the points of the straight line at t = 0, 0.5, 1
    a, b = (mcensemble.load_checkpoint(f).state_dict for f in mce_mlp_pair)
    assert [m["t"] for m in ens.metadata["members"]] == [0.0, 0.5, 1.0]
    for k in a:
        assert torch.equal(ens.member_state_dict(0)[k], a[k])
        assert torch.allclose(ens.member_state_dict(1)[k], (a[k] + b[k]) / 2, atol=1e-6)
        assert torch.equal(ens.member_state_dict(2)[k], b[k])
    # the in-memory result agrees with the file
    for i, st in enumerate(res.member_states):
        for k, v in st.items():
            assert torch.equal(ens.member_state_dict(i)[k], v)


def test_bn_build_greedy_members_and_report_metrics(mce_cnn_pair, tmp_path):
    soup = tmp_path / "soup.safetensors"
    res = build_ensemble(mce_cnn_pair, model=ModelOptions(), data=DataOptions(data="digits", val_data="digits"),
                         opts=BuildOptions(method="linear", members=2, candidates=5, exact_members=True, packed=False),
                         out=tmp_path / "e.safetensors", soup=soup)
    rep = res.report
    assert rep["selection"] == "greedy-val-nll" and rep["batchnorm"] is True and rep["bn_reestimated"] is True
    us = [m["u"] for m in rep["members"]]
    assert us == sorted(us) and len(set(us)) == 2
    assert all(u in [p["t"] for p in rep["path"]["points"]] for u in us)
    # the greedy choice starts from the best single candidate on validation NLL
    best = min(rep["path"]["points"], key=lambda p: p["val_nll"])
    assert best["t"] in us
    # the reported validation NLL is the file's ensemble, BN buffers included
    ens = mcensemble.load_ensemble(tmp_path / "e.safetensors")
    x, y = digits_tensors("val")
    nll = F.nll_loss(_log_mean_prob(_member_models(ens), x), y).item()
    assert rep["ensemble"]["val"]["nll"] == pytest.approx(nll, rel=1e-4)
    assert rep["ensemble"]["val"]["n"] == 360
    # the soup: the members' weights averaged, BN re-estimated, a loadable checkpoint
    ck = mcensemble.load_checkpoint(soup)
    assert ck.metadata["arch"] == "mce_digits_cnn" and ck.metadata.get("kind") == "soup"
    net = ck.build_model()
    sts = [ens.member_state_dict(i) for i in range(2)]
    w = "features.0.weight"
    assert torch.allclose(net.state_dict()[w], (sts[0][w] + sts[1][w]) / 2, atol=1e-6)
    assert rep["soup"]["val"]["n"] == 360


def test_three_checkpoints_make_two_joined_paths(mce_mlp_pair, tmp_path):
    a, b = mce_mlp_pair
    res, out = _build([a, b, a], tmp_path, "chain", method="linear", members=5, candidates=3)
    rep = res.report
    assert list(rep["endpoints"]) == ["A", "B", "C"]
    assert [p["t"] for p in rep["path"]["points"]] == [0.0, 0.25, 0.5, 0.75, 1.0]  # shared middle end once
    assert [(m["path"], m["t"]) for m in rep["members"]] == [(0, 0.0), (0, 0.5), (1, 0.0), (1, 0.5), (1, 1.0)]
    ens = mcensemble.load_ensemble(out)
    sa, sb = (mcensemble.load_checkpoint(f).state_dict for f in (a, b))
    for k in sa:
        assert torch.equal(ens.member_state_dict(2)[k], sb[k])  # u = 0.5 is checkpoint B
        assert torch.equal(ens.member_state_dict(4)[k], sa[k])  # u = 1 is A again
    assert rep["path"]["barrier"] == pytest.approx(rep["line"]["barrier"])  # linear: the path is the line
    assert rep["path"]["barrier"] > 0
    with pytest.raises(BadOptionError, match="`path_out` needs exactly two checkpoints"):
        build_ensemble([a, b, a], model=ModelOptions(), data=DataOptions(), opts=BuildOptions(method="linear"),
                       path_out=tmp_path / "p.safetensors")


@pytest.mark.parametrize("opts, val, match", [
    (dict(members=0), None, "members must be an integer >= 1"),
    (dict(method="nope"), None, "unknown method 'nope'; choose one of linear, bezier, polychain"),
    (dict(method="bezier", settings={"bends": 0}), None, "`bends`"),
    (dict(method="bezier", settings={"epochs": 0}), None, "`epochs`"),
    (dict(method="fge", settings={"epochs": 0}), None, "epochs must be an integer >= 1"),
    (dict(candidates=1), None, "candidates must be an integer >= 2"),
    (dict(selection="greedy"), None, "`selection` greedy needs `val_data`"),
    (dict(method="linear", members=4, candidates=3), "digits", r"`members` 4 is more than the 3 candidate points"),
])
def test_options_are_checked_before_any_work(tmp_path, opts, val, match):
    """Bad options are refused before the checkpoints are even opened (these do not exist)."""
    files = [tmp_path / "missing-a.pt", tmp_path / "missing-b.pt"]
    out = tmp_path / "e.safetensors"
    with pytest.raises(BadOptionError, match=match):
        build_ensemble(files, model=ModelOptions(), data=DataOptions(data="digits", val_data=val),
                       opts=BuildOptions(**opts), out=out)
    assert list(tmp_path.iterdir()) == []


def test_uniform_members_may_outnumber_candidates(mce_mlp_pair, tmp_path):
    res, _ = _build(mce_mlp_pair, tmp_path, "u", method="linear", members=4, candidates=2)
    assert res.report["selection"] == "uniform"
    assert [round(m["t"], 6) for m in res.report["members"]] == [0.0, round(1 / 3, 6), round(2 / 3, 6), 1.0]


# ----------------------------------------------------------------------------- the demo's first step
def test_train_default_endpoints(tmp_path):
    files = train_default_endpoints(tmp_path, arch="mce_digits_mlp", epochs=1, data="digits,train=200",
                                    batch_size=64, seed=3)
    assert [f.name for f in files] == ["endpoint0.safetensors", "endpoint1.safetensors"]
    cks = [mcensemble.load_checkpoint(f) for f in files]
    for i, ck in enumerate(cks):
        assert ck.metadata["arch"] == "mce_digits_mlp" and ck.metadata["seed"] == 3 + i
        assert ck.metadata["data"] == "digits,train=200" and ck.metadata["epochs"] == 1
        net = ck.build_model()
        assert net(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert any(not torch.equal(cks[0].state_dict[k], cks[1].state_dict[k]) for k in cks[0].state_dict)
    (tmp_path / "again").mkdir()
    again = train_default_endpoints(tmp_path / "again", arch="mce_digits_mlp", epochs=1, data="digits,train=200",
                                    batch_size=64, seed=3)
    for f, g in zip(files, again):
        sa, sb = load_file(str(f)), load_file(str(g))
        assert all(torch.equal(sa[k], sb[k]) for k in sa)  # seeded


def test_fresh_run_dir_never_reuses(tmp_path):
    dirs = [fresh_run_dir(tmp_path / "runs", prefix="build") for _ in range(3)]
    assert len(set(dirs)) == 3
    assert all(d.is_dir() and d.name.startswith("build-") and not any(d.iterdir()) for d in dirs)


# ----------------------------------------------------------------------------- member choice and baselines
_SEL_MOD = "_mce_test_pipeline_selection"


@pytest.fixture()
def selection_spec(monkeypatch):
    """Selection data that is neither the training split's first 1077 examples nor digits' val split."""
    import sys
    import types
    mod = types.ModuleType(_SEL_MOD)

    def selection():
        x, y = digits_tensors("train")
        return torch.utils.data.TensorDataset(x[1077:].contiguous(), y[1077:].clone())

    mod.selection = selection
    monkeypatch.setitem(sys.modules, _SEL_MOD, mod)
    return f"{_SEL_MOD}:selection"


def _weighted_nll(nets, weights, x, y) -> float:
    with torch.no_grad():
        p = sum(w * F.softmax(n(x), dim=-1).double() for n, w in zip(nets, weights))
    return F.nll_loss(p.log(), y).item()


def test_build_never_departs_from_the_checkpoints_unconfirmed(mce_mlp_pair, tmp_path, selection_spec):
    out = tmp_path / "e.safetensors"
    res = build_ensemble(mce_mlp_pair, model=ModelOptions(),
                         data=DataOptions(data="digits", val_data=selection_spec, test_data="digits"),
                         opts=BuildOptions(method="linear", members=3, candidates=5), out=out)
    rep = res.report
    choice = rep["choice"]
    assert choice["rule"] in ("reference", "confirmed") and choice["max_members"] == 3
    assert 2 <= choice["n_members"] <= 3 and len(rep["members"]) == choice["n_members"]
    assert "did not pick it" in choice["guarantee"] and choice["decision"].startswith(f"rule {choice['rule']}")
    ref = choice["reference"]
    assert ref["name"] == "the 2 checkpoints' ensemble" and [m["t"] for m in ref["members"]] == [0.0, 1.0]
    conf = choice["confirmation"]  # 360 examples: 3 parts of 120
    assert conf["examples"] == 360 and conf["parts"] == 3 and len(conf["folds"]) == 3
    # on the selection data the shipped choice is never above the reference
    chosen = rep["ensemble"]["val"]["nll"]
    assert chosen == pytest.approx(choice["selection_nll"]["chosen"], rel=1e-4)
    assert chosen <= choice["selection_nll"]["endpoints_ensemble"] * (1 + 1e-5)
    if choice["rule"] == "reference":
        assert [m["t"] for m in rep["members"]] == [0.0, 1.0]
    # the built ensemble's row compares it with the reference on both splits, with intervals
    vs = rep["baselines"][-1]["vs_reference"]
    assert vs["reference"] == ref["name"] and vs["test"]["examples"] == 360
    assert vs["val"]["ci95"][0] <= vs["val"]["gain"] <= vs["val"]["ci95"][1]
    if choice["rule"] == "reference":  # the same two models: no gain at all
        assert vs["test"]["gain"] == pytest.approx(0.0, abs=1e-5)
    # weights: in the report, in the file, and used by the loaded ensemble
    ws = [m["weight"] for m in rep["members"]]
    assert sum(ws) == pytest.approx(1.0) and ws == pytest.approx(res.weights)
    ens = mcensemble.load_ensemble(out)
    assert ens.weights == pytest.approx(ws)
    assert ens.metadata["choice"]["rule"] == choice["rule"]
    x, y = digits_tensors("val")
    assert rep["ensemble"]["test"]["nll"] == pytest.approx(_weighted_nll(_member_models(ens), ws, x, y), rel=1e-4)


def test_build_report_rows_are_the_baselines(mce_mlp_pair, tmp_path, selection_spec):
    res = build_ensemble(mce_mlp_pair, model=ModelOptions(),
                         data=DataOptions(data="digits", val_data=selection_spec, test_data="digits"),
                         opts=BuildOptions(method="linear", members=2, candidates=3, exact_members=True),
                         out=tmp_path / "e.safetensors")
    rep = res.report
    rows = {r["kind"]: r for r in rep["baselines"]}
    assert [r["name"] for r in rep["baselines"]] == ["endpoint A", "endpoint B", "A+B ensemble", "soup",
                                                      "packed pair", "built ensemble (2 members)"]
    assert [r["cost"] for r in rep["baselines"]] == [1, 1, 2, 1, 1, 2]
    for r in rep["baselines"]:
        assert r["val"]["n"] == 360 and r["test"]["n"] == 360 and "train" not in r, r["name"]
        assert {"nll", "acc", "ece"} <= set(r["val"]) and {"nll", "acc", "ece"} <= set(r["test"])
    assert rep["baselines"][0]["val"]["nll"] == pytest.approx(rep["endpoints"]["A"]["val_nll"], rel=1e-6)
    assert rows["endpoints-ensemble"]["val"]["nll"] == pytest.approx(
        rep["choice"]["selection_nll"]["endpoints_ensemble"], rel=1e-5)
    assert rows["ensemble"]["test"] == rep["ensemble"]["test"]
    # the two endpoints' ensemble and the soup on the test data, by hand (an MLP: no BN to re-estimate)
    x, y = digits_tensors("val")
    a, b = (mcensemble.load_checkpoint(f).build_model() for f in mce_mlp_pair)
    assert rows["endpoints-ensemble"]["test"]["nll"] == pytest.approx(_weighted_nll([a, b], [0.5, 0.5], x, y),
                                                                      rel=1e-4)
    ens = mcensemble.load_ensemble(tmp_path / "e.safetensors")
    soup = create_model(ens.model_spec)
    sts = ens.member_states()
    soup.load_state_dict({k: (sts[0][k] + sts[1][k]) / 2 for k in sts[0]})
    assert rows["soup"]["test"]["nll"] == pytest.approx(_weighted_nll([soup.eval()], [1.0], x, y), rel=1e-4)
    # the packed pair of a layered MLP is one model: it is scored, not skipped
    assert "skipped" not in rows["packed"] and rows["packed"]["test"]["acc"] > 0.5
    # the cheap form: no swap search, eps on a fixed subsample, said so in the row
    cert = rows["packed"]["certificate"]
    assert "subsample" in cert["data"]["losses"] and cert["eps"] >= 0 and "no swap search" in rows["packed"]["note"]


def test_build_without_val_data_reports_train_once_and_warns(mce_mlp_pair, tmp_path, caplog):
    a, b = mce_mlp_pair
    with caplog.at_level("WARNING", logger="mcensemble"):
        res, _ = _build([a, b, a], tmp_path, "train-only", method="linear", members=3, candidates=3)
    rep = res.report
    assert rep["split"] == "train" and rep["choice"]["rule"] == "uniform"
    assert any("no `val_data`" in w for w in rep["warnings"])
    assert any("no `val_data`" in r.getMessage() for r in caplog.records)
    rows = {r["name"]: r for r in rep["baselines"]}
    assert list(rows) == ["endpoint A", "endpoint B", "endpoint C", "A+B+C ensemble", "soup", "packed pair",
                          "built ensemble (3 members)"]
    assert rows["A+B+C ensemble"]["cost"] == 3
    assert rows["packed pair"]["skipped"] == "packs two checkpoints; 3 were given"
    for r in rep["baselines"]:
        if "skipped" not in r:
            assert set(r) & {"train", "val", "test"} == {"train"} and r["train"]["n"] == 1437


def test_eval_reports_the_recorded_checkpoints_and_baselines(mce_mlp_pair, tmp_path):
    import shutil
    from mcensemble.pipeline import evaluate_ensemble_file
    a, b = (tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    shutil.copy(mce_mlp_pair[0], a)
    shutil.copy(mce_mlp_pair[1], b)
    out = tmp_path / "e.safetensors"
    build_ensemble([a, b], model=ModelOptions(), data=DataOptions(data="digits", val_data="digits"),
                   opts=BuildOptions(method="linear", members=3, candidates=3, packed=False), out=out)
    rep = evaluate_ensemble_file(out, data=DataOptions(data="digits", val_data="digits", test_data="digits"))
    rows = {r["name"]: r for r in rep["baselines"]}
    assert list(rows)[:3] == ["endpoint A", "endpoint B", "A+B ensemble (checkpoints as saved)"]
    k = len(rep["members"])
    assert rows[f"this file's ensemble ({k} member{'s' * (k > 1)}, as stored)"]["eval"][
        "nll"] == pytest.approx(rep["ensemble"]["nll"], rel=1e-5)
    x, y = digits_tensors("val")
    na, nb = (mcensemble.load_checkpoint(f).build_model() for f in (a, b))
    assert rows["endpoint A"]["eval"]["nll"] == pytest.approx(_weighted_nll([na], [1.0], x, y), rel=1e-4)
    assert rows["A+B ensemble (checkpoints as saved)"]["test"]["nll"] == pytest.approx(_weighted_nll([na, nb], [0.5, 0.5], x, y), rel=1e-4)
    assert "skipped" not in rows["soup"] and "skipped" not in rows["packed pair"]
    # a source that changed since the build, and one that is gone: skipped, with the reason
    b.write_bytes(a.read_bytes())
    a.unlink()
    rep = evaluate_ensemble_file(out, data=DataOptions(data="digits"))
    rows = {r["name"]: r for r in rep["baselines"]}
    assert "is not there" in rows["endpoint A"]["skipped"]
    assert "changed since the build" in rows["endpoint B"]["skipped"]
    assert "A+B ensemble (checkpoints as saved)" not in rows and "skipped" in rows["packed pair"]
    assert "skipped" not in rows["soup"]  # an MLP's soup needs no training data


def test_cli_build_table_train_once_test_columns_and_plot(mce_cli, mce_mlp_pair, tmp_path, caplog):
    png, rep_f = tmp_path / "p.png", tmp_path / "r.json"
    with caplog.at_level("WARNING", logger="mcensemble"):
        res = mce_cli("build", *mce_mlp_pair, "--method", "linear", "--members", "2", "--candidates", "3",
                      "--data", "digits", "--test-data", "digits", "--no-packed", "--plot", png, "--report", rep_f)
    assert res.exit_code == 0, res.output
    header = next(line for line in res.output.splitlines() if line.lstrip().startswith("cost"))
    assert header.split() == ["cost", "train", "nll", "train", "acc", "train", "ece", "test", "nll", "test", "acc",
                              "test", "ece"]
    assert "val nll" not in res.output and "packed pair: skipped (not computed" in res.output
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("no `val_data`" in w for w in warnings)
    assert not any("is also the" in w for w in warnings)  # digits: the test split is not the training split
    assert png.read_bytes()[:4] == b"\x89PNG"
    rep = json.loads(rep_f.read_text())
    assert rep["split"] == "train" and rep["baselines"][-1]["test"]["n"] == 360


def test_cli_exact_members_and_selection_sentence(mce_cli, mce_mlp_pair, tmp_path):
    rep_f = tmp_path / "r.json"
    res = mce_cli("build", *mce_mlp_pair, "--method", "linear", "--members", "3", "--exact-members",
                  "--candidates", "5", "--data", "digits", "--val-data", "digits", "--no-packed", "--report", rep_f)
    assert res.exit_code == 0, res.output
    rep = json.loads(rep_f.read_text())
    assert len(rep["members"]) == 3 and rep["choice"]["rule"] == "exact"
    assert "selection: exactly 3 distinct members (--exact-members)" in res.output
    assert "ensemble: not written (no --out)" in res.output      # no --out: it says so
    assert "built ensemble (3 members)" in res.output


def test_plot_baselines_panel(tmp_path):
    from mcensemble.plot import plot_scan
    scan = {"points": [{"t": 0.0, "loss": 0.2, "acc": 0.9}, {"t": 1.0, "loss": 0.3, "acc": 0.8}], "barrier": 0.0}
    rows = [{"name": "endpoint A", "cost": 1, "val": {"nll": 0.3}, "test": {"nll": 0.35}},
            {"name": "packed pair", "cost": 1, "skipped": "not a layered network"},
            {"name": "built ensemble (2 members)", "cost": 2, "val": {"nll": 0.25}, "test": {"nll": 0.3}}]
    plot_scan(scan, tmp_path / "b.png", baselines=rows)
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(BadOptionError, match="no row of `baselines` has metrics on `split` 'train'"):
        plot_scan(scan, tmp_path / "c.png", baselines=rows, split="train")
    assert not (tmp_path / "c.png").exists()


def test_fge_report_has_its_baselines(mce_mlp_pair, tmp_path):
    res = build_ensemble(mce_mlp_pair[:1], model=ModelOptions(),
                         data=DataOptions(data="digits,train=256", val_data="digits", test_data="digits"),
                         opts=BuildOptions(method="fge", members=2, settings={"epochs": 2, "lr": 0.05}))
    rows = {r["name"]: r for r in res.report["baselines"]}
    k = len(res.report["members"])
    name = f"FGE ensemble ({k} member{'s' if k != 1 else ''})"
    assert list(rows) == ["start checkpoint", "soup", "packed pair", name]
    assert "no pair to pack" in rows["packed pair"]["skipped"]
    assert rows[name]["val"] == res.report["ensemble"]["val"]
    # the start checkpoint is the reference: snapshots replace it only when confirmed
    choice = res.report["choice"]
    assert choice["reference"]["name"] == "the checkpoint" and choice["rule"] in ("reference", "confirmed")
    assert choice["decision"].startswith(f"rule {choice['rule']}")
    if choice["rule"] == "reference":
        assert [m["kind"] for m in res.report["members"]] == ["checkpoint"]
        assert res.report["ensemble"]["val"]["nll"] == pytest.approx(res.report["start"]["val"]["nll"], rel=1e-5)
    assert rows["start checkpoint"]["test"]["nll"] == pytest.approx(res.report["start"]["test"]["nll"], rel=1e-5)


def test_eval_from_another_folder_finds_the_sources_and_names_its_rows(mce_mlp_pair, mce_cli, tmp_path,
                                                                      monkeypatch):
    """Sources are recorded absolute and relative to the ensemble file: `eval` run elsewhere,
    or after the folder moved, still finds them; the table says which split it scored and
    which ensemble row is which."""
    import shutil
    build_dir = tmp_path / "work"
    (build_dir / "ckpts").mkdir(parents=True)
    for f, name in zip(mce_mlp_pair, ("a.safetensors", "b.safetensors")):
        shutil.copy(f, build_dir / "ckpts" / name)
    monkeypatch.chdir(build_dir)                 # relative names, as a user types them
    res = mce_cli("build", "ckpts/a.safetensors", "ckpts/b.safetensors", "--method", "linear", "--members", "2",
                  "--candidates", "3", "--data", "digits", "--val-data", "digits", "--no-packed",
                  "--out", "out/ens.safetensors")
    assert res.exit_code == 0, res.output
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    res = mce_cli("eval", build_dir / "out" / "ens.safetensors", "--data", "digits")
    assert res.exit_code == 0, res.output
    assert "not there" not in res.output and "A+B ensemble (checkpoints as saved)" in res.output
    assert "scored on digits (val split)" in res.output and "val nll" in res.output
    assert re.search(r"this file's ensemble \(\d members?, as stored\)", res.output), res.output
    moved = tmp_path / "moved"
    shutil.move(str(build_dir), str(moved))      # the folder moved as a whole: found relative to the file
    rep = evaluate_ensemble_file_rows(moved / "out" / "ens.safetensors")
    assert "A+B ensemble (checkpoints as saved)" in rep


def evaluate_ensemble_file_rows(file) -> list[str]:
    from mcensemble.pipeline import evaluate_ensemble_file
    return [r["name"] for r in evaluate_ensemble_file(file, data=DataOptions(data="digits"))["baselines"]
            if "skipped" not in r]
