"""Every recipe in recipes/ is run end to end (the template with real, tiny timm runs)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import yaml

import mcensemble

from mcensemble.recipes import DEFAULT_RECIPE

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@pytest.mark.parametrize("name, method", [("default.yaml", "bezier"), ("digits-dropout.yaml", "dropout"),
                                          ("fge-one-run.yaml", "fge")])
def test_offline_recipe_runs(name, method, mce_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = Path(DEFAULT_RECIPE) if name == "default.yaml" else RECIPES / name
    res = mce_cli("build", "--recipe", recipe, "--report", tmp_path / "r.json", "--out", tmp_path / "e.safetensors")
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["method"] == method
    ens = mcensemble.load_ensemble(tmp_path / "e.safetensors")
    # --members 4 is an upper bound for members chosen on --val-data (FGE: the checkpoint and its
    # snapshots are the candidates, the checkpoint the reference)
    assert len(ens) == len(rep["members"]) and 1 <= len(ens) <= 4
    assert rep["choice"]["rule"] in ("reference", "confirmed")
    x = torch.rand(5, 1, 8, 8)
    assert torch.allclose(ens(x).exp().sum(1), torch.ones(5), atol=1e-5)
    if method == "dropout":
        cert = rep["certificates"][0]
        assert cert["max_loss"] >= max(cert["loss_a"], cert["loss_b"])


def _timm_run(folder: Path, seed: int) -> Path:
    from timm.utils import CheckpointSaver
    import timm
    torch.manual_seed(seed)
    folder.mkdir(parents=True)
    model = timm.create_model("test_resnet", num_classes=2, in_chans=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    args = argparse.Namespace(model="test_resnet", num_classes=2, in_chans=3, eval_metric="top1")
    saver = CheckpointSaver(model, opt, args=args, checkpoint_dir=str(folder), max_history=2)
    for epoch, metric in enumerate((50.0, 60.0)):
        saver.save_checkpoint(epoch, metric=metric)
    return folder


def _image_folder(root: Path) -> Path:
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(4):
            px = (torch.rand(24, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(px).save(root / c / f"{i}.png")
    return root


def test_timm_imagefolder_template_runs_on_real_timm_runs(mce_cli, tmp_path):
    doc = yaml.safe_load((RECIPES / "timm-imagefolder.yaml").read_text())
    runs = [_timm_run(tmp_path / f"seed{s}", s) for s in (0, 1)]
    images = _image_folder(tmp_path / "images")
    doc.update({"from-run": [str(r) for r in runs], "data": str(images), "val-data": str(images), "device": "cpu",
                "epochs": 1, "members": 2, "candidates": 3, "batch-size": 8,
                "out": str(tmp_path / "ens.safetensors"), "report": str(tmp_path / "r.json"),
                "plot": str(tmp_path / "p.png")})
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    res = mce_cli("build", "--recipe", recipe)
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "r.json").read_text())
    chosen = [Path(c["file"]) for c in rep["checkpoints"]]
    assert [p.parent for p in chosen] == runs  # the best of each run, in the order given
    assert all(mcensemble.load_checkpoint(p).metadata["epoch"] == 1 for p in chosen)  # metric 60 > 50
    assert len(mcensemble.load_ensemble(tmp_path / "ens.safetensors")) == 2
