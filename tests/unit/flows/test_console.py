"""What reaches the console and what goes to the log file (the routing itself; a real run is in test_train)."""

from __future__ import annotations

import pytest

from tlray import console


@pytest.fixture
def route(monkeypatch, tmp_path):
    monkeypatch.setattr(console, "route", console.Route())
    console.log_to(tmp_path / "ray.log")
    return tmp_path / "ray.log"


def forwarded(*lines: str, actor: str = "RayTrainWorker") -> None:
    console.show_forwarded_lines({"lines": list(lines), "pid": 42, "actor_name": actor, "is_err": False})


def test_tlray_lines_reach_the_console_and_every_line_the_log(route, capsys):
    forwarded("Reporting training result 1: TrainingReport(...)", "[tlray] epoch 1/3 val_accuracy=0.5")
    assert capsys.readouterr().out == "[tlray] epoch 1/3 val_accuracy=0.5\n"
    assert route.read_text().splitlines() == [
        "(RayTrainWorker pid=42) Reporting training result 1: TrainingReport(...)",
        "(RayTrainWorker pid=42) [tlray] epoch 1/3 val_accuracy=0.5",
    ]


def test_the_demo_keeps_worker_lines_in_the_log(route, capsys):
    console.show_worker_lines(False)
    forwarded("[tlray] epoch 1/3 val_accuracy=0.5")
    assert capsys.readouterr().out == ""
    assert "epoch 1/3" in route.read_text()


def test_verbose_leaves_printing_to_ray(route, capsys):
    console.set_verbose(True)  # Ray's own handler stays installed and prints every line, tlray's too
    forwarded("[tlray] epoch 1/3 val_accuracy=0.5")
    assert capsys.readouterr().out == ""
    assert "epoch 1/3" in route.read_text()


def test_lines_before_the_log_file_is_known_are_kept(monkeypatch, tmp_path):
    monkeypatch.setattr(console, "route", console.Route())
    forwarded("early line")
    console.log_to(tmp_path / "later.log")
    assert (tmp_path / "later.log").read_text() == "(RayTrainWorker pid=42) early line\n"


def test_a_pinned_log_stays(route, tmp_path):
    console.log_to(tmp_path / "demo.log", pin=True)
    assert console.log_to(tmp_path / "run" / "ray.log") == tmp_path / "demo.log"
    forwarded("x")
    assert (tmp_path / "demo.log").read_text() == "(RayTrainWorker pid=42) x\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("text", "terminal", "shown"),
    [
        ("epoch 3/10 loss=1", True, "[######..............] epoch 3/10 loss=1"),
        ("trial ab_1: epoch 10/10 loss=1", True, "[####################] trial ab_1: epoch 10/10 loss=1"),
        ("epoch 3/10 loss=1", False, "epoch 3/10 loss=1"),
        ("resuming after epoch 2 of 4", True, "resuming after epoch 2 of 4"),
    ],
)
def test_epoch_lines_get_a_bar_on_a_terminal(text, terminal, shown):
    assert console.progress_line(text, terminal) == shown


def test_a_run_in_s3_logs_to_a_local_file_named_after_it(tmp_path):
    assert console.log_path_for(str(tmp_path / "job" / "runs" / "r1")) == tmp_path / "job" / "runs" / "r1" / "ray.log"
    local = console.log_path_for("s3://bucket/job/runs/r1-abc")
    assert local.parts[-2:] == ("r1-abc", "ray.log")


def test_laps_time_each_part_from_the_end_of_the_one_before(monkeypatch):
    now = iter([10.0, 10.5, 13.0, 13.25, 20.0])
    monkeypatch.setattr(console.time, "perf_counter", lambda: next(now))
    laps = console.Laps()  # 10.0
    assert laps.lap("index") == {"index": 0.5}
    laps.lap("fit")  # 13.0
    laps.note("epochs", 2.0)  # inside the fit: the clock does not move
    laps.lap("fit")  # 13.25: a part timed again adds up
    assert laps.lap("publish") == {"index": 0.5, "fit": 2.75, "epochs": 2.0, "publish": 6.75}
    assert laps.line() == "timings: index 0.5 s, fit 2.8 s, epochs 2.0 s, publish 6.8 s"
