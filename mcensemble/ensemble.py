"""Ensembles: `EnsembleModel`, the ensemble file, and fast inference over K members.

An `EnsembleModel` holds K members of one architecture. Their weights live in *stacked*
tensors (one `(K, ...)` tensor per parameter / buffer name); each member is an ordinary
`nn.Module` whose parameters and buffers are views of row i of those tensors. So the
ensemble holds exactly K copies of the weights, and both inference strategies read the same
memory:

- "loop" (default): call each member module in turn (plain PyTorch, any model);
- "vmap": `torch.func.vmap` over `torch.func.functional_call` of a weightless (meta-device)
  copy of the architecture, fed the stacked tensors (what `torch.func.stack_module_state`
  builds, without a second copy);
- "auto" (opt-in): on the first batch of each (device, dtype, input shape) in eval mode,
  time both (a few runs each, under `no_grad`) and keep the faster one (`ens.strategy`).

The default is "loop": "auto" picked the loop in 8 of 9 benchmark cases, and its choice
depended on the machine's load at the first batch. Pass `strategy="vmap"` or "auto" to try.

`forward(x)` returns log of the mean of the members' softmax probabilities, so `argmax`,
`softmax` and `cross_entropy` work on it as on one classifier's logits. A temperature
stored in the file (`mcensemble.calibration`) is applied after the mean: log_softmax(. / T).
`predict(x)` adds per-example uncertainty (`mcensemble.uncertainty.Prediction`).

The ensemble file is one safetensors file: member tensors are `member.<i>.<name>`, and the
header metadata key `mcensemble` holds a JSON document (format, format_version, model spec,
members, combine rule, sources, calibration).
"""
from __future__ import annotations

import copy
import json
import logging
import math
import numbers
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from ._io import (HASHES_KEY, atomic_path, can_stream_safetensors, independent_tensors, meta_field, read_header,
                  sha256_file, tensor_hashes, to_json, verify_tensor_hashes, write_safetensors_streamed)
from .calibration import check_temperature
from .checkpoints import meta_shapes
from .errors import (ArchitectureMismatchError, BadOptionError, CheckpointError, MCEnsembleError, ModelSpecError,
                     NonFiniteError)
from .members import check_weights, mean_log_prob
from .models import ModelLike, ModelSpec, as_factory, create_model
from .precision import parse_dtype
from .uncertainty import Prediction, predict_from_logits

__all__ = [
    "EnsembleModel", "LazyEnsembleModel", "save_ensemble", "load_ensemble", "read_ensemble_metadata", "verify_ensemble_file", "combine_mean_prob",
    "loop_strategy", "vmap_strategy", "STRATEGIES", "FORMAT", "FORMAT_VERSION", "METADATA_KEY",
]

logger = logging.getLogger(__name__)

FORMAT = "mcensemble-ensemble"
FORMAT_VERSION = 1
METADATA_KEY = "mcensemble"
# "auto" picks vmap only when it is this much faster than the loop (the loop is the
# simpler, always-working path, and timings on a busy machine are noisy).
AUTO_MARGIN = 0.95
AUTO_MAX_ROUNDS = 12      # timing rounds (one loop + one vmap run each) for cheap batches
AUTO_BUDGET_S = 0.25      # ... while the rounds so far took less than this
_RESERVED = ("format", "format_version", "model", "members", "combine", "sources", "tensor_sha256", "calibration")

