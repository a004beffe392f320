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
from .calibration import calibration_summary
from .errors import DropoutPathError, MCEnsembleError
from .members import check_weights, ensemble_metrics, mean_log_prob, paired_bootstrap, predict_log_probs
from .pack import pack_pair

__all__ = ["Scorer", "weighted_average", "soup_state", "packed_state", "skipped_row", "decision_sentence",
           "vs_reference", "SOUP_NOTE", "PACKED_ROW_EXAMPLES"]

_log = logging.getLogger(__name__)

StateDict = Mapping[str, torch.Tensor]

SOUP_NOTE = "the members' weight average (by member weight), BatchNorm re-estimated on the training data"


class Scorer:
    """Log-probabilities of models on named splits, and the metrics of (weighted) mixtures.

    `net`: the architecture (copied once as scratch space; state dicts are loaded into the
    copy). `splits`: name -> loader of labelled batches. `calibrate`: a split name: every
    row then also gets `"calibration"` (`calibration.calibration_summary`: a temperature
    fitted on that split, NLL / ECE / Brier before and after on every split)."""

    def __init__(self, net: nn.Module, splits: Mapping[str, Iterable[Any]], *, device: str | torch.device = "cpu",
                 calibrate: str | None = None):
        self.net = copy.deepcopy(net)
        self.splits = dict(splits)
        self.device = device
        self.calibrate = calibrate if calibrate in self.splits else None
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
        if self.calibrate is not None:
            mix = {s: (mean_log_prob(torch.stack([self.log_probs[k][s] for k in keys]), weights), self.label(s))
                   for s in self.splits}
            fit = mix.pop(self.calibrate)
            row["calibration"] = calibration_summary(fit, self.calibrate, mix)
        return row


def vs_reference(sc: Scorer, ref_name: str, ref_keys: Sequence[Any], keys: Sequence[Any], *,
                 weights: Sequence[float] | None = None) -> dict[str, Any]:
    """The mixture of `keys` against the reference mixture of `ref_keys` (equal weights) on
    every split of `sc`: the NLL gain per example (positive: lower than the reference's),
    with its paired bootstrap interval (`members.paired_bootstrap`)."""
    out: dict[str, Any] = {"reference": ref_name}
    for s in sc.splits:
        y = sc.label(s).long().view(-1, 1)
        ref = -mean_log_prob(torch.stack([sc.log_probs[k][s] for k in ref_keys])).gather(1, y).squeeze(1)
        new = -mean_log_prob(torch.stack([sc.log_probs[k][s] for k in keys]), weights).gather(1, y).squeeze(1)
        res = paired_bootstrap(ref, new)
        out[s] = {"examples": int(y.numel()), **{k: res[k] for k in ("gain", "ci95", "p_positive")}}
    return out


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


#: the packed-pair row of build / eval reports: importance-ranked halves (no swap search) and
#: BatchNorm / eps on a fixed subsample of this many training examples; `mcensemble pack`
#: (or `--method dropout|short`) runs the full search
PACKED_ROW_EXAMPLES = 1024


def packed_state(net: nn.Module, a: StateDict, b: StateDict, train: Iterable[Any], *, graph=None,
                 device: str | torch.device = "cpu", progress: bool | None = None,
                 search_steps: int | None = 0, data_examples: int | None = PACKED_ROW_EXAMPLES):
    """(the packed pair of A and B (`mcensemble.pack.PackedPair`), None), or (None, why it
    does not apply). Layered networks get the dropout construction's (D_1(A) + D_1(B)) / 2;
    residual and squeeze-excite ones, which it refuses, the short path's (D_S(A) + D_T(B)) / 2;
    networks with LayerNorm or GroupNorm over channels neither. The defaults are the cheap
    form a report row uses (`search_steps=0`: the importance ranking alone; BatchNorm and eps
    on a fixed subsample of `data_examples` training examples); `search_steps=None,
    data_examples=None` is `mcensemble pack`'s full search."""
    kw = dict(graph=graph, device=device, progress=progress, search_steps=search_steps, data_examples=data_examples)
    try:
        try:
            return pack_pair(net, a, b, train, **kw), None
        except DropoutPathError:
            return pack_pair(net, a, b, train, method="short", **kw), None
    except MCEnsembleError as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        _log.info("packed pair skipped: %s", reason)
        return None, reason


def _fmt_weights(weights: Sequence[float]) -> str:
    return "/".join(f"{w:.2f}" for w in weights)


def _interval(test: Mapping[str, Any]) -> str:
    lo, hi = test["ci95"]
    return f"{test['gain']:+.4f} (95% interval {lo:+.4f} to {hi:+.4f})"


def _cost_line(choice: Mapping[str, Any]) -> str:
    """What a cheaper choice asked for by `members` costs against the checkpoints' ensemble."""
    vs = choice.get("vs_checkpoints")
    if not vs:
        return ""
    where = "out of part" if vs["scored_on"] == "out of part" else "on the selection examples"
    return (f"; against {vs['name']} it {'gains' if vs['gain'] > 0 else 'loses'} {abs(vs['gain']):.4f} NLL "
            f"{where} (gain {_interval(vs)}), the price of the smaller `members` asked for")


def _picked(conf: Mapping[str, Any]) -> str:
    k, n = conf.get("parts", 2), conf.get("examples")
    return (f"the alternative was picked without each of {k} parts of the {n} selection examples and scored on "
            f"that part (cross-fitting)")


def decision_sentence(choice: Mapping[str, Any]) -> str:
    """What the member selection decided and why: the reference, the alternative, the
    examples it was picked and confirmed on, the confirmed gain with its interval, the rule."""
    rule = choice.get("rule")
    if rule == "uniform":
        return (f"{choice['n_members']} members uniform in t with equal weights, not compared with the "
                "checkpoints (no selection data: pass `val_data` to choose members and confirm them)")
    nll = choice["selection_nll"]
    ref = choice["reference"]
    if rule == "exact":
        return (f"exactly {choice['n_members']} distinct members (`exact_members`), equal weights: selection "
                f"NLL {nll['chosen']:.4f} against {ref['selection_nll']:.4f} for the reference, {ref['name']}; "
                "picked and scored on the same examples, not confirmed")
    conf = choice.get("confirmation") or {}
    test = conf.get("test")
    if rule == "confirmed":
        return (f"rule confirmed: shipped the greedy ensemble ({choice['n_members']} members, weights "
                f"{_fmt_weights(choice['weights'])}) instead of the reference, {ref['name']}: {_picked(conf)}, "
                f"out-of-part NLL gain {_interval(test)}, "
                f"{test['relative_gain']:.1%} of the reference's, positive in {test['p_positive']:.1%} of "
                f"{test['resamples']} paired bootstrap resamples ({test['confidence']:.0%} needed)"
                + _cost_line(choice))
    why = conf.get("reason") or "no alternative beat it"
    tested = f" (out-of-part NLL gain {_interval(test)})" if test else ""
    return (f"rule reference: kept the reference, {ref['name']} (selection NLL {ref['selection_nll']:.4f}): "
            f"{_picked(conf)}; "
            f"{why}{tested}" + _cost_line(choice))
