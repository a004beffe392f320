"""Baselines: what costs the same as an ensemble or less, scored on the same data.

A build or eval report shows the built ensemble (cost K forward passes) beside each
checkpoint (cost 1), the checkpoints' equal-weight ensemble (cost 2 for a pair), the soup
(the members' weight average, BatchNorm re-estimated: cost 1) and the packed pair (two
dropout halves in one network: cost 1, layered networks only). Every row carries NLL,
accuracy and ECE on each of the report's splits ("val", or "train" without validation
data, and "test" with `--test-data`).

`Scorer` keeps each model's log-probabilities per split (each model runs once per split),
so a mixture's metrics cost no further forward passes.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from .bn import labelled_batch, update_bn
from .errors import DropoutPathError, MCEnsembleError
from .members import check_weights, ensemble_metrics, predict_log_probs
from .pack import pack_pair

__all__ = ["Scorer", "weighted_average", "soup_state", "packed_state", "skipped_row", "decision_sentence",
           "SOUP_NOTE"]

_log = logging.getLogger(__name__)

StateDict = Mapping[str, torch.Tensor]

SOUP_NOTE = "the members' weight average (by member weight), BatchNorm re-estimated on the training data"


class Scorer:
    """Log-probabilities of models on named splits, and the metrics of (weighted) mixtures.

    `net`: the architecture (copied once as scratch space; state dicts are loaded into the
    copy). `splits`: name -> loader of labelled batches."""

    def __init__(self, net: nn.Module, splits: Mapping[str, Iterable[Any]], *, device: str | torch.device = "cpu"):
        self.net = copy.deepcopy(net)
        self.splits = dict(splits)
        self.device = device
        self.log_probs: dict[Any, dict[str, torch.Tensor]] = {}
        self.labels: dict[str, torch.Tensor] = {}

    def add(self, key: Any, state: StateDict | None = None, *, model: nn.Module | None = None,
            known: Mapping[str, torch.Tensor | None] | None = None) -> Any:
        """Score a state dict (or a `model` as it is) under `key` on every split (once);
        `known`: split -> log-probabilities already computed (in the split's order)."""
        if key in self.log_probs:
            return key
        out = {s: lp for s, lp in (known or {}).items() if lp is not None and s in self.splits}
        todo = [s for s in self.splits if s not in out]
        if todo:
            if model is None:
                self.net.load_state_dict(dict(state or {}), strict=True)
                model = self.net
            for s in todo:
                out[s], self.labels[s] = predict_log_probs(model, self.splits[s], device=self.device)
        self.log_probs[key] = out
        return key

    def label(self, split: str) -> torch.Tensor:
        if split not in self.labels:
            self.labels[split] = torch.cat([labelled_batch(b, what="scoring baselines")[1].long().cpu()
                                            for b in self.splits[split]])
        return self.labels[split]

    def row(self, name: str, kind: str, keys: Sequence[Any], *, weights: Sequence[float] | None = None,
            **extra: Any) -> dict[str, Any]:
        """One report row: name, kind, cost (distinct models with a positive weight) and,
        per split, the mixture's {loss, acc, nll, ece, n}."""
        w = list(weights) if weights is not None else [1.0] * len(keys)
        row: dict[str, Any] = {"name": name, "kind": kind, "cost": sum(1 for v in w if v > 0), **extra}
        for s in self.splits:
            row[s] = ensemble_metrics([self.log_probs[k][s] for k in keys], self.label(s),
                                      weights if weights is not None else None).to_dict()
        return row


def skipped_row(name: str, kind: str, cost: int, reason: str) -> dict[str, Any]:
    """A baseline that does not apply here, with the reason."""
    return {"name": name, "kind": kind, "cost": cost, "skipped": reason}


def weighted_average(states: Sequence[StateDict], weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """The weight average of state dicts (floating tensors; others from the first state)."""
    w = check_weights(weights if weights is not None else [1.0] * len(states), len(states))
    out = {}
    for k, v in states[0].items():
        if v.is_floating_point():
            acc = sum(wi * s[k].double() for wi, s in zip(w, states))
            out[k] = acc.to(v.dtype)
        else:
            out[k] = v.clone()
    return out


def soup_state(net: nn.Module, states: Sequence[StateDict], weights: Sequence[float] | None, train: Iterable[Any], *,
               device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The soup: `weighted_average` of the members, BatchNorm statistics re-estimated on
    `train` (batches split over processes under torchrun: every process must call this).
    `net` is used as scratch space."""
    net.load_state_dict(weighted_average(states, weights), strict=True)
    net.to(device)
    update_bn(net, train, device=device, distributed=True)
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}


def packed_state(net: nn.Module, a: StateDict, b: StateDict, train: Iterable[Any], *, graph=None,
                 device: str | torch.device = "cpu", progress: bool | None = None
                 ) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    """(the packed pair of A and B, None), or (None, why it does not apply). Layered networks
    get the dropout construction's (D_1(A) + D_1(B)) / 2; residual and squeeze-excite ones,
    which it refuses, the short path's (D_S(A) + D_T(B)) / 2; networks with LayerNorm or
    GroupNorm over channels neither."""
    try:
        try:
            return pack_pair(net, a, b, train, graph=graph, device=device, progress=progress), None
        except DropoutPathError:
            return pack_pair(net, a, b, train, graph=graph, device=device, progress=progress,
                             method="short"), None
    except MCEnsembleError as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        _log.info("packed pair skipped: %s", reason)
        return None, reason


def _fmt_weights(weights: Sequence[float]) -> str:
    return "/".join(f"{w:.2f}" for w in weights)


def decision_sentence(choice: Mapping[str, Any]) -> str:
    """What the member selection decided and why, in one or two sentences."""
    rule = choice.get("rule")
    if rule == "uniform":
        return (f"{choice['n_members']} members uniform in t with equal weights (no selection data: pass "
                "`val_data` to choose members)")
    nll = choice["selection_nll"]
    if rule == "exact":
        return (f"exactly {choice['n_members']} distinct members (`exact_members`), equal weights: selection "
                f"NLL {nll['chosen']:.4f} (best single {nll['best_single']:.4f}); no guarantee against "
                "the cheaper choices")
    tests = choice.get("bootstrap") or []
    last = tests[-1] if tests else None
    if rule == "greedy":
        t = next(t for t in reversed(tests) if t["accepted"])
        return (f"chose the greedy ensemble ({choice['n_members']} members, weights "
                f"{_fmt_weights(choice['weights'])}): selection NLL {t['nll_to']:.4f} against {t['nll_from']:.4f} "
                f"for the {t['from']}; the gain was positive in {t['p_positive']:.1%} of {t['resamples']} "
                f"bootstrap resamples ({t['confidence']:.0%} needed)")
    kept = "the two-endpoint ensemble" if rule == "endpoints" else "the best single candidate"
    if rule == "endpoints" and choice["n_members"] > 2:
        kept = f"the {choice['n_members']} checkpoints' ensemble"
    if last is None:
        return f"kept {kept} (selection NLL {nll['chosen']:.4f}): the greedy search found nothing lower"
    return (f"kept {kept} (selection NLL {nll['chosen']:.4f}): the {last['to']} lowered it to "
            f"{last['nll_to']:.4f}, but the gain was positive in only {last['p_positive']:.1%} of "
            f"{last['resamples']} bootstrap resamples ({last['confidence']:.0%} needed)")
