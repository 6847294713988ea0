"""Publishing a trained model: files that plain PyTorch can load, plus what it is and how it did.

Layout of a run (`<output.uri>/<name>/runs/<run_id>/`):
    model/model.pt2        torch.export program: `torch.export.load(p).module()(images)`, no tlray needed
    model/state_dict.pt    weights for `torchvision.models.get_model(arch, num_classes=…)`
    metrics.json           per-epoch history, the last and the selected epoch
    metadata.json          classes, arch, weights, freeze depth, preprocessing, selected epoch, spec, versions
    MANIFEST.json          every file above with its size and sha256: written last
    train/                 Ray Train's checkpoints (resume state; not in the manifest, Ray prunes it)

A run folder without a MANIFEST.json is incomplete (killed mid-publish, or still training): nothing
loads it and the champion pointer never names it. Loaders check each file against the manifest.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

import tlray
from tlray.data.index import DatasetIndex
from tlray.errors import UserError
from tlray.io import storage
from tlray.plan import RunPlan
from tlray.spec import JobSpec

EXPORT_BATCH = 2  # example batch for torch.export; the batch dimension is exported as dynamic
MANIFEST = "MANIFEST.json"
FORMAT_VERSION = 1  # of metadata.json and MANIFEST.json; loaders refuse versions they do not know
# Not part of the published artifact: Ray's resume state (pruned and rewritten by Ray) and the search
# report (redrawn at any time by `tlray report`).
UNSEALED_PREFIXES = ("train/", "search/", "trials/", "report/")
LOWER_IS_BETTER = ("train_loss", "val_loss")


class ManifestError(UserError):
    """A run that is incomplete, altered, or from a tlray that wrote another format: exit 2."""


@dataclass(frozen=True)
class PublishedRun:
    uri: str
    metrics: dict  # the selected epoch's metrics: those of the exported model


@dataclass(frozen=True)
class Selection:
    """Which epoch a run publishes, and why."""

    epoch: int  # 1-based, as in metrics.json
    metric: str  # a reported metric, or "last"
    mode: str  # "max" | "min" | "last"
    value: float | None

    def reason(self, epochs_run: int) -> str:
        if self.metric == "last":
            return f"last epoch ({self.epoch} of {epochs_run}), train.select_metric is `last`"
        return f"best {self.metric} ({self.mode}) {self.value:.4g} at epoch {self.epoch} of {epochs_run}"

    def to_dict(self, epochs_run: int) -> dict:
        return {
            "epoch": self.epoch,
            "metric": self.metric,
            "mode": self.mode,
            "value": self.value,
            "reason": self.reason(epochs_run),
        }


def metric_mode(metric: str) -> str:
    return "min" if metric in LOWER_IS_BETTER else "max"


def select_epoch(history: list[dict], metric: str) -> Selection:
    """The best epoch of `history` by `metric`; among equals the latest, as Ray's checkpoint manager keeps.

    NaN (or a missing value) ranks below every number, as in Ray, so it is chosen only if every epoch has it.
    """
    if not history:
        raise ValueError("select_epoch: no epochs in the history")
    if metric == "last":
        return Selection(history[-1]["epoch"], "last", "last", None)
    sign = -1.0 if metric_mode(metric) == "min" else 1.0

    def rank(entry: dict) -> tuple:
        value = entry.get(metric)
        usable = value is not None and not math.isnan(value)
        return (usable, sign * value if usable else 0.0, entry["epoch"])

    best = max(history, key=rank)
    return Selection(best["epoch"], metric, metric_mode(metric), best.get(metric))


def run_uri(spec: JobSpec, index: DatasetIndex, command: str = "train") -> str:
    """`<output.uri>/<name>/runs/<run_id>`: the same spec, data and command always map to the same place."""
    return storage.join(runs_uri(spec), spec.run_id_for(command, index.fingerprint))


def runs_uri(spec: JobSpec) -> str:
    return storage.join(spec.job_uri, "runs")


def publish(
    plan: RunPlan,
    model: torch.nn.Module,
    state: dict,
    hyperparameters: dict | None = None,
    history: list[dict] | None = None,
    seal: bool = True,
) -> PublishedRun:
    """Export the weights in `state` (the selected epoch's training checkpoint) and describe the run.

    `model`: the driver's one model of the plan's arch and classes, which takes the weights.
    `history`: every epoch's metrics (the latest checkpoint's); default: the history in `state`.
    With `seal`, MANIFEST.json is written last; otherwise the caller adds files and calls `write_manifest`.
    A run that is already sealed is left as it is: re-running a finished job never rewrites a model that
    `latest.json` may point at.
    """
    spec, summary, destination, endpoint = plan.spec, plan.freeze, plan.run_uri, plan.endpoint_url
    if is_sealed(destination, endpoint):
        return published_run(destination, endpoint)
    storage.delete_file(storage.join(destination, MANIFEST), endpoint)  # a stale one would vouch for new files
    model.load_state_dict(state["model"])
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
    metadata = {
        "format_version": FORMAT_VERSION,
        "run_id": plan.run_id,
        "created_at": now(),
        "classes": list(plan.classes),
        "arch": spec.model.arch,
        "weights": spec.model.weights,
        "weights_identity": plan.weights.identity if plan.weights else None,
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
    }
    storage.write_json(storage.join(destination, "metadata.json"), metadata, endpoint)
    if seal:
        write_manifest(destination, endpoint)
    return PublishedRun(destination, selected)


def published_run(run: str, endpoint_url: str | None) -> PublishedRun:
    metadata = storage.read_json(storage.join(run, "metadata.json"), endpoint_url)
    return PublishedRun(run, metadata["metrics"])


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------
# The manifest: what a complete run holds, byte for byte
# ---------------------------------------------------------------------------------------
def write_manifest(run: str, endpoint_url: str | None = None) -> dict:
    """List every published file of `run` with its size and sha256 (of the stored bytes, so an upload
    that went wrong shows), as MANIFEST.json, written last."""
    files = {
        path: {"size": size, "sha256": storage.sha256_of(storage.join(run, path), endpoint_url)}
        for path, size in sorted(storage.list_tree(run, endpoint_url).items())
        if path != MANIFEST and not path.startswith(UNSEALED_PREFIXES)
    }
    manifest = {"format_version": FORMAT_VERSION, "created_at": now(), "files": files}
    storage.write_json(storage.join(run, MANIFEST), manifest, endpoint_url)
    return manifest


def read_manifest(run: str, endpoint_url: str | None = None) -> dict:
    """The run's manifest, or ManifestError when it has none (an incomplete run) or one of another format."""
    try:
        manifest = json.loads(storage.read_bytes(storage.join(run, MANIFEST), endpoint_url))
    except FileNotFoundError:
        raise ManifestError(
            f"{run} has no {MANIFEST}: the run is incomplete (still training, or stopped before it was published); "
            "give a finished run, or its job's latest.json"
        ) from None
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{run}: cannot read {MANIFEST}: {exc}") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ManifestError(
            f"{run}: {MANIFEST} has format version {manifest.get('format_version')!r}; this tlray "
            f"({tlray.__version__}) reads version {FORMAT_VERSION}: use the tlray that wrote it"
        )
    return manifest


