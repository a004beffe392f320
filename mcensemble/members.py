"""Members: points sampled along one or more paths, evaluated and chosen.

Several paths (one per consecutive pair of checkpoints) are joined into one global
parameter u in [0, 1]: path p covers u in [p/P, (p+1)/P].

A candidate point is evaluated once: its BatchNorm statistics are re-estimated on the
training data (for BN models), then its training metrics and its validation
log-probabilities are computed. Only the re-estimated BN buffers are kept per candidate;
the weights are recomputed from the path when needed (cheap), so memory stays at one
model plus the buffers.
"""
from __future__ import annotations

import math
import numbers
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import distributed as dist_
from ._modes import modes_kept
from .bn import has_batchnorm, labelled_batch, update_bn
from .errors import BadOptionError, DataSpecError
from .evaluate import Metrics, _load_state_strict, evaluate, expected_calibration_error
from .options import check_count
from .precision import resolve_precision

__all__ = ["Candidate", "mean_log_prob", "global_to_local", "uniform_points", "evaluate_candidates", "select_greedy_nll",
           "Selection", "select_members", "paired_bootstrap", "check_weights", "GUARANTEE",
           "BOOTSTRAP_RESAMPLES", "BOOTSTRAP_CONFIDENCE", "MAX_PICKS",
           "candidate_state", "predict_log_probs", "ensemble_metrics"]

StateDict = dict[str, torch.Tensor]


@dataclass
class Candidate:
    """One point of one path: where it is, its BN buffers, and how good it is."""

    path: int
    t: float
    u: float
    bn_state: StateDict = field(default_factory=dict)
    train: Metrics | None = None
    val: Metrics | None = None
    val_log_probs: torch.Tensor | None = None  # (N_val, C), float32 on CPU

    def info(self, kind: str) -> dict[str, Any]:
        d: dict[str, Any] = {"t": self.t, "u": self.u, "path": self.path, "kind": kind}
        if self.train is not None:
            d.update({"train_loss": self.train.loss, "train_acc": self.train.acc})
        if self.val is not None:
            d.update({"val_nll": self.val.nll, "val_acc": self.val.acc, "val_ece": self.val.ece})
        return d


def global_to_local(u: float, n_paths: int) -> tuple[int, float]:
    """Map u in [0, 1] over `n_paths` joined paths to (path index, t on that path)."""
    if not 0.0 <= u <= 1.0:
        raise BadOptionError(f"t={u} is outside [0, 1]", option="t")
    p = min(int(u * n_paths), n_paths - 1)
    t = u * n_paths - p
    return p, min(max(t, 0.0), 1.0)


def uniform_points(k: int, n_paths: int = 1) -> list[tuple[int, float, float]]:
    """k points uniform in the global u, ends included; a single member sits at u = 0.5."""
    check_count(k, "members", minimum=1)
    us = [0.5] if k == 1 else [i / (k - 1) for i in range(k)]
    return [(*global_to_local(u, n_paths), u) for u in us]


def candidate_state(path: Any, cand: Candidate) -> StateDict:
    """The full state dict of a candidate: the path's weights, the candidate's BN buffers."""
    state = path.state_at(cand.t)
    state.update({k: v.clone() for k, v in cand.bn_state.items()})
    return state


def _bn_buffer_names(model: nn.Module) -> list[str]:
    names = []
    for mname, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            names += [f"{mname}.{b}" if mname else b for b, _ in m.named_buffers(recurse=False)]
    return names


