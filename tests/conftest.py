"""Shared fixtures: tiny endpoints trained once per session on the built-in digits.

Names are prefixed (`mce_`) so that they do not clash with fixtures test modules define
locally. Everything here is CPU-only, offline, and takes a few seconds in all.
"""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import one_thread, train_pair

#: the user's own module for `--model module:function` tests (a unique name: imported once)
USER_MODULE = "mce_user_models"
USER_MODULE_SOURCE = textwrap.dedent('''
    import torch.nn as nn

    def mlp():
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 10))

    def wide_mlp():
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
''')


@pytest.fixture
def mce_one_thread():
    """torch on one CPU thread for this test (restored after; a CLI `--threads` inside is undone too)."""
    with one_thread():
        yield


def _train_timm_pair(folder: Path, arch: str, model_args: dict, epochs: int) -> tuple[Path, Path]:
    from mcensemble import zoo  # noqa: F401  (registers mce_* with timm)
    from mcensemble.checkpoints import save_checkpoint
    from mcensemble.models import ModelSpec, create_model
    spec = ModelSpec(arch=arch, kwargs={"num_classes": 10, "in_chans": 1, **model_args})
    files = []
    for seed, net in zip((0, 1), train_pair(lambda: create_model(spec), epochs=epochs, lr=0.1)):
        dest = folder / f"{arch}-{seed}.safetensors"
        save_checkpoint(net.state_dict(), dest, metadata={"arch": arch, "num_classes": 10, "in_chans": 1,
                                                           "model_args": model_args})
        files.append(dest)
    return files[0], files[1]


@pytest.fixture(scope="session")
def mce_mlp_pair(tmp_path_factory) -> tuple[Path, Path]:
    """Two `mce_digits_mlp` (width 32, no BN) trained from seeds 0 and 1; safetensors naming the arch."""
    with one_thread():
        return _train_timm_pair(tmp_path_factory.mktemp("mlp_pair"), "mce_digits_mlp", {"width": 32}, epochs=4)


@pytest.fixture(scope="session")
def mce_cnn_pair(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny `mce_digits_cnn` (widths 4, 8: with BatchNorm), one epoch each."""
    with one_thread():
        return _train_timm_pair(tmp_path_factory.mktemp("cnn_pair"), "mce_digits_cnn", {"widths": [4, 8]}, epochs=1)


@pytest.fixture(scope="session")
def mce_user_folder(tmp_path_factory) -> Path:
    """A folder with the user's model module, a plain safetensors A and a torch.save'd B (no metadata)."""
    from mcensemble.data import digits_tensors
    folder = tmp_path_factory.mktemp("user")
    (folder / f"{USER_MODULE}.py").write_text(USER_MODULE_SOURCE)
    sys.path.insert(0, str(folder))
    try:
        import importlib
        mod = importlib.import_module(USER_MODULE)
    finally:
        sys.path.remove(str(folder))
    x, y = digits_tensors("train")
    with one_thread():
        _train_user_pair(mod, folder, x, y)
    return folder


def _train_user_pair(mod, folder: Path, x: torch.Tensor, y: torch.Tensor) -> None:
    from safetensors.torch import save_file
    for seed, name in ((0, "a.safetensors"), (1, "b.pt")):
        torch.manual_seed(seed)
        net = mod.mlp()
        opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
        for _ in range(5):
            for i in range(0, len(x), 128):
                loss = torch.nn.functional.cross_entropy(net(x[i:i + 128]), y[i:i + 128])
                opt.zero_grad()
                loss.backward()
                opt.step()
        sd = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
        if name.endswith(".safetensors"):
            save_file(sd, str(folder / name))
        else:
            torch.save(sd, folder / name)


@pytest.fixture
def mce_user_models(mce_user_folder, monkeypatch) -> Path:
    """`mce_user_models:mlp` importable (its folder on sys.path) for this test; the folder."""
    monkeypatch.syspath_prepend(str(mce_user_folder))
    return mce_user_folder


@pytest.fixture
def mce_cli():
    """Invoke the click CLI in-process: `mce_cli("build", A, B, ...)` -> click Result."""
    from click.testing import CliRunner
    from mcensemble.cli_group import main
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(main, [str(a) for a in args])
    return invoke


@pytest.fixture(scope="session", autouse=True)
def _mce_suite_one_thread():
    """The whole suite runs torch on one thread: its models are tiny, and on a 2-core
    machine two threads were measured several times slower (thread hand-off dominates).
    Denormals are flushed to zero too (on CPU they made training and fitting steps many
    times slower); there is no getter, so it stays on, as the modules that set it left it."""
    torch.set_flush_denormal(True)
    with one_thread():
        yield
