"""The driver's MLflow glue (tlray.flows.tracking, tlray.training.search.tracked_trial) against a real server:
a run's params and tags, its published files as artifacts, registry versions, the `champion` alias following
the gate, a resumed run, a search's parent and child runs. Without Ray: plans of stand-in published runs."""

from __future__ import annotations

import dataclasses
import logging
import uuid
from pathlib import Path
from types import SimpleNamespace

from tlray.artifacts import champion
from tlray.artifacts.manifest import manifest_digest, write_manifest
from tlray.flows import tracking
from tlray.io import mlflow, storage
from tlray.plan import RunPlan, Weights
from tlray.sinks import SinkContext
from tlray.sinks.mlflow import MlflowSink
from tlray.spec import JobSpec
from tlray.training.search import tracked_trial, trial_spec

from conftest import spec_dict
from mlflow_fixtures import closed_port


def job_spec(tmp_path: Path, uri: str, settings: dict | None = None, **sections) -> JobSpec:
    raw = spec_dict(
        str(tmp_path / "images"),
        str(tmp_path / "out"),
        name=f"job-{uuid.uuid4().hex[:6]}",  # its experiment and registered model are its own
        tracking={"mlflow": {"uri": uri, **(settings or {})}},
        **sections,
    )
    return JobSpec.model_validate(raw)


def plan_of(spec: JobSpec, run_id: str, png: bool = False) -> RunPlan:
    """A plan whose run folder holds a sealed stand-in of a published run: tiny files where the model's are."""
    run = storage.join(spec.job_uri, "runs", run_id)
    storage.write_bytes(storage.join(run, "model", "model.pt2"), b"program")
    storage.write_json(storage.join(run, "metadata.json"), {"run_id": run_id, "dataset": {"fingerprint": "f" * 64}})
    if png:
        storage.write_bytes(storage.join(run, "report", "learning_curves.png"), b"\x89PNG curves")
    write_manifest(run)
    data = SimpleNamespace(fingerprint="f" * 64)
    weights = Weights("/weights/resnet18.pt", "sha256 abc")
    return RunPlan(spec, run, weights, ("a", "b"), None, None, data, storage.join(run, "train"))


def gate(plan: RunPlan, score: float, scores: dict) -> champion.Decision:
    scores[plan.run_uri] = score
    candidate = champion.Candidate(plan.run_uri, plan.run_id, "f" * 64, manifest_digest(plan.run_uri))
    return champion.gate(plan.spec.job_uri, candidate, "gate", "val_accuracy", "max", 0.0, scores.__getitem__)


def run_of(uri: str, run_id: str) -> dict:
    return mlflow.Client(uri).call("GET", "runs/get", query={"run_id": run_id})["run"]


