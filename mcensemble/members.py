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
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .bn import has_batchnorm, labelled_batch, update_bn
from .errors import BadOptionError, DataSpecError
from .evaluate import Metrics, _load_state_strict, evaluate, expected_calibration_error

__all__ = ["Candidate", "global_to_local", "uniform_points", "evaluate_candidates", "select_greedy_nll",
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
    if k < 1:
        raise BadOptionError(f"--members must be at least 1, got {k}", option="--members")
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
    """(log_softmax outputs (N, C), labels (N,)) on CPU, model in eval mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    outs, labels = [], []
    try:
        for batch in loader:
            x, y = labelled_batch(batch, what="evaluation")
            outs.append(F.log_softmax(model(x.to(device)).float(), dim=-1).cpu())
            labels.append(torch.as_tensor(y).cpu())
    finally:
        for m, mode in modes:  # every module's own flag, as evaluate() does
            m.training = mode
    if not outs:
        raise DataSpecError("cannot predict: the data loader yielded no batches; give a non-empty "
                            "data set", option="--data")
    return torch.cat(outs), torch.cat(labels)


def ensemble_metrics(log_probs: Sequence[torch.Tensor], labels: torch.Tensor) -> Metrics:
    """Metrics of the mean-probability ensemble of members' log-probabilities."""
    lp = torch.logsumexp(torch.stack(list(log_probs)), dim=0) - math.log(len(log_probs))
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
    from . import distributed as dist_
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
    if k < 1:
        raise BadOptionError(f"--members must be at least 1, got {k}", option="--members")
    if k > len(cands):
        raise BadOptionError(f"--members {k} is more than the {len(cands)} candidate points; "
                             "raise --candidates or lower --members", option="--members")
    if any(c.val_log_probs is None for c in cands):
        raise ValueError("greedy selection needs validation log-probabilities for every candidate")
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
