"""A one-worker search trial trains in its own process (tlray.training.trainer.one_process_seat), without Ray:
its epochs reach Tune in order, each once its checkpoint is stored; it keeps the checkpoints Ray Train would;
killed mid-run, it resumes from the last epoch Tune saw and ends as the undisturbed trial, to the bit."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_unfreezing import Images, job, plan_of, weights_file
from test_unfreezing import images as images  # noqa: F401 — the fixture: in-memory images for the pipeline

from tlray.io import checkpoints, storage
from tlray.spec import TrainSpec
from tlray.training import loop, search, trainer
from tlray.training.search import REPORTED_FILE, ToTune, drop_epochs_tune_never_saw
from tlray.training.trainer import epochs_to_keep, one_process_seat, run_loop


class Killed(Exception):
    """Stands in for the trial's process dying."""


def run_trial(trial, reports: list[dict], dies_in_epoch: int | None = None) -> None:
    """What search.run_trial runs for a one-worker trial, with Tune's report recorded; the process dies part-way
    through the 1-based epoch `dies_in_epoch`."""
    run_epoch = loop.run_epoch

    def dying(worker, epoch, *args):
        if epoch + 1 == dies_in_epoch:
            raise Killed
        return run_epoch(worker, epoch, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(search.ray.tune, "report", reports.append)
        patch.setattr(loop, "run_epoch", dying)
        drop_epochs_tune_never_saw(trial.checkpoints_uri, None)
        run_loop(trial, one_process_seat(trial, "trial_a"), ToTune(trial))


@pytest.fixture
def trial(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "node_cpus", lambda: 2.0)  # what Ray says of this node
    monkeypatch.setattr(trainer, "count_nodes", lambda world_size: 1)
    spec = job(depth="all", epochs=5, checkpoints_to_keep=1, select_metric="val_loss")
    plan = plan_of(spec, weights_file(tmp_path))
    return dataclasses.replace(plan, checkpoints_uri=str(tmp_path / "trials" / "trial_a"))


def scores(reports: list[dict]) -> list[tuple]:
    return [(r["training_iteration"], r["train_loss"], r["val_loss"], r["val_accuracy"]) for r in reports]


def test_a_trial_in_its_own_process_reports_every_stored_epoch_and_keeps_what_ray_train_would(images: Images, trial):
    reports: list[dict] = []
    run_trial(trial, reports)
    assert [r["training_iteration"] for r in reports] == [1, 2, 3, 4, 5]
    for r in reports:  # each epoch's checkpoint was stored (sealed) before Tune heard of it
        assert r[search.CHECKPOINT_PATH_KEY] == storage.join(trial.checkpoints_uri, f"epoch_{r['epoch']:04d}")
    history = [{k: v for k, v in r.items() if k != search.CHECKPOINT_PATH_KEY} for r in reports]
    kept = checkpoints.epoch_folders(storage.list_tree(trial.checkpoints_uri))
    assert set(kept.values()) == epochs_to_keep(history, trial.spec.train)
    best = min(history, key=lambda h: h["val_loss"])["epoch"]
    assert set(kept.values()) == {5, best}  # the latest, and the best by select_metric
    newest = checkpoints.newest_complete(trial.checkpoints_uri, None)
    assert newest.state["epoch"] == 4 and newest.state["frozen_from"] == trial.weights_identity
    assert newest.folder.endswith("epoch_0005")
    assert storage.list_tree(trial.checkpoints_uri)["epoch_0005/state.pt"] < 1024**2  # the head, not the backbone
    assert storage.read_json(storage.join(trial.checkpoints_uri, REPORTED_FILE)) == {"epoch": 5}


def test_a_killed_trial_resumes_from_the_last_epoch_tune_saw_and_ends_as_the_undisturbed_one(images, trial, tmp_path):
    undisturbed: list[dict] = []
    run_trial(dataclasses.replace(trial, checkpoints_uri=str(tmp_path / "undisturbed")), undisturbed)

    reports: list[dict] = []
    with pytest.raises(Killed):
        run_trial(trial, reports, dies_in_epoch=4)
    assert [r["training_iteration"] for r in reports] == [1, 2, 3]
    images.train_epochs_read.clear()
    run_trial(trial, reports)  # Tune restarts the trial (search.trial_failures): from epoch 3's checkpoint
    assert images.train_epochs_read == [3, 4]
    assert scores(reports) == scores(undisturbed)
    assert [r["resumes"] for r in reports] == [0, 0, 0, 1, 1]


def test_the_kept_epochs_are_the_latest_and_the_best_by_select_metric_as_ray_train_keeps_them():
    history = [{"epoch": e, "val_loss": loss} for e, loss in enumerate([0.9, 0.4, 0.5, 0.4, 0.7], start=1)]
    assert epochs_to_keep(history, TrainSpec(select_metric="val_loss", checkpoints_to_keep=1)) == {4, 5}
    assert epochs_to_keep(history, TrainSpec(select_metric="val_loss", checkpoints_to_keep=2)) == {2, 4, 5}
    assert epochs_to_keep(history, TrainSpec(select_metric="last", checkpoints_to_keep=2)) == {4, 5}
    assert epochs_to_keep(history[:1], TrainSpec(select_metric="val_loss", checkpoints_to_keep=3)) == {1}


def test_the_device_of_a_trial_in_its_own_process_is_the_gpu_ray_gave_it(tmp_path):
    spec = job(depth="all")
    gpu = spec.model_copy(update={"scaling": spec.scaling.model_copy(update={"use_gpu": True})})
    assert one_process_seat(plan_of(gpu), "t").device == torch.device("cuda")
    assert one_process_seat(plan_of(spec), "t").device == torch.device("cpu")