StateDict = Mapping[str, torch.Tensor]
StrategyFn = Callable[["EnsembleModel", torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- combination

def combine_mean_prob(member_logits: torch.Tensor, weights: Sequence[float] | None = None) -> torch.Tensor:
    """(K, B, C, ...) member logits -> (B, C, ...) log of the (weighted) mean member probability.

    `logsumexp_k log_softmax(logits_k) - log K`, or with `weights` (K values, normalised
    here) `logsumexp_k (log_softmax(logits_k) + log w_k)`; the class axis is axis 1 of each
    member's output (axis 2 here).
    """
    if member_logits.dim() < 3:
        raise BadOptionError(
            f"member outputs must be (batch, classes, ...) logits; got member_logits of shape "
            f"{tuple(member_logits.shape)} (K first)")
    if member_logits.dtype in (torch.float16, torch.bfloat16):
        member_logits = member_logits.float()  # combine half-precision members in float32
    logp = torch.log_softmax(member_logits, dim=2)
    return mean_log_prob(logp, None if weights is None or _equal(weights) else weights)


def _equal(weights: Sequence[float]) -> bool:
    w = list(weights)
    return all(v == w[0] for v in w) and bool(w) and w[0] > 0


def _calibrated(log_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(log_probs / T) over the class axis; T == 1 returns `log_probs` unchanged."""
    return log_probs if temperature == 1.0 else torch.log_softmax(log_probs / temperature, dim=1)


def _temperature_in(metadata: Mapping[str, Any]) -> float:
    """The temperature an ensemble's metadata records (`calibration.temperature`), else 1."""
    cal = metadata.get("calibration")
    if isinstance(cal, Mapping) and cal.get("temperature") is not None:
        return cal["temperature"]
    return 1.0


def _set_temperature(metadata: dict[str, Any], value: Any) -> float:
    """Check a temperature (`BadOptionError` naming `temperature`) and record it in
    `metadata["calibration"]` (the fit's other fields are kept when T is unchanged)."""
    t = check_temperature(value)
    cal = metadata.get("calibration")
    if isinstance(cal, Mapping) and cal.get("temperature") == t:
        return t
    if t != 1.0 or isinstance(cal, Mapping):
        metadata["calibration"] = {"temperature": t}
    return t


# --------------------------------------------------------------------------- strategies

def loop_strategy(ens: "EnsembleModel", x: torch.Tensor) -> torch.Tensor:
    """Call each member module in turn; returns (K, B, C) logits."""
    return torch.stack([m(x) for m in ens.members])


def vmap_strategy(ens: "EnsembleModel", x: torch.Tensor) -> torch.Tensor:
    """`vmap` over `functional_call` of the weightless base on the stacked tensors."""
    from torch.func import functional_call, vmap
    base = ens._synced_base()

    def one(params, buffers, inp):
        return functional_call(base, (params, buffers), (inp,))

    return vmap(one, in_dims=(0, 0, None), randomness="different")(
        ens._stacked_params, ens._stacked_buffers, x)


STRATEGIES: dict[str, StrategyFn] = {"loop": loop_strategy, "vmap": vmap_strategy}


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def _strategy_name(s: str | StrategyFn) -> str:
    return s if isinstance(s, str) else getattr(s, "__name__", type(s).__name__)


# --------------------------------------------------------------------------- state checks

def _check_member_state(state: StateDict, expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                        *, index: int, ref: str, check_dtype: bool) -> None:
    """Raise ArchitectureMismatchError naming the first tensor of member `index` that differs
    from `expected` (name -> (shape, dtype)) described as `ref`."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:5])}"
                         + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:5])}"
                         + (" ..." if len(unexpected) > 5 else ""))
        raise ArchitectureMismatchError(
            f"member {index} does not match {ref}: {'; '.join(parts)}. All members must be "
            f"state dicts of the same architecture.")
    for name, (shape, dtype) in expected.items():
        t = state[name]
        if not isinstance(t, torch.Tensor):
            raise ArchitectureMismatchError(
                f"member {index} tensor {name!r} is a {type(t).__name__}, not a tensor")
        if tuple(t.shape) != shape:
            raise ArchitectureMismatchError(
                f"member {index} tensor {name!r} has shape {tuple(t.shape)}, but {ref} has "
                f"shape {shape}. All members must share one architecture.")
        if check_dtype and t.dtype != dtype:
            raise ArchitectureMismatchError(
                f"member {index} tensor {name!r} has dtype {t.dtype}, but {ref} has {dtype}. "
                f"Cast the members to one dtype before saving.")


# --------------------------------------------------------------------------- the model

class _Calibrated:
    """`temperature` and `predict` of both ensemble classes (they hold `metadata`,
    `_temperature`, `weights` and `member_logits`)."""

    metadata: dict[str, Any]
    _temperature: float

    @property
    def temperature(self) -> float:
        """The temperature applied after the members are averaged (1: none). Setting it
        (finite, > 0) records it in `metadata["calibration"]`, which `save` writes."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._temperature = _set_temperature(self.metadata, value)

    def predict(self, x: torch.Tensor) -> Prediction:
        """Probabilities and per-example uncertainty (`mcensemble.uncertainty.Prediction`:
        probs, entropy, expected_entropy, mutual_information, disagreement), member weights
        and temperature applied; under `torch.no_grad()`."""
        with torch.no_grad():
            return predict_from_logits(self.member_logits(x), self.weights, self._temperature)  # type: ignore[attr-defined]


class EnsembleModel(_Calibrated, nn.Module):
    """K members of one architecture; `forward(x)` = log mean member probability, (B, C).

    Args:
        model: an `nn.Module`, a zero-argument callable returning one, or a `ModelSpec`:
            the architecture (its weights are not used).
        member_states: K state dicts, loaded strictly into the architecture. Any sequence
            with `len()`; items are read one at a time (so a lazy sequence keeps peak
            memory at K copies plus one member).
        metadata: the ensemble file's JSON document (or any dict); `ens.metadata`.
        weights: K member weights (finite, >= 0, sum > 0; normalised); default: the
            members' `"weight"` in `metadata["members"]` when every member has one, else equal.
        strategy: "loop" (default), "vmap", "auto" or a callable `fn(ens, x) -> (K, B, C)`.
        device: where the weights live (default: where the model's weights are).
        temperature: applied after the members are averaged (finite, > 0); default: the
            `metadata["calibration"]["temperature"]`, else 1 (no change).

    Members are in eval mode after construction. `ens.members` is an `nn.ModuleList`;
    `.to()`, `.half()`, `.cuda()` move the stacked storage once and keep the members views
    of it. Gradients: in loop mode gradients reach each member's parameters; the vmap
    strategy is used only when no gradient is needed (under `no_grad` / `inference_mode`,
    or with parameters that do not require grad), otherwise the loop runs.
    """

    def __init__(self, model: ModelLike, member_states: Sequence[StateDict], *,
                 metadata: Mapping[str, Any] | None = None,
                 strategy: str | StrategyFn = "loop",
                 device: str | torch.device | None = None,
                 weights: Sequence[float] | None = None, temperature: float | None = None):
        super().__init__()
        k = len(member_states)
        if k < 1:
            raise BadOptionError("an ensemble needs at least one member; got 0 member states",
                                 option="members")
        template = as_factory(model)()
        if not isinstance(template, nn.Module):
            raise BadOptionError(
                f"the model factory returned a {type(template).__name__}, not an nn.Module",
                option="model")
        template.eval()
        if device is not None:
            template.to(device)
        pnames = dict(template.named_parameters())          # deduplicated (tied weights once)
        bnames = dict(template.named_buffers())
        with torch.no_grad():
            stacked_p = {n: p.detach().unsqueeze(0).expand(k, *p.shape).clone()
                         for n, p in pnames.items()}
            stacked_b = {n: b.detach().unsqueeze(0).expand(k, *b.shape).clone()
                         for n, b in bnames.items()}
        expected = {n: (tuple(t.shape), t.dtype) for n, t in template.state_dict().items()}

        members = []
        for i in range(k):
            memo: dict[int, Any] = {}
            for n, p in pnames.items():
                memo[id(p)] = nn.Parameter(stacked_p[n][i], requires_grad=p.requires_grad)
            for n, b in bnames.items():
                memo[id(b)] = stacked_b[n][i]
            member = copy.deepcopy(template, memo)
            state = member_states[i]
            _check_member_state(state, expected, index=i, ref="the model",
                                check_dtype=False)
            try:
                member.load_state_dict(state, strict=True)
            except RuntimeError as e:
                raise ArchitectureMismatchError(
                    f"member {i} does not load into the model: {e}") from e
            members.append(member)
            del state
        self.members = nn.ModuleList(members)

        meta_memo: dict[int, Any] = {}
        for n, p in pnames.items():
            meta_memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"),
                                            requires_grad=p.requires_grad)
        for n, b in bnames.items():
            meta_memo[id(b)] = torch.empty_like(b, device="meta")
        base = copy.deepcopy(template, meta_memo)
        del template
        # Not registered: no weights, must stay out of state_dict / .to() / parameters().
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_stacked_params", stacked_p)
        object.__setattr__(self, "_stacked_buffers", stacked_b)
        self.metadata: dict[str, Any] = copy.deepcopy(dict(metadata or {}))
        self._weights: list[float] = [1.0 / k] * k
        if weights is None:
            weights = _weights_in(self.metadata.get("members"), k)
        if weights is not None:
            self.weights = weights
        self._temperature = 1.0
        self.temperature = temperature if temperature is not None else _temperature_in(self.metadata)
        self._strategy: str | StrategyFn = "loop"
        self.strategy = strategy
        # auto: key -> {"loop": seconds, "vmap": seconds | None, "winner": name}
        self.auto_timings: dict[tuple, dict[str, Any]] = {}
        self._vmap_failed: set[tuple] = set()
        self._last_used: str | None = None
        self.eval()

    # -- basics -----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.members)

    @property
    def model_spec(self) -> ModelSpec | None:
        """The ModelSpec recorded in `metadata["model"]`, if any."""
        d = self.metadata.get("model")
        return ModelSpec.from_dict(d) if isinstance(d, dict) else None

    def member_state_dict(self, i: int) -> dict[str, torch.Tensor]:
        """A fresh state dict (cloned tensors, parameters and persistent buffers) of member i."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"member index {i} out of range for an ensemble of {len(self)}")
        return {n: t.detach().clone() for n, t in self.members[i].state_dict().items()}

    def member_states(self) -> list[dict[str, torch.Tensor]]:
        return [self.member_state_dict(i) for i in range(len(self))]

    def _member_views(self) -> list[dict[str, torch.Tensor]]:
        """The members' state dicts without copies (views of the stacked tensors): for writing."""
        return [{n: t.detach() for n, t in m.state_dict().items()} for m in self.members]

    @property
    def weights(self) -> list[float]:
        """The members' weights in `forward` (normalised to sum 1; equal by default)."""
        return list(self._weights)

    @weights.setter
    def weights(self, value: Sequence[float]) -> None:
        self._weights = check_weights(value, len(self))
        members = self.metadata.get("members")
        if isinstance(members, list) and len(members) == len(self):  # keep the metadata in step
            for m, w in zip(members, self._weights):
                if isinstance(m, dict):
                    m["weight"] = w

    def save(self, file: str | os.PathLike, *, model_spec: ModelSpec | Mapping | None = None,
             sources: Iterable = (), extra: Mapping[str, Any] | None = None,
             dtype: str | torch.dtype | None = None) -> Path:
        """Write this ensemble to `file` (members, and what `metadata` says unless overridden;
        `dtype`: as in `save_ensemble`)."""
        md = self.metadata
        spec = model_spec if model_spec is not None else md.get("model")
        members = md.get("members") if isinstance(md.get("members"), list) and \
            len(md["members"]) == len(self) else None
        srcs = list(sources) or list(md.get("sources") or [])
        ex = {k: v for k, v in md.items() if k not in _RESERVED}
        ex.update(extra or {})
        return save_ensemble(file, self._member_views(), model_spec=spec, members=members,
                             sources=srcs, extra=ex or None,
                             weights=None if _equal(self._weights) else self._weights, dtype=dtype,
                             calibration=md.get("calibration"))

    # -- strategy ---------------------------------------------------------------------
    @property
    def strategy(self) -> str:
        """The strategy in use: "loop" / "vmap" (for "auto": the last one chosen; "auto"
        before the first batch), or a custom function's name."""
        if isinstance(self._strategy, str) and self._strategy == "auto":
            return self._last_used or "auto"
        return _strategy_name(self._strategy)

    @strategy.setter
    def strategy(self, value: str | StrategyFn) -> None:
        if isinstance(value, str):
            if value != "auto" and value not in STRATEGIES:
                raise BadOptionError(
                    f"unknown ensemble strategy {value!r}; choose auto, "
                    f"{', '.join(STRATEGIES)} or pass a function fn(ensemble, x)",
                    option="strategy")
        elif not callable(value):
            raise BadOptionError(
                f"strategy must be a name or a callable, got {type(value).__name__}",
                option="strategy")
        self._strategy = value
        if hasattr(self, "auto_timings"):
            self.auto_timings.clear()
        self._last_used = None

    # -- forward ----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log of the (weighted, `weights`) mean member probability, shape (B, C, ...);
        with a `temperature` T != 1, log_softmax of that over the class axis divided by T."""
        return _calibrated(combine_mean_prob(self.member_logits(x), self._weights), self._temperature)

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's output, stacked: (K, B, C, ...)."""
        s = self._strategy
        if not isinstance(s, str):
            self._last_used = None
            return s(self, x)
        if s == "loop":
            self._last_used = "loop"
            return loop_strategy(self, x)
        training = any(m.training for m in self.members.modules())
        needs_grad = torch.is_grad_enabled() and any(
            p.requires_grad for p in self.members.parameters())
        key = (str(x.device), x.dtype, tuple(x.shape), training)
        if needs_grad:
            # vmap runs on the stacked tensors, which are outside autograd.
            if s == "vmap" and key not in self._vmap_failed:
                logger.debug("ensemble: gradients requested, using the loop strategy")
            return self._run("loop", x, key)
        if s == "vmap":
            return self._run("vmap", x, key)
        # auto
        if training:
            # timing runs would update BatchNorm statistics several times
            return self._run("loop", x, key)
        rec = self.auto_timings.get(key)
        if rec is None:
            return self._measure(x, key)
        return self._run(rec["winner"], x, key)

    def _run(self, name: str, x: torch.Tensor, key: tuple) -> torch.Tensor:
        if name == "vmap" and key not in self._vmap_failed:
            snapshot = None
            if key[3]:   # training: a failed attempt must not leave half-updated buffers
                snapshot = {n: b.clone() for n, b in self._stacked_buffers.items()}
            try:
                out = vmap_strategy(self, x)
                self._last_used = "vmap"
                return out
            except Exception as e:  # noqa: BLE001 - any vmap failure falls back to the loop
                if snapshot is not None:
                    with torch.no_grad():
                        for n, b in snapshot.items():
                            self._stacked_buffers[n].copy_(b)
                out = loop_strategy(self, x)     # a genuine input error raises here
                self._vmap_failed.add(key)
                logger.warning(
                    "ensemble: the vmap strategy failed for this model (%s: %s); using the "
                    "loop strategy instead", type(e).__name__, _first_line(e))
                self._last_used = "loop"
                return out
        out = loop_strategy(self, x)
        self._last_used = "loop"
        return out

    def _measure(self, x: torch.Tensor, key: tuple, *, repeats: int = 3) -> torch.Tensor:
        """Time loop and vmap on this batch (1 warm-up each, then at least `repeats`
        interleaved rounds, more - up to AUTO_MAX_ROUNDS - while under AUTO_BUDGET_S; the
        best run of each counts), keep the faster for `key` (vmap must win by
        `AUTO_MARGIN`), and return the winner's output."""
        sync = (torch.cuda.synchronize if x.device.type == "cuda" and torch.cuda.is_available()
                else (lambda: None))
        times: dict[str, float | None] = {"loop": math.inf, "vmap": None}
        outs: dict[str, torch.Tensor] = {}

        def timed(name: str) -> float:
            sync()
            t0 = time.perf_counter()
            outs[name] = STRATEGIES[name](self, x)
            sync()
            return time.perf_counter() - t0

        with torch.no_grad():
            outs["loop"] = loop_strategy(self, x)      # warm-up; a bad input raises here
            try:
                outs["vmap"] = vmap_strategy(self, x)
                times["vmap"] = math.inf
            except Exception as e:  # noqa: BLE001 - any vmap failure means "use the loop"
                self._vmap_failed.add(key)
                logger.warning(
                    "ensemble: the vmap strategy failed for this model (%s: %s); using the "
                    "loop strategy", type(e).__name__, _first_line(e))
            t_start = time.perf_counter()
            for r in range(AUTO_MAX_ROUNDS):
                if r >= repeats and time.perf_counter() - t_start > AUTO_BUDGET_S:
                    break
                times["loop"] = min(times["loop"], timed("loop"))
                if times["vmap"] is not None:
                    times["vmap"] = min(times["vmap"], timed("vmap"))
        vt = times["vmap"]
        winner = "vmap" if vt is not None and vt < AUTO_MARGIN * times["loop"] else "loop"
        self.auto_timings[key] = {**times, "winner": winner}
        logger.debug("ensemble auto strategy for %s: %s", key, self.auto_timings[key])
        self._last_used = winner
        return outs[winner]

    # -- internals --------------------------------------------------------------------
    def _synced_base(self) -> nn.Module:
        """The weightless base, with every submodule's training flag copied from member 0."""
        base = self._base
        for b, m in zip(base.modules(), self.members[0].modules()):
            if b.training != m.training:
                b.training = m.training
        return base

    def _rebind(self) -> None:
        """Point every member's parameters and buffers at row i of the stacked tensors."""
        for i, member in enumerate(self.members):
            pid = {id(p): n for n, p in member.named_parameters()}
            bid = {id(b): n for n, b in member.named_buffers()}
            done: set[int] = set()
            for mod in member.modules():
                for n, p in mod._parameters.items():
                    if p is not None and id(p) not in done and id(p) in pid:
                        done.add(id(p))
                        p.data = self._stacked_params[pid[id(p)]][i]
                for n, b in list(mod._buffers.items()):
                    if b is not None and id(b) in bid:
                        mod._buffers[n] = self._stacked_buffers[bid[id(b)]][i]

    def _apply(self, fn, recurse: bool = True):
        # Convert the stacked storage once and re-point the members at it; converting each
        # member's tensors separately would break the sharing (2K copies).
        with torch.no_grad():
            grads = {}
            for i, member in enumerate(self.members):
                for n, p in member.named_parameters():
                    if p.grad is not None:
                        grads[(i, n)] = fn(p.grad)
                        p.grad = None
            sp = {n: fn(t) for n, t in self._stacked_params.items()}
            sb = {n: fn(t) for n, t in self._stacked_buffers.items()}
        object.__setattr__(self, "_stacked_params", sp)
        object.__setattr__(self, "_stacked_buffers", sb)
        self._rebind()
        for (i, n), g in grads.items():
            self.members[i].get_parameter(n).grad = g
        self.auto_timings.clear()
        return self

    def __deepcopy__(self, memo):
        # nn.Parameter.__deepcopy__ clones, which would give the copy's members their own
        # storage; re-point them at the copied stacked tensors instead.
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            object.__setattr__(new, k, copy.deepcopy(v, memo))
        new._rebind()
        return new

    def extra_repr(self) -> str:
        return f"members={len(self)}, strategy={self.strategy!r}"


# --------------------------------------------------------------------------- the file

def _as_member_info(members: Sequence[Mapping[str, Any]] | None, k: int) -> list[dict]:
    if members is None:
        return [{"t": None, "kind": "state"} for _ in range(k)]
    members = [dict(m) for m in members]
    if len(members) != k:
        raise BadOptionError(
            f"members= describes {len(members)} member(s) but {k} member state(s) were given",
            option="members")
    for i, m in enumerate(members):
        t = m.get("t")
        if t is not None:
            if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) \
                    or not 0.0 <= float(t) <= 1.0:
                raise BadOptionError(
                    f"member {i} has t={t!r}; t must be a number in [0, 1]", option="members")
            m["t"] = float(t)
        m.setdefault("t", None)
        kind = m.get("kind", "state")
        if not isinstance(kind, str):
            raise BadOptionError(f"member {i} has kind={kind!r}; kind must be a string",
                                 option="members")
        m["kind"] = kind
    return members


def _weights_in(members: Any, k: int) -> list[float] | None:
    """The members' `"weight"` values (None when no member has one; all or none must)."""
    if not isinstance(members, list) or len(members) != k:
        return None
    have = [isinstance(m, Mapping) and m.get("weight") is not None for m in members]
    if not any(have):
        return None
    if not all(have):
        raise BadOptionError(f"member {have.index(False)} has no weight but others do; give every member a "
                             f"weight or none", option="weights")
    return [m["weight"] for m in members]


def _with_weights(info: list[dict], weights: Sequence[float] | None) -> list[dict]:
    """Members' info with `"weight"` set from `weights` (or their own), checked and normalised."""
    if weights is None:
        weights = _weights_in(info, len(info))
        if weights is None:
            return info
    for m, w in zip(info, check_weights(weights, len(info))):
        m["weight"] = w
    return info


def _as_sources(sources: Iterable) -> list[dict]:
    out = []
    for s in sources:
        if isinstance(s, Mapping):
            out.append(dict(s))
        elif isinstance(s, (str, os.PathLike)):
            p = Path(s)
            if not p.is_file():
                raise CheckpointError(f"source checkpoint {str(p)!r} not found (needed for its sha256)")
            out.append({"file": p.name, "sha256": sha256_file(p)})
        else:
            raise BadOptionError(
                f"sources must be file paths or {{'file', 'sha256'}} dicts; got {type(s).__name__}",
                option="sources")
    return out


def _check_member_states(member_states: list[StateDict]) -> None:
    """Same tensor names, shapes and dtypes in every member, all finite."""
    if not member_states:
        raise BadOptionError("an ensemble needs at least one member; got 0 member states",
                             option="members")
    ref = member_states[0]
    for n, t in ref.items():
        if not isinstance(t, torch.Tensor):
            raise ArchitectureMismatchError(f"member 0 entry {n!r} is a {type(t).__name__}, not a tensor")
    expected = {n: (tuple(t.shape), t.dtype) for n, t in ref.items()}
    for i, st in enumerate(member_states[1:], start=1):
        _check_member_state(st, expected, index=i, ref="member 0", check_dtype=True)
    for i, st in enumerate(member_states):
        for n, t in st.items():
            if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
                raise NonFiniteError(
                    f"member {i} tensor {n!r} holds NaN or Inf; refusing to save a non-finite "
                    f"ensemble member")


def _spec_dict(model_spec: ModelSpec | Mapping[str, Any] | None) -> dict[str, Any] | None:
    if isinstance(model_spec, ModelSpec):
        return model_spec.to_dict()
    if model_spec is None:
        return None
    if isinstance(model_spec, Mapping):
        return ModelSpec.from_dict(dict(model_spec)).to_dict()
    raise BadOptionError(f"model_spec must be a ModelSpec or dict, got {type(model_spec).__name__}",
                         option="model_spec")


def save_ensemble(dest: str | os.PathLike, member_states: Sequence[StateDict], *,
                  model_spec: ModelSpec | Mapping[str, Any] | None = None,
                  members: Sequence[Mapping[str, Any]] | None = None,
                  sources: Iterable = (), extra: Mapping[str, Any] | None = None,
                  weights: Sequence[float] | None = None, dtype: str | torch.dtype | None = None,
                  calibration: Mapping[str, Any] | None = None) -> Path:
    """Write an ensemble file (safetensors, atomically) and return its path.

    member_states: K >= 1 state dicts with the same tensor names, shapes and dtypes, all
    finite (or an `EnsembleModel`, whose members are written). members: one dict per
    member (`t` in [0, 1] or None, `kind`, anything else JSON-able); default
    `{"t": None, "kind": "state"}`. sources: `{"file", "sha256"}` dicts or file paths
    (hashed here). extra: more top-level JSON keys (not the reserved ones). weights: K
    member weights (finite, >= 0, sum > 0), stored normalised as each member's `"weight"`
    (default: the members' own `"weight"` if they have one; none stored means equal).
    dtype: store the members' floating tensors in "fp32", "bf16" or "fp16" (CLI
    `--save-dtype`; bf16 / fp16 files are half the size; None: as they are). `load` casts
    them back to the model's dtype unless asked otherwise. calibration: `{"temperature": T,
    ...}` (T finite, > 0; other JSON-able keys describe the fit), applied after the members
    are averaged when the file is loaded; default: none (T = 1).
    """
    save_dtype = parse_dtype(dtype)

    if isinstance(member_states, EnsembleModel):
        member_states = member_states._member_views()
    member_states = list(member_states)
    _check_member_states(member_states)
    k = len(member_states)
    info = _with_weights(_as_member_info(members, k), weights)
    doc: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "model": _spec_dict(model_spec),
        "members": info, "combine": "mean_prob", "sources": _as_sources(sources),
    }
    if calibration is not None:
        if not isinstance(calibration, Mapping) or "temperature" not in calibration:
            raise BadOptionError("calibration must be a dict with a 'temperature'", option="calibration")
        doc["calibration"] = {**calibration, "temperature": check_temperature(calibration["temperature"])}
    for key, value in (extra or {}).items():
        if key in _RESERVED:
            raise BadOptionError(f"extra= may not set the reserved key {key!r}", option="extra")
        doc[key] = value
    try:
        doc = to_json(doc)
        json.dumps(doc, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise BadOptionError(f"ensemble metadata is not JSON-serialisable: {e}", option="extra") from e
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        _write_members(tmp, member_states, save_dtype, doc)
    logger.debug("wrote ensemble of %d member(s) to %s", k, dest)
    return dest


def _write_members(tmp: Path, member_states: list[StateDict], save_dtype: torch.dtype | None,
                   doc: dict[str, Any]) -> None:
    """Write the members' tensors (`member.<i>.<name>`, floating ones cast to `save_dtype`)
    and `doc` with their SHA-256 (`tensor_sha256`, checked by load_ensemble(verify=True) and inspect
    --verify) as one safetensors file. Tensor by tensor: at most one cast tensor exists at a
    time, so writing holds no copy of the members (the file's bytes are what `save_file` of
    all the tensors would write)."""
    def stored(t: torch.Tensor) -> torch.dtype:
        return save_dtype if save_dtype is not None and t.is_floating_point() else t.dtype

    names = {f"member.{i}.{n}": (i, n) for i, st in enumerate(member_states) for n in st}
    entries = {key: (tuple(member_states[i][n].shape), stored(member_states[i][n])) for key, (i, n) in names.items()}

    def tensor(key: str) -> torch.Tensor:
        i, n = names[key]
        t = member_states[i][n].detach()
        out = t.to(save_dtype) if t.dtype != entries[key][1] else t
        if save_dtype == torch.float16 and out.is_floating_point() and not bool(torch.isfinite(out).all()):
            raise NonFiniteError(f"tensor {key!r} overflows float16 (|x| > 65504); save with `dtype` bf16 "
                                 "or fp32")
        return out

    def metadata(hashes: dict[str, str]) -> dict[str, str]:
        ordered = {key: hashes[key] for key in names}  # member by member, as the tensors were given
        return {METADATA_KEY: json.dumps({**doc, HASHES_KEY: ordered}, allow_nan=False), "format": "pt"}

    if can_stream_safetensors(d for _, d in entries.values()):
        write_safetensors_streamed(tmp, entries, tensor, metadata)
        return
    from safetensors.torch import save_file  # a dtype the streamed writer does not know: all at once
    tensors = independent_tensors({key: tensor(key) for key in names})
    save_file(tensors, str(tmp), metadata=metadata(tensor_hashes(tensors)))


def read_ensemble_metadata(file: str | os.PathLike) -> dict[str, Any]:
    """The JSON document of an ensemble file, validated (format, version); CheckpointError
    naming the file if it is missing, corrupt, not an ensemble or from a newer mcensemble."""
    doc, _ = _open_ensemble(file)
    return doc


def _open_ensemble(file: str | os.PathLike) -> tuple[dict[str, Any], list[str]]:
    path = Path(file)
    if not path.exists():
        raise CheckpointError(f"ensemble file {str(path)!r} not found")
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} is not a file; an ensemble is one .safetensors file")
    try:
        header = read_header(path)
        if header.format != "safetensors":
            raise CheckpointError(f"it is {header.format}")
    except CheckpointError as e:
        raise CheckpointError(
            f"{str(path)!r} is not a readable safetensors file ({e}); an ensemble file is "
            f"written by `mcensemble build` or mcensemble.ensemble.save_ensemble") from e
    keys = list(header.tensors)
    doc = header.document(METADATA_KEY)
    if doc is None:
        raise CheckpointError(
            f"{str(path)!r} is not an mcensemble ensemble file: its safetensors header has no "
            f"{METADATA_KEY!r} metadata (a plain checkpoint? load it with load_checkpoint)")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        fmt = doc.get("format") if isinstance(doc, dict) else None
        hint = (" (it is a path file: sample members from it with `mcensemble build`)"
                if fmt == "mcensemble-path" else "")
        raise CheckpointError(
            f"{str(path)!r} is not an mcensemble ensemble file: format is {fmt!r}, expected "
            f"{FORMAT!r}{hint}")
    version = doc.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointError(f"{str(path)!r}: format_version {version!r} is not an integer")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{str(path)!r} was written by a newer mcensemble (format {version} > "
            f"{FORMAT_VERSION}); upgrade mcensemble")
    _check_document(doc, keys, repr(str(path)))
    return doc, keys


