"""Each epoch's metrics into the run's MLflow run, at step = epoch: a `tlray train` run's own, a search trial's
child run. The driver makes the MLflow run and puts it in the plan (tlray.flows.tracking, and per trial
tlray.training.search); without one (no `tracking.mlflow`, or the server was unreachable) this sink declines.

Logging never raises and never waits more than one request's timeout: a server that goes away mid-run turns
tracking off for the rest of the worker's process after one warning (tlray.io.mlflow). An epoch that a
search's trial trains again after a pause (see tlray.training.search.run_trial) is logged again at its step.
"""

from __future__ import annotations

from typing import Any

from tlray.sinks import SinkContext


class MlflowSink:
    def __init__(self, run: Any) -> None:
        self.run = run  # tlray.io.mlflow.TrackedRun: the sinks layer sits below io, so it arrives built

    @classmethod
    def open(cls, context: SinkContext) -> MlflowSink | None:
        return cls(context.tracking) if context.tracking is not None else None

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self.run.log_metrics(epoch, {k: v for k, v in metrics.items() if k != "epoch"})

    def close(self) -> None:
        pass  # the driver ends the MLflow run once the run is published (a search's trials: once it has ended)
