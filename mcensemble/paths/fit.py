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
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from tqdm.auto import tqdm

from ..checkpoints import check_same_architecture
from ..errors import BadOptionError
from .base import check_same_layout
from .curves import CURVE_KINDS, BezierPath, PolyChainPath, curve_coefficients, is_interpolated

__all__ = ["CurveConfig", "CurveFitter", "fit_curve", "lr_factor", "validate_curve_config"]

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


@dataclass
class CurveConfig:
    """How to fit a curve.

    kind: "bezier" or "polychain"; bends: number of bends n >= 1; epochs: passes over the
    loader (one step per batch); lr: SGD learning rate, held for the first half of the steps,
    then decayed linearly to 1% of it at the last step; momentum: SGD momentum;
    weight_decay: coefficient of ``weight_decay / 2 * ||theta(t)||^2`` (parameters at the
    sampled point, not the bends); seed: seeds the draws of t and the torch RNG used inside
    (dropout, shuffling), without disturbing the caller's RNG state; max_grad_norm: clip the
    total gradient norm over all bends (None: no clipping).
    """

    kind: str = "bezier"
    bends: int = 1
    epochs: int = 20
    lr: float = 0.05
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


def lr_factor(step: int, total: int) -> float:
    """Learning-rate multiplier at `step` (0-based) of `total`: 1 for the first half of the
    steps, then linear down to 0.01 at the last step."""
    if total <= 1:
        return 1.0
    frac = step / (total - 1)
    if frac <= 0.5:
        return 1.0
    return 1.0 - 0.99 * (frac - 0.5) / 0.5


def _split_batch(batch):
    from ..train import split_batch
    return split_batch(batch)


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
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None):
        device = torch.device(device)
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
        self.A = [a[k].detach().to(device) for k in self.floating]
        self.B = [b[k].detach().to(device) for k in self.floating]
        self.bends = [[_lerp_tensor(pa, pb, (i + 1) / (n + 1)) for pa, pb in zip(self.A, self.B)]
                      for i in range(n)]
        if any(p.dtype in (torch.float16, torch.bfloat16) for p in self.A):
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

    def step(self, x: torch.Tensor, y: torch.Tensor, t: float, lr: float) -> torch.Tensor:
        """One SGD step on the bends at curve point `t`; returns the data loss (a tensor)."""
        coeffs = curve_coefficients(self.kind, t, self.n)
        with torch.no_grad():
            _combine_into(self.theta, self.A, self.B, self.bends, coeffs)
        # fresh leaves over the reused storage (the previous step's graph is gone by now)
        theta = [p.detach() for p in self.theta]
        theta_train = [theta[j] for j in self.train_idx]
        for p in theta_train:
            p.requires_grad_(True)
        state = dict(zip(self.floating, theta))
        state.update(self.scratch)
        out = functional_call(self.model, state, (x,), tie_weights=self.tied)
        loss = self.loss_fn(out, y)
        grads = list(torch.autograd.grad(loss, theta_train, allow_unused=True, materialize_grads=True))
        with torch.no_grad():
            if self.weight_decay:
                # d/dtheta of weight_decay / 2 * ||theta||^2
                torch._foreach_add_(grads, theta_train, alpha=self.weight_decay)
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
        return loss.detach()

    def bend_state_dicts(self) -> list[StateDict]:
        """The bends as state dicts on a's devices, with a value for every floating tensor of a
        (tied aliases share their tensor's bend; tensors the model does not hold stay on the line)."""
        alias = _aliases(self.model, self.a)
        out = []
        for i, bend in enumerate(self.bends):
            sd = {k: bend[j].detach().to(self.a[k].device) for j, k in enumerate(self.floating)}
            for k, canon in alias.items():
                if canon in sd and k not in sd:
                    sd[k] = sd[canon]
            for k, v in self.a.items():
                if is_interpolated(v) and k not in sd:
                    sd[k] = _lerp_tensor(v, self.b[k], (i + 1) / (self.n + 1))
            out.append(sd)
        return out


def _lerp_tensor(a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    return torch.lerp(a, b, w) if a.is_floating_point() else a + w * (b - a)


def fit_curve(model: Any, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], loader, *,
              config: CurveConfig = CurveConfig(), device: str | torch.device = "cpu",
              progress: bool | None = None,
              callback: Callable[[int, float, float], Any] | None = None,
              loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
              ) -> BezierPath | PolyChainPath:
    """Fit the bends of a curve from state dict `a` (t = 0) to `b` (t = 1) on `loader`.

    `model`: an `nn.Module` of the endpoints' architecture (only its structure is used: its
    own weights are never read or changed; it is moved to `device`, and its modules'
    training flags are restored at the end), or a zero-argument callable / `ModelSpec`.
    `loader` yields ``(input, target)`` pairs (or what `mcensemble.train.split_batch`
    understands); the batch size is the loader's. `loss_fn(output, target)` defaults to
    cross entropy. `callback(step, t, loss)` is called after every step with the step
    index (0-based), the sampled t and the data loss (without the weight-decay term).
    `progress`: tqdm bar on stderr (None: only when stderr is a terminal).

    Returns a `BezierPath` / `PolyChainPath` (per ``config.kind``) holding copies of `a`
    and `b` and the trained bends. `a` and `b` are never modified.
    Raises `BadOptionError` for a bad config (naming the option) and
    `ArchitectureMismatchError` when `a`, `b` and the model disagree (first differing tensor).
    """
    validate_curve_config(config)
    check_same_layout(a, b)
    torch.set_flush_denormal(True)  # on CPU, denormals made fitting steps many times slower
    if not isinstance(model, nn.Module):
        from ..models import as_factory
        model = as_factory(model)()
    check_same_architecture(model.state_dict(), a, names=("the model", "A"))
    device = torch.device(device)
    total = config.epochs * _steps_per_epoch(loader)

    restorer = _ModeRestorer(model)
    model.to(device).train()
    fitter = CurveFitter(model, a, b, kind=config.kind, bends=config.bends, momentum=config.momentum,
                         weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm,
                         device=device, loss_fn=loss_fn)
    bar = tqdm(total=total, desc=f"fit {config.kind}", file=sys.stderr,
               disable=None if progress is None else not progress, leave=False)
    want_loss = callback is not None or not bar.disable
    devices = [device] if device.type != "cpu" else []
    step = 0
    try:
        with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
            torch.manual_seed(config.seed)
            gen = torch.Generator().manual_seed(config.seed)
            for _ in range(config.epochs):
                for batch in loader:
                    x, y = _split_batch(batch)
                    if y is None:
                        raise BadOptionError("curve fitting needs (input, target) batches; the loader gives "
                                             "inputs only", option="--data")
                    x = x.to(device, non_blocking=True)
                    y = y.to(device, non_blocking=True)
                    t = float(torch.rand((), generator=gen, dtype=torch.float64))
                    loss = fitter.step(x, y, t, config.lr * lr_factor(step, total))
                    if want_loss:
                        lv = float(loss)
                        if callback is not None:
                            callback(step, t, lv)
                        if not bar.disable and step % 10 == 0:
                            bar.set_postfix(loss=f"{lv:.4f}", refresh=False)
                    bar.update()
                    step += 1
    finally:
        bar.close()
        restorer.restore()

    cls = BezierPath if config.kind == "bezier" else PolyChainPath
    meta = {"fit": {"epochs": config.epochs, "steps": total, "lr": config.lr, "momentum": config.momentum,
                    "weight_decay": config.weight_decay, "seed": config.seed,
                    "max_grad_norm": config.max_grad_norm}}
    return cls(a, b, fitter.bend_state_dicts(), metadata=meta)


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