def _check_document(doc: dict[str, Any], keys: list[str], where: str) -> None:
    """Type-check the fields of an ensemble file's JSON document that loading uses (the
    member count bounded by the tensors in the file); `CheckpointError` naming the field."""
    members = meta_field(doc, "members", "list", where=where)
    if not members:
        raise CheckpointError(f"{where}: the ensemble metadata lists no members")
    if len(members) > len(keys):
        raise CheckpointError(f"{where}: the metadata lists {len(members)} members but the file holds "
                              f"{len(keys)} tensor(s); the file is damaged")
    for i, m in enumerate(members):
        at = f"{where} (member {i})"
        if not isinstance(m, dict):
            raise CheckpointError(f"{at}: a member's metadata must be a JSON object, found "
                                  f"{type(m).__name__}; the file is damaged")
        meta_field(m, "t", "number", where=at, default=None, nullable=True, lo=0.0, hi=1.0)
        meta_field(m, "kind", "str", where=at, default=None, nullable=True)
        meta_field(m, "weight", "number", where=at, default=None, nullable=True, lo=0.0)
    meta_field(doc, "model", "dict", where=where, default=None, nullable=True)
    meta_field(doc, "sources", "list", where=where, default=None, nullable=True)
    meta_field(doc, "combine", "str", where=where, default=None, nullable=True)
    meta_field(doc, HASHES_KEY, "dict", where=where, default=None, nullable=True)
    cal = meta_field(doc, "calibration", "dict", where=where, default=None, nullable=True)
    if cal is not None:
        t = meta_field(cal, "temperature", "number", where=f"{where} (calibration)")
        if not t > 0:
            raise CheckpointError(f"{where}: metadata field 'calibration.temperature' is {t}; a temperature must "
                                  "be > 0; the file is damaged")


