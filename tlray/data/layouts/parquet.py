"""`dataset.layout: parquet`: `*.parquet` files under `dataset.uri`, an image column and a label column.

The image column (`dataset.image_column`, default `image`) holds encoded images: bytes, or Hugging Face's
`{bytes, path}` struct, so a `datasets` split saved with `to_parquet()` and copied to S3 trains unchanged.
The label column (`dataset.label_column`, default `label`) holds class names, or class indices whose
names come from the Hugging Face `ClassLabel` in the file's schema metadata, else from `dataset.classes`,
else are the indices themselves. The split is the stable hash split of each row's key.

The index reads only the label column (columnar, so a small share of the bytes) and the row counts.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

from tlray.data.errors import DataError
from tlray.data.layouts import Row
from tlray.data.listing import is_hidden
from tlray.data.readers.parquet import sample_key
from tlray.data.split import hash_split
from tlray.io import storage
from tlray.io.s3 import S3Error, StoredObject
from tlray.spec import DatasetSpec

READER = "parquet"
DATA_FILES = "`.parquet` files"
RUN_LENGTH = 32  # consecutive rows of a file read together (order.py): a batch opens few files
INDEX_THREADS = 16  # files indexed at once


def is_data_file(key: str) -> bool:
    return key.endswith(".parquet") and not any(is_hidden(part) for part in key.split("/"))


def label_source(dataset: DatasetSpec) -> tuple[str, str]:
    return f"dataset.label_column ({dataset.label_column})", dataset.uri


def reader_options(dataset: DatasetSpec) -> dict[str, str]:
    return {"image_column": dataset.image_column}


def class_label_names(schema, label_column: str) -> list[str] | None:
    """The names of a Hugging Face `ClassLabel` label column (schema metadata b"huggingface"), if any."""
    metadata = (schema.metadata or {}).get(b"huggingface")
    if not metadata:
        return None
    try:
        feature = json.loads(metadata)["info"]["features"][label_column]
    except (ValueError, KeyError, TypeError):
        return None
    names = feature.get("names") if isinstance(feature, dict) else None
    return [str(n) for n in names] if names else None


def labels_of(dataset: DatasetSpec, file: str) -> tuple[list[list], object]:
    """(each row group's labels, the file's arrow schema), reading the label column alone."""
    import pyarrow.parquet as pq

    location = storage.join(storage.absolute_uri(dataset.uri), file)
    fs, path = storage.filesystem(location, dataset.endpoint_url)
    try:
        with fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            schema = parquet.schema_arrow
            for key, column in (("image_column", dataset.image_column), ("label_column", dataset.label_column)):
                if column not in schema.names:
                    raise DataError(
                        f"dataset.{key}: {location} has no column '{column}' (its columns: {', '.join(schema.names)})"
                    )
            groups = [
                parquet.read_row_group(g, columns=[dataset.label_column]).column(0).to_pylist()
                for g in range(parquet.metadata.num_row_groups)
            ]
    except (OSError, S3Error, ValueError) as exc:
        raise DataError(f"dataset.uri: cannot read {location}: {exc}") from None
    return groups, schema


def names_for_indices(dataset: DatasetSpec, schema) -> tuple[list[str] | None, str]:
    """(names of integer labels, the key that gave them) — ClassLabel metadata first, then dataset.classes."""
    hf = class_label_names(schema, dataset.label_column)
    if hf is not None:
        return hf, f"the ClassLabel names of '{dataset.label_column}'"
    return (list(dataset.classes), "dataset.classes") if dataset.classes is not None else (None, "")


def rows(dataset: DatasetSpec, files: dict[str, StoredObject]) -> list[Row]:
    """(row key, class name, split) for every row of every file."""
    names = sorted(files)
    with ThreadPoolExecutor(max(1, min(INDEX_THREADS, len(names)))) as pool:
        read = list(pool.map(lambda file: labels_of(dataset, file), names))
    out = []
    for file, (groups, schema) in zip(names, read, strict=True):
        index_names, source = names_for_indices(dataset, schema)
        for g, labels in enumerate(groups):
            for r, label in enumerate(labels):
                key = sample_key(file, g, r)
                out.append(
                    (
                        key,
                        class_name(dataset, label, index_names, source, f"{file} row {r} of row group {g}"),
                        hash_split(key, dataset),
                    )
                )
    return out


def class_name(dataset: DatasetSpec, label, names: list[str] | None, source: str, where: str) -> str:
    if label is None or isinstance(label, (bool, float)):
        raise DataError(f"dataset.label_column: {where} has label {label!r}; labels are class names or indices")
    if isinstance(label, str):
        if dataset.classes is not None and label not in dataset.classes:
            raise DataError(f"dataset.classes: {where} has label '{label}', which it does not name")
        return label
    if names is None:
        if label < 0:
            raise DataError(f"dataset.label_column: {where} has class {label}; class indices start at 0")
        return str(label)
    if not 0 <= label < len(names):
        key = "dataset.classes" if source == "dataset.classes" else "dataset.label_column"
        raise DataError(f"{key}: {where} has class {label}, outside the {len(names)} classes of {source}")
    return names[label]


def classes(dataset: DatasetSpec, labelled: list[Row]) -> list[str]:
    """The declared order (ClassLabel names, or dataset.classes) where there is one; else the labels sorted
    (integer labels as numbers)."""
    import pyarrow.parquet as pq

    found = {label for _, label, _ in labelled}
    if labelled:
        first = labelled[0][0].partition("#")[0]
        location = storage.join(storage.absolute_uri(dataset.uri), first)
        fs, path = storage.filesystem(location, dataset.endpoint_url)
        with fs.open_input_file(path) as f:
            schema = pq.ParquetFile(f).schema_arrow
        integers = schema.field(dataset.label_column).type.id in INTEGER_TYPE_IDS
        declared = class_label_names(schema, dataset.label_column) if integers else None
        if declared is not None:
            return declared
        if dataset.classes is not None:
            return list(dataset.classes)
        if integers:
            return sorted(found, key=int)
    return sorted(found)


def _integer_type_ids() -> set[int]:
    import pyarrow as pa

    return {
        t.id for t in (pa.int8(), pa.int16(), pa.int32(), pa.int64(), pa.uint8(), pa.uint16(), pa.uint32(), pa.uint64())
    }


INTEGER_TYPE_IDS = _integer_type_ids()
