"""Unit graph: derived groups must be exact (permutation invariance, silencing by consumers)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from mcensemble.errors import BadOptionError, MCEnsembleError
from mcensemble.units import (
    AxisRef, UnitGraph, UnitGraphError, UnitGroup, build_unit_graph, permute_state_dict,
)

from helpers import randomized_case, timm_factory


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 24),
                         nn.ReLU(), nn.Linear(24, 10))


def bn_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(12 * 4 * 4, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 10))


class CatNet(nn.Module):
    """Concatenation along channels, a functional residual and a per-channel scale."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 6, 3, padding=1)
        self.mix = nn.Conv2d(10, 10, 1)
        self.scale = nn.Parameter(torch.rand(10) + 0.5)
        self.fc = nn.Linear(20 * 8 * 8, 5)

    def forward(self, x):
        h = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1)
        h = h * self.scale.view(1, -1, 1, 1)
        h = h + torch.sigmoid(h)
        return self.fc(torch.flatten(torch.cat([torch.relu(self.mix(h)), h], 1), 1))


class TinyViT(nn.Module):
    """Rows of the image as tokens; a class token, position embeddings, fused qkv split
    into heads (reshape / permute / unbind), attention written out (q @ k^T, a per-head
    bias table, softmax, @ v), layer scale, a gated MLP (chunk) and class-token pooling."""

    def __init__(self, dim=16, heads=2, tokens=8):
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(8, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim))
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.bias_table = nn.Parameter(torch.randn(heads, tokens + 1, tokens + 1))
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * 12), nn.Linear(12, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.embed(x.flatten(1, 2))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1) * 0.5 + self.bias_table.unsqueeze(0)).softmax(dim=-1)
        x = x + self.gamma * self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
        a, g = self.fc1(x).chunk(2, dim=-1)
        x = x + self.fc2(a * torch.sigmoid(g))
        return self.head(x[:, 0])