def verify_ensemble_file(file: str | os.PathLike) -> int | None:
    """Check the SHA-256 of every tensor of an ensemble file against the record in its
    header. Returns how many tensors were checked, None when the file records no hashes
    (written before mcensemble recorded them); `CheckpointError` naming the first tensor
    whose bytes differ."""
    doc, _ = _open_ensemble(file)
    return verify_tensor_hashes(file, doc.get(HASHES_KEY))


def _check_spec_fits(factory: Callable[[], nn.Module], path: Path, member0: list[tuple[str, str]]) -> None:
    """Build the file's model on the meta device (no memory) and compare its state dict's
    names and shapes with member 0's tensors in the file, so that a spec whose sizes do not
    match the file (a damaged or crafted header) is refused before the real model is
    allocated. A model that cannot be built on the meta device is not checked here."""
    shapes = meta_shapes(factory)
    if shapes is None:
        return
    want = {n: tuple(s) for n, s in shapes.items()}
    tensors = read_header(path).tensors
    have = {name: tuple(tensors[key]["shape"]) for key, name in member0}
    if want != have:
        differing = [n for n in want if n in have and want[n] != have[n]]
        detail = (f"tensor {differing[0]!r} has shape {have[differing[0]]} in the file, {want[differing[0]]} in "
                  "the model" if differing else
                  f"the model's tensors {sorted(set(want) ^ set(have))[:3]} are in only one of them")
        raise ArchitectureMismatchError(
            f"{str(path)!r}: the model its metadata names does not fit its tensors: {detail}. The file "
            "is damaged, or pass `model` to build the right model")


