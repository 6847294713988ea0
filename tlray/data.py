"""The dataset: an index built once on the driver, then a Ray Data pipeline per split.

The index (which image is which class, train or val) is built before any cluster
work: listing is cheap, and every data problem surfaces as one clear error (exit 2)
instead of a worker crash hours later. Local folders and S3 prefixes go through the
same code; only the listing differs. Decoding and preprocessing run in Ray Data
tasks, which stream each worker its shard.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from tlray import storage
from tlray.errors import UserError
from tlray.s3 import S3Error, StoredObject
from tlray.spec import DatasetSpec

log = logging.getLogger("tlray")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
SPLIT_FOLDERS = ("train", "val")
MAX_BAD_FRACTION = 0.05  # more undecodable images than this stops a run, whatever on_bad_image says
BAD_LABEL = -1  # rows whose image could not be decoded (skipped by the loss and the metrics)


class DataError(UserError):
    pass


@dataclass(frozen=True)
class DatasetIndex:
    root: str  # absolute folder or s3://bucket/prefix
    endpoint_url: str | None
    classes: list[str]
    train: list[tuple[str, int]]  # (key relative to root, class index)
    val: list[tuple[str, int]]
    fingerprint: str

    def location(self, key: str) -> str:
        return storage.join(self.root, key)

    def summary(self) -> str:
        return (
            f"{len(self.classes)} classes, {len(self.train)} train / {len(self.val)} val images "
            f"from {self.root} (fingerprint {self.fingerprint[:12]})"
        )

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict) -> "DatasetIndex":
        return cls(**{**d, "train": [tuple(s) for s in d["train"]], "val": [tuple(s) for s in d["val"]]})


# ---------------------------------------------------------------------------------------
# Driver side: the index
# ---------------------------------------------------------------------------------------
def build_index(dataset: DatasetSpec) -> DatasetIndex:
    """List the dataset, assign labels and the train/val split, and check it can train."""
    files = list_files(dataset.uri, dataset.endpoint_url)
    images = {f.key: f for f in files if is_image_key(f.key)}
    if not images:
        raise DataError(f"dataset.uri: no images ({', '.join(IMAGE_EXTENSIONS)}) under {dataset.uri}")
    if dataset.layout == "manifest":
        labelled = manifest_labels(dataset, images)
    else:
        labelled = imagefolder_labels(list(images.values()), dataset)
    classes = sorted({label for _, label, _ in labelled})
    where = dataset.manifest if dataset.layout == "manifest" else dataset.uri
    key = "dataset.manifest" if dataset.layout == "manifest" else "dataset.uri"
    if len(classes) < 2:
        raise DataError(f"{key}: found {len(classes)} class(es) in {where}; a classifier needs at least 2")
    class_index = {name: i for i, name in enumerate(classes)}
    train = sorted((k, class_index[label]) for k, label, split in labelled if split == "train")
    val = sorted((k, class_index[label]) for k, label, split in labelled if split == "val")
    empty = sorted(set(classes) - {classes[label] for _, label in train})
    if empty:
        raise DataError(f"{key}: class(es) {', '.join(empty)} have no training images in {where}")
    if not val:
        raise DataError(f"dataset.val_fraction: the validation split of {where} is empty; add images or raise val_fraction")
    used = {k for k, _, _ in labelled}
    return DatasetIndex(
        root=storage.absolute_uri(dataset.uri).rstrip("/"),
        endpoint_url=dataset.endpoint_url,
        classes=classes,
        train=train,
        val=val,
        fingerprint=fingerprint([f for k, f in images.items() if k in used]),
    )


def list_files(uri: str, endpoint_url: str | None) -> list[StoredObject]:
    """Every object under a dataset root: key relative to the root, and a version for the fingerprint."""
    if storage.is_s3(uri):
        from tlray import s3

        try:
            return s3.list_files(uri, endpoint_url, key="dataset.uri", max_attempts=storage.s3_max_attempts())
        except S3Error as exc:
            raise DataError(str(exc)) from None
    root = Path(uri)
    if not root.is_dir():
        raise DataError(f"dataset.uri: folder '{uri}' does not exist")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        for name in sorted(filenames):
            path = Path(dirpath, name)
            out.append(StoredObject(path.relative_to(root).as_posix(), str(path.stat().st_size)))
    return out


def is_hidden(name: str) -> bool:
    return name.startswith((".", "_")) or name.upper().startswith("README")


def is_image_key(key: str) -> bool:
    return not any(is_hidden(p) for p in key.split("/")) and key.lower().endswith(IMAGE_EXTENSIONS)


def imagefolder_labels(images: list[StoredObject], dataset: DatasetSpec) -> list[tuple[str, str, str]]:
    """(key, class name, split) for `<class>/<file>` or `train|val/<class>/<file>` layouts."""
    presplit = {f.key.split("/")[0] for f in images} <= set(SPLIT_FOLDERS)
    out = []
    for f in images:
        parts = f.key.split("/")
        if presplit and len(parts) >= 3:
            out.append((f.key, parts[1], parts[0]))
        elif not presplit and len(parts) >= 2:
            out.append((f.key, parts[0], hash_split(f.key, dataset)))
        else:
            log.warning("ignoring %s: not inside a class folder", f.key)
    return out


def manifest_labels(dataset: DatasetSpec, images: dict[str, StoredObject]) -> list[tuple[str, str, str]]:
    """(key, label, split) from a CSV or JSONL index with columns path, label and optional split."""
    rows = read_manifest(dataset)
    root = dataset.uri.rstrip("/") + "/"
    out, problems = [], []
    for line, row in rows:
        path, label, split = str(row.get("path") or ""), str(row.get("label") or "").strip(), str(row.get("split") or "")
        key = path[len(root) :] if path.startswith(root) else path
        if "://" in key:
            problems.append(f"line {line}: '{path}' is outside dataset.uri ({dataset.uri})")
        elif key not in images:
            problems.append(f"line {line}: image '{path}' does not exist under {dataset.uri}")
        elif not label:
            problems.append(f"line {line}: empty label for '{path}'")
        elif split not in ("", *SPLIT_FOLDERS):
            problems.append(f"line {line}: split '{split}' is neither train nor val")
        else:
            out.append((key, label, split or hash_split(key, dataset)))
    if problems:
        shown = "; ".join(problems[:5]) + (f"; … {len(problems) - 5} more" if len(problems) > 5 else "")
        raise DataError(f"dataset.manifest: {len(problems)} bad row(s) in {dataset.manifest}: {shown}")
    return out


def read_manifest(dataset: DatasetSpec) -> list[tuple[int, dict]]:
    """(line number, row) pairs; the manifest is a path/URI, or a key relative to dataset.uri."""
    name = dataset.manifest
    uri = name if "://" in name or os.path.isabs(name) or not storage.is_s3(dataset.uri) else storage.join(dataset.uri, name)
    try:
        text = storage.read_bytes(uri, dataset.endpoint_url).decode("utf-8-sig")
    except (OSError, S3Error) as exc:
        raise DataError(f"dataset.manifest: cannot read {uri}: {exc}") from None
    if name.lower().endswith((".jsonl", ".json", ".ndjson")):
        rows = []
        for line, raw in enumerate(text.splitlines(), start=1):
            if raw.strip():
                try:
                    rows.append((line, json.loads(raw)))
                except json.JSONDecodeError as exc:
                    raise DataError(f"dataset.manifest: line {line} of {name} is not JSON: {exc.msg}") from None
        columns = set().union(*(r.keys() for _, r in rows)) if rows else set()
    else:
        reader = csv.DictReader(io.StringIO(text))
        rows = [(line, row) for line, row in enumerate(reader, start=2)]
        columns = set(reader.fieldnames or ())
    missing = [c for c in ("path", "label") if c not in columns]
    if missing:
        raise DataError(
            f"dataset.manifest: {name} lacks column(s) {', '.join(missing)}; "
            "it needs 'path' and 'label' (and optionally 'split': train or val)"
        )
    return rows


def hash_split(key: str, dataset: DatasetSpec) -> str:
    return "val" if in_val_split(key, dataset.split_seed, dataset.val_fraction) else "train"


def in_val_split(key: str, seed: int, val_fraction: float) -> bool:
    """Stable split: depends only on the key and the seed, never on the other files."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def fingerprint(files: list[StoredObject]) -> str:
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.key):
        h.update(f"{f.key}\0{f.version}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------
# The Ray Data pipeline: keys in, decoded and preprocessed images out
# ---------------------------------------------------------------------------------------
def image_dataset(index: DatasetIndex, split: str, transform: Callable, on_bad_image: str):
    """A lazy Ray Dataset of {"image": float32 3xHxW, "label": int64, "row": int64} for one split.

    "row" is the sample's position in the index, so a worker can name an undecodable file.
    """
    import ray.data

    items = [{"key": key, "row": i, "label": label} for i, (key, label) in enumerate(getattr(index, split))]
    blocks = max(1, min(200, len(items) // 64))
    decode = DecodeBatch(index.root, index.endpoint_url, transform, on_bad_image)
    return ray.data.from_items(items, override_num_blocks=blocks).map_batches(decode, batch_size=32)


class DecodeBatch:
    """The Ray Data batch function: read, decode, convert to RGB, preprocess (runs in Ray Data tasks)."""

    def __init__(self, root: str, endpoint_url: str | None, transform: Callable, on_bad_image: str):
        self.root, self.endpoint_url, self.transform, self.on_bad_image = root, endpoint_url, transform, on_bad_image

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, labels = [], batch["label"].astype(np.int64).copy()
        for i, key in enumerate(batch["key"]):
            location = storage.join(self.root, str(key))
            try:
                image = open_rgb(storage.read_bytes(location, self.endpoint_url))
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                if self.on_bad_image == "fail":
                    raise DataError(
                        f"dataset.on_bad_image: cannot decode {location} ({exc}); "
                        "set dataset.on_bad_image: skip to skip such files"
                    ) from None
                image, labels[i] = None, BAD_LABEL
            images.append(image)
        tensors = [self.transform(img) if img is not None else None for img in images]
        shape = next((t.shape for t in tensors if t is not None), None)
        if shape is None:  # every image in the batch was bad: take the shape from a blank one
            shape = self.transform(Image.new("RGB", (8, 8))).shape
        out = np.stack([t.numpy() if t is not None else np.zeros(shape, np.float32) for t in tensors])
        return {"image": out.astype(np.float32), "label": labels, "row": batch["row"].astype(np.int64)}


def open_rgb(source: bytes | str) -> Image.Image:
    """Decode any PIL mode (L, LA, P, RGBA, CMYK, 16-bit) to RGB; GIFs give their first frame."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        image.seek(0)
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            image = image.point(lambda v: v / 256).convert("L")
        return image.convert("RGB")
