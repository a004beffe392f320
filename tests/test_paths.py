"""Tests for mcensemble.paths: Path base, LinearPath, the path file format."""
from __future__ import annotations

import json


import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from mcensemble.errors import ArchitectureMismatchError, BadOptionError, CheckpointError
from mcensemble.models import ModelSpec
from mcensemble.paths import LinearPath, ModePath, load_path, register_path
from mcensemble.paths import base as base_mod


def net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4))
    m.train()
    m(torch.randn(4, 1, 4, 4))  # non-trivial running stats and num_batches_tracked
    if seed:
        m(torch.randn(4, 1, 4, 4))
    return m.eval()


@pytest.fixture
def ab():
    return net(0).state_dict(), net(1).state_dict()


def test_endpoints_exact(ab):
    a, b = ab
    path = LinearPath(a, b)
    s0, s1 = path.state_at(0.0), path.state_at(1)
    assert s0.keys() == a.keys() and s1.keys() == b.keys()
    for k in a:
        assert torch.equal(s0[k], a[k]) and s0[k].dtype == a[k].dtype
        assert torch.equal(s1[k], b[k])
    # results are fresh tensors: changing them does not move the path
    s0["4.weight"].add_(1.0)
    assert torch.equal(path.state_at(0.0)["4.weight"], a["4.weight"])
    assert path.kind == "linear" and path.vertex_t == [0.0, 1.0] and path.certificate is None


def test_path_copies_its_inputs(ab):
    a, b = ab
    saved = a["4.weight"].clone()
    path = LinearPath(a, b)
    a["4.weight"].zero_()
    assert torch.equal(path.state_at(0.0)["4.weight"], saved)


def test_midpoint_and_integer_tensors(ab):
    a, b = ab
    path = LinearPath(a, b)
    mid = path.state_at(0.5)
    torch.testing.assert_close(mid["0.weight"], (a["0.weight"] + b["0.weight"]) / 2)
    q = path.state_at(0.25)
    torch.testing.assert_close(q["4.bias"], 0.75 * a["4.bias"] + 0.25 * b["4.bias"])
    assert a["1.num_batches_tracked"] != b["1.num_batches_tracked"]
    assert torch.equal(path.state_at(0.49)["1.num_batches_tracked"], a["1.num_batches_tracked"])
    assert torch.equal(mid["1.num_batches_tracked"], b["1.num_batches_tracked"])
    assert mid["1.num_batches_tracked"].dtype == torch.int64


def test_half_precision():
    a = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}
    b = {"w": torch.tensor([3.0, 4.0], dtype=torch.bfloat16)}
    mid = LinearPath(a, b).state_at(0.5)["w"]
    assert mid.dtype == torch.bfloat16 and mid.tolist() == [2.0, 3.0]


@pytest.mark.parametrize("t", [-0.1, 1.0001, 2, float("nan"), float("inf"), "half"])
def test_t_out_of_range(ab, t):
    path = LinearPath(*ab)
    with pytest.raises(BadOptionError, match=r"t.*\[0, 1\]") as e:
        path.state_at(t)
    assert e.value.option == "t"


def test_mismatch_messages(ab):
    a, b = ab
    b2 = dict(b)
    b2["4.weight"] = torch.zeros(5, 12)
    with pytest.raises(ArchitectureMismatchError, match=r"'4.weight'.*\(4, 12\).*\(5, 12\)"):
        LinearPath(a, b2)
    b3 = {k: v for k, v in b.items() if k != "4.bias"}
    with pytest.raises(ArchitectureMismatchError, match=r"missing from B: '4.bias'"):
        LinearPath(a, b3)
    b4 = dict(b)
    b4["4.bias"] = b4["4.bias"].double()
    with pytest.raises(ArchitectureMismatchError, match=r"'4.bias'.*float32.*float64"):
        LinearPath(a, b4)


