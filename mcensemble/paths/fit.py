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

import logging
import os
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from .._modes import keeps_process_state, modes_kept
from .. import distributed as dist_
from ..errors import BadOptionError
from ..precision import Precision, resolve_precision
from .base import ModePath, path_kind
from .curve_base import CurveConfig, curve_coefficients, is_interpolated
from .linear import lerp_tensor
from .fit_run import _FitRun, prepare_fit

__all__ = ["CurveFitter", "STREAM_MIN_BYTES", "fit_curve"]

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


def _steps_per_epoch(loader) -> int:
    try:
        n = len(loader)
    except TypeError:
        n = sum(1 for _ in loader)
    if n < 1:
        raise BadOptionError("the training data loader yields no batches; check `data` and `batch_size`",
                             option="data")
    return n


#: models with at least this many bytes of trained tensors take the streamed step
#: (`CurveFitter(stream=None)`): measured, the per-tensor hooks made the step of a 0.1 MiB MLP
#: 1.36x a plain step against 1.12x materialised, while on resnet-size models the two run
#: at parity and streaming saves one model's worth of gradients
STREAM_MIN_BYTES = 16 << 20


class CurveFitter:
    """The state of a curve fit and its step. `fit_curve` drives it; benchmarks time `step`.

    Holds A and B (read only), the bends and their momentum buffers on `device`.
    `stream`: apply each tensor's update during backward (no full set of gradients at once);
    None: for models with `STREAM_MIN_BYTES` or more of trained tensors. The bends come out
    the same either way.
    `model` must already be in the mode to fit in (train) and on `device`.
    """

    def __init__(self, model: nn.Module, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], *,
                 kind: str = "bezier", bends: int = 1, momentum: float = 0.9, weight_decay: float = 5e-4,
                 max_grad_norm: float | None = None, device: str | torch.device = "cpu",
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 precision: str | Precision | None = None, stream: bool | None = None):
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
        self.bends = [[lerp_tensor(pa, pb, (i + 1) / (n + 1)) for pa, pb in zip(self.A, self.B)]
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
        # stream the update through backward (no full set of gradients; bounded memory) for
        # models of STREAM_MIN_BYTES or more; below that the per-tensor hooks cost more time
        # than the gradients' memory is worth. Both give the same bends, bit for bit.
        trained_bytes = sum(self.A[j].numel() * self.A[j].element_size() for j in self.train_idx)
        self.stream = trained_bytes >= STREAM_MIN_BYTES if stream is None else bool(stream)

    def step(self, x: torch.Tensor | None, y: torch.Tensor | None, t: float, lr: float, *,
             sync: torch.Tensor | None = None) -> torch.Tensor:
        """One SGD step on the bends at curve point `t`; returns the data loss (a tensor).

        `sync` (several processes): a float64 tensor ``[rows of this process's batch, ...]``
        summed over the processes together with the bends' gradients, which become the
        row-weighted mean of every process's ``c_i(t_r) * dL_r/dtheta`` (each process its own
        t), so every process applies the same update. `x` None: an empty share of the batch
        (contributes nothing; loss NaN)."""
        coeffs = curve_coefficients(self.kind, t, self.n)
        if self.stream and sync is None and x is not None and self.scaler is None and self.max_grad_norm is None:
            return self._streamed_step(x, y, coeffs, lr)
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

    def _streamed_step(self, x, y, coeffs, lr: float) -> torch.Tensor:
        """The step without clipping, loss scaling or other processes: each tensor's
        dL/dtheta is turned into its bends' update as soon as backward has computed it (a
        tensor hook, which hands autograd back an expanded one-element zero to keep) and
        freed, so the gradients of the whole model never exist at once (peak: the bends,
        momenta and theta(t), not a fourth copy). The arithmetic is the same as `_gradient`
        followed by the update, element for element."""
        with torch.no_grad():
            _combine_into(self.theta, self.A, self.B, self.bends, coeffs)
        theta = [p.detach() for p in self.theta]
        pending = dict.fromkeys(range(len(self.train_idx)))
        theta_train = [theta[j] for j in self.train_idx]
        for k, p in enumerate(theta_train):
            p.requires_grad_(True)
            p.register_hook(lambda g, k=k, p=p: self._apply_grad(k, p, g, coeffs, lr, pending))
        loss = self._loss(theta, x, y)
        torch.autograd.grad(loss, theta_train, allow_unused=True)
        for k in list(pending):  # tensors the loss does not depend on: a zero gradient
            p = theta[self.train_idx[k]]
            self._apply_grad(k, p, torch.zeros_like(p), coeffs, lr, pending)
        return loss.detach()

    @torch.no_grad()
    def _apply_grad(self, k: int, p: torch.Tensor, g: torch.Tensor, coeffs, lr: float,
                    pending: dict) -> torch.Tensor:
        """SGD-with-momentum update of every bend's k-th trainable tensor from dL/dtheta `g`
        (weight decay added here); returns what autograd keeps in place of `g`."""
        pending.pop(k, None)
        if self.weight_decay:
            g = torch.add(g, p, alpha=self.weight_decay)  # not in place: autograd owns g
        for i in range(self.n):
            c = coeffs[i + 1]
            buf = self.momenta[i][k]
            if self.momentum:
                buf.mul_(self.momentum)
            else:
                buf.zero_()
            if c:
                buf.add_(g, alpha=c)
            self.train_bends[i][k].add_(buf, alpha=-lr)
        # what autograd keeps as this input's gradient: one element, expanded (not a copy of g)
        return torch.zeros((), dtype=g.dtype, device=g.device).expand_as(g)

    def _loss(self, theta: list[torch.Tensor], x, y) -> torch.Tensor:
        """The data loss (float32) of the model with floating tensors `theta` on batch (x, y),
        its forward pass under the fit's autocast."""
        state = dict(zip(self.floating, theta))
        state.update(self.scratch)
        with self.precision.autocast():
            out = functional_call(self.model, state, (self.precision.input(x),), tie_weights=self.tied)
        if self.precision.enabled and isinstance(out, torch.Tensor) and out.is_floating_point():
            out = out.float()  # the loss in float32
        return self.loss_fn(out, y)

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
        loss = self._loss(theta, x, y)
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

    def release(self) -> None:
        """Free theta(t), the momenta and the scratch tensors once the fit is over (the bends stay)."""
        self.theta, self.momenta, self.scratch = [], [], {}

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
                    sd[k] = lerp_tensor(v, self.b[k], (i + 1) / (self.n + 1))
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


@keeps_process_state
def fit_curve(model: Any, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], loader, *,
              config: CurveConfig = CurveConfig(), device: str | torch.device = "cpu",
              progress: bool | None = None,
              callback: Callable[[int, float, float], Any] | None = None,
              loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
              checkpoint: str | os.PathLike | None = None, checkpoint_every: int | None = None,
              resume: bool = False, precision: str | None = None) -> ModePath:
    """Fit the bends of a curve from state dict `a` (t = 0) to `b` (t = 1) on `loader`.

    `model`: an `nn.Module` of the endpoints' architecture (only its structure is used: its
    own weights are never read or changed; it is moved to `device`, and its modules'
    training flags are restored at the end), or a zero-argument callable / `ModelSpec`.
    `loader` yields ``(input, target)`` pairs (or what `mcensemble.bn.split_batch`
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
    model, device = prepare_fit(model, a, b, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                                resume=resume, device=device)
    spe = _steps_per_epoch(loader)
    total = config.epochs * spe

    with modes_kept(model, True):
        model.to(device)
        fitter = CurveFitter(model, a, b, kind=config.kind, bends=config.bends, momentum=config.momentum,
                             weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm,
                             device=device, loss_fn=loss_fn, precision=precision)
        run = _FitRun(fitter, config, loader, device=device, total=total, steps_per_epoch=spe,
                      checkpoint=checkpoint, every=checkpoint_every, a=a, b=b)
        run.run(resume=resume, progress=progress, callback=callback)

    cls = path_kind(config.kind)  # BezierPath / PolyChainPath (paths.curves, which imports this module)
    bends = fitter.bend_state_dicts()
    fitter.release()  # theta(t) and the momenta go before the path copies A and B
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
    # the bends are this fit's own tensors (shared only between tied names): not copied again
    ends = [{k: v.detach().clone() for k, v in s.items()} for s in (a, b)]
    return cls(*ends, [_untied(sd) for sd in bends], metadata={"fit": fit_meta}, copy=False)


def _untied(sd: StateDict) -> StateDict:
    """`sd` with a tensor that appears under several names cloned for every name after the first."""
    seen: set[int] = set()
    out = {}
    for k, v in sd.items():
        out[k] = v.clone() if id(v) in seen else v
        seen.add(id(v))
    return out


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
