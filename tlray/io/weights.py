"""A weights checkpoint in S3, fetched into a cache on the node's local disk.

Why the cache is keyed and written the way it is:
- Nodes live long (a KubeRay cluster runs many jobs), and a checkpoint is often overwritten at the
  same URI. A cache keyed by the URI alone would keep handing out the old one, so the key is the
  URI plus the object's identity (ETag, and VersionId in a versioned bucket), from one HEAD.
- Every worker of a node fetches the same checkpoint at the same moment. Each downloads into a
  temporary file of its own and renames it onto the cache name atomically (os.replace), so no one
  ever opens a half-written file and no two writers share one.
- A download can come back short or corrupt, and a cached file can be truncated on disk (a full
  disk, a crash before the data reached it). Downloads are checked against the HEAD's size (and
  MD5, when the ETag is one); a cached file of the wrong size is downloaded again over it.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tlray.errors import UserError
from tlray.io import s3, storage

CACHE_FOLDER = "tlray-weights"  # under tempfile.gettempdir(), resolved at each call
ATTEMPTS = 2
CHUNK_BYTES = 8 * 1024 * 1024
PLAIN_MD5 = re.compile(r"[0-9a-f]{32}")  # multipart ETags end in "-<parts>": not an MD5 of the bytes


@dataclass(frozen=True)
class StoredCheckpoint:
    """One version of the object, as a HEAD describes it."""

    uri: str
    bucket: str
    key: str
    etag: str
    version_id: str | None
    size: int
    md5: str | None  # the ETag, when it is the MD5 of the bytes

    @property
    def cache_name(self) -> str:
        identity = "\n".join([self.uri, self.etag, self.version_id or ""])
        return hashlib.sha256(identity.encode()).hexdigest()[:32] + ".pt"


def cache_dir() -> Path:
    return Path(tempfile.gettempdir(), CACHE_FOLDER)


def identity(stored: StoredCheckpoint) -> str:
    """What the run plan records of an S3 checkpoint's version (tlray.plan.Weights.identity)."""
    return f"etag {stored.etag}" + (f" version {stored.version_id}" if stored.version_id else "")


def fetch_weights(weights: str | None, endpoint_url: str | None, planned: str | None = None) -> str | None:
    """The local path of an S3 checkpoint (downloaded once per node and version); other weights pass through.

    `planned`: the identity the run was planned with; a checkpoint replaced since then is refused, so that every
    worker of a run, and every restart, starts from the same weights.
    """
    if not weights or not storage.is_s3(weights):
        return weights
    problem = ""
    for _ in range(ATTEMPTS):
        stored = head(weights, endpoint_url)  # again after a failure: the object may have been replaced
        if planned and identity(stored) != planned:
            raise UserError(
                f"model.weights: {weights} changed since this run was planned ({planned}, now {identity(stored)}); "
                "run the command again to plan it anew"
            )
        local = cache_dir() / stored.cache_name
        if local.is_file() and local.stat().st_size == stored.size:
            return str(local)
        problem = download(stored, local, endpoint_url)
        if problem is None:
            return str(local)
    raise UserError(f"model.weights: cannot read {weights}: {problem} ({ATTEMPTS} attempts)")


def head(uri: str, endpoint_url: str | None) -> StoredCheckpoint:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    try:
        response = _client(endpoint_url).head_object(Bucket=bucket, Key=key)
    except (BotoCoreError, ClientError, ValueError) as exc:
        raise UserError(f"model.weights: cannot read {uri}: {exc}") from None
    etag = response["ETag"].strip('"')
    # SSE-KMS and SSE-C objects have 32-hex ETags that are not the MD5 of their bytes.
    plain = PLAIN_MD5.fullmatch(etag) and response.get("ServerSideEncryption", "AES256") == "AES256"
    return StoredCheckpoint(
        uri, bucket, key, etag, response.get("VersionId"), response["ContentLength"], etag if plain else None
    )


def download(stored: StoredCheckpoint, local: Path, endpoint_url: str | None) -> str | None:
    """Into a temporary file of this process, checked, then renamed onto `local`; returns what went wrong."""
    from botocore.exceptions import BotoCoreError, ClientError

    local.parent.mkdir(parents=True, exist_ok=True)
    fd, part = tempfile.mkstemp(dir=local.parent, prefix=f".{local.stem}.{os.getpid()}.", suffix=".part")
    try:
        md5 = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out:
            for chunk in read_object(stored, endpoint_url):
                out.write(chunk)
                md5.update(chunk)
        size = os.path.getsize(part)
        if size != stored.size:
            return f"downloaded {size} bytes, the object has {stored.size}"
        if stored.md5 and md5.hexdigest() != stored.md5:
            return f"the downloaded bytes have MD5 {md5.hexdigest()}, the object's ETag is {stored.md5}"
        os.replace(part, local)
        return None
    except ClientError as exc:
        if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412:
            return "the object was replaced while it was being downloaded"
        raise UserError(f"model.weights: cannot read {stored.uri}: {exc}") from None
    except (BotoCoreError, OSError) as exc:  # a dropped connection, a short body, a full disk
        return f"download failed: {exc}"
    finally:
        Path(part).unlink(missing_ok=True)  # gone already when it was renamed


def read_object(stored: StoredCheckpoint, endpoint_url: str | None) -> Iterator[bytes]:
    """The bytes of exactly the version that was HEADed: a GET pinned to its VersionId or ETag."""
    pinned = {"VersionId": stored.version_id} if stored.version_id else {"IfMatch": f'"{stored.etag}"'}
    body = _client(endpoint_url).get_object(Bucket=stored.bucket, Key=stored.key, **pinned)["Body"]
    yield from body.iter_chunks(CHUNK_BYTES)


def _client(endpoint_url: str | None):
    return s3.client(endpoint_url, storage.s3_max_attempts())
