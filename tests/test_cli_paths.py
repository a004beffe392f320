"""CLI: alignment, saved paths, the plane picture, REPAIR and inspecting our own files."""
import json

import pytest
import torch

import mcensemble
from mcensemble.checkpoints import load_checkpoint


def test_align_writes_a_permuted_b_with_the_same_function(mce_cli, mce_cnn_pair, tmp_path):
    a, b = mce_cnn_pair
    out = tmp_path / "b_aligned.safetensors"
    res = mce_cli("align", a, b, "--out", out, "--report", tmp_path / "al.json")
    assert res.exit_code == 0, res.output
    assert "unit groups" in res.output
    rep = json.loads((tmp_path / "al.json").read_text())
    assert rep["objective_after"] >= rep["objective_before"]
    nb, nal = load_checkpoint(b).build_model(), load_checkpoint(out).build_model()
    assert not all(torch.equal(nb.state_dict()[k], nal.state_dict()[k]) for k in nb.state_dict())
    x = torch.rand(16, 1, 8, 8)
    torch.testing.assert_close(nal(x), nb(x), atol=1e-5, rtol=1e-5)
    assert load_checkpoint(out).metadata["alignment"]["source"]["file"] == str(b)


def test_scan_align_reports_alignment_and_keeps_endpoint_losses(mce_cli, mce_mlp_pair, tmp_path):
    a, b = mce_mlp_pair
    for flag, name in ((None, "plain.json"), ("--align", "aligned.json")):
        args = ["scan", a, b, "--data", "digits", "--points", "3", "--report", tmp_path / name]
        if flag == "--align":
            args.append(flag)
        res = mce_cli(*args)
        assert res.exit_code == 0, res.output
    plain = json.loads((tmp_path / "plain.json").read_text())
    aligned = json.loads((tmp_path / "aligned.json").read_text())
    assert "aligned" in aligned and "aligned" not in plain
    # the permuted B computes the same function: same loss at t = 1
    assert aligned["endpoints"]["B"]["loss"] == pytest.approx(plain["endpoints"]["B"]["loss"], rel=1e-5, abs=1e-6)


def test_scan_repair_needs_the_straight_line(mce_cli, mce_cnn_pair, tmp_path):
    a, b = mce_cnn_pair
    res = mce_cli("scan", a, b, "--data", "digits", "--points", "3", "--repair", "--report", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["repair"] is True and len(rep["points"]) == 3
    res = mce_cli("scan", a, b, "--method", "bezier", "--epochs", "1", "--repair")
    assert res.exit_code == 2 and "--repair" in res.output and "Traceback" not in res.output


def test_saved_path_scan_and_plane(mce_cli, mce_mlp_pair, tmp_path):
    a, b = mce_mlp_pair
    path_file = tmp_path / "p.safetensors"
    res = mce_cli("build", a, b, "--data", "digits", "--epochs", "1", "--members", "2", "--candidates", "3",
                  "--path-out", path_file, "--out", tmp_path / "e.safetensors")
    assert res.exit_code == 0, res.output
    res = mce_cli("scan", "--path", path_file, "--data", "digits", "--points", "3", "--plane", tmp_path / "plane.png",
                  "--plane-grid", "3", "--report", tmp_path / "s.json")
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "s.json").read_text())
    assert rep["method"] == "bezier" and len(rep["points"]) == 3
    assert len(rep["plane"]["loss"]) == 3 and set(rep["plane"]["points"]) == {"A", "B", "bend"}
    assert (tmp_path / "plane.png").read_bytes()[:4] == b"\x89PNG"
    # t = 0 of the saved path is A
    ck = load_checkpoint(a)
    path = mcensemble.load_path(path_file)
    assert all(torch.equal(path.state_at(0.0)[k], v) for k, v in ck.state_dict.items())


def test_plane_of_a_straight_line_is_refused_before_work(mce_cli, mce_mlp_pair, tmp_path):
    a, b = mce_mlp_pair
    res = mce_cli("scan", a, b, "--data", "digits", "--plane", tmp_path / "p.png")
    assert res.exit_code == 2 and "no bend" in res.output
    assert not (tmp_path / "p.png").exists()


def test_scan_path_and_checkpoints_together_is_a_usage_error(mce_cli, mce_mlp_pair, tmp_path):
    a, b = mce_mlp_pair
    res = mce_cli("scan", a, b, "--path", tmp_path / "x.safetensors")
    assert res.exit_code == 2 and "not both" in res.output


def test_inspect_an_ensemble_and_a_path(mce_cli, mce_mlp_pair, tmp_path):
    a, b = mce_mlp_pair
    res = mce_cli("build", a, b, "--method", "linear", "--data", "digits", "--members", "3", "--candidates", "3",
                  "--out", tmp_path / "e.safetensors", "--path-out", tmp_path / "p.safetensors")
    assert res.exit_code == 0, res.output
    res = mce_cli("inspect", tmp_path / "e.safetensors")
    assert res.exit_code == 0, res.output
    assert "mcensemble-ensemble" in res.output and "members: 3" in res.output
    res = mce_cli("inspect", tmp_path / "p.safetensors")
    assert res.exit_code == 0 and "kind: linear" in res.output


