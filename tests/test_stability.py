"""Dropout stability: D_k networks, BN re-estimation of the affected units only, the
choice of kept halves, the result's JSON form."""
from __future__ import annotations

import json

import pytest
import torch

from mcensemble import zoo  # noqa: F401  (registers mce_* with timm)
from mcensemble.errors import BadOptionError
from mcensemble.evaluate import evaluate
from mcensemble.stability import (dropout_network, dropout_stability, dropout_state, graph_for)

from helpers import clone_state, small_eval_loader, train_small


def train(arch: str, epochs: int, seed: int = 0, **kwargs):
    net = train_small(arch, epochs, seed, **kwargs)
    return net.eval(), clone_state(net)


@pytest.fixture(scope="module")
def mlp():
    return train("mce_digits_mlp", 20, width=32, drop_rate=0.3)


@pytest.fixture(scope="module")
def cnn():
    return train("mce_digits_cnn", 6, widths=(6, 8))


def test_result_shape_and_json(mlp):
    model, sd = mlp
    res = dropout_stability(model, sd, small_eval_loader(), search_steps=8)
    d = json.loads(json.dumps(res.to_dict()))
    assert set(d) == {"eps", "base_loss", "depths", "kept", "search"}
    assert [r["depth"] for r in d["depths"]] == [1, 2]
    s = d["search"]
    assert s["steps"] == 8 and s["examples"] == 500 and 0 < s["trials"] <= 16 and 0 <= s["accepted"] <= s["trials"]
    assert s["objective_end"] <= s["objective_start"]
    assert d["eps"] >= 0 and d["eps"] == pytest.approx(max(0, *(r["increase"] for r in d["depths"])))
    for r in d["depths"]:
        assert r["increase"] == pytest.approx(r["loss"] - d["base_loss"])
    assert {k: len(v) for k, v in d["kept"].items()} == {"layers.1": 16, "layers.4": 16}
    assert d["base_loss"] == pytest.approx(evaluate(model, small_eval_loader()).loss)


def test_depth_losses_are_dropout_networks(mlp):
    model, sd = mlp
    res = dropout_stability(model, sd, small_eval_loader(), search_steps=0)
    g = res.graph
    for row in res.depths:
        k = row["depth"]
        d = dropout_state(sd, g, res.kept, k)
        model.load_state_dict(d)
        assert evaluate(model, small_eval_loader()).loss == pytest.approx(row["loss"], rel=1e-5)
    # the classifier of D_2 reads the kept units doubled, the others not at all
    d2 = dropout_state(sd, g, res.kept, 2)
    kept = res.kept["layers.4"]
    drop = sorted(set(range(32)) - set(kept))
    assert torch.equal(d2["head.weight"][:, kept], 2 * sd["head.weight"][:, kept])
    assert torch.count_nonzero(d2["head.weight"][:, drop]) == 0
    assert d2["layers.4.weight"] is sd["layers.4.weight"]  # untouched tensors shared
    model.load_state_dict(sd)


def _bits(sd):
    return {k: v.view(torch.uint8) if v.is_floating_point() else v for k, v in sd.items()}


