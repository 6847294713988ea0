"""Which epoch a run publishes: the best by the select metric, and the checkpoint it is loaded from."""

from __future__ import annotations

import math

import pytest

from tlray.metrics import Selection, select_epoch

# ---------------------------------------------------------------------------------------
# Best epoch
# ---------------------------------------------------------------------------------------
HISTORY = [
    {"epoch": 1, "val_accuracy": 0.50, "val_loss": 1.2, "train_loss": 1.5},
    {"epoch": 2, "val_accuracy": 0.77, "val_loss": 0.7, "train_loss": 1.0},
    {"epoch": 3, "val_accuracy": 0.38, "val_loss": 0.9, "train_loss": 0.4},
]


def test_select_epoch_picks_the_best_by_the_metrics_own_direction():
    assert select_epoch(HISTORY, "val_accuracy") == Selection(2, "val_accuracy", "max", 0.77)
    assert select_epoch(HISTORY, "val_loss") == Selection(2, "val_loss", "min", 0.7)
    assert select_epoch(HISTORY, "train_loss") == Selection(3, "train_loss", "min", 0.4)
    assert select_epoch(HISTORY, "last") == Selection(3, "last", "last", None)
    assert select_epoch(HISTORY, "val_accuracy").reason(3) == "best val_accuracy (max) 0.77 at epoch 2 of 3"


def test_select_epoch_prefers_the_latest_of_equals_and_never_nan():
    tied = [{"epoch": 1, "val_accuracy": 0.9}, {"epoch": 2, "val_accuracy": 0.9}, {"epoch": 3, "val_accuracy": 0.1}]
    assert select_epoch(tied, "val_accuracy").epoch == 2  # what Ray's checkpoint manager keeps among equals
    nan = [{"epoch": 1, "val_loss": 2.0}, {"epoch": 2, "val_loss": math.nan}]
    assert select_epoch(nan, "val_loss").epoch == 1


def test_checkpoint_config_keeps_the_best_by_the_select_metric():
    from tlray.spec import TrainSpec
    from tlray.training.trainer import checkpoint_config

    best = checkpoint_config(TrainSpec(select_metric="val_loss", checkpoints_to_keep=1))
    assert (best.num_to_keep, best.checkpoint_score_attribute, best.checkpoint_score_order) == (1, "val_loss", "min")
    last = checkpoint_config(TrainSpec(select_metric="last", checkpoints_to_keep=3))
    assert (last.num_to_keep, last.checkpoint_score_attribute) == (3, None)


def test_the_selected_epochs_checkpoint_is_loaded_not_the_latest(tmp_path):
    """The newest complete checkpoint holds the whole history; the weights come from the selected epoch's."""
    import torch

    from tlray.io import checkpoints
    from tlray.training.trainer import load_selected_checkpoint

    for epoch in range(3):
        folder = tmp_path / "train" / checkpoints.folder_name(epoch)
        folder.mkdir(parents=True)
        state = {"model": {"w": torch.tensor([float(epoch)])}, "epoch": epoch, "history": HISTORY[: epoch + 1]}
        checkpoints.write(state, folder)
    (tmp_path / "train" / checkpoints.folder_name(3)).mkdir()  # an upload that never finished: no seal
    state, history = load_selected_checkpoint(str(tmp_path / "train"), None, "val_accuracy")
    assert (state["epoch"], state["model"]["w"].item(), history) == (1, 1.0, HISTORY)
    state, _ = load_selected_checkpoint(str(tmp_path / "train"), None, "last")
    assert state["model"]["w"].item() == 2.0

    (tmp_path / "train" / checkpoints.folder_name(1) / checkpoints.STATE_FILE).write_bytes(b"cut")
    with pytest.raises(RuntimeError, match="epoch_0002: state.pt has 3 of"):  # the selected one is checked too
        load_selected_checkpoint(str(tmp_path / "train"), None, "val_accuracy")
