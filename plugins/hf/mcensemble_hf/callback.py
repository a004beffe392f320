"""`MCEnsembleTrainerCallback`: mcensemble's training-loop hooks as one Hugging Face
`transformers.TrainerCallback`."""
from __future__ import annotations

import logging
import math
import numbers
import os
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn
try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("mcensemble_hf needs Hugging Face transformers, which is not installed: "
                      "pip install transformers accelerate") from e

from mcensemble.errors import BadOptionError, MCEnsembleError
from mcensemble.hooks import channel_dropout as _channel_dropout
from mcensemble.hooks import example_batch
from mcensemble.snapshots import (SnapshotCollector, check_bn_options, fge_collector, network_in,
                                  read_collector_state, save_snapshots, write_collector_state)

__all__ = ["MCEnsembleTrainerCallback", "SNAPSHOTS_FILE"]

logger = logging.getLogger(__name__)

SNAPSHOTS_FILE = "mcensemble_snapshots.safetensors"
"""Name of the file the callback writes into every Trainer checkpoint folder."""

_MODES = ("fge", "epoch", None)
_META_KEY = "mcensemble_snapshots"
_FORMAT_VERSION = 1


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class MCEnsembleTrainerCallback(TrainerCallback):
    """Channel dropout while a `transformers.Trainer` trains, snapshots along the way, an
    mcensemble ensemble file at the end.

    Args:
        out: the ensemble file written when training ends (`mcensemble.load_ensemble` reads it);
            default `<args.output_dir>/mcensemble.safetensors`.
        snapshots: "epoch" (a snapshot at the end of every epoch from `start_epoch` on),
            "fge" (fast geometric ensembling: a cyclical lr and a snapshot at each cycle's low
            point; see `mcensemble.snapshots.SnapshotCollector`) or None (no snapshots, no file:
            channel dropout only).
        cycle_epochs / cycle_steps: FGE cycle length, in epochs or optimizer steps (exactly
            one with "fge").
        lr_max / lr_min: FGE learning rates at the top and the low point of a cycle, set on
            every param group after each optimizer step (`on_step_end`, after the Trainer's
            own lr scheduler has stepped, so the schedule wins; see the README).
        start_epoch: epochs trained normally (the Trainer's lr) before snapshots and cycles
            begin.
        max_snapshots: keep only the most recent ones.
        channel_dropout: drop whole hidden units with this probability while training
            (`mcensemble.hooks.channel_dropout`), attached at `on_train_begin` and removed
            at `on_train_end` (or `remove_dropout()`); the unit graph is traced with torch.fx
            on `example_input` or on two samples of the first training batch, or given as
            `graph=`.
        graph: a unit graph (anything `mcensemble.units.build_unit_graph(graph=...)` takes)
            instead of tracing.
        example_input: the input tensor to trace the network with.
        module: dotted attribute name of the network inside the Trainer's model (e.g. "net"
            when the model is a wrapper that computes the loss); None: the model itself.
            Snapshots, channel dropout and BatchNorm re-estimation all act on this network,
            and each ensemble member is it (it must return logits).
        model_spec: a `mcensemble.ModelSpec` (or its dict) stored in the file so that it
            loads without `model=`.
        bn_loader: "train" (the Trainer's training dataloader), any iterable of batches
            (tensors, (inputs, labels) tuples or dicts with a "pixel_values" / "input" /
            "image" entry), or None: where each member's BatchNorm statistics are
            re-estimated before the file is written (`bn_max_batches` caps the batches).
        precision: "fp32" (default), "bf16" or "fp16": the forward passes of that BatchNorm
            re-estimation run under autocast in this dtype (`mcensemble.precision`; the
            statistics are accumulated in float32). Training itself runs at the Trainer's
            own `bf16=` / `fp16=`.
        resume_from: where to read the collected snapshots back when the Trainer resumes
            (`trainer.train(resume_from_checkpoint=...)`): None (default) takes
            `<args.output_dir>/checkpoint-<global_step>`, where the Trainer writes its
            checkpoints; a path (a checkpoint folder or the snapshots file in it) says where
            else; False starts collecting afresh.

    Resume: at every checkpoint (`on_save`) the collector's state - step count, schedule,
    snapshots - is written to `<checkpoint folder>/mcensemble_snapshots.safetensors`. When
    a run resumes, `on_train_begin` reads it back from the checkpoint the Trainer resumed
    from, so the run goes on collecting where it stopped. A callback only sees
    `args`/`state`, not the path passed to `train()`, and the Trainer restores `state` before
    training resumes: the folder is `<args.output_dir>/checkpoint-<global_step>` (where the
    Trainer writes its checkpoints) unless `resume_from=` names another.
    A file whose step does not match the resumed step is refused (`BadOptionError`).

    Only the world process zero writes the ensemble file; checkpoint files are written by
    the processes that write checkpoints (`args.should_save`).
    """

    def __init__(self, out: str | os.PathLike | None = None, *, snapshots: str | None = "epoch",
                 cycle_epochs: int | None = None, cycle_steps: int | None = None,
                 lr_max: float | None = None, lr_min: float | None = None, start_epoch: int = 0,
                 max_snapshots: int | None = None, channel_dropout: float = 0.0,
                 graph: Any = None, example_input: torch.Tensor | None = None,
                 module: str | None = None, model_spec: Any = None,
                 bn_loader: str | Iterable | None = "train", bn_max_batches: int | None = None,
                 resume_from: str | os.PathLike | bool | None = None, precision: str | None = None):
        if snapshots not in _MODES:
            raise BadOptionError(f"snapshots must be 'epoch', 'fge' or None, got {snapshots!r}",
                                 option="snapshots")
        if snapshots == "fge":
            if (cycle_epochs is None) == (cycle_steps is None):
                raise BadOptionError("snapshots='fge' needs exactly one of cycle_epochs= or "
                                     "cycle_steps=", option="cycle_epochs")
            if cycle_epochs is not None and (not _is_int(cycle_epochs) or cycle_epochs < 1):
                raise BadOptionError(f"cycle_epochs must be an integer >= 1, got {cycle_epochs!r}",
                                     option="cycle_epochs")
            if cycle_steps is not None and (not _is_int(cycle_steps) or cycle_steps < 2):
                raise BadOptionError(f"cycle_steps must be an integer >= 2, got {cycle_steps!r}",
                                     option="cycle_steps")
            for name, lr in (("lr_max", lr_max), ("lr_min", lr_min)):
                if lr is None or isinstance(lr, bool) or not isinstance(lr, numbers.Real) \
                        or not math.isfinite(lr) or lr < 0:
                    raise BadOptionError(f"snapshots='fge' needs {name}= a finite number >= 0, "
                                         f"got {lr!r}", option=name)
            if lr_min > lr_max:
                raise BadOptionError(f"lr_min={lr_min} is above lr_max={lr_max}", option="lr_min")
        elif (cycle_epochs, cycle_steps, lr_max, lr_min) != (None,) * 4:
            raise BadOptionError("cycle_epochs / cycle_steps / lr_max / lr_min belong to "
                                 "snapshots='fge'", option="snapshots")
        if not _is_int(start_epoch) or start_epoch < 0:
            raise BadOptionError(f"start_epoch must be an integer >= 0, got {start_epoch!r}",
                                 option="start_epoch")
        if max_snapshots is not None and (not _is_int(max_snapshots) or max_snapshots < 1):
            raise BadOptionError(f"max_snapshots must be an integer >= 1 or None, got "
                                 f"{max_snapshots!r}", option="max_snapshots")
        if isinstance(channel_dropout, bool) or not isinstance(channel_dropout, numbers.Real) \
                or not 0.0 <= float(channel_dropout) < 1.0:
            raise BadOptionError(f"channel_dropout must be a number in [0, 1), got "
                                 f"{channel_dropout!r}", option="channel_dropout")
        if example_input is not None and not torch.is_tensor(example_input) and not (
                isinstance(example_input, (tuple, list)) and all(map(torch.is_tensor, example_input))):
            raise BadOptionError("example_input must be a tensor (or a tuple of tensors), got "
                                 f"{type(example_input).__name__}", option="example_input")
        if module is not None and (not isinstance(module, str) or not module):
            raise BadOptionError(f"module must be an attribute name such as 'net', got {module!r}",
                                 option="module")
        self.precision = check_bn_options(bn_loader, bn_max_batches, precision)
        if resume_from is True or not (resume_from is None or resume_from is False
                                       or isinstance(resume_from, (str, os.PathLike))):
            raise BadOptionError(f"resume_from must be a checkpoint folder, None (find it) or "
                                 f"False (start afresh), got {resume_from!r}", option="resume_from")
        self.out = None if out is None else Path(out)
        self.mode, self.cycle_epochs, self.cycle_steps = snapshots, cycle_epochs, cycle_steps
        self.lr_max = None if lr_max is None else float(lr_max)
        self.lr_min = None if lr_min is None else float(lr_min)
        self.start_epoch, self.max_snapshots = start_epoch, max_snapshots
        self.p, self.graph, self.example_input = float(channel_dropout), graph, example_input
        self.module, self.model_spec = module, model_spec
        self.bn_loader, self.bn_max_batches = bn_loader, bn_max_batches
        self.resume_from = resume_from
        self.collector: SnapshotCollector | None = None
        self.ensemble_path: Path | None = None
        self.resumed_from: Path | None = None     # the snapshots file read at the last resume
        self._dropout = None
        self._seen_step = 0

    # -- helpers -------------------------------------------------------------------------
    def network(self, model: nn.Module) -> nn.Module:
        """The network that is snapshotted (the Trainer's model, or its `module`)."""
        return network_in(model, self.module, owner="the Trainer's model")

    @staticmethod
    def _steps_per_epoch(args, train_dataloader) -> int:
        """Optimizer steps per epoch, as the Trainer counts them."""
        try:
            n = len(train_dataloader)
        except TypeError:
            n = 0
        if n < 1:
            raise BadOptionError("the number of training batches per epoch is unknown (an "
                                 "iterable dataset?); pass cycle_steps= and start_epoch=0",
                                 option="cycle_epochs")
        return max(1, math.ceil(n / max(1, int(args.gradient_accumulation_steps))))

    def _make_collector(self, args, net: nn.Module, optimizer, train_dataloader) -> SnapshotCollector:
        if self.mode != "fge":
            return SnapshotCollector(net, max_snapshots=self.max_snapshots)
        if optimizer is None:
            raise BadOptionError("snapshots='fge' sets the optimizer's lr, but the Trainer passed "
                                 "no optimizer to the callback", option="snapshots")
        return fge_collector(net, optimizer, steps_per_epoch=lambda: self._steps_per_epoch(args, train_dataloader),
                             cycle_steps=self.cycle_steps, cycle_epochs=self.cycle_epochs,
                             start_epoch=self.start_epoch, lr_max=self.lr_max, lr_min=self.lr_min,
                             max_snapshots=self.max_snapshots)

    # -- hooks -----------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None,
                       train_dataloader=None, **kwargs):
        if model is None:
            raise BadOptionError("the Trainer passed no model to the callback", option="model")
        net = self.network(model)
        self.ensemble_path = None
        self.resumed_from = None
        if self.mode is not None:
            self.collector = self._make_collector(args, net, optimizer, train_dataloader)
            if state.global_step > 0:       # a resumed run
                self._restore(args, state)
            elif self.resume_from not in (None, False):
                logger.warning("MCEnsembleTrainerCallback: resume_from=%s is ignored: the Trainer "
                               "is not resuming (pass resume_from_checkpoint= to train())",
                               self.resume_from)
        self._seen_step = state.global_step
        self._remove_dropout()
        if self.p > 0:
            x = self.example_input
            if x is None and self.graph is None:
                device = next((t.device for t in net.parameters()), torch.device("cpu"))
                x = example_batch(train_dataloader, device)
            self._dropout = _channel_dropout(net, self.p, graph=self.graph, example_input=x)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        # Set the step's lr again: whatever ran since on_step_end (an evaluation stepping a
        # ReduceLROnPlateau scheduler, another callback) must not change the FGE schedule.
        col = self.collector
        if self.mode != "fge" or col is None or optimizer is None:
            return
        lr = col.lr_at(col.step_count)
        if lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr

    def on_step_end(self, args, state, control, **kwargs):
        # The Trainer has stepped the optimizer and its lr scheduler; the collector now
        # snapshots at a low point and sets the lr of the next step, over the scheduler's.
        if self.mode != "fge" or self.collector is None:
            return
        while self._seen_step < state.global_step:
            self._seen_step += 1
            taken = self.collector.step()
            if taken is not None:
                taken["epoch"] = max(0, math.ceil(state.epoch - 1e-6) - 1) if state.epoch else 0
                taken["global_step"] = state.global_step

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.mode != "epoch" or self.collector is None:
            return
        epoch = max(0, math.ceil((state.epoch or 0) - 1e-6) - 1)
        if epoch >= self.start_epoch:
            self.collector.snapshot(epoch=epoch, global_step=state.global_step)

    def on_save(self, args, state, control, **kwargs):
        if self.collector is None or not args.should_save:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():
            logger.warning("MCEnsembleTrainerCallback: checkpoint folder %s not found; the "
                           "snapshots were not saved with it", folder)
            return
        self.save_snapshots(folder / SNAPSHOTS_FILE, global_step=state.global_step)

    def on_train_end(self, args, state, control, train_dataloader=None, **kwargs):
        self._remove_dropout()
        col = self.collector
        if col is None or not state.is_world_process_zero:
            return
        out = self.out or Path(args.output_dir) / "mcensemble.safetensors"
        bn = train_dataloader if isinstance(self.bn_loader, str) else self.bn_loader
        self.ensemble_path = save_snapshots(
            col, out, who="MCEnsembleTrainerCallback", model_spec=self.model_spec, bn_loader=bn,
            bn_max_batches=self.bn_max_batches, precision=self.precision,
            extra={"transformers": {"epoch": state.epoch, "global_step": state.global_step, "channel_dropout": self.p}})

    def remove_dropout(self) -> None:
        """Take the channel-dropout hooks off now (done at `on_train_end`; call it yourself
        when `trainer.train()` raised, since the Trainer has no exception event)."""
        self._remove_dropout()

    def _remove_dropout(self) -> None:
        if self._dropout is not None:
            self._dropout.remove()
            self._dropout = None

    # -- snapshots in checkpoints ---------------------------------------------------------
    def save_snapshots(self, file: str | os.PathLike, *, global_step: int) -> Path:
        """Write the collector's state (snapshots, step count, schedule) to `file`
        (safetensors, atomically)."""
        return write_collector_state(file, self.collector.state_dict(), key=_META_KEY,
                                     extra={"version": _FORMAT_VERSION, "mode": self.mode,
                                            "global_step": int(global_step)})

    def _resume_file(self, args, state) -> Path | None:
        if self.resume_from is False:
            return None
        if self.resume_from is not None:
            path = Path(self.resume_from)
            path = path / SNAPSHOTS_FILE if path.is_dir() else path
            if not path.is_file():
                raise BadOptionError(f"resume_from={str(self.resume_from)!r}: no {SNAPSHOTS_FILE} "
                                     "there", option="resume_from")
            return path
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if (folder / SNAPSHOTS_FILE).is_file():
            return folder / SNAPSHOTS_FILE
        raise BadOptionError(
            f"the Trainer resumed at step {state.global_step}, but there is no {SNAPSHOTS_FILE} in "
            f"{str(folder)!r}: pass resume_from= the checkpoint folder the run resumes from, or "
            "resume_from=False to start collecting afresh", option="resume_from")

    def _restore(self, args, state) -> None:
        col = self.collector
        path = self._resume_file(args, state)
        if path is None:   # afresh: count the schedule from the step the run is at
            col.load_state_dict({"step_count": state.global_step})
            return
        try:
            doc = read_collector_state(path, key=_META_KEY)
            snaps = doc.pop("snapshots")
        except MCEnsembleError as e:
            raise BadOptionError(f"cannot read the snapshots from {str(path)!r} "
                                 f"({type(e).__name__}: {e})", option="resume_from") from e
        if doc.get("mode") != self.mode:
            raise BadOptionError(f"{str(path)!r} holds snapshots={doc.get('mode')!r} snapshots; "
                                 f"this callback has snapshots={self.mode!r}", option="snapshots")
        if int(doc["global_step"]) != state.global_step:
            raise BadOptionError(f"{str(path)!r} was written at step {doc['global_step']}, but the "
                                 f"Trainer resumed at step {state.global_step}: pass resume_from= "
                                 "the checkpoint folder the run resumes from", option="resume_from")
        own = col.model.state_dict()
        for snap in snaps:
            if set(snap) != set(own):
                raise BadOptionError(f"{str(path)!r} holds snapshots of another network (tensor "
                                     "names differ); check module=", option="module")
        if self.max_snapshots is not None:
            keep = self.max_snapshots
            snaps, doc["info"] = snaps[-keep:], doc["info"][-keep:]
        col.load_state_dict({**{k: doc[k] for k in ("step_count", "cycle_steps", "lr_max",
                                                       "lr_min", "start", "info") if k in doc},
                             "snapshots": snaps})
        self.resumed_from = path
        logger.info("MCEnsembleTrainerCallback: resumed %d snapshot(s) from %s", len(snaps), path)

