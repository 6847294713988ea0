"""Data layouts: how the files listed under `dataset.uri` become labelled images.

One module per value of the spec's `dataset.layout`, named after the value (the table below is made
from the spec's `DataLayout`, so the two cannot drift apart) and imported only when a dataset uses it.
A layout module has:
    READER          the module of tlray.data.readers that reads its images' bytes
    is_data_file    which listed keys the layout indexes (its images)
    label_source    (spec key, value) that the labels come from, for the index's error messages
    rows            (dataset, {key: file}) -> [(key relative to dataset.uri, label, "train" | "val")]
and optionally (each has a default below, which the one-image-per-file layouts use):
    DATA_FILES      what is_data_file accepts, for the message when there is none (default: images)
    RUN_LENGTH      rows read as one run in the training order (tlray.data.order); > 1 where consecutive
                    rows are neighbours inside one file (shards), so a batch's reads coalesce
    root            dataset -> the folder or prefix listed (default: dataset.uri)
    classes         (dataset, rows) -> the class names in index order (default: the labels, sorted)
    reader_options  dataset -> keyword arguments of its reader's `read` (default: none)
A sample inside a file has the key `<file key>#<where in the file>`; `files_of` maps keys back to the
listed files, whose versions make the fingerprint.
A new layout is its module here and its value in tlray.spec.DataLayout; nothing else changes.
"""

from __future__ import annotations

import importlib
import typing
from types import ModuleType

from tlray.data.listing import files_under
from tlray.io.s3 import StoredObject
from tlray.spec import DataLayout, DatasetSpec

Row = tuple[str, str, str]  # (key relative to dataset.uri, label, "train" or "val")

LAYOUTS = {name: f"{__name__}.{name}" for name in typing.get_args(DataLayout)}  # dataset.layout -> its module


def layout(name: str) -> ModuleType:
    return importlib.import_module(LAYOUTS[name])


def root_of(dataset: DatasetSpec) -> str:
    """The folder or prefix the layout lists: dataset.uri, or its folder where the layout takes a pattern."""
    return getattr(layout(dataset.layout), "root", lambda d: d.uri)(dataset)


def class_names(dataset: DatasetSpec, labelled: list[Row]) -> list[str]:
    """The classes in index order: the layout's own order (declared class lists), else the labels sorted."""
    named = getattr(layout(dataset.layout), "classes", None)
    return named(dataset, labelled) if named else sorted({label for _, label, _ in labelled})


def reader_options(dataset: DatasetSpec) -> dict[str, str]:
    return getattr(layout(dataset.layout), "reader_options", lambda d: {})(dataset)


def run_length(dataset: DatasetSpec) -> int:
    return getattr(layout(dataset.layout), "RUN_LENGTH", 1)


def files_of(files: dict[str, StoredObject], keys) -> list[StoredObject]:
    """The listed files that hold these keys' images, each once: a key is a file's, or `<file key>#<where>`."""
    held = {key if key in files else key.partition("#")[0] for key in keys}
    return [files[key] for key in sorted(held) if key in files]


def labelled_files(dataset: DatasetSpec, uri_key: str = "dataset.uri") -> tuple[dict[str, StoredObject], list[Row]]:
    """The dataset's files by key, and its rows labelled by its layout: what `tlray train`'s index and
    `tlray evaluate`'s both start from. `uri_key`: what the messages call `dataset.uri` (DATA_URI for evaluate)."""
    layout_of_data = layout(dataset.layout)
    kind = getattr(layout_of_data, "DATA_FILES", None)  # what the layout lists, for "no … under" (default: images)
    files = files_under(
        root_of(dataset), dataset.endpoint_url, uri_key, layout_of_data.is_data_file, *([kind] if kind else [])
    )
    return files, layout_of_data.rows(dataset, files)
