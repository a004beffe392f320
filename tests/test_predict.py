"""`mcensemble predict` and `mcensemble.predict.predict_file`: inputs, columns, errors."""
from __future__ import annotations

import csv
import json
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from mcensemble import load_ensemble
from mcensemble.data import digits_tensors, image_transform
from mcensemble.ensemble import read_ensemble_metadata, save_ensemble
from mcensemble.errors import BadOptionError, DataSpecError
from mcensemble.models import ModelSpec, create_model
from mcensemble.predict import UNCERTAINTY_COLUMNS, predict_file

from helpers import assert_close_rel, randomize

SPEC = ModelSpec(arch="mce_digits_mlp", kwargs={"num_classes": 10, "in_chans": 1, "width": 16})


@pytest.fixture(scope="module")
def ens_file(tmp_path_factory):
    """A 3-member ensemble file of mce_digits_mlp (random weights, unequal member weights, T 1.3)."""
    states = [randomize(create_model(SPEC), seed=i).state_dict() for i in range(3)]
    f = tmp_path_factory.mktemp("predict") / "ens.safetensors"
    save_ensemble(f, states, model_spec=SPEC, weights=[0.5, 0.3, 0.2], calibration={"temperature": 1.3})
    return f


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def check_rows(rows, pred, k):
    assert len(rows) == pred.probs.shape[0]
    probs, classes = pred.probs.topk(k, dim=1)
    for i, r in enumerate(rows):
        assert int(r["index"]) == i
        assert [int(r[f"top{j + 1}"]) for j in range(k)] == classes[i].tolist()
        assert_close_rel(torch.tensor([float(r[f"top{j + 1}_prob"]) for j in range(k)]), probs[i], rtol=1e-5)
        for name in UNCERTAINTY_COLUMNS:
            assert float(r[name]) == pytest.approx(float(getattr(pred, name)[i]), rel=1e-5, abs=1e-7), name


@pytest.mark.parametrize("kind", ["safetensors", "pt-tuple", "pt-dict"])
def test_tensor_files(ens_file, tmp_path, kind):
    x, y = digits_tensors("val")
    x, y = x[:37].contiguous(), y[:37].contiguous()
    if kind == "safetensors":
        src = tmp_path / "in.safetensors"
        save_file({"x": x, "y": y}, str(src))
    else:
        src = tmp_path / "in.pt"
        torch.save((x, y) if kind == "pt-tuple" else {"inputs": x, "labels": y}, src)
    out = tmp_path / "p.csv"
    rep = predict_file(ens_file, src, out, top_k=3, batch_size=16)
    assert rep["rows"] == 37 and rep["kind"] == "tensors" and rep["temperature"] == 1.3
    rows = read_csv(out)
    assert list(rows[0])[:3] == ["index", "label", "top1"] and "file" not in rows[0]
    assert [int(r["label"]) for r in rows] == y.tolist()
    check_rows(rows, load_ensemble(ens_file).predict(x), 3)


def test_image_folder(ens_file, tmp_path):
    from PIL import Image
    folder = tmp_path / "images"
    (folder / "more").mkdir(parents=True)
    x, _ = digits_tensors("val")
    names = ["a.png", "b.png", "more/c.png"]
    for name, img in zip(names, x[:3]):
        Image.fromarray((img[0] * 255).round().to(torch.uint8).numpy(), mode="L").save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "p.csv"
    rep = predict_file(ens_file, folder, out, top_k=2)
    rows = read_csv(out)
    assert rep["kind"] == "folder" and [r["file"] for r in rows] == names and "label" not in rows[0]
    ens = load_ensemble(ens_file)
    transform, mode = image_transform(ens.members[0])
    inputs = torch.stack([transform(Image.open(folder / n).convert(mode)) for n in names])
    check_rows(rows, ens.predict(inputs), 2)


def test_data_spec_and_flag(ens_file, tmp_path):
    out = tmp_path / "p.csv"
    rep = predict_file(ens_file, "digits", out, top_k=20, flag_above=0.9, flag_on="mutual_information")
    rows = read_csv(out)
    _, y = digits_tensors("val")
    assert rep["rows"] == len(rows) == 360 and [int(r["label"]) for r in rows] == y.tolist()
    assert "top10" in rows[0] and "top11" not in rows[0]  # top_k capped at the 10 classes
    flagged = [r["flagged"] == "True" for r in rows]
    assert flagged == [float(r["mutual_information"]) > 0.9 for r in rows]
    assert rep["flagged"] == sum(flagged) and 0 < sum(flagged) < 360