def test_save_load_round_trip(ab, tmp_path):
    a, b = ab
    path = LinearPath(a, b)
    f = tmp_path / "sub" / "line.safetensors"
    spec = ModelSpec(arch="resnet18", kwargs={"num_classes": 4})
    path.save(f, model_spec=spec, extra={"note": "hello"})
    assert sorted(p.name for p in f.parent.iterdir()) == ["line.safetensors"]  # no temp files left
    loaded = load_path(f)
    assert isinstance(loaded, LinearPath) and loaded.kind == "linear"
    assert loaded.vertex_t == [0.0, 1.0]
    la, lb = loaded.endpoints
    for k in a:
        assert torch.equal(la[k], a[k]) and la[k].dtype == a[k].dtype
        assert torch.equal(lb[k], b[k])
    for t in (0.0, 0.3, 1.0):
        x, y = path.state_at(t), loaded.state_at(t)
        assert all(torch.equal(x[k], y[k]) for k in x)
    meta = loaded.metadata
    assert meta["format"] == "mcensemble-path" and meta["format_version"] == 1 and meta["kind"] == "linear"
    assert meta["model"] == spec.to_dict() and loaded.model_spec == spec
    assert meta["note"] == "hello"
    assert len(meta["endpoints_sha256"]) == 2 and meta["endpoints_sha256"][0] != meta["endpoints_sha256"][1]
    # saving the loaded path again keeps the model spec
    loaded.save(tmp_path / "again.safetensors")
    assert load_path(tmp_path / "again.safetensors").model_spec == spec
    # raw file layout
    from safetensors import safe_open
    with safe_open(str(f), "pt") as h:
        keys = set(h.keys())
        assert json.loads(h.metadata()["mcensemble"])["kind"] == "linear"
    assert keys == {f"endpoint.0.{k}" for k in a} | {f"endpoint.1.{k}" for k in b}


def test_save_without_spec_and_shared_storage(tmp_path):
    w = torch.randn(3, 3)
    a = {"emb": w, "head": w}  # tied weights share storage
    b = {"emb": torch.randn(3, 3), "head": torch.randn(3, 3)}
    path = LinearPath(a, b, copy=False)
    path.save(tmp_path / "p.safetensors")
    loaded = load_path(tmp_path / "p.safetensors")
    assert loaded.metadata["model"] is None and loaded.model_spec is None
    assert torch.equal(loaded.state_at(0)["head"], w)


def _write(tmp_path, meta, tensors=None, name="x.safetensors"):
    f = tmp_path / name
    tensors = tensors if tensors is not None else {"endpoint.0.w": torch.zeros(2), "endpoint.1.w": torch.ones(2)}
    save_file(tensors, str(f), metadata=None if meta is None else {"mcensemble": json.dumps(meta)})
    return f


def good_meta(**kw):
    return {"format": "mcensemble-path", "format_version": 1, "kind": "linear", "model": None,
            "endpoints_sha256": [], "groups": ["endpoint.0", "endpoint.1"], **kw}


def test_load_minimal_written_by_hand(tmp_path):
    path = load_path(_write(tmp_path, good_meta()))
    assert path.state_at(0.5)["w"].tolist() == [0.5, 0.5]


