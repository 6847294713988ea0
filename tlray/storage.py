"""Where runs live: one pyarrow filesystem for local folders and object stores alike."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs as pafs


def absolute_uri(uri: str) -> str:
    """Object-store URIs stay as they are; local paths become absolute (Ray needs that)."""
    return uri if "://" in uri else str(Path(uri).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(absolute_uri(uri))


def upload_dir(local_dir: str | Path, uri: str) -> None:
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local_dir), path, destination_filesystem=fs)


def write_json(uri: str, payload: object) -> None:
    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(json.dumps(payload, indent=2, sort_keys=True, default=str).encode())


def read_json(uri: str) -> object:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound
