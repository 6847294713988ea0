"""Where each epoch's metrics go besides Ray Train's report: the console, a search's Tune driver, ...

A sink is a class in its own module here, named in SINKS. Rank 0 of a run's worker group opens every sink
once (`open_all`); a sink that has nothing to do in this run (the Tune queue outside a search) declines by
returning None from `open`. After each epoch, once the epoch's checkpoint is stored, the loop logs the epoch's
metrics to every open sink, in SINKS order; `close` comes after the last epoch, or when the loop fails.
Imported by the training loop; a sink imports what it needs itself, lazily.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Protocol

SINKS = {  # name -> "module:class", opened in this order
    "console": "tlray.sinks.console:ConsoleSink",
    "mlflow": "tlray.sinks.mlflow:MlflowSink",
    # last: in a one-worker trial, Tune may end the trial at this epoch's report, before a sink after it logs
    "tune": "tlray.sinks.tune_queue:TuneQueueSink",
}


@dataclass(frozen=True)
class SinkContext:
    """What a sink may know of the run it logs."""

    trial: str | None  # the search trial this run trains (its id), None for `tlray train`
    epochs: int  # train.epochs: the run's last epoch
    epoch_queue: Any = None  # a search trial's ray.util.queue.Queue, which its driver hands on to Tune
    tracking: Any = None  # the run's MLflow run (tlray.io.mlflow.TrackedRun, the plan's), None when untracked


class MetricsSink(Protocol):
    @classmethod
    def open(cls, context: SinkContext) -> MetricsSink | None:
        """The sink for this run, or None when it has nothing to do in it."""

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """`metrics`: everything reported for the 1-based `epoch` (names: tlray.metrics), "epoch" included."""

    def close(self) -> None: ...


class Sinks:
    """The sinks a run opened: each call goes to every one, in order."""

    def __init__(self, sinks: list[MetricsSink]) -> None:
        self.sinks = sinks

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        for sink in self.sinks:
            sink.log_epoch(epoch, metrics)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def sink_class(name: str) -> type[MetricsSink]:
    module, _, cls = SINKS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def open_all(context: SinkContext) -> Sinks:
    """Every sink in SINKS that takes part in this run."""
    opened = (sink_class(name).open(context) for name in SINKS)
    return Sinks([sink for sink in opened if sink is not None])
