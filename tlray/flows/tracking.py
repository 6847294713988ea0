"""The driver's side of MLflow tracking (`tracking.mlflow` in the spec), for `tlray train` and `tlray tune`.

One MLflow run per tlray run, named by the tlray run id and found again by its tag `tlray.run_id`, so a resumed
run goes on in the same MLflow run. Its params are the resolved spec as dotted keys, the weights' identity and
the data's fingerprint; each epoch's metrics come from rank 0's sink (tlray.sinks.mlflow), at step = epoch. A
search is a parent run; each trial is a child run of it (tlray.training.search.tracked_trial).

After publishing: the run's timings (seconds per part) become metrics; its metadata.json, MANIFEST.json and
report PNGs artifacts (the weights too with `log_weights`); the published model a new version of the registered
model named after the job, and the gate's champion holds the alias `champion`. The output (S3 or a folder) stays
the record: every call here is bounded and never raises (tlray.io.mlflow), and a server that is unreachable
turns all of this off after one warning.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping

from tlray.artifacts.champion import Decision
from tlray.artifacts.export import CONFUSION
from tlray.artifacts.manifest import MANIFEST
from tlray.artifacts.pages import REPORT
from tlray.io import mlflow, storage
from tlray.plan import RunPlan

CHAMPION_ALIAS = "champion"
MODEL_URI_TAG = "tlray.model_uri"
PUBLISHED_FILES = ("metadata.json", CONFUSION, MANIFEST)
WEIGHT_FILES = ("model/model.pt2", "model/state_dict.pt")


def start(plan: RunPlan, command: str) -> RunPlan:
    """The plan with its MLflow run (a search's: the parent of its trials' runs); as it was when untracked."""
    settings = plan.spec.tracking.mlflow
    if settings is None or not settings.server:
        return plan
    experiment = mlflow.experiment_id(settings.server, settings.experiment or plan.spec.name)
    if experiment is None:
        return plan
    tags = {"tlray.run_uri": plan.run_uri, "tlray.command": command, "tlray.job": plan.spec.name}
    run = mlflow.start_run(settings.server, experiment, plan.run_id, plan.run_id, tags)
    if run is None:
        return plan
    run.log_params(plan.tracking_params())
    print(f"[tlray] MLflow: run {run.run_id} in experiment {experiment} at {run.uri}", flush=True)
    return dataclasses.replace(plan, tracking=run)


@contextlib.contextmanager
def ended_if_interrupted(plan: RunPlan) -> Iterator[None]:
    """Around the training: a run that stops before publishing ends KILLED when stopped (Ctrl-C, SIGTERM),
    FAILED otherwise. Running it again marks the same MLflow run running again."""
    try:
        yield
    except BaseException as error:
        if plan.tracking is not None:
            plan.tracking.end("KILLED" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "FAILED")
        raise


def record_search(plan: RunPlan, rows: list[dict], best: dict) -> None:
    """The search's parent run: the best trial as tags and metric, the results table as artifacts; every trial's
    run ends (Tune ends a stopped trial's workers without a word to its sink)."""
    run = plan.tracking
    if run is None:
        return
    metric = plan.spec.tune.metric
    run.set_tags({f"tlray.best_{key}": best[key] for key in ("trial", "lr", "freeze_depth")})
    if best["metric"] is not None:
        run.log_metrics(best["epochs"], {f"best_{metric}": best["metric"]})
    for name in ("tune_results.json", "tune_results.csv"):
        log_stored_file(run, plan, name)
    for child in mlflow.find_runs(run.uri, run.experiment_id, {mlflow.PARENT_TAG: run.run_id}):
        if child["info"]["status"] == "RUNNING":
            dataclasses.replace(run, run_id=child["info"]["run_id"]).end()


def record_published(plan: RunPlan, decision: Decision, timings: Mapping[str, float]) -> None:
    """After the gate: the run's timings as metrics `seconds_<part>`, the published files as artifacts, the model
    as a registered version (alias `champion` when the gate promoted it), and the MLflow run ended."""
    run = plan.tracking
    if run is None:
        return
    run.log_metrics(0, {f"seconds_{part}": seconds for part, seconds in timings.items()})
    settings = plan.spec.tracking.mlflow
    model_uri = storage.join(plan.run_uri, "model")
    run.set_tags({MODEL_URI_TAG: model_uri})
    report = storage.list_tree(storage.join(plan.run_uri, REPORT), plan.endpoint_url)
    pages = [f"{REPORT}/{name}" for name in sorted(report)]  # the report page whole: MLflow's UI shows it
    for name in (*PUBLISHED_FILES, *pages, *(WEIGHT_FILES if settings.log_weights else ())):
        log_stored_file(run, plan, name)
    version = mlflow.register_version(run, plan.spec.name, version_source(run, model_uri), {MODEL_URI_TAG: model_uri})
    if version is not None and decision.action == "promoted":
        mlflow.set_alias(run.uri, plan.spec.name, CHAMPION_ALIAS, version)  # kept: the alias stays where it was
    run.end()


def version_source(run: mlflow.TrackedRun, model_uri: str) -> str:
    """The registry's source of a published model: its URI in the output store. MLflow refuses a local path
    outside the run's artifacts, so a model published to a folder is registered by the run's artifact path
    `<artifact root>/model` (where `log_weights` puts its files), its folder in the tag `tlray.model_uri`."""
    return model_uri if "://" in model_uri else f"{run.artifact_uri}/model"


def log_stored_file(run: mlflow.TrackedRun, plan: RunPlan, name: str) -> None:
    location = storage.join(plan.run_uri, name)
    try:
        data = storage.read_bytes(location, plan.endpoint_url)
    except (FileNotFoundError, OSError):
        return  # e.g. an interrupted search's report without a confusion matrix
    run.log_artifact(name, data)
