"""Each epoch's metrics reach every sink rank 0 opened, in order: the console line, then the search's queue."""

from __future__ import annotations

import queue as queue_module

from tlray import sinks
from tlray.sinks.console import ConsoleSink, format_metrics
from tlray.sinks.tune_queue import TuneQueueSink

METRICS = {"epoch": 3, "train_loss": 0.123456, "images_per_second": 1234.5, "lr": 0.001, "nodes": 1}


def test_the_console_line_of_an_epoch():
    assert format_metrics(3, METRICS, 5) == "epoch 3/5 train_loss=0.1235 images_per_second=1234 lr=0.001 nodes=1"


def test_a_run_opens_the_console_and_a_search_trial_also_its_queue(capfd):
    alone = sinks.open_all(sinks.SinkContext(trial=None, epochs=5))
    assert [type(s) for s in alone.sinks] == [ConsoleSink]

    queue = queue_module.SimpleQueue()  # answers put() as the trial's ray.util.queue.Queue does
    trial = sinks.open_all(sinks.SinkContext(trial="abc_00001", epochs=5, epoch_queue=queue))
    assert [type(s) for s in trial.sinks] == [ConsoleSink, TuneQueueSink]  # SINKS order: Tune last

    alone.log_epoch(3, METRICS)
    trial.log_epoch(3, METRICS)
    trial.close()
    assert queue.get_nowait() == METRICS and queue.empty()
    lines = capfd.readouterr().out.splitlines()
    assert lines == [
        "[tlray] epoch 3/5 train_loss=0.1235 images_per_second=1234 lr=0.001 nodes=1",
        "[tlray] trial abc_00001: epoch 3/5 train_loss=0.1235 images_per_second=1234 lr=0.001 nodes=1",
    ]


def test_tune_ending_a_trial_at_its_report_comes_after_every_other_sink_logged_the_epoch(capfd):
    class EndsTheTrial:  # a one-worker trial's queue: Tune may stop the trial in its report, which never returns
        def put(self, metrics):
            raise SystemExit

    trial = sinks.open_all(sinks.SinkContext(trial="abc_00002", epochs=5, epoch_queue=EndsTheTrial()))
    try:
        trial.log_epoch(3, METRICS)
    except SystemExit:
        pass
    assert capfd.readouterr().out.splitlines() == [
        "[tlray] trial abc_00002: epoch 3/5 train_loss=0.1235 images_per_second=1234 lr=0.001 nodes=1"
    ]


def test_every_named_sink_follows_the_protocol():
    for name in sinks.SINKS:
        cls = sinks.sink_class(name)
        assert all(callable(getattr(cls, method, None)) for method in ("open", "log_epoch", "close")), name
