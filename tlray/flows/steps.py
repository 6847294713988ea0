"""The steps `tlray train` and `tlray tune` share, numbered as both flows number them.

Everything that can fail on bad input (the data, the output location, the weights) is checked in steps
2-4, on the driver, before the run joins a cluster or writes anything: such a problem is exit 2 in
seconds, not after the workers start.
"""

from __future__ import annotations

import torch

from tlray import console
from tlray.artifacts import champion, warmstart
from tlray.artifacts.export import check_output, check_selectable
from tlray.artifacts.manifest import manifest_digest
from tlray.artifacts.published import load_published
from tlray.data import pipeline
from tlray.data.index import DatasetIndex, build_index
from tlray.data.pipeline import DataSource
from tlray.flows.evaluate import gate_score
from tlray.io import storage
from tlray.io.weights import fetch_weights
from tlray.metrics import metric_mode
from tlray.models import build
from tlray.plan import RunPlan, plan_run
from tlray.plan import preprocessing as preprocessing_for
from tlray.spec import JobSpec
from tlray.training import nodes


def index_data(spec: JobSpec) -> DatasetIndex:
    """2. List and split the data; every data problem is exit 2 here."""
    index = build_index(spec.dataset)
    print(f"[tlray] dataset: {index.summary()}")
    return index


def champion_has_this_data(spec: JobSpec, index: DatasetIndex) -> bool:
    """2. `--if-data-changed`: True (and says so) when the champion was trained on exactly this data."""
    unchanged = champion.unchanged_data_message(spec.job_uri, index.fingerprint, spec.dataset.endpoint_url)
    if unchanged:
        print(unchanged)
    return unchanged is not None


def check_destination(spec: JobSpec, index: DatasetIndex) -> None:
    """3. The output location is reachable, before anything is written, and the metrics can pick an epoch."""
    check_output(spec)
    check_selectable(spec, index)


def warm_start(spec: JobSpec, index: DatasetIndex) -> tuple[JobSpec, torch.nn.Module]:
    """4. The spec with its warm-start weights (`latest`, a run) resolved to a checkpoint, and the run's one
    model on the driver, built from those weights: they load."""
    spec = warmstart.resolve(spec, index)
    weights = fetch_weights(spec.model.builder_weights, spec.dataset.endpoint_url)
    return spec, build.build_model(spec.model.arch, weights, len(index.classes))


def join_cluster(spec: JobSpec, index: DatasetIndex, run: str) -> None:
    """5. Join the cluster (RAY_ADDRESS, or inside a job) or start one; Ray's output goes to the run's log.
    Every node must see a local dataset or output path."""
    console.start_ray(console.log_path_for(run))
    nodes.check_every_node_sees_local_paths(spec, index)


def run_plan(spec: JobSpec, index: DatasetIndex, run: str, model: torch.nn.Module) -> RunPlan:
    """6. The run plan: what all the workers (and every trial) get, the data through Ray's object store."""
    return plan_run(spec, data_source(spec, index), run, model)


def gate_champion(spec: JobSpec, run: str, source: DataSource) -> champion.Decision:
    """9. The champion gate for the run just sealed: latest.json moves only for a better model, each model
    scored on this run's own validation split (`source`)."""
    endpoint = spec.dataset.endpoint_url
    metadata = storage.read_json(storage.join(run, "metadata.json"), endpoint)
    candidate = champion.Candidate(
        run, metadata["run_id"], metadata["dataset"]["fingerprint"], manifest_digest(run, endpoint)
    )
    scores: dict[str, float] = {}
    metric = spec.publish.metric

    def score(uri: str) -> float:
        # the training loop measured the candidate's accuracy on this very split (its loss has label smoothing)
        measured = metadata["metrics"].get(metric) if metric != "val_loss" else None
        if uri == run and measured is not None:
            return measured
        if uri not in scores:
            scores[uri] = gate_score(load_published(uri, endpoint), source, metric)
        return scores[uri]

    return champion.gate(
        spec.job_uri,
        candidate,
        spec.publish.policy,
        metric,
        metric_mode(metric),
        spec.publish.min_improvement,
        score,
        endpoint,
    )


def data_source(spec: JobSpec, index: DatasetIndex) -> DataSource:
    """The index's keys into Ray's object store: what workers and trials read the data through."""
    model = spec.model  # the weights' own preset: resnet50's V1 and V2 resize differently
    preprocessing = preprocessing_for(model.arch, spec.dataset.image_size, model.builder_weights)
    return pipeline.data_source(index, spec.dataset, preprocessing, seed=spec.train.seed)
