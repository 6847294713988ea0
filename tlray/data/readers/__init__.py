"""Readers: how a batch's image bytes are fetched inside the Ray Data tasks.

Each layout names its reader (its READER); the reader is the module of that name here, imported on
first use, so a reader that needs its own library (e.g. shards read with `webdataset`) costs nothing
to datasets that do not use it. A reader module has one function:
    read(root, keys, endpoint_url, concurrency, retry_seconds, **options) -> iterator of (position in keys, bytes)
yielding each image as it arrives, and raising tlray.errors.ReadFailure for a read that still fails
after `retry_seconds` of retries (never counted as a bad image). `options` are its layout's
`reader_options(dataset)` (e.g. the Parquet image column). A new reader is one module here.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def reader(name: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{name}")
