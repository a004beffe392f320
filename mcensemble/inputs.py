"""A job's inputs from its options: the model spec, the checkpoints, the data loaders and
the unit graph, each checked before any work is done with it."""
from __future__ import annotations

import logging
import os
from typing import Sequence

import torch

from .checkpoints import check_same_architecture, load_checkpoint
from .data import check_input_fits, check_same_classes, create_loader
from .errors import BadOptionError
from .models import resolve_model_spec
from .options import DataOptions, ModelOptions
from .units import build_unit_graph

__all__ = ["model_arg", "unit_graph_of", "load_endpoints", "data_loaders", "loader_for_test_data", "overlap_warning"]

_log = logging.getLogger(__name__)


def unit_graph_of(net: torch.nn.Module, opts: ModelOptions):
    """The unit graph given by hand (`--unit-graph FILE.json`, checked against the model), or
    None (the tools then trace the model themselves)."""
    if opts.unit_graph is None:
        return None
    return build_unit_graph(net, graph=os.fspath(opts.unit_graph))


def model_arg(opts: ModelOptions):
    """The `model=` argument for load_checkpoint: a ModelSpec built from the flags, or what the user passed."""
    if opts.model is not None and not isinstance(opts.model, str):
        return opts.model
    if opts.arch is None and opts.model is None:
        return None
    return resolve_model_spec(arch=opts.arch, model=opts.model, num_classes=opts.num_classes,
                              in_chans=opts.in_chans)


def load_endpoints(files: Sequence[str | os.PathLike], opts: ModelOptions) -> list:
    """Load checkpoints and check they share one architecture (first differing tensor named)."""
    if len(files) < 2:
        raise BadOptionError(f"need at least two checkpoints, got {len(files)}", option="CHECKPOINTS")
    model = model_arg(opts)
    cks = [load_checkpoint(f, model=model, ema=opts.ema) for f in files]
    for i, ck in enumerate(cks[1:], start=1):
        check_same_architecture(cks[0].state_dict, ck.state_dict, names=(str(files[0]), str(files[i])))
    return cks


def data_loaders(model: torch.nn.Module, d: DataOptions):
    """(training loader, validation loader or None), unshuffled, checked against the model
    and against each other's classes."""
    if not d.data:
        raise BadOptionError("training data is needed: pass `data` SPEC (e.g. `data` digits)", option="data")
    train = create_loader(d.data, split="train", batch_size=d.batch_size, shuffle=False, seed=d.seed, model=model)
    check_input_fits(model, train, spec=d.data)
    val = None
    if d.val_data:
        val = create_loader(d.val_data, split="val", batch_size=d.batch_size, shuffle=False, seed=d.seed, model=model)
        check_same_classes(train, val, train_spec=d.data, val_spec=d.val_data)
        check_input_fits(model, val, spec=d.val_data)
    return train, val


def loader_for_test_data(net, data: DataOptions):
    """The `--test-data` loader (digits: its held-out split), or None; warns when it is
    the same spec as the training or validation data."""
    if not data.test_data:
        return None
    overlap = overlap_warning(data)
    if overlap:
        _log.warning(overlap)
    test = create_loader(data.test_data, split="val", batch_size=data.batch_size, shuffle=False, seed=data.seed,
                         model=net)
    check_input_fits(net, test, spec=data.test_data)
    return test


def overlap_warning(data: DataOptions) -> str | None:
    """A warning when --test-data names the validation data, or the training data (digits
    specs aside: their test and training splits differ)."""
    t = data.test_data
    digits = t is not None and (t == "digits" or t.startswith("digits,"))
    what = "validation" if t == data.val_data else "training" if t == data.data and not digits else None
    return None if not t or what is None else (f"`test_data` {t} is also the {what} data: its numbers are not "
                                               "on data used for nothing else")

