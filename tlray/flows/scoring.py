"""Scoring a model on a split: logits, labels, the classification report with its confusion matrix.

Images are decoded by Ray Data tasks exactly as in training (pipeline.image_dataset) and normalised on the
device; undecodable images keep label -1 and are left out of every count. `tlray evaluate` and the champion
gate share these.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from tlray.artifacts.published import PublishedModel
from tlray.data import order, pipeline
from tlray.data.pipeline import BAD_LABEL, DataSource
from tlray.metrics import per_class_scores


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
    rows = order.val_rows(source.counts[split], 0, 1)
    for batch in pipeline.iter_batches(source, split, rows, batch_size, device):
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
    }
    if k >= 5:
        report["top5"] = float((logits.topk(5, 1).indices == labels[:, None]).any(1).sum()) / n
    report["per_class"] = per_class_scores(counts.tolist(), classes)
    return report
