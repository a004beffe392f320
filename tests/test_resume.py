"""Curve fits saved and resumed: interrupted (callback / SIGINT / SIGTERM), resumed, and
compared with an uninterrupted run: the bends and the ensemble members are bit-identical."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from mcensemble.data import create_loader
from mcensemble.errors import BadOptionError, CheckpointError
from mcensemble.paths.curve_base import CurveConfig
from mcensemble.paths.fit_run import read_fit_checkpoint
from mcensemble.errors import FitInterrupted
from mcensemble.paths.fit import fit_curve
from mcensemble.zoo import DigitsMLP

CFG = CurveConfig(epochs=3, bends=2, seed=3, max_grad_norm=5.0)


def make():
    return DigitsMLP(width=32, drop_rate=0.2)  # dropout: the torch RNG state matters too


def loader(batch_size=64):
    return create_loader("digits,train=300", batch_size=batch_size, shuffle=True, seed=3)  # 5 steps / epoch


@pytest.fixture(scope="module")
def ends():
    torch.manual_seed(1)
    a = make().state_dict()
    torch.manual_seed(2)
    return a, make().state_dict()


@pytest.fixture(scope="module")
def reference(ends):
    return fit_curve(make(), *ends, loader(), config=CFG, progress=False)


def interrupt_at(step):
    def cb(s, t, loss):
        if s == step:
            raise KeyboardInterrupt
    return cb


def same_bends(p, q) -> bool:
    return all(torch.equal(x[k], y[k]) for x, y in zip(p.bends, q.bends) for k in x)


def test_interrupted_twice_and_resumed_equals_uninterrupted(ends, reference, tmp_path):
    ck = tmp_path / "fit.safetensors"
    steps = []
    with pytest.raises(FitInterrupted) as e:  # mid-epoch, after a periodic save
        fit_curve(make(), *ends, loader(), config=CFG, progress=False, callback=interrupt_at(6),
                  checkpoint=ck, checkpoint_every=4)
    assert e.value.exit_code == 130 and e.value.step == 7 and "`resume`" in str(e.value)
    meta = read_fit_checkpoint(ck)[1]
    assert (meta["step"], meta["epoch"], meta["batch"], meta["finished"]) == (7, 1, 2, False)
    with pytest.raises(FitInterrupted):  # at an epoch's end
        fit_curve(make(), *ends, loader(), config=CFG, progress=False, checkpoint=ck, resume=True,
                  callback=lambda s, t, loss: (steps.append(s), interrupt_at(9)(s, t, loss)))
    assert steps == [7, 8, 9] and read_fit_checkpoint(ck)[1]["step"] == 10
    path = fit_curve(make(), *ends, loader(), config=CFG, progress=False, checkpoint=ck, resume=True)
    assert same_bends(path, reference)
    assert read_fit_checkpoint(ck)[1]["finished"]
    again = fit_curve(make(), *ends, loader(), config=CFG, progress=False, checkpoint=ck, resume=True)
    assert same_bends(again, reference)  # a finished fit is read back, not refitted
    assert not list(tmp_path.glob("*.tmp"))


def test_resume_refuses_another_fit(ends, tmp_path):
    a, b = ends
    ck = tmp_path / "fit.safetensors"
    with pytest.raises(FitInterrupted):
        fit_curve(make(), a, b, loader(), config=CFG, progress=False, callback=interrupt_at(2), checkpoint=ck)
    with pytest.raises(BadOptionError, match="`resume`") as e:  # an existing fit is not overwritten
        fit_curve(make(), a, b, loader(), config=CFG, progress=False, checkpoint=ck)
    assert e.value.option == "resume"
    cases = [
        (dict(config=CurveConfig(**{**CFG.__dict__, "lr": 0.1})), r"`lr` 0\.04.*`lr` 0\.1"),
        (dict(config=CurveConfig(**{**CFG.__dict__, "kind": "polychain"})), "`kind` 'bezier'"),
        (dict(b={k: v + 1 for k, v in b.items()}), r"other endpoints: B \(t = 1\)"),
        (dict(loader=loader(batch_size=32)), "batches per epoch"),
    ]
    for change, pattern in cases:
        kw = {"b": b, "loader": loader(), "config": CFG, **change}
        with pytest.raises(CheckpointError, match=pattern):
            fit_curve(make(), a, kw["b"], kw["loader"], config=kw["config"], progress=False, checkpoint=ck,
                      resume=True)
    with pytest.raises(BadOptionError, match="`checkpoint`"):
        fit_curve(make(), a, b, loader(), config=CFG, resume=True)
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk"):
        fit_curve(make(), a, b, loader(), config=CFG, checkpoint=tmp_path / "junk.safetensors", resume=True)


SIGNAL_MODULE = textwrap.dedent('''
    import os, signal
    import torch.nn as nn

    class Net(nn.Module):
        """Sends itself a signal at the N-th training forward (env MCE_TEST_SIGNAL_AT)."""
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Dropout(0.1),
                                      nn.Linear(16, 10))
            self.calls = 0

        def forward(self, x):
            at = int(os.environ.get("MCE_TEST_SIGNAL_AT", "0"))
            if self.training and at:
                self.calls += 1
                if self.calls == at:
                    os.kill(os.getpid(), getattr(signal, os.environ.get("MCE_TEST_SIGNAL", "SIGINT")))
            return self.body(x)

    def net():
        return Net()
''')


def _members(file):
    return load_file(str(file))


def test_cli_signals_save_and_resume_gives_the_same_ensemble(tmp_path, monkeypatch, mce_cli):
    (tmp_path / "sigmod.py").write_text(SIGNAL_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import importlib
    mod = importlib.import_module("sigmod")
    for seed in (0, 1):
        torch.manual_seed(seed)
        save_file({k: v.contiguous() for k, v in mod.net().state_dict().items()}, str(tmp_path / f"e{seed}.safetensors"))
    args = ["build", "e0.safetensors", "e1.safetensors", "--model", "sigmod:net", "--data", "digits,train=300",
            "--batch-size", "64", "--epochs", "3", "--members", "2", "--candidates", "3"]
    ref = mce_cli(*args, "--out", "ref.safetensors")
    assert ref.exit_code == 0, ref.output

    ck = ["--checkpoint-dir", "ck", "--checkpoint-every", "2"]
    env = {**os.environ, "MCE_TEST_SIGNAL_AT": "5", "MCE_TEST_SIGNAL": "SIGTERM", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "mcensemble", *args, *ck, "--out", "ens.safetensors"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 143, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "SIGTERM" in proc.stderr and "--resume" in proc.stderr
    assert read_fit_checkpoint(tmp_path / "ck" / "curve-0.safetensors")[1]["step"] == 5
    assert not (tmp_path / "ens.safetensors").exists() and not list(tmp_path.glob("**/*.tmp"))

    monkeypatch.setenv("MCE_TEST_SIGNAL_AT", "3")  # SIGINT 3 steps after resuming
    monkeypatch.setenv("MCE_TEST_SIGNAL", "SIGINT")
    res = mce_cli(*args, *ck, "--resume", "--out", "ens.safetensors")
    assert res.exit_code == 130, res.output
    assert "SIGINT" in res.output and "step 8 of 15" in res.output
    monkeypatch.delenv("MCE_TEST_SIGNAL_AT")
    res = mce_cli(*args, *ck, "--resume", "--out", "ens.safetensors")
    assert res.exit_code == 0, res.output
    want, got = _members(tmp_path / "ref.safetensors"), _members(tmp_path / "ens.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)

    res = mce_cli(*args, "--epochs", "4", *ck, "--resume")
    assert res.exit_code == 1 and "--epochs 3" in res.output and "--epochs 4" in res.output
    res = mce_cli(*args, "--resume")
    assert res.exit_code == 2 and "--checkpoint-dir" in res.output


def _fp16_fit(ends, **kw):
    return fit_curve(make(), *ends, loader(), config=CurveConfig(epochs=2, bends=1, seed=3), progress=False,
                     precision="fp16", **kw)


def test_fp16_resume_restores_the_grad_scaler(ends, tmp_path, monkeypatch):
    # a scaler that doubles its scale after every finite step and halves it on an overflow: its
    # state changes all along, so a resume that started a fresh scaler would skip other steps
    # and end elsewhere (checked: it does, without the restore)
    from mcensemble.precision import Precision
    monkeypatch.setattr(Precision, "grad_scaler",
                        lambda self: torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, growth_interval=1))
    ref = _fp16_fit(ends)
    assert ref.metadata["fit"]["skipped_steps"] > 0
    ck = tmp_path / "fit.safetensors"
    with pytest.raises(FitInterrupted):
        _fp16_fit(ends, callback=interrupt_at(5), checkpoint=ck)
    meta = read_fit_checkpoint(ck)[1]
    assert meta["precision"] == "fp16" and set(meta["grad_scaler"]) >= {"scale", "_growth_tracker"}
    got = _fp16_fit(ends, checkpoint=ck, resume=True)
    assert same_bends(got, ref)
    for key in ("skipped_steps", "loss_scale"):
        assert got.metadata["fit"][key] == ref.metadata["fit"][key]


def test_resume_refuses_another_precision(ends, tmp_path):
    ck = tmp_path / "fit.safetensors"
    cfg = CurveConfig(epochs=1, bends=1, seed=3)
    with pytest.raises(FitInterrupted):
        fit_curve(make(), *ends, loader(), config=cfg, progress=False, precision="bf16",
                  callback=interrupt_at(1), checkpoint=ck)
    with pytest.raises(CheckpointError, match=r"`precision` bf16, this run has `precision` fp32"):
        fit_curve(make(), *ends, loader(), config=cfg, progress=False, checkpoint=ck, resume=True)
