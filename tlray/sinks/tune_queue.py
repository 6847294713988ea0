"""A search's trial: each epoch's metrics, its checkpoint sealed, into the queue the trial's driver reads.

The driver (tlray.training.search.run_trial) hands them to Tune in order. The queue is unbounded: a put
never waits, so the workers never wait for Tune's decision on an epoch.
"""

from __future__ import annotations

from typing import Any

from tlray.sinks import SinkContext


class TuneQueueSink:
    def __init__(self, queue: Any) -> None:
        self.queue = queue  # ray.util.queue.Queue

    @classmethod
    def open(cls, context: SinkContext) -> TuneQueueSink | None:
        return cls(context.epoch_queue) if context.epoch_queue is not None else None

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self.queue.put(metrics)

    def close(self) -> None:
        pass  # the driver ends the queue itself, once every worker has ended
