"""Choosing checkpoints from timm output folders (written here by timm's own CheckpointSaver
and update_summary, as train.py does) by their recorded metric."""
from __future__ import annotations

import argparse
import logging
import pathlib

import pytest
import torch

from mcensemble.checkpoints import load_checkpoint
from mcensemble.errors import BadOptionError, CheckpointError, UnsafeCheckpointError
from mcensemble.runs import checkpoints_from_runs, scan_run, select_checkpoints


def tiny():
    from mcensemble.models import ModelSpec, create_model
    return create_model(ModelSpec(arch="mce_digits_mlp", kwargs={"width": 4, "depth": 1}))


def write_run(folder: pathlib.Path, metrics, *, max_history=10, eval_metric="top1",
              summary=None, summary_only=False):
    """One timm run: epoch e's weights are all filled with e (so a file tells its epoch).
    `metrics[e]` goes into the checkpoint (None: unranked); `summary` (or the metrics) into
    summary.csv as eval_<eval_metric>."""
    from timm.utils import CheckpointSaver, update_summary
    folder.mkdir(parents=True, exist_ok=True)
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    args = argparse.Namespace(model="mce_digits_mlp", num_classes=10, in_chans=1,
                              model_kwargs={"width": 4, "depth": 1}, eval_metric=eval_metric)
    saver = CheckpointSaver(model, opt, args=args, checkpoint_dir=str(folder),
                            decreasing=eval_metric == "loss", max_history=max_history)
    summary = metrics if summary is None else summary
    for epoch, metric in enumerate(metrics):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(epoch))
        saver.save_checkpoint(epoch, metric=None if summary_only else metric)
        if summary[epoch] is not None:
            update_summary(epoch, {"loss": 1.0}, {"loss": 1.0, eval_metric: summary[epoch]},
                           str(folder / "summary.csv"), lr=0.1)
    return folder


def epoch_of(path) -> int:
    w = load_checkpoint(path).state_dict["head.weight"]
    return int(w.flatten()[0].item())


def names(paths):
    return [p.name for p in paths]


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    # history 3 of 5 epochs: checkpoint-1, -3, -2 kept; last.pth.tar is epoch 4; best epoch 1
    return write_run(tmp_path_factory.mktemp("runs") / "a", [0.1, 0.5, 0.3, 0.4, 0.2], max_history=3)


@pytest.fixture(scope="module")
def run_b(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("runs") / "b", [0.2, 0.3, 0.6, 0.1])


def test_one_run_all_distinct_checkpoints_in_epoch_order(run_a):
    got = checkpoints_from_runs(run_a)
    assert names(got) == ["checkpoint-1.pth.tar", "checkpoint-2.pth.tar", "checkpoint-3.pth.tar",
                          "last.pth.tar"]      # model_best duplicates checkpoint-1: counted once
    assert [epoch_of(p) for p in got] == [1, 2, 3, 4]
    run = scan_run(run_a)
    assert [(c.epoch, c.metric, c.metric_source) for c in run] == \
        [(1, 0.5, "checkpoint"), (2, 0.3, "checkpoint"), (3, 0.4, "checkpoint"), (4, 0.2, "checkpoint")]


def test_one_run_top_k_by_metric_then_epoch_order(run_a):
    assert names(checkpoints_from_runs([run_a], top_k=2)) == ["checkpoint-1.pth.tar", "checkpoint-3.pth.tar"]
    assert names(checkpoints_from_runs(run_a, top_k=1)) == ["checkpoint-1.pth.tar"]
    assert names(checkpoints_from_runs(run_a, top_k=2, metric_mode="min")) == \
        ["checkpoint-2.pth.tar", "last.pth.tar"]
    assert len(checkpoints_from_runs(run_a, top_k=50)) == 4


def test_several_runs_give_the_best_of_each_in_the_order_given(run_a, run_b):
    got = checkpoints_from_runs([run_b, run_a])
    assert [p.parent.name for p in got] == ["b", "a"]
    assert [epoch_of(p) for p in got] == [2, 1]
    got = checkpoints_from_runs([str(run_a), run_b], top_k=2)
    assert [(p.parent.name, epoch_of(p)) for p in got] == [("a", 1), ("a", 3), ("b", 1), ("b", 2)]


