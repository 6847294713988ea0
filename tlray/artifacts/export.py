"""Publishing a trained model: files that plain PyTorch can load, plus what it is and how it did.

Layout of a run (`<output.uri>/<name>/runs/<run_id>/`):
    model/model.pt2        torch.export program: `torch.export.load(p).module()(images)`, no tlray needed
    model/state_dict.pt    weights for `torchvision.models.get_model(arch, num_classes=…)`
    metrics.json           per-epoch history, the last and the selected epoch
    confusion_matrix.json  the selected epoch's validation counts[true][predicted], as its validation counted them
    metadata.json          classes, arch, weights, freeze depth, preprocessing, selected epoch, spec, versions,
                           the run's timings (seconds per part: indexing, weights, cluster, fit, publish)
    MANIFEST.json          every file above with its size and sha256: written last (tlray.artifacts.manifest)
    train/                 the training checkpoints (resume state; not in the manifest, pruned as training goes)
"""

from __future__ import annotations

import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

import tlray
from tlray.artifacts.manifest import FORMAT_VERSION, MANIFEST, is_sealed, utc_timestamp, write_manifest
from tlray.console import Laps
from tlray.data.index import DatasetIndex
from tlray.errors import UserError
from tlray.io import storage
from tlray.metrics import select_epoch, too_few_classes
from tlray.models.trained import load_model_state
from tlray.plan import RunPlan
from tlray.spec import JobSpec

CONFUSION = "confusion_matrix.json"
EXPORT_BATCH = 2  # example batch for torch.export; the batch dimension is exported as dynamic


@dataclass(frozen=True)
class PublishedRun:
    uri: str
    metrics: dict  # the selected epoch's metrics: those of the exported model


def run_uri(spec: JobSpec, index: DatasetIndex, command: str = "train") -> str:
    """`<output.uri>/<name>/runs/<run_id>`: the same spec, data and command always map to the same place."""
    return storage.join(runs_uri(spec), spec.run_id_for(command, index.fingerprint))


def runs_uri(spec: JobSpec) -> str:
    return storage.join(spec.job_uri, "runs")


def job_of(run: str) -> str:
    """The job folder (latest.json, history.jsonl) of a run folder `<job>/runs/<run_id>`."""
    return run.rstrip("/").rsplit("/runs/", 1)[0]


def publish(
    plan: RunPlan,
    model: torch.nn.Module,
    state: dict,
    hyperparameters: dict | None = None,
    history: list[dict] | None = None,
    seal: bool = True,
    timings: Laps | None = None,
) -> PublishedRun:
    """Export the weights in `state` (the selected epoch's training checkpoint) and describe the run.

    `model`: the driver's one model of the plan's arch and classes, which takes the weights.
    `history`: every epoch's metrics (the latest checkpoint's); default: the history in `state`.
    With `seal`, MANIFEST.json is written last; otherwise the caller adds files and calls `write_manifest`.
    `timings`: the run's parts so far, which metadata.json records with this one's (`publish`: export and upload).
    A run that is already sealed is left as it is: re-running a finished job never rewrites a model that
    `latest.json` may point at.
    """
    spec, summary, destination, endpoint = plan.spec, plan.freeze, plan.run_uri, plan.endpoint_url
    if is_sealed(destination, endpoint):
        return published_run(destination, endpoint)
    storage.delete_file(storage.join(destination, MANIFEST), endpoint)  # a stale one would vouch for new files
    load_model_state(model, state, plan.weights_identity)  # the trained tensors over the starting weights
    model.eval()
    preprocessing = plan.preprocessing
    history = history or state["history"]
    selection = select_epoch(history, spec.train.select_metric)
    selected, final = history[selection.epoch - 1], history[-1]
    if state["epoch"] + 1 != selection.epoch:
        raise AssertionError(f"publish: state is epoch {state['epoch'] + 1}, the selection is epoch {selection.epoch}")

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp, "model")
        model_dir.mkdir()
        export_program(model, preprocessing.crop_size, model_dir / "model.pt2")
        torch.save(model.state_dict(), model_dir / "state_dict.pt")
        storage.upload_dir(model_dir, storage.join(destination, "model"), endpoint)

    bad_images = {"count": final.get("bad_images", 0), "examples": state.get("bad_image_examples", [])}
    metrics = {"history": history, "final": final, "selected": selected, "bad_images": bad_images}
    storage.write_json(storage.join(destination, "metrics.json"), metrics, endpoint)
    if state.get("val_confusion") is not None:  # checkpoints of older tlrays have none
        confusion = {"classes": list(plan.classes), "matrix": state["val_confusion"], "epoch": selection.epoch}
        storage.write_json(storage.join(destination, CONFUSION), confusion, endpoint)
    metadata = {
        "format_version": FORMAT_VERSION,
        "run_id": plan.run_id,
        "created_at": utc_timestamp(),
        "classes": list(plan.classes),
        "arch": spec.model.arch,
        "weights": spec.model.weights,
        "weights_identity": plan.weights_identity,
        "mode": spec.model.mode,
        "freeze_depth": summary.depth,
        "frozen_blocks": summary.frozen_blocks,
        "trainable_parameters": summary.trainable_params,
        "frozen_parameters": summary.frozen_params,
        "preprocessing": preprocessing.to_dict(),
        "precision": state.get("precision"),  # train.amp as the workers resolved it on their device
        "metrics": selected,
        "selection": selection.to_dict(len(history)),
        "epochs_run": len(history),
        "dataset": {
            "uri": plan.data.root,
            "fingerprint": plan.data.fingerprint,
            "train_images": plan.data.counts["train"],
            "val_images": plan.data.counts["val"],
            "bad_images": bad_images,
        },
        "files": {"program": "model/model.pt2", "state_dict": "model/state_dict.pt"},
        "hyperparameters": hyperparameters or {"lr": spec.train.lr, "freeze_depth": summary.depth},
        "spec": spec.model_dump(mode="json"),
        "versions": versions(),
        "timings": timings.lap("publish") if timings else {},
    }
    storage.write_json(storage.join(destination, "metadata.json"), metadata, endpoint)
    if seal:
        write_manifest(destination, endpoint)
    return PublishedRun(destination, selected)


def published_run(run: str, endpoint_url: str | None) -> PublishedRun:
    metadata = storage.read_json(storage.join(run, "metadata.json"), endpoint_url)
    return PublishedRun(run, metadata["metrics"])


# ---------------------------------------------------------------------------------------
# Checks before training, and the export
# ---------------------------------------------------------------------------------------
def check_output(spec: JobSpec) -> None:
    """An S3 output must exist and be listable now, not after hours of training. Writes nothing."""
    if storage.is_s3(spec.output.uri):
        from tlray.io import s3

        s3.check_writable(
            spec.output.uri, spec.dataset.endpoint_url, key="output.uri", max_attempts=storage.s3_max_attempts()
        )


def check_selectable(spec: JobSpec, index: DatasetIndex) -> None:
    """Top-5 is only reported with 5 or more classes: a metric that never comes cannot pick an epoch."""
    for key, metric in (("train.select_metric", spec.train.select_metric), ("publish.metric", spec.publish.metric)):
        if problem := too_few_classes(metric, len(index.classes)):
            raise UserError(f"{key}: {problem}")


def export_program(model: torch.nn.Module, crop_size: int, path: Path) -> None:
    example = torch.randn(EXPORT_BATCH, 3, crop_size, crop_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))


def versions() -> dict[str, str]:
    import ray
    import torchvision

    return {
        "tlray": tlray.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "ray": ray.__version__,
        "python": platform.python_version(),
    }
