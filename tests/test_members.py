"""mcensemble.members: the global t over joined paths, uniform points, greedy selection,
candidate evaluation (BN re-estimated per point) and the mean-probability metrics."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mcensemble.bn import update_bn
from mcensemble.errors import BadOptionError
from mcensemble.evaluate import Metrics
from mcensemble.members import (Candidate, candidate_state, ensemble_metrics, evaluate_candidates, global_to_local,
                                predict_log_probs, select_greedy_nll, uniform_points)
from mcensemble.paths import LinearPath


# ----------------------------------------------------------------------------- global t
@pytest.mark.parametrize("u, n_paths, want", [
    (0.0, 1, (0, 0.0)),
    (1.0, 1, (0, 1.0)),
    (0.3, 1, (0, 0.3)),
    (0.25, 2, (0, 0.5)),
    (0.5, 2, (1, 0.0)),   # a shared end belongs to the later path, at its start
    (1.0, 2, (1, 1.0)),   # the last end stays on the last path
    (0.75, 2, (1, 0.5)),
    (1.0, 3, (2, 1.0)),
    (0.5, 3, (1, 0.5)),
])
def test_global_to_local(u, n_paths, want):
    p, t = global_to_local(u, n_paths)
    assert p == want[0]
    assert t == pytest.approx(want[1], abs=1e-12)
    assert 0.0 <= t <= 1.0
    assert (p + t) / n_paths == pytest.approx(u, abs=1e-12)  # and back


@pytest.mark.parametrize("u", [-0.01, 1.01, float("nan"), float("inf")])
def test_global_to_local_refuses_outside(u):
    with pytest.raises(BadOptionError, match=r"outside \[0, 1\]"):
        global_to_local(u, 2)


def test_global_to_local_dense_grid_is_monotone():
    prev = -1.0
    for i in range(301):
        p, t = global_to_local(i / 300, 3)
        assert 0 <= p < 3 and 0.0 <= t <= 1.0
        assert p + t >= prev - 1e-12
        prev = p + t


# ----------------------------------------------------------------------------- uniform points
def test_uniform_points_single_member_sits_in_the_middle():
    assert uniform_points(1) == [(0, 0.5, 0.5)]
    # over two paths, u = 0.5 is the shared middle checkpoint: the start of path 1
    assert uniform_points(1, 2) == [(1, 0.0, 0.5)]


@pytest.mark.parametrize("k", [2, 3, 5])
def test_uniform_points_include_both_ends(k):
    pts = uniform_points(k)
    assert len(pts) == k
    assert pts[0] == (0, 0.0, 0.0) and pts[-1] == (0, 1.0, 1.0)
    us = [u for _, _, u in pts]
    gaps = [b - a for a, b in zip(us, us[1:])]
    assert all(g == pytest.approx(1 / (k - 1)) for g in gaps)
    assert all(t == pytest.approx(u) for _, t, u in pts)


def test_uniform_points_over_joined_paths():
    pts = uniform_points(5, 2)
    assert [(p, round(t, 9)) for p, t, _ in pts] == [(0, 0.0), (0, 0.5), (1, 0.0), (1, 0.5), (1, 1.0)]


@pytest.mark.parametrize("k", [0, -3])
def test_uniform_points_refuses_no_members(k):
    with pytest.raises(BadOptionError, match="members must be an integer >= 1") as info:
        uniform_points(k)
    assert info.value.option == "members"


# ----------------------------------------------------------------------------- greedy selection
def _cand(i: int, log_probs: torch.Tensor) -> Candidate:
    return Candidate(path=0, t=i / 10, u=i / 10, val_log_probs=log_probs)


def _log_probs(correct: list[float], n_classes: int = 3) -> torch.Tensor:
    """Per example: probability `c` on the true class (label 0), the rest spread evenly."""
    rows = [[c] + [(1 - c) / (n_classes - 1)] * (n_classes - 1) for c in correct]
    return torch.tensor(rows).log()


def _nll(members: list[Candidate], labels: torch.Tensor) -> float:
    return ensemble_metrics([c.val_log_probs for c in members], labels).nll


def test_greedy_picks_the_best_single_candidate_first():
    labels = torch.zeros(4, dtype=torch.long)
    cands = [_cand(i, _log_probs([c] * 4)) for i, c in enumerate([0.3, 0.5, 0.9, 0.6])]
    assert select_greedy_nll(cands, 1, labels) == [2]


def test_greedy_never_repeats_even_when_repeating_would_win():
    # candidate 0 is far better than the rest: a selection with replacement would take it K times
    labels = torch.zeros(4, dtype=torch.long)
    cands = [_cand(i, _log_probs([c] * 4)) for i, c in enumerate([0.95, 0.2, 0.3, 0.25])]
    chosen = select_greedy_nll(cands, 4, labels)
    assert sorted(chosen) == [0, 1, 2, 3]
    assert chosen == [0, 2, 3, 1]  # then by how little each one hurts


def test_greedy_prefers_the_complementary_candidate_over_the_second_best_single():
    labels = torch.zeros(4, dtype=torch.long)
    a = _log_probs([0.95, 0.95, 0.2, 0.2])      # best single
    b = _log_probs([0.93, 0.93, 0.2, 0.2])      # second best single, makes the same mistakes
    c = _log_probs([0.05, 0.05, 0.8, 0.8])      # much worse alone, right where a is wrong
    cands = [_cand(0, a), _cand(1, b), _cand(2, c)]
    singles = [_nll([x], labels) for x in cands]
    assert singles.index(min(singles)) == 0 and singles[1] < singles[2]
    chosen = select_greedy_nll(cands, 2, labels)
    assert chosen == [0, 2]
    assert _nll([cands[0], cands[2]], labels) < _nll([cands[0], cands[1]], labels)


def test_greedy_each_step_is_the_lowest_ensemble_nll():
    torch.manual_seed(0)
    labels = torch.randint(0, 5, (40,))
    cands = [_cand(i, F.log_softmax(torch.randn(40, 5) * 2, dim=-1)) for i in range(7)]
    chosen = select_greedy_nll(cands, 4, labels)
    assert len(set(chosen)) == 4
    for step in range(1, 5):
        best = min((i for i in range(7) if i not in chosen[:step - 1]),
                   key=lambda i: _nll([cands[j] for j in chosen[:step - 1]] + [cands[i]], labels))
        assert chosen[step - 1] == best


def test_greedy_ties_go_to_the_earlier_candidate():
    labels = torch.zeros(3, dtype=torch.long)
    same = _log_probs([0.7] * 3)
    cands = [_cand(0, _log_probs([0.2] * 3)), _cand(1, same), _cand(2, same.clone())]
    assert select_greedy_nll(cands, 1, labels) == [1]


def test_greedy_more_members_than_candidates():
    labels = torch.zeros(2, dtype=torch.long)
    cands = [_cand(i, _log_probs([0.5, 0.5])) for i in range(3)]
    with pytest.raises(BadOptionError, match=r"`members` 4 is more than the 3 candidate points.*`candidates`") as info:
        select_greedy_nll(cands, 4, labels)
    assert info.value.option == "members"
    with pytest.raises(BadOptionError, match=">= 1"):
        select_greedy_nll(cands, 0, labels)


def test_greedy_needs_validation_log_probs():
    cands = [_cand(0, _log_probs([0.5])), Candidate(path=0, t=1.0, u=1.0)]
    with pytest.raises(BadOptionError, match="validation log-probabilities"):
        select_greedy_nll(cands, 1, torch.zeros(1, dtype=torch.long))


# ----------------------------------------------------------------------------- metrics
def test_ensemble_metrics_is_the_log_of_the_mean_probability():
    torch.manual_seed(1)
    labels = torch.randint(0, 4, (30,))
    lps = [F.log_softmax(torch.randn(30, 4), dim=-1) for _ in range(3)]
    m = ensemble_metrics(lps, labels)
    mean = torch.stack([lp.exp() for lp in lps]).mean(0)
    assert m.nll == pytest.approx(F.nll_loss(mean.log(), labels).item(), rel=1e-5)
    assert m.loss == m.nll
    assert m.acc == pytest.approx((mean.argmax(-1) == labels).float().mean().item())
    assert m.n == 30 and 0.0 <= m.ece <= 1.0
    # one member: its own NLL
    assert ensemble_metrics(lps[:1], labels).nll == pytest.approx(F.nll_loss(lps[0], labels).item(), rel=1e-6)


def test_predict_log_probs_restores_mode_and_normalises():
    net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5))
    net.train()
    x, y = torch.randn(10, 3), torch.arange(10) % 4
    loader = [(x[:6], y[:6]), (x[6:], y[6:])]
    lp, labels = predict_log_probs(net, loader)
    assert net.training  # restored
    assert lp.shape == (10, 4) and torch.equal(labels, y)
    assert torch.allclose(lp.exp().sum(-1), torch.ones(10), atol=1e-6)
    net.eval()
    assert torch.allclose(lp, F.log_softmax(net(x), -1), atol=1e-6)  # eval mode: dropout off


# ----------------------------------------------------------------------------- candidates
def _bn_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).eval()


def _loader(seed: int, n: int = 64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g) * 2 + 1
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)]


def test_evaluate_candidates_reestimates_bn_at_every_point():
    a, b = _bn_net(0), _bn_net(1)
    path = LinearPath(a.state_dict(), b.state_dict())
    train, val = _loader(0), _loader(1, 32)
    net = _bn_net(2)
    cands = evaluate_candidates([path], net, uniform_points(3), train_loader=train, val_loader=val)
    assert [c.t for c in cands] == [0.0, 0.5, 1.0]
    for c in cands:
        assert set(c.bn_state) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
        # what update_bn gives for this point's weights
        ref = _bn_net(3)
        ref.load_state_dict(path.state_at(c.t))
        update_bn(ref, train)
        for k, v in c.bn_state.items():
            assert torch.allclose(v.float(), ref.state_dict()[k].float(), atol=1e-5), k
        assert not torch.allclose(c.bn_state["1.running_mean"], path.state_at(c.t)["1.running_mean"])
        # metrics are those of that model
        assert isinstance(c.train, Metrics) and c.train.n == 64
        assert c.val_log_probs.shape == (32, 3)
        lp, labels = predict_log_probs(ref, val)
        assert torch.allclose(c.val_log_probs, lp, atol=1e-5)
        assert c.val.nll == pytest.approx(F.nll_loss(lp, labels).item(), rel=1e-5)
    # candidate_state = the path's weights + the re-estimated buffers
    st = candidate_state(path, cands[1])
    assert set(st) == set(a.state_dict())
    assert torch.equal(st["0.weight"], path.state_at(0.5)["0.weight"])
    assert torch.equal(st["1.running_var"], cands[1].bn_state["1.running_var"])
    st["1.running_var"].add_(1)  # a copy, not the candidate's own tensor
    assert not torch.equal(st["1.running_var"], cands[1].bn_state["1.running_var"])


def test_evaluate_candidates_without_bn_or_val():
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    path = LinearPath(a.state_dict(), b.state_dict())
    cands = evaluate_candidates([path], nn.Linear(4, 3), [(0, 0.25, 0.25)], train_loader=_loader(0))
    (c,) = cands
    assert c.bn_state == {} and c.val is None and c.val_log_probs is None
    info = c.info("linear")
    assert info == {"t": 0.25, "u": 0.25, "path": 0, "kind": "linear", "train_loss": c.train.loss,
                    "train_acc": c.train.acc}
    assert math.isfinite(info["train_loss"])


# ----------------------------------------------------------------------------- selection with replacement
from mcensemble.members import check_weights, paired_bootstrap, select_members  # noqa: E402


def _random_cands(seed: int, m: int, n: int, classes: int = 5):
    """m candidates on n examples: each right on a random share of the examples, confident either way."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    cands = []
    for i in range(m):
        logits = torch.randn(n, classes, generator=g) * 2
        right = torch.rand(n, 1, generator=g) < 0.3 + 0.5 * torch.rand(1, generator=g)
        logits = logits + 4 * F.one_hot(labels, classes) * right
        cands.append(_cand(i, F.log_softmax(logits, dim=-1)))
    return cands, labels


