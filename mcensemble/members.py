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
from ._layout import fast_layout
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
    `model` is used as scratch space (its weights are overwritten; on CPU its memory layout
    may become channels_last, `mcensemble._layout.fast_layout`).

    With several processes (`mcensemble.distributed`) each evaluates its share of the
    points (every world-th one) and every process returns all of them, in order."""
    bn = has_batchnorm(model)
    bn_names = _bn_buffer_names(model) if bn else []
    fast_layout(model, train_loader, device=device)
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

GUARANTEE = ("The shipped ensemble is the reference ({reference}) unless an alternative beat it on "
             "selection examples that did not pick it: the selection examples are split into K seeded parts "
             "(2 below 300 examples, one per 100 examples up to 10), the alternative is picked without each "
             "part and scored on it, and it ships only when it departed every time, its gain was positive on "
             "at least 70% of the parts (on both halves when K = 2), and the pooled out-of-part NLL gain is "
             "positive in at least {confidence:.0%} of {resamples} paired bootstrap resamples. It never has "
             "fewer members than the reference unless `members` asks for fewer.")
#: cross-fitting: one part per this many selection examples, at least 2 and at most MAX_PARTS parts;
#: each part needs MIN_PART examples; the share of parts on which the gain must be positive
PART_EXAMPLES = 100
MAX_PARTS = 10
MIN_PART = 10
POSITIVE_SHARE = 0.7


@dataclass
class Selection:
    """What `select_members` chose: distinct candidate `indices` (ascending), their pick
    `counts` and normalised `weights`, the `rule` ("reference": the reference kept;
    "confirmed": a departure confirmed out of part; "exact"), its selection `nll`, and the
    numbers behind the decision for the report: the `reference` (name, indices, cost, NLL),
    the `confirmation` (the parts, what was picked without each, the out-of-part test), `vs_checkpoints`
    (when `max_members` is below the checkpoints' count: the shipped choice against their
    ensemble), `baselines` and the full-data `greedy` trajectory."""

    indices: list[int]
    counts: list[int]
    weights: list[float]
    rule: str
    nll: float
    baselines: dict[str, Any] = field(default_factory=dict)
    greedy: dict[str, Any] = field(default_factory=dict)
    guarantee: str | None = None
    reference: dict[str, Any] = field(default_factory=dict)
    confirmation: dict[str, Any] = field(default_factory=dict)
    vs_checkpoints: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "indices": list(self.indices), "counts": list(self.counts),
                "weights": list(self.weights), "nll": self.nll, "baselines": self.baselines,
                "greedy": self.greedy, "guarantee": self.guarantee,
                "reference": self.reference, "confirmation": self.confirmation,
                "vs_checkpoints": self.vs_checkpoints}


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


def _single_nlls(q: torch.Tensor) -> torch.Tensor:
    """(M,) each candidate's NLL alone, from (M, N) true-class probabilities."""
    return -q.clamp_min(1e-300).log().mean(dim=1)


def _greedy_with_replacement(q: torch.Tensor, max_members: int, max_picks: int, *,
                             start: torch.Tensor | None = None) -> list[tuple[torch.Tensor, float]]:
    """Caruana et al. (2004): start from the best single candidate (or from the pick `counts`
    `start`), then repeatedly add (again, possibly) the candidate whose extra pick lowers the
    mixture's NLL most, never using more than `max_members` distinct ones and `max_picks`
    picks; stop when no pick lowers it. The trajectory of (counts, nll); ties go to the
    earlier candidate."""
    m = q.shape[0]
    if start is None:
        first = int(torch.argmin(_single_nlls(q)))  # argmin returns the first of equal minima
        start = torch.zeros(m, dtype=torch.long)
        start[first] = 1
    counts = start.clone()
    total_q = counts.double() @ q
    nll = float(-(total_q / counts.sum()).clamp_min(1e-300).log().mean())
    out = [(counts.clone(), nll)]
    for picks in range(int(counts.sum()), max_picks):
        allowed = torch.arange(m) if int((counts > 0).sum()) < max_members else torch.nonzero(counts).flatten()
        mix = (total_q.unsqueeze(0) + q[allowed]) / (picks + 1)
        trial = _single_nlls(mix)
        j = int(torch.argmin(trial))
        if not float(trial[j]) < nll:
            break
        i = int(allowed[j])
        counts[i] += 1
        total_q += q[i]
        nll = float(trial[j])
        out.append((counts.clone(), nll))
    return out


def _counts_of(m: int, idx: Sequence[int]) -> torch.Tensor:
    c = torch.zeros(m, dtype=torch.long)
    c[list(idx)] = 1
    return c


def _same_mixture(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a * b.sum(), b * a.sum())  # proportional counts: the same mixture


def _describe(counts: torch.Tensor) -> dict[str, Any]:
    idx = torch.nonzero(counts).flatten().tolist()
    return {"indices": idx, "counts": [int(counts[i]) for i in idx], "members": len(idx)}


