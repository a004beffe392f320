"""Per-example uncertainty of an ensemble: `EnsembleModel.predict(x)` returns a `Prediction`.

For K members with probabilities p_k (softmax of their logits) and weights w_k (sum 1):

- ``probs``: the ensemble's prediction, softmax(log(sum_k w_k p_k) / T) (T: the ensemble's
  temperature, `mcensemble.calibration`; T = 1 gives the weighted mean probability itself);
- ``entropy``: H[probs], the predictive entropy (natural log, nats);
- ``expected_entropy``: sum_k w_k H[p_k], the members' mean entropy (the aleatoric part);
- ``mutual_information``: H[sum_k w_k p_k] - sum_k w_k H[p_k] >= 0, the members'
  disagreement (the epistemic part; the Jensen gap of the entropy);
- ``disagreement``: sum_k w_k [argmax p_k != argmax probs], the weight of the members whose
  top class is not the ensemble's (0: all agree).

The temperature is applied after the members are averaged, so it changes ``probs`` and
``entropy`` but not the members: ``mutual_information`` and ``expected_entropy`` describe
the members and are the same at every temperature. At T = 1, entropy = expected_entropy +
mutual_information exactly (up to rounding).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from .errors import BadOptionError
from .members import check_weights, mean_log_prob

__all__ = ["Prediction", "entropy", "predict_from_logits"]


class Prediction(NamedTuple):
    """What `EnsembleModel.predict(x)` returns: (B, C) probabilities and (B,) uncertainties."""

    probs: torch.Tensor
    entropy: torch.Tensor
    expected_entropy: torch.Tensor
    mutual_information: torch.Tensor
    disagreement: torch.Tensor


def entropy(log_probs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """H = -sum p log p over `dim` from log-probabilities (0 log 0 = 0)."""
    p = log_probs.exp()
    return -(p * log_probs.masked_fill(p == 0, 0.0)).sum(dim)


def predict_from_logits(member_logits: torch.Tensor, weights: Sequence[float] | None = None,
                        temperature: float = 1.0) -> Prediction:
    """(K, B, C) member logits -> `Prediction` (see the module docstring). `weights`: K
    member weights (checked and normalised; None: equal); `temperature`: > 0, applied to the
    log of the weighted mean probability. Half-precision logits are combined in float32."""
    if member_logits.dim() != 3:
        raise BadOptionError(f"member outputs must be (K, batch, classes) logits; got shape "
                             f"{tuple(member_logits.shape)}", option="model")
    if member_logits.dtype in (torch.float16, torch.bfloat16):
        member_logits = member_logits.float()
    k = member_logits.shape[0]
    w = torch.tensor(check_weights(weights if weights is not None else [1.0] * k, k),
                     dtype=member_logits.dtype, device=member_logits.device)
    logp = torch.log_softmax(member_logits, dim=2)                           # (K, B, C)
    wl = w.tolist()
    mean_lp = mean_log_prob(logp, None if len(set(wl)) == 1 else wl)        # (B, C), as EnsembleModel's
    member_h = entropy(logp)                                                 # (K, B)
    expected = (w.view(k, 1) * member_h).sum(0)
    mi = (entropy(mean_lp) - expected).clamp_min(0.0)
    cal_lp = torch.log_softmax(mean_lp / temperature, dim=1) if temperature != 1.0 else mean_lp
    top = cal_lp.argmax(1)
    disagree = (w.view(k, 1) * (logp.argmax(2) != top.unsqueeze(0)).to(w.dtype)).sum(0)
    return Prediction(probs=cal_lp.exp(), entropy=entropy(cal_lp), expected_entropy=expected,
                      mutual_information=mi, disagreement=disagree)
