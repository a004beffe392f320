"""The loop of `fit_curve` and what keeps a long fit safe: the learning-rate schedule,
the t draws, the fit checkpoint file (save, read, check before resuming) and the
SIGINT / SIGTERM handling that finishes the step, saves and stops (`FitInterrupted`).

`fit.py` owns what a step computes (`CurveFitter`, `fit_curve`); the data
order of every epoch is `data.epoch_batches`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .. import distributed as dist_
from ..checkpoints import check_same_architecture
from .._io import atomic_path, independent_tensors, is_int as _is_int, meta_field, read_header
from ..data import epoch_batches
from ..errors import BadOptionError, CheckpointError, FitInterrupted
from ..models import as_factory
from .base import check_same_layout, state_dict_sha256
from .curve_base import CurveConfig, bend_lr_scale

if TYPE_CHECKING:
    from .fit import CurveFitter

__all__ = ["lr_factor", "read_fit_checkpoint", "FIT_CHECKPOINT_FORMAT"]

log = logging.getLogger(__name__)


def lr_factor(step: int, total: int) -> float:
    """Learning-rate multiplier at `step` (0-based) of `total`: 1 for the first half of the
    steps, then linear down to 0.01 at the last step."""
    if total <= 1:
        return 1.0
    frac = step / (total - 1)
    if frac <= 0.5:
        return 1.0
    return 1.0 - 0.99 * (frac - 0.5) / 0.5


def _rank_seed(seed: int, rank: int) -> int:
    """`seed` on rank 0 (a single process is unchanged), a distinct seed on every other rank."""
    return int(seed) if rank == 0 else (int(seed) + (int(rank) << 40)) % (1 << 63)


def prepare_fit(model, a, b, *, checkpoint, checkpoint_every, resume,
                device) -> tuple[nn.Module, torch.device]:
    """What a trained path kind (curves, AutoNEB) checks and sets up before fitting: the
    endpoints' layout, the checkpoint arguments, the model (a factory is called) against A,
    and denormals flushed (on CPU they made fitting steps many times slower). Returns the
    model and the device."""
    check_same_layout(a, b)
    _check_checkpoint_args(checkpoint, checkpoint_every, resume)
    torch.set_flush_denormal(True)
    if not isinstance(model, nn.Module):
        model = as_factory(model)()
    check_same_architecture(model.state_dict(), a, names=("the model", "A"))
    return model, torch.device(device)


def _check_checkpoint_args(checkpoint, every, resume) -> None:
    if every is not None and (not _is_int(every) or every < 1):
        raise BadOptionError(f"`checkpoint_every` must be an integer >= 1, got {every!r}",
                             option="checkpoint_every")
    if resume and checkpoint is None:
        raise BadOptionError("`resume` needs `checkpoint` (where the fit was saved)", option="resume")
    if checkpoint is not None and os.path.isdir(checkpoint):
        raise BadOptionError(f"the fit checkpoint {checkpoint} is a folder; give a file name",
                             option="checkpoint")




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
                f"{meta.get('total_steps')}); pass `resume` to continue it, or choose another `checkpoint`",
                option="resume")
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
                                             "inputs only", option="data")
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
            f"{self.checkpoint}. Run the same command with `resume` to continue.",
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

        f = self.fitter
        tensors = {k: v.contiguous() for k, v in rng.items()}
        for i, bend in enumerate(f.bends):
            tensors.update({f"bend.{i}.{k}": v for k, v in zip(f.floating, bend)})
        train_names = [f.floating[j] for j in f.train_idx]
        for i, buf in enumerate(f.momenta):
            tensors.update({f"momentum.{i}.{k}": v for k, v in zip(train_names, buf)})
        meta = {"format": FIT_CHECKPOINT_FORMAT, "format_version": 1, "step": self.step,
                "epoch": self.step // self.spe, "batch": self.step % self.spe, "total_steps": self.total,
                "steps_per_epoch": self.spe, "world_size": dist_.world_size(), "finished": self.step >= self.total,
                "config": asdict(self.config), "endpoints_sha256": self.hashes(),
                "precision": f.precision.name, "skipped_steps": f.skipped_steps}
        if f.scaler is not None:  # fp16: the loss scale and its growth tracker, for a bit-identical resume
            meta["grad_scaler"] = f.scaler.state_dict()
        with atomic_path(self.checkpoint) as tmp:
            # the fit's own tensors, copied only where they share storage or sit on a GPU
            save_file(independent_tensors(tensors), str(tmp), metadata={"mcensemble": json.dumps(meta)})

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
        scaler = meta.get("grad_scaler") or {}
        if f.scaler is not None and scaler and set(scaler) != set(f.scaler.state_dict()):
            raise CheckpointError(f"the fit checkpoint {ck} has a damaged 'grad_scaler' record (fields "
                                  f"{sorted(scaler)}); choose another `checkpoint`")
        rng = {k: _ck_tensor(tensors, f"rng.{k}.{r}", None, ck) for k in ("t", "torch")}
        for k, v in rng.items():
            if v.dtype != torch.uint8 or v.dim() != 1:
                raise CheckpointError(f"the fit checkpoint {ck} has a damaged random state {f'rng.{k}.{r}'!r} "
                                      f"({v.dtype}, shape {tuple(v.shape)}); choose another `checkpoint`")
        saved_gen, saved_torch = self.gen.get_state(), torch.get_rng_state()
        try:
            self.gen.set_state(rng["t"])
            torch.set_rng_state(rng["torch"])
        except (RuntimeError, ValueError) as e:
            self.gen.set_state(saved_gen)
            torch.set_rng_state(saved_torch)
            raise CheckpointError(f"the fit checkpoint {ck} has a damaged random state ({e}); "
                                  "choose another `checkpoint`") from e
        with torch.no_grad():
            for v, saved in pairs:
                v.copy_(saved)
        f.skipped_steps = int(meta.get("skipped_steps") or 0)
        if f.scaler is not None and meta.get("grad_scaler"):
            f.scaler.load_state_dict(meta["grad_scaler"])
        if self.cuda and f"rng.cuda.{r}" in tensors:
            torch.cuda.set_rng_state(tensors[f"rng.cuda.{r}"], self.device)
        self.step = int(meta["step"])


def _ck_tensor(tensors, name: str, like: torch.Tensor | None, file, *, what: str = "fit checkpoint") -> torch.Tensor:
    """`tensors[name]` of a training checkpoint (`what`: "fit checkpoint", "AutoNEB checkpoint"),
    checked to have `like`'s shape and dtype; `CheckpointError` naming the file otherwise."""
    if name not in tensors:
        raise CheckpointError(f"the {what} {file} has no tensor {name!r}: it was written for another "
                              "model; choose another `checkpoint`")
    v = tensors[name]
    if like is not None and (v.shape != like.shape or v.dtype != like.dtype):
        raise CheckpointError(f"the {what} {file} has {name!r} of shape {tuple(v.shape)} ({v.dtype}), "
                              f"the model {tuple(like.shape)} ({like.dtype}); choose another `checkpoint`")
    return v