def _pick(q: torch.Tensor, ref: torch.Tensor, *, max_members: int, min_members: int, max_picks: int
          ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, float]]]:
    """The alternative picked on the examples of `q` (M, N): greedy forward selection with
    replacement (`_greedy_with_replacement`: at most `max_members` distinct members,
    `max_picks` picks, a pick only when it lowers the NLL), run from the best single candidate
    and from the reference `ref`; of the two ends, the one with the lower NLL among those with
    at least `min_members` distinct members, when it is below the reference's NLL there;
    else `ref`. Returns (the pick, the trajectory from the best single candidate)."""
    traj = _greedy_with_replacement(q, max_members, max_picks)
    ends = [traj[-1]]
    if int(ref.sum()) < max_picks:
        ends.append(_greedy_with_replacement(q, max_members, max_picks, start=ref)[-1])
    ok = [(nll, i) for i, (c, nll) in enumerate(ends) if int((c > 0).sum()) >= min_members]
    if ok:
        nll, i = min(ok)
        if nll < float(_losses(q, ref).mean()):
            return ends[i][0], traj
    return ref, traj


def _reference(q: torch.Tensor, singles: torch.Tensor, ends: list[int], max_members: int
               ) -> tuple[torch.Tensor, dict[str, Any]]:
    """The user's own models: their equal-weight ensemble when there are at least two and
    `max_members` allows them, else the best of them (lowest of `singles`, the candidates'
    NLLs on the selection examples); with no checkpoints among the candidates, the best candidate."""
    m = q.shape[0]
    if len(ends) >= 2 and len(ends) <= max_members:
        counts, name = _counts_of(m, ends), f"the {len(ends)} checkpoints' ensemble"
    elif ends:
        best = min(ends, key=lambda i: (float(singles[i]), i))
        counts, name = _counts_of(m, [best]), "the best checkpoint" if len(ends) > 1 else "the checkpoint"
    else:
        counts, name = _counts_of(m, [int(torch.argmin(singles))]), "the best candidate (no checkpoints given)"
    return counts, {**_describe(counts), "name": name, "cost": int((counts > 0).sum()),
                    "nll": float(_losses(q, counts).mean())}


