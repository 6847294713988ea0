"""The dataset index: which images there are, their classes, and which split each is in.

It is built once on the driver, before any cluster work: listing is cheap, and every data problem
surfaces as one clear error (exit 2) instead of a worker crash hours later. It stays free of torch and
Ray: `tlray launch --if-data-changed` builds one in a small pod to compare fingerprints.

Workers never get the index: a split's keys travel as a `KeyTable`, three flat arrays that Ray's object
store ships and maps without copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tlray.data import layouts
from tlray.data.errors import DataError
from tlray.data.listing import fingerprint
from tlray.io import storage
from tlray.spec import DatasetSpec


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


def build_index(dataset: DatasetSpec) -> DatasetIndex:
    """List the dataset, assign labels and the train/val split, and check it can train."""
    images, labelled = layouts.labelled_files(dataset)
    classes = layouts.class_names(dataset, labelled)
    key, where = layouts.layout(dataset.layout).label_source(dataset)
    if len(classes) < 2:
        raise DataError(f"{key}: found {len(classes)} class(es) in {where}; a classifier needs at least 2")
    class_index = {name: i for i, name in enumerate(classes)}
    train = sorted((k, class_index[label]) for k, label, split in labelled if split == "train")
    val = sorted((k, class_index[label]) for k, label, split in labelled if split == "val")
    empty = sorted(set(classes) - {classes[label] for _, label in train})
    if empty:
        raise DataError(f"{key}: class(es) {', '.join(empty)} have no training images in {where}")
    if not val:
        raise DataError(
            f"dataset.val_fraction: the validation split of {where} is empty; add images or raise val_fraction"
        )
    return DatasetIndex(
        root=storage.absolute_uri(layouts.root_of(dataset)).rstrip("/"),
        endpoint_url=dataset.endpoint_url,
        classes=classes,
        train=train,
        val=val,
        fingerprint=fingerprint(layouts.files_of(images, (k for k, _, _ in labelled))),
    )


@dataclass(frozen=True)
class KeyTable:
    """One split's keys and labels: compact to ship, and read zero-copy from Ray's object store."""

    blob: np.ndarray  # uint8: every key's UTF-8 bytes, back to back
    offsets: np.ndarray  # int64, len(keys) + 1
    labels: np.ndarray  # int64

    @classmethod
    def of(cls, samples: list[tuple[str, int]]) -> KeyTable:
        encoded = [key.encode() for key, _ in samples]
        offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum([len(k) for k in encoded], out=offsets[1:])
        blob = np.frombuffer(b"".join(encoded), np.uint8)
        return cls(blob, offsets, np.array([label for _, label in samples], np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def key(self, row: int) -> str:
        return self.blob[self.offsets[row] : self.offsets[row + 1]].tobytes().decode()
