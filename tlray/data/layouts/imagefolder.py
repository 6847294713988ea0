"""`dataset.layout: imagefolder`: the folder is the class, `<class>/<image>` or `train|val/<class>/<image>`.

Without train/val folders, each image's split is the stable hash split (tlray.data.split).
"""

from __future__ import annotations

import logging

from tlray.data.layouts import Row
from tlray.data.listing import is_image_key
from tlray.data.split import SPLIT_FOLDERS, hash_split
from tlray.io.s3 import StoredObject
from tlray.spec import DatasetSpec

log = logging.getLogger("tlray")

READER = "objects"  # every image its own file or object
is_data_file = is_image_key


def label_source(dataset: DatasetSpec) -> tuple[str, str]:
    return "dataset.uri", dataset.uri


def rows(dataset: DatasetSpec, images: dict[str, StoredObject]) -> list[Row]:
    """(key, class name, split) for `<class>/<file>` or `train|val/<class>/<file>` layouts."""
    presplit = {key.split("/")[0] for key in images} <= set(SPLIT_FOLDERS)
    out = []
    for key in images:
        parts = key.split("/")
        if presplit and len(parts) >= 3:
            out.append((key, parts[1], parts[0]))
        elif not presplit and len(parts) >= 2:
            out.append((key, parts[0], hash_split(key, dataset)))
        else:
            log.warning("ignoring %s: not inside a class folder", key)
    return out
