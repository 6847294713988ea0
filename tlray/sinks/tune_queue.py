"""A search's trial: each epoch's metrics, its checkpoint sealed, to Tune through the trial's epoch queue.

A trial of several workers: a ray.util.queue.Queue that the trial's process reads and hands to Tune in order
(tlray.training.search.run_trainer); it is unbounded, so a put never waits and the workers never wait for Tune's
decision on an epoch. A one-worker trial trains in the trial's process: its queue is tlray.training.search.ToTune,
whose put reports to Tune there and then.
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
