"""What is under a dataset root: its files, which of them are images, and their fingerprint.

Local folders and S3 prefixes are listed alike (each file's key relative to the root and a version),
so nothing above this module tells them apart. The layouts label what is listed here; `tlray predict`
takes every image as it is.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from tlray.data.errors import DataError
from tlray.io import storage
from tlray.io.s3 import S3Error, StoredObject

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


def list_files(uri: str, endpoint_url: str | None) -> list[StoredObject]:
    """Every object under a dataset root: key relative to the root, and a version for the fingerprint."""
    if storage.is_s3(uri):
        from tlray.io import s3

        try:
            return s3.list_files(uri, endpoint_url, key="dataset.uri", max_attempts=storage.s3_max_attempts())
        except S3Error as exc:
            raise DataError(str(exc)) from None
    root = Path(uri)
    if not root.is_dir():
        raise DataError(f"dataset.uri: folder '{uri}' does not exist")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        for name in sorted(filenames):
            path, stat = Path(dirpath, name), Path(dirpath, name).stat()
            # size and modification time, as make and rsync judge a file: a same-size rewrite (a BMP, a re-encoded
            # JPEG) is new data, which a fingerprint of sizes alone would miss (S3 has ETags for this)
            out.append(StoredObject(path.relative_to(root).as_posix(), f"{stat.st_size}:{stat.st_mtime_ns}"))
    return out


def files_under(
    uri: str,
    endpoint_url: str | None,
    uri_key: str,
    keep: Callable[[str], bool] | None = None,
    kind: str = f"images ({', '.join(IMAGE_EXTENSIONS)})",
) -> dict[str, StoredObject]:
    """The listed files that `keep` accepts (default: the images), by key. None is a DataError that names
    `uri_key`, the spec key or argument that gave `uri`, and the `kind` of file it looked for."""
    keep = keep or is_image_key
    files = {f.key: f for f in list_files(uri, endpoint_url) if keep(f.key)}
    if not files:
        raise DataError(f"{uri_key}: no {kind} under {uri}")
    return files


def is_hidden(name: str) -> bool:
    return name.startswith((".", "_")) or name.upper().startswith("README")


def is_image_key(key: str) -> bool:
    return key.lower().endswith(IMAGE_EXTENSIONS) and not any(is_hidden(p) for p in key.split("/"))


def fingerprint(files: list[StoredObject]) -> str:
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.key):
        h.update(f"{f.key}\0{f.version}\n".encode())
    return h.hexdigest()
