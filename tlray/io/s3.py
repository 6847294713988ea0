"""Driver-side S3 access: list a dataset prefix, read one object, check an output bucket.

Everything here runs on the driver before any cluster work, so every failure is
turned into one `S3Error` (a UserError: exit 2, no traceback) whose message starts
with the spec key it concerns ("dataset.uri: ...") and says what to do about it.

Credentials come only from the standard AWS chain (environment, AWS_PROFILE,
IRSA / EKS Pod Identity, instance roles): no function here accepts them.
Retries (throttling, 5xx, dropped connections) are botocore's "standard" mode.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

from tlray.errors import UserError

MAX_POOL_CONNECTIONS = 64
LISTING_THREADS = 16  # top-level folders listed at once

# Bucket names: AWS's current rules are stricter (3-63 chars, lowercase), but legacy
# us-east-1 buckets and S3-compatible stores allow uppercase and '_'; this only catches typos
# like spaces or an empty name, which botocore would otherwise report as a parameter error.
BUCKET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{2,254}")

CREDENTIALS_HINT = (
    "provide them through the standard AWS chain: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
    "(plus AWS_SESSION_TOKEN for temporary ones), a profile named by AWS_PROFILE, or on Kubernetes "
    "a service account with IRSA or EKS Pod Identity; tlray never takes credentials from the spec"
)


class S3Error(UserError):
    """An S3 problem the user can fix; the message starts with the spec key concerned."""


@dataclass(frozen=True, slots=True)
class StoredObject:
    key: str  # path relative to the listed prefix, '/'-separated
    version: str  # f"{size}:{etag}": changes whenever the object is rewritten


# ---------------------------------------------------------------------------------------
# URIs and clients
# ---------------------------------------------------------------------------------------
def split_uri(uri: str, key: str = "dataset.uri") -> tuple[str, str]:
    """ "s3://bucket/a/b" -> ("bucket", "a/b/"): a prefix always ends with '/' (or is empty),
    so that listing "a/b" never also picks up "a/bc/..."."""
    bucket, path = _parse(uri, key)
    return bucket, (path if not path or path.endswith("/") else path + "/")


def _parse(uri: str, key: str) -> tuple[str, str]:
    """(bucket, path) without any normalisation of the path: read_bytes needs it as given."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise S3Error(f"{key}: '{uri}' is not an S3 URI; write it as s3://bucket/prefix")
    bucket, _, path = uri[len("s3://") :].partition("/")
    if not BUCKET_NAME.fullmatch(bucket):
        raise S3Error(
            f"{key}: '{uri}' does not start with a valid bucket name; write it as s3://bucket/prefix "
            "(bucket names are 3-63 letters, digits, '.' or '-')"
        )
    return bucket, path


def resolve_endpoint(endpoint_url: str | None) -> tuple[str | None, str]:
    """(endpoint, where it came from). boto3 reads the same variables itself; resolving them
    here lets errors name the endpoint and its source, and turns on path-style addressing."""
    for value, source in (
        (endpoint_url, "dataset.endpoint_url"),
        (os.environ.get("AWS_ENDPOINT_URL_S3"), "AWS_ENDPOINT_URL_S3"),
        (os.environ.get("AWS_ENDPOINT_URL"), "AWS_ENDPOINT_URL"),
    ):
        if value:
            return value, source
    return None, "AWS S3"


def client(endpoint_url: str | None, max_attempts: int = 10):
    """A boto3 S3 client, shared per (endpoint, attempts): clients are thread-safe and
    creating one costs tens of milliseconds (it loads the service model)."""
    endpoint, _ = resolve_endpoint(endpoint_url)
    return _client(endpoint, max_attempts)


@functools.cache
def _client(endpoint: str | None, max_attempts: int):
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"mode": "standard", "max_attempts": max_attempts},
        connect_timeout=5,
        read_timeout=60,
        max_pool_connections=MAX_POOL_CONNECTIONS,  # concurrent GETs of a batch (tlray.io.fetch) share one client
        # MinIO, Ceph and moto serve buckets under the endpoint's path, not as subdomains.
        s3={"addressing_style": "path"} if endpoint else None,
    )
    # A session of its own: boto3's default session is not thread-safe to create clients from.
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


def clear_client_cache() -> None:
    """Forget cached clients (they keep the credentials found when created); tests use this."""
    _client.cache_clear()


