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
    with pytest.raises(BadOptionError, match="--members must be at least 1") as info:
        uniform_points(k)
    assert info.value.option == "--members"


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
    with pytest.raises(BadOptionError, match=r"--members 4 is more than the 3 candidate points.*--candidates") as info:
        select_greedy_nll(cands, 4, labels)
    assert info.value.option == "--members"
    with pytest.raises(BadOptionError, match="at least 1"):
        select_greedy_nll(cands, 0, labels)


def test_greedy_needs_validation_log_probs():
    cands = [_cand(0, _log_probs([0.5])), Candidate(path=0, t=1.0, u=1.0)]
    with pytest.raises(ValueError, match="validation log-probabilities"):
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