@pytest.mark.parametrize("case, match", [
    ("missing", r"missing\.safetensors does not exist"),
    ("corrupt", r"corrupt\.safetensors is not a readable safetensors"),
    ("pickle", r"pickle\.pt is not a readable safetensors"),
    ("directory", r"is a directory"),
    ("no_meta", r"is not an mcensemble path file.*without 'mcensemble' metadata"),
    ("bad_json", r"not valid JSON"),
    ("ensemble", r"is not an mcensemble path file.*ensemble file"),
    ("newer", r"format version 2, newer.*upgrade mcensemble"),
    ("unknown_kind", r"unknown path kind 'spiral'.*knows .*linear"),
    ("stray_tensor", r"tensor 'weights\.w' belongs to none"),
    ("missing_group", r"linear path in it is damaged"),
    ("mismatched", r"damaged or inconsistent.*'w'"),
])
def test_load_errors(tmp_path, case, match):
    if case == "missing":
        f = tmp_path / "missing.safetensors"
    elif case == "corrupt":
        f = tmp_path / "corrupt.safetensors"
        f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    elif case == "pickle":
        f = tmp_path / "pickle.pt"
        torch.save({"w": torch.zeros(2)}, f)
    elif case == "directory":
        f = tmp_path
    elif case == "no_meta":
        f = _write(tmp_path, None)
    elif case == "bad_json":
        f = tmp_path / "bad.safetensors"
        save_file({"a": torch.zeros(1)}, str(f), metadata={"mcensemble": "{not json"})
    elif case == "ensemble":
        f = _write(tmp_path, {"format": "mcensemble-ensemble", "format_version": 1})
    elif case == "newer":
        f = _write(tmp_path, good_meta(format_version=2))
    elif case == "unknown_kind":
        f = _write(tmp_path, good_meta(kind="spiral"))
    elif case == "stray_tensor":
        f = _write(tmp_path, good_meta(), {"endpoint.0.w": torch.zeros(2), "weights.w": torch.ones(2)})
    elif case == "missing_group":
        f = _write(tmp_path, good_meta(groups=["endpoint.0"]), {"endpoint.0.w": torch.zeros(2)})
    elif case == "mismatched":
        f = _write(tmp_path, good_meta(), {"endpoint.0.w": torch.zeros(2), "endpoint.1.w": torch.ones(3)})
    with pytest.raises(CheckpointError, match=match):
        load_path(f)


def test_register_custom_kind(tmp_path, ab):
    """A new kind with an extra tensor group and its own JSON field round-trips via load_path."""

    @register_path("test-midpoint")
    class MidpointPath(ModePath):
        def __init__(self, a, b, mid, *, scale=1.0, metadata=None, copy=True):
            super().__init__({"endpoint.0": a, "endpoint.1": b, "bend.0": mid}, metadata=metadata, copy=copy)
            self.scale = scale
            self.vertex_t = [0.0, 0.5, 1.0]

        def _state_at(self, t):
            a, b = self.endpoints
            m = self.groups["bend.0"]
            if t <= 0.5:
                return {k: a[k] + 2 * t * (m[k] - a[k]) for k in a}
            return {k: m[k] + (2 * t - 1) * (b[k] - m[k]) for k in a}

        def _file_fields(self):
            return {"scale": self.scale}

        @classmethod
        def _from_file(cls, groups, meta):
            return cls(groups["endpoint.0"], groups["endpoint.1"], groups["bend.0"], scale=meta["scale"],
                       metadata=meta, copy=False)

    try:
        a, b = ab
        a = {k: v for k, v in a.items() if v.is_floating_point()}
        b = {k: v for k, v in b.items() if v.is_floating_point()}
        mid = {k: torch.zeros_like(v) for k, v in a.items()}
        p = MidpointPath(a, b, mid, scale=3.0)
        p.certificate = {"max_loss": 1.0, "eps": 0.1}
        p.save(tmp_path / "m.safetensors")
        q = load_path(tmp_path / "m.safetensors")
        assert type(q) is MidpointPath and q.kind == "test-midpoint" and q.scale == 3.0
        assert q.vertex_t == [0.0, 0.5, 1.0] and q.metadata["vertices"] == [0.0, 0.5, 1.0]
        assert q.certificate == {"max_loss": 1.0, "eps": 0.1}
        assert all(torch.equal(v, torch.zeros_like(v)) for v in q.state_at(0.5).values())
        assert torch.equal(q.state_at(1.0)["4.weight"], b["4.weight"])
        with pytest.raises(ValueError, match="already registered"):
            register_path("linear")(MidpointPath)
    finally:
        base_mod._REGISTRY.pop("test-midpoint", None)


def test_one_name_per_thing(ab):
    import mcensemble.paths as paths
    import mcensemble.paths.base as base
    assert not hasattr(paths, "Path") and not hasattr(base, "Path")   # ModePath only
    p = LinearPath(*ab)
    assert p.vertex_t == [0.0, 1.0] and not hasattr(p, "vertices")   # vertex_t only