def tags_of(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def artifacts_of(uri: str, run_id: str, path: str = "") -> list[str]:
    listed = mlflow.Client(uri).call("GET", "artifacts/list", query={"run_id": run_id, "path": path})
    return sorted(f["path"] for f in listed.get("files", []))


def test_a_train_run_is_logged_registered_and_the_champion_alias_follows_the_gate(tmp_path, mlflow_server):
    spec = job_spec(tmp_path, mlflow_server, train={"epochs": 2, "batch_size": 8, "lr": 0.003})
    scores: dict[str, float] = {}
    first = tracking.start(plan_of(spec, f"{spec.name}-aaaa", png=True), "train")
    run = first.tracking
    assert run is not None and run.uri == mlflow_server

    # params: the resolved spec as dotted keys, the weights' identity, the data's fingerprint; never `tracking`
    logged = run_of(mlflow_server, run.run_id)
    params = {p["key"]: p["value"] for p in logged["data"]["params"]}
    assert (params["train.lr"], params["train.epochs"], params["model.arch"]) == ("0.003", "2", "resnet18")
    assert (params["weights_identity"], params["data_fingerprint"]) == ("sha256 abc", "f" * 64)
    assert not [key for key in params if key.startswith("tracking.")]
    assert tags_of(logged)["tlray.run_uri"] == first.run_uri
    assert logged["info"]["run_name"] == first.run_id
    experiment = mlflow.Client(mlflow_server).call(
        "GET", "experiments/get-by-name", query={"experiment_name": spec.name}
    )["experiment"]
    assert experiment["experiment_id"] == run.experiment_id  # the experiment is named after the job

    MlflowSink.open(SinkContext(None, 2, tracking=run)).log_epoch(1, {"epoch": 1, "val_accuracy": 0.6})
    promoted = gate(first, 0.70, scores)
    tracking.record_published(first, promoted, {"index": 0.25, "fit": 12.5})
    logged = run_of(mlflow_server, run.run_id)
    assert logged["info"]["status"] == "FINISHED"
    timings = {m["key"]: m["value"] for m in logged["data"]["metrics"] if m["key"].startswith("seconds_")}
    assert timings == {"seconds_index": 0.25, "seconds_fit": 12.5}  # the run's timings are metrics
    assert tags_of(logged)[tracking.MODEL_URI_TAG] == f"{first.run_uri}/model"
    assert artifacts_of(mlflow_server, run.run_id) == ["MANIFEST.json", "metadata.json", "report"]
    assert artifacts_of(mlflow_server, run.run_id, "report") == ["report/learning_curves.png"]
    assert mlflow.alias_version(mlflow_server, spec.name, "champion") == "1"

    # a worse run: a new version, the alias stays; a better one: the alias moves to it
    worse = tracking.start(plan_of(spec, f"{spec.name}-bbbb"), "train")
    tracking.record_published(worse, gate(worse, 0.65, scores), {})
    assert mlflow.alias_version(mlflow_server, spec.name, "champion") == "1"
    better = tracking.start(plan_of(spec, f"{spec.name}-cccc"), "train")
    tracking.record_published(better, gate(better, 0.80, scores), {})
    assert mlflow.alias_version(mlflow_server, spec.name, "champion") == "3"
    versions = mlflow.Client(mlflow_server).call(
        "GET", "model-versions/search", query={"filter": f"name = '{spec.name}'"}
    )["model_versions"]
    by_version = {v["version"]: v for v in versions}
    assert sorted(by_version) == ["1", "2", "3"]
    assert by_version["2"]["run_id"] == worse.tracking.run_id
    assert by_version["3"]["source"] == f"{better.tracking.artifact_uri}/model"  # a local output's model
    assert tags_of({"data": by_version["3"]})[tracking.MODEL_URI_TAG] == f"{better.run_uri}/model"

    # the same tlray run again (a resume, or a finished run published again): the same MLflow run and version
    again = tracking.start(plan_of(spec, f"{spec.name}-aaaa"), "train")
    assert again.tracking == run
    assert run_of(mlflow_server, run.run_id)["info"]["status"] == "RUNNING"
    MlflowSink.open(SinkContext(None, 2, tracking=again.tracking)).log_epoch(2, {"epoch": 2, "val_accuracy": 0.7})
    tracking.record_published(again, gate(again, 0.70, scores), {})  # kept: it is not the champion any more
    answer = mlflow.Client(mlflow_server).call(
        "GET", "metrics/get-history", query={"run_id": run.run_id, "metric_key": "val_accuracy"}
    )
    assert [(m["step"], m["value"]) for m in answer["metrics"]] == [(1, 0.6), (2, 0.7)]
    assert mlflow.alias_version(mlflow_server, spec.name, "champion") == "3"
    assert len(mlflow.find_runs(mlflow_server, run.experiment_id, {})) == 3


def test_log_weights_uploads_the_model_and_an_s3_model_is_its_own_source(tmp_path, mlflow_server):
    spec = job_spec(tmp_path, mlflow_server, {"log_weights": True, "experiment": "shared"})
    plan = tracking.start(plan_of(spec, f"{spec.name}-dddd"), "train")
    tracking.record_published(plan, gate(plan, 0.5, {}), {})
    assert artifacts_of(mlflow_server, plan.tracking.run_id, "model") == ["model/model.pt2"]
    shared = mlflow.Client(mlflow_server).call("GET", "experiments/get-by-name", query={"experiment_name": "shared"})
    assert shared["experiment"]["experiment_id"] == plan.tracking.experiment_id
    assert tracking.version_source(plan.tracking, "s3://bucket/job/runs/x/model") == "s3://bucket/job/runs/x/model"


def test_a_search_is_a_parent_run_and_each_trial_a_child_with_its_own_params(tmp_path, mlflow_server):
    spec = job_spec(tmp_path, mlflow_server, tune={"num_samples": 2, "lr": {"min": 0.001, "max": 0.1}})
    search = tracking.start(plan_of(spec, f"{spec.name}-search-eeee", png=True), "tune")
    parent = search.tracking
    trials = {}
    for trial_id, lr in (("t1", 0.002), ("t2", 0.05)):
        choice = {"lr": lr, "freeze_depth": spec.model.freeze_depth}  # what the search gives each trial
        trial = tracked_trial(search, search.for_trial(trial_spec(spec, choice), trial_id, 2), trial_id)
        trials[trial_id] = trial
        MlflowSink.open(SinkContext(trial_id, 2, tracking=trial.tracking)).log_epoch(1, {"epoch": 1, "val_loss": lr})
    # a paused trial that resumes finds its own child again
    first_choice = {"lr": 0.002, "freeze_depth": spec.model.freeze_depth}
    resumed = tracked_trial(search, search.for_trial(trial_spec(spec, first_choice), "t1", 2), "t1")
    assert resumed.tracking == trials["t1"].tracking

    children = mlflow.find_runs(mlflow_server, parent.experiment_id, {mlflow.PARENT_TAG: parent.run_id})
    assert sorted(r["info"]["run_id"] for r in children) == sorted(t.tracking.run_id for t in trials.values())
    for trial_id, trial in trials.items():
        child = run_of(mlflow_server, trial.tracking.run_id)
        params = {p["key"]: p["value"] for p in child["data"]["params"]}
        assert float(params["train.lr"]) == trial.spec.train.lr
        assert tags_of(child)["tlray.trial"] == trial_id
        assert tags_of(child)[mlflow.RUN_ID_TAG] == f"{search.run_id}/trials/{trial_id}"
    parent_params = {p["key"]: p["value"] for p in run_of(mlflow_server, parent.run_id)["data"]["params"]}
    assert parent_params["tune.lr.max"] == "0.1"

    storage.write_json(storage.join(search.run_uri, "tune_results.json"), {"trials": []})
    best = {"trial": "t1", "lr": 0.002, "freeze_depth": 0, "metric": 0.5, "epochs": 2}
    tracking.record_search(search, [best], best)
    for trial in trials.values():
        assert run_of(mlflow_server, trial.tracking.run_id)["info"]["status"] == "FINISHED"
    tags = tags_of(run_of(mlflow_server, parent.run_id))
    assert (tags["tlray.best_trial"], tags["tlray.best_lr"]) == ("t1", "0.002")
    assert artifacts_of(mlflow_server, parent.run_id) == ["tune_results.json"]
    tracking.record_published(search, gate(search, 0.5, {}), {})
    published = ["MANIFEST.json", "metadata.json", "report", "tune_results.json"]
    assert artifacts_of(mlflow_server, parent.run_id) == published
    assert mlflow.alias_version(mlflow_server, spec.name, "champion") == "1"


def test_untracked_and_unreachable_runs_are_left_untracked(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="tlray")
    plain = plan_of(JobSpec.model_validate(spec_dict(str(tmp_path / "i"), str(tmp_path / "out"))), "plain-1")
    assert tracking.start(plain, "train") is plain
    with closed_port() as uri:
        plan = plan_of(job_spec(tmp_path, uri), "down-1")
        started = tracking.start(plan, "train")
        assert started.tracking is None
        tracking.record_published(started, gate(started, 0.5, {}), {})  # no MLflow run: nothing to do
        trial = tracked_trial(dataclasses.replace(plan, tracking=mlflow.TrackedRun(uri, "1", "r", "x")), plan, "t1")
    assert trial.tracking is None  # never the search's run: its epochs would land in the parent
    assert len([r for r in caplog.records if "unreachable" in r.getMessage()]) == 1


def test_a_run_stopped_before_publishing_ends_killed_and_one_that_fails_ends_failed(tmp_path, mlflow_server):
    spec = job_spec(tmp_path, mlflow_server)
    statuses = []
    for run_id, error in ((f"{spec.name}-stop", KeyboardInterrupt()), (f"{spec.name}-fail", ValueError("nan"))):
        plan = tracking.start(plan_of(spec, run_id), "train")
        try:
            with tracking.ended_if_interrupted(plan):
                raise error
        except (KeyboardInterrupt, ValueError) as raised:
            assert raised is error  # the error goes on to the command's exit code
        statuses.append(run_of(mlflow_server, plan.tracking.run_id)["info"]["status"])
    assert statuses == ["KILLED", "FAILED"]
    plan = tracking.start(plan_of(spec, f"{spec.name}-stop"), "train")  # run again: the same run, running again
    assert run_of(mlflow_server, plan.tracking.run_id)["info"]["status"] == "RUNNING"
