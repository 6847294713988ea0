"""Train or val for an image that the data does not place: a hash of its key and `dataset.split_seed`.

The split of an image depends on nothing else, so adding images never moves an existing one between
train and val: a run on grown data still validates on the images the last one validated on.
"""

from __future__ import annotations

import hashlib

from tlray.spec import DatasetSpec

SPLIT_FOLDERS = ("train", "val")


def hash_split(key: str, dataset: DatasetSpec) -> str:
    return "val" if in_val_split(key, dataset.split_seed, dataset.val_fraction) else "train"


def in_val_split(key: str, seed: int, val_fraction: float) -> bool:
    """Stable split: depends only on the key and the seed, never on the other files."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction
