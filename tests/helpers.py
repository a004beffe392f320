"""Plain helpers shared by the test modules: `from helpers import ...`.

pytest (in its default `prepend` import mode, as setup.cfg leaves it) puts this folder on
sys.path for the conftest and for every test module here, so no package is needed. Fixtures
live in conftest.py; this module holds the functions and classes that tests call directly.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

#: the small training set of the layered-network tests (stability, pack, dropout path)
SMALL_DIGITS = "digits,train=500"


#: torch threads for the suite: 1 unless `MCE_TEST_THREADS` says otherwise (the suite must pass
#: with 1 and 2: float results differ in the last bits between thread counts)
SUITE_THREADS = int(os.environ.get("MCE_TEST_THREADS", "1"))


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread inside (`MCE_TEST_THREADS` if set; restored after). Tiny models on a
    shared 2-core machine: one thread is several times faster than two (thread hand-off dominates)."""
    before = torch.get_num_threads()
    torch.set_num_threads(SUITE_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def clone_state(src: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A detached copy of a module's state dict, or of a state dict."""
    sd = src.state_dict() if isinstance(src, nn.Module) else src
    return {k: v.detach().clone() for k, v in sd.items()}


def timm_factory(arch: str, **kwargs) -> Callable[[], nn.Module]:
    """A factory of timm's `arch` for 1-channel, 10-class inputs (mce_* archs included)."""
    import timm

    from mcensemble import zoo  # noqa: F401  (registers mce_* with timm)

    def make() -> nn.Module:
        return timm.create_model(arch, num_classes=10, in_chans=1, **kwargs)
    return make


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BN statistics, so that no two units are alike by accident; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                if name.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                else:
                    t.copy_(torch.randn(t.shape, generator=g) * (0.5 if t.dim() > 1 else 0.3))
    return model.eval()


def tiny_mlp() -> nn.Module:
    """16 inputs (any shape that flattens to 16) -> 12 hidden -> 5 classes."""
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 5))


def tiny_mlp_states(k: int, *, head_scale: float = 1.0) -> list[dict[str, torch.Tensor]]:
    """States of `k` `tiny_mlp`s initialised with seeds 0 .. k-1; `head_scale` multiplies the
    head's weight (confident members disagree visibly)."""
    out = []
    for i in range(k):
        torch.manual_seed(i)
        m = tiny_mlp()
        if head_scale != 1.0:
            with torch.no_grad():
                m[3].weight.mul_(head_scale)
        out.append(clone_state(m))
    return out


def perturbed_state(model: nn.Module, seed: int, scale: float) -> dict[str, torch.Tensor]:
    """The model's state with Gaussian noise of std `scale` added to every floating tensor
    (running variances replaced by |noise| + 0.5), so a missed axis shows in the logits
    (fresh models have zero biases and unit BN statistics); the model is not changed."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            r = torch.randn(v.shape, generator=gen, dtype=v.dtype) * scale
            out[k] = r.abs() + 0.5 if k.endswith("running_var") else v + r
        else:
            out[k] = v
    return out


def randomized_case(factory: Callable[[], nn.Module], size: int, n: int):
    """`randomize(factory())` after `torch.manual_seed(0)`, `n` random inputs of 1 x size x size,
    and the model's unit graph: (model, x, graph)."""
    from mcensemble.units import build_unit_graph
    torch.manual_seed(0)
    model = randomize(factory())
    x = torch.randn(n, 1, size, size)
    return model, x, build_unit_graph(model, x[:1])


def train_seeded(make: Callable[[], nn.Module], seed: int, *, epochs: int, data: str | DataLoader = "digits",
                 batch_size: int = 64, hook: Callable[[nn.Module], object] | None = None,
                 **config) -> nn.Module:
    """`make()` after `torch.manual_seed(seed)`, trained with `TrainConfig(epochs, seed, **config)`
    on `data`: a spec (its training split, shuffled by `seed`, in batches of `batch_size`) or a
    ready DataLoader (used as it is). Returns the model, in eval mode."""
    from mcensemble.data import create_loader
    from mcensemble.train import TrainConfig, train_model
    torch.manual_seed(seed)
    net = make()
    loader = data if isinstance(data, DataLoader) else create_loader(data, batch_size=batch_size, shuffle=True,
                                                                     seed=seed)
    return train_model(net, loader, config=TrainConfig(epochs=epochs, seed=seed, **config), hook=hook,
                       progress=False)


def train_pair(make: Callable[[], nn.Module], *, epochs: int, seeds: tuple[int, int] = (0, 1),
               **kwargs) -> list[nn.Module]:
    """Two models trained by `train_seeded`, one per seed (default 0 and 1), in that order."""
    return [train_seeded(make, seed, epochs=epochs, **kwargs) for seed in seeds]


def train_small(arch: str, epochs: int, seed: int = 0, *, channel_p: float = 0.0, lr: float = 0.2,
                **kwargs) -> nn.Module:
    """timm's `arch` (`kwargs` to the model) trained on SMALL_DIGITS, batches of 50, at `lr`;
    with channel dropout at rate `channel_p` during training when it is not 0."""
    hook = None
    if channel_p:
        from mcensemble.hooks import channel_dropout

        def hook(m):
            return channel_dropout(m, channel_p, example_input=torch.zeros(2, 1, 8, 8))
    return train_seeded(timm_factory(arch, **kwargs), seed, epochs=epochs, data=SMALL_DIGITS, batch_size=50,
                        hook=hook, lr=lr)


def small_pair(arch: str, epochs: int, **kwargs) -> tuple[nn.Module, dict, dict]:
    """`train_small` from seeds 0 and 1: (the seed-1 model in eval mode, A's state, B's state)."""
    nets = [train_small(arch, epochs, seed, **kwargs) for seed in (0, 1)]
    return nets[1].eval(), clone_state(nets[0]), clone_state(nets[1])


def small_eval_loader() -> DataLoader:
    """SMALL_DIGITS in batches of 250, in order (two batches)."""
    from mcensemble.data import create_loader
    return create_loader(SMALL_DIGITS, batch_size=250)


class RunsShell:
    """A pickle payload that runs `touch marker` when unpickled (what a safe loader must refuse)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, *, rtol: float = 1e-5, msg: str = "") -> None:
    """`got` equals `want` up to float rounding, whatever their magnitude and the CPU.

    Float results differ in the last bits between CPUs (AMD, Intel) and thread counts, and
    the absolute size of a rounding error grows with the values: compare relatively, with the
    absolute floor scaled to the largest value (so entries near zero do not fail on noise).
    """
    got, want = got.detach().double(), want.detach().double()
    scale = float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * max(scale, 1e-12), msg=msg or None)


def bn_mlp() -> nn.Module:
    """A seeded 4 -> 3 MLP with two BatchNorm1d layers and a Dropout (indices 1, 4, 5)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 6),
                         nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Linear(6, 3))


def gaussian_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Four seeded (inputs [16, 4], labels in 0..2) batches for `bn_mlp`."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 4, generator=g) * 3 + 1, torch.randint(0, 3, (16,), generator=g))
            for _ in range(4)]