def _folds(n: int, k: int, seed: int) -> list[torch.Tensor]:
    """`k` disjoint parts of range(n), sizes within one, from one seeded permutation."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed) + 7919))
    return [part.sort().values for part in perm.tensor_split(k)]


def _cross_fit(q: torch.Tensor, ref: torch.Tensor, *, confidence: float, resamples: int, seed: int,
               **pick) -> tuple[dict[str, Any], torch.Tensor]:
    """Cross-fitting: the N selection examples in K = clamp(N // PART_EXAMPLES, 2, MAX_PARTS)
    seeded parts; for each part, the alternative picked on the other parts (`_pick`) is
    scored on it. Accepted when every part's pick departed from the reference, the gain was
    positive on at least ceil(POSITIVE_SHARE * K) parts, and `paired_bootstrap` finds the pooled
    out-of-part gain positive. Returns (the confirmation record, per-example out-of-part losses)."""
    n = q.shape[1]
    folds = min(max(n // PART_EXAMPLES, 2), MAX_PARTS)
    ref_loss = _losses(q, ref)
    oof = ref_loss.clone()
    rec: dict[str, Any] = {"examples": n, "parts": folds,
                           "picked_on": f"{folds - 1} of {folds} parts of the selection examples",
                           "confirmed_on": "the remaining part", "folds": [], "accepted": False}
    if n < folds * MIN_PART:
        rec["reason"] = (f"{n} selection examples are too few to confirm a departure (each of the {folds} parts "
                         f"needs {MIN_PART}); pass more `val_data`")
        return rec, oof
    parts = _folds(n, folds, seed)
    for k, score_on in enumerate(parts):
        pick_on = torch.cat([p for j, p in enumerate(parts) if j != k]).sort().values
        alt, _ = _pick(q[:, pick_on], ref, **pick)
        oof[score_on] = _losses(q[:, score_on], alt)
        gain = float((ref_loss[score_on] - oof[score_on]).double().mean())
        rec["folds"].append({"picked_on": int(pick_on.numel()), "scored_on": int(score_on.numel()),
                             "departed": not _same_mixture(alt, ref), "alternative": _describe(alt),
                             "gain": gain})
    if not all(f["departed"] for f in rec["folds"]):
        rec["reason"] = ("picked without one of the parts, the greedy search found nothing with a lower NLL "
                         "than the reference, so there is no alternative to confirm")
        return rec, oof
    test = paired_bootstrap(ref_loss, oof, resamples=resamples, confidence=confidence, seed=seed)
    ref_nll = float(ref_loss.double().mean())
    rec["test"] = {**test, "relative_gain": test["gain"] / ref_nll if ref_nll > 0 else 0.0,
                   "nll_reference": ref_nll, "nll_alternative": float(oof.double().mean())}
    positive = sum(f["gain"] > 0 for f in rec["folds"]) >= math.ceil(POSITIVE_SHARE * folds)
    rec["accepted"] = bool(positive and test["accepted"])
    if not rec["accepted"]:
        rec["reason"] = ("the out-of-part gain was not positive on enough parts" if not positive else
                         f"the out-of-part gain was positive in only {test['p_positive']:.1%} of "
                         f"{test['resamples']} bootstrap resamples ({test['confidence']:.0%} needed)")
    return rec, oof


def select_members(cands: Sequence[Candidate], labels: torch.Tensor, *, max_members: int,
                   endpoints: Sequence[int] = (), exact: bool = False, max_picks: int = MAX_PICKS,
                   resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = BOOTSTRAP_CONFIDENCE,
                   seed: int = 0) -> Selection:
    """Choose members and weights on the selection data (the candidates' `val_log_probs`),
    never departing from the user's own checkpoints without confirmation.

    1. The reference: the equal-weight ensemble of the `endpoints` (candidate indices of the
       checkpoints, BatchNorm re-estimated like every candidate) when there are at least two
       and `max_members` allows them; else the best of them on the selection examples.
    2. The alternative (`_pick`): the end of greedy forward selection with replacement
       (Caruana et al. 2004; at most `max_members` distinct members, at most `max_picks`
       picks), when it has no fewer distinct members than the reference (cheaper only when
       `max_members` asks for it) and a lower NLL than the reference on the same examples.
    3. Confirmation by cross-fitting (`_cross_fit`): the selection examples are split into K
       seeded parts (2 below 300 examples, one per 100 up to 10); the alternative is picked
       without each part and scored on it. The alternative picked on all the examples ships
       only when every part's pick departed from the reference, the gain was positive on at
       least 70% of the parts (both, for K = 2), and the pooled out-of-part gain is positive
       in at least `confidence` of `resamples` paired bootstrap resamples (`seed`).
       Otherwise the reference ships.
    `exact`: exactly `max_members` distinct members, equal weights (`select_greedy_nll`), no
    confirmation.
    """
    check_count(max_members, "members", minimum=1)
    q = _true_class_probs(cands, labels)
    m = q.shape[0]
    ends = sorted(set(int(i) for i in endpoints))
    if any(not 0 <= i < m for i in ends):
        raise BadOptionError(f"`endpoints` {ends} must index the {m} candidates", option="endpoints")
    singles = _single_nlls(q)
    best = int(torch.argmin(singles))
    base: dict[str, Any] = {"best_single": {"index": best, "nll": float(singles[best]), "cost": 1},
                            "endpoints": [{"index": i, "nll": float(singles[i])} for i in ends]}
    if len(ends) >= 2:
        base["endpoints_ensemble"] = {"indices": ends, "cost": len(ends),
                                      "nll": float(_losses(q, _counts_of(m, ends)).mean()),
                                      "allowed": len(ends) <= max_members}
    ref, reference = _reference(q, singles, ends, max_members)
    if exact:
        c = _counts_of(m, sorted(select_greedy_nll(cands, max_members, labels)))
        return _selection(c, "exact", float(_losses(q, c).mean()), base, {}, None, reference=reference)
    pick = {"max_members": max_members, "min_members": reference["cost"], "max_picks": max_picks}
    alt, traj = _pick(q, ref, **pick)
    g_counts, g_nll = traj[-1]
    greedy = {**_describe(g_counts), "picks": int(g_counts.sum()), "nll": g_nll,
              "steps": [{"members": int((c > 0).sum()), "nll": v} for c, v in traj]}
    greedy["steps"] = list({s["members"]: s for s in greedy["steps"]}.values())
    confirmation, oof = _cross_fit(q, ref, resamples=resamples, confidence=confidence, seed=seed, **pick)
    departs = confirmation["accepted"] and not _same_mixture(alt, ref)
    if confirmation["accepted"] and not departs:
        confirmation["reason"] = "the alternative picked on all the selection examples is the reference"
    shipped, rule = (alt, "confirmed") if departs else (ref, "reference")
    guarantee = GUARANTEE.format(reference=reference["name"], confidence=confidence, resamples=resamples)
    vs = None
    if len(ends) >= 2 and len(ends) > max_members:  # a cheaper model was asked for: what it costs
        ens_loss = _losses(q, _counts_of(m, ends))
        shipped_loss = oof if departs else _losses(q, ref)
        vs = {"name": f"the {len(ends)} checkpoints' ensemble", "scored_on": "out of part" if departs else "selection",
              **paired_bootstrap(ens_loss, shipped_loss, resamples=resamples, confidence=confidence, seed=seed)}
    return _selection(shipped, rule, float(_losses(q, shipped).mean()), base, greedy, guarantee,
                      reference=reference, confirmation=confirmation, vs_checkpoints=vs)


def _selection(counts: torch.Tensor, rule: str, nll: float, base, greedy, guarantee, **extra) -> Selection:
    idx = torch.nonzero(counts).flatten().tolist()
    cs = [int(counts[i]) for i in idx]
    total = sum(cs)
    return Selection(indices=idx, counts=cs, weights=[c / total for c in cs], rule=rule, nll=nll,
                     baselines=base, greedy=greedy, guarantee=guarantee, **extra)
