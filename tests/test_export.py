"""`mcensemble export`: each format, loaded with its own runtime, computes the ensemble."""
from __future__ import annotations

import io
import json
import sys
import warnings

import pytest
import torch
import torch.nn as nn

from mcensemble.ensemble import EnsembleModel, save_ensemble
from mcensemble.errors import BadOptionError, ExportError
from mcensemble.export import FORMATS, export_ensemble, run_artifact
from mcensemble.models import ModelSpec

from helpers import assert_close_rel, randomize, timm_factory

pytest.importorskip("onnxruntime")


def bn_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


#: name -> (factory, input size): the timm test models and a BN CNN, tiny inputs
MODELS = {
    "test_resnet": (timm_factory("test_resnet"), 16),
    "test_efficientnet": (timm_factory("test_efficientnet"), 16),
    "test_convnext": (timm_factory("test_convnext"), 32),
    "bn_cnn": (bn_cnn, 8),
}


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    """(ensemble of 2 randomised members, weights 0.3 / 0.7, temperature 1.7; input size)."""
    factory, size = MODELS[request.param]
    states = [randomize(factory(), seed=i).state_dict() for i in range(2)]
    ens = EnsembleModel(factory, states, weights=[0.3, 0.7], temperature=1.7)
    return ens, size


def load_with_own_runtime(path, fmt):
    """Each format through its own loader only (not mcensemble's run_artifact)."""
    if fmt == "onnx":
        import onnxruntime as ort
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
    if fmt == "exported-program":
        module = torch.export.load(io.BytesIO(path.read_bytes())).module()
        return lambda x: module(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path))
    return lambda x: module(x)


@pytest.mark.parametrize("fmt", FORMATS)
def test_artifact_equals_the_ensemble(case, fmt, tmp_path):
    ens, size = case
    g = torch.Generator().manual_seed(0)
    out = tmp_path / f"ens.{fmt}"
    rep = export_ensemble(ens, out, format=fmt, example=torch.randn(2, 1, size, size, generator=g), verify=False)
    assert rep["members"] == 2 and rep["temperature"] == 1.7 and rep["classes"] == 10 and out.is_file()
    run = load_with_own_runtime(out, fmt)
    for batch in (3, 1):  # neither is the example's batch size of 2
        x = torch.randn(batch, 1, size, size, generator=g)
        with torch.no_grad():
            want = ens(x).exp()
            got = run(x)
        assert got.shape == (batch, 10)
        assert_close_rel(got, want, rtol=1e-4, msg=f"{fmt} batch {batch}")


def test_the_temperature_and_weights_are_in_the_artifact(tmp_path):
    import onnx
    ens = EnsembleModel(bn_cnn, [randomize(bn_cnn(), seed=i).state_dict() for i in range(3)],
                        weights=[0.0, 1.0, 3.0], temperature=0.5)
    out = tmp_path / "e.onnx"
    rep = export_ensemble(ens, out, format="onnx", example=torch.randn(2, 1, 8, 8))
    assert rep["members"] == 2 and rep["verified_max_rel_diff"] <= 1e-4  # the weight-0 member is left out
    desc = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["mcensemble"])
    assert desc["temperature"] == 0.5 and desc["weights"] == pytest.approx([0.25, 0.75])
    assert desc["input_shape"] == ["batch", 1, 8, 8] and desc["classes"] == 10
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert_close_rel(run_artifact(out, x, format="onnx"), ens(x).exp(), rtol=1e-4)


def test_verify_refuses_an_artifact_that_differs(tmp_path, monkeypatch):
    import mcensemble.export as export_mod
    ens = EnsembleModel(bn_cnn, [randomize(bn_cnn(), seed=0).state_dict()])
    monkeypatch.setattr(export_mod, "run_artifact", lambda f, x, format: torch.full((x.shape[0], 10), 0.1))
    with pytest.raises(ExportError, match=r"differ from the ensemble's by .* \(relative; at most 0.0001"):
        export_ensemble(ens, tmp_path / "e.pt", format="torchscript", example=torch.randn(2, 1, 8, 8))
    assert not (tmp_path / "e.pt").exists()


def test_missing_onnx_names_the_extra(tmp_path, monkeypatch):
    ens = EnsembleModel(bn_cnn, [bn_cnn().state_dict()])
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(BadOptionError, match=r"needs onnxruntime: `pip install mcensemble\[export\]`"):
        export_ensemble(ens, tmp_path / "e.onnx", format="onnx")
    with pytest.raises(BadOptionError, match=r"unknown export format 'onx'.*did you mean 'onnx'"):
        export_ensemble(ens, tmp_path / "e.onnx", format="onx")


def test_cli_export(mce_cli, tmp_path, monkeypatch):
    from mcensemble.models import create_model
    spec = ModelSpec(arch="mce_digits_cnn", kwargs={"num_classes": 10, "in_chans": 1, "widths": [4, 8]})
    states = [randomize(create_model(spec), seed=i).state_dict() for i in range(2)]
    f = save_ensemble(tmp_path / "ens.safetensors", states, model_spec=spec, calibration={"temperature": 1.2})
    res = mce_cli("export", f, "--format", "torchscript", "--out", tmp_path / "e.pt")
    assert res.exit_code == 0, res.output
    assert "2 member(s), T 1.200, input batchx1x8x8 -> 10 probabilities, checked against the ensemble" in res.output
    res = mce_cli("export", f, "--format", "tflite", "--out", tmp_path / "e.tfl")
    assert res.exit_code == 2 and "'tflite' is not one of" in res.output
    res = mce_cli("export", f, "--format", "onnx", "--out", tmp_path / "e.onnx", "--input-shape", "1,2,2")
    assert res.exit_code == 2 and "cannot take the example input of shape (1, 2, 2)" in res.output
    assert "--input-shape" in res.output and not (tmp_path / "e.onnx").exists()
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "onnx", None)
        res = mce_cli("export", f, "--format", "onnx", "--out", tmp_path / "e.onnx")
        assert res.exit_code == 2 and "pip install mcensemble[export]" in res.output and "Traceback" not in res.output
    no_spec = save_ensemble(tmp_path / "nospec.safetensors", states)
    res = mce_cli("export", no_spec, "--format", "onnx", "--out", tmp_path / "e.onnx")
    assert res.exit_code == 1 and "does not say how to build the model" in res.output
