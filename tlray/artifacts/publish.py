"""Which epoch a run publishes: the best by `train.select_metric`, in that metric's own direction."""

from __future__ import annotations

import math
from dataclasses import dataclass

LOWER_IS_BETTER = ("train_loss", "val_loss")


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


def metric_mode(metric: str) -> str:
    return "min" if metric in LOWER_IS_BETTER else "max"


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
