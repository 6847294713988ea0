"""tlray's MLflow REST client and metrics sink against a real `mlflow server`, and against servers that are down,
silent, or go away mid-run: one warning, no exception, bounded time."""

from __future__ import annotations

import logging
import time
import uuid

import pytest

from tlray import sinks
from tlray.io import mlflow
from tlray.sinks import SinkContext
from tlray.sinks.mlflow import MlflowSink

from mlflow_fixtures import Relay, closed_port, silent_server

UNREACHABLE = "unreachable"


def new_experiment(uri: str) -> str:
    return mlflow.experiment_id(uri, f"exp-{uuid.uuid4().hex[:8]}")


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    answer = mlflow.Client(uri).call("GET", "metrics/get-history", query={"run_id": run_id, "metric_key": key})
    return sorted((m["step"], m["value"]) for m in answer.get("metrics", []))


def run_data(uri: str, run_id: str) -> dict:
    return mlflow.Client(uri).call("GET", "runs/get", query={"run_id": run_id})["run"]


def warnings_about(caplog, uri: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if UNREACHABLE in r.getMessage() and uri in r.getMessage()]


def test_a_run_keeps_params_tags_and_each_epochs_metrics_at_its_step(mlflow_server):
    experiment = new_experiment(mlflow_server)
    run = mlflow.start_run(mlflow_server, experiment, "job-1a2b3c4d", "job-1a2b3c4d", {"tlray.run_uri": "s3://b/j"})
    params = {f"p{i:03d}": i for i in range(150)}  # more than one log-batch holds
    params["long"] = "x" * 7000  # beyond MLflow's 6000 characters
    run.log_params(params)
    run.set_tags({"tlray.model_uri": "s3://b/j/model"})
    sink = MlflowSink.open(SinkContext(trial=None, epochs=3, tracking=run))
    for epoch, accuracy in ((1, 0.5), (2, 0.75), (3, 0.875)):
        sink.log_epoch(epoch, {"epoch": epoch, "val_accuracy": accuracy, "train_loss": 1.0 / epoch})
    sink.close()
    run.end()

    assert history(mlflow_server, run.run_id, "val_accuracy") == [(1, 0.5), (2, 0.75), (3, 0.875)]
    assert history(mlflow_server, run.run_id, "train_loss") == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    assert history(mlflow_server, run.run_id, "epoch") == []  # the step is the epoch
    data = run_data(mlflow_server, run.run_id)
    logged = {p["key"]: p["value"] for p in data["data"]["params"]}
    assert len(logged) == 151 and logged["p149"] == "149"
    assert logged["long"] == "x" * mlflow.MAX_PARAM_VALUE
    tags = {t["key"]: t["value"] for t in data["data"]["tags"]}
    assert tags["tlray.run_id"] == "job-1a2b3c4d" and tags["mlflow.runName"] == "job-1a2b3c4d"
    assert (tags["tlray.run_uri"], tags["tlray.model_uri"]) == ("s3://b/j", "s3://b/j/model")
    assert data["info"]["status"] == "FINISHED"


def test_a_resumed_run_goes_on_in_the_same_mlflow_run(mlflow_server):
    experiment = new_experiment(mlflow_server)
    first = mlflow.start_run(mlflow_server, experiment, "job-resumed", "job-resumed")
    first.log_params({"train.lr": 0.003})
    first.log_metrics(1, {"val_loss": 0.9})
    first.end("KILLED")  # stopped after epoch 1

    again = mlflow.start_run(mlflow_server, experiment, "job-resumed", "job-resumed")
    assert again == first
    assert run_data(mlflow_server, again.run_id)["info"]["status"] == "RUNNING"
    again.log_params({"train.lr": 0.003})  # the same spec: the same params, accepted again
    again.log_metrics(2, {"val_loss": 0.4})
    assert history(mlflow_server, first.run_id, "val_loss") == [(1, 0.9), (2, 0.4)]
    assert len(mlflow.find_runs(mlflow_server, experiment, {mlflow.RUN_ID_TAG: "job-resumed"})) == 1
    other = mlflow.start_run(mlflow_server, experiment, "job-other", "job-other")
    assert other.run_id != first.run_id


def test_a_search_is_a_parent_run_with_one_child_per_trial(mlflow_server):
    experiment = new_experiment(mlflow_server)
    parent = mlflow.start_run(mlflow_server, experiment, "job-search-1", "job-search-1")
    children = {
        trial: mlflow.start_run(
            mlflow_server, experiment, f"job-search-1/trials/{trial}", trial, {mlflow.PARENT_TAG: parent.run_id}
        )
        for trial in ("t1", "t2")
    }
    for n, (trial, child) in enumerate(children.items()):
        sink = MlflowSink.open(SinkContext(trial=trial, epochs=2, tracking=child))
        sink.log_epoch(1, {"epoch": 1, "val_loss": 1.0 + n})

    found = mlflow.find_runs(mlflow_server, experiment, {mlflow.PARENT_TAG: parent.run_id})
    assert sorted(r["info"]["run_id"] for r in found) == sorted(c.run_id for c in children.values())
    assert history(mlflow_server, children["t2"].run_id, "val_loss") == [(1, 2.0)]
    assert history(mlflow_server, parent.run_id, "val_loss") == []


def test_registered_versions_and_the_champion_alias(mlflow_server):
    name = f"job-{uuid.uuid4().hex[:6]}"
    experiment = new_experiment(mlflow_server)
    runs = [mlflow.start_run(mlflow_server, experiment, f"{name}-{n}", f"{name}-{n}") for n in range(2)]
    first = mlflow.register_version(runs[0], name, f"s3://b/{name}/runs/0/model")
    second = mlflow.register_version(runs[1], name, f"s3://b/{name}/runs/1/model")
    assert (first, second) == ("1", "2")
    assert mlflow.register_version(runs[0], name, f"s3://b/{name}/runs/0/model") == "1"  # published again
    assert mlflow.alias_version(mlflow_server, name, "champion") is None
    mlflow.set_alias(mlflow_server, name, "champion", first)
    assert mlflow.alias_version(mlflow_server, name, "champion") == "1"
    mlflow.set_alias(mlflow_server, name, "champion", second)
    assert mlflow.alias_version(mlflow_server, name, "champion") == "2"


def test_artifacts_go_through_the_servers_proxy(mlflow_server):
    import urllib.request

    run = mlflow.start_run(mlflow_server, new_experiment(mlflow_server), "job-art", "job-art")
    run.log_artifact("metadata.json", b'{"run_id": "job-art"}')
    run.log_artifact("report/learning_curves.png", b"\x89PNG tiny")
    root = run.artifact_uri.split(":", 1)[1].lstrip("/")
    listed = mlflow.Client(mlflow_server).call("GET", "artifacts/list", query={"run_id": run.run_id, "path": "report"})
    assert [f["path"] for f in listed["files"]] == ["report/learning_curves.png"]
    with urllib.request.urlopen(f"{mlflow_server}/api/2.0/mlflow-artifacts/artifacts/{root}/metadata.json") as got:
        assert got.read() == b'{"run_id": "job-art"}'


def test_sinks_open_mlflow_only_for_a_tracked_run(mlflow_server):
    assert [type(s).__name__ for s in sinks.open_all(SinkContext(None, 2)).sinks] == ["ConsoleSink"]
    run = mlflow.start_run(mlflow_server, new_experiment(mlflow_server), "job-sinks", "job-sinks")
    opened = sinks.open_all(SinkContext(None, 2, tracking=run)).sinks
    assert [type(s).__name__ for s in opened] == ["ConsoleSink", "MlflowSink"]


