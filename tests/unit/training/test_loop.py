"""The training loop's epoch on a toy model, without Ray: it learns, validates as computed by hand, and reports
the metrics tlray.metrics names."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tlray import metrics
from tlray.data.errors import DataError
from tlray.data.pipeline import BAD_LABEL, DataSource
from tlray.spec import TrainSpec
from tlray.training.loop import check_bad_images, run_epoch, train_epoch, validate
from tlray.training.setup import Precision, Worker, make_lr_schedule, make_optimizer
from tlray.training.state import Progress

CPU = torch.device("cpu")
TRAIN = TrainSpec(epochs=5, optimizer="sgd", lr=0.05, scheduler="constant", weight_decay=0.0)


def separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes of points in the plane, around (-2, -2) and (2, 2): a line separates them."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=generator)
    points = torch.randn(n, 2, generator=generator) * 0.5 + (labels[:, None] * 4.0 - 2.0)
    return points, labels


def as_batches(points: torch.Tensor, labels: torch.Tensor, size: int) -> list[dict]:
    rows = torch.arange(len(labels))
    return [
        {"image": points[i : i + size], "label": labels[i : i + size], "row": rows[i : i + size]}
        for i in range(0, len(labels), size)
    ]


def toy_training(steps_per_epoch: int = 4):
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    optimizer = make_optimizer(model, TRAIN)
    scheduler = make_lr_schedule(optimizer, TRAIN, steps_per_epoch)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return model, optimizer, scheduler, scaler


def test_train_epoch_lowers_the_loss_epoch_by_epoch_until_validation_separates_the_classes():
    model, optimizer, scheduler, scaler = toy_training()
    points, labels = separable(32, seed=1)
    losses, accuracies = [], []
    for _ in range(TRAIN.epochs):
        batches = as_batches(points, labels, 8)
        loss_sum, seen, bad_rows, correct = train_epoch(
            model, model, lambda x: x, batches, optimizer, scheduler, scaler, nn.CrossEntropyLoss(), None
        )
        assert (seen, bad_rows) == (32, [])
        losses.append(loss_sum / seen)
        accuracies.append(correct / seen)
    assert all(later < earlier for earlier, later in zip(losses, losses[1:], strict=False))
    assert losses[-1] < losses[0] / 2
    assert accuracies[-1] == 1.0 and accuracies[0] < 1.0  # counted on the batches as they were trained
    assert model.training  # train_epoch leaves the model in train mode

    val_points, val_labels = separable(16, seed=2)
    val, _ = validate(model, model, as_batches(val_points, val_labels, 8), 2, nn.CrossEntropyLoss(), None)
    assert val["val_accuracy"] == 1.0


def cross_entropy(logits: list[float], label: int) -> float:
    return math.log(sum(math.exp(z) for z in logits)) - logits[label]


def test_validate_equals_a_hand_computation_on_a_fixed_model():
    model = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3))  # logits = inputs
    logits = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.5], [1.0, 0.0, 3.0], [9.0, 9.0, 9.0]]
    labels = [0, 1, 2, 0, BAD_LABEL]  # the last row: an undecodable image, left out of every number
    batches = [
        {"image": torch.tensor(logits[:2]), "label": torch.tensor(labels[:2]), "row": torch.tensor([10, 11])},
        {"image": torch.tensor(logits[2:]), "label": torch.tensor(labels[2:]), "row": torch.tensor([12, 13, 14])},
    ]
    model.train()
    val, bad_rows = validate(model, model, batches, 3, nn.CrossEntropyLoss(), None)

    expected_loss = sum(cross_entropy(z, y) for z, y in zip(logits[:4], labels[:4], strict=True)) / 4
    assert val["val_loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert val["val_accuracy"] == 3 / 4  # the fourth row's largest logit is class 2, its label 0
    assert val["rows"] == 5 and "val_top5" not in val  # top-5 only with 5 or more classes
    assert val["confusion"] == [[1, 0, 1], [0, 1, 0], [0, 0, 1]]  # counts[true][predicted], the bad row left out
    assert bad_rows == [14]
    assert model.training  # back in the mode it was in


def test_validate_reports_top5_with_five_classes_or_more():
    model = nn.Linear(6, 6, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(6))
    ranked = torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])  # class 0 first ... class 5 last
    batch = {"image": ranked.repeat(3, 1), "label": torch.tensor([4, 5, 1]), "row": torch.arange(3)}
    val, _ = validate(model, model, [batch], 6, nn.CrossEntropyLoss(), None)
    assert val["val_top5"] == 2 / 3  # class 5 ranks sixth
    assert val["val_accuracy"] == 0.0


class CachedActivations:
    """Stands in for the frozen-prefix cache: the reader the loop asks for validation batches."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches

    def iter_batches(self, source, split, rows, batch_size, device):
        assert split == "val" and list(rows) == list(range(source.counts["val"]))  # one worker: every row
        return self.batches

    def take_fill_stats(self) -> tuple[int, float]:
        return 7, 0.5


def test_run_epoch_reports_the_metrics_the_table_names():
    model, optimizer, scheduler, scaler = toy_training()
    points, labels = separable(32, seed=1)
    val_points, val_labels = separable(16, seed=2)
    source = DataSource("/images", None, ("a", "b"), {"train": 32, "val": 16}, "fp", None, None, False, "skip", 1, 1.0)
    worker = Worker(
        model=model,
        trained=model,
        features=lambda x: x,
        cache=CachedActivations(as_batches(val_points, val_labels, 8)),
        precision=Precision(None, "off"),
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        loss_fn=nn.CrossEntropyLoss(),
        source=source,
        batch_size=8,
        steps_per_epoch=4,
        val_batch_size=8,
        rank=0,
        world_size=1,
        device=CPU,
        nodes=1,
        depth=0,
    )
    progress = Progress(start_epoch=2, history=[{"epoch": 1}, {"epoch": 2}], resumes=1)
    reported = run_epoch(worker, 2, as_batches(points, labels, 8), progress, started=0.0)

    assert set(reported) <= set(metrics.BY_NAME)  # every name the loop reports is in the one table
    assert set(metrics.SELECTABLE) - {"val_top5"} <= set(reported)  # top-5: 5 classes or more
    assert (reported["epoch"], reported["train_images"], reported["bad_images"]) == (3, 32, 0)
    assert (reported["resumes"], reported["nodes"], reported["lr"]) == (1, 1, TRAIN.lr)
    assert (reported["freeze_depth"], reported["trainable_parameters"]) == (0, 2 * 2 + 2)  # Linear(2, 2)
    assert (reported["feature_pass_images"], reported["feature_pass_seconds"]) == (7, 0.5)
    assert reported["val_accuracy"] == 1.0 and reported["train_loss"] > 0
    assert progress.history[-1] is reported and len(progress.history) == 3
    assert progress.bad_image_examples == []  # only the first epoch's are kept


def test_too_many_undecodable_images_stop_the_run():
    check_bad_images(5, 100, ["/images/a/1.jpg"], rank=1)  # 5%: skipped, the run goes on
    with pytest.raises(DataError, match=r"6 of 100 images \(6.0%\) cannot be decoded, more than 5%"):
        check_bad_images(6, 100, ["/images/a/1.jpg"], rank=1)