# ---------------------------------------------------------------------------------------
# Operations
# ---------------------------------------------------------------------------------------
def list_files(
    uri: str, endpoint_url: str | None, key: str = "dataset.uri", max_attempts: int = 10
) -> list[StoredObject]:
    """Every object under the prefix, keys relative to it, sorted; "directory markers" (empty
    objects named 'folder/' that consoles create) are not files and are skipped.

    Listing is 1,000 keys a request, so a million images is a thousand round trips: the
    top-level folders (classes, or train/val) are listed first and then side by side.
    """
    bucket, prefix = split_uri(uri, key)
    with _s3_errors(key, uri, endpoint_url, bucket, max_attempts):
        s3 = client(endpoint_url, max_attempts)
        top = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
        out, folders = [], []
        for page in top:
            out += _stored_objects(page, prefix)
            folders += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
        with ThreadPoolExecutor(LISTING_THREADS) as pool:
            for objects in pool.map(lambda folder: _list_all(s3, bucket, folder, prefix), folders):
                out += objects
    if not out:
        raise S3Error(
            f"{key}: s3://{bucket}/{prefix} is empty: no objects under that prefix; check the "
            "prefix (keys are case-sensitive) or upload the data first"
        )
    out.sort(key=lambda o: o.key)
    return out


def _list_all(s3, bucket: str, folder: str, prefix: str) -> list[StoredObject]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder)
    return [o for page in pages for o in _stored_objects(page, prefix)]


def _stored_objects(page: dict, prefix: str) -> list[StoredObject]:
    return [
        StoredObject(obj["Key"][len(prefix) :], f"{obj['Size']}:{obj.get('ETag', '').strip(chr(34))}")
        for obj in page.get("Contents", [])
        if not obj["Key"].endswith("/")
    ]


def read_bytes(uri: str, endpoint_url: str | None, key: str, max_attempts: int = 10) -> bytes:
    """The whole object (a manifest or a weights checkpoint)."""
    bucket, path = _parse(uri, key)
    if not path or path.endswith("/"):
        raise S3Error(f"{key}: {uri} names a folder, not an object; give the full object key")
    with _s3_errors(key, uri, endpoint_url, bucket, max_attempts):
        return client(endpoint_url, max_attempts).get_object(Bucket=bucket, Key=path)["Body"].read()


def check_writable(uri: str, endpoint_url: str | None, key: str = "output.uri", max_attempts: int = 10) -> None:
    """Fail early if the output bucket is missing or unreadable to us. Nothing is written:
    a probe object would need delete rights to clean up and could trigger bucket events;
    a write the policy forbids still fails later, with the same kind of message."""
    bucket, prefix = split_uri(uri, key)
    with _s3_errors(key, uri, endpoint_url, bucket, max_attempts):
        s3 = client(endpoint_url, max_attempts)
        s3.head_bucket(Bucket=bucket)
        s3.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)


# ---------------------------------------------------------------------------------------
# Conditional writes: compare-and-swap on one object X
# ---------------------------------------------------------------------------------------
class WriteConflict(Exception):
    """Another writer created or replaced the object since we read it: read it again and re-decide."""


class ConditionalWritesUnsupported(Exception):
    """The store rejects If-Match / If-None-Match on PutObject (older MinIO, Ceph, other S3 look-alikes)."""


def read_versioned(uri: str, endpoint_url: str | None, key: str, max_attempts: int = 10) -> tuple[bytes, str] | None:
    """(body, ETag) of an object, or None when there is none: what a conditional write needs."""
    from botocore import exceptions as bx

    bucket, path = _parse(uri, key)
    with _s3_errors(key, uri, endpoint_url, bucket, max_attempts):
        try:
            response = client(endpoint_url, max_attempts).get_object(Bucket=bucket, Key=path)
        except bx.ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return response["Body"].read(), response["ETag"]


def write_if(
    uri: str, data: bytes, etag: str | None, endpoint_url: str | None, key: str, max_attempts: int = 10
) -> str:
    """Write the object only if it is still as we read it: absent (etag None: `If-None-Match: *`) or at
    version `etag` (`If-Match`). Returns the new ETag.

    Raises WriteConflict when another writer got there first (412, S3's 409 ConditionalRequestConflict for
    racing writes, or a 404 when the object was deleted meanwhile) and ConditionalWritesUnsupported when the
    store does not implement the headers (501 / NotImplemented).
    """
    from botocore import exceptions as bx

    bucket, path = _parse(uri, key)
    condition = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
    with _s3_errors(key, uri, endpoint_url, bucket, max_attempts):
        try:
            response = client(endpoint_url, max_attempts).put_object(Bucket=bucket, Key=path, Body=data, **condition)
        except bx.ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey") or status in (409, 412):
                raise WriteConflict(f"{uri} changed since it was read ({code or status})") from None
            if code == "NotImplemented" or status == 501:
                message = f"{uri}: the store does not implement conditional writes ({code})"
                raise ConditionalWritesUnsupported(message) from None
            raise
        return response["ETag"]


def write_unconditionally(uri: str, data: bytes, endpoint_url: str | None, key: str, max_attempts: int = 10) -> str:
    """Plain PutObject: the fallback for stores without conditional writes (last writer wins)."""
    bucket, path = _parse(uri, key)
    with _s3_errors(key, uri, endpoint_url, bucket, max_attempts):
        return client(endpoint_url, max_attempts).put_object(Bucket=bucket, Key=path, Body=data)["ETag"]


# ---------------------------------------------------------------------------------------
# Errors: one paragraph each, starting with the spec key, saying what to do
# ---------------------------------------------------------------------------------------
@contextmanager
def _s3_errors(key: str, uri: str, endpoint_url: str | None, bucket: str, max_attempts: int) -> Iterator[None]:
    from botocore import exceptions as bx

    endpoint, source = resolve_endpoint(endpoint_url)
    where = f" at {endpoint}" if endpoint else ""
    try:
        yield
    except S3Error:
        raise
    except bx.NoCredentialsError:
        raise S3Error(f"{key}: no AWS credentials found to read {uri}; {CREDENTIALS_HINT}") from None
    except bx.ProfileNotFound as e:
        raise S3Error(f"{key}: {e} (set by AWS_PROFILE); fix or unset AWS_PROFILE") from None
    except (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ConnectionClosedError, bx.ReadTimeoutError) as e:
        if endpoint:
            raise S3Error(
                f"{key}: cannot reach the S3 endpoint {endpoint} (from {source}) after {max_attempts} "
                f"attempt(s): {e}; check {source} and that the store is running and reachable from here"
            ) from None
        raise S3Error(
            f"{key}: cannot reach AWS S3 for {uri} after {max_attempts} attempt(s): {e}; check this "
            "machine's network access (proxies, VPC endpoints) and AWS_REGION, or set "
            "dataset.endpoint_url for an S3-compatible store"
        ) from None
    except bx.ClientError as e:
        raise _client_error(e, key, uri, bucket, where, max_attempts) from None
    except ValueError as e:  # e.g. botocore's "Invalid endpoint: ..." when the client is created
        raise S3Error(f"{key}: {e}; check {source}") from None
    except bx.BotoCoreError as e:  # parameter validation, streaming failures, ...
        raise S3Error(f"{key}: S3 request for {uri}{where} failed: {e}") from None


def _client_error(e, key: str, uri: str, bucket: str, where: str, max_attempts: int) -> S3Error:
    code = str(e.response.get("Error", {}).get("Code", ""))
    status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    operation = e.operation_name
    # HEAD responses carry no body, so botocore reports only the status as the code ("404").
    if code == "NoSuchBucket" or (operation == "HeadBucket" and status == 404):
        create = " (tlray does not create buckets)" if key.startswith("output") else ""
        return S3Error(
            f"{key}: bucket '{bucket}' does not exist{where}; check the bucket name in {uri}, "
            f"or create the bucket first{create}"
        )
    if code in ("NoSuchKey", "404", "NotFound") or status == 404:
        return S3Error(f"{key}: {uri} does not exist{where}; check the path (keys are case-sensitive)")
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired"):
        return S3Error(f"{key}: the store rejected the AWS credentials in use ({code}) for {uri}; {CREDENTIALS_HINT}")
    if code in ("AccessDenied", "Forbidden", "403", "AllAccessDisabled") or status == 403:
        return S3Error(
            f"{key}: access denied to {uri}{where} ({code}): the credentials in use may not list or "
            f"read bucket '{bucket}'; grant them s3:ListBucket and s3:GetObject (s3:PutObject for "
            "output.uri) in their IAM or the bucket's policy, or use other credentials"
        )
    if code in ("PermanentRedirect", "AuthorizationHeaderMalformed", "301") or status == 301:
        return S3Error(f"{key}: bucket '{bucket}' is in another region; set AWS_REGION to the bucket's region")
    if code in ("SlowDown", "ServiceUnavailable", "Throttling", "RequestTimeout") or status >= 500:
        return S3Error(
            f"{key}: the S3 store kept failing requests for {uri}{where} ({code or status}, HTTP {status}) "
            f"after {max_attempts} attempt(s); it is throttled or unavailable: try again later"
        )
    message = e.response.get("Error", {}).get("Message", "")
    return S3Error(f"{key}: S3 {operation} on {uri}{where} failed: {code} {message}".rstrip())