def a_whole_run(uri: str) -> mlflow.TrackedRun | None:
    """What a tracked `tlray train` asks of the server, start to end: nothing may raise."""
    experiment = mlflow.experiment_id(uri, "job")
    run = mlflow.start_run(uri, experiment, "job-x", "job-x") if experiment else None
    stand_in = run or mlflow.TrackedRun(uri, "0", "r", "mlflow-artifacts:/0/r/artifacts")  # as a worker holds it
    sink = MlflowSink.open(SinkContext(None, 3, tracking=stand_in))
    for epoch in (1, 2, 3):
        sink.log_epoch(epoch, {"epoch": epoch, "val_loss": 1.0})
    stand_in.log_artifact("metadata.json", b"{}")
    assert mlflow.register_version(stand_in, "job", "s3://b/job/runs/x/model") is None
    assert mlflow.alias_version(uri, "job", "champion") is None
    stand_in.end()
    return run


@pytest.mark.parametrize("server", [closed_port, silent_server])
def test_a_server_down_or_silent_warns_once_and_never_stalls(server, caplog, monkeypatch):
    caplog.set_level(logging.WARNING, logger="tlray")
    monkeypatch.setattr(mlflow, "TIMEOUT_SECONDS", 1.0)  # 5 s in use; the same one wait, shorter
    bound = 1.0 if server is closed_port else mlflow.TIMEOUT_SECONDS + 1.5
    with server() as uri:
        started = time.perf_counter()
        assert a_whole_run(uri) is None
        elapsed = time.perf_counter() - started
    assert elapsed < bound  # the silent one: one timeout, then tracking is off
    (warning,) = warnings_about(caplog, uri)
    assert warning.startswith(f"MLflow at {uri} unreachable (")
    assert warning.endswith("); tracking is off for this run, S3 stays the record")
    assert mlflow.is_off(uri)
    if server is silent_server:
        assert elapsed >= mlflow.TIMEOUT_SECONDS - 0.5  # it did wait for the server, once


def test_a_server_that_goes_away_mid_run_stops_tracking_not_training(mlflow_server, caplog):
    caplog.set_level(logging.WARNING, logger="tlray")
    relay = Relay(mlflow_server)  # the server as this run sees it
    run = mlflow.start_run(relay.uri, new_experiment(relay.uri), "job-midrun", "job-midrun")
    sink = MlflowSink.open(SinkContext(None, 3, tracking=run))
    sink.log_epoch(1, {"epoch": 1, "val_accuracy": 0.5})
    relay.take_down()
    started = time.perf_counter()
    for epoch in (2, 3):
        sink.log_epoch(epoch, {"epoch": epoch, "val_accuracy": 0.5 + epoch / 10})
    sink.close()
    run.end()
    assert time.perf_counter() - started < 1.0
    assert len(warnings_about(caplog, relay.uri)) == 1
    assert history(mlflow_server, run.run_id, "val_accuracy") == [(1, 0.5)]
    assert run_data(mlflow_server, run.run_id)["info"]["status"] == "RUNNING"  # the end never reached it


def test_an_api_error_skips_that_call_only(mlflow_server, caplog):
    caplog.set_level(logging.WARNING, logger="tlray")
    run = mlflow.start_run(mlflow_server, new_experiment(mlflow_server), "job-api", "job-api")
    run.log_params({"train.lr": 0.1})
    run.log_params({"train.lr": 0.2})  # MLflow refuses a changed param
    run.log_metrics(1, {"val_loss": 0.3})
    assert history(mlflow_server, run.run_id, "val_loss") == [(1, 0.3)]
    assert not mlflow.is_off(mlflow_server)
    assert any("logging params failed (HTTP 400 INVALID_PARAMETER_VALUE" in r.getMessage() for r in caplog.records)


def test_flatten_gives_dotted_keys():
    nested = {"train": {"lr": 0.003, "epochs": 2}, "tune": {"freeze_depth": [1, "all"], "lr": None}, "name": "j"}
    assert mlflow.flatten(nested) == {
        "train.lr": 0.003,
        "train.epochs": 2,
        "tune.freeze_depth": '[1, "all"]',
        "tune.lr": "null",
        "name": "j",
    }
