"""Channel dropout hooks: whole units dropped where they enter their consumers, in train mode only."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn

from mcensemble.errors import BadOptionError
from mcensemble.hooks import channel_dropout
from mcensemble.units import UnitGraph, build_unit_graph


def sigmoid_mlp():  # hidden activations are strictly positive: a zero means "dropped"
    return nn.Sequential(nn.Linear(16, 64), nn.Sigmoid(), nn.Linear(64, 48), nn.Sigmoid(),
                         nn.Linear(48, 10))


def sigmoid_cnn():
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.Sigmoid(), nn.Conv2d(32, 16, 3),
                         nn.BatchNorm2d(16), nn.Sigmoid(), nn.Flatten(), nn.Linear(16 * 6 * 6, 10))


def tiny_resnet():
    return timm.create_model("test_resnet", pretrained=False, num_classes=10, in_chans=1)


def tiny_effnet():
    return timm.create_model("test_efficientnet", pretrained=False, num_classes=10, in_chans=1)


def capture_inputs(model, names):
    """Pre-hooks registered after channel_dropout's see the masked consumer inputs."""
    seen, handles = {}, []
    for name in names:
        def hook(module, args, name=name):
            seen[name] = args[0].detach().clone()
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    return seen, handles


def all_hooks(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("p", [0.25, 0.5])
def test_mlp_drops_a_fraction_p_of_units_and_rescales(p):
    torch.manual_seed(0)
    model, x = sigmoid_mlp().train(), torch.randn(512, 16)
    handle = channel_dropout(model, p, example_input=x[:1])
    assert set(handle.consumers) == {"2", "4"}
    seen, _ = capture_inputs(model, ["2", "4"])
    act = {}
    model[1].register_forward_hook(lambda m, a, out: act.__setitem__("h1", out.detach()))
    model(x)
    got = seen["2"]
    dropped = got == 0
    assert abs(dropped.float().mean().item() - p) < 0.03
    assert abs((seen["4"] == 0).float().mean().item() - p) < 0.03
    torch.testing.assert_close(got[~dropped], act["h1"][~dropped] / (1 - p))


def test_cnn_drops_whole_channels_and_whole_flattened_blocks():
    torch.manual_seed(0)
    model, x = sigmoid_cnn().train(), torch.randn(64, 1, 8, 8)
    channel_dropout(model, 0.5, example_input=x[:1])
    seen, _ = capture_inputs(model, ["2", "6"])
    model(x)
    planes = seen["2"].flatten(2)  # [N, 32, H*W]
    zero_planes = (planes == 0).all(-1)
    assert torch.equal(zero_planes, (planes == 0).any(-1))  # never part of a channel
    assert 0.4 < zero_planes.float().mean().item() < 0.6
    blocks = seen["6"].view(64, 16, 36)
    assert torch.equal((blocks == 0).all(-1), (blocks == 0).any(-1))
    assert 0.4 < (blocks == 0).all(-1).float().mean().item() < 0.6


def test_one_mask_per_group_shared_by_its_consumers():
    torch.manual_seed(0)
    model, x = tiny_effnet().train(), torch.randn(8, 1, 16, 16)
    handle = channel_dropout(model, 0.5, example_input=x[:1])
    se, pwl = "blocks.3.0.se.conv_reduce", "blocks.3.0.conv_pwl"
    assert "blocks.3.0.conv_dw" not in handle.consumers  # depthwise: inside the unit
    seen, _ = capture_inputs(model, [se, pwl])
    model(x)
    assert torch.equal(seen[se].flatten(1) == 0, (seen[pwl] == 0).flatten(2).all(-1))
    assert (seen[se] == 0).any()


def test_residual_stream_mask_is_shared():
    torch.manual_seed(0)
    model, x = tiny_resnet().train(), torch.randn(8, 1, 16, 16)
    channel_dropout(model, 0.5, example_input=x[:1])
    a, b = "layer2.0.conv1", "layer2.0.downsample.1"  # both read the stage-1 stream
    seen, _ = capture_inputs(model, [a, b])
    model(x)
    za, zb = ((seen[n] == 0).flatten(2).all(-1) for n in (a, b))
    assert torch.equal(za, zb) and za.float().mean() > 0.3


@pytest.mark.parametrize("factory, shape", [
    (sigmoid_mlp, (4, 16)), (sigmoid_cnn, (4, 1, 8, 8)), (tiny_resnet, (4, 1, 16, 16)),
    (tiny_effnet, (4, 1, 16, 16))])
def test_train_differs_eval_identical_and_remove_restores(factory, shape):
    torch.manual_seed(0)
    model, x = factory(), torch.randn(*shape)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks_before = all_hooks(model)

    def outputs():  # train mode updates BN statistics: reload before each pass
        model.load_state_dict(state)
        torch.manual_seed(1)
        train = model.train()(x).detach()
        model.load_state_dict(state)
        return train, model.eval()(x).detach()

    plain_train, plain_eval = outputs()
    handle = channel_dropout(model.train(), 0.5, example_input=x[:1])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(m.training for m in model.modules())  # tracing restored the mode flags
    hooked_train, hooked_eval = outputs()
    assert not torch.allclose(hooked_train, plain_train)
    assert torch.equal(hooked_eval, plain_eval)
    model.train()
    model(x).sum().backward()  # masks are differentiable multiplications
    handle.remove()
    handle.remove()  # idempotent
    assert all_hooks(model) == hooks_before
    again_train, again_eval = outputs()
    assert torch.equal(again_train, plain_train) and torch.equal(again_eval, plain_eval)
    assert model.state_dict().keys() == state.keys()


def test_p_zero_is_a_no_op_and_context_manager_removes():
    torch.manual_seed(0)
    model, x = sigmoid_mlp().train(), torch.randn(8, 16)
    torch.manual_seed(3)
    ref = model(x)
    with channel_dropout(model, 0.0, example_input=x[:1]):
        torch.manual_seed(3)
        assert torch.equal(model(x), ref)
    assert all_hooks(model) == 0


def test_groups_restrict_what_is_dropped():
    model, x = sigmoid_mlp().train(), torch.randn(256, 16)
    graph = build_unit_graph(model, x[:1])
    only_top = UnitGraph([graph.group("2")], graph.classifier)
    handle = channel_dropout(model, 0.5, graph=only_top)
    assert set(handle.consumers) == {"4"}
    seen, _ = capture_inputs(model, ["2", "4"])
    model(x)
    assert (seen["2"] > 0).all() and (seen["4"] == 0).any()


def test_groups_is_not_a_keyword():
    model, x = sigmoid_mlp().train(), torch.randn(8, 16)
    with pytest.raises(TypeError, match="groups"):
        channel_dropout(model, 0.5, example_input=x, groups=None)


@pytest.mark.parametrize("p", [1.0, 1.5, -0.1, "0.5", True, float("nan")])
def test_bad_p(p):
    with pytest.raises(BadOptionError, match=r"p=") as info:
        channel_dropout(sigmoid_mlp(), p, example_input=torch.randn(1, 16))
    assert info.value.option == "p"


def test_an_input_that_cannot_be_guessed_is_a_clear_error():
    from mcensemble.errors import DataSpecError
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(DataSpecError, match="cannot guess an input shape"):
        channel_dropout(model, 0.5)
    assert channel_dropout(model, 0.5, example_input=torch.zeros(1, 3, dtype=torch.long)).consumers


# moved from test_review_fixes.py


def test_channel_dropout_handle_leaves_no_hook_when_it_fails():
    from types import SimpleNamespace

    from mcensemble.hooks import ChannelDropoutHandle
    from mcensemble.errors import UnitGraphError

    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.LayerNorm(6))

    def ref(module):
        return SimpleNamespace(axis=1, module=module, tensor=f"{module}.weight", block=1, offset=0)

    group = SimpleNamespace(name="g", size=6, refs=lambda role: [ref("2"), ref("3")])
    with pytest.raises(UnitGraphError, match="LayerNorm"):
        ChannelDropoutHandle(model, SimpleNamespace(groups=[group]), 0.5)
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_channel_dropout_guesses_an_input_as_the_readme_calls_it():
    """`mcensemble.hooks.channel_dropout(model, p)`, as the README shows it: the input is
    guessed from the model (as align does), in eval mode, BatchNorm statistics untouched."""
    import mcensemble
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 10)).train()
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    handle = mcensemble.hooks.channel_dropout(model, 0.5)
    assert model.training and all(torch.equal(v, stats[k]) for k, v in model.state_dict().items())
    explicit = channel_dropout(model, 0.5, example_input=torch.randn(1, 1, 8, 8))
    assert set(handle.consumers) == set(explicit.consumers) == {"3", "7"}
    handle.remove()
    explicit.remove()