def _chosen_nll(cands, labels, sel) -> float:
    return ensemble_metrics([cands[i].val_log_probs for i in sel.indices], labels, sel.weights).nll


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_members", [1, 2, 4])
def test_selection_never_loses_to_the_reference_on_the_selection_data(seed, max_members):
    cands, labels = _random_cands(seed, m=7, n=60 + 40 * seed)
    sel = select_members(cands, labels, max_members=max_members, endpoints=[0, 6], seed=seed)
    nll = _chosen_nll(cands, labels, sel)
    assert nll == pytest.approx(sel.nll, rel=1e-5)
    ends = _nll([cands[0], cands[6]], labels)
    if max_members >= 2:  # the reference is the two checkpoints' ensemble, and a departure keeps >= 2 members
        assert sel.reference["name"] == "the 2 checkpoints' ensemble"
        assert sel.reference["nll"] == pytest.approx(ends, rel=1e-5) and len(sel.indices) >= 2
    else:  # one member asked for: the reference is the better checkpoint
        best = min((0, 6), key=lambda i: _nll([cands[i]], labels))
        assert sel.reference["name"] == "the best checkpoint" and sel.reference["indices"] == [best]
        assert sel.vs_checkpoints is not None
        if sel.rule == "reference":
            assert sel.vs_checkpoints["gain"] == pytest.approx(ends - nll, rel=1e-5, abs=1e-6)
    assert nll <= sel.reference["nll"] + 1e-6
    if sel.rule == "reference":
        assert sel.indices == sel.reference["indices"]
    else:
        assert sel.rule == "confirmed" and sel.confirmation["accepted"]
        assert all(f["gain"] > 0 for f in sel.confirmation["folds"])
    assert 1 <= len(sel.indices) <= max_members
    assert sum(sel.weights) == pytest.approx(1.0) and all(w > 0 for w in sel.weights)
    assert [c / sum(sel.counts) for c in sel.counts] == pytest.approx(sel.weights)