@torch.no_grad()
def predict_log_probs(model: nn.Module, loader: Iterable, *, device: str | torch.device = "cpu"
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log_softmax outputs (N, C), labels (N,)) on CPU, model in eval mode; forward passes
    at the current precision (`mcensemble.precision.use_precision`), log-probabilities float32."""
    prec = resolve_precision(None, device)
    outs, labels = [], []
    with modes_kept(model, False):  # every module's own flag back after, as evaluate() does
        for batch in loader:
            x, y = labelled_batch(batch, what="evaluation")
            with prec.autocast():
                out = model(prec.input(x.to(device)))
            outs.append(F.log_softmax(out.float(), dim=-1).cpu())
            labels.append(torch.as_tensor(y).cpu())
    if not outs:
        raise DataSpecError("cannot predict: the data loader yielded no batches; give a non-empty "
                            "data set", option="data")
    return torch.cat(outs), torch.cat(labels)


def check_weights(weights: Sequence[float] | torch.Tensor, k: int, *, option: str = "weights") -> list[float]:
    """Member weights as a list of K floats summing to 1: each finite and >= 0, the sum > 0
    (`BadOptionError` naming `option` otherwise)."""
    try:
        raw = list(weights.tolist() if isinstance(weights, torch.Tensor) else weights)
    except TypeError as e:
        raise BadOptionError(f"{option} must be {k} numbers, got {weights!r}", option=option) from e
    if any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in raw):
        raise BadOptionError(f"{option} must be {k} numbers, got {raw!r}", option=option)
    w = [float(v) for v in raw]
    if len(w) != k:
        raise BadOptionError(f"{option} has {len(w)} value(s) but the ensemble has {k} member(s)", option=option)
    bad = [i for i, v in enumerate(w) if not math.isfinite(v) or v < 0]
    if bad:
        raise BadOptionError(f"{option}[{bad[0]}] = {w[bad[0]]!r}: member weights must be finite and >= 0",
                             option=option)
    total = math.fsum(w)
    if not total > 0:
        raise BadOptionError(f"{option} sum to 0: at least one member needs a positive weight", option=option)
    return [v / total for v in w]


def mean_log_prob(log_probs: torch.Tensor, weights: Sequence[float] | None = None) -> torch.Tensor:
    """(K, ...) members' log-probabilities -> (...) log of their (weighted) mean probability:
    `logsumexp_k log_probs_k - log K`, or `logsumexp_k (log_probs_k + log w_k)` with `weights`
    (K values, checked and normalised by `check_weights`). The one combiner: ensemble
    metrics here and `EnsembleModel.forward` (through `ensemble.combine_mean_prob`) use it."""
    k = log_probs.shape[0]
    if weights is None:
        return torch.logsumexp(log_probs, dim=0) - math.log(k)
    w = torch.tensor(check_weights(weights, k), dtype=log_probs.dtype, device=log_probs.device)
    return torch.logsumexp(log_probs + w.log().view(k, *([1] * (log_probs.dim() - 1))), dim=0)


def ensemble_metrics(log_probs: Sequence[torch.Tensor], labels: torch.Tensor,
                     weights: Sequence[float] | None = None) -> Metrics:
    """Metrics of the (weighted) mean-probability ensemble of members' log-probabilities;
    `weights` (normalised here) default to equal."""
    lp = mean_log_prob(torch.stack(list(log_probs)), weights)
    nll = F.nll_loss(lp, labels).item()
    acc = (lp.argmax(-1) == labels).float().mean().item()
    return Metrics(loss=nll, acc=acc, nll=nll, ece=expected_calibration_error(lp.exp(), labels),
                   n=int(labels.numel()))


def evaluate_candidates(paths: Sequence[Any], model: nn.Module, points: Sequence[tuple[int, float, float]], *,
                        train_loader: Iterable, val_loader: Iterable | None = None,
                        device: str | torch.device = "cpu", progress: bool | None = None) -> list[Candidate]:
    """Evaluate each (path, t, u) point: BN re-estimated on `train_loader` for BN models,
    training metrics, and validation log-probabilities when `val_loader` is given.
    `model` is used as scratch space (its weights are overwritten).

    With several processes (`mcensemble.distributed`) each evaluates its share of the
    points (every world-th one) and every process returns all of them, in order."""
    bn = has_batchnorm(model)
    bn_names = _bn_buffer_names(model) if bn else []
    out: list[Candidate] = []
    mine = dist_.shard(list(points))
    for p, t, u in tqdm(mine, desc="points", file=sys.stderr, leave=False,
                        disable=None if progress is None else not progress):
        _load_state_strict(model, paths[p].state_at(t))  # a mismatch names the tensor
        model.to(device)
        if bn:
            update_bn(model, train_loader, device=device, progress=False)
        cand = Candidate(path=p, t=t, u=u,
                         bn_state={k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in bn_names})
        cand.train = evaluate(model, train_loader, device=device, progress=False)
        if val_loader is not None:
            cand.val_log_probs, labels = predict_log_probs(model, val_loader, device=device)
            cand.val = ensemble_metrics([cand.val_log_probs], labels)
        out.append(cand)
    return dist_.gather_sharded(out, len(points))


def select_greedy_nll(cands: Sequence[Candidate], k: int, labels: torch.Tensor) -> list[int]:
    """Greedy forward selection of `k` distinct candidates minimising the ensemble's NLL.

    Starts from the best single candidate and adds, one at a time, the candidate whose
    addition gives the lowest ensemble NLL (ties: the earlier one). Endpoints are candidates
    like any other point."""
    check_count(k, "members", minimum=1)
    if k > len(cands):
        raise BadOptionError(f"`members` {k} is more than the {len(cands)} candidate points; "
                             "raise `candidates` or lower `members`", option="members")
    if any(c.val_log_probs is None for c in cands):
        raise BadOptionError("greedy selection needs validation log-probabilities for every candidate: pass "
                             "`val_loader`", option="val_loader")
    chosen: list[int] = []
    probs_sum = torch.zeros_like(cands[0].val_log_probs)
    for _ in range(k):
        best, best_nll = -1, math.inf
        for i, c in enumerate(cands):
            if i in chosen:
                continue
            mean = (probs_sum + c.val_log_probs.exp()) / (len(chosen) + 1)
            nll = F.nll_loss(mean.clamp_min(1e-40).log(), labels).item()
            if nll < best_nll:
                best, best_nll = i, nll
        chosen.append(best)
        probs_sum += cands[best].val_log_probs.exp()
    return chosen


# ----------------------------------------------------------------------------- selection with replacement
#: paired bootstrap: resamples, and the share of them in which a gain must be positive
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_CONFIDENCE = 0.95
#: greedy picks at most (weights are counts / picks)
MAX_PICKS = 50

GUARANTEE = ("On the selection data the chosen ensemble's NLL is never above that of its best single "
             "candidate, nor (when `members` allows as many) above the equal-weight ensemble of the "
             "checkpoints: both are candidates, and a choice that costs more replaces a cheaper one only "
             "when it lowers the NLL in at least {confidence:.0%} of {resamples} paired bootstrap "
             "resamples of the selection examples.")


@dataclass
class Selection:
    """What `select_members` chose: distinct candidate `indices` (ascending), their pick
    `counts` and normalised `weights`, the `rule` that won ("endpoints", "best-single",
    "greedy", "exact"), its selection `nll`, and the numbers behind the decision
    (`baselines`, `greedy`, `tests`) for the report."""

    indices: list[int]
    counts: list[int]
    weights: list[float]
    rule: str
    nll: float
    baselines: dict[str, Any] = field(default_factory=dict)
    greedy: dict[str, Any] = field(default_factory=dict)
    tests: list[dict[str, Any]] = field(default_factory=list)
    guarantee: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "indices": list(self.indices), "counts": list(self.counts),
                "weights": list(self.weights), "nll": self.nll, "baselines": self.baselines,
                "greedy": self.greedy, "bootstrap": self.tests, "guarantee": self.guarantee}


def paired_bootstrap(loss_ref: torch.Tensor, loss_new: torch.Tensor, *, resamples: int = BOOTSTRAP_RESAMPLES,
                     confidence: float = BOOTSTRAP_CONFIDENCE, seed: int = 0) -> dict[str, Any]:
    """Is `loss_new` (per example) lower than `loss_ref` by more than the examples' noise?

    Draws `resamples` sets of N examples with replacement (seeded) and, in each, the mean of
    `loss_ref - loss_new` (the gain). `accepted`: the gain is positive in at least
    `confidence` of the resamples (and overall). Also returns the gain on all examples, the
    share `p_positive` and the 2.5% / 97.5% quantiles of the resampled gain."""
    d = (loss_ref.double() - loss_new.double()).flatten()
    n = d.numel()
    if n == 0 or resamples < 1:
        raise BadOptionError("the paired bootstrap needs examples and at least one resample", option="val_data")
    gen = torch.Generator().manual_seed(int(seed))
    means = []
    for start in range(0, resamples, 64):  # chunks keep memory at 64 x N
        idx = torch.randint(0, n, (min(64, resamples - start), n), generator=gen)
        means.append(d[idx].mean(dim=1))
    m = torch.cat(means)
    p = float((m > 0).double().mean())
    gain = float(d.mean())
    return {"gain": gain, "p_positive": p, "resamples": int(resamples), "confidence": float(confidence),
            "seed": int(seed), "ci95": [float(m.quantile(0.025)), float(m.quantile(0.975))],
            "accepted": bool(gain > 0 and p >= confidence)}


def _true_class_probs(cands: Sequence[Candidate], labels: torch.Tensor) -> torch.Tensor:
    """(M, N) float64: each candidate's probability of the true class."""
    if not cands:
        raise BadOptionError("member selection needs at least one candidate point", option="candidates")
    if any(c.val_log_probs is None for c in cands):
        raise BadOptionError("greedy selection needs validation log-probabilities for every candidate: pass "
                             "`val_loader`", option="val_loader")
    y = labels.long().view(-1, 1)
    return torch.stack([c.val_log_probs.double().gather(1, y).squeeze(1).exp() for c in cands])


