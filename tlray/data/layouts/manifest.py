"""`dataset.layout: manifest`: a CSV or JSONL file names each image's label, and optionally its split.

Columns `path` (relative to dataset.uri, or a URI/path under it), `label`, and `split` (train or val;
left out or empty, the stable hash split decides). Every bad row is reported at once, by line number.
"""

from __future__ import annotations

import csv
import io
import json
import os

from tlray.data.errors import DataError
from tlray.data.layouts import Row
from tlray.data.listing import is_image_key
from tlray.data.split import SPLIT_FOLDERS, hash_split
from tlray.io import storage
from tlray.io.s3 import S3Error, StoredObject
from tlray.spec import DatasetSpec

READER = "objects"  # every image its own file or object
is_data_file = is_image_key


def label_source(dataset: DatasetSpec) -> tuple[str, str]:
    return "dataset.manifest", dataset.manifest


def rows(dataset: DatasetSpec, images: dict[str, StoredObject]) -> list[Row]:
    """(key, label, split) from a CSV or JSONL index with columns path, label and optional split."""
    root = dataset.uri.rstrip("/") + "/"
    out, problems = [], []
    for line, row in read_label_manifest(dataset):
        path, label, split = (
            str(row.get("path") or ""),
            str(row.get("label") or "").strip(),
            str(row.get("split") or ""),
        )
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


def read_label_manifest(dataset: DatasetSpec) -> list[tuple[int, dict]]:
    """(line number, row) pairs of `dataset.manifest`; it is a path/URI, or a key relative to dataset.uri."""
    name = dataset.manifest
    uri = label_manifest_location(dataset)
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


def label_manifest_location(dataset: DatasetSpec) -> str:
    """A URI or absolute path as given; a relative name is a key under dataset.uri (for a local
    dataset, a path relative to the working directory also works when nothing of that name is there)."""
    name = dataset.manifest
    if "://" in name or os.path.isabs(name):
        return name
    under_root = storage.join(storage.absolute_uri(dataset.uri), name)
    if storage.is_s3(dataset.uri) or os.path.exists(under_root) or not os.path.exists(name):
        return under_root
    return storage.absolute_uri(name)