class _LazyMembers(Sequence):
    """Member i's state dict, read from the file when asked for (one member in memory)."""

    def __init__(self, path: Path, groups: list[list[tuple[str, str]]]):
        self.path, self.groups = path, groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i):  # type: ignore[override]
        from safetensors import safe_open
        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as f:
                return {name: f.get_tensor(key) for key, name in self.groups[i]}
        except Exception as e:
            raise CheckpointError(f"{str(self.path)!r}: cannot read member {i} ({e})") from e


def _factory_from_spec(doc: dict[str, Any], path: Path, trust_remote_code: bool
                       ) -> Callable[[], nn.Module]:
    d = doc.get("model")
    if not isinstance(d, dict) or not (d.get("arch") or d.get("entry")):
        raise CheckpointError(
            f"{str(path)!r} does not say how to build the model; pass `model` (an nn.Module, a "
            "zero-argument callable or a ModelSpec)")
    try:
        spec = ModelSpec.from_dict(d)
    except Exception as e:
        raise CheckpointError(f"{str(path)!r}: invalid model spec {d!r} ({e})") from e
    if spec.arch:
        # A timm name goes through timm's registry only; an entry next to it is ignored.
        spec = ModelSpec(arch=spec.arch, kwargs=dict(spec.kwargs))
    elif not trust_remote_code:
        raise ModelSpecError(
            f"{str(path)!r} names code {spec.entry!r} to build its model; it was not imported. "
            "Pass `model` to build the model yourself, or `trust_remote_code`=True "
            f"if you trust the file.", option="model")
    else:
        logger.warning("importing %s named by %s (trust_remote_code=True)", spec.entry, path)

    def factory() -> nn.Module:
        try:
            return create_model(spec, trust_entry=trust_remote_code)
        except MCEnsembleError:
            raise
        except Exception as e:
            raise ModelSpecError(
                f"cannot build the model {spec.describe()} named by {str(path)!r}: "
                f"{type(e).__name__}: {e}", option="model") from e

    return factory


