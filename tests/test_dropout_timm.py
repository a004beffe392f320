"""The dropout-stable path on timm's own EfficientNet class (depthwise convolutions, BatchNorm,
conv_head), built by timm's block builder without squeeze-excite or residual blocks; timm
models with residual streams or squeeze-excite are refused with the reason."""
from __future__ import annotations

import pytest
import torch

from mcensemble.data import create_loader
from mcensemble.evaluate import evaluate
from mcensemble.paths.dropout import build_dropout_path
from mcensemble.errors import DropoutPathError

DATA = "digits,size=16,train=200"


def _effnet():
    from timm.models._efficientnet_builder import decode_arch_def
    from timm.models.efficientnet import EfficientNet
    # stem 8 -> 16 (depthwise-separable), 16 -> 24 (inverted residual, stride 2): channel
    # changes everywhere, so no block has a skip connection
    arch = [["ds_r1_k3_s1_c16"], ["ir_r1_k3_s2_e2_c24"]]
    return EfficientNet(block_args=decode_arch_def(arch), num_classes=10, in_chans=1, stem_size=8,
                        num_features=32)


def _trained(seed: int) -> dict:
    from helpers import train_seeded
    from mcensemble.hooks import channel_dropout

    def hook(m):
        return channel_dropout(m, 0.25, example_input=torch.zeros(2, 1, 16, 16))
    net = train_seeded(_effnet, seed, epochs=6, data=DATA, batch_size=50, hook=hook, lr=0.1)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_dense_loss_never_exceeds_the_certificate_on_a_timm_efficientnet():
    a, b = _trained(0), _trained(1)
    model = _effnet().eval()
    loader = create_loader(DATA, batch_size=200)
    path = build_dropout_path(model, a, b, loader, search_steps=4)
    assert path.certificate["measured_vertices"] == [], path.certificate["probe"]  # every vertex is its function
    cert = path.certificate
    assert cert["max_loss"] <= max(cert["loss_a"], cert["loss_b"]) + cert["eps"] + 1e-6
    assert all(torch.equal(path.state_at(0.0)[k], a[k]) for k in a)
    assert all(torch.equal(path.state_at(1.0)[k], b[k]) for k in b)
    worst = 0.0
    for t0, t1 in zip(path.vertex_t[:-1], path.vertex_t[1:]):
        for i in range(4):
            model.load_state_dict(path.state_at(t0 + (t1 - t0) * i / 3))
            worst = max(worst, evaluate(model, loader).loss)
    assert worst <= cert["max_loss"] + 1e-4


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet"])
def test_residual_or_squeeze_excite_timm_models_are_refused_with_the_reason(name):
    import timm
    model = timm.create_model(name, num_classes=10, in_chans=1).eval()
    state = model.state_dict()
    loader = create_loader("digits,size=16,train=64", batch_size=64)
    with pytest.raises(DropoutPathError, match="layered networks only"):
        build_dropout_path(model, state, state, loader)
