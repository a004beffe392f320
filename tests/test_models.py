"""models.py: timm registry checks, module:function entry points, spec resolution, inference."""
from __future__ import annotations

import importlib
import sys
import textwrap
import uuid

import pytest
import torch
import torch.nn as nn

from mcensemble.errors import BadOptionError, ModelSpecError
from mcensemble.models import (
    ModelSpec, as_factory, check_timm_arch, create_model, import_entry, infer_model_kwargs, resolve_model_spec,
)


@pytest.fixture
def make_module(tmp_path, monkeypatch):
    """Write a module with a unique name into tmp_path (on sys.path); return its name."""
    monkeypatch.syspath_prepend(str(tmp_path))
    names = []

    def make(source: str) -> str:
        name = f"mce_tmp_{uuid.uuid4().hex[:10]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        importlib.invalidate_caches()
        names.append(name)
        return name

    yield make
    for name in names:
        sys.modules.pop(name, None)


GOOD = """
import torch.nn as nn
def net():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Dropout(0.5))
class Builders:
    @staticmethod
    def small():
        return nn.Linear(4, 2)
not_callable = 3
def not_module():
    return "a string"
def raises():
    raise RuntimeError("boom inside")
def needs_arg(width):
    return nn.Linear(width, 2)
"""


# ---------------------------------------------------------------- timm registry

def test_check_timm_arch_accepts_registry_names():
    assert check_timm_arch("test_resnet") == "test_resnet"
    assert check_timm_arch("resnet18.a1_in1k") == "resnet18.a1_in1k"  # pretrained tag


@pytest.mark.parametrize("name, expect", [
    ("resnet1", r"Unknown timm architecture 'resnet1'\. Did you mean: .*resnet18.*\? See timm\.list_models\(\)"),
    ("test_resnt", r"Did you mean: .*test_resnet"),
    ("hf-hub:timm/resnet18", r"registry only"),
    ("zzzzqqqq", r"Unknown timm architecture 'zzzzqqqq'\. See timm\.list_models"),
])
def test_check_timm_arch_unknown(name, expect):
    with pytest.raises(ModelSpecError, match=expect) as ei:
        check_timm_arch(name)
    assert ei.value.option == "arch"


def test_create_model_timm_eval_and_kwargs():
    m = create_model(ModelSpec(arch="test_resnet", kwargs={"num_classes": 7, "in_chans": 1}))
    assert not m.training and not any(mod.training for mod in m.modules())
    assert m(torch.zeros(2, 1, 16, 16)).shape == (2, 7)


def test_create_model_never_downloads():
    # a file's kwargs cannot switch on pretrained weights
    m = create_model(ModelSpec(arch="test_resnet", kwargs={"pretrained": True, "num_classes": 3}))
    assert m.fc.out_features == 3


def test_create_model_bad_timm_kwargs():
    with pytest.raises(ModelSpecError, match=r"cannot build timm model timm:test_resnet\(.*no_such_kwarg"):
        create_model(ModelSpec(arch="test_resnet", kwargs={"no_such_kwarg": 1}))


@pytest.mark.parametrize("spec, expect", [
    (ModelSpec(), r"no model given: pass `arch`"),
    (ModelSpec(arch="test_resnet", entry="a:b"), r"both"),
    (ModelSpec(arch="resnet1"), r"Unknown timm architecture"),
])
def test_create_model_bad_specs(spec, expect):
    with pytest.raises(ModelSpecError, match=expect):
        create_model(spec)


# ---------------------------------------------------------------- entry points

def test_import_entry_and_create(make_module):
    mod = make_module(GOOD)
    fn = import_entry(f"{mod}:net")
    assert callable(fn) and isinstance(fn(), nn.Module)
    assert isinstance(import_entry(f"{mod}:Builders.small")(), nn.Linear)
    m = create_model(ModelSpec(entry=f"{mod}:net"))
    assert not m.training and not m[2].training


def test_import_entry_from_current_directory(tmp_path, monkeypatch):
    name = f"mce_cwd_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{name}.py").write_text("import torch.nn as nn\ndef net():\n    return nn.Linear(2, 2)\n")
    monkeypatch.chdir(tmp_path)
    importlib.invalidate_caches()
    before = list(sys.path)
    try:
        assert isinstance(create_model(ModelSpec(entry=f"{name}:net")), nn.Linear)
    finally:
        sys.modules.pop(name, None)
    assert sys.path == before  # the cwd was only added for the import


