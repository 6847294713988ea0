"""Data layouts: how the files listed under `dataset.uri` become labelled images.

One module per value of the spec's `dataset.layout`, named after the value (the table below is made
from the spec's `DataLayout`, so the two cannot drift apart) and imported only when a dataset uses it.
A layout module has:
    READER          the module of tlray.data.readers that reads its images' bytes
    is_data_file    which listed keys the layout indexes (its images)
    label_source    (spec key, value) that the labels come from, for the index's error messages
    rows            (dataset, {key: file}) -> [(key relative to dataset.uri, label, "train" | "val")]
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


def labelled_files(dataset: DatasetSpec, uri_key: str = "dataset.uri") -> tuple[dict[str, StoredObject], list[Row]]:
    """The dataset's files by key, and its rows labelled by its layout: what `tlray train`'s index and
    `tlray evaluate`'s both start from. `uri_key`: what the messages call `dataset.uri` (DATA_URI for evaluate)."""
    layout_of_data = layout(dataset.layout)
    files = files_under(dataset.uri, dataset.endpoint_url, uri_key, layout_of_data.is_data_file)
    return files, layout_of_data.rows(dataset, files)
