"""`MCEnsembleCallback`: mcensemble's training-loop hooks as one Lightning callback."""
from __future__ import annotations

import ast
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn

from mcensemble.errors import BadOptionError
from mcensemble.hooks import channel_dropout as _channel_dropout
from mcensemble.hooks import example_batch
from mcensemble.snapshots import (SnapshotCollector, check_bn_options, fge_collector, network_in,
                                  save_snapshots)

try:  # the unified package first; the standalone one if that is what is installed
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on the environment
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as e:
        raise ImportError("mcensemble_lightning needs Lightning, which is not installed: "
                          "pip install lightning") from e

__all__ = ["MCEnsembleCallback"]

logger = logging.getLogger(__name__)

_MODES = ("fge", "epoch", None)


class MCEnsembleCallback(pl.Callback):
    """Channel dropout while training, snapshots along the way, an ensemble file at the end.

    Args:
        out: the ensemble file written at the end of training (`mcensemble.load_ensemble` reads it);
            default `<trainer.default_root_dir>/mcensemble.safetensors`.
        snapshots: "fge" (fast geometric ensembling: cyclical lr, a snapshot at each cycle's
            low point; see `mcensemble.snapshots.SnapshotCollector`), "epoch" (a snapshot at the
            end of every epoch from `start_epoch` on) or None (no snapshots, no file).
        cycle_epochs / cycle_steps: FGE cycle length, in epochs or optimizer steps.
        lr_max / lr_min: FGE learning rates at the top and the low point of a cycle (set on
            every param group of the one optimizer; configure no lr scheduler with "fge").
        start_epoch: epochs trained normally before snapshots (and cycles) begin.
        max_snapshots: keep only the most recent ones.
        channel_dropout: drop whole hidden units with this probability while training
            (`mcensemble.hooks.channel_dropout`, traced on one training batch or
            `example_input`; `graph=` a unit graph to restrict it); removed when training ends.
        graph: a unit graph (anything `mcensemble.units.build_unit_graph(graph=...)` takes)
            instead of tracing.
        module: attribute name of the network inside the LightningModule (e.g. "model");
            None: the LightningModule itself. Snapshots are that network's state dicts.
        model_spec: a `mcensemble.ModelSpec` (or its dict) stored in the file so that it
            loads without `model=`.
        bn_loader: "train" (the trainer's training loader), any iterable of batches, or
            None: where BatchNorm statistics of each member are re-estimated before saving
            (`bn_max_batches` caps the batches).
        precision: "fp32" (default), "bf16" or "fp16": the forward passes of that BatchNorm
            re-estimation run under autocast in this dtype (`mcensemble.precision`; the
            statistics are accumulated in float32). Training itself runs at the Trainer's
            own `precision=`.

    The collector's state (step count, snapshots) is saved in Lightning checkpoints
    (`state_dict` / `load_state_dict`), so `trainer.fit(..., ckpt_path=...)` resumes
    collecting where it stopped. Lightning files a callback's state under a key made of its
    `out` and `snapshots`; a resumed run whose callback has another `out` still picks up the
    snapshots (with a warning saying where they now go), and one with another `snapshots`
    mode is refused (`BadOptionError`), never silently started afresh. Only global rank 0
    writes the file.
    """

    def __init__(self, out: str | os.PathLike | None = None, *, snapshots: str | None = "epoch",
                 cycle_epochs: int | None = None, cycle_steps: int | None = None,
                 lr_max: float | None = None, lr_min: float | None = None, start_epoch: int = 0,
                 max_snapshots: int | None = None, channel_dropout: float = 0.0, graph: Any = None,
                 example_input: torch.Tensor | None = None, module: str | None = None,
                 model_spec: Any = None, bn_loader: str | Iterable | None = "train",
                 bn_max_batches: int | None = None, precision: str | None = None):
        if snapshots not in _MODES:
            raise BadOptionError(f"snapshots must be 'fge', 'epoch' or None, got {snapshots!r}",
                                 option="snapshots")
        if snapshots == "fge" and (cycle_epochs is None) == (cycle_steps is None):
            raise BadOptionError("snapshots='fge' needs exactly one of cycle_epochs= or cycle_steps=",
                                 option="cycle_epochs")
        if snapshots != "fge" and (cycle_epochs, cycle_steps, lr_max, lr_min) != (None,) * 4:
            raise BadOptionError("cycle_epochs / cycle_steps / lr_max / lr_min belong to "
                                 "snapshots='fge'", option="snapshots")
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0:
            raise BadOptionError(f"start_epoch must be an integer >= 0, got {start_epoch!r}",
                                 option="start_epoch")
        try:
            p = float(channel_dropout)
        except (TypeError, ValueError) as e:
            raise BadOptionError(f"channel_dropout must be a number in [0, 1), got {channel_dropout!r}",
                                 option="channel_dropout") from e
        if not 0.0 <= p < 1.0:
            raise BadOptionError(f"channel_dropout must be in [0, 1), got {channel_dropout!r}",
                                 option="channel_dropout")
        self.precision = check_bn_options(bn_loader, bn_max_batches, precision)
        self.out = None if out is None else Path(out)
        self.mode, self.cycle_epochs, self.cycle_steps = snapshots, cycle_epochs, cycle_steps
        self.lr_max, self.lr_min, self.start_epoch = lr_max, lr_min, start_epoch
        self.max_snapshots, self.p, self.graph = max_snapshots, float(channel_dropout), graph
        self.example_input, self.module, self.model_spec = example_input, module, model_spec
        self.bn_loader, self.bn_max_batches = bn_loader, bn_max_batches
        self.collector: SnapshotCollector | None = None
        self.ensemble_path: Path | None = None
        self._dropout = None
        self._pending: dict[str, Any] | None = None
        self._seen_step = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(out=str(self.out), snapshots=self.mode)

    # -- helpers -------------------------------------------------------------------------
    def network(self, pl_module: nn.Module) -> nn.Module:
        """The network whose weights are snapshotted (the LightningModule or its `module`)."""
        return network_in(pl_module, self.module, owner="the LightningModule")

    def _steps_per_epoch(self, trainer: "pl.Trainer") -> int:
        n = trainer.num_training_batches
        if not math.isfinite(n) or n < 1:
            raise BadOptionError("the number of training batches per epoch is unknown (an "
                                 "iterable dataset?); pass cycle_steps= and start_epoch=0",
                                 option="cycle_epochs")
        return math.ceil(int(n) / max(1, trainer.accumulate_grad_batches))

    def _make_collector(self, trainer: "pl.Trainer", net: nn.Module) -> SnapshotCollector:
        if self.mode != "fge":
            return SnapshotCollector(net, max_snapshots=self.max_snapshots)
        if len(trainer.optimizers) != 1:
            raise BadOptionError(f"snapshots='fge' sets the lr of one optimizer; the module "
                                 f"configures {len(trainer.optimizers)}", option="snapshots")
        if trainer.lr_scheduler_configs:
            logger.warning("MCEnsembleCallback(snapshots='fge') sets the learning rate itself; "
                           "the configured lr scheduler will fight it")
        return fge_collector(net, trainer.optimizers[0], steps_per_epoch=lambda: self._steps_per_epoch(trainer),
                             cycle_steps=self.cycle_steps, cycle_epochs=self.cycle_epochs,
                             start_epoch=self.start_epoch, lr_max=self.lr_max, lr_min=self.lr_min,
                             max_snapshots=self.max_snapshots)

    # -- hooks -----------------------------------------------------------------------------
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        net = self.network(pl_module)
        if self.p > 0 and self._dropout is None:
            x = self.example_input
            if x is None and self.graph is None:
                x = example_batch(trainer.train_dataloader, pl_module.device)
            self._dropout = _channel_dropout(net, self.p, graph=self.graph, example_input=x)
        if self.mode is not None:
            self.collector = self._make_collector(trainer, net)
            if self._pending is not None:
                self.collector.load_state_dict(self._pending)
                self._pending = None
        self._seen_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.mode != "fge" or self.collector is None:
            return
        while self._seen_step < trainer.global_step:    # one call per optimizer step taken
            self._seen_step += 1
            taken = self.collector.step()
            if taken is not None:
                taken["epoch"] = trainer.current_epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.mode == "epoch" and self.collector is not None and \
                trainer.current_epoch >= self.start_epoch:
            self.collector.snapshot(epoch=trainer.current_epoch, global_step=trainer.global_step)

    def on_train_end(self, trainer, pl_module) -> None:
        self._remove_dropout()
        col = self.collector
        if col is None or not trainer.is_global_zero:
            return
        out = self.out or Path(trainer.default_root_dir) / "mcensemble.safetensors"
        bn = trainer.train_dataloader if isinstance(self.bn_loader, str) else self.bn_loader
        self.ensemble_path = save_snapshots(
            col, out, who="MCEnsembleCallback", model_spec=self.model_spec, bn_loader=bn,
            bn_max_batches=self.bn_max_batches, precision=self.precision,
            extra={"lightning": {"epochs": trainer.current_epoch, "global_step": trainer.global_step,
                                 "channel_dropout": self.p}})

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._remove_dropout()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._remove_dropout()

    def _remove_dropout(self) -> None:
        if self._dropout is not None:
            self._dropout.remove()
            self._dropout = None

    # -- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        where = {"out": str(self.out), "snapshots": self.mode}
        if self.collector is not None:
            return {"collector": self.collector.state_dict(), **where}
        return {"collector": self._pending, **where} if self._pending is not None else {}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: Mapping[str, Any]) -> None:
        """Find this callback's state when Lightning will not: it files a callback's state
        under a key made of `out` and `snapshots`, so after either changed between runs the
        collected snapshots would be dropped without a word. Another `out`: the state is
        taken (a warning names both files); another `snapshots` mode, or several candidate
        states: `BadOptionError`."""
        states = checkpoint.get("callbacks") or {}
        if self.mode is None or self.state_key in states:
            return
        taken = {cb.state_key for cb in trainer.callbacks}
        prefix = f"{type(self).__qualname__}{{"
        others = {k: v for k, v in states.items() if isinstance(k, str) and k.startswith(prefix)
                  and k not in taken and isinstance(v, Mapping) and v.get("collector") is not None}
        if not others:
            return
        if len(others) > 1:
            raise BadOptionError(f"the checkpoint holds the snapshots of {len(others)} MCEnsembleCallbacks "
                                 f"({', '.join(sorted(others))}) and none has this one's out={str(self.out)!r}, "
                                 f"snapshots={self.mode!r}: give the callback the out= it had", option="out")
        key, state = next(iter(others.items()))
        saved = {**_key_fields(key, len(prefix) - 1), **{k: state[k] for k in ("out", "snapshots") if k in state}}
        if saved.get("snapshots") != self.mode:
            raise BadOptionError(
                f"the checkpoint holds snapshots={saved.get('snapshots')!r} snapshots (MCEnsembleCallback("
                f"out={saved.get('out')!r})), this callback has snapshots={self.mode!r}: resume with the "
                "snapshots= the run had, or start a new run (no ckpt_path) to collect afresh", option="snapshots")
        logger.warning("MCEnsembleCallback: resuming the %d snapshot(s) collected with out=%s; the ensemble is "
                       "now written to out=%s", len(state["collector"].get("snapshots") or []),
                       saved.get("out"), self.out)
        self.load_state_dict(state)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        state = state_dict.get("collector")
        if state is None:
            return
        if self.collector is not None:
            self.collector.load_state_dict(state)
        else:
            self._pending = dict(state)


def _key_fields(key: str, start: int) -> dict[str, Any]:
    """The keyword arguments a Lightning state key (`Name{'out': ..., 'snapshots': ...}`) was
    made of, or {} when it cannot be read (a literal only: nothing is evaluated)."""
    try:
        fields = ast.literal_eval(key[start:])
    except (ValueError, SyntaxError):
        return {}
    return fields if isinstance(fields, dict) else {}