class GroupNet(nn.Module):
    """GroupNorm (within groups), a grouped convolution and a softmax over channels."""

    def __init__(self):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(4, 8)
        self.c2, self.n2 = nn.Conv2d(8, 12, 3, padding=1, groups=2), nn.GroupNorm(3, 12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        h = torch.relu(self.n1(self.c1(x)))
        h = torch.softmax(self.n2(self.c2(h)), dim=1)
        return self.fc(h.mean((2, 3)))


CASES = {  # name -> (factory, input size)
    "mlp": (mlp, 8), "bn_cnn": (bn_cnn, 16), "catnet": (CatNet, 8),
    "test_resnet": (timm_factory("test_resnet"), 16), "resnet10t": (timm_factory("resnet10t"), 32),
    "test_efficientnet": (timm_factory("test_efficientnet"), 16),
    "test_convnext": (timm_factory("test_convnext"), 32),
    "tiny_vit": (TinyViT, 8), "group_net": (GroupNet, 8),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    model, x, graph = randomized_case(*CASES[request.param], 3)
    return request.param, model, x, graph


def run(model, state, x):
    return torch.func.functional_call(model, state, (x,))


def test_permuting_every_group_keeps_the_output(case):
    name, model, x, graph = case
    state = model.state_dict()
    g = torch.Generator().manual_seed(1)
    perms = {grp.name: torch.randperm(grp.size, generator=g) for grp in graph.groups}
    permuted = permute_state_dict(state, graph, perms)
    changed = [k for k in state if not torch.equal(state[k], permuted[k])]
    assert len(changed) > len(graph.groups)  # the test really moved weights
    with torch.no_grad():
        torch.testing.assert_close(run(model, permuted, x), run(model, state, x),
                                   atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("drop_role", ["bn", "consumer"])
def test_permutation_check_catches_a_missing_member(case, drop_role):
    """The invariance test can fail: leave out one kind of member and the output moves."""
    name, model, x, graph = case
    target = next((grp for grp in graph.groups if grp.refs(drop_role) and grp.size > 1), None)
    if target is None:
        pytest.skip(f"{name} has no {drop_role} members")
    broken = UnitGroup(target.name, target.size,
                       [r for r in target.members if r.role != drop_role], target.depth)
    perm = torch.roll(torch.arange(target.size), 1)
    permuted = permute_state_dict(model.state_dict(), UnitGraph([broken]), {target.name: perm})
    with torch.no_grad():
        assert not torch.allclose(run(model, permuted, x), run(model, model.state_dict(), x),
                                  atol=1e-4)


def test_zeroed_consumers_silence_a_unit(case):
    name, model, x, graph = case
    if name in ("test_convnext", "group_net"):
        pytest.skip("LayerNorm / GroupNorm / softmax over channels couple units through statistics")
    state = model.state_dict()
    g = torch.Generator().manual_seed(2)
    for grp in graph.groups:
        unit = int(torch.randint(grp.size, (1,), generator=g))
        silenced = dict(state)
        for r in grp.refs("consumer"):
            t = silenced[r.tensor].clone()
            t.index_fill_(r.axis, r.indices([unit]), 0.0)
            silenced[r.tensor] = t
        noisy = dict(silenced)
        for r in grp.refs("producer", "depthwise", "bn"):
            t = noisy[r.tensor].clone()
            idx = r.indices([unit])
            noise = torch.rand if r.tensor.endswith("running_var") else torch.randn
            t.index_copy_(r.axis, idx, noise(t.index_select(r.axis, idx).shape, generator=g) + 0.5)
            noisy[r.tensor] = t
        with torch.no_grad():
            torch.testing.assert_close(run(model, noisy, x), run(model, silenced, x),
                                       atol=2e-5, rtol=1e-4, msg=f"group {grp.name}")


def test_mlp_graph_layout():
    graph = build_unit_graph(mlp(), torch.randn(1, 1, 8, 8))
    assert [(g.name, g.size, g.depth) for g in graph.groups] == [("1", 32, 1), ("3", 24, 2)]
    assert graph.depths == [1, 2] and graph.classifier == ["5.weight", "5.bias"]
    assert graph.groups[0].members == [
        AxisRef("1.weight", 0, "producer"), AxisRef("1.bias", 0, "producer"),
        AxisRef("3.weight", 1, "consumer")]
    assert graph.groups[1].consumers == ["5"]


def test_flatten_gives_channel_blocks_and_bn_members():
    graph = build_unit_graph(bn_cnn(), torch.randn(1, 1, 16, 16))
    top_conv = graph.group("4")
    assert top_conv.depth == 2 and top_conv.size == 12
    assert AxisRef("9.weight", 1, "consumer", block=16) in top_conv.members
    assert {r.tensor for r in top_conv.refs("bn")} == {
        "5.weight", "5.bias", "5.running_mean", "5.running_var"}
    assert graph.group("9").consumers == ["12"] and graph.classifier == ["12.weight", "12.bias"]


def test_concat_gives_offsets():
    graph = build_unit_graph(CatNet(), torch.randn(1, 1, 8, 8))
    b = graph.group("b")
    assert AxisRef("mix.weight", 1, "consumer", offset=4) in b.members
    assert AxisRef("fc.weight", 1, "consumer", block=64, offset=14 * 64) in b.members
    assert AxisRef("scale", 0, "bn", offset=4) in b.members
    assert AxisRef("fc.weight", 1, "consumer", block=64) in graph.group("mix").members


def test_residual_streams_merge_into_one_group_per_stage():
    model = timm_factory("resnet18")()
    graph = build_unit_graph(model, torch.randn(1, 1, 32, 32))
    stage4 = next(g for g in graph.groups if "fc" in g.consumers)
    assert set(stage4.producers) == {"layer4.0.conv2", "layer4.0.downsample.0", "layer4.1.conv2"}
    assert {"layer4.0.downsample.1.running_var", "layer4.1.bn2.weight"} <= {
        r.tensor for r in stage4.refs("bn")}
    assert len(graph.groups) == 12 and graph.classifier == ["fc.weight", "fc.bias"]
    assert all(g.depth >= 1 for g in graph.groups) and graph.depths == [1, 2, 3, 4, 5]


def test_efficientnet_squeeze_excite_and_depthwise():
    graph = build_unit_graph(timm_factory("test_efficientnet")(), torch.randn(1, 1, 16, 16))
    main = graph.group("blocks.3.0.conv_pw")
    assert AxisRef("blocks.3.0.conv_dw.weight", 0, "depthwise") in main.members
    assert set(main.producers) == {"blocks.3.0.conv_pw", "blocks.3.0.se.conv_expand"}
    assert set(main.consumers) == {"blocks.3.0.se.conv_reduce", "blocks.3.0.conv_pwl"}
    se = graph.group("blocks.3.0.se.conv_reduce")
    assert se.size == 8 and se.consumers == ["blocks.3.0.se.conv_expand"]
    assert se.depth == main.depth + 1 == graph.group("blocks.3.0.conv_pwl").depth


def test_dict_round_trip_and_groups_by_hand(tmp_path):
    model = bn_cnn()
    graph = build_unit_graph(model, torch.randn(1, 1, 16, 16))
    data = json.loads(json.dumps(graph.to_dict()))
    assert UnitGraph.from_dict(data) == graph
    graph.save(tmp_path / "units.json")
    assert build_unit_graph(model, graph=tmp_path / "units.json") == graph
    assert build_unit_graph(model, graph=data) == graph
    assert "depth" in graph.describe() and "axis 1, block 16" in graph.describe(verbose=True)
    with pytest.raises(TypeError, match="groups"):
        build_unit_graph(model, groups=data)     # one name per keyword: graph=


@pytest.mark.parametrize("bad, match", [
    ({"groups": [{"name": "g", "size": 4, "members": [{"tensor": "nope.weight", "axis": 0}]}]},
     "nope.weight"),
    ({"groups": [{"name": "g", "size": 99, "members": [{"tensor": "1.weight", "axis": 0}]}]},
     "does not fit axis 0 of '1.weight'"),
    ({"groups": [{"name": "g", "size": 4, "members": [{"tensor": "1.weight", "axis": 0,
                                                        "role": "boss"}]}]}, "role"),
    ({"groups": "x"}, "'groups' list"),
])
def test_bad_hand_written_groups(bad, match):
    with pytest.raises(UnitGraphError, match=match):
        build_unit_graph(mlp(), graph=bad)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = self.fc1(x)
        if h.sum() > 0:
            h = h * 2
        return self.fc2(h)


class Unplaceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(torch.cumsum(self.fc1(x), dim=1))


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Unplaceable()

    def forward(self, x):
        return self.inner(x)


class Rolled(nn.Module):
    """A fixed shift of the hidden units: no permutation of them commutes with it."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(torch.roll(self.fc1(x), 1, dims=1))


class Strided(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(self.fc1(x)[:, ::2])


class Hyper(nn.Module):
    """A weight computed from the input (a hypernetwork)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(4, 16)

    def forward(self, x):
        return torch.nn.functional.linear(self.fc1(x), self.fc2(x).mean(0).view(2, 8))


@pytest.mark.parametrize("model, match", [
    (Untraceable(), r"cannot trace Untraceable.*graph="),
    (Rolled(), r"cannot place op roll .*it rolls the units' axis"),
    (Strided(), r"cannot place op getitem .*strided slice of the units' axis"),
    (Hyper(), r"cannot place op linear .*computed from hidden units"),
    (Nested(), r"cannot place op cumsum \(node 'cumsum', module 'inner'\)"),
    (Unplaceable(), r"cannot place op cumsum \(node 'cumsum', module '<root>'\).*graph="),
])
def test_errors_name_the_op_and_point_to_groups(model, match):
    with pytest.raises(UnitGraphError, match=match) as info:
        build_unit_graph(model, torch.randn(1, 4))
    assert isinstance(info.value, MCEnsembleError)


def test_example_input_required_and_training_flags_restored():
    model = bn_cnn().train()
    with pytest.raises(BadOptionError, match="example_input"):
        build_unit_graph(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    build_unit_graph(model, torch.randn(2, 1, 16, 16))
    assert all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
