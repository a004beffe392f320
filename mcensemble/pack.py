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
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .bn import FixedSubset, labelled_batch
from .errors import BadOptionError, DataSpecError
from .evaluate import expected_calibration_error
from .paths.dropout import _prepare, mix_states
from .paths.short import prepare_short
from .precision import resolve_precision

__all__ = ["PackedPair", "pack_pair", "pack_report", "certificate_line"]


@dataclass
class PackedPair:
    """What `pack_pair` made. `state`: the packed state dict. `certificate`: `{eps (the
    larger of eps_a and eps_b), eps_a, eps_b (L(D(X)) - L(X)), loss_a, loss_b, loss_da,
    loss_db, bound, data}` on the training data: the packed logits are the mean of D(A)'s
    and D(B)'s, and cross entropy is convex in the logits, so the packed model's training
    loss is at most `bound` = (loss_da + loss_db) / 2. `data` says which examples each
    number used. `search`: what the half search did (per side for "dropout")."""

    state: dict[str, torch.Tensor]
    method: str
    certificate: dict[str, Any]
    search: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Everything but the state (JSON)."""
        return {"method": self.method, "certificate": dict(self.certificate), "search": dict(self.search),
                "seconds": float(self.seconds)}


def _data_note(loader, sub: FixedSubset | None) -> str:
    if sub is not None:
        return f"a fixed subsample of the training data ({sub.describe()})"
    try:
        return f"all the training data ({len(loader)} batches)"
    except TypeError:
        return "all the training data"


def pack_pair(model: nn.Module, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
              loader: Iterable[Any], *, graph=None, stability_a=None, stability_b=None,
              device="cpu", progress: bool | None = None, search_steps: int | None = None,
              method: str = "dropout", halves=None, data_examples: int | None = None) -> PackedPair:
    """One state dict of `model`'s architecture computing (D_1(A) + D_1(B)) / 2 in logit
    space, with its certificate (`PackedPair`). `loader` (training data) chooses the kept
    halves (unless `stability_a` / `stability_b` are given), re-estimates BatchNorm
    statistics of the dropout networks and measures eps.

    `method`: "dropout" (the midpoint of the dropout-stable path's switch; layered networks
    only, others raise `DropoutPathError`) or "short" (the midpoint of the short path's
    segment 3: D_S(A) and D_T(B), every group dropped at once, so residual and squeeze-excite
    networks too; `halves` = (A's kept units, B's kept units) per group skips the search;
    LayerNorm / GroupNorm networks raise `ShortPathError`). `search_steps`: swap trials per
    group when choosing the halves (default 48 for "dropout", 4 for "short"; 0: the
    importance ranking alone). `data_examples`: None uses all of `loader`; a number does
    everything (search, BatchNorm, eps) on a fixed subsample of about that many examples
    spread over `loader` (`mcensemble.bn.FixedSubset`): the cheap form build reports use.
    Only D_1 (the lowest depth) is measured: the pair needs no other."""
    if method not in ("dropout", "short"):
        raise BadOptionError(f"pack `method` must be dropout or short, got {method!r}", option="method")
    t0 = time.perf_counter()
    sub = None if data_examples is None or loader is None else FixedSubset(loader, data_examples, what="pack")
    data = loader if sub is None else sub
    note = _data_note(loader, sub)
    if method == "short":
        con = prepare_short(model, a, b, data, graph=graph, halves=halves, device=device,
                            progress=progress, search_steps=4 if search_steps is None else search_steps,
                            random_baseline=False)
        e = con.eps
        cert = {"eps": e["eps"], "eps_a": e["loss_da"] - e["loss_a"], "eps_b": e["loss_db"] - e["loss_b"],
                **{k: e[k] for k in ("loss_a", "loss_b", "loss_da", "loss_db")}}
        state = mix_states(con.vertices[2], con.vertices[3], 0.5)
        search = dict(con.halves.search)
        search_data = None if halves is not None else f"the first {search.get('examples', '?')} examples of {note}"
    else:
        search_steps = 48 if search_steps is None else search_steps
        _, con, side_a, side_b = _prepare(model, a, b, data, graph=graph, stability_a=stability_a,
                                          stability_b=stability_b, device=device, progress=progress,
                                          search_steps=search_steps, lowest_only=True)
        tr, pa = con.forward(side_a)
        pb = [side_b.slots(j, j % 2) for j in range(len(con.chain))]  # where B's chain ends
        con.cross(tr, side_a, side_b, pa, pb)
        state = mix_states(tr.vertices[-2], tr.vertices[-1], 0.5)
        low = con.chain[0].depth
        cert = {"loss_a": side_a.stab.base_loss, "loss_b": side_b.stab.base_loss}
        for x, side in (("a", side_a), ("b", side_b)):
            row = next((r for r in side.stab.depths if r["depth"] == low), None)
            cert[f"loss_d{x}"] = float("nan") if row is None else row["loss"]
            cert[f"eps_{x}"] = float("nan") if row is None else row["increase"]
        cert["eps"] = max(cert["eps_a"], cert["eps_b"], 0.0)
        search = {"A": side_a.stab.search, "B": side_b.stab.search}
        given = stability_a is not None and stability_b is not None
        search_data = None if given else f"the first examples of {note} (see search.*.examples)"
        if given:
            note = "the data the given stability results were measured on"
    cert["bound"] = (cert["loss_da"] + cert["loss_db"]) / 2
    cert["data"] = {"losses": note, "batchnorm": note, "search": search_data}
    return PackedPair(state, method, cert, search, time.perf_counter() - t0)


def certificate_line(cert: Mapping[str, Any]) -> str:
    """The packed pair's certificate in one line (CLI, build reports)."""
    return (f"eps {cert['eps']:.4f} (A {cert['eps_a']:+.4f}, B {cert['eps_b']:+.4f}); training loss of the "
            f"packed model <= {cert['bound']:.4f} (mean of L(D(A)) {cert['loss_da']:.4f} and L(D(B)) "
            f"{cert['loss_db']:.4f}; on {cert['data']['losses']})")


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
