"""Each epoch's metrics as one `[tlray]` line: `epoch 2/5 train_loss=0.31 ...`, a trial's prefixed with its id.

Logged once the epoch's checkpoint is stored: a run stopped after the line resumes after that epoch.
"""

from __future__ import annotations

from tlray.console import say
from tlray.sinks import SinkContext


class ConsoleSink:
    def __init__(self, prefix: str, epochs: int) -> None:
        self.prefix, self.epochs = prefix, epochs

    @classmethod
    def open(cls, context: SinkContext) -> ConsoleSink:
        return cls(f"trial {context.trial}: " if context.trial else "", context.epochs)

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        say(self.prefix + format_metrics(epoch, metrics, self.epochs))

    def close(self) -> None:
        pass


def format_metrics(epoch: int, metrics: dict[str, float], epochs: int) -> str:
    parts = [f"epoch {epoch}/{epochs}"]
    parts += [f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch"]
    return " ".join(parts)