def test_metric_from_summary_csv_when_the_checkpoints_have_none(tmp_path):
    run = write_run(tmp_path / "r", [0.1, 0.9, 0.5, 0.7], summary_only=True)
    assert not (run / "model_best.pth.tar").exists()
    assert [c.metric_source for c in scan_run(run)] == ["summary.csv"] * 4
    assert [epoch_of(p) for p in checkpoints_from_runs(run, top_k=2)] == [1, 3]


def test_summary_column_follows_eval_metric_and_min_mode(tmp_path, caplog):
    run = write_run(tmp_path / "r", [0.9, 0.2, 0.4], eval_metric="loss", summary_only=True)
    assert [c.metric for c in scan_run(run)] == [0.9, 0.2, 0.4]
    assert [epoch_of(p) for p in checkpoints_from_runs(run, top_k=1, metric_mode="min")] == [1]
    with caplog.at_level(logging.WARNING, logger="mcensemble.runs"):
        checkpoints_from_runs(run, top_k=1)
    assert "pass `metric_mode` min" in caplog.text


def test_no_metric_anywhere_takes_the_latest_epochs(tmp_path, caplog):
    run = write_run(tmp_path / "r", [None, None, None, None])
    with caplog.at_level(logging.WARNING, logger="mcensemble.runs"):
        got = checkpoints_from_runs(run, top_k=2)
    assert [epoch_of(p) for p in got] == [2, 3] and "latest epoch" in caplog.text


def test_select_checkpoints_ranks_unranked_last(run_a):
    run = scan_run(run_a)
    from dataclasses import replace
    run = [replace(run[0], metric=None)] + run[1:]
    assert [c.epoch for c in select_checkpoints(run, 3)] == [2, 3, 4]


def test_chosen_files_load_with_their_weights(run_a):
    chosen = checkpoints_from_runs(run_a, top_k=3)
    assert len(chosen) == 3  # the loop below checks something
    for p in chosen:
        ck = load_checkpoint(p)
        assert ck.metadata["arch"] == "mce_digits_mlp" and ck.metadata["epoch"] == epoch_of(p)


# ----------------------------------------------------------------------------- errors
def test_missing_folder_and_file_name_the_path(tmp_path, run_a):
    with pytest.raises(CheckpointError, match=r"run folder '.*nope' not found"):
        checkpoints_from_runs(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"is a file, not a run folder"):
        checkpoints_from_runs([run_a / "last.pth.tar"])


def test_folder_without_checkpoints_names_it_and_points_to_run_folders(tmp_path, run_a):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match=r"'.*empty' holds no timm checkpoints") as info:
        checkpoints_from_runs(tmp_path / "empty")
    assert "run folders" not in str(info.value)
    with pytest.raises(CheckpointError, match=r"holds run folders \(a\): pass those"):
        checkpoints_from_runs(run_a.parent)


@pytest.mark.parametrize("kwargs, option", [
    (dict(top_k=0), "top_k"), (dict(top_k=1.5), "top_k"), (dict(top_k=True), "top_k"),
    (dict(metric_mode="best"), "metric_mode"),
])
def test_bad_options(run_a, kwargs, option):
    with pytest.raises(BadOptionError) as info:
        checkpoints_from_runs(run_a, **kwargs)
    assert info.value.option == option


def test_no_folder_given():
    with pytest.raises(BadOptionError, match="no run folder given") as info:
        checkpoints_from_runs([])
    assert info.value.option == "from_run"


def test_unsafe_and_corrupt_checkpoints_are_refused_by_name(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    torch.save({"state_dict": {"w": torch.zeros(1)}, "epoch": 0, "x": pathlib.PurePosixPath("a")},
               run / "checkpoint-0.pth.tar")
    with pytest.raises(UnsafeCheckpointError, match="checkpoint-0.pth.tar.*PurePosixPath"):
        checkpoints_from_runs(run)
    (run / "checkpoint-0.pth.tar").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="checkpoint-0.pth.tar"):
        checkpoints_from_runs(run)
    torch.save({"w": torch.zeros(1)}, run / "checkpoint-0.pth.tar")
    with pytest.raises(CheckpointError, match="not a timm training checkpoint"):
        checkpoints_from_runs(run)
