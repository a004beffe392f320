"""The packed pair: two dropout networks in the body of one.

The midpoint of step 3 of the dropout-stable path (`mcensemble.paths.dropout`), or of
segment 3 of the short path (`mcensemble.paths.short`, `method="short"`, for residual and
squeeze-excite networks too): D_1(A) (or D_S(A)) lives in half of every hidden group's
units, D_1(B) (D_T(B)) in the free half, and the classifier reads both with half weight. It is one state dict of the original
architecture and size whose logits are the mean of D_1(A)'s and D_1(B)'s logits (a
two-member logit-averaging ensemble at the cost of one model), loadable with
`load_state_dict` or timm like any checkpoint of the architecture.
"""
from __future__ import annotations

import copy
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .bn import labelled_batch
from .errors import BadOptionError, DataSpecError
from .evaluate import expected_calibration_error
from .paths.dropout import _prepare, mix_states
from .paths.short import prepare_short
from .precision import resolve_precision

__all__ = ["pack_pair", "pack_report"]


def pack_pair(model: nn.Module, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
              loader: Iterable[Any], *, graph=None, stability_a=None, stability_b=None,
              device="cpu", progress: bool | None = None, search_steps: int | None = None,
              method: str = "dropout", halves=None) -> dict[str, torch.Tensor]:
    """One state dict of `model`'s architecture computing (D_1(A) + D_1(B)) / 2 in logit
    space. `loader` (training data) chooses the kept halves (unless `stability_a` /
    `stability_b` are given) and re-estimates BatchNorm statistics of the dropout networks.

    `method`: "dropout" (the midpoint of the dropout-stable path's switch; layered networks
    only, others raise `DropoutPathError`) or "short" (the midpoint of the short path's
    segment 3: D_S(A) and D_T(B), every group dropped at once, so residual and squeeze-excite
    networks too; `halves` = (A's kept units, B's kept units) per group skips the search;
    LayerNorm / GroupNorm networks raise `ShortPathError`). `search_steps`: swap trials per
    group when choosing the halves (default 48 for "dropout", 4 for "short")."""
    if method == "short":
        con = prepare_short(model, a, b, loader, graph=graph, halves=halves, device=device,
                            progress=progress, search_steps=4 if search_steps is None else search_steps,
                            random_baseline=False)
        return mix_states(con.vertices[2], con.vertices[3], 0.5)
    if method != "dropout":
        raise BadOptionError(f"pack `method` must be dropout or short, got {method!r}", option="method")
    search_steps = 48 if search_steps is None else search_steps
    _, con, side_a, side_b = _prepare(model, a, b, loader, graph=graph, stability_a=stability_a,
                                      stability_b=stability_b, device=device, progress=progress,
                                      search_steps=search_steps)
    tr, pa = con.forward(side_a)
    pb = [side_b.slots(j, j % 2) for j in range(len(con.chain))]  # where B's chain ends
    con.cross(tr, side_a, side_b, pa, pb)
    before, after = tr.vertices[-2], tr.vertices[-1]
    return mix_states(before, after, 0.5)


def _logits(model: nn.Module, state: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    model.load_state_dict(state)
    prec = resolve_precision(None, x.device)
    with prec.autocast():  # the current precision (--precision, --channels-last)
        out = model(prec.input(x))
    return (out[0] if isinstance(out, (tuple, list)) else out).float()


def _metrics(logp: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    nll = float(F.nll_loss(logp, y))
    return {"acc": float((logp.argmax(1) == y).float().mean()), "nll": nll,
            "ece": expected_calibration_error(logp.exp(), y), "n": int(y.numel())}


@torch.no_grad()
def pack_report(model: nn.Module, packed: Mapping[str, torch.Tensor], a: Mapping[str, torch.Tensor],
                b: Mapping[str, torch.Tensor], loader: Iterable[Any], *,
                device="cpu") -> dict[str, dict[str, float]]:
    """Accuracy / NLL / ECE on `loader` of the packed model, A, B, and the 2-member
    ensemble of A and B (mean probability): `{"packed": {...}, "A": ..., "B": ...,
    "ensemble": ...}`. Models are evaluated in eval mode with their stored statistics."""
    work = copy.deepcopy(model).to(device).eval()
    outs: dict[str, list[torch.Tensor]] = {k: [] for k in ("packed", "A", "B", "ensemble")}
    ys = []
    for batch in loader:
        x, y = labelled_batch(batch, what="pack_report")
        x = x.to(device)
        la = F.log_softmax(_logits(work, a, x), 1)
        lb = F.log_softmax(_logits(work, b, x), 1)
        outs["A"].append(la.cpu())
        outs["B"].append(lb.cpu())
        outs["packed"].append(F.log_softmax(_logits(work, packed, x), 1).cpu())
        outs["ensemble"].append((torch.logaddexp(la, lb) - torch.log(torch.tensor(2.0))).cpu())
        ys.append(y.long().cpu())
    if not ys:
        raise DataSpecError("pack_report: the data loader yielded no batches; give a non-empty "
                            "data set", option="data")
    y = torch.cat(ys)
    return {k: _metrics(torch.cat(v), y) for k, v in outs.items()}
