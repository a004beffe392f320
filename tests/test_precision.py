"""Mixed precision (mcensemble.precision): curve fits, evaluation, BatchNorm, ensembles and
the ensemble file's dtype, all on CPU (torch's CPU autocast runs bf16 and fp16)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import one_thread
from torch.utils.data import DataLoader, TensorDataset

import mcensemble
from mcensemble.bn import update_bn
from mcensemble.ensemble import EnsembleModel, LazyEnsembleModel, _LazyMembers, save_ensemble
from mcensemble.errors import BadOptionError, NonFiniteError
from mcensemble.evaluate import evaluate
from mcensemble.paths.curve_base import CurveConfig
from mcensemble.paths.fit import CurveFitter, fit_curve
from mcensemble.precision import autocast, cast_floating, parse_dtype, resolve_precision


def make_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(32, 4))


def _data(n: int = 256, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > 0).long() + 2 * (x[:, 1, 4:].mean((1, 2)) > 0).long()
    return TensorDataset(x, y)


def _trained(seed: int, ds: TensorDataset) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = make_cnn()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for _ in range(4):
        for x, y in DataLoader(ds, batch_size=32, shuffle=True):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@pytest.fixture(scope="module")
def pair():
    ds = _data()
    with one_thread():
        return ds, _trained(1, ds), _trained(2, ds)


def _path_loss(path, ds) -> float:
    """Mean loss over t in {0.25, 0.5, 0.75} (BN re-estimated at each), float32 evaluation."""
    net, losses = make_cnn(), []
    for t in (0.25, 0.5, 0.75):
        net.load_state_dict(path.state_at(t))
        update_bn(net, DataLoader(ds, batch_size=64))
        losses.append(evaluate(net, DataLoader(ds, batch_size=128)).loss)
    return sum(losses) / len(losses)


def test_bf16_curve_fit_stays_within_5_percent_of_fp32(pair):
    ds, a, b = pair
    loader = DataLoader(ds, batch_size=32, shuffle=True)
    results = {}
    with one_thread():
        for prec in ("fp32", "bf16"):
            path = fit_curve(make_cnn(), a, b, loader, config=CurveConfig(epochs=3), progress=False, precision=prec)
            results[prec] = (path, _path_loss(path, ds))
    (p32, l32), (p16, l16) = results["fp32"], results["bf16"]
    assert p16.metadata["fit"]["precision"] == "bf16" and "precision" not in p32.metadata["fit"]
    assert abs(l16 - l32) <= 0.05 * l32, (l16, l32)
    # the bends really differ (bf16 forward passes), and are held in float32
    bend16, bend32 = p16.bends[0], p32.bends[0]
    assert all(v.dtype == a[k].dtype for k, v in bend16.items())
    assert any(not torch.equal(bend16[k], bend32[k]) for k in bend16 if bend16[k].is_floating_point())


def test_bf16_fit_of_half_endpoints_trains_float32_masters(pair):
    ds, a, b = pair
    a16 = cast_floating(a, torch.bfloat16)
    b16 = cast_floating(b, torch.bfloat16)
    with one_thread():
        f = CurveFitter(make_cnn().bfloat16().train(), a16, b16, precision="bf16")
        assert all(p.dtype == torch.float32 for bend in f.bends for p in bend)
        assert all(m.dtype == torch.float32 for buf in f.momenta for m in buf)
        x, y = ds.tensors[0][:32], ds.tensors[1][:32]
        loss = f.step(x.bfloat16(), y, 0.5, 0.1)
    assert torch.isfinite(loss)
    out = f.bend_state_dicts()[0]
    assert all(out[k].dtype == a16[k].dtype for k in out)


def test_fp16_fit_uses_a_grad_scaler_and_counts_skipped_steps(pair):
    ds, a, b = pair
    with one_thread():
        f = CurveFitter(make_cnn().train(), a, b, precision="fp16")
        f.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)  # overflows fp16 at once
        before = [p.clone() for p in f.train_bends[0]]
        x, y = ds.tensors[0][:16], ds.tensors[1][:16]
        f.step(x, y, 0.5, 0.1)
        assert f.skipped_steps == 1
        assert all(torch.equal(p, q) for p, q in zip(before, f.train_bends[0]))  # not applied
        assert f.scaler.get_scale() < 2.0 ** 40  # backed off
        for _ in range(30):
            f.step(x, y, 0.5, 0.1)
    assert f.skipped_steps < 31  # once the scale fits, steps are applied
    assert any(not torch.equal(p, q) for p, q in zip(before, f.train_bends[0]))


def test_fp16_fit_reports_skipped_steps(pair):
    ds, a, b = pair
    small = TensorDataset(*(t[:64] for t in ds.tensors))
    with one_thread():
        path = fit_curve(make_cnn(), a, b, DataLoader(small, batch_size=32), config=CurveConfig(epochs=1),
                         progress=False, precision="fp16")
    meta = path.metadata["fit"]
    assert meta["precision"] == "fp16" and meta["skipped_steps"] >= 0 and meta["loss_scale"] > 0


@pytest.mark.parametrize("bad", ["fp8", "int8", ""])
def test_unknown_precision_is_refused(bad):
    with pytest.raises(BadOptionError, match="`precision`"):
        resolve_precision(bad)


def test_precision_names_and_dtypes():
    assert resolve_precision(None).enabled is False
    assert resolve_precision("bfloat16").name == "bf16"
    assert parse_dtype("half") == torch.float16 and parse_dtype(None) is None
    with pytest.raises(BadOptionError, match="dtype must be"):
        parse_dtype("fp64")
    with autocast("bf16") as prec:
        assert torch.is_autocast_enabled("cpu") and prec.dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("prec", ["bf16", "fp16"])
def test_low_precision_evaluation_is_close_to_fp32(pair, prec):
    ds, a, _ = pair
    net = make_cnn()
    net.load_state_dict(a)
    loader = DataLoader(ds, batch_size=128)
    with one_thread():
        m32 = evaluate(net, loader)
        m16 = evaluate(net, loader, precision=prec)
    assert m16.loss != m32.loss  # really ran in low precision
    assert abs(m16.loss - m32.loss) <= 0.03 * m32.loss
    assert abs(m16.acc - m32.acc) <= 0.03
    assert all(p.dtype == torch.float32 for p in net.parameters())


def test_bn_statistics_of_a_half_model_accumulate_in_float32(pair):
    ds, a, _ = pair
    net32 = make_cnn()
    net32.load_state_dict(a)
    net16 = copy.deepcopy(net32).bfloat16()
    loader = DataLoader(TensorDataset(ds.tensors[0].bfloat16(), ds.tensors[1]), batch_size=32)
    with one_thread():
        update_bn(net16, loader, precision="bf16")
        update_bn(net32, DataLoader(ds, batch_size=32))
    bn16, bn32 = net16[1], net32[1]
    assert bn16.running_mean.dtype == torch.bfloat16  # cast back to the model's dtype
    assert torch.allclose(bn16.running_var.float(), bn32.running_var, rtol=0.03)


def _members(pair, k=3):
    ds, a, b = pair
    return [{n: torch.lerp(a[n], b[n], i / (k - 1)) if a[n].is_floating_point() else a[n] for n in a}
            for i in range(k)]


def test_bf16_ensemble_inference_on_cpu(pair):
    ens = EnsembleModel(make_cnn, _members(pair))
    x = pair[0].tensors[0][:64]
    with one_thread(), torch.no_grad():
        ref = ens(x)
        with autocast("bf16"):
            low = ens(x)
    assert low.dtype == torch.float32  # members are combined in float32
    assert not torch.equal(low, ref)
    assert torch.allclose(low.exp(), ref.exp(), atol=0.03)


@pytest.mark.parametrize("convert,dtype", [(nn.Module.half, torch.float16), (nn.Module.bfloat16, torch.bfloat16),
                                           (lambda m: m.to(torch.bfloat16), torch.bfloat16)])
def test_ensemble_module_conversions(pair, convert, dtype):
    ens = EnsembleModel(make_cnn, _members(pair))
    x = pair[0].tensors[0][:16]
    with one_thread(), torch.no_grad():
        ref = ens(x)
        out = convert(ens)
        assert out is ens
        assert all(p.dtype == dtype for p in ens.parameters())
        # members still share the stacked storage (K copies, not 2K)
        assert ens.members[1][0].weight.data_ptr() == ens._stacked_params["0.weight"][1].data_ptr()
        low = ens(x.to(dtype))
        assert torch.allclose(low.float().exp(), ref.exp(), atol=0.05)
        ens.float()
        assert all(p.dtype == torch.float32 for p in ens.parameters())
        assert torch.allclose(ens(x), ref, atol=1e-2)


def _data_bytes(file) -> int:
    with open(file, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return file.stat().st_size - 8 - header


@pytest.mark.parametrize("save_dtype,stored", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_save_dtype_halves_the_file_and_loads_back(pair, tmp_path, save_dtype, stored):
    members = _members(pair)
    f32 = save_ensemble(tmp_path / "e32.safetensors", members)
    f16 = save_ensemble(tmp_path / f"e_{save_dtype}.safetensors", members, dtype=save_dtype)
    ratio = _data_bytes(f16) / _data_bytes(f32)  # the tensors (the JSON header is the same size)
    assert 0.5 <= ratio < 0.52, ratio  # the int64 num_batches_tracked stays as it is
    x = pair[0].tensors[0][:32]
    with one_thread(), torch.no_grad():
        ref = mcensemble.load_ensemble(f32, model=make_cnn)
        back = mcensemble.load_ensemble(f16, model=make_cnn)  # into the model's dtype
        assert all(p.dtype == torch.float32 for p in back.parameters())
        assert torch.allclose(back(x).exp(), ref(x).exp(), atol=0.03)
        native = mcensemble.load_ensemble(f16, model=make_cnn, dtype="file")
        assert all(p.dtype == stored for p in native.parameters())
        asked = mcensemble.load_ensemble(f32, model=make_cnn, dtype="bf16")
        assert all(p.dtype == torch.bfloat16 for p in asked.parameters())
    assert members[0]["0.weight"].dtype == torch.float32  # inputs not modified


def test_fp16_save_refuses_overflow(pair, tmp_path):
    members = _members(pair)
    members[1] = dict(members[1], **{"5.bias": torch.full((4,), 1e6)})
    with pytest.raises(NonFiniteError, match="5.bias.*bf16"):
        save_ensemble(tmp_path / "e.safetensors", members, dtype="fp16")
    assert not (tmp_path / "e.safetensors").exists()


def test_lazy_load_matches_and_reads_members_on_demand(pair, tmp_path, monkeypatch):
    file = save_ensemble(tmp_path / "e.safetensors", _members(pair, k=4))
    reads: list[int] = []
    original = _LazyMembers.__getitem__

    def counting(self, i):
        reads.append(i)
        return original(self, i)

    monkeypatch.setattr(_LazyMembers, "__getitem__", counting)
    x = pair[0].tensors[0][:32]
    with one_thread(), torch.no_grad():
        eager = mcensemble.load_ensemble(file, model=make_cnn)
        assert sorted(reads) == [0, 1, 2, 3]
        reads.clear()
        lazy = mcensemble.load_ensemble(file, model=make_cnn, lazy=True)
        assert isinstance(lazy, LazyEnsembleModel) and len(lazy) == 4
        assert reads == []  # nothing read up front
        assert sum(p.numel() for p in lazy.parameters()) * 4 == sum(p.numel() for p in eager.parameters())
        out = lazy(x)
        assert reads == [0, 1, 2, 3]
        assert torch.allclose(out, eager(x), atol=1e-5)
        m = evaluate(lazy, DataLoader(pair[0], batch_size=128), precision="bf16")
    assert m.n == len(pair[0])


def test_cli_build_fp16_bf16_file_and_eval(mce_cli, mce_cnn_pair, tmp_path):
    a, b = mce_cnn_pair
    out, rep = tmp_path / "ens.safetensors", tmp_path / "r.json"
    res = mce_cli("build", a, b, "--data", "digits,train=200", "--epochs", "1", "--members", "2", "--candidates", "3",
                  "--no-packed", "--precision", "fp16", "--save-dtype", "bf16", "--workers", "1", "--channels-last",
                  "--out", out, "--report", rep)
    assert res.exit_code == 0, res.output
    import json
    curve = json.loads(rep.read_text())["curve"]
    assert curve["precision"] == "fp16" and len(curve["skipped_steps"]) == 1
    from safetensors import safe_open
    with safe_open(str(out), framework="pt") as f:
        assert f.get_slice("member.0.stem.0.weight" if "member.0.stem.0.weight" in f.keys()
                           else next(k for k in f.keys() if k.endswith("weight"))).get_dtype() == "BF16"
    ens = mcensemble.load_ensemble(out)
    assert all(p.dtype == torch.float32 for p in ens.parameters())
    res = mce_cli("eval", out, "--data", "digits", "--precision", "bf16", "--report", tmp_path / "e.json")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "e.json").read_text())["ensemble"]["acc"] > 0.3


@pytest.mark.parametrize("option,value", [("--precision", "fp8"), ("--save-dtype", "int8"), ("--workers", "-1")])
def test_cli_refuses_bad_precision_options(mce_cli, tmp_path, option, value):
    res = mce_cli("build", tmp_path / "a", tmp_path / "b", option, value)
    assert res.exit_code == 2 and option in res.output and "Traceback" not in res.output



def test_use_precision_sets_what_none_means(pair):
    from mcensemble.precision import current_precision, use_precision
    ds, a, b = pair
    small = TensorDataset(*(t[:32] for t in ds.tensors))
    with one_thread(), use_precision("bf16"):
        assert current_precision() == "bf16"
        path = fit_curve(make_cnn(), a, b, DataLoader(small, batch_size=16), config=CurveConfig(epochs=1),
                         progress=False)
        explicit = resolve_precision("fp32")
    assert current_precision() == "fp32"
    assert path.metadata["fit"]["precision"] == "bf16" and not explicit.enabled
    with pytest.raises(BadOptionError, match="`precision`"):
        with use_precision("fp64"):
            pass


def test_lazy_ensemble_converts_like_a_module(pair, tmp_path):
    file = save_ensemble(tmp_path / "e.safetensors", _members(pair, k=2), dtype="bf16")
    x = pair[0].tensors[0][:8]
    with one_thread(), torch.no_grad():
        lazy = mcensemble.load_ensemble(file, model=make_cnn, lazy=True, dtype="file")
        assert all(p.dtype == torch.bfloat16 for p in lazy.parameters())
        out16 = lazy(x.bfloat16())
        assert lazy.float() is lazy and all(p.dtype == torch.float32 for p in lazy.parameters())
        out32 = lazy(x)  # the bf16 members are cast up as they are loaded
    assert out16.dtype == out32.dtype == torch.float32
    assert torch.allclose(out16.exp(), out32.exp(), atol=0.05)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("prec", ["fp32", "bf16", "fp16"])
def test_cuda_curve_fit_and_evaluation(pair, prec):
    ds, a, b = pair
    loader = DataLoader(ds, batch_size=32, shuffle=True)
    path = fit_curve(make_cnn(), a, b, loader, config=CurveConfig(epochs=2), device="cuda", progress=False,
                     precision=prec)
    assert all(v.device.type == "cpu" for v in path.bends[0].values())  # on a's device
    if prec == "fp16":
        assert path.metadata["fit"]["skipped_steps"] >= 0
    net = make_cnn()
    net.load_state_dict(path.state_at(0.5))
    update_bn(net, loader, device="cuda", precision=prec)
    m = evaluate(net, DataLoader(ds, batch_size=128), device="cuda", precision=prec)
    assert m.n == len(ds) and m.loss == m.loss


@pytest.mark.cuda
@needs_cuda
def test_cuda_ensemble_moves_converts_and_loads(pair, tmp_path):
    members = _members(pair)
    x = pair[0].tensors[0][:32]
    ens = EnsembleModel(make_cnn, members)
    with torch.no_grad():
        ref = ens(x)
        ens.to("cuda")
        assert all(p.device.type == "cuda" for p in ens.parameters())
        assert torch.allclose(ens(x.cuda()).cpu(), ref, atol=1e-4)
        ens.half()
        assert torch.allclose(ens(x.cuda().half()).float().cpu().exp(), ref.exp(), atol=0.03)
        file = save_ensemble(tmp_path / "e.safetensors", members, dtype="bf16")
        lazy = mcensemble.load_ensemble(file, model=make_cnn, lazy=True, device="cuda")
        with autocast("bf16", "cuda"):
            out = lazy(x.cuda())
    assert torch.allclose(out.float().cpu().exp(), ref.exp(), atol=0.05)


@pytest.mark.cuda
@needs_cuda
def test_cuda_loader_settings_pin_memory_and_channels_last(pair):
    from mcensemble.data import create_loader, loader_settings
    from mcensemble.precision import use_precision
    with loader_settings(workers=2, pin_memory=True):
        loader = create_loader("digits,train=200", batch_size=64)
    assert loader.pin_memory and loader.num_workers == 2
    x, _ = next(iter(loader))
    assert x.is_pinned()
    net = make_cnn().cuda()
    with use_precision("bf16", channels_last=True):
        m = evaluate(net, DataLoader(pair[0], batch_size=64), device="cuda")
    assert m.n == len(pair[0])


@pytest.mark.cuda
@needs_cuda
def test_cuda_cli_build_fp16(mce_cli, mce_cnn_pair, tmp_path):
    a, b = mce_cnn_pair
    res = mce_cli("build", a, b, "--device", "cuda", "--data", "digits,train=200", "--epochs", "1", "--members", "2",
                  "--candidates", "3", "--no-packed", "--precision", "fp16", "--save-dtype", "fp16", "--workers", "2",
                  "--channels-last", "--out", tmp_path / "e.safetensors")
    assert res.exit_code == 0, res.output