def load_ensemble(file: str | os.PathLike, *, model: ModelLike | None = None,
         trust_remote_code: bool = False, strategy: str | StrategyFn = "loop",
         device: str | torch.device | None = None, verify: bool = False,
         dtype: str | torch.dtype | None = None, lazy: bool = False) -> "EnsembleModel | LazyEnsembleModel":
    """Load an ensemble file as an `EnsembleModel` (eval mode).

    The model comes from `model=` (nn.Module / zero-argument callable / ModelSpec) when
    given, else from the file's spec: a timm `arch` through timm's registry; an `entry`
    ("module:function") only with `trust_remote_code=True`. A model built from the file's
    spec is first built without memory (meta device) and checked against the tensors in
    the file. `verify`: first check every tensor's bytes against the SHA-256 recorded in
    the file (`CheckpointError` naming the tensor that differs; a file without hashes is
    loaded with a warning).

    `dtype`: the dtype the members are held in: None (default) the model's own (a file
    written with `--save-dtype bf16` is cast back to a float32 model's float32), "file" the
    dtype stored in the file, or "fp32" / "bf16" / "fp16". `lazy`: return a
    `LazyEnsembleModel`, which keeps one model in memory and reads member i's tensors from
    the file (safetensors `safe_open`, memory-mapped) when a forward pass needs them,
    instead of holding all K members.
    """
    path = Path(file)
    doc, keys = _open_ensemble(path)
    if verify and verify_tensor_hashes(path, doc.get(HASHES_KEY)) is None:
        logger.warning("%s records no tensor hashes (written before mcensemble recorded them): not verified",
                       path)
    k = len(doc["members"])
    groups: list[list[tuple[str, str]]] = [[] for _ in range(k)]
    for key in keys:
        head, _, rest = key.partition(".")
        idx, _, name = rest.partition(".")
        if head != "member" or not idx.isdigit() or not name:
            raise CheckpointError(
                f"{str(path)!r}: unexpected tensor {key!r} (ensemble tensors are member.<i>.<name>)")
        i = int(idx)
        if i >= k:
            raise CheckpointError(
                f"{str(path)!r}: tensor {key!r} belongs to member {i}, but the metadata lists "
                f"{k} member(s)")
        groups[i].append((key, name))
    for i, g in enumerate(groups):
        if not g:
            raise CheckpointError(f"{str(path)!r}: member {i} has no tensors")
    try:
        weights = _with_weights(copy.deepcopy(doc["members"]), None)
    except BadOptionError as e:
        raise CheckpointError(f"{str(path)!r}: invalid member weights in the metadata ({e})") from e
    if model is not None:
        factory = as_factory(model)
    else:
        factory = _factory_from_spec(doc, path, trust_remote_code)
        _check_spec_fits(factory, path, groups[0])
    factory = _with_dtype(factory, _load_dtype(dtype, path, groups[0]))
    if lazy:
        return LazyEnsembleModel(factory, _LazyMembers(path, groups), metadata=doc, device=device,
                                 weights=_weights_in(weights, k))
    return EnsembleModel(factory, _LazyMembers(path, groups), metadata=doc,
                         strategy=strategy, device=device, weights=_weights_in(weights, k))


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def _load_dtype(dtype: str | torch.dtype | None, path: Path, member0: list[tuple[str, str]]) -> torch.dtype | None:
    """load_ensemble(dtype=): None, a torch dtype, or the floating dtype of member 0's tensors ("file")."""
    if not (isinstance(dtype, str) and dtype.lower() == "file"):
        return parse_dtype(dtype, option="dtype")
    tensors = read_header(path).tensors
    for key, _ in member0:
        found = _SAFETENSORS_DTYPES.get(tensors[key]["dtype"])
        if found is not None:
            return found
    return None


