"""Temperature scaling of an ensemble, and the calibration metrics its reports show.

One temperature T > 0 is fitted on held-out data (the data members were selected on) by
minimising the NLL of ``log_softmax(log p_ens / T)`` with L-BFGS over log T (Guo et al. 2017;
Ashukha et al. 2020 compare ensembles only after it). It is applied after the members are
averaged: the ensemble's top class never changes, only its confidence. The ensemble file
stores it in its metadata (``"calibration": {"temperature": T, ...}``); `EnsembleModel`
applies it in `forward` and `predict`. A file without one loads with T = 1.

Metrics: NLL; ECE is `evaluate.expected_calibration_error` (15 equal-width bins, the one
ECE every mcensemble report shows); the Brier score is
``mean_n sum_c (p_nc - [c = y_n])^2`` (Brier 1950: summed over classes, in [0, 2]).
Own code, not torchmetrics: the project already reports its ECE everywhere, and a second
implementation (torchmetrics' binning, its own dependency) would make rows disagree in
their last digits; both functions are tested against hand computations.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F

from .errors import BadOptionError, DataSpecError
from .evaluate import expected_calibration_error
from .members import predict_log_probs

__all__ = ["fit_temperature", "apply_temperature", "brier_score", "calibration_metrics", "check_temperature",
           "calibration_summary", "calibrate_ensemble", "calibrate_build", "file_record", "MIN_TEMPERATURE",
           "MAX_TEMPERATURE", "NO_SELECTION_DATA"]

#: the fitted temperature is kept within these bounds (beyond them the data say "always
#: certain" or "never certain", not a temperature)
MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0


def check_temperature(value: Any, *, option: str = "temperature") -> float:
    """`value` as a float if it is a finite number > 0, else `BadOptionError(option=option)`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise BadOptionError(f"{option} must be a finite number > 0, got {value!r}", option=option)
    return float(value)


def apply_temperature(log_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(log_probs / T) over the class axis (1); T = 1 returns `log_probs` as is."""
    t = check_temperature(temperature)
    return log_probs if t == 1.0 else torch.log_softmax(log_probs / t, dim=1)


def fit_temperature(log_probs: torch.Tensor, labels: torch.Tensor, *, max_iter: int = 100) -> float:
    """The T minimising the mean NLL of `apply_temperature(log_probs, T)` on (N, C) log-probs
    (or logits) and (N,) labels: L-BFGS (strong Wolfe line search) over log T from T = 1,
    in float64, kept within [MIN_TEMPERATURE, MAX_TEMPERATURE]."""
    if log_probs.ndim != 2 or labels.ndim != 1 or log_probs.shape[0] != labels.shape[0]:
        raise BadOptionError(f"expected log-probabilities (N, C) and labels (N,), got {tuple(log_probs.shape)} "
                             f"and {tuple(labels.shape)}", option="data")
    if log_probs.shape[0] == 0:
        raise DataSpecError("cannot fit a temperature on no examples; give non-empty selection data",
                            option="val_data")
    lp = log_probs.detach().double().cpu()
    y = labels.detach().long().cpu()
    lp = lp - lp.max(dim=1, keepdim=True).values  # -inf only where a probability is exactly 0
    lp = lp.clamp_min(-1e4)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")
    lo, hi = math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(lp / log_t.clamp(lo, hi).exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    t = float(log_t.detach().clamp(lo, hi).exp())
    return t if math.isfinite(t) else 1.0


def brier_score(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """mean over examples of sum over classes of (p_c - [c = y])^2, for (N, C) probabilities."""
    probs = probs.double()
    onehot = F.one_hot(labels.long(), probs.shape[1]).double()
    return float(((probs - onehot) ** 2).sum(1).mean())


def calibration_metrics(log_probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """{"nll", "ece", "brier"} of (N, C) log-probabilities against (N,) labels."""
    labels = labels.long()
    lp = log_probs.double()
    return {"nll": float(F.nll_loss(lp, labels)), "ece": expected_calibration_error(lp.exp(), labels),
            "brier": brier_score(lp.exp(), labels)}


def calibration_summary(fit: tuple[torch.Tensor, torch.Tensor], fit_split: str,
                        others: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                        *, temperature: float | None = None) -> dict[str, Any]:
    """Fit T on `fit` = (log-probs, labels) (or use `temperature`), and report NLL, ECE and
    Brier before (T = 1) and after on the fit split and on each of `others`:
    `{"temperature", "fit": fit_split, "n_fit", <split>: {"before": {...}, "after": {...}}}`."""
    t = fit_temperature(*fit) if temperature is None else check_temperature(temperature)
    out: dict[str, Any] = {"temperature": t, "fit": fit_split, "n_fit": int(fit[1].numel())}
    for split, (lp, y) in {fit_split: fit, **dict(others or {})}.items():
        out[split] = {"before": calibration_metrics(lp, y), "after": calibration_metrics(apply_temperature(lp, t), y)}
    return out


def calibrate_ensemble(ens, fit_loader: Iterable, *, fit_split: str = "val",
                       others: Mapping[str, Iterable | None] | None = None,
                       device: str | torch.device = "cpu") -> dict[str, Any]:
    """Fit `ens`'s temperature on `fit_loader` (labelled batches; the ensemble's own
    temperature is set to 1 first) and set it (`ens.temperature`); returns
    `calibration_summary` with the loaders of `others` (split -> loader or None) scored too."""
    ens.temperature = 1.0
    fit = predict_log_probs(ens, fit_loader, device=device)
    scored = {s: predict_log_probs(ens, ld, device=device) for s, ld in (others or {}).items() if ld is not None}
    summary = calibration_summary(fit, fit_split, scored)
    ens.temperature = summary["temperature"]
    return summary


#: why a build without selection data stores no temperature
NO_SELECTION_DATA = ("no --val-data: the temperature is fitted on held-out selection data only; the ensemble is "
                     "stored uncalibrated (T = 1)")


def calibrate_build(ens, val: Iterable | None, test: Iterable | None, *, enabled: bool,
                    device: str | torch.device = "cpu") -> dict[str, Any] | None:
    """A build's calibration (`build`, and `--no-calibrate` off): with `enabled` and
    selection data `val`, `calibrate_ensemble` on it (the test split scored too) and set
    `ens.temperature`; without `val`, `{"skipped": why}`; not `enabled`: None."""
    if not enabled:
        return None
    if val is None:
        return {"skipped": NO_SELECTION_DATA}
    return calibrate_ensemble(ens, val, fit_split="val", others={"test": test}, device=device)


def file_record(summary: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """What the ensemble file stores of a calibration summary: the temperature, the split
    and size it was fitted on, and the NLL there before and after (None: nothing fitted)."""
    if not summary or "temperature" not in summary:
        return None
    fit = summary[summary["fit"]]
    return {"temperature": summary["temperature"], "method": "temperature", "fit": summary["fit"],
            "n_fit": summary["n_fit"], "nll_before": fit["before"]["nll"], "nll_after": fit["after"]["nll"]}
