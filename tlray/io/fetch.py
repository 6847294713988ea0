"""Reading a batch of images' bytes inside Ray Data tasks: one GET per object, concurrently.

Two kinds of failure, never confused:
- a read that still fails after retries (throttling, 5xx, refused or dropped connections for
  longer than `retry_seconds`; or at once a missing object or denied access) raises
  `ReadFailure`: the task fails, Ray retries it, and then the run stops, naming the key;
- bytes that arrive but do not decode are a *bad image*, which `dataset.on_bad_image` governs
  (tlray.data). A read failure is never counted as a bad image.

S3 goes through boto3's `get_object` (one request, no HEAD before it) with botocore's own
retries off: the loop here retries against a time budget instead of an attempt count, so
that a 30-second brown-out is survived whatever the per-request latency.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tlray.errors import ReadFailure
from tlray.io import storage

RETRYABLE_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "ServiceUnavailable",
    "InternalError",
    "RequestLimitExceeded",
    "TooManyRequests",
}
MAX_BACKOFF_S = 4.0


def read_as_completed(
    root: str, keys: list[str], endpoint_url: str | None, concurrency: int, retry_seconds: float
) -> Iterator[tuple[int, bytes]]:
    """(position, bytes) of every `root/key` as each read finishes, `concurrency` reads in flight: the
    caller decodes one image while the next ones are still on the wire. A ReadFailure cancels the rest."""
    if len(keys) <= 1 or concurrency <= 1:
        for i, key in enumerate(keys):
            yield i, read_one(root, key, endpoint_url, retry_seconds)
        return
    pool = shared_pool(concurrency)
    futures = {pool.submit(read_one, root, key, endpoint_url, retry_seconds): i for i, key in enumerate(keys)}
    try:
        for future in as_completed(futures):
            yield futures[future], future.result()
    finally:
        for future in futures:
            future.cancel()


@functools.cache
def shared_pool(threads: int) -> ThreadPoolExecutor:
    """One pool per process and width: a task reads batch after batch without starting threads each time."""
    return ThreadPoolExecutor(threads, thread_name_prefix="tlray-read")


def read_one(root: str, key: str, endpoint_url: str | None, retry_seconds: float) -> bytes:
    location = storage.join(root, key)
    return with_retries(lambda: _get(location, endpoint_url), location, retry_seconds)


def read_range(
    location: str, start: int, length: int, endpoint_url: str | None, retry_seconds: float, name: str
) -> bytes:
    """Bytes [start, start + length) of one file or object: one ranged GET (S3 `Range:`), or a seek and a read.
    Fewer bytes than that mean the file changed since it was indexed: a ReadFailure naming `name`, not retried."""
    data = with_retries(lambda: _get(location, endpoint_url, (start, length)), name, retry_seconds)
    if len(data) != length:
        raise ReadFailure(name, f"{len(data)} of {length} bytes at offset {start}: the file changed since indexing", 1)
    return data


def with_retries(read, name: str, retry_seconds: float) -> bytes:
    """`read()` retried against a time budget; a read that still fails is a ReadFailure naming `name`."""
    deadline, attempt = time.monotonic() + retry_seconds, 0
    while True:
        attempt += 1
        try:
            return read()
        except Exception as exc:  # noqa: BLE001 — sorted into retryable or not just below
            retryable, cause = classify(exc)
            if not retryable or time.monotonic() >= deadline:
                raise ReadFailure(name, cause, attempt) from None
        # full jitter: concurrent readers that failed together do not retry together
        time.sleep(min(random.uniform(0, min(MAX_BACKOFF_S, 0.1 * 2**attempt)), max(0.0, deadline - time.monotonic())))


def _get(location: str, endpoint_url: str | None, span: tuple[int, int] | None = None) -> bytes:
    """The whole file or object, or `span` = (start, length) of it."""
    if not storage.is_s3(location):
        if span is None:
            return Path(location).read_bytes()
        with open(location, "rb") as f:
            f.seek(span[0])
            return f.read(span[1])
    from tlray.io import s3

    bucket, key = location[len("s3://") :].split("/", 1)
    ranged = {} if span is None else {"Range": f"bytes={span[0]}-{span[0] + span[1] - 1}"}
    # max_attempts=1: the retry loop above owns retries; a pool as wide as any batch's concurrency
    response = s3.client(endpoint_url, max_attempts=1).get_object(Bucket=bucket, Key=key, **ranged)
    return response["Body"].read()


def classify(exc: BaseException) -> tuple[bool, str]:
    """(worth retrying, a short cause). Missing, denied or local-file errors are final at once."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False, f"{type(exc).__name__}: {exc.strerror or exc}"
    if isinstance(exc, OSError):  # a local read that failed otherwise (NFS hiccup, EIO): try again
        return True, f"{type(exc).__name__}: {exc}"
    try:
        from botocore import exceptions as bx
    except ImportError:  # pragma: no cover — boto3 is a dependency
        return False, repr(exc)
    if isinstance(exc, bx.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        cause = f"HTTP {status} {code}".strip()
        return (code in RETRYABLE_CODES or status >= 500 or status == 429), cause
    if isinstance(exc, (bx.ConnectionError, bx.HTTPClientError, bx.IncompleteReadError)):  # refused, dropped, timed out
        return True, f"{type(exc).__name__}: {exc}"
    if isinstance(exc, bx.NoCredentialsError):
        return False, "no AWS credentials on this node"
    return False, f"{type(exc).__name__}: {exc}"
