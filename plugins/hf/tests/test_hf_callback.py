"""MCEnsembleTrainerCallback through a real `transformers.Trainer` (CPU, offline, a tiny digits
CNN wrapped in a module that returns {"loss", "logits"}, five steps per epoch)."""
from __future__ import annotations

import shutil

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import mcensemble  # noqa: E402
from mcensemble.data import digits_tensors  # noqa: E402
from mcensemble.ensemble import read_ensemble_metadata  # noqa: E402
from mcensemble.errors import BadOptionError  # noqa: E402
from mcensemble.snapshots import fge_lr  # noqa: E402
from mcensemble.models import ModelSpec, create_model  # noqa: E402
from mcensemble_hf import SNAPSHOTS_FILE, MCEnsembleTrainerCallback  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

torch.set_num_threads(1)
torch.set_flush_denormal(True)

SPEC = ModelSpec(arch="mce_digits_cnn", kwargs={"num_classes": 10, "in_chans": 1, "widths": [4, 8]})
N_TRAIN = 320
STEPS = 5          # N_TRAIN / 64 optimizer steps per epoch


class DigitsDict(torch.utils.data.Dataset):
    def __init__(self, n: int = N_TRAIN):
        x, y = digits_tensors("train")
        self.x, self.y = x[:n], y[:n]

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


