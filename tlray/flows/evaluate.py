"""Using a published model: load it (checked against its manifest), score it on labelled images.

`tlray evaluate MODEL DATA_URI` and the champion gate share this: the exported program
(model/model.pt2) with the preprocessing its metadata.json names, over images decoded by Ray Data
tasks exactly as in training (data.image_dataset), normalised on the device.
"""

from __future__ import annotations

import dataclasses
import io
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tlray.artifacts import champion, publish
from tlray.console import start_ray
from tlray.data import dataset as data
from tlray.data.dataset import BAD_LABEL, DatasetIndex, DataSource
from tlray.errors import UserError
from tlray.io import storage
from tlray.models.preprocessing import Preprocessing
from tlray.spec import DatasetSpec

GATE_METRICS = {"val_accuracy": "accuracy", "val_top5": "top5", "val_loss": "loss"}


@dataclass(frozen=True)
class PublishedModel:
    run: str
    metadata: dict
    program: bytes  # model/model.pt2, verified against MANIFEST.json
    manifest: dict

    def read(self, path: str, endpoint_url: str | None = None) -> bytes:
        """Another file of the run, verified against its manifest."""
        return publish.read_verified(self.run, path, self.manifest, endpoint_url)

    @property
    def classes(self) -> list[str]:
        return list(self.metadata["classes"])

    @property
    def preprocessing(self) -> Preprocessing:
        p = self.metadata["preprocessing"]
        return Preprocessing(p["resize_size"], p["crop_size"], tuple(p["mean"]), tuple(p["std"]), p["interpolation"])

    def module(self, device: torch.device | str = "cpu") -> torch.nn.Module:
        # exported in eval mode; an exported module refuses .eval()
        return torch.export.load(io.BytesIO(self.program)).module().to(device)


def resolve_run(model_uri: str, endpoint_url: str | None = None) -> str:
    """MODEL as given on the command line: a run folder or URI, or a job's latest.json (its champion)."""
    uri = storage.absolute_uri(model_uri).rstrip("/")
    if not uri.endswith(".json"):
        return uri
    job = uri.rsplit("/", 1)[0]
    try:
        pointer, _ = champion.read_pointer(job, endpoint_url) if uri.endswith(champion.LATEST) else (None, None)
    except OSError as exc:
        raise UserError(f"MODEL: cannot read {uri}: {exc}") from None
    if pointer is None:
        raise UserError(
            f"MODEL: {uri} does not exist or is not a {champion.LATEST}: no champion was published there yet"
        )
    return pointer.run


def load_published(model_uri: str, endpoint_url: str | None = None) -> PublishedModel:
    """The run's metadata and exported program, each checked against MANIFEST.json (exit 2 if anything is off)."""
    run = resolve_run(model_uri, endpoint_url)
    manifest = publish.read_manifest(run, endpoint_url)
    metadata = json.loads(publish.read_verified(run, "metadata.json", manifest, endpoint_url))
    if metadata.get("format_version") != publish.FORMAT_VERSION:
        raise publish.ManifestError(
            f"{run}: metadata.json has format version {metadata.get('format_version')!r}; this tlray reads "
            f"version {publish.FORMAT_VERSION}"
        )
    program = publish.read_verified(run, metadata["files"]["program"], manifest, endpoint_url)
    return PublishedModel(run, metadata, program, manifest)


# ---------------------------------------------------------------------------------------
# Labelled data for a model: every image, labelled by the model's own class list
# ---------------------------------------------------------------------------------------
def labelled_index(dataset: DatasetSpec, model_classes: list[str]) -> DatasetIndex:
    """Every image under `dataset.uri` (both splits of a train/val layout) in the "val" split, labelled
    with the index of its class in `model_classes`. Classes the model does not know are exit 2."""
    files = data.list_files(dataset.uri, dataset.endpoint_url)
    images = {f.key: f for f in files if data.is_image_key(f.key)}
    if not images:
        raise data.DataError(f"DATA_URI: no images ({', '.join(data.IMAGE_EXTENSIONS)}) under {dataset.uri}")
    if dataset.layout == "manifest":
        labelled = data.manifest_labels(dataset, images)
    else:
        labelled = data.imagefolder_labels(list(images.values()), dataset)
    unknown = sorted({label for _, label, _ in labelled} - set(model_classes))
    if unknown:
        raise data.DataError(
            f"DATA_URI: {len(unknown)} class(es) the model does not know: {', '.join(unknown)} "
            f"(it knows {', '.join(model_classes)})"
        )
    position = {name: i for i, name in enumerate(model_classes)}
    samples = sorted((key, position[label]) for key, label, _ in labelled)
    return DatasetIndex(
        root=storage.absolute_uri(dataset.uri).rstrip("/"),
        endpoint_url=dataset.endpoint_url,
        classes=list(model_classes),
        train=[],
        val=samples,
        fingerprint=data.fingerprint([images[k] for k, _ in samples]),
    )


# ---------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def split_logits(
    model: PublishedModel,
    source: DataSource,
    split: str = "val",
    batch_size: int = 64,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits N x model classes, labels N) over a split, decoded with the model's own preprocessing;
    undecodable images keep label -1 (their logits are zeros)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    source = dataclasses.replace(source, preprocessing=model.preprocessing, augment=False, on_bad_image="skip")
    module = model.module(device)
    logits, labels = [], []
    rows = data.val_rows(source.counts[split], 0, 1)
    for batch in data.iter_batches(source, split, rows, batch_size, device):
        good = batch["label"] != BAD_LABEL
        out = torch.zeros(len(good), len(model.classes))
        if good.any():
            out[good.cpu()] = module(source.preprocessing.normalise(batch["image"][good])).float().cpu()
        logits.append(out)
        labels.append(batch["label"].cpu())
    if not logits:
        return torch.zeros(0, len(model.classes)), torch.zeros(0, dtype=torch.int64)
    return torch.cat(logits), torch.cat(labels)


