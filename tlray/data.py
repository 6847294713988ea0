"""The dataset index: which image is which class, and whether it trains or validates.

The index is built once, on the driver, before any cluster work: listing the
files is cheap, and every data problem surfaces as one clear error (exit 2)
instead of a worker crash hours later. Workers receive the index and decode
only their own shard.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from tlray.errors import UserError
from tlray.storage import absolute_uri
from tlray.spec import DatasetSpec

log = logging.getLogger("tlray")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
SPLIT_FOLDERS = ("train", "val")


class DataError(UserError):
    pass


@dataclass(frozen=True)
class StoredFile:
    key: str  # path relative to the dataset root, '/'-separated
    version: str  # size (and ETag where the store has one): part of the fingerprint


@dataclass(frozen=True)
class DatasetIndex:
    root: str
    classes: list[str]
    train: list[tuple[str, int]]  # (key relative to root, class index)
    val: list[tuple[str, int]]
    fingerprint: str

    def location(self, key: str) -> str:
        return f"{self.root.rstrip('/')}/{key}"

    def summary(self) -> str:
        return (
            f"{len(self.classes)} classes, {len(self.train)} train / {len(self.val)} val images "
            f"from {self.root} (fingerprint {self.fingerprint[:12]})"
        )

    def to_dict(self) -> dict:
        return {
            "root": self.root,
            "classes": self.classes,
            "train": self.train,
            "val": self.val,
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "DatasetIndex":
        return cls(
            root=d["root"],
            classes=list(d["classes"]),
            train=[tuple(s) for s in d["train"]],
            val=[tuple(s) for s in d["val"]],
            fingerprint=d["fingerprint"],
        )


def build_index(dataset: DatasetSpec) -> DatasetIndex:
    """List the dataset, assign labels and the train/val split, and check it can train."""
    files = list_files(dataset.uri)
    images = [f for f in files if is_image_key(f.key)]
    if not images:
        raise DataError(f"dataset.uri: no images ({', '.join(IMAGE_EXTENSIONS)}) under {dataset.uri}")
    if dataset.layout != "imagefolder":
        raise DataError("dataset.layout: 'manifest' datasets are read from S3 or a folder by the S3 data path, not yet available")
    labelled = imagefolder_labels(images, dataset)
    classes = sorted({label for _, label, _ in labelled})
    if len(classes) < 2:
        raise DataError(f"dataset.uri: found {len(classes)} class folder(s) under {dataset.uri}; a classifier needs at least 2")
    class_index = {name: i for i, name in enumerate(classes)}
    train = [(key, class_index[label]) for key, label, split in labelled if split == "train"]
    val = [(key, class_index[label]) for key, label, split in labelled if split == "val"]
    empty = sorted(set(classes) - {classes[label] for _, label in train})
    if empty:
        raise DataError(f"dataset.uri: class(es) {', '.join(empty)} have no training images under {dataset.uri}")
    if not val:
        raise DataError(f"dataset.val_fraction: the validation split of {dataset.uri} is empty; add images or raise val_fraction")
    return DatasetIndex(
        root=absolute_uri(dataset.uri),  # workers run in other directories
        classes=classes,
        train=sorted(train),
        val=sorted(val),
        fingerprint=fingerprint(images),
    )


def list_files(uri: str) -> list[StoredFile]:
    """Every file under a dataset root, with a version string for the fingerprint."""
    if uri.startswith("s3://"):
        raise DataError("dataset.uri: s3:// datasets need the S3 data path, which this version of tlray does not have yet")
    root = Path(uri)
    if not root.is_dir():
        raise DataError(f"dataset.uri: folder '{uri}' does not exist")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        for name in sorted(filenames):
            path = Path(dirpath, name)
            out.append(StoredFile(path.relative_to(root).as_posix(), str(path.stat().st_size)))
    return out


def is_hidden(name: str) -> bool:
    return name.startswith((".", "_")) or name.upper().startswith("README")


def is_image_key(key: str) -> bool:
    parts = key.split("/")
    return not any(is_hidden(p) for p in parts) and key.lower().endswith(IMAGE_EXTENSIONS)


def imagefolder_labels(images: list[StoredFile], dataset: DatasetSpec) -> list[tuple[str, str, str]]:
    """(key, class name, split) for `<class>/<file>` or `train|val/<class>/<file>` layouts."""
    presplit = {f.key.split("/")[0] for f in images} <= set(SPLIT_FOLDERS)
    out = []
    for f in images:
        parts = f.key.split("/")
        if presplit and len(parts) >= 3:
            out.append((f.key, parts[1], parts[0]))
        elif not presplit and len(parts) >= 2:
            split = "val" if in_val_split(f.key, dataset.split_seed, dataset.val_fraction) else "train"
            out.append((f.key, parts[0], split))
        else:
            log.warning("ignoring %s: not inside a class folder", f.key)
    return out


def in_val_split(key: str, seed: int, val_fraction: float) -> bool:
    """Stable split: depends only on the key and the seed, never on the other files."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def fingerprint(files: list[StoredFile]) -> str:
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.key):
        h.update(f"{f.key}\0{f.version}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------
# Worker side: decode a shard of the index into tensors
# ---------------------------------------------------------------------------------------
class ImageDataset(torch.utils.data.Dataset):
    """(image tensor, label) pairs for a list of index samples, decoded on access."""

    def __init__(self, index: DatasetIndex, samples: list[tuple[str, int]], transform: Callable):
        self.index, self.samples, self.transform = index, samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        key, label = self.samples[i]
        return self.transform(open_rgb(self.index.location(key))), label


def open_rgb(path: str) -> Image.Image:
    """Decode any PIL mode (L, LA, P, RGBA, CMYK, 16-bit) to RGB; GIFs give their first frame."""
    with Image.open(path) as image:
        image.seek(0)
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            image = image.point(lambda v: v / 256).convert("L")
        return image.convert("RGB")
