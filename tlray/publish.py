"""Publishing a trained model: files that plain PyTorch can load, plus what it is and how it did.

Layout of a run (`<output.uri>/<name>/runs/<run_id>/`):
    model/model.pt2        torch.export program: `torch.export.load(p).module()(images)`, no tlray needed
    model/state_dict.pt    weights for `torchvision.models.get_model(arch, num_classes=…)`
    metrics.json           per-epoch history
    metadata.json          classes, arch, weights, freeze depth, preprocessing, metrics, spec, versions
    train/                 Ray Train's checkpoints (resume state)
metadata.json is written last: its presence means the run is complete.
"""

from __future__ import annotations

import platform
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

import tlray
from tlray import models, storage
from tlray.data import DatasetIndex
from tlray.spec import JobSpec

EXPORT_BATCH = 2  # example batch for torch.export; the batch dimension is exported as dynamic


@dataclass(frozen=True)
class PublishedRun:
    uri: str
    metrics: dict


def run_uri(spec: JobSpec, index: DatasetIndex, command: str = "train") -> str:
    """`<output.uri>/<name>/runs/<run_id>`: the same spec, data and command always map to the same place."""
    return storage.join(runs_uri(spec), spec.run_id_for(command, index.fingerprint))


def runs_uri(spec: JobSpec) -> str:
    return storage.join(storage.absolute_uri(spec.output.uri), spec.name, "runs")


def publish(
    spec: JobSpec,
    index: DatasetIndex,
    summary: models.FreezeSummary,
    state: dict,
    destination: str,
    hyperparameters: dict | None = None,
) -> PublishedRun:
    """Export the trained weights in `state` (a training checkpoint) and describe the run."""
    endpoint = spec.dataset.endpoint_url
    model = models.build_model(spec.model.arch, None, len(index.classes))
    model.load_state_dict(state["model"])
    model.eval()
    preprocessing = models.preprocessing(spec.model.arch, spec.dataset.image_size)
    history = state["history"]
    final = history[-1]

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp, "model")
        model_dir.mkdir()
        export_program(model, preprocessing.crop_size, model_dir / "model.pt2")
        torch.save(model.state_dict(), model_dir / "state_dict.pt")
        storage.upload_dir(model_dir, storage.join(destination, "model"), endpoint)

    bad_images = {"count": final.get("bad_images", 0), "examples": state.get("bad_image_examples", [])}
    storage.write_json(
        storage.join(destination, "metrics.json"), {"history": history, "final": final, "bad_images": bad_images}, endpoint
    )
    metadata = {
        "run_id": destination.rstrip("/").rsplit("/", 1)[-1],
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "classes": index.classes,
        "arch": spec.model.arch,
        "weights": spec.model.weights,
        "mode": spec.model.mode,
        "freeze_depth": summary.depth,
        "frozen_blocks": summary.frozen_blocks,
        "trainable_parameters": summary.trainable_params,
        "frozen_parameters": summary.frozen_params,
        "preprocessing": preprocessing.to_dict(),
        "metrics": final,
        "epochs_run": len(history),
        "dataset": {
            "uri": index.root,
            "fingerprint": index.fingerprint,
            "train_images": len(index.train),
            "val_images": len(index.val),
            "bad_images": bad_images,
        },
        "files": {"program": "model/model.pt2", "state_dict": "model/state_dict.pt"},
        "hyperparameters": hyperparameters or {"lr": spec.train.lr, "freeze_depth": summary.depth},
        "spec": spec.model_dump(mode="json"),
        "versions": versions(),
    }
    storage.write_json(storage.join(destination, "metadata.json"), metadata, endpoint)
    return PublishedRun(destination, final)


def freeze_summary(spec: JobSpec, num_classes: int) -> models.FreezeSummary:
    """What the spec freezes, counted on a freshly built model (for metadata.json)."""
    model = models.build_model(spec.model.arch, None, num_classes)
    return models.freeze(model, spec.model.arch, spec.freeze_depth, spec.model.batchnorm)


def check_output(spec: JobSpec) -> None:
    """An S3 output must exist and be listable now, not after hours of training. Writes nothing."""
    if storage.is_s3(spec.output.uri):
        from tlray import s3

        s3.check_writable(spec.output.uri, spec.dataset.endpoint_url, key="output.uri", max_attempts=storage.s3_max_attempts())


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