def open_training_checkpoint(file: str | os.PathLike, *, fmt: str, what: str, kind: str
                             ) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """(tensors, metadata, where) of a training checkpoint whose metadata says `format` `fmt`
    and `format_version` <= 1 (`what`: "fit checkpoint" ..., `kind`: "a curve-fit checkpoint"
    ..., for messages). `CheckpointError` naming the file when it cannot be read or is another
    file; the caller checks its own fields with `meta_field(meta, ..., where=where)`."""
    try:
        header = read_header(file)
        meta = header.document("mcensemble") if header.format == "safetensors" else None
    except CheckpointError as e:
        raise CheckpointError(f"cannot read the {what} {file}: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise CheckpointError(f"{file} is not {kind} (no {fmt} metadata); choose another `checkpoint`")
    try:
        tensors = load_file(str(file), device="cpu")
    except Exception as e:  # noqa: BLE001  (OSError, safetensors' SafetensorError)
        raise CheckpointError(f"cannot read the {what} {file}: {e}") from e
    where = f"the {what} {file}"
    if meta_field(meta, "format_version", "int", where=where) > 1:
        raise CheckpointError(f"{file} is a newer {what} (format_version {meta['format_version']}); "
                              "upgrade mcensemble")
    return tensors, meta, where


def _check_resume(run: _FitRun, meta: Mapping[str, Any]) -> None:
    """CheckpointError naming the first thing in which the checkpoint differs from this fit."""
    file = run.checkpoint
    hint = "resume with the same checkpoints and options, or choose another `checkpoint`"
    saved = list(meta.get("endpoints_sha256") or [])
    for name, h_saved, h_now in zip(("A (t = 0)", "B (t = 1)"), saved, run.hashes()):
        if h_saved != h_now:
            raise CheckpointError(f"the fit checkpoint {file} was written for other endpoints: {name} has "
                                  f"sha256 {h_saved[:12]}... there, {h_now[:12]}... here; {hint}")
    cfg_saved, cfg_now = meta.get("config") or {}, asdict(run.config)
    for k in _CONFIG_FIELDS:
        if cfg_saved.get(k) != cfg_now[k]:
            raise CheckpointError(f"the fit checkpoint {file} was written with `{k}` {cfg_saved.get(k)!r}, "
                                  f"this run has `{k}` {cfg_now[k]!r}; {hint}")
    saved_prec, prec = meta.get("precision"), run.fitter.precision.name
    if saved_prec is not None and saved_prec != prec:
        raise CheckpointError(f"the fit checkpoint {file} was written with `precision` {saved_prec}, this run "
                              f"has `precision` {prec}; resume with `precision` {saved_prec}, or choose another "
                              "`checkpoint`")
    if meta.get("steps_per_epoch") != run.spe:
        raise CheckpointError(f"the fit checkpoint {file} was written with {meta.get('steps_per_epoch')} batches "
                              f"per epoch, this run has {run.spe} (other `data` or `batch_size`); {hint}")
    if meta.get("world_size", 1) != dist_.world_size():
        raise CheckpointError(f"the fit checkpoint {file} was written by {meta.get('world_size', 1)} processes, "
                              f"this run has {dist_.world_size()}; resume with as many processes")
    if meta["total_steps"] != run.total:
        raise CheckpointError(f"the fit checkpoint {file} was written for a fit of {meta['total_steps']} steps, "
                              f"this run has {run.total} (other `epochs`, `data` or `batch_size`); {hint}")


def read_fit_checkpoint(file: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) of a fit checkpoint written by `fit_curve(checkpoint=...)`.
    `CheckpointError` naming the file when it is not one (or is damaged)."""
    tensors, meta, where = open_training_checkpoint(file, fmt=FIT_CHECKPOINT_FORMAT, what="fit checkpoint",
                                                    kind="a curve-fit checkpoint")
    total = meta_field(meta, "total_steps", "int", where=where, lo=0)
    meta_field(meta, "step", "int", where=where, lo=0, hi=total)
    for key in ("epoch", "batch"):
        meta_field(meta, key, "int", where=where, lo=0, default=0)
    meta_field(meta, "steps_per_epoch", "int", where=where, lo=1)
    meta_field(meta, "world_size", "int", where=where, lo=1, default=1)
    meta_field(meta, "finished", "bool", where=where, default=False)
    meta_field(meta, "config", "dict", where=where)
    meta_field(meta, "precision", "str", where=where, default=None)
    meta_field(meta, "skipped_steps", "int", where=where, lo=0, default=0)
    scaler = meta_field(meta, "grad_scaler", "dict", where=where, default={})
    if not all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
               and math.isfinite(v) for k, v in scaler.items()):
        raise CheckpointError(f"{where}: metadata field 'grad_scaler' must map names to finite numbers; "
                              "the file is damaged")
    if len(meta_field(meta, "endpoints_sha256", "str-list", where=where)) != 2:
        raise CheckpointError(f"{where}: metadata field 'endpoints_sha256' must hold two hashes (A and B); "
                              "the file is damaged")
    return tensors, meta
