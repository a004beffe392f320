"""Fit the bends of a Bezier / PolyChain curve so that every point of it has low loss.

Model-agnostic: the user's own, unmodified `nn.Module` is run at ``theta(t)`` with
`torch.func.functional_call`; nothing is rewritten into "curve layers".

One step (Garipov et al. 2018): draw ``t ~ U(0, 1)``; build
``theta(t) = sum_i c_i(t) P_i`` (A and B fixed, the bends trained) with a few `torch._foreach`
multiply-adds; run the model at ``theta(t)``; minimise
``loss(theta(t)) + weight_decay / 2 * ||theta(t)||^2`` (parameters only) over the bends.

Because ``theta(t)`` is linear in the bends, the gradient of bend i is
``c_i(t) * dL/dtheta(t)`` exactly. So ``theta(t)`` is built without autograd, its tensors
are made leaves that require grad, one backward pass gives ``dL/dtheta``, and the
chain rule is applied by hand inside the optimiser update: this is what autograd would
compute, without recording the construction. The optimiser is SGD with momentum
(the `torch.optim.SGD` update rule: ``buf = momentum * buf + grad; P -= lr * buf``),
applied with `torch._foreach` ops to the bends of the trainable parameters, which are the
only tensors that change.

BatchNorm while fitting: the model runs in train mode, so BatchNorm normalises with the
statistics of the batch, as in ordinary training. The running statistics handed to
`functional_call` are that step's ``theta(t)`` tensors (a private buffer, rewritten from the
control points at every step) and, for ``num_batches_tracked``, private clones of A's made
once; BatchNorm's in-place updates land on those scratch tensors and are overwritten or
thrown away, so A, B and the bends are never touched. The
bends of floating buffers stay on the straight line: at an interior t, re-estimate BatchNorm
statistics (`mcensemble.bn.update_bn`) before evaluating. Dropout is active, as in training.

The loop (`_FitRun`) owns the data order (epoch e's permutation is drawn from the seed and
e, see `epoch_batches`), so a fit can be saved at any step (bends, momenta, the step, the RNG
states: `checkpoint=`), stopped cleanly by SIGINT / SIGTERM, and resumed bit for bit.
With several processes (`mcensemble.distributed`) each takes its share of every batch and
its own t, and the bends' gradients are averaged before each update.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler, SequentialSampler
from tqdm.auto import tqdm

from .. import distributed as dist_
from ..bn import split_batch
from ..checkpoints import check_same_architecture
from ..errors import BadOptionError, CheckpointError, MCEnsembleError
from ..precision import Precision, resolve_precision
from .base import check_same_layout, meta_field, state_dict_sha256
from .curves import CURVE_KINDS, BezierPath, PolyChainPath, curve_coefficients, is_interpolated

__all__ = ["CurveConfig", "CurveFitter", "FitInterrupted", "fit_curve", "lr_factor", "bend_lr_scale",
           "validate_curve_config",
           "epoch_batches", "epoch_seed", "read_fit_checkpoint", "FIT_CHECKPOINT_FORMAT"]

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


@dataclass
class CurveConfig:
    """How to fit a curve.

    kind: "bezier" or "polychain"; bends: number of bends n >= 1; epochs: passes over the
    loader (one step per batch); lr: the SGD learning rate *of the curve's points*: the bends'
    own learning rate is ``lr * bend_lr_scale(kind, bends)`` (4 x lr for one Bezier bend,
    see `bend_lr_scale`), so that where the curve moves most with its bends (t = 0.5 for one
    bend) a step moves theta(t) as far as a step at `lr` moves a trained model. Held for the
    first half of the steps, then decayed linearly to 1% of it at the last step; momentum: SGD momentum;
    weight_decay: coefficient of ``weight_decay / 2 * ||theta(t)||^2`` (parameters at the
    sampled point, not the bends); seed: seeds the draws of t and the torch RNG used inside
    (dropout, shuffling), without disturbing the caller's RNG state; max_grad_norm: clip the
    total gradient norm over all bends (None: no clipping).
    """

    kind: str = "bezier"
    bends: int = 1
    epochs: int = 20
    lr: float = 0.04
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    max_grad_norm: float | None = None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def validate_curve_config(config: CurveConfig) -> None:
    """Raise `BadOptionError` (naming the CLI option) for an invalid config."""
    if config.kind not in CURVE_KINDS:
        raise BadOptionError(f"unknown curve kind {config.kind!r}; choose one of {', '.join(CURVE_KINDS)}",
                             option="--method")
    if not _is_int(config.bends) or config.bends < 1:
        raise BadOptionError(f"--bends must be an integer >= 1, got {config.bends!r}", option="--bends")
    if not _is_int(config.epochs) or config.epochs < 1:
        raise BadOptionError(f"--epochs must be an integer >= 1, got {config.epochs!r}", option="--epochs")
    if not _is_number(config.lr) or not config.lr > 0 or config.lr == float("inf"):
        raise BadOptionError(f"--lr must be a positive number, got {config.lr!r}", option="--lr")
    if not _is_number(config.momentum) or not 0 <= config.momentum < 1:
        raise BadOptionError(f"--momentum must be in [0, 1), got {config.momentum!r}", option="--momentum")
    if not _is_number(config.weight_decay) or not config.weight_decay >= 0:
        raise BadOptionError(f"--weight-decay must be >= 0, got {config.weight_decay!r}", option="--weight-decay")
    if config.max_grad_norm is not None and (not _is_number(config.max_grad_norm) or not config.max_grad_norm > 0):
        raise BadOptionError(f"--max-grad-norm must be a positive number or None, got {config.max_grad_norm!r}",
                             option="--max-grad-norm")
    if not _is_int(config.seed):
        raise BadOptionError(f"--seed must be an integer, got {config.seed!r}", option="--seed")


def bend_lr_scale(kind: str, bends: int) -> float:
    """``1 / max_t sum_i c_i(t)^2`` over the bends' coefficients of a curve of `kind` with
    `bends` bends (t on a grid of 1000 (bends + 1) + 1 points, the chain's vertices included).

    A step of ``-eta * c_i(t) * g`` on every bend i (the gradient of a loss at theta(t)) moves
    theta(t) by ``-eta * sum_i c_i(t)^2 * g``: the points of the curve learn at only a fraction
    of the bends' learning rate, a quarter at t = 0.5 for one Bezier bend (2 t (1 - t) = 1/2).
    Fitting at the endpoints' own learning rate therefore trains the middle of the curve 4x
    slower than the endpoints were trained, and the fit stalls far above their loss
    (docs/benchmarks/quality.md). Multiplying the bends' learning rate by this factor makes the
    step of theta(t) at its most-moved point equal to `CurveConfig.lr`: 4 for one Bezier bend,
    about 3.6 for two, 1 for a polygonal chain (a vertex is a bend itself)."""
    n = int(bends)
    steps = 1000 * (n + 1)
    peak = max(sum(c * c for c in curve_coefficients(kind, i / steps, n)[1:-1]) for i in range(steps + 1))
    return 1.0 / peak


def lr_factor(step: int, total: int) -> float:
    """Learning-rate multiplier at `step` (0-based) of `total`: 1 for the first half of the
    steps, then linear down to 0.01 at the last step."""
    if total <= 1:
        return 1.0
    frac = step / (total - 1)
    if frac <= 0.5:
        return 1.0
    return 1.0 - 0.99 * (frac - 0.5) / 0.5


def _steps_per_epoch(loader) -> int:
    try:
        n = len(loader)
    except TypeError:
        n = sum(1 for _ in loader)
    if n < 1:
        raise BadOptionError("the training data loader yields no batches; check --data and --batch-size",
                             option="--data")
    return n


class _ModeRestorer:
    def __init__(self, model: nn.Module):
        self.flags = [(m, m.training) for m in model.modules()]

    def restore(self) -> None:
        for m, flag in self.flags:
            m.training = flag


class CurveFitter:
    """The state of a curve fit and its step. `fit_curve` drives it; benchmarks time `step`.

    Holds A and B (read only), the bends and their momentum buffers on `device`.
    `model` must already be in the mode to fit in (train) and on `device`.
    """

    def __init__(self, model: nn.Module, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], *,
                 kind: str = "bezier", bends: int = 1, momentum: float = 0.9, weight_decay: float = 5e-4,
                 max_grad_norm: float | None = None, device: str | torch.device = "cpu",
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 precision: str | Precision | None = None):
        device = torch.device(device)
        # forward passes under autocast; bends, momenta and theta(t) stay float32 (master copies)
        self.precision = resolve_precision(precision, device)
        self.scaler = self.precision.grad_scaler()
        self.skipped_steps = 0  # fp16: steps whose gradients overflowed (not applied)
        self._scaler_opt = _ScalerProbe() if self.scaler is not None else None
        self.model, self.kind, self.n = model, kind, bends
        self.momentum, self.weight_decay, self.max_grad_norm = float(momentum), float(weight_decay), max_grad_norm
        self.loss_fn = F.cross_entropy if loss_fn is None else loss_fn
        self.a, self.b = a, b
        # One name per distinct tensor of the model (tied weights once), all present in a.
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        names = [k for k in (*params, *buffers) if k in a]
        self.floating = [k for k in names if is_interpolated(a[k])]
        fixed = [k for k in names if not is_interpolated(a[k])]
        # functional_call's weight tying costs a walk over the model per call: only when needed.
        self.tied = bool(_aliases(model, None))
        self.train_idx = [j for j, k in enumerate(self.floating) if k in params and params[k].requires_grad]
        if not self.train_idx:
            raise BadOptionError("the model has no trainable parameters: nothing to fit", option="model")
        n = bends
        # Control points on the device. A and B are only ever read.
        master = torch.float32 if self.precision.enabled else None  # half endpoints: float32 masters
        self.A = [_master(a[k], device, master) for k in self.floating]
        self.B = [_master(b[k], device, master) for k in self.floating]
        self.bends = [[_lerp_tensor(pa, pb, (i + 1) / (n + 1)) for pa, pb in zip(self.A, self.B)]
                      for i in range(n)]
        if not self.precision.enabled and any(p.dtype in (torch.float16, torch.bfloat16) for p in self.A):
            log.warning("fitting a curve between half-precision endpoints: the bends are trained in the "
                        "endpoints' dtype; convert them to float32 for a better fit")
        # num_batches_tracked etc.: private clones (BatchNorm increments them in place).
        self.scratch = {k: a[k].detach().to(device).clone() for k in fixed}
        self.train_bends = [[bend[j] for j in self.train_idx] for bend in self.bends]
        self.momenta = [[torch.zeros_like(p) for p in tb] for tb in self.train_bends]
        # theta(t), rewritten in place every step: reusing the storage is measurably faster
        # than allocating it afresh. BatchNorm's running-stat updates land here and are
        # overwritten by the next step.
        self.theta = [torch.empty_like(p) for p in self.A]

    def step(self, x: torch.Tensor | None, y: torch.Tensor | None, t: float, lr: float, *,
             sync: torch.Tensor | None = None) -> torch.Tensor:
        """One SGD step on the bends at curve point `t`; returns the data loss (a tensor).

        `sync` (several processes): a float64 tensor ``[rows of this process's batch, ...]``
        summed over the processes together with the bends' gradients, which become the
        row-weighted mean of every process's ``c_i(t_r) * dL_r/dtheta`` (each process its own
        t), so every process applies the same update. `x` None: an empty share of the batch
        (contributes nothing; loss NaN)."""
        coeffs = curve_coefficients(self.kind, t, self.n)
        loss, grads = self._gradient(x, y, coeffs)
        if grads is None:  # fp16: the scaled gradients overflowed; the scaler backed off
            self.skipped_steps += 1
            if sync is not None:  # every process still takes part in the collective
                grads = [torch.full_like(self.theta[j], float("nan")) for j in self.train_idx]
            else:
                return loss
        with torch.no_grad():
            if sync is not None:
                self._update_synced(grads, coeffs, lr, sync)
                return loss
            scale = 1.0
            if self.max_grad_norm is not None:
                # the bends' total gradient norm is ||(c_1 .. c_n)|| * ||dL/dtheta||
                g_norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
                total = g_norm * sum(c * c for c in coeffs[1:-1]) ** 0.5
                if total > self.max_grad_norm:
                    scale = self.max_grad_norm / (total + 1e-6)
            for i in range(self.n):
                c = coeffs[i + 1] * scale  # d theta / d bend_i
                buf = self.momenta[i]
                if self.momentum:
                    torch._foreach_mul_(buf, self.momentum)
                else:
                    torch._foreach_zero_(buf)
                if c:
                    torch._foreach_add_(buf, grads, alpha=c)
                torch._foreach_add_(self.train_bends[i], buf, alpha=-lr)
        return loss

    def _gradient(self, x, y, coeffs) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(data loss, dL/dtheta + weight_decay * theta) at the point with these coefficients."""
        with torch.no_grad():
            _combine_into(self.theta, self.A, self.B, self.bends, coeffs)
        # fresh leaves over the reused storage (the previous step's graph is gone by now)
        theta = [p.detach() for p in self.theta]
        theta_train = [theta[j] for j in self.train_idx]
        if x is None:
            return torch.tensor(float("nan")), [torch.zeros_like(p) for p in theta_train]
        for p in theta_train:
            p.requires_grad_(True)
        state = dict(zip(self.floating, theta))
        state.update(self.scratch)
        with self.precision.autocast():
            out = functional_call(self.model, state, (self.precision.input(x),), tie_weights=self.tied)
        if self.precision.enabled and isinstance(out, torch.Tensor) and out.is_floating_point():
            out = out.float()  # the loss in float32
        loss = self.loss_fn(out, y)
        if self.scaler is not None:
            grads = self._unscaled_grads(loss, theta_train)
            if grads is None:
                return loss.detach(), None
        else:
            grads = list(torch.autograd.grad(loss, theta_train, allow_unused=True, materialize_grads=True))
        if self.weight_decay:
            with torch.no_grad():
                # d/dtheta of weight_decay / 2 * ||theta||^2
                torch._foreach_add_(grads, theta_train, alpha=self.weight_decay)
        return loss.detach(), grads

    def _unscaled_grads(self, loss: torch.Tensor, theta_train: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """fp16: dL/dtheta through the `GradScaler` (scaled backward, unscale, inf check,
        scale update); None when the gradients overflowed (the step is skipped)."""
        scaler, probe = self.scaler, self._scaler_opt
        grads = torch.autograd.grad(scaler.scale(loss), theta_train, allow_unused=True, materialize_grads=True)
        for p, g in zip(theta_train, grads):
            p.grad = g
        probe.param_groups[0]["params"] = theta_train
        scaler.unscale_(probe)
        applied = scaler.step(probe)  # the probe's step only reports that the scaler let it run
        scaler.update()
        out = [p.grad for p in theta_train]
        for p in theta_train:
            p.grad = None
        return out if applied else None

    def _update_synced(self, grads, coeffs, lr: float, sync: torch.Tensor) -> None:
        rows = float(sync[0])
        bend_grads = [torch._foreach_mul(grads, coeffs[i + 1] * rows) for i in range(self.n)]
        dist_.all_reduce_sum_([g for bg in bend_grads for g in bg] + [sync])
        if self.scaler is not None and not all(bool(torch.isfinite(g).all()) for bg in bend_grads for g in bg):
            return  # fp16: some process overflowed; every process skips this step alike
        total_rows = float(sync[0])
        scale = 1.0 / max(total_rows, 1.0)
        if self.max_grad_norm is not None:
            norms = [torch.linalg.vector_norm(torch.stack(torch._foreach_norm(bg))) for bg in bend_grads]
            total = float(torch.linalg.vector_norm(torch.stack(norms))) * scale
            if total > self.max_grad_norm:
                scale *= self.max_grad_norm / (total + 1e-6)
        for i in range(self.n):
            buf = self.momenta[i]
            if self.momentum:
                torch._foreach_mul_(buf, self.momentum)
            else:
                torch._foreach_zero_(buf)
            torch._foreach_add_(buf, bend_grads[i], alpha=scale)
            torch._foreach_add_(self.train_bends[i], buf, alpha=-lr)

    def bend_state_dicts(self) -> list[StateDict]:
        """The bends as state dicts on a's devices, with a value for every floating tensor of a
        (tied aliases share their tensor's bend; tensors the model does not hold stay on the line)."""
        alias = _aliases(self.model, self.a)
        out = []
        for i, bend in enumerate(self.bends):
            # in the endpoints' dtype (a float32 master copy of half endpoints goes back to half)
            sd = {k: bend[j].detach().to(self.a[k].device, self.a[k].dtype) for j, k in enumerate(self.floating)}
            for k, canon in alias.items():
                if canon in sd and k not in sd:
                    sd[k] = sd[canon]
            for k, v in self.a.items():
                if is_interpolated(v) and k not in sd:
                    sd[k] = _lerp_tensor(v, self.b[k], (i + 1) / (self.n + 1))
            out.append(sd)
        return out


class _ScalerProbe(torch.optim.Optimizer):
    """A stand-in optimizer for `torch.amp.GradScaler`: the scaler unscales its parameters'
    gradients and runs `step` only when they are finite; `step` returns True so that the
    caller learns whether the (hand-written) update may be applied."""

    def __init__(self) -> None:
        super().__init__([torch.zeros(1, requires_grad=True)], {})

    def step(self, closure=None):  # noqa: ARG002
        return True


def _master(v: torch.Tensor, device, master: torch.dtype | None) -> torch.Tensor:
    v = v.detach().to(device)
    if master is not None and v.dtype in (torch.float16, torch.bfloat16):
        v = v.to(master)
    return v


def _lerp_tensor(a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    return torch.lerp(a, b, w) if a.is_floating_point() else a + w * (b - a)


def fit_curve(model: Any, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], loader, *,
              config: CurveConfig = CurveConfig(), device: str | torch.device = "cpu",
              progress: bool | None = None,
              callback: Callable[[int, float, float], Any] | None = None,
              loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
              checkpoint: str | os.PathLike | None = None, checkpoint_every: int | None = None,
              resume: bool = False, precision: str | None = None) -> BezierPath | PolyChainPath:
    """Fit the bends of a curve from state dict `a` (t = 0) to `b` (t = 1) on `loader`.

    `model`: an `nn.Module` of the endpoints' architecture (only its structure is used: its
    own weights are never read or changed; it is moved to `device`, and its modules'
    training flags are restored at the end), or a zero-argument callable / `ModelSpec`.
    `loader` yields ``(input, target)`` pairs (or what `mcensemble.train.split_batch`
    understands); the batch size is the loader's. `loss_fn(output, target)` defaults to
    cross entropy. `callback(step, t, loss)` is called after every step with the step
    index (0-based), the sampled t and the data loss (without the weight-decay term).
    `progress`: tqdm bar on stderr (None: only when stderr is a terminal).

    The data order is drawn here (see `epoch_batches`): epoch e of a shuffling loader is a
    permutation seeded by ``(config.seed, e)``, so it never depends on the loader's history.
    `checkpoint`: a file where the whole state of the fit is saved (atomically) every
    `checkpoint_every` steps, at the end of every epoch, and when SIGINT / SIGTERM arrives
    (the step in progress is finished first; then `FitInterrupted` is raised). `resume`:
    continue from `checkpoint` when it exists; the result is bit-identical to an
    uninterrupted fit on the same device. Without `resume` an existing `checkpoint` is an error.

    `precision` ("fp32" default, "bf16", "fp16"; `mcensemble.precision`): the forward
    passes run under autocast in that dtype; the bends and their momenta stay float32. fp16
    scales the loss with a `torch.amp.GradScaler`; steps whose gradients overflow are skipped
    and counted in the path's ``metadata["fit"]["skipped_steps"]``.

    Several processes (`mcensemble.distributed`): each takes its share of every batch
    (rows rank, rank + world, ...), draws its own t, and the bends' gradients are averaged
    over the processes before each update, so the bends stay identical everywhere.

    Returns a `BezierPath` / `PolyChainPath` (per ``config.kind``) holding copies of `a`
    and `b` and the trained bends. `a` and `b` are never modified.
    Raises `BadOptionError` for a bad config (naming the option), `ArchitectureMismatchError`
    when `a`, `b` and the model disagree (first differing tensor), `CheckpointError` when a
    checkpoint to resume does not match this fit (naming what differs).
    """
    validate_curve_config(config)
    check_same_layout(a, b)
    _check_checkpoint_args(checkpoint, checkpoint_every, resume)
    torch.set_flush_denormal(True)  # on CPU, denormals made fitting steps many times slower
    if not isinstance(model, nn.Module):
        from ..models import as_factory
        model = as_factory(model)()
    check_same_architecture(model.state_dict(), a, names=("the model", "A"))
    device = torch.device(device)
    spe = _steps_per_epoch(loader)
    total = config.epochs * spe

    restorer = _ModeRestorer(model)
    model.to(device).train()
    fitter = CurveFitter(model, a, b, kind=config.kind, bends=config.bends, momentum=config.momentum,
                         weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm,
                         device=device, loss_fn=loss_fn, precision=precision)
    run = _FitRun(fitter, config, loader, device=device, total=total, steps_per_epoch=spe,
                  checkpoint=checkpoint, every=checkpoint_every, a=a, b=b)
    try:
        run.run(resume=resume, progress=progress, callback=callback)
    finally:
        restorer.restore()

    cls = BezierPath if config.kind == "bezier" else PolyChainPath
    fit_meta = {"epochs": config.epochs, "steps": total, "lr": config.lr, "bend_lr": run.bend_lr,
                "momentum": config.momentum,
                "weight_decay": config.weight_decay, "seed": config.seed, "max_grad_norm": config.max_grad_norm}
    if dist_.world_size() > 1:
        fit_meta["world_size"] = dist_.world_size()
    if fitter.precision.enabled:
        fit_meta["precision"] = fitter.precision.name
    if fitter.scaler is not None:
        fit_meta["skipped_steps"] = fitter.skipped_steps
        fit_meta["loss_scale"] = float(fitter.scaler.get_scale())
    return cls(a, b, fitter.bend_state_dicts(), metadata={"fit": fit_meta})


def _check_checkpoint_args(checkpoint, every, resume) -> None:
    if every is not None and (not _is_int(every) or every < 1):
        raise BadOptionError(f"--checkpoint-every must be an integer >= 1, got {every!r}",
                             option="--checkpoint-every")
    if resume and checkpoint is None:
        raise BadOptionError("--resume needs --checkpoint-dir (where the fit was saved)", option="--resume")
    if checkpoint is not None and os.path.isdir(checkpoint):
        raise BadOptionError(f"the fit checkpoint {checkpoint} is a folder; give a file name",
                             option="--checkpoint-dir")


class FitInterrupted(MCEnsembleError):
    """SIGINT / SIGTERM stopped a curve fit after a completed step; the fit was saved.

    `signum`: the signal; `exit_code`: 128 + signum (130 for SIGINT, 143 for SIGTERM);
    `checkpoint`: the file to resume from; `step`: steps done."""

    def __init__(self, message: str, *, signum: int, checkpoint: str | None = None, step: int = 0):
        super().__init__(message)
        self.signum, self.checkpoint, self.step = signum, checkpoint, step
        self.exit_code = 128 + int(signum)


class _StopFlag:
    """SIGINT / SIGTERM handlers (main thread only) that ask the fit to stop after its step.
    A second SIGINT raises KeyboardInterrupt at once."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @contextlib.contextmanager
    def installed(self, active: bool) -> Iterator["_StopFlag"]:
        if not active or threading.current_thread() is not threading.main_thread():
            yield self
            return
        sigs = [signal.SIGINT] + ([signal.SIGTERM] if hasattr(signal, "SIGTERM") else [])
        old = {s: signal.getsignal(s) for s in sigs}

        def handler(signum, frame):
            if self.signum is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.signum = signum
            log.warning("%s received: stopping after this step and saving the fit",
                        signal.Signals(signum).name)

        for s in sigs:
            signal.signal(s, handler)
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch `epoch`'s data order (and of its loader's worker seeds)."""
    return (int(seed) * 1_000_003 + int(epoch) + 1) % (1 << 63)


def _rank_seed(seed: int, rank: int) -> int:
    """`seed` on rank 0 (a single process is unchanged), a distinct seed on every other rank."""
    return int(seed) if rank == 0 else (int(seed) + (int(rank) << 40)) % (1 << 63)


def _owns_order(loader) -> bool:
    """A DataLoader over a map-style dataset with a plain random / sequential sampler:
    `epoch_batches` then draws the order itself and skips batches without loading them."""
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return False
    bs, sampler = loader.batch_sampler, loader.sampler
    if type(bs) is not BatchSampler or type(sampler) not in (RandomSampler, SequentialSampler):
        return False
    return not (isinstance(sampler, RandomSampler) and (sampler.replacement or sampler._num_samples is not None))


def epoch_batches(loader, epoch: int, seed: int, *, skip: int = 0) -> Iterator[tuple[Any, Any] | None]:
    """This process's ``(input, target)`` batches of epoch `epoch`, after the first `skip`.

    A DataLoader over a map-style dataset (what `data.create_loader` gives): a shuffling
    one takes the permutation drawn from ``epoch_seed(seed, epoch)``, a sequential one the
    dataset's order; batches of the loader's batch size (its `drop_last`, `collate_fn`,
    workers), skipped ones never loaded. Any other loader is iterated as it is (its
    `generator`, when it has one, reseeded from ``epoch_seed``); skipped batches are read and
    dropped. With several processes each takes rows rank, rank + world, ... of every batch
    (None when that leaves nothing)."""
    world, r = dist_.world_size(), dist_.rank()
    if _owns_order(loader):
        yield from _owned_batches(loader, epoch, seed, skip, world, r)
        return
    gen = getattr(loader, "generator", None)
    if isinstance(gen, torch.Generator):
        gen.manual_seed(epoch_seed(seed, epoch))
    with torch.random.fork_rng(devices=[]):  # iterator creation must not draw from the fit's RNG
        it = iter(loader)
    for j, batch in enumerate(it):
        if j < skip:
            continue
        x, y = split_batch(batch)
        if world > 1:
            x, y = x[r::world], (y[r::world] if y is not None else None)
            if len(x) == 0:
                yield None
                continue
        yield x, y


def _owned_batches(loader: DataLoader, epoch, seed, skip, world, r):
    n = len(loader.dataset)
    gen = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    if isinstance(loader.sampler, RandomSampler):
        order = torch.randperm(n, generator=gen).tolist()
    else:
        order = list(range(n))
    bs = loader.batch_size
    batches = [order[i:i + bs] for i in range(0, n, bs)]
    if loader.drop_last and batches and len(batches[-1]) < bs:
        batches.pop()
    mine = [batch[r::world] for batch in batches[skip:]]
    kw: dict[str, Any] = {}
    if loader.num_workers > 0:
        kw = {"prefetch_factor": loader.prefetch_factor, "worker_init_fn": loader.worker_init_fn,
              "multiprocessing_context": loader.multiprocessing_context, "timeout": loader.timeout}
    sub = DataLoader(loader.dataset, batch_sampler=[m for m in mine if m], collate_fn=loader.collate_fn,
                     num_workers=loader.num_workers, pin_memory=loader.pin_memory, generator=gen, **kw)
    it = iter(sub)
    for m in mine:
        if not m:
            yield None
            continue
        x, y = split_batch(next(it))
        yield x, y


FIT_CHECKPOINT_FORMAT = "mcensemble-fit-checkpoint"
_CONFIG_FIELDS = ("kind", "bends", "epochs", "lr", "momentum", "weight_decay", "seed", "max_grad_norm")


class _FitRun:
    """The loop of `fit_curve`: data order, t draws, RNG, checkpoints, signals."""

    def __init__(self, fitter: CurveFitter, config: CurveConfig, loader, *, device: torch.device, total: int,
                 steps_per_epoch: int, checkpoint, every: int | None, a, b):
        self.fitter, self.config, self.loader, self.device = fitter, config, loader, device
        self.total, self.spe, self.every = total, steps_per_epoch, every
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.a, self.b = a, b
        self.step = 0
        self.bend_lr = config.lr * bend_lr_scale(config.kind, config.bends)
        self.gen = torch.Generator()
        self.cuda = device.type == "cuda"
        self._hashes: list[str] | None = None

    def hashes(self) -> list[str]:
        if self._hashes is None:
            self._hashes = [state_dict_sha256(self.a), state_dict_sha256(self.b)]
        return self._hashes

    def run(self, *, resume: bool, progress, callback) -> None:
        devices = [self.device] if self.cuda else []
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            r = dist_.rank()
            torch.manual_seed(_rank_seed(self.config.seed, r))  # dropout etc.: each process its own stream
            self.gen.manual_seed(_rank_seed(self.config.seed, r))  # t: each process its own draws
            self._start(resume)
            if self.step >= self.total:
                return
            bar = tqdm(total=self.total, initial=self.step, desc=f"fit {self.config.kind}", file=sys.stderr,
                       disable=None if progress is None else not progress, leave=False)
            stop = _StopFlag()
            try:
                with stop.installed(self.checkpoint is not None):
                    self._loop(stop, bar, callback)
            finally:
                bar.close()

    def _start(self, resume: bool) -> None:
        if self.checkpoint is None or not os.path.exists(self.checkpoint):
            if resume:
                log.warning("no fit checkpoint at %s: starting the fit from the beginning", self.checkpoint)
            return
        if not resume:
            meta = read_fit_checkpoint(self.checkpoint)[1]
            raise BadOptionError(
                f"{self.checkpoint} already holds a curve fit (step {meta.get('step')} of "
                f"{meta.get('total_steps')}); pass --resume to continue it, or choose another --checkpoint-dir",
                option="--resume")
        self._restore()
        log.info("resuming the fit from %s at step %d of %d", self.checkpoint, self.step, self.total)

    def _loop(self, stop: _StopFlag, bar, callback) -> None:
        cfg, fitter, world = self.config, self.fitter, dist_.world_size()
        want_loss = callback is not None or not bar.disable
        for epoch in range(self.step // self.spe, cfg.epochs):
            for batch in epoch_batches(self.loader, epoch, cfg.seed, skip=self.step - epoch * self.spe):
                x = y = None
                if batch is not None:
                    x, y = batch
                    if y is None:
                        raise BadOptionError("curve fitting needs (input, target) batches; the loader gives "
                                             "inputs only", option="--data")
                    x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                t = float(torch.rand((), generator=self.gen, dtype=torch.float64))
                sync = None
                if world > 1:
                    sync = torch.tensor([0.0 if x is None else float(len(x)), float(stop.signum or 0)],
                                        dtype=torch.float64, device=self.device if self.cuda else "cpu")
                loss = fitter.step(x, y, t, self.bend_lr * lr_factor(self.step, self.total), sync=sync)
                self.step += 1
                stopping = (float(sync[1]) > 0) if sync is not None else stop.signum is not None
                if want_loss:
                    lv = float(loss)
                    try:
                        if callback is not None:
                            callback(self.step - 1, t, lv)
                    except KeyboardInterrupt:
                        if self.checkpoint is None:
                            raise
                        stop.signum = int(signal.SIGINT)
                        stopping = stopping or world == 1
                    if not bar.disable and self.step % 10 == 1:
                        bar.set_postfix(loss=f"{lv:.4f}", refresh=False)
                bar.update()
                if stopping:
                    self._interrupted(stop.signum or int(signal.SIGTERM))
                if self.every and self.step % self.every == 0 and self.step % self.spe:
                    self._save()
            self._save()
            if stop.signum is not None and world == 1:  # a signal during the epoch's save
                self._interrupted(stop.signum)

    def _interrupted(self, signum: int) -> None:
        self._save()
        name = signal.Signals(signum).name
        raise FitInterrupted(
            f"{name}: curve fitting stopped after step {self.step} of {self.total}; its state is saved in "
            f"{self.checkpoint}. Run the same command with --resume to continue.",
            signum=signum, checkpoint=self.checkpoint, step=self.step)

    def _rng_states(self) -> dict[str, torch.Tensor]:
        mine = {"t": self.gen.get_state(), "torch": torch.get_rng_state()}
        if self.cuda:
            mine["cuda"] = torch.cuda.get_rng_state(self.device)
        out = {}
        for r, states in enumerate(dist_.gather_objects(mine)):
            out.update({f"rng.{k}.{r}": v for k, v in states.items()})
        return out

    def _save(self) -> None:
        if self.checkpoint is None:
            return
        rng = self._rng_states()  # a collective: every process takes part
        if not dist_.is_main():
            return
        from safetensors.torch import save_file

        from .._io import atomic_path
        f = self.fitter
        tensors = {k: v.contiguous() for k, v in rng.items()}
        for i, bend in enumerate(f.bends):
            tensors.update({f"bend.{i}.{k}": v.detach().cpu().clone() for k, v in zip(f.floating, bend)})
        train_names = [f.floating[j] for j in f.train_idx]
        for i, buf in enumerate(f.momenta):
            tensors.update({f"momentum.{i}.{k}": v.detach().cpu().clone() for k, v in zip(train_names, buf)})
        meta = {"format": FIT_CHECKPOINT_FORMAT, "format_version": 1, "step": self.step,
                "epoch": self.step // self.spe, "batch": self.step % self.spe, "total_steps": self.total,
                "steps_per_epoch": self.spe, "world_size": dist_.world_size(), "finished": self.step >= self.total,
                "config": asdict(self.config), "endpoints_sha256": self.hashes()}
        with atomic_path(self.checkpoint) as tmp:
            save_file(tensors, str(tmp), metadata={"mcensemble": json.dumps(meta)})

    def _restore(self) -> None:
        """Everything is read and checked first; only then is anything of the fit changed
        (a damaged checkpoint is refused whole, never half used)."""
        tensors, meta = read_fit_checkpoint(self.checkpoint)
        _check_resume(self, meta)
        f, r, ck = self.fitter, dist_.rank(), self.checkpoint
        train_names = [f.floating[j] for j in f.train_idx]
        pairs = [(v, _ck_tensor(tensors, f"bend.{i}.{k}", v, ck))
                 for i, bend in enumerate(f.bends) for k, v in zip(f.floating, bend)]
        pairs += [(v, _ck_tensor(tensors, f"momentum.{i}.{k}", v, ck))
                  for i, buf in enumerate(f.momenta) for k, v in zip(train_names, buf)]
        rng = {k: _ck_tensor(tensors, f"rng.{k}.{r}", None, ck) for k in ("t", "torch")}
        for k, v in rng.items():
            if v.dtype != torch.uint8 or v.dim() != 1:
                raise CheckpointError(f"the fit checkpoint {ck} has a damaged random state {f'rng.{k}.{r}'!r} "
                                      f"({v.dtype}, shape {tuple(v.shape)}); choose another --checkpoint-dir")
        saved_gen, saved_torch = self.gen.get_state(), torch.get_rng_state()
        try:
            self.gen.set_state(rng["t"])
            torch.set_rng_state(rng["torch"])
        except (RuntimeError, ValueError) as e:
            self.gen.set_state(saved_gen)
            torch.set_rng_state(saved_torch)
            raise CheckpointError(f"the fit checkpoint {ck} has a damaged random state ({e}); "
                                  "choose another --checkpoint-dir") from e
        with torch.no_grad():
            for v, saved in pairs:
                v.copy_(saved)
        if self.cuda and f"rng.cuda.{r}" in tensors:
            torch.cuda.set_rng_state(tensors[f"rng.cuda.{r}"], self.device)
        self.step = int(meta["step"])


def _ck_tensor(tensors, name: str, like: torch.Tensor | None, file) -> torch.Tensor:
    if name not in tensors:
        raise CheckpointError(f"the fit checkpoint {file} has no tensor {name!r}: it was written for another "
                              "model; choose another --checkpoint-dir")
    v = tensors[name]
    if like is not None and (v.shape != like.shape or v.dtype != like.dtype):
        raise CheckpointError(f"the fit checkpoint {file} has {name!r} of shape {tuple(v.shape)} ({v.dtype}), "
                              f"the model {tuple(like.shape)} ({like.dtype}); choose another --checkpoint-dir")
    return v


def _check_resume(run: _FitRun, meta: Mapping[str, Any]) -> None:
    """CheckpointError naming the first thing in which the checkpoint differs from this fit."""
    file = run.checkpoint
    hint = "resume with the same checkpoints and options, or choose another --checkpoint-dir"
    saved = list(meta.get("endpoints_sha256") or [])
    for name, h_saved, h_now in zip(("A (t = 0)", "B (t = 1)"), saved, run.hashes()):
        if h_saved != h_now:
            raise CheckpointError(f"the fit checkpoint {file} was written for other endpoints: {name} has "
                                  f"sha256 {h_saved[:12]}... there, {h_now[:12]}... here; {hint}")
    cfg_saved, cfg_now = meta.get("config") or {}, asdict(run.config)
    for k in _CONFIG_FIELDS:
        if cfg_saved.get(k) != cfg_now[k]:
            opt = {"kind": "method", "weight_decay": "weight-decay", "max_grad_norm": "max-grad-norm"}.get(k, k)
            raise CheckpointError(f"the fit checkpoint {file} was written with --{opt} {cfg_saved.get(k)!r}, "
                                  f"this run has --{opt} {cfg_now[k]!r}; {hint}")
    if meta.get("steps_per_epoch") != run.spe:
        raise CheckpointError(f"the fit checkpoint {file} was written with {meta.get('steps_per_epoch')} batches "
                              f"per epoch, this run has {run.spe} (other --data or --batch-size); {hint}")
    if meta.get("world_size", 1) != dist_.world_size():
        raise CheckpointError(f"the fit checkpoint {file} was written by {meta.get('world_size', 1)} processes, "
                              f"this run has {dist_.world_size()}; resume with as many processes")
    if meta["total_steps"] != run.total:
        raise CheckpointError(f"the fit checkpoint {file} was written for a fit of {meta['total_steps']} steps, "
                              f"this run has {run.total} (other --epochs, --data or --batch-size); {hint}")


def read_fit_checkpoint(file: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) of a fit checkpoint written by `fit_curve(checkpoint=...)`.
    `CheckpointError` naming the file when it is not one (or is damaged)."""
    from safetensors import safe_open
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            meta = json.loads((f.metadata() or {}).get("mcensemble", "null") or "null")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001  (OSError, JSON errors, safetensors' SafetensorError)
        raise CheckpointError(f"cannot read the fit checkpoint {file}: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FIT_CHECKPOINT_FORMAT:
        raise CheckpointError(f"{file} is not a curve-fit checkpoint (no {FIT_CHECKPOINT_FORMAT} metadata); "
                              "choose another --checkpoint-dir")
    where = f"the fit checkpoint {file}"
    if meta_field(meta, "format_version", "int", where=where) > 1:
        raise CheckpointError(f"{file} is a newer fit checkpoint (format_version {meta['format_version']}); "
                              "upgrade mcensemble")
    total = meta_field(meta, "total_steps", "int", where=where, lo=0)
    meta_field(meta, "step", "int", where=where, lo=0, hi=total)
    for key in ("epoch", "batch"):
        meta_field(meta, key, "int", where=where, lo=0, default=0)
    meta_field(meta, "steps_per_epoch", "int", where=where, lo=1)
    meta_field(meta, "world_size", "int", where=where, lo=1, default=1)
    meta_field(meta, "finished", "bool", where=where, default=False)
    meta_field(meta, "config", "dict", where=where)
    if len(meta_field(meta, "endpoints_sha256", "str-list", where=where)) != 2:
        raise CheckpointError(f"{where}: metadata field 'endpoints_sha256' must hold two hashes (A and B); "
                              "the file is damaged")
    return tensors, meta


def _combine_into(out, A, B, bends, coeffs) -> None:
    """out = sum_i coeffs[i] * control_i (in place, non-zero coefficients only)."""
    controls = [A, *bends, B]
    terms = [(c, p) for c, p in zip(coeffs, controls) if c != 0.0]
    c0, p0 = terms[0]
    torch._foreach_copy_(out, p0)
    if c0 != 1.0:
        torch._foreach_mul_(out, c0)
    for c, p in terms[1:]:
        torch._foreach_add_(out, p, alpha=c)


def _aliases(model: nn.Module, a: Mapping[str, torch.Tensor] | None) -> dict[str, str]:
    """name -> canonical name for tied parameters / buffers that appear under several names
    (only names in `a`, unless `a` is None)."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for named in (model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)):
        for k, v in named:
            key = id(v)
            if key in first:
                if a is None or k in a:
                    out[k] = first[key]
            else:
                first[key] = k
    return out