def _losses(q: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per-example NLL of the mixture with weights proportional to `counts` (M,)."""
    w = counts.double() / counts.sum()
    return -(w @ q).clamp_min(1e-300).log()


def _greedy_with_replacement(q: torch.Tensor, max_members: int, max_picks: int) -> list[tuple[torch.Tensor, float]]:
    """Caruana et al. (2004): start from the best single candidate, then repeatedly add (again,
    possibly) the candidate whose extra pick lowers the mixture's NLL most, never using more
    than `max_members` distinct ones; stop when no pick lowers it. The trajectory of
    (counts, nll); ties go to the earlier candidate."""
    m = q.shape[0]
    singles = -q.clamp_min(1e-300).log().mean(dim=1)
    first = int(torch.argmin(singles))  # argmin returns the first of equal minima
    counts = torch.zeros(m, dtype=torch.long)
    counts[first] = 1
    total_q, nll = q[first].clone(), float(singles[first])
    out = [(counts.clone(), nll)]
    for picks in range(1, max_picks):
        allowed = torch.arange(m) if int((counts > 0).sum()) < max_members else torch.nonzero(counts).flatten()
        mix = (total_q.unsqueeze(0) + q[allowed]) / (picks + 1)
        trial = -mix.clamp_min(1e-300).log().mean(dim=1)
        j = int(torch.argmin(trial))
        if not float(trial[j]) < nll:
            break
        i = int(allowed[j])
        counts[i] += 1
        total_q += q[i]
        nll = float(trial[j])
        out.append((counts.clone(), nll))
    return out


def select_members(cands: Sequence[Candidate], labels: torch.Tensor, *, max_members: int,
                   endpoints: Sequence[int] = (), exact: bool = False, max_picks: int = MAX_PICKS,
                   resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = BOOTSTRAP_CONFIDENCE,
                   seed: int = 0) -> Selection:
    """Choose members and weights on the selection data (the candidates' `val_log_probs`).

    The rule, in order:
    1. The cheaper choice: the equal-weight ensemble of the `endpoints` (candidate indices of
       the checkpoints) when there are at least two, `max_members` allows them and its NLL is
       not above the best single candidate's; else the best single candidate.
    2. Greedy forward selection with replacement (Caruana et al. 2004) from the best single
       candidate, at most `max_members` distinct members, at most `max_picks` picks, a pick
       only when it lowers the NLL. For each number of distinct members d the greedy
       trajectory reached, its last state with d members is a step.
    3. Steps by increasing d: a step replaces the current choice only when its NLL is lower
       and a paired bootstrap of per-example losses (`paired_bootstrap`: `resamples`,
       `seed`) finds its gain positive in at least `confidence` of the resamples.
    So the result never has a higher selection NLL than the best single candidate, nor than
    the endpoints' ensemble when that was allowed. `exact`: exactly `max_members` distinct
    members, equal weights (`select_greedy_nll`), no gate.
    """
    check_count(max_members, "members", minimum=1)
    q = _true_class_probs(cands, labels)
    m = q.shape[0]
    singles = -q.clamp_min(1e-300).log().mean(dim=1)
    best = int(torch.argmin(singles))
    ends = sorted(set(int(i) for i in endpoints))
    base: dict[str, Any] = {"best_single": {"index": best, "nll": float(singles[best]), "cost": 1},
                            "endpoints": [{"index": i, "nll": float(singles[i])} for i in ends]}

    def counts_of(idx: Sequence[int]) -> torch.Tensor:
        c = torch.zeros(m, dtype=torch.long)
        c[list(idx)] = 1
        return c

    if len(ends) >= 2:
        base["endpoints_ensemble"] = {"indices": ends, "cost": len(ends),
                                      "nll": float(_losses(q, counts_of(ends)).mean()),
                                      "allowed": len(ends) <= max_members}
    if exact:
        chosen = sorted(select_greedy_nll(cands, max_members, labels))
        c = counts_of(chosen)
        return _selection(c, "exact", float(_losses(q, c).mean()), base, {}, [], None)
    traj = _greedy_with_replacement(q, max_members, max_picks)
    steps: dict[int, tuple[torch.Tensor, float]] = {}
    for counts, nll in traj:
        steps[int((counts > 0).sum())] = (counts, nll)
    g_counts, g_nll = traj[-1]
    greedy = {"indices": torch.nonzero(g_counts).flatten().tolist(),
              "counts": g_counts[g_counts > 0].tolist(), "picks": int(g_counts.sum()), "nll": g_nll,
              "steps": [{"members": d, "nll": nll} for d, (_, nll) in sorted(steps.items())]}
    ee = base.get("endpoints_ensemble")
    if ee is not None and ee["allowed"] and ee["nll"] <= base["best_single"]["nll"]:
        cur, cur_rule, cur_nll, label = counts_of(ends), "endpoints", ee["nll"], "endpoints"
    else:
        cur, cur_rule, cur_nll, label = counts_of([best]), "best-single", base["best_single"]["nll"], "best single"
    tests = []
    for d, (counts, nll) in sorted(steps.items()):
        same = torch.equal(counts * cur.sum(), cur * counts.sum())  # proportional counts: the same mixture
        if same or not nll < cur_nll:
            continue
        res = paired_bootstrap(_losses(q, cur), _losses(q, counts), resamples=resamples, confidence=confidence,
                               seed=seed)
        to = f"greedy ({d} member{'s' if d > 1 else ''})"
        tests.append({"from": label, "to": to, "members": d, "nll_from": cur_nll, "nll_to": nll, **res})
        if res["accepted"]:
            cur, cur_rule, cur_nll, label = counts, "greedy", nll, to
    guarantee = GUARANTEE.format(confidence=confidence, resamples=resamples)
    return _selection(cur, cur_rule, cur_nll, base, greedy, tests, guarantee)


def _selection(counts: torch.Tensor, rule: str, nll: float, base, greedy, tests, guarantee) -> Selection:
    idx = torch.nonzero(counts).flatten().tolist()
    cs = [int(counts[i]) for i in idx]
    total = sum(cs)
    return Selection(indices=idx, counts=cs, weights=[c / total for c in cs], rule=rule, nll=nll,
                     baselines=base, greedy=greedy, tests=tests, guarantee=guarantee)