def read_verified(run: str, path: str, manifest: dict, endpoint_url: str | None = None) -> bytes:
    """One file of a sealed run, checked against the manifest before anyone uses it."""
    entry = manifest["files"].get(path)
    if entry is None:
        raise ManifestError(f"{run}: {path} is not in its {MANIFEST}; the run is not one tlray published")
    try:
        data = storage.read_bytes(storage.join(run, path), endpoint_url)
    except FileNotFoundError:
        raise ManifestError(f"{run}: {path} is listed in {MANIFEST} but missing; the run was altered") from None
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != entry["size"] or digest != entry["sha256"]:
        raise ManifestError(
            f"{run}: {path} does not match its {MANIFEST} (sha256 {digest[:12]}…, expected {entry['sha256'][:12]}…); "
            "the file was changed or damaged after publishing"
        )
    return data


def is_sealed(run: str, endpoint_url: str | None = None) -> bool:
    """A manifest is there and every file it lists has the size it says (sizes: cheap, no download)."""
    try:
        manifest = read_manifest(run, endpoint_url)
    except ManifestError:
        return False
    sizes = storage.list_tree(run, endpoint_url)
    return all(sizes.get(path) == entry["size"] for path, entry in manifest["files"].items())


def manifest_digest(run: str, endpoint_url: str | None = None) -> str:
    """sha256 of the MANIFEST.json bytes: names one exact published artifact (latest.json records it)."""
    return hashlib.sha256(storage.read_bytes(storage.join(run, MANIFEST), endpoint_url)).hexdigest()


# ---------------------------------------------------------------------------------------
# Export and checks
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
        if metric == "val_top5" and len(index.classes) < 5:
            raise UserError(
                f"{key}: val_top5 is only reported with 5 or more classes; this dataset has {len(index.classes)}"
            )


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