@pytest.mark.parametrize("entry, expect", [
    ("no_colon_here", r"'no_colon_here' is not of the form 'module:function'.*'no_colon_here:net'"),
    ("a:b:c", r"not of the form 'module:function'"),
    (":net", r"not of the form"),
    ("mod:", r"not of the form"),
    ("dir/my_models.py:net", r"not a file path"),
    ("my 'models:net", r"not of the form"),
    ("mce_surely_missing_module:net", r"cannot find module 'mce_surely_missing_module'\. Make sure the module "
                                      r"is importable: run from its folder or add it to PYTHONPATH"),
    ("mce_surely_missing_module.py:net", r"Leave out the '\.py'"),
])
def test_import_entry_malformed_or_missing(entry, expect):
    with pytest.raises(ModelSpecError, match=expect) as ei:
        import_entry(entry)
    assert ei.value.option == "model"


@pytest.mark.parametrize("attr, expect, cause", [
    ("nett", r"has no attribute 'nett'\. Did you mean: net", AttributeError),
    ("not_callable", r"names a int, not a function", None),
])
def test_import_entry_bad_attribute(make_module, attr, expect, cause):
    mod = make_module(GOOD)
    with pytest.raises(ModelSpecError, match=expect) as ei:
        import_entry(f"{mod}:{attr}")
    assert (type(ei.value.__cause__) if ei.value.__cause__ else None) is cause


def test_import_entry_module_failures(make_module):
    broken_dep = make_module("import mce_dependency_that_is_not_installed\ndef net():\n    pass\n")
    with pytest.raises(ModelSpecError, match=r"imports 'mce_dependency_that_is_not_installed', which is not "
                                             r"installed") as ei:
        import_entry(f"{broken_dep}:net")
    assert isinstance(ei.value.__cause__, ModuleNotFoundError)
    raising = make_module("raise ValueError('bad config at import')\n")
    with pytest.raises(ModelSpecError, match=r"importing module .* failed: ValueError: bad config at import"):
        import_entry(f"{raising}:net")


@pytest.mark.parametrize("fn, expect", [
    ("not_module", r"returned str, not an nn\.Module"),
    ("raises", r"raised RuntimeError: boom inside"),
    ("needs_arg", r"raised TypeError.*must take no arguments"),
])
def test_create_model_entry_failures(make_module, fn, expect):
    mod = make_module(GOOD)
    with pytest.raises(ModelSpecError, match=expect):
        create_model(ModelSpec(entry=f"{mod}:{fn}"))


def test_untrusted_entry_is_not_imported(make_module):
    mod = make_module(GOOD)
    with pytest.raises(ModelSpecError, match=r"does not import code named by a file.*`model`"):
        create_model(ModelSpec(entry=f"{mod}:net"), trust_entry=False)
    assert mod not in sys.modules


# ---------------------------------------------------------------- ModelSpec / as_factory

def test_model_spec_round_trip_and_describe():
    s = ModelSpec(arch="test_resnet", kwargs={"num_classes": 7})
    assert ModelSpec.from_dict(s.to_dict()) == s
    assert s.describe() == "timm:test_resnet(num_classes=7)"
    assert ModelSpec(entry="m:f").describe() == "m:f"
    with pytest.raises(ModelSpecError):
        ModelSpec.from_dict(["not", "a", "dict"])


def test_as_factory():
    base = nn.Linear(3, 2)
    f = as_factory(base)
    assert f() is not base and torch.equal(f().weight, base.weight)
    assert isinstance(as_factory(lambda: nn.Linear(1, 1))(), nn.Linear)
    assert isinstance(as_factory(ModelSpec(arch="test_resnet"))(), nn.Module)
    with pytest.raises(BadOptionError, match="model= must be"):
        as_factory(42)


# ---------------------------------------------------------------- resolve_model_spec

META = {"arch": "test_resnet", "num_classes": 7, "in_chans": 1, "model_args": {"drop_rate": 0.1}}