def _with_dtype(factory: Callable[[], nn.Module], dtype: torch.dtype | None) -> Callable[[], nn.Module]:
    if dtype is None:
        return factory
    return lambda: factory().to(dtype)


class LazyEnsembleModel(_Calibrated, nn.Module):
    """An ensemble whose members stay in their file: `mcensemble.load_ensemble(file, lazy=True)`.

    Holds one model (`ens.model`); every forward pass loads member i's tensors into it (read
    from the safetensors file, memory-mapped) and runs it, for i = 0 .. K-1, so memory holds
    one member instead of K (slower than `EnsembleModel`: K state loads per batch).
    `forward(x)` = log of the (weighted) mean member probability, as `EnsembleModel`'s
    (temperature and `predict` too).
    `.to()` / `.half()` / `.bfloat16()` convert the one model; members are cast to its dtype
    as they are loaded.
    """

    def __init__(self, model: ModelLike, member_states: Sequence[StateDict], *,
                 metadata: Mapping[str, Any] | None = None, device: str | torch.device | None = None,
                 weights: Sequence[float] | None = None, temperature: float | None = None):
        super().__init__()
        self.model = as_factory(model)()
        if device is not None:
            self.model.to(device)
        self.model.eval()
        self._sources = member_states
        self.metadata: dict[str, Any] = copy.deepcopy(dict(metadata or {}))
        k = len(member_states)
        self.weights = check_weights(weights, k) if weights is not None else [1.0 / k] * k
        self._temperature = 1.0
        self.temperature = temperature if temperature is not None else _temperature_in(self.metadata)
        self._expected = {n: (tuple(t.shape), t.dtype) for n, t in self.model.state_dict().items()}

    def __len__(self) -> int:
        return len(self._sources)

    def member_state_dict(self, i: int) -> dict[str, torch.Tensor]:
        """Member i's tensors, read from the file."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"member index {i} out of range for an ensemble of {len(self)}")
        return dict(self._sources[i])

    def _load_member(self, i: int) -> None:
        state = self._sources[i]
        _check_member_state(state, self._expected, index=i, ref="the model", check_dtype=False)
        try:
            self.model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ArchitectureMismatchError(f"member {i} does not load into the model: {e}") from e

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's output, stacked: (K, B, C, ...)."""
        outs = []
        for i in range(len(self)):
            self._load_member(i)
            outs.append(self.model(x))
        return torch.stack(outs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _calibrated(combine_mean_prob(self.member_logits(x), self.weights), self._temperature)

    def extra_repr(self) -> str:
        return f"members={len(self)} (lazy)"
