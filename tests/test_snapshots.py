"""SnapshotCollector: the FGE cyclical schedule, snapshots, the ensemble file, resume.

The training-loop example in SnapshotCollector's docstring and in docs/guide.md ("In a training
loop") is one text; it is checked to be identical in both places and run as it stands.
"""
from __future__ import annotations

import inspect
import re
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import mcensemble
from mcensemble.ensemble import read_ensemble_metadata
from mcensemble.errors import BadOptionError
from mcensemble.snapshots import SnapshotCollector, fge_lr

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guide.md"


def docstring_example() -> str:
    lines = inspect.cleandoc(SnapshotCollector.__doc__).splitlines()
    start = next(i for i, line in enumerate(lines) if line.rstrip().endswith("::")) + 1
    block = []
    for line in lines[start:]:
        if line.strip() and not line.startswith(" "):
            break
        block.append(line)
    return textwrap.dedent("\n".join(block)).strip("\n")


def readme_example() -> str:
    text = GUIDE.read_text()
    section = text.split("## In a training loop", 1)[1]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m, "docs/guide.md's 'In a training loop' section has no python block"
    return m.group(1).strip("\n")


def test_readme_and_docstring_show_the_same_example():
    assert docstring_example() == readme_example()


def test_the_example_runs_and_writes_a_loadable_ensemble(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": "example"}
    exec(compile(docstring_example(), "SnapshotCollector-example", "exec"), scope)
    col, steps, x = scope["col"], scope["steps"], scope["x"]
    assert len(col) == 4 and col.step_count == 12 * steps
    # one snapshot per cycle, at the step with the lowest lr (the cycle's middle)
    assert [i["step"] for i in col.info] == [4 * steps + c * 2 * steps + steps - 1 for c in range(4)]
    assert all(i["lr"] == pytest.approx(0.001) for i in col.info)
    doc = read_ensemble_metadata(tmp_path / "fge.safetensors")
    assert [m["kind"] for m in doc["members"]] == ["snapshot"] * 4
    assert all(m["t"] is None and m["bn"] == "re-estimated" for m in doc["members"])
    assert doc["model"]["arch"] == "mce_digits_cnn"
    assert doc["snapshots"]["cycle_steps"] == 2 * steps
    ens = mcensemble.load_ensemble(tmp_path / "fge.safetensors")
    assert isinstance(ens, mcensemble.EnsembleModel) and len(ens) == 4
    log_probs = scope["log_probs"]
    assert log_probs.shape == (x.shape[0], 10)
    assert torch.allclose(log_probs.exp().sum(1), torch.ones(x.shape[0]), atol=1e-5)
    # BN statistics were re-estimated for every member (not the running averages of training)
    bn_key = "features.1.running_mean"
    assert not torch.equal(ens.member_state_dict(0)[bn_key], col.snapshots[0][bn_key])
    from mcensemble.data import create_loader
    from mcensemble.evaluate import evaluate
    assert evaluate(ens, create_loader("digits", split="val")).acc > 0.8


# ----------------------------------------------------------------------------- the schedule
def test_fge_lr_is_linear_down_then_up():
    c, hi, lo = 8, 0.1, 0.01
    lrs = [fge_lr(i, c, hi, lo) for i in range(2 * c)]
    assert lrs[c // 2 - 1] == pytest.approx(lo) and lrs[c - 1] == pytest.approx(hi)
    assert lrs[:c] == pytest.approx(lrs[c:])                       # periodic
    down, up = lrs[:c // 2], lrs[c // 2 - 1:c]
    assert all(a > b for a, b in zip(down, down[1:])) and all(a < b for a, b in zip(up, up[1:]))
    assert (down[0] - down[1]) == pytest.approx(down[1] - down[2])  # linear
    assert min(fge_lr(i, 5, hi, lo) for i in range(5)) > lo         # odd c: no exact low point


def model_and_opt(seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    return net, torch.optim.SGD(net.parameters(), lr=0.123, momentum=0.9)


def train_steps(net, opt, col, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x, y = torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        col.step()


def test_step_sets_lr_only_from_start_and_snapshots_at_low_points():
    net, opt = model_and_opt()
    col = SnapshotCollector(net, opt, cycle_steps=4, lr_max=0.1, lr_min=0.02, start=3)
    seen = []
    for n in range(11):
        seen.append(opt.param_groups[0]["lr"])
        taken = col.step()
        assert (taken is not None) == (n in (4, 8))
    assert seen[:3] == [0.123] * 3                      # before start: the optimizer's own lr
    assert seen[3:] == pytest.approx([fge_lr(i, 4, 0.1, 0.02) for i in range(8)])
    assert [i["step"] for i in col.info] == [4, 8] and [i["cycle"] for i in col.info] == [0, 1]


def test_snapshots_are_copies_on_cpu_and_max_snapshots_keeps_the_latest():
    net, opt = model_and_opt()
    col = SnapshotCollector(net, opt, cycle_steps=2, lr_max=0.1, lr_min=0.01, max_snapshots=2)
    train_steps(net, opt, col, 7)                       # low points after steps 0, 2, 4, 6
    assert [i["step"] for i in col.info] == [4, 6]
    last = col.snapshots[-1]
    assert all(t.device.type == "cpu" for t in last.values())
    assert torch.equal(last["0.weight"], net[0].weight)
    assert last["0.weight"].data_ptr() != net[0].weight.data_ptr()


def test_manual_snapshots_without_a_schedule(tmp_path):
    net, opt = model_and_opt()
    col = SnapshotCollector(net)
    for epoch in range(3):
        train_steps(net, opt, col, 2, seed=epoch)
        col.snapshot(epoch=epoch)
    assert opt.param_groups[0]["lr"] == 0.123          # never touched
    dest = col.save(tmp_path / "e.safetensors")         # no BN loader: statistics as trained
    doc = read_ensemble_metadata(dest)
    assert [m["epoch"] for m in doc["members"]] == [0, 1, 2]
    assert all(m["bn"] == "as trained" and m["kind"] == "snapshot" for m in doc["members"])
    ens = mcensemble.load_ensemble(dest, model=model_and_opt()[0])
    for i, snap in enumerate(col.snapshots):
        sd = ens.member_state_dict(i)
        assert all(torch.equal(sd[k], v) for k, v in snap.items())


def test_bn_reestimation_leaves_the_training_model_as_it_was(tmp_path):
    net, opt = model_and_opt()
    col = SnapshotCollector(net, opt, cycle_steps=2, lr_max=0.1, lr_min=0.01)
    train_steps(net, opt, col, 4)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    data = [(torch.randn(32, 4), torch.zeros(32, dtype=torch.long)) for _ in range(2)]
    states = col.member_states(bn_loader=data)
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not torch.equal(states[0]["1.running_mean"], col.snapshots[0]["1.running_mean"])
    assert torch.equal(states[0]["0.weight"], col.snapshots[0]["0.weight"])


def test_resume_continues_exactly():
    net, opt = model_and_opt()
    col = SnapshotCollector(net, opt, cycle_steps=4, lr_max=0.1, lr_min=0.01, start=1)
    train_steps(net, opt, col, 6)
    saved = col.state_dict()
    net2, opt2 = model_and_opt(1)
    col2 = SnapshotCollector(net2, opt2, cycle_steps=4, lr_max=0.1, lr_min=0.01, start=1)
    col2.load_state_dict(saved)
    assert col2.step_count == 6 and len(col2) == len(col) == 1
    assert opt2.param_groups[0]["lr"] == pytest.approx(col.lr_at(6))
    assert torch.equal(col2.snapshots[0]["0.weight"], col.snapshots[0]["0.weight"])
    other = SnapshotCollector(net2, opt2, cycle_steps=6, lr_max=0.1, lr_min=0.01, start=1)
    with pytest.raises(BadOptionError, match="cycle_steps=4"):
        other.load_state_dict(saved)


@pytest.mark.parametrize("kwargs, match", [
    (dict(cycle_steps=4), "lr_max= and lr_min="),
    (dict(lr_max=0.1, lr_min=0.01), "needs cycle_steps="),
    (dict(cycle_steps=1, lr_max=0.1, lr_min=0.01), "cycle_steps must be an integer >= 2"),
    (dict(cycle_steps=4, lr_max=0.01, lr_min=0.1), "lr_min=0.1 is above lr_max=0.01"),
    (dict(cycle_steps=4, lr_max=float("nan"), lr_min=0.1), "lr_max must be a finite number"),
    (dict(start=-1), "start must be an integer >= 0"),
    (dict(max_snapshots=0), "max_snapshots must be an integer >= 1"),
])
def test_bad_options_name_the_option(kwargs, match):
    net, opt = model_and_opt()
    with pytest.raises(BadOptionError, match=match):
        SnapshotCollector(net, opt, **kwargs)


def test_schedule_without_optimizer_and_save_without_snapshots(tmp_path):
    net, _ = model_and_opt()
    with pytest.raises(BadOptionError, match="needs the optimizer") as info:
        SnapshotCollector(net, cycle_steps=4, lr_max=0.1, lr_min=0.01)
    assert info.value.option == "optimizer"
    with pytest.raises(BadOptionError, match="no snapshots taken yet"):
        SnapshotCollector(net).save(tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_fge_train_from_a_trained_model(tmp_path):
    from mcensemble.data import create_loader
    from mcensemble.evaluate import evaluate
    from mcensemble.snapshots import fge_train
    from mcensemble.models import ModelSpec, create_model
    from mcensemble.train import TrainConfig, train_model
    spec = ModelSpec(arch="mce_digits_mlp", kwargs={"width": 32})
    loader = create_loader("digits", batch_size=64, shuffle=True)
    val = create_loader("digits", split="val")
    net = train_model(create_model(spec), loader, config=TrainConfig(epochs=5, lr=0.1), progress=False)
    start = evaluate(net, val)
    col = fge_train(net, loader, cycles=3, epochs=3, lr_max=0.05)
    assert len(col) == 3 and col.lr_min == pytest.approx(0.0005) and not net.training
    assert [i["epoch"] for i in col.info] == [0, 1, 2]
    ens = mcensemble.load_ensemble(col.save(tmp_path / "f.safetensors", model_spec=spec))
    assert evaluate(ens, val).nll < start.nll          # FGE improves on the model it starts from
    assert col.cycle_steps == len(loader) and col.step_count == 3 * len(loader)
    col = fge_train(net, loader, cycles=2, epochs=1)   # cycles need not end with an epoch
    assert col.cycle_steps == len(loader) // 2 and len(col) == 2
    with pytest.raises(BadOptionError, match="at least 2 steps per cycle") as info:
        fge_train(net, [(torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long))], cycles=1, epochs=1)
    assert info.value.option == "epochs"


# ----------------------------------------------------------------------------- module home, precision
def test_snapshot_names_have_one_home():
    import mcensemble.hooks as hooks
    import mcensemble.snapshots as snapshots
    for name in ("SnapshotCollector", "fge_lr", "fge_train", "network_in", "fge_collector", "save_snapshots"):
        assert name in snapshots.__all__ and not hasattr(hooks, name), name
    assert mcensemble.snapshots.SnapshotCollector is SnapshotCollector


def _record_linear_dtypes(net):
    seen = []
    handles = [m.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
               for m in net.modules() if isinstance(m, nn.Linear)]
    return seen, handles


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_bn_reestimation_before_saving_runs_at_the_precision(tmp_path, precision):
    net, opt = model_and_opt()
    col = SnapshotCollector(net, opt, cycle_steps=2, lr_max=0.1, lr_min=0.01)
    train_steps(net, opt, col, 4)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(64, 4, generator=g), torch.zeros(64, dtype=torch.long)) for _ in range(2)]
    ref = col.member_states(bn_loader=data)
    seen, handles = _record_linear_dtypes(net)
    low = col.member_states(bn_loader=data, precision=precision)
    for h in handles:
        h.remove()
    want = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert seen and set(seen) == {want}                         # the forward passes ran in low precision
    for r, s in zip(ref, low):                                  # statistics kept float32, close to fp32's
        assert s["1.running_mean"].dtype == torch.float32
        assert torch.allclose(s["1.running_mean"], r["1.running_mean"], rtol=0.05, atol=0.02)
        assert torch.allclose(s["1.running_var"], r["1.running_var"], rtol=0.05, atol=0.02)
    assert all(torch.equal(s["0.weight"], r["0.weight"]) for r, s in zip(ref, low))
    f = col.save(tmp_path / "e.safetensors", bn_loader=data, precision=precision)
    assert len(mcensemble.load_ensemble(f, model=model_and_opt()[0])) == len(col)


def test_bad_precision_names_the_option():
    net, opt = model_and_opt()
    col = SnapshotCollector(net)
    col.snapshot()
    with pytest.raises(BadOptionError, match="precision") as info:
        col.member_states(bn_loader=[(torch.randn(4, 4), torch.zeros(4))], precision="fp8")
    assert "precision" in info.value.option


def test_fge_train_bf16_trains_in_bf16_and_stays_close_to_fp32():
    from mcensemble.snapshots import fge_train
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    loader = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)]
    cols = {}
    for precision in ("fp32", "bf16"):
        net, _ = model_and_opt()
        seen, handles = _record_linear_dtypes(net)
        cols[precision] = fge_train(net, loader, cycles=2, epochs=2, lr_max=0.05, precision=precision)
        for h in handles:
            h.remove()
        assert set(seen) == {torch.float32 if precision == "fp32" else torch.bfloat16}
        assert all(v.dtype == torch.float32 for v in net.state_dict().values() if v.is_floating_point())
    a, b = cols["fp32"], cols["bf16"]
    assert len(a) == len(b) == 2 and a.skipped_steps == b.skipped_steps == 0
    for sa, sb in zip(a.snapshots, b.snapshots):
        w_a, w_b = sa["3.weight"], sb["3.weight"]
        assert (w_a - w_b).norm() <= 0.05 * w_a.norm()      # bf16 rounding, not another run


def test_fp16_steps_whose_gradients_overflow_are_skipped_and_counted():
    from mcensemble.precision import resolve_precision
    from mcensemble.snapshots import _train_step
    net, opt = model_and_opt()
    prec = resolve_precision("fp16")
    scaler = prec.grad_scaler()
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k}
    bad = torch.full((8, 4), float("inf"))
    assert _train_step(net, opt, bad, torch.zeros(8, dtype=torch.long), prec, scaler) is False
    assert all(torch.equal(before[k], net.state_dict()[k]) for k in before if "num_batches" not in k)
    good = torch.randn(8, 4)
    assert _train_step(net, opt, good, torch.zeros(8, dtype=torch.long), prec, scaler) is True
