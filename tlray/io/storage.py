"""Where data and runs live: one pyarrow filesystem for local folders and S3 alike.

Ray Data tasks and Ray Train workers get the filesystem *object* (it pickles), not an
environment variable: pyarrow ignores AWS_ENDPOINT_URL_S3, and a driver's environment
does not reach the workers of a cluster it joined. Credentials always come from the
standard AWS chain on whichever machine the code runs (env, profile, IRSA/Pod Identity).
"""

from __future__ import annotations

import functools
import json
import mimetypes
import os
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

DEFAULT_S3_ATTEMPTS = 10


def s3_max_attempts() -> int:
    """Attempts per S3 request (botocore `standard` retries, pyarrow's standard strategy).

    The standard AWS variable AWS_MAX_ATTEMPTS sets it, for boto3 and pyarrow alike.
    """
    return int(os.environ.get("AWS_MAX_ATTEMPTS") or DEFAULT_S3_ATTEMPTS)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def absolute_uri(uri: str) -> str:
    """Object-store URIs stay as they are; local paths become absolute (workers run elsewhere)."""
    return uri if "://" in uri else str(Path(uri).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def filesystem(uri: str, endpoint_url: str | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an `s3://bucket/key` URI."""
    if not is_s3(uri):
        return pafs.LocalFileSystem(), absolute_uri(uri)
    return s3_filesystem(endpoint_url, bucket=uri[len("s3://") :].split("/", 1)[0]), uri[len("s3://") :].rstrip("/")


@functools.cache
def s3_filesystem(endpoint_url: str | None, bucket: str = "") -> pafs.S3FileSystem:
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    options: dict = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=s3_max_attempts())}
    if endpoint:
        parsed = urlparse(endpoint)
        options.update(endpoint_override=parsed.netloc, scheme=parsed.scheme or "https")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region and not endpoint and bucket:
        region = pafs.resolve_s3_region(bucket)  # AWS proper: the bucket's own region
    return pafs.S3FileSystem(region=region or "us-east-1", **options)


def upload_dir(local_dir: str | Path, uri: str, endpoint_url: str | None = None) -> None:
    fs, path = filesystem(uri, endpoint_url)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local_dir), path, destination_filesystem=fs)


def upload_site(local_dir: str | Path, uri: str, endpoint_url: str | None = None) -> None:
    """A folder of web pages: in S3 each file carries its content type, so a static website serves the page
    as a page (S3 would otherwise answer binary/octet-stream, and a browser would download it)."""
    if not is_s3(uri):
        upload_dir(local_dir, uri, endpoint_url)
        return
    for file in sorted(Path(local_dir).rglob("*")):
        if file.is_file():
            kind = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
            write_bytes(join(uri, file.relative_to(local_dir).as_posix()), file.read_bytes(), endpoint_url, kind)


def write_bytes(uri: str, data: bytes, endpoint_url: str | None = None, content_type: str | None = None) -> None:
    fs, path = filesystem(uri, endpoint_url)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    metadata = {"Content-Type": content_type} if content_type and is_s3(uri) else None
    with fs.open_output_stream(path, metadata=metadata) as out:
        out.write(data)


def write_json(uri: str, payload: object, endpoint_url: str | None = None) -> None:
    write_bytes(uri, json.dumps(payload, indent=2, sort_keys=True, default=str).encode(), endpoint_url)


def read_bytes(uri: str, endpoint_url: str | None = None) -> bytes:
    fs, path = filesystem(uri, endpoint_url)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_json(uri: str, endpoint_url: str | None = None) -> object:
    return json.loads(read_bytes(uri, endpoint_url))


def exists(uri: str, endpoint_url: str | None = None) -> bool:
    fs, path = filesystem(uri, endpoint_url)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_tree(uri: str, endpoint_url: str | None = None) -> dict[str, int]:
    """Every file under a folder or prefix: {path relative to it: size}; empty when there is none."""
    fs, path = filesystem(uri, endpoint_url)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return {}
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return {i.path[len(path) :].lstrip("/"): i.size for i in infos if i.type == pafs.FileType.File}


def sha256_of(uri: str, endpoint_url: str | None = None) -> str:
    """Streamed, so a large model never sits in memory twice."""
    import hashlib

    fs, path = filesystem(uri, endpoint_url)
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(8 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def delete_file(uri: str, endpoint_url: str | None = None) -> None:
    fs, path = filesystem(uri, endpoint_url)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


# ---------------------------------------------------------------------------------------
# Compare-and-swap on one small file (latest.json, history.jsonl): S3 conditional writes,
# or on a local folder an exclusive lock around check-and-replace
# ---------------------------------------------------------------------------------------
def read_versioned(uri: str, endpoint_url: str | None = None) -> tuple[bytes, str] | None:
    """(content, version) or None when absent; pass the version to `write_if` to replace exactly this content."""
    if is_s3(uri):
        from tlray.io import s3

        return s3.read_versioned(uri, endpoint_url, key="output.uri", max_attempts=s3_max_attempts())
    path = Path(absolute_uri(uri))
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return data, _local_version(data)


def write_if(uri: str, data: bytes, version: str | None, endpoint_url: str | None = None) -> str:
    """Write only if the file is still at `version` (None: still absent); returns the new version.

    Raises s3.WriteConflict when someone else wrote first, s3.ConditionalWritesUnsupported when an
    S3-compatible store rejects the conditional headers.
    """
    if is_s3(uri):
        from tlray.io import s3

        return s3.write_if(uri, data, version, endpoint_url, key="output.uri", max_attempts=s3_max_attempts())
    import fcntl

    from tlray.io.s3 import WriteConflict

    path = Path(absolute_uri(uri))
    path.parent.mkdir(parents=True, exist_ok=True)
    # flock serialises writers on this machine (threads and processes alike); os.replace makes each
    # write atomic for readers, who never take the lock.
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        current = _local_version(path.read_bytes()) if path.exists() else None
        if current != version:
            raise WriteConflict(f"{uri} changed since it was read")
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_bytes(data)
        os.replace(temporary, path)
    return _local_version(data)


def _local_version(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()