def _lucky_candidates(n: int, m: int, seed: int):
    """Two checkpoints A, B and m curve points with no real gain over A: each point's
    probability of the true class is A's times exp(noise), the noise symmetric (mean zero),
    so the best point on any one selection set beats A there by chance only."""
    torch.manual_seed(seed)
    labels = torch.zeros(n, dtype=torch.long)
    pa = 0.3 + 0.4 * torch.rand(n)
    pb = 0.25 + 0.4 * torch.rand(n)
    pts = [pa * (torch.distributions.StudentT(2.0).sample((n,)) * 0.15).clamp(-0.3, 0.3).exp() for _ in range(m)]
    return [_cand(i, _log_probs(p.tolist(), n_classes=2)) for i, p in enumerate([pa, *pts, pb])], labels


def test_a_candidate_best_by_chance_is_refused():
    """The failure of the old rule: one new model, best on the selection data only by luck,
    shipped instead of what the user had. Departures now need confirmation on examples that
    did not pick them; and with `members` > 1 a single new model cannot ship at all."""
    lucky = refused = 0
    for seed in range(10):
        cands, labels = _lucky_candidates(500, 9, seed)
        last = len(cands) - 1
        best_ckpt = min(_nll([cands[0]], labels), _nll([cands[last]], labels))
        one = select_members(cands, labels, max_members=1, endpoints=[0, last], seed=seed)
        if min(_nll([c], labels) for c in cands[1:-1]) < best_ckpt:  # the old rule shipped that point
            lucky += 1
            refused += one.rule == "reference" and one.indices == [0]
        five = select_members(cands, labels, max_members=5, endpoints=[0, last], seed=seed)
        assert len(five.indices) >= 2  # no single-model downgrade unless one member is asked for
    assert lucky >= 7 and refused >= lucky - 1  # the gate's 95% leaves room for one lucky split


