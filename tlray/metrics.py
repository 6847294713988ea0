"""The metrics a run reports, in one table, and how a run's epoch is picked by one of them.

Every name here is a key of the metrics the training loop reports each epoch (to Ray Train, to Tune and to
the console). The table says which way each is better and who else may use it: the spec's metric choices
(`train.select_metric`, `tune.metric`, `publish.metric`), the epoch a run publishes, the checkpoints it keeps,
the columns of a search's results, and the champion gate all read it from here, so they cannot disagree.
Imports nothing heavy: the spec (and so `tlray validate`) reads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Mode = Literal["min", "max"]


@dataclass(frozen=True)
class Metric:
    name: str
    mode: Mode | None  # which way is better; None: a measurement that nothing ranks by
    # may pick the epoch a run publishes (train.select_metric) and rank a search's trials (tune.metric): one set,
    # since a search publishes its best trial by the metric that ranked it
    selectable: bool = False
    gate: str | None = None  # publish.metric may compare it: its key in flows.evaluate's classification report
    searched: bool = False  # kept in each trial's per-epoch history (tune_results.json)
    min_classes: int = 1  # reported only for a dataset with at least this many classes


METRICS: tuple[Metric, ...] = (
    Metric("epoch", None, searched=True),  # 1-based: the index of the others
    Metric("train_loss", "min", selectable=True, searched=True),
    Metric("train_accuracy", "max", searched=True),  # on the batches as trained (augmented): the reports' curves
    Metric("val_loss", "min", selectable=True, gate="loss", searched=True),
    Metric("val_accuracy", "max", selectable=True, gate="accuracy", searched=True),
    Metric("val_top5", "max", selectable=True, gate="top5", searched=True, min_classes=5),
    Metric("images_per_second", "max", selectable=True, searched=True),  # the whole group's
    Metric("epoch_seconds", None, searched=True),  # feature pass, training and validation
    # with the frozen-prefix cache: activations computed (not read) this epoch, and the seconds that took
    Metric("feature_pass_images", None, searched=True),
    Metric("feature_pass_seconds", None, searched=True),
    Metric("train_images", None),  # decoded and trained on, all workers
    Metric("lr", None),  # the head's at the epoch's last step; with train.layer_lr_decay the blocks' are lower
    # the blocks frozen this epoch and the parameters trained (both change with gradual unfreezing)
    Metric("freeze_depth", None),
    Metric("trainable_parameters", None),
    Metric("bad_images", None),  # undecodable, skipped
    Metric("resumes", None),  # restarts before this epoch
    Metric("nodes", None),  # the worker group's
    Metric("gpu_peak_mib", None),  # on GPUs only
)
BY_NAME = {m.name: m for m in METRICS}

SELECTABLE = tuple(m.name for m in METRICS if m.selectable)
LOWER_IS_BETTER = tuple(m.name for m in METRICS if m.selectable and m.mode == "min")
SEARCH_HISTORY = tuple(m.name for m in METRICS if m.searched)
# the gate's choices, those where higher is better first (the default, val_accuracy, leads)
GATE_REPORT_KEYS = {m.name: m.gate for m in sorted(METRICS, key=lambda m: m.mode == "min") if m.gate}
GATEABLE = tuple(GATE_REPORT_KEYS)


def metric_mode(metric: str) -> Mode:
    return "min" if metric in LOWER_IS_BETTER else "max"


def too_few_classes(metric: str, classes: int) -> str | None:
    """Why `metric` is never reported for a dataset of `classes` classes; None when it is."""
    needed = BY_NAME[metric].min_classes if metric in BY_NAME else 1
    if classes >= needed:
        return None
    return f"{metric} is only reported with {needed} or more classes; this dataset has {classes}"


@dataclass(frozen=True)
class Selection:
    """Which epoch a run publishes, and why."""

    epoch: int  # 1-based, as in metrics.json
    metric: str  # a reported metric, or "last"
    mode: str  # "max" | "min" | "last"
    value: float | None

    def reason(self, epochs_run: int) -> str:
        if self.metric == "last":
            return f"last epoch ({self.epoch} of {epochs_run}), train.select_metric is `last`"
        return f"best {self.metric} ({self.mode}) {self.value:.4g} at epoch {self.epoch} of {epochs_run}"

    def to_dict(self, epochs_run: int) -> dict:
        return {
            "epoch": self.epoch,
            "metric": self.metric,
            "mode": self.mode,
            "value": self.value,
            "reason": self.reason(epochs_run),
        }


def select_epoch(history: list[dict], metric: str) -> Selection:
    """The best epoch of `history` by `metric`; among equals the latest, as Ray's checkpoint manager keeps.

    NaN (or a missing value) ranks below every number, as in Ray, so it is chosen only if every epoch has it.
    """
    if not history:
        raise ValueError("select_epoch: no epochs in the history")
    if metric == "last":
        return Selection(history[-1]["epoch"], "last", "last", None)
    sign = -1.0 if metric_mode(metric) == "min" else 1.0

    def rank(entry: dict) -> tuple:
        value = entry.get(metric)
        usable = value is not None and not math.isnan(value)
        return (usable, sign * value if usable else 0.0, entry["epoch"])

    best = max(history, key=rank)
    return Selection(best["epoch"], metric, metric_mode(metric), best.get(metric))


def per_class_scores(counts: list[list[int]], classes: list[str]) -> dict[str, dict]:
    """Precision, recall, F1 and support of every class from counts[true][predicted]. A row may have extra
    columns after the classes' (predictions outside them): they count against recall, never as a class."""
    scores = {}
    for i, name in enumerate(classes):
        true_positive, predicted, actual = counts[i][i], sum(row[i] for row in counts), sum(counts[i])
        precision = true_positive / predicted if predicted else 0.0
        recall = true_positive / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        scores[name] = {"precision": float(precision), "recall": float(recall), "f1": float(f1), "support": int(actual)}
    return scores
