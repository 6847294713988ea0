"""`tlray predict`: batch inference with a published model over a folder or S3 prefix of images.

Ray Data does the work: CPU tasks fetch and decode the images to uint8 (tlray.data.pipeline, the
training pipeline), then a pool of actors, each holding the exported program (on a GPU when the
cluster has them), normalises and classifies them in batches (`map_batches`). The driver gathers
the rows in order, shows progress, and writes one Parquet or CSV file. An image that cannot be
decoded gets a row with its error instead of a prediction; a read that fails after retries still
stops the command (an I/O failure is not a bad image).
"""

from __future__ import annotations

import io
import json
import sys
from dataclasses import dataclass

import numpy as np

from tlray.artifacts.published import PublishedModel, load_published
from tlray.console import start_ray
from tlray.data import pipeline
from tlray.data.index import DatasetIndex
from tlray.data.listing import files_under, fingerprint
from tlray.data.pipeline import BAD_LABEL
from tlray.errors import UserError
from tlray.io import storage
from tlray.spec import DatasetSpec

BAD_IMAGE_ERROR = "cannot decode image"


def predict(
    model_uri: str, data_uri: str, out: str, endpoint_url: str | None, batch_size: int = 64, top_k: int = 5
) -> list[Row]:
    """Classify every image under `data_uri` with a published model; one row per image into `out`."""
    if not out.lower().endswith((".parquet", ".csv")):  # 1. the options
        raise UserError(f"--out: {out} must end in .parquet or .csv (the output format)")
    if top_k < 1:
        raise UserError(f"--top-k: must be at least 1, got {top_k}")
    model = load_published(model_uri, endpoint_url)  # 2. the model, checked against its manifest, before any work
    index = image_index(data_uri, endpoint_url, model.classes)  # 3. the images
    print(f"[tlray] predicting {len(index.val)} images from {index.root} with {model.run}")
    start_ray()  # 4. join the cluster or start one
    rows = run_inference(model, index, endpoint_url, batch_size, top_k)  # 5. classify them
    write_rows(rows, out, endpoint_url)  # 6. one Parquet or CSV file
    errors = sum(r.error is not None for r in rows)
    print(f"[tlray] {len(rows)} predictions ({errors} images could not be decoded) written to {out}")
    return rows


@dataclass(frozen=True)
class Row:
    """One output row (the Parquet/CSV schema)."""

    path: str
    predicted_class: str | None
    top_k_classes: list[str]
    top_k_probabilities: list[float]
    error: str | None


def image_index(data_uri: str, endpoint_url: str | None, classes: list[str]) -> DatasetIndex:
    """Every image under DATA_URI, at any depth, as the "val" split (labels unused: all 0): no layout."""
    images = files_under(data_uri, endpoint_url, "DATA_URI")
    return DatasetIndex(
        root=storage.absolute_uri(data_uri).rstrip("/"),
        endpoint_url=endpoint_url,
        classes=classes,
        train=[],
        val=[(k, 0) for k in sorted(images)],
        fingerprint=fingerprint(list(images.values())),
    )


class Classify:
    """The map_batches actor: loads the program once, then classifies uint8 batches."""

    def __init__(self, program_ref, preprocessing, classes: list[str], top_k: int):
        import ray
        import torch

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.module = torch.export.load(io.BytesIO(ray.get(program_ref[0]))).module().to(self.device)
        self.preprocessing, self.classes, self.top_k = preprocessing, np.array(classes, dtype=object), top_k

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        good = batch["label"] != BAD_LABEL
        k = min(self.top_k, len(self.classes))
        indices = np.zeros((len(good), k), np.int64)
        probabilities = np.zeros((len(good), k), np.float32)
        if good.any():
            with torch.no_grad():
                images = torch.from_numpy(batch["image"][good]).to(self.device)
                logits = self.module(self.preprocessing.normalise(images)).float()
                top = torch.softmax(logits, dim=1).topk(k, dim=1)
            indices[good], probabilities[good] = top.indices.cpu().numpy(), top.values.cpu().numpy()
        return {"row": batch["row"], "good": good, "top_k": indices, "probabilities": probabilities}


def run_inference(
    model: PublishedModel, index: DatasetIndex, endpoint_url: str | None, batch_size: int, top_k: int
) -> list[Row]:
    import ray

    dataset_spec = DatasetSpec(uri=index.root, endpoint_url=endpoint_url, on_bad_image="skip")
    source = pipeline.data_source(index, dataset_spec, model.preprocessing)
    pipeline.configure_ray_data()
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    # one actor per GPU; on CPUs one, beside the decoding tasks (it holds a whole model in memory)
    actors = max(1, gpus)
    rows = np.arange(len(index.val))
    program_ref = [ray.put(model.program)]  # in a list: Ray passes a bare ObjectRef argument resolved
    predictions = pipeline.image_dataset(source, "val", rows, batch_size, resources.get("CPU", 1)).map_batches(
        Classify,
        fn_constructor_args=(program_ref, model.preprocessing, model.classes, top_k),
        batch_size=batch_size,
        concurrency=actors,
        num_gpus=1 if gpus else 0,
    )
    out: list[Row] = []
    step = max(1, len(rows) // 10)
    for batch in predictions.iter_batches(batch_size=None, batch_format="numpy"):
        for row, good, top, probabilities in zip(
            batch["row"], batch["good"], batch["top_k"], batch["probabilities"], strict=True
        ):
            path = source.location("val", int(row))
            if good:
                names = [model.classes[i] for i in top]
                out.append(Row(path, names[0], names, [float(p) for p in probabilities], None))
            else:
                out.append(Row(path, None, [], [], BAD_IMAGE_ERROR))
            if len(out) % step == 0 or len(out) == len(rows):
                print(f"[tlray] predicted {len(out)}/{len(rows)} images", file=sys.stderr, flush=True)
    return sorted(out, key=lambda r: r.path)


def write_rows(rows: list[Row], out: str, endpoint_url: str | None) -> None:
    """Parquet keeps the top-k as lists; CSV holds them as JSON arrays in a cell."""
    import pyarrow as pa

    columns = {
        "path": [r.path for r in rows],
        "predicted_class": [r.predicted_class for r in rows],
        "top_k_classes": [r.top_k_classes for r in rows],
        "top_k_probabilities": [r.top_k_probabilities for r in rows],
        "error": [r.error for r in rows],
    }
    buffer = io.BytesIO()
    if out.lower().endswith(".csv"):
        import pyarrow.csv

        columns["top_k_classes"] = [json.dumps(v) for v in columns["top_k_classes"]]
        columns["top_k_probabilities"] = [json.dumps(v) for v in columns["top_k_probabilities"]]
        pyarrow.csv.write_csv(pa.table(columns), buffer)
    else:
        import pyarrow.parquet

        schema = pa.schema(
            [
                ("path", pa.string()),
                ("predicted_class", pa.string()),
                ("top_k_classes", pa.list_(pa.string())),
                ("top_k_probabilities", pa.list_(pa.float32())),
                ("error", pa.string()),
            ]
        )
        pyarrow.parquet.write_table(pa.table(columns, schema=schema), buffer)
    storage.write_bytes(storage.absolute_uri(out), buffer.getvalue(), endpoint_url)