def _diverse_candidates(n: int, m: int, seed: int, classes: int = 10):
    """Independent models of equal strength: the more of them in the mixture, the lower its
    NLL, on any examples (a real gain over the two checkpoints' ensemble)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    out = []
    for i in range(m):
        logits = torch.randn(n, classes, generator=g) * 1.5 + 3.0 * F.one_hot(labels, classes)
        out.append(_cand(i, F.log_softmax(logits, dim=-1)))
    return out, labels


def test_a_real_gain_is_confirmed_with_its_interval():
    cands, labels = _diverse_candidates(2000, 9, 0)
    sel = select_members(cands, labels, max_members=5, endpoints=[0, 8], seed=0)
    assert sel.rule == "confirmed" and len(sel.indices) > 2
    test = sel.confirmation["test"]
    assert test["accepted"] and test["ci95"][0] > 0 and test["relative_gain"] > 0.02
    # 2,000 examples: 10 parts of 200; each pick is made on the other 1,800
    assert sel.confirmation["parts"] == 10 and [f["picked_on"] for f in sel.confirmation["folds"]] == [1800] * 10
    assert sel.nll < sel.reference["nll"]
    # the report's decision line names the reference, the examples and the interval
    from mcensemble.baselines import decision_sentence
    from mcensemble.reports import choice_report
    choice = choice_report(sel, cands, max_members=5)
    line = decision_sentence(choice)
    assert "rule confirmed" in line and "the 2 checkpoints' ensemble" in line
    assert "without each of 10 parts of the 2000 selection examples" in line and "95% interval" in line


def test_one_member_only_on_request_and_its_cost_is_reported():
    cands, labels = _diverse_candidates(2000, 9, 1)
    five = select_members(cands, labels, max_members=5, endpoints=[0, 8], seed=0)
    assert len(five.indices) >= 2
    one = select_members(cands, labels, max_members=1, endpoints=[0, 8], seed=0)
    assert len(one.indices) == 1 and one.reference["name"] == "the best checkpoint"
    vs = one.vs_checkpoints  # one model of equal strength loses against the two checkpoints' ensemble
    assert vs["name"] == "the 2 checkpoints' ensemble" and vs["gain"] < 0 and vs["ci95"][1] < 0
    from mcensemble.baselines import decision_sentence
    from mcensemble.reports import choice_report
    assert "the price of the smaller `members` asked for" in decision_sentence(
        choice_report(one, cands, max_members=1))


def test_too_few_selection_examples_keep_the_reference():
    cands, labels = _diverse_candidates(19, 5, 2)
    sel = select_members(cands, labels, max_members=4, endpoints=[0, 4])
    assert sel.rule == "reference" and "too few" in sel.confirmation["reason"]
    with pytest.raises(BadOptionError, match="`endpoints`"):
        select_members(cands, labels, max_members=4, endpoints=[0, 9])


def test_forced_distinct_members_can_lose_where_selection_does_not():
    """Four distinct members forced in are worse than the best member alone; the selection
    keeps the reference (here the better checkpoint, as one member is all that beats it)."""
    labels = torch.zeros(200, dtype=torch.long)
    cands = [_cand(i, _log_probs([c] * 200)) for i, c in enumerate([0.95, 0.3, 0.35, 0.3])]
    forced = select_members(cands, labels, max_members=4, exact=True)
    assert len(forced.indices) == 4 and forced.rule == "exact"
    assert _chosen_nll(cands, labels, forced) > _nll([cands[0]], labels)
    sel = select_members(cands, labels, max_members=1, endpoints=[0, 3])
    assert sel.indices == [0] and sel.rule == "reference" and sel.weights == [1.0]


def test_greedy_with_replacement_gives_weights():
    """A strong member and a weaker complementary one: the best mixture is not 1:1, and
    picking the strong one again is how the greedy gets there."""
    labels = torch.zeros(400, dtype=torch.long)
    a = _log_probs([0.97] * 300 + [0.02] * 100)
    b = _log_probs([0.30] * 300 + [0.90] * 100)
    cands = [_cand(0, a), _cand(1, b)]
    sel = select_members(cands, labels, max_members=2, endpoints=[0, 1])
    assert sel.rule == "confirmed" and sel.indices == [0, 1]
    assert sel.counts[0] > sel.counts[1]
    assert sel.nll < _nll(cands, labels)
    picks = sum(sel.counts)
    best_grid = min(ensemble_metrics([a, b], labels, [k, picks - k]).nll for k in range(1, picks))
    assert sel.nll <= best_grid + 1e-9
    test = sel.confirmation["test"]
    assert test["accepted"] and test["p_positive"] >= 0.95 and test["ci95"][0] > 0


def _noisy_pair_and_lucky_point(n_repeat: int):
    """Endpoints A, B (complementary on 10 of 12 examples, both wrong on 2) and a point C,
    poor alone, whose help in a mixture rests on those 2 examples."""
    labels = torch.zeros(12 * n_repeat, dtype=torch.long)
    pa = [0.9, 0.4] * 5 + [0.3, 0.3]
    pb = [0.4, 0.9] * 5 + [0.3, 0.3]
    pc = [0.5] * 10 + [0.99, 0.99]
    a, b, c = (_log_probs(p * n_repeat) for p in (pa, pb, pc))
    return [_cand(0, a), _cand(1, c), _cand(2, b)], labels


def test_bootstrap_gate_keeps_the_reference_on_a_tiny_noisy_selection_set():
    cands, labels = _noisy_pair_and_lucky_point(2)
    sel = select_members(cands, labels, max_members=3, endpoints=[0, 2], seed=0)
    assert sel.greedy["nll"] < sel.baselines["endpoints_ensemble"]["nll"]
    assert sel.rule == "reference" and sel.indices == [0, 2] and sel.weights == [0.5, 0.5]
    assert sel.confirmation["test"]["resamples"] == 1000 and not sel.confirmation["accepted"]
    # the same per-example pattern on 100 times as many examples is no longer noise
    many = select_members(*_noisy_pair_and_lucky_point(100), max_members=3, endpoints=[0, 2], seed=0)
    assert many.rule == "confirmed" and 1 in many.indices
    assert "did not pick it" in sel.guarantee and "the 2 checkpoints' ensemble" in sel.guarantee


def test_selection_respects_the_upper_bound_and_exact():
    cands, labels = _random_cands(3, m=9, n=300)
    for k in (1, 2, 3):
        sel = select_members(cands, labels, max_members=k, endpoints=[0, 8])
        assert len(sel.indices) <= k
        assert len(sel.greedy["indices"]) <= k
        exact = select_members(cands, labels, max_members=k, exact=True)
        assert len(exact.indices) == k and exact.weights == pytest.approx([1 / k] * k)
        assert sorted(exact.indices) == sorted(select_greedy_nll(cands, k, labels))
    one = select_members(cands, labels, max_members=1, endpoints=[0, 8])
    assert not one.baselines["endpoints_ensemble"]["allowed"]


def test_selection_is_deterministic_and_seeded():
    cands, labels = _random_cands(1, m=6, n=80)
    a = select_members(cands, labels, max_members=4, endpoints=[0, 5], seed=3)
    b = select_members(cands, labels, max_members=4, endpoints=[0, 5], seed=3)
    assert a.to_dict() == b.to_dict()


def test_paired_bootstrap():
    ref = torch.tensor([1.0, 2.0, 1.5, 0.5] * 10)
    res = paired_bootstrap(ref, ref - 0.1, resamples=200, seed=0)
    assert res["accepted"] and res["p_positive"] == 1.0 and res["gain"] == pytest.approx(0.1)
    assert res["ci95"][0] == pytest.approx(0.1) and res["resamples"] == 200
    same = paired_bootstrap(ref, ref.clone(), resamples=200)
    assert not same["accepted"] and same["p_positive"] == 0.0
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(40, generator=g)
    coin = paired_bootstrap(ref, ref + noise - noise.mean() - 1e-3, resamples=500, seed=1)
    assert not coin["accepted"] and 0.2 < coin["p_positive"] < 0.8  # a tiny mean gain inside the noise
    assert paired_bootstrap(ref, ref + noise, seed=5) == paired_bootstrap(ref, ref + noise, seed=5)
    with pytest.raises(BadOptionError, match="needs examples"):
        paired_bootstrap(torch.zeros(0), torch.zeros(0))


@pytest.mark.parametrize("weights, match", [
    ([1, -1], r"weights\[1\] = -1.0"), ([0.0, 0.0], "sum to 0"), ([float("nan")], "finite"),
    ([1, 2, 3], "3 value"), (None, "must be 2 numbers"),
])
def test_check_weights_refuses(weights, match):
    with pytest.raises(BadOptionError, match=match):
        check_weights(weights if weights is None or len(weights) != 1 else weights * 2, 2)


def test_check_weights_normalises_and_weighted_metrics():
    assert check_weights([2, 6], 2) == [0.25, 0.75]
    assert check_weights(torch.tensor([1.0, 0.0, 1.0]), 3) == [0.5, 0.0, 0.5]
    torch.manual_seed(2)
    labels = torch.randint(0, 4, (30,))
    lps = [F.log_softmax(torch.randn(30, 4), dim=-1) for _ in range(2)]
    mix = 0.25 * lps[0].exp() + 0.75 * lps[1].exp()
    m = ensemble_metrics(lps, labels, [1, 3])
    assert m.nll == pytest.approx(F.nll_loss(mix.log(), labels).item(), rel=1e-5)
    assert ensemble_metrics(lps, labels, [1, 1]).nll == pytest.approx(ensemble_metrics(lps, labels).nll, rel=1e-6)


# moved from test_review_fixes.py
from helpers import bn_mlp as _net, gaussian_batches as _data  # noqa: E402
from mcensemble.errors import DataSpecError  # noqa: E402


def test_predict_log_probs_reads_dict_targets():
    net = _net().eval()
    data = [{"x": x, "target": y} for x, y in _data()]
    lp, labels = predict_log_probs(net, data)
    assert lp.shape == (64, 3) and torch.equal(labels, torch.cat([y for _, y in _data()]))
    with pytest.raises(DataSpecError, match="no labels"):
        predict_log_probs(net, [x for x, _ in _data()])


def test_predict_log_probs_restores_each_mode_and_refuses_no_data():
    net = _net().train()
    net[5].eval()  # a submodule in another mode than its parent keeps it
    predict_log_probs(net, _data())
    assert net.training and not net[5].training and net[1].training
    with pytest.raises(DataSpecError, match="no batches"):
        predict_log_probs(net, [])


@pytest.mark.parametrize("n, parts", [(40, 2), (299, 2), (300, 3), (950, 9), (5000, 10)])
def test_cross_fitting_scores_each_part_with_a_pick_that_never_saw_it(n, parts):
    from mcensemble import members as M
    cands, labels = _diverse_candidates(n, 4, 3)
    q = M._true_class_probs(cands, labels)
    ref = M._counts_of(4, [0, 3])
    pick = {"max_members": 3, "min_members": 2, "max_picks": 50}
    rec, oof = M._cross_fit(q, ref, confidence=0.95, resamples=200, seed=5, **pick)
    assert rec["parts"] == parts and sum(f["scored_on"] for f in rec["folds"]) == n
    scored = M._folds(n, parts, 5)
    assert sorted(torch.cat(scored).tolist()) == list(range(n))  # disjoint parts covering every example
    for part, fold in zip(scored, rec["folds"]):
        rest = torch.tensor(sorted(set(range(n)) - set(part.tolist())))
        alt, _ = M._pick(q[:, rest], ref, **pick)  # picked without the part ...
        assert fold["alternative"]["indices"] == torch.nonzero(alt).flatten().tolist()
        assert torch.allclose(oof[part], M._losses(q[:, part], alt))  # ... and scored on it
