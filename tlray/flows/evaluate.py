"""`tlray evaluate MODEL DATA_URI`: score a published model on labelled images.

The exported program (model/model.pt2) runs with the preprocessing its metadata.json names, over images
decoded exactly as in training (flows.scoring). The champion gate scores models the same way (gate_score).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from tlray.artifacts.plots import plot_confusion
from tlray.artifacts.published import PublishedModel, load_published
from tlray.console import start_ray
from tlray.data import layouts, pipeline
from tlray.data.errors import DataError
from tlray.data.index import DatasetIndex
from tlray.data.listing import fingerprint
from tlray.data.pipeline import DataSource
from tlray.errors import UserError
from tlray.flows.scoring import classification_report, remap_logits, split_logits
from tlray.io import storage
from tlray.metrics import GATE_REPORT_KEYS
from tlray.spec import DatasetSpec


def evaluate(
    model_uri: str,
    data_uri: str,
    manifest: str | None = None,
    out: str | None = None,
    endpoint_url: str | None = None,
    batch_size: int = 64,
) -> dict:
    """Score a published model on every image of a labelled dataset; write JSON + PNG to `out` if given."""
    layout = "manifest" if manifest else "imagefolder"  # 1. the labelled data, as a dataset section
    dataset = DatasetSpec(uri=data_uri, layout=layout, manifest=manifest, endpoint_url=endpoint_url)
    model = load_published(model_uri, dataset.endpoint_url)  # 2. the model, checked against its manifest
    index = labelled_index(dataset, model.classes)  # 3. the images, labelled by its classes: before Ray
    print(f"[tlray] evaluating {model.run} on {len(index.val)} images from {index.root}")
    start_ray()  # 4. join the cluster or start one
    source = pipeline.data_source(index, dataset, model.preprocessing)
    logits, labels = split_logits(model, source, "val", batch_size)  # 5. score every image
    report = {
        "model": model.run,
        "data": index.root,
        "data_fingerprint": index.fingerprint,
        **classification_report(logits, labels, model.classes),
    }
    print(summary_table(report))  # 6. the table, and the files
    if out:
        write_evaluation(report, out, dataset.endpoint_url)
        print(f"[tlray] evaluation written to {out}")
    return report


# ---------------------------------------------------------------------------------------
# Labelled data for a model: every image, labelled by the model's own class list
# ---------------------------------------------------------------------------------------
def labelled_index(dataset: DatasetSpec, model_classes: list[str]) -> DatasetIndex:
    """Every image under `dataset.uri` (both splits of a train/val layout) in the "val" split, labelled
    with the index of its class in `model_classes`. Classes the model does not know are exit 2."""
    images, labelled = layouts.labelled_files(dataset, uri_key="DATA_URI")
    unknown = sorted({label for _, label, _ in labelled} - set(model_classes))
    if unknown:
        raise DataError(
            f"DATA_URI: {len(unknown)} class(es) the model does not know: {', '.join(unknown)} "
            f"(it knows {', '.join(model_classes)})"
        )
    position = {name: i for i, name in enumerate(model_classes)}
    samples = sorted((key, position[label]) for key, label, _ in labelled)
    return DatasetIndex(
        root=storage.absolute_uri(layouts.root_of(dataset)).rstrip("/"),
        endpoint_url=dataset.endpoint_url,
        classes=list(model_classes),
        train=[],
        val=samples,
        fingerprint=fingerprint(layouts.files_of(images, (k for k, _ in samples))),
    )


# ---------------------------------------------------------------------------------------
# The champion gate's score, and what `tlray evaluate` prints and writes
# ---------------------------------------------------------------------------------------
def gate_score(model: PublishedModel, source: DataSource, metric: str, batch_size: int = 64) -> float:
    """A published model's `metric` (publish.metric) on `source`'s validation split, by class name."""
    logits, labels = split_logits(model, source, "val", batch_size)
    report = classification_report(
        remap_logits(logits, model.classes, list(source.classes)), labels, list(source.classes)
    )
    if metric == "val_top5" and "top5" not in report:
        raise UserError(f"publish.metric: val_top5 needs 5 or more classes; the dataset has {len(source.classes)}")
    return report[GATE_REPORT_KEYS[metric]]


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


def write_evaluation(report: dict, out: str, endpoint_url: str | None) -> None:
    """evaluation.json (everything), confusion_matrix.json and .png under `out`."""
    confusion = {"classes": report["classes"], "matrix": report["confusion_matrix"]}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "evaluation.json").write_text(json.dumps(report, indent=2, sort_keys=True))
        (folder / "confusion_matrix.json").write_text(json.dumps(confusion, indent=2))
        plot_confusion(confusion, folder / "confusion_matrix.png", "on the evaluated split")
        storage.upload_dir(folder, storage.absolute_uri(out), endpoint_url)
