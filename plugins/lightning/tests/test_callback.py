"""MCEnsembleCallback through a real Lightning Trainer (CPU, tiny digits CNN, two epochs)."""
from __future__ import annotations

import pytest

pl = pytest.importorskip("lightning.pytorch")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import mcensemble  # noqa: E402
from mcensemble.data import create_loader  # noqa: E402
from mcensemble.ensemble import read_ensemble_metadata  # noqa: E402
from mcensemble.errors import BadOptionError  # noqa: E402
from mcensemble.models import ModelSpec, create_model  # noqa: E402
from mcensemble_lightning import MCEnsembleCallback  # noqa: E402

torch.set_num_threads(1)
torch.set_flush_denormal(True)

SPEC = ModelSpec(arch="mce_digits_cnn", kwargs={"num_classes": 10, "in_chans": 1, "widths": [4, 8]})
BATCHES = 5        # digits,train=300 in batches of 64


class LitDigits(pl.LightningModule):
    def __init__(self, lr: float = 0.05):
        super().__init__()
        torch.manual_seed(0)
        self.model = create_model(SPEC).train()
        self.lr = lr
        self.hooked = []            # consumer pre-hooks seen at each training step

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        self.hooked.append(len(self.model.head._forward_pre_hooks))
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def loader():
    return create_loader("digits,train=300", batch_size=64, shuffle=True, seed=0)


def trainer(tmp_path, cb, max_epochs=2, **kw):
    return pl.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, callbacks=[cb],
                      enable_progress_bar=False, logger=False, enable_model_summary=False,
                      default_root_dir=tmp_path, **kw)


def test_epoch_snapshots_with_channel_dropout(tmp_path):
    lit = LitDigits()
    cb = MCEnsembleCallback(tmp_path / "ens.safetensors", snapshots="epoch", channel_dropout=0.2,
                            module="model", model_spec=SPEC)
    trainer(tmp_path, cb, enable_checkpointing=False).fit(lit, loader())
    assert len(lit.hooked) == 2 * BATCHES and all(n == 1 for n in lit.hooked)  # dropout was on
    assert all(not m._forward_pre_hooks for m in lit.model.modules())          # and removed
    assert lit.model._forward_pre_hooks == {}
    assert cb.ensemble_path == tmp_path / "ens.safetensors"
    doc = read_ensemble_metadata(cb.ensemble_path)
    assert [m["epoch"] for m in doc["members"]] == [0, 1]
    assert all(m["kind"] == "snapshot" and m["bn"] == "re-estimated" for m in doc["members"])
    assert doc["lightning"]["channel_dropout"] == 0.2
    ens = mcensemble.load_ensemble(cb.ensemble_path)
    x, _ = next(iter(create_loader("digits", split="val", batch_size=32)))
    out = ens(x)
    assert out.shape == (32, 10) and torch.allclose(out.exp().sum(1), torch.ones(32), atol=1e-5)
    # the last member holds the trained weights (BN statistics aside)
    assert torch.equal(ens.member_state_dict(1)["head.weight"], lit.model.head.weight.detach())


def test_fge_cycles_set_the_lr_and_snapshot_at_low_points(tmp_path):
    lit = LitDigits()
    lrs = []

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    cb = MCEnsembleCallback(snapshots="fge", cycle_steps=4, lr_max=0.05, lr_min=0.005,
                            module="model", model_spec=SPEC, bn_loader=None)
    t = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, callbacks=[cb, Spy()],
                   enable_progress_bar=False, logger=False, enable_model_summary=False,
                   enable_checkpointing=False, default_root_dir=tmp_path)
    t.fit(lit, loader())
    from mcensemble.snapshots import fge_lr
    assert lrs == pytest.approx([fge_lr(i, 4, 0.05, 0.005) for i in range(2 * BATCHES)])
    assert [i["step"] for i in cb.collector.info] == [1, 5, 9]
    assert [i["epoch"] for i in cb.collector.info] == [0, 1, 1]
    assert cb.ensemble_path == tmp_path / "mcensemble.safetensors"   # default: root dir
    assert len(mcensemble.load_ensemble(cb.ensemble_path)) == 3


def test_cycle_epochs_count_optimizer_steps(tmp_path):
    cb = MCEnsembleCallback(snapshots="fge", cycle_epochs=2, lr_max=0.05, lr_min=0.005,
                            module="model", bn_loader=None)
    trainer(tmp_path, cb, enable_checkpointing=False).fit(LitDigits(), loader())
    assert cb.collector.cycle_steps == 2 * BATCHES and len(cb.collector) == 1
    assert cb.collector.info[0]["step"] == BATCHES - 1
    assert read_ensemble_metadata(cb.ensemble_path)["model"] is None   # no model_spec given


def test_resume_from_a_lightning_checkpoint_goes_on_collecting(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint
    ckdir = tmp_path / "ck"

    def run(max_epochs, ckpt_path=None):
        cb = MCEnsembleCallback(tmp_path / "ens.safetensors", snapshots="epoch", module="model",
                                model_spec=SPEC, bn_loader=None)
        lit = LitDigits()
        t = pl.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, enable_progress_bar=False,
                       logger=False, enable_model_summary=False, default_root_dir=tmp_path,
                       callbacks=[cb, ModelCheckpoint(dirpath=ckdir, save_last=True)])
        t.fit(lit, loader(), ckpt_path=ckpt_path)
        return cb

    first = run(2)
    assert len(first.collector) == 2
    ck = torch.load(ckdir / "last.ckpt", map_location="cpu", weights_only=False)
    assert any(k.startswith("MCEnsembleCallback") for k in ck["callbacks"])
    second = run(4, ckpt_path=ckdir / "last.ckpt")
    assert [i["epoch"] for i in second.collector.info] == [0, 1, 2, 3]
    for a, b in zip(first.collector.snapshots, second.collector.snapshots):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(mcensemble.load_ensemble(tmp_path / "ens.safetensors")) == 4