def test_dropout_state_incremental_form_equals_a_full_call(cnn):
    """`base=` / `only=` (the short path's search) recompute one group's reader tensors and
    give what a full call gives, bit for bit, -0.0 entries set to +0 included."""
    model, sd = cnn
    sd = {k: v.clone() for k, v in sd.items()}
    g = graph_for(model, small_eval_loader())
    last = [(r, r.indices([grp.size - 1])) for grp in g.groups for r in grp.refs("consumer")]
    for r, idx in last:  # the last unit (dropped below) read with -0.0 weights
        sd[r.tensor].movedim(r.axis, 0)[idx] = -0.0
    kept = {grp.name: list(range(grp.size // 2)) for grp in g.groups}
    base = dropout_state(sd, g, kept, 1)
    for r, idx in last:
        col = base[r.tensor].movedim(r.axis, 0)[idx]
        assert not bool(torch.signbit(col).any()) and not bool(col.any())  # +0.0, not -0.0
    for grp in g.groups:
        new = dict(kept)
        new[grp.name] = list(range(grp.size - grp.size // 2, grp.size))
        full = dropout_state(sd, g, new, 1)
        inc = dropout_state(sd, g, new, 1, base=base, only={r.tensor for r in grp.refs("consumer")})
        assert set(inc) == set(full) and all(torch.equal(_bits(inc)[k], _bits(full)[k]) for k in full)
        assert not all(torch.equal(_bits(base)[k], _bits(full)[k]) for k in full)  # the group did change


def test_search_lowers_dropout_loss(mlp):
    model, sd = mlp
    ld = small_eval_loader()
    plain = dropout_stability(model, sd, ld, search_steps=0)
    searched = dropout_stability(model, sd, ld, search_steps=48, search_examples=500)
    assert searched.depths[0]["loss"] <= plain.depths[0]["loss"] + 1e-6


def test_chosen_halves_beat_random_halves(mlp):
    model, sd = mlp
    ld = small_eval_loader()
    chosen = dropout_stability(model, sd, ld, search_steps=16)
    gen = torch.Generator().manual_seed(0)
    def random_halves():
        return {g.name: torch.randperm(g.size, generator=gen)[:g.size // 2].tolist()
                for g in chosen.graph.groups}
    rand = [dropout_stability(model, sd, ld, kept=random_halves()).eps for _ in range(3)]
    assert chosen.eps <= min(rand) + 1e-6


def test_bn_statistics_only_of_affected_units(cnn):
    model, sd = cnn
    ld = small_eval_loader()
    res = dropout_stability(model, sd, ld, search_steps=4)
    g = res.graph
    assert res.depths[-1]["loss"] >= 0
    d1, stats1 = dropout_network(model, sd, g, res.kept, 1, bn_loader=ld)
    # depth-1 units keep their statistics; depth-2 units' inputs changed: re-estimated
    assert torch.equal(d1["features.1.running_mean"], sd["features.1.running_mean"])
    assert not torch.equal(d1["features.5.running_mean"], sd["features.5.running_mean"])
    assert set(stats1) == {"features.5.running_mean", "features.5.running_var",
                           "features.5.num_batches_tracked"}
    d2, stats2 = dropout_network(model, sd, g, res.kept, 2, bn_loader=ld)
    assert stats2 == {}
    # the head reads each channel as a block of 2x2 columns
    kept = res.kept["features.4"]
    dropped = sorted(set(range(8)) - set(kept))
    cols = torch.tensor([4 * c + i for c in dropped for i in range(4)])
    assert torch.count_nonzero(d2["head.weight"][:, cols]) == 0
    # the re-estimated statistics are what the result reports
    model.load_state_dict(d1)
    assert evaluate(model, ld).loss == pytest.approx(res.depths[0]["loss"], rel=1e-5)
    model.load_state_dict(sd)


def test_bad_kept_refused(mlp):
    model, sd = mlp
    with pytest.raises(BadOptionError, match="layers.1"):
        dropout_stability(model, sd, small_eval_loader(), kept={"layers.1": [0, 1], "layers.4": list(range(16))})
    with pytest.raises(BadOptionError):
        dropout_stability(model, sd, small_eval_loader(), search_steps=-1)


def test_model_not_changed(mlp):
    model, sd = mlp
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph_for(model, small_eval_loader())
    dropout_stability(model, sd, small_eval_loader(), search_steps=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _reference_search(model, sd, ld, steps, examples, seed=0):
    """The kept-half search written out plainly: every D_k in full on every trial."""
    import copy
    import torch.nn.functional as F
    from mcensemble.stability import (_bn_modules, _importance, _subset, default_kept, swap_trial)
    work = copy.deepcopy(model).eval()
    graph = graph_for(work, ld)
    x, y = _subset(ld, examples)
    scores = _importance(work, sd, graph, x)
    kept = {g.name: default_kept(g, scores[g.name]) for g in graph.groups}
    mods = dict(work.named_modules())

    def loss(k):
        work.load_state_dict(dropout_state(sd, graph, kept, k))
        bn = [mods[n] for n in _bn_modules(work, graph, k + 1)]
        for m in bn:
            m.train()
        with torch.no_grad():
            out = float(F.cross_entropy(work(x), y))
        for m in bn:
            m.eval()
        return out

    def objective(depth):
        ls = [loss(k) for k in graph.depths if k <= depth]
        return max(ls) + 1e-3 * sum(ls)

    gen = torch.Generator().manual_seed(seed)
    for g in sorted(graph.groups, key=lambda g: -g.depth):
        best = objective(g.depth)
        for _ in range(steps):
            old = kept[g.name]
            kept[g.name] = swap_trial(g.size, old, scores[g.name], gen)
            val = objective(g.depth)
            if val < best - 1e-7:
                best = val
            else:
                kept[g.name] = old
    return kept


@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_fast_search_makes_the_plain_searchs_choices(which, request):
    """Partial forwards, incremental D_k and skipped depths change the cost, not the choice."""
    model, sd = request.getfixturevalue(which)
    ld = small_eval_loader()
    res = dropout_stability(model, sd, ld, search_steps=6, search_examples=200, search_patience=None,
                            search_guided=False)
    assert res.kept == _reference_search(model, sd, ld, 6, 200)
    assert res.search["trials"] == 6 * len(res.kept) and res.search["accepted"] > 0


def test_patience_stops_a_groups_trials(mlp):
    model, sd = mlp
    res = dropout_stability(model, sd, small_eval_loader(), search_steps=40, search_patience=2)
    s = res.search
    assert s["trials"] < 2 * 40 and s["patience"] == 2
    with pytest.raises(BadOptionError, match="search_patience"):
        dropout_stability(model, sd, small_eval_loader(), search_steps=4, search_patience=0)


def test_only_the_asked_depths_are_measured(cnn):
    model, sd = cnn
    full = dropout_stability(model, sd, small_eval_loader(), search_steps=0)
    low = dropout_stability(model, sd, small_eval_loader(), search_steps=0, depths=[1])
    assert [r["depth"] for r in low.depths] == [1] and set(low.bn_stats) == {1}
    assert low.depths[0]["loss"] == pytest.approx(full.depths[0]["loss"], rel=1e-6)
    with pytest.raises(BadOptionError, match="depths"):
        dropout_stability(model, sd, small_eval_loader(), search_steps=0, depths=[7])


@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_family_pass_measures_what_one_at_a_time_does(which, request, monkeypatch):
    """Every D_k in one pass over the data (`_partial.Family`: the part below depth k run
    once, by the base) gives the losses and BatchNorm statistics of one pass per D_k."""
    import mcensemble.stability as st
    model, sd = request.getfixturevalue(which)
    ld = small_eval_loader()
    bn = [next(iter(ld))]  # a different BatchNorm loader: one batch
    got = dropout_stability(model, sd, ld, search_steps=2, bn_loader=bn)
    monkeypatch.setattr(st, "FAMILY_BYTES", -1)  # every D_k alone, full passes
    want = dropout_stability(model, sd, ld, search_steps=2, bn_loader=bn)
    assert got.kept == want.kept
    assert got.base_loss == pytest.approx(want.base_loss, rel=1e-6)
    for g, w in zip(got.depths, want.depths):
        assert g["depth"] == w["depth"] and g["loss"] == pytest.approx(w["loss"], rel=1e-5)
    assert got.bn_stats.keys() == want.bn_stats.keys()
    for k in want.bn_stats:
        assert got.bn_stats[k].keys() == want.bn_stats[k].keys()
        for name, t in want.bn_stats[k].items():
            torch.testing.assert_close(got.bn_stats[k][name], t, rtol=1e-5, atol=1e-6)
    if which == "cnn":
        assert any(want.bn_stats.values())  # BatchNorm statistics were compared, not only losses


@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_unit_gradients_are_the_loss_slope_in_each_units_multiplier(which, request):
    """`_DepthSearch.unit_gradients`: dL/dm_u (m_u scales unit u's consumer columns of the
    worst D_k) matches a central difference of the loss of that D_k, on the search data."""
    import copy
    from mcensemble.stability import _DepthSearch, _subset, default_kept
    model, sd = request.getfixturevalue(which)
    ld = small_eval_loader()
    work = copy.deepcopy(model).eval()
    graph = graph_for(work, ld)
    x, y = _subset(ld, 200)
    kept = {g.name: default_kept(g) for g in graph.groups}
    search = _DepthSearch(work, sd, graph, kept, x, y)
    g = min(graph.groups, key=lambda g: g.depth)  # its consumers reach the most
    grad = search.unit_gradients(g)
    k = max((k for k in graph.depths if k <= g.depth), key=lambda k: search.losses[k])
    base = search.dropped[k]

    def loss_with(u, h):  # D_k with unit u's consumer columns scaled by (m_u + h) / m_u
        st = dict(base)
        for r in g.refs("consumer"):
            t = sd[r.tensor].clone().movedim(r.axis, 0)
            m = torch.zeros(t.shape[0], dtype=t.dtype)
            m[r.indices(kept[g.name])] = 2
            m[r.indices([u])] += h
            shape = [-1] + [1] * (t.dim() - 1)
            st[r.tensor] = (t * m.reshape(shape)).movedim(0, r.axis).contiguous()
        return search._loss(k, st)

    h = 1e-2
    for u in (kept[g.name][0], next(v for v in range(g.size) if v not in kept[g.name])):
        fd = (loss_with(u, h) - loss_with(u, -h)) / (2 * h)
        assert fd == pytest.approx(float(grad[u]), rel=0.05, abs=2e-4), (u, fd, float(grad[u]))


def test_guided_search_stops_and_reports(mlp):
    model, sd = mlp
    res = dropout_stability(model, sd, small_eval_loader(), search_steps=40, search_patience=3)
    s = res.search
    assert s["order"] == "guided" and s["gradients"] >= len(res.kept) and s["accepted"] > 0
    assert s["objective_end"] < s["objective_start"]
    assert s["trials"] < 40 * len(res.kept)  # a group stops after 3 rejections in a row


def test_frontiers_one_group_at_a_time_above_the_memory_budget(cnn, monkeypatch):
    """Over `FRONTIER_BYTES` the search takes each group's frontiers when it gets to it (and
    drops them after): the same choices as keeping them all from the first passes."""
    import mcensemble.stability as st
    model, sd = cnn
    ld = small_eval_loader()
    want = dropout_stability(model, sd, ld, search_steps=6, search_examples=200)
    monkeypatch.setattr(st, "FRONTIER_BYTES", 0)
    got = dropout_stability(model, sd, ld, search_steps=6, search_examples=200)
    assert got.kept == want.kept and got.search["trials"] == want.search["trials"]
    assert got.search["accepted"] > 0


def test_an_empty_batchnorm_loader_is_a_clear_error(cnn):
    from mcensemble.errors import DataSpecError
    model, sd = cnn
    with pytest.raises(DataSpecError, match="BatchNorm data loader yielded no batches; give a non-empty"):
        dropout_stability(model, sd, small_eval_loader(), search_steps=0, bn_loader=[])
