"""Temperature scaling, the calibration metrics, and the temperature in the ensemble file."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mcensemble import load_ensemble
from mcensemble.calibration import (apply_temperature, brier_score, calibrate_ensemble, calibration_metrics,
                                    calibration_summary, fit_temperature)
from mcensemble.ensemble import EnsembleModel, read_ensemble_metadata, save_ensemble
from mcensemble.errors import BadOptionError, CheckpointError
from mcensemble.evaluate import expected_calibration_error

from helpers import assert_close_rel, tiny_mlp, tiny_mlp_states


make_mlp = tiny_mlp


def states(k: int) -> list[dict]:
    return tiny_mlp_states(k)


def overconfident(n: int = 2000, t_true: float = 2.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels drawn from softmax(z), log-probs reported as log_softmax(z * t_true): too confident."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 4, generator=g) * 2
    y = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)
    return torch.log_softmax(z * t_true, 1), y


def test_fit_recovers_the_temperature_and_is_the_nll_minimum():
    lp, y = overconfident()
    t = fit_temperature(lp, y)
    assert t == pytest.approx(2.0, rel=0.1)
    nll = lambda s: float(F.nll_loss(apply_temperature(lp, s), y))  # noqa: E731
    assert nll(t) <= min(nll(t * 0.97), nll(t * 1.03), nll(1.0))
    # already calibrated data: T stays near 1
    lp1, y1 = overconfident(t_true=1.0, seed=1)
    assert fit_temperature(lp1, y1) == pytest.approx(1.0, abs=0.12)


def test_apply_temperature_keeps_the_top_class():
    lp, _ = overconfident(50)
    out = apply_temperature(lp, 3.0)
    assert torch.equal(out.argmax(1), lp.argmax(1))
    assert_close_rel(out.exp().sum(1), torch.ones(50))
    assert apply_temperature(lp, 1.0) is lp
    with pytest.raises(BadOptionError, match="temperature must be a finite number > 0"):
        apply_temperature(lp, 0.0)


def test_brier_and_ece_by_hand():
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    y = torch.tensor([0, 1, 1])
    # (0.2^2 + 0.2^2) + (0.6^2 + 0.6^2) + (0.3^2 + 0.3^2), over 3
    assert brier_score(probs, y) == pytest.approx((0.08 + 0.72 + 0.18) / 3)
    # 15 bins: conf 0.8 (bin 11, correct), 0.6 (bin 8, wrong), 0.7 (bin 10, correct)
    assert expected_calibration_error(probs, y) == pytest.approx((0.2 + 0.6 + 0.3) / 3)
    m = calibration_metrics(probs.log(), y)
    assert m["nll"] == pytest.approx(-(math.log(0.8) + math.log(0.4) + math.log(0.7)) / 3)
    assert m["brier"] == pytest.approx(brier_score(probs, y)) and m["ece"] == pytest.approx(1.1 / 3)


def test_summary_reports_before_and_after():
    fit, test = overconfident(seed=0), overconfident(seed=1)
    s = calibration_summary(fit, "val", {"test": test})
    assert s["fit"] == "val" and s["n_fit"] == 2000
    for split in ("val", "test"):
        assert s[split]["after"]["nll"] < s[split]["before"]["nll"]
        assert s[split]["after"]["brier"] < s[split]["before"]["brier"]
    assert s["test"]["before"] == calibration_metrics(*test)


def test_calibrate_ensemble_sets_the_temperature_and_round_trips(tmp_path):
    sts = [{k: v * 3 for k, v in st.items()} for st in states(2)]  # large weights: overconfident
    ens = EnsembleModel(make_mlp, sts)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1, 4, 4, generator=g)
    y = torch.randint(0, 5, (256,), generator=g)  # labels unrelated to x: the best T is large
    loader = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)]
    summary = calibrate_ensemble(ens, loader, others={"test": loader})
    assert ens.temperature == summary["temperature"] > 2.0
    assert summary["test"]["after"]["nll"] < summary["test"]["before"]["nll"]
    with torch.no_grad():
        assert_close_rel(ens(x), torch.log_softmax(EnsembleModel(make_mlp, sts)(x) / ens.temperature, 1), rtol=1e-5)
    f = ens.save(tmp_path / "cal.safetensors")
    assert read_ensemble_metadata(f)["calibration"] == {"temperature": ens.temperature}
    back = load_ensemble(f, model=make_mlp)
    assert back.temperature == ens.temperature
    with torch.no_grad():
        assert_close_rel(back(x), ens(x), rtol=1e-6)


def test_old_files_load_at_temperature_one(tmp_path):
    f = save_ensemble(tmp_path / "old.safetensors", states(2))
    assert "calibration" not in read_ensemble_metadata(f)
    ens = load_ensemble(f, model=make_mlp)
    assert ens.temperature == 1.0 and "calibration" not in ens.metadata


@pytest.mark.parametrize("cal, match", [
    ({"temperature": 0}, r"calibration\.temperature' is 0; a temperature must be > 0"),
    ({"temperature": -2.0}, r"calibration\.temperature' is -2.0"),
    ({"temperature": "hot"}, r"\(calibration\): metadata field 'temperature' must be a finite number"),
    ({}, r"\(calibration\): metadata field 'temperature' is missing"),
    ([1.5], r"metadata field 'calibration' must be a JSON object"),
])
def test_bad_temperature_in_the_file_is_refused(tmp_path, cal, match):
    f = save_ensemble(tmp_path / "e.safetensors", states(2))
    md = read_ensemble_metadata(f)
    md["calibration"] = cal
    save_file(load_file(str(f)), str(f), metadata={"mcensemble": json.dumps(md)})
    with pytest.raises(CheckpointError, match=match):
        load_ensemble(f, model=make_mlp)


def test_bad_temperatures_are_refused(tmp_path):
    ens = EnsembleModel(make_mlp, states(1))
    for bad in (0.0, -1.0, float("nan"), float("inf"), True, "2"):
        with pytest.raises(BadOptionError, match="temperature must be a finite number > 0"):
            ens.temperature = bad
    with pytest.raises(BadOptionError, match="temperature must be a finite number > 0"):
        save_ensemble(tmp_path / "e.safetensors", states(1), calibration={"temperature": float("nan")})
    with pytest.raises(BadOptionError, match="calibration must be a dict with a 'temperature'"):
        save_ensemble(tmp_path / "e.safetensors", states(1), calibration={"t": 2})
    assert not (tmp_path / "e.safetensors").exists()


# --------------------------------------------------------------------------- build and eval

def build_cli(mce_cli, pair, tmp_path, *extra):
    out, report = tmp_path / "ens.safetensors", tmp_path / "build.json"
    res = mce_cli("build", *pair, "--method", "linear", "--candidates", "3", "--members", "2", "--no-packed",
                  "--data", "digits", "--out", out, "--report", report, *extra)
    assert res.exit_code == 0, res.output
    return out, json.loads(report.read_text()), res.output


def test_build_calibrates_on_the_selection_data_and_reports_every_row(mce_cli, mce_mlp_pair, tmp_path):
    from mcensemble.data import digits_tensors
    from mcensemble.evaluate import evaluate
    out, rep, output = build_cli(mce_cli, mce_mlp_pair, tmp_path, "--val-data", "digits", "--test-data", "digits")
    cal = rep["calibration"]
    assert cal["fit"] == "val" and cal["n_fit"] == 360 and set(cal) >= {"val", "test"}
    stored = read_ensemble_metadata(out)["calibration"]
    assert stored["temperature"] == cal["temperature"] and stored["fit"] == "val"
    assert stored["nll_after"] <= stored["nll_before"]
    rows = [r for r in rep["baselines"] if "skipped" not in r]
    assert all(r["calibration"]["fit"] == "val" and "test" in r["calibration"] for r in rows)
    assert rows[-1]["calibration"] == cal                          # the built ensemble's row
    assert "calibration: a temperature per row fitted on val, metrics on test" in output
    assert "test brier" in output
    # the file predicts what the report says it does after calibration
    ens = load_ensemble(out)
    assert ens.temperature == cal["temperature"]
    x, y = digits_tensors("val")
    m = evaluate(ens, [(x, y)])
    assert m.nll == pytest.approx(cal["test"]["after"]["nll"], rel=1e-4)
    assert m.ece == pytest.approx(cal["test"]["after"]["ece"], rel=1e-4, abs=1e-6)
    # eval --calibrate refits on its own data and writes a calibrated copy
    res = mce_cli("eval", out, "--data", "digits", "--test-data", "digits", "--calibrate", "--out",
                  tmp_path / "again.safetensors", "--report", tmp_path / "eval.json")
    assert res.exit_code == 0, res.output
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["temperature"] == cal["temperature"] and "ensemble_calibrated" in ev
    assert ev["ensemble_calibrated"]["nll"] == pytest.approx(m.nll, rel=1e-4)
    assert ev["calibration"]["fit"] == "eval" and ev["calibration"]["temperature"] == pytest.approx(
        cal["temperature"], rel=1e-3)  # the same data (digits val) as the build's selection data
    assert load_ensemble(tmp_path / "again.safetensors").temperature == ev["calibration"]["temperature"]
    assert "(the file's)" in res.output and "calibrated ensemble (T" in res.output


def test_no_calibrate_and_no_selection_data(mce_cli, mce_mlp_pair, tmp_path):
    out, rep, _ = build_cli(mce_cli, mce_mlp_pair, tmp_path, "--val-data", "digits", "--no-calibrate")
    assert rep["calibration"] is None and "calibration" not in read_ensemble_metadata(out)
    assert not any("calibration" in r for r in rep["baselines"])
    out, rep, output = build_cli(mce_cli, mce_mlp_pair, tmp_path / "train-only")
    assert "no --val-data" in rep["calibration"]["skipped"] and "calibration: skipped" in output
    assert load_ensemble(out).temperature == 1.0
    res = mce_cli("eval", out, "--data", "digits", "--out", tmp_path / "x.safetensors")
    assert res.exit_code == 2 and "--out" in res.output and "--calibrate" in res.output