def _resume_run(tmp_path, out, max_epochs, snapshots="epoch", ckpt_path=None):
    from lightning.pytorch.callbacks import ModelCheckpoint
    kw = dict(cycle_steps=4, lr_max=0.05, lr_min=0.005) if snapshots == "fge" else {}
    cb = MCEnsembleCallback(out, snapshots=snapshots, module="model", model_spec=SPEC, bn_loader=None, **kw)
    t = pl.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, enable_progress_bar=False,
                   logger=False, enable_model_summary=False, default_root_dir=tmp_path,
                   callbacks=[cb, ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)])
    t.fit(LitDigits(), loader(), ckpt_path=ckpt_path)
    return cb


def test_resume_with_another_out_keeps_the_collected_snapshots(tmp_path, caplog):
    first = _resume_run(tmp_path, tmp_path / "a.safetensors", 1)
    assert len(first.collector) == 1
    with caplog.at_level("WARNING"):
        second = _resume_run(tmp_path, tmp_path / "b.safetensors", 2, ckpt_path=tmp_path / "ck" / "last.ckpt")
    assert [i["epoch"] for i in second.collector.info] == [0, 1]       # not dropped: epoch 0 is still there
    assert all(torch.equal(v, second.collector.snapshots[0][k]) for k, v in first.collector.snapshots[0].items())
    assert "a.safetensors" in caplog.text and "b.safetensors" in caplog.text
    assert len(mcensemble.load_ensemble(tmp_path / "b.safetensors")) == 2


def test_resume_with_another_snapshots_mode_is_refused(tmp_path):
    _resume_run(tmp_path, tmp_path / "a.safetensors", 1)
    with pytest.raises(BadOptionError, match="snapshots='epoch' snapshots.*this callback has snapshots='fge'") as e:
        _resume_run(tmp_path, tmp_path / "a.safetensors", 2, snapshots="fge",
                    ckpt_path=tmp_path / "ck" / "last.ckpt")
    assert e.value.option == "snapshots"


def test_bn_reestimation_runs_at_the_callback_precision(tmp_path):
    lit = LitDigits()
    seen = []
    lit.model.head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    cb = MCEnsembleCallback(tmp_path / "ens.safetensors", snapshots="epoch", module="model", model_spec=SPEC,
                            precision="bf16", bn_max_batches=2)
    trainer(tmp_path, cb, max_epochs=1, enable_checkpointing=False).fit(lit, loader())
    assert seen[:BATCHES] == [torch.float32] * BATCHES      # training: the Trainer's own precision
    assert seen[BATCHES:] == [torch.bfloat16] * 2           # BN re-estimation of the one snapshot: bf16
    doc = read_ensemble_metadata(cb.ensemble_path)
    assert doc["members"][0]["bn"] == "re-estimated"
    assert all(v.dtype == torch.float32 for v in mcensemble.load_ensemble(cb.ensemble_path).member_state_dict(0).values()
               if v.is_floating_point())


def test_one_keyword_per_setting():
    with pytest.raises(TypeError, match="groups"):      # graph= only
        MCEnsembleCallback(groups=None)


def test_plugin_imports_only_public_modules():
    import mcensemble_lightning.callback as mod
    source = open(mod.__file__).read()
    assert "mcensemble._" not in source and "from mcensemble import _" not in source


def test_no_snapshot_no_file(tmp_path, caplog):
    cb = MCEnsembleCallback(tmp_path / "ens.safetensors", snapshots="epoch", start_epoch=5,
                            module="model", bn_loader=None)
    trainer(tmp_path, cb, max_epochs=1, enable_checkpointing=False).fit(LitDigits(), loader())
    assert cb.ensemble_path is None and not (tmp_path / "ens.safetensors").exists()
    assert "no snapshot was taken" in caplog.text


@pytest.mark.parametrize("kwargs, option", [
    (dict(snapshots="cycles"), "snapshots"),
    (dict(snapshots="fge", lr_max=0.1, lr_min=0.01), "cycle_epochs"),
    (dict(snapshots="epoch", cycle_steps=4), "snapshots"),
    (dict(channel_dropout=1.0), "channel_dropout"),
    (dict(start_epoch=-1), "start_epoch"),
    (dict(bn_loader="val"), "bn_loader"),
    (dict(precision="fp8"), "precision"),
    (dict(bn_max_batches=0), "bn_max_batches"),
])
def test_bad_arguments_name_the_option(kwargs, option):
    with pytest.raises(BadOptionError) as info:
        MCEnsembleCallback(**kwargs)
    assert info.value.option == option


def test_unknown_module_attribute(tmp_path):
    cb = MCEnsembleCallback(snapshots="epoch", module="net")
    with pytest.raises(BadOptionError, match="no submodule 'net'"):
        trainer(tmp_path, cb, max_epochs=1, enable_checkpointing=False).fit(LitDigits(), loader())