def test_parquet(ens_file, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "p.parquet"
    predict_file(ens_file, "digits", out, top_k=1)
    table = pq.read_table(out)
    assert table.num_rows == 360 and "mutual_information" in table.column_names


def test_parquet_without_pyarrow_names_the_install(ens_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(BadOptionError, match=r"needs pyarrow: `pip install pyarrow`"):
        predict_file(ens_file, "digits", tmp_path / "p.parquet")
    assert not (tmp_path / "p.parquet").exists()


@pytest.mark.parametrize("args, match", [
    (("digits", "p.txt"), r"unknown output format '.txt'.*\*.csv or \*.parquet"),
    (("empty", "p.csv"), r"input folder '.*empty' has no images"),
    (("x.npy", "p.csv"), r"is a file but not a tensor file"),
    (("gone.safetensors", "p.csv"), r"tensor file '.*gone.safetensors' not found"),
    (("wrong.safetensors", "p.csv"), r"cannot take inputs of shape \(4, 3, 5\)"),
    (("two.safetensors", "p.csv"), r"holds \['a', 'b'\]: name the inputs one of x, "),
])
def test_bad_inputs_are_named(ens_file, tmp_path, args, match):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "x.npy").write_bytes(b"\x93NUMPY")
    save_file({"x": torch.rand(4, 3, 5)}, str(tmp_path / "wrong.safetensors"))
    save_file({"a": torch.rand(4, 64), "b": torch.rand(4, 64)}, str(tmp_path / "two.safetensors"))
    inp, out = args
    with pytest.raises((BadOptionError, DataSpecError), match=match):
        predict_file(ens_file, inp if inp == "digits" else tmp_path / inp, tmp_path / out)
    assert not (tmp_path / out).exists()


def with_model(ens_file, tmp_path, model):
    md = read_ensemble_metadata(ens_file)
    md["model"] = model
    f = tmp_path / "other.safetensors"
    save_file(load_file(str(ens_file)), str(f), metadata={"mcensemble": json.dumps(md), "format": "pt"})
    return f


def test_cli_predict_and_its_errors(mce_cli, ens_file, tmp_path):
    x, _ = digits_tensors("val")
    save_file({"x": x[:10].contiguous()}, str(tmp_path / "in.safetensors"))
    res = mce_cli("predict", ens_file, tmp_path / "in.safetensors", "--out", tmp_path / "p.csv", "--top-k", "2",
                  "--batch-size", "4", "--flag-above", "0.5", "--flag-on", "entropy")
    assert res.exit_code == 0, res.output
    assert "10 predictions" in res.output and "flagged (entropy > 0.5)" in res.output
    assert len(read_csv(tmp_path / "p.csv")) == 10
    (tmp_path / "empty").mkdir()
    res = mce_cli("predict", ens_file, tmp_path / "empty", "--out", tmp_path / "q.csv")
    assert res.exit_code == 2 and "has no images" in res.output and "Traceback" not in res.output
    res = mce_cli("predict", ens_file, "digits", "--out", tmp_path / "q.xlsx")
    assert res.exit_code == 2 and "unknown output format '.xlsx'" in res.output
    # the ensemble file: no model spec, a spec naming no model, a spec that does not fit the tensors
    res = mce_cli("predict", with_model(ens_file, tmp_path, None), "digits", "--out", tmp_path / "q.csv")
    assert res.exit_code == 1 and "does not say how to build the model" in res.output and "--model" in res.output
    res = mce_cli("predict", with_model(ens_file, tmp_path, {"arch": "no_such_net_xyz"}), "digits",
                  "--out", tmp_path / "q.csv")
    assert res.exit_code != 0 and "no_such_net_xyz" in res.output and "Traceback" not in res.output
    res = mce_cli("predict", with_model(ens_file, tmp_path, {"arch": "mce_digits_mlp", "kwargs": {"width": 8}}),
                  "digits", "--out", tmp_path / "q.csv")
    assert res.exit_code == 1 and "does not fit its tensors" in res.output
    assert not (tmp_path / "q.csv").exists()