@pytest.mark.parametrize("kw, expected", [
    ({}, None),
    ({"num_classes": 3}, None),  # nothing names a model
    ({"metadata": META}, ModelSpec(arch="test_resnet", kwargs={"drop_rate": 0.1, "num_classes": 7, "in_chans": 1})),
    ({"metadata": META, "num_classes": 5}, ModelSpec(arch="test_resnet",
                                                     kwargs={"drop_rate": 0.1, "num_classes": 5, "in_chans": 1})),
    ({"metadata": META, "in_chans": 3}, ModelSpec(arch="test_resnet",
                                                  kwargs={"drop_rate": 0.1, "num_classes": 7, "in_chans": 3})),
    # a different --arch drops the metadata's model_args but keeps what describes the weights
    ({"metadata": META, "arch": "test_efficientnet"}, ModelSpec(arch="test_efficientnet",
                                                                kwargs={"num_classes": 7, "in_chans": 1})),
    ({"arch": "test_resnet", "num_classes": 4}, ModelSpec(arch="test_resnet", kwargs={"num_classes": 4})),
    # --model wins over metadata; num_classes / in_chans only go to timm
    ({"metadata": META, "model": "pkg.mod:net", "num_classes": 4}, ModelSpec(entry="pkg.mod:net")),
    ({"metadata": {"num_classes": 7}}, None),
    ({"metadata": {"arch": "test_resnet", "model_args": {"pretrained": True, "checkpoint_path": "/x"}}},
     ModelSpec(arch="test_resnet")),
])
def test_resolve_model_spec_precedence(kw, expected):
    assert resolve_model_spec(**kw) == expected


def test_resolve_model_spec_does_not_import():
    spec = resolve_model_spec(model="mce_surely_missing_module:net")
    assert spec == ModelSpec(entry="mce_surely_missing_module:net")


@pytest.mark.parametrize("kw, exc, expect", [
    ({"arch": "test_resnet", "model": "m:f"}, BadOptionError, r"either `arch` .* or `model`"),
    ({"arch": "resnet1"}, ModelSpecError, r"Unknown timm architecture 'resnet1'"),
    ({"metadata": {"arch": "resnet1"}}, ModelSpecError, r"metadata says arch 'resnet1'.*Pass `arch`"),
    ({"model": "resnet18"}, ModelSpecError, r"`model` takes 'module:function'.*pass `arch` resnet18"),
    ({"arch": "test_resnet", "num_classes": 0}, BadOptionError, r"num_classes must be a positive integer"),
    ({"arch": "test_resnet", "in_chans": "x"}, BadOptionError, r"in_chans must be a positive integer"),
    ({"metadata": {"arch": "test_resnet", "num_classes": -1}}, BadOptionError, r"checkpoint's metadata gives -1"),
])
def test_resolve_model_spec_errors(kw, exc, expect):
    with pytest.raises(exc, match=expect):
        resolve_model_spec(**kw)


# ---------------------------------------------------------------- infer_model_kwargs

@pytest.mark.parametrize("arch", ["test_resnet", "test_efficientnet"])
def test_infer_model_kwargs(arch):
    sd = create_model(ModelSpec(arch=arch, kwargs={"in_chans": 1, "num_classes": 7})).state_dict()
    assert infer_model_kwargs(sd, arch) == {"in_chans": 1, "num_classes": 7}
    spec = resolve_model_spec(arch=arch, metadata=infer_model_kwargs(sd, arch))
    create_model(spec).load_state_dict(sd)  # the inferred spec builds a model the weights fit


def test_infer_model_kwargs_partial():
    sd = create_model(ModelSpec(arch="test_resnet", kwargs={"num_classes": 7})).state_dict()
    sd.pop("fc.weight")
    assert infer_model_kwargs(sd, "test_resnet") == {"in_chans": 3}
    assert infer_model_kwargs({}, "test_resnet") == {}
    with pytest.raises(ModelSpecError, match="Unknown timm architecture"):
        infer_model_kwargs(sd, "resnet1")


def test_builtin_zoo_archs_are_known():
    assert check_timm_arch("mce_digits_cnn") == "mce_digits_cnn"
    sd = create_model(ModelSpec(arch="mce_digits_cnn", kwargs={"num_classes": 7, "in_chans": 2})).state_dict()
    assert infer_model_kwargs(sd, "mce_digits_cnn") == {"num_classes": 7, "in_chans": 2}
    # an MLP has no stem conv: only what can be read comes back
    sd = create_model(ModelSpec(arch="mce_digits_mlp", kwargs={"num_classes": 7})).state_dict()
    assert infer_model_kwargs(sd, "mce_digits_mlp") == {"num_classes": 7}