class Classifier(nn.Module):
    """What a Trainer wants: forward(pixel_values, labels) -> {"loss", "logits"}; the network
    that becomes an ensemble member is `net`."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = create_model(SPEC)

    def forward(self, pixel_values, labels=None):
        logits = self.net(pixel_values)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


class Spy(TrainerCallback):
    """Records, before every optimizer step, the lr and the dropout hooks on the head."""

    def __init__(self, stop_after_epoch: int | None = None):
        self.lrs, self.hooks, self.stop = [], [], stop_after_epoch

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kw):
        self.lrs.append(optimizer.param_groups[0]["lr"])
        self.hooks.append(len(model.net.head._forward_pre_hooks))

    def on_epoch_end(self, args, state, control, **kw):
        if self.stop is not None and round(state.epoch) >= self.stop:
            control.should_training_stop = True


def make_trainer(out_dir, cb, *, epochs=2, save="epoch", spy=None, model=None, **kw):
    args = TrainingArguments(output_dir=str(out_dir), num_train_epochs=epochs,
                             per_device_train_batch_size=64, learning_rate=0.05, report_to=[],
                             save_strategy=save, use_cpu=True, logging_strategy="no",
                             disable_tqdm=True, dataloader_num_workers=0, seed=0, **kw)
    callbacks = [cb] + ([spy] if spy is not None else [])
    return Trainer(model=model or Classifier(), args=args, train_dataset=DigitsDict(),
                   callbacks=callbacks)


@pytest.fixture(autouse=True)
def hf_autouse_offline(hf_offline):
    yield


def val_batch():
    x, _ = digits_tensors("val")
    return x[:32]


def test_epoch_snapshots_with_channel_dropout(tmp_path):
    cb = MCEnsembleTrainerCallback(tmp_path / "ens.safetensors", snapshots="epoch",
                                   channel_dropout=0.2, module="net", model_spec=SPEC)
    spy = Spy()
    trainer = make_trainer(tmp_path / "run", cb, save="no", spy=spy)
    trainer.train()
    net = trainer.model.net
    assert spy.hooks == [1] * (2 * STEPS)                         # dropout was on every step
    assert all(not m._forward_pre_hooks for m in trainer.model.modules())   # and is gone
    clean = create_model(SPEC)
    clean.load_state_dict(net.state_dict())
    x = val_batch()
    with torch.no_grad():                                       # eval outputs untouched
        assert torch.equal(net.eval()(x), clean.eval()(x))
    assert cb.ensemble_path == tmp_path / "ens.safetensors"
    doc = read_ensemble_metadata(cb.ensemble_path)
    assert [m["epoch"] for m in doc["members"]] == [0, 1]
    assert [m["global_step"] for m in doc["members"]] == [STEPS, 2 * STEPS]
    assert all(m["kind"] == "snapshot" and m["bn"] == "re-estimated" for m in doc["members"])
    assert doc["transformers"]["channel_dropout"] == 0.2
    ens = mcensemble.load_ensemble(cb.ensemble_path, model=create_model(SPEC))
    assert len(ens) == 2
    out = ens(x)
    assert out.shape == (32, 10) and torch.allclose(out.exp().sum(1), torch.ones(32), atol=1e-5)
    assert torch.equal(ens.member_state_dict(1)["head.weight"], net.head.weight.detach())


def test_fge_sets_the_lr_over_the_trainers_scheduler(tmp_path):
    cb = MCEnsembleTrainerCallback(snapshots="fge", cycle_steps=4, lr_max=0.05, lr_min=0.005,
                                   module="net", bn_loader=None)
    spy = Spy()
    trainer = make_trainer(tmp_path, cb, save="no", spy=spy)   # default linear lr schedule
    trainer.train()
    assert spy.lrs == pytest.approx([fge_lr(i, 4, 0.05, 0.005) for i in range(2 * STEPS)])
    assert [i["step"] for i in cb.collector.info] == [1, 5, 9]
    assert [i["epoch"] for i in cb.collector.info] == [0, 1, 1]
    assert cb.ensemble_path == tmp_path / "mcensemble.safetensors"   # default: output_dir
    assert read_ensemble_metadata(cb.ensemble_path)["model"] is None
    assert len(mcensemble.load_ensemble(cb.ensemble_path, model=SPEC)) == 3


def test_cycle_epochs_and_start_epoch_count_optimizer_steps(tmp_path):
    cb = MCEnsembleTrainerCallback(snapshots="fge", cycle_epochs=1, lr_max=0.05, lr_min=0.01,
                                   start_epoch=1, module="net", bn_loader=None)
    spy = Spy()
    make_trainer(tmp_path, cb, save="no", spy=spy, lr_scheduler_type="constant").train()
    col = cb.collector
    assert (col.cycle_steps, col.start) == (STEPS, STEPS)
    assert spy.lrs[:STEPS] == pytest.approx([0.05] * STEPS)        # the Trainer's lr first
    assert spy.lrs[STEPS:] == pytest.approx([fge_lr(i, STEPS, 0.05, 0.01) for i in range(STEPS)])
    assert [i["step"] for i in col.info] == [STEPS + 1]


@pytest.mark.parametrize("mode", ["epoch", "fge"])
def test_resume_from_a_checkpoint_goes_on_collecting(tmp_path, mode):
    kw = dict(cycle_steps=4, lr_max=0.05, lr_min=0.005) if mode == "fge" else {}
    n_part, n_full = (2, 3) if mode == "epoch" else (3, 4)     # fge: steps 1, 5, 9 | 13

    def run(out_dir, stop=None, resume=None, **cb_kw):
        cb = MCEnsembleTrainerCallback(out_dir / "ens.safetensors", snapshots=mode, module="net",
                                       model_spec=SPEC, **kw, **cb_kw)
        make_trainer(out_dir, cb, epochs=3, spy=Spy(stop)).train(resume_from_checkpoint=resume)
        return cb

    full = run(tmp_path / "full")
    interrupted = run(tmp_path / "part", stop=2)
    assert len(interrupted.collector) == n_part and len(full.collector) == n_full
    ck = tmp_path / "part" / f"checkpoint-{2 * STEPS}"
    assert (ck / SNAPSHOTS_FILE).is_file()
    resumed = run(tmp_path / "part", resume=str(ck))
    assert resumed.resumed_from == ck / SNAPSHOTS_FILE
    assert len(resumed.collector) == n_full
    assert resumed.collector.info == full.collector.info
    for i, (a, b) in enumerate(zip(full.collector.snapshots, resumed.collector.snapshots)):
        for k in a:
            if i < n_part:
                assert torch.equal(a[k], b[k]), (i, k)      # restored from the checkpoint
            else:
                assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), (i, k)
    assert len(mcensemble.load_ensemble(tmp_path / "part" / "ens.safetensors")) == n_full


def test_resume_from_a_moved_checkpoint_needs_resume_from(tmp_path):
    def cb(**kw):
        return MCEnsembleTrainerCallback(snapshots="epoch", module="net", bn_loader=None, **kw)

    make_trainer(tmp_path / "a", cb(), epochs=1).train()
    moved = tmp_path / "elsewhere" / "ck"
    shutil.copytree(tmp_path / "a" / f"checkpoint-{STEPS}", moved)
    # the callback is not told the folder: outside output_dir it says so and what to pass
    with pytest.raises(BadOptionError, match=r"checkpoint-\d+'?: pass resume_from=") as e:
        make_trainer(tmp_path / "b", cb(), epochs=2).train(resume_from_checkpoint=str(moved))
    assert e.value.option == "resume_from"
    c = cb(resume_from=moved)
    make_trainer(tmp_path / "b2", c, epochs=2).train(resume_from_checkpoint=str(moved))
    assert c.resumed_from == moved / SNAPSHOTS_FILE
    assert [i["epoch"] for i in c.collector.info] == [0, 1]
    (moved / SNAPSHOTS_FILE).unlink()                      # a checkpoint without snapshots
    with pytest.raises(BadOptionError, match="no mcensemble_snapshots") as e:
        make_trainer(tmp_path / "c", cb(resume_from=moved), epochs=2).train(resume_from_checkpoint=str(moved))
    assert e.value.option == "resume_from"
    c = cb(resume_from=False)                              # start collecting afresh
    trainer = make_trainer(tmp_path / "c", c, epochs=2)
    trainer.train(resume_from_checkpoint=str(moved))
    assert [i["epoch"] for i in c.collector.info] == [1]
    assert all(not m._forward_pre_hooks for m in trainer.model.modules())


def test_resume_reads_the_output_dir_checkpoint(tmp_path):
    cb = MCEnsembleTrainerCallback(snapshots="epoch", module="net", bn_loader=None)
    make_trainer(tmp_path, cb, epochs=1).train()
    cb2 = MCEnsembleTrainerCallback(snapshots="epoch", module="net", bn_loader=None)
    make_trainer(tmp_path, cb2, epochs=2).train(resume_from_checkpoint=True)   # the latest
    assert cb2.resumed_from == tmp_path / f"checkpoint-{STEPS}" / SNAPSHOTS_FILE
    assert [i["epoch"] for i in cb2.collector.info] == [0, 1]


def test_no_snapshot_no_file(tmp_path, caplog):
    cb = MCEnsembleTrainerCallback(tmp_path / "ens.safetensors", snapshots="epoch", start_epoch=5,
                                   module="net", bn_loader=None)
    make_trainer(tmp_path, cb, epochs=1, save="no").train()
    assert cb.ensemble_path is None and not (tmp_path / "ens.safetensors").exists()
    assert "no snapshot was taken" in caplog.text


@pytest.mark.parametrize("kwargs, option", [
    (dict(snapshots="swa"), "snapshots"),
    (dict(snapshots="fge", lr_max=0.1, lr_min=0.01), "cycle_epochs"),
    (dict(snapshots="fge", cycle_steps=4, cycle_epochs=1, lr_max=0.1, lr_min=0.01), "cycle_epochs"),
    (dict(snapshots="fge", cycle_steps=1, lr_max=0.1, lr_min=0.01), "cycle_steps"),
    (dict(snapshots="fge", cycle_steps=4, lr_min=0.01), "lr_max"),
    (dict(snapshots="fge", cycle_steps=4, lr_max=0.01, lr_min=0.1), "lr_min"),
    (dict(snapshots="epoch", lr_max=0.1), "snapshots"),
    (dict(start_epoch=-1), "start_epoch"),
    (dict(start_epoch=1.5), "start_epoch"),
    (dict(max_snapshots=0), "max_snapshots"),
    (dict(channel_dropout=1.0), "channel_dropout"),
    (dict(channel_dropout="x"), "channel_dropout"),
    (dict(bn_loader="val"), "bn_loader"),
    (dict(bn_loader=3), "bn_loader"),
    (dict(precision="fp8"), "precision"),
    (dict(example_input=[1, 2]), "example_input"),
    (dict(resume_from=True), "resume_from"),
    (dict(module=""), "module"),
])
def test_bad_arguments_name_the_option(kwargs, option):
    with pytest.raises(BadOptionError) as e:
        MCEnsembleTrainerCallback(**kwargs)
    assert e.value.option == option


@pytest.mark.parametrize("old", ["bn_dataloader", "groups"])
def test_one_keyword_per_setting(old):
    with pytest.raises(TypeError, match=old):      # bn_loader= and graph= only
        MCEnsembleTrainerCallback(**{old: None})


def test_plugin_imports_only_public_modules():
    import mcensemble_hf.callback as mod
    source = open(mod.__file__).read()
    assert "mcensemble._" not in source and "from mcensemble import _" not in source


def test_bn_reestimation_runs_at_the_callback_precision(tmp_path):
    model = Classifier()
    seen = []
    model.net.head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    cb = MCEnsembleTrainerCallback(tmp_path / "ens.safetensors", snapshots="epoch", module="net",
                                   precision="bf16", bn_max_batches=2)
    make_trainer(tmp_path, cb, epochs=1, save="no", model=model).train()
    assert seen[:STEPS] == [torch.float32] * STEPS         # training: the Trainer's own precision
    assert seen[STEPS:] == [torch.bfloat16] * 2            # BN re-estimation of the one snapshot: bf16
    assert read_ensemble_metadata(cb.ensemble_path)["members"][0]["bn"] == "re-estimated"


def test_unknown_module_attribute(tmp_path):
    cb = MCEnsembleTrainerCallback(snapshots="epoch", module="backbone")
    with pytest.raises(BadOptionError, match="backbone"):
        make_trainer(tmp_path, cb, epochs=1, save="no").train()