def remap_logits(logits: torch.Tensor, model_classes: list[str], classes: list[str]) -> torch.Tensor:
    """A model's logits over `classes` (by name) plus one last column, "none of these".

    A class the model does not know gets -inf (probability 0: its images are always wrong); the
    model's classes that `classes` lacks are pooled into the last column (logsumexp), so predicting
    one of them is wrong too, and the softmax over the result is the model's own.
    """
    position = {name: i for i, name in enumerate(model_classes)}
    out = torch.full((logits.shape[0], len(classes) + 1), float("-inf"))
    for j, name in enumerate(classes):
        if name in position:
            out[:, j] = logits[:, position[name]]
    others = [i for name, i in position.items() if name not in set(classes)]
    if others:
        out[:, -1] = torch.logsumexp(logits[:, others], dim=1)
    return out


def classification_report(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    """Accuracy, top-5 (5+ classes), loss, per-class precision/recall/F1 and the confusion matrix.

    `logits` may carry extra columns after `classes` (remap_logits' "none of these"); rows with
    label -1 (undecodable images) are left out and counted.
    """
    good = labels != BAD_LABEL
    logits, labels = logits[good], labels[good]
    k = len(classes)
    predicted = logits.argmax(1)
    counts = np.zeros((k, k + 1), dtype=np.int64)  # the extra column: predictions outside `classes`
    np.add.at(counts, (labels.numpy(), np.minimum(predicted.numpy(), k)), 1)
    n = max(len(labels), 1)
    report = {
        "images": int(len(labels)),
        "bad_images": int((~good).sum()),
        "accuracy": float((predicted == labels).sum()) / n,
        "loss": float(torch.nn.functional.cross_entropy(logits, labels)) if len(labels) else float("nan"),
        "classes": list(classes),
        "confusion_matrix": counts[:, :k].tolist(),
        "per_class": {},
    }
    if k >= 5:
        report["top5"] = float((logits.topk(5, 1).indices == labels[:, None]).any(1).sum()) / n
    for i, name in enumerate(classes):
        tp, predicted_i, actual_i = counts[i, i], counts[:, i].sum(), counts[i].sum()
        precision = tp / predicted_i if predicted_i else 0.0
        recall = tp / actual_i if actual_i else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        report["per_class"][name] = {
            "precision": float(precision),
            "recall": float(recall),
            "f1": float(f1),
            "support": int(actual_i),
        }
    return report


def gate_score(model: PublishedModel, source: DataSource, metric: str, batch_size: int = 64) -> float:
    """A published model's `metric` (publish.metric) on `source`'s validation split, by class name."""
    logits, labels = split_logits(model, source, "val", batch_size)
    report = classification_report(
        remap_logits(logits, model.classes, list(source.classes)), labels, list(source.classes)
    )
    if metric == "val_top5" and "top5" not in report:
        raise UserError(f"publish.metric: val_top5 needs 5 or more classes; the dataset has {len(source.classes)}")
    return report[GATE_METRICS[metric]]


# ---------------------------------------------------------------------------------------
# `tlray evaluate`
# ---------------------------------------------------------------------------------------
def evaluate(model_uri: str, dataset: DatasetSpec, out: str | None, batch_size: int = 64) -> dict:
    """Score a published model on every image of a labelled dataset; write JSON + PNG to `out` if given."""
    model = load_published(model_uri, dataset.endpoint_url)
    index = labelled_index(dataset, model.classes)  # before Ray: bad input stops here
    print(f"[tlray] evaluating {model.run} on {len(index.val)} images from {index.root}")
    start_ray()
    source = data.data_source(index, dataset, model.preprocessing)
    logits, labels = split_logits(model, source, "val", batch_size)
    report = {
        "model": model.run,
        "data": index.root,
        "data_fingerprint": index.fingerprint,
        **classification_report(logits, labels, model.classes),
    }
    print(summary_table(report))
    if out:
        write_report(report, out, dataset.endpoint_url)
        print(f"[tlray] evaluation written to {out}")
    return report


def summary_table(report: dict) -> str:
    lines = [
        f"accuracy {report['accuracy']:.4f}"
        + (f", top-5 {report['top5']:.4f}" if "top5" in report else "")
        + f" on {report['images']} images ({report['bad_images']} undecodable, left out)"
    ]
    width = max(len(c) for c in report["classes"])
    lines.append(f"{'class':<{width}}  precision  recall  f1      support")
    for name, m in report["per_class"].items():
        lines.append(f"{name:<{width}}  {m['precision']:<9.4f}  {m['recall']:<6.4f}  {m['f1']:<6.4f}  {m['support']}")
    return "\n".join(lines)


def write_report(report: dict, out: str, endpoint_url: str | None) -> None:
    """evaluation.json (everything), confusion_matrix.json and .png under `out`."""
    from tlray.flows.report import plot_confusion

    confusion = {"classes": report["classes"], "matrix": report["confusion_matrix"]}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "evaluation.json").write_text(json.dumps(report, indent=2, sort_keys=True))
        (folder / "confusion_matrix.json").write_text(json.dumps(confusion, indent=2))
        plot_confusion({**confusion, "trial": ""}, folder / "confusion_matrix.png")
        storage.upload_dir(folder, storage.absolute_uri(out), endpoint_url)