def test_stability_command_reports_eps_per_depth(mce_cli, mce_mlp_pair, tmp_path):
    a, _ = mce_mlp_pair
    res = mce_cli("stability", a, "--data", "digits,train=200", "--search-steps", "2", "--report", tmp_path / "s.json")
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "s.json").read_text())
    assert rep["eps"] == pytest.approx(max(d["increase"] for d in rep["depths"]))
    assert [d["depth"] for d in rep["depths"]] == [1, 2]
    assert f"eps {rep['eps']:.4f}" in res.output


def test_pack_writes_one_plain_model_with_the_same_architecture(mce_cli, mce_cnn_pair, tmp_path):
    a, b = mce_cnn_pair
    out = tmp_path / "packed.safetensors"
    res = mce_cli("pack", a, b, "--data", "digits,train=200", "--val-data", "digits", "--out", out,
                  "--report", tmp_path / "p.json")
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "p.json").read_text())
    assert set(rep) >= {"packed", "A", "B", "ensemble", "certificate", "search"} and rep["split"] == "val"
    cert = rep["certificate"]
    assert cert["eps"] == pytest.approx(max(cert["eps_a"], cert["eps_b"], 0.0))
    assert cert["bound"] == pytest.approx((cert["loss_da"] + cert["loss_db"]) / 2)
    assert f"eps {cert['eps']:.4f}" in res.output and f"<= {cert['bound']:.4f}" in res.output
    packed = load_checkpoint(out)
    assert packed.metadata["certificate"]["eps"] == pytest.approx(cert["eps"])
    original = load_checkpoint(a)
    assert {k: v.shape for k, v in packed.state_dict.items()} == {k: v.shape for k, v in original.state_dict.items()}
    packed.build_model()  # loads strictly into the timm architecture recorded in the file


def test_fge_from_one_checkpoint(mce_cli, mce_mlp_pair, tmp_path):
    a, _ = mce_mlp_pair
    out = tmp_path / "fge.safetensors"
    res = mce_cli("build", a, "--method", "fge", "--members", "2", "--epochs", "2", "--data", "digits,train=256",
                  "--batch-size", "64", "--out", out, "--report", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["method"] == "fge" and len(rep["members"]) == 2
    assert all(m["kind"] == "snapshot" for m in mcensemble.load_ensemble(out).metadata["members"])
    res = mce_cli("build", a, "--method", "fge", "--data", "digits", "--plot", tmp_path / "x.png")
    assert res.exit_code == 2 and "no path" in res.output and not (tmp_path / "x.png").exists()
    res = mce_cli("build", *mce_mlp_pair, "--method", "fge", "--data", "digits", "--out", tmp_path / "y.safetensors")
    assert res.exit_code == 2 and "one checkpoint" in res.output and not (tmp_path / "y.safetensors").exists()


def test_unit_graph_by_hand_round_trips_through_inspect_and_build(mce_cli, mce_cnn_pair, tmp_path):
    a, b = mce_cnn_pair
    graph = tmp_path / "units.json"
    res = mce_cli("inspect", a, "--units-out", graph)
    assert res.exit_code == 0, res.output
    doc = json.loads(graph.read_text())
    assert [g["size"] for g in doc["groups"]] == [4, 8]
    res = mce_cli("build", a, b, "--method", "dropout", "--unit-graph", graph, "--data", "digits,train=200",
                  "--members", "2", "--candidates", "3", "--report", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    cert = json.loads((tmp_path / "r.json").read_text())["certificates"][0]
    assert cert["max_loss"] <= max(cert["loss_a"], cert["loss_b"]) + cert["eps"] + 1e-6
    # a hand-written graph that does not fit the model is refused, naming the tensor, before any work
    doc["groups"][0]["members"][0]["tensor"] = "features.nope.weight"
    graph.write_text(json.dumps(doc))
    res = mce_cli("stability", a, "--unit-graph", graph, "--data", "digits,train=200", "--report", tmp_path / "s.json")
    assert res.exit_code != 0 and "features.nope.weight" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "s.json").exists()


def test_align_accepts_a_unit_graph_by_hand(mce_cli, mce_mlp_pair, tmp_path):
    a, b = mce_mlp_pair
    graph = tmp_path / "units.json"
    assert mce_cli("inspect", a, "--units-out", graph).exit_code == 0
    res = mce_cli("align", a, b, "--unit-graph", graph, "--out", tmp_path / "b2.safetensors")
    assert res.exit_code == 0, res.output
    nb, nal = load_checkpoint(b).build_model(), load_checkpoint(tmp_path / "b2.safetensors").build_model()
    x = torch.rand(8, 1, 8, 8)
    torch.testing.assert_close(nal(x), nb(x), atol=1e-5, rtol=1e-5)
