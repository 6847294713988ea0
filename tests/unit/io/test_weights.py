"""tlray.io.weights against a loopback moto server: cache keyed by object version, racing fetches, bad downloads."""

from __future__ import annotations

import os
import re
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tlray.errors import UserError
from tlray.io import weights

from s3_fixtures import raw_client


@pytest.fixture(autouse=True)
def cache_in_tmp_path(tmp_path, monkeypatch) -> Path:
    """tempfile.gettempdir() is this test's own folder, so the cache starts empty and is not shared."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path / weights.CACHE_FOLDER


@pytest.fixture
def checkpoint(s3_env, s3_bucket):
    """put(data) writes the checkpoint; its URI is `checkpoint.uri`."""

    class Checkpoint:
        uri = f"s3://{s3_bucket}/models/best.pt"

        @staticmethod
        def put(data: bytes) -> None:
            raw_client(s3_env).put_object(Bucket=s3_bucket, Key="models/best.pt", Body=data)

    return Checkpoint


def count_reads(monkeypatch, transform=None) -> list[int]:
    """Wrap weights.read_object; transform(call number, bytes) may change what the download sees."""
    original, calls = weights.read_object, []

    def read(stored, endpoint_url):
        calls.append(len(calls))
        data = b"".join(original(stored, endpoint_url))
        yield transform(len(calls), data) if transform else data

    monkeypatch.setattr(weights, "read_object", read)
    return calls


def files_in(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# ---------------------------------------------------------------------------------------
# Pass-through
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("given", [None, "", "imagenet", "/models/local.pt", "relative/best.pt"])
def test_weights_that_are_not_in_s3_pass_through_unchanged(given, cache_in_tmp_path):
    assert weights.fetch_weights(given, "http://127.0.0.1:9") == given
    assert not cache_in_tmp_path.exists()


# ---------------------------------------------------------------------------------------
# The cache follows the object's version
# ---------------------------------------------------------------------------------------
def test_a_fetched_checkpoint_is_cached_under_the_tmp_folder(s3_env, checkpoint, cache_in_tmp_path, monkeypatch):
    checkpoint.put(b"version one")
    calls = count_reads(monkeypatch)

    first = weights.fetch_weights(checkpoint.uri, s3_env)
    again = weights.fetch_weights(checkpoint.uri, s3_env)

    assert first == again
    assert Path(first).parent == cache_in_tmp_path
    assert Path(first).read_bytes() == b"version one"
    assert len(calls) == 1  # the second fetch was one HEAD and no GET


def test_a_checkpoint_overwritten_at_the_same_uri_is_fetched_again(s3_env, checkpoint, monkeypatch):
    checkpoint.put(b"version one")
    old = weights.fetch_weights(checkpoint.uri, s3_env)
    checkpoint.put(b"version two, longer")

    new = weights.fetch_weights(checkpoint.uri, s3_env)

    assert new != old
    assert Path(new).read_bytes() == b"version two, longer"
    assert Path(old).read_bytes() == b"version one"  # left alone: another process may still be loading it


def test_in_a_versioned_bucket_the_same_bytes_written_again_are_a_new_version(s3_env, s3_bucket, checkpoint):
    raw_client(s3_env).put_bucket_versioning(Bucket=s3_bucket, VersioningConfiguration={"Status": "Enabled"})
    checkpoint.put(b"same bytes")
    old = weights.fetch_weights(checkpoint.uri, s3_env)
    checkpoint.put(b"same bytes")  # same ETag, new VersionId

    new = weights.fetch_weights(checkpoint.uri, s3_env)

    assert new != old
    assert Path(new).read_bytes() == b"same bytes"


# ---------------------------------------------------------------------------------------
# Racing fetches
# ---------------------------------------------------------------------------------------
def test_eight_threads_fetching_at_once_get_one_complete_file(s3_env, checkpoint, cache_in_tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 17)
    checkpoint.put(data)
    start = threading.Barrier(8)

    def fetch(_):
        start.wait()
        return weights.fetch_weights(checkpoint.uri, s3_env)

    with ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(fetch, range(8)))

    assert len(set(paths)) == 1
    assert Path(paths[0]).read_bytes() == data
    assert files_in(cache_in_tmp_path) == [Path(paths[0]).name]  # no temporary file left behind


# ---------------------------------------------------------------------------------------
# Truncated and corrupt files
# ---------------------------------------------------------------------------------------
def test_a_truncated_cached_file_is_fetched_again(s3_env, checkpoint, cache_in_tmp_path, monkeypatch):
    data = os.urandom(100_000)
    checkpoint.put(data)
    path = weights.fetch_weights(checkpoint.uri, s3_env)
    os.truncate(path, 40_000)
    calls = count_reads(monkeypatch)

    assert weights.fetch_weights(checkpoint.uri, s3_env) == path
    assert Path(path).read_bytes() == data
    assert len(calls) == 1
    assert files_in(cache_in_tmp_path) == [Path(path).name]


def test_a_short_download_is_retried(s3_env, checkpoint, cache_in_tmp_path, monkeypatch):
    data = os.urandom(50_000)
    checkpoint.put(data)
    calls = count_reads(monkeypatch, lambda call, body: body[:-1000] if call == 1 else body)

    path = weights.fetch_weights(checkpoint.uri, s3_env)

    assert Path(path).read_bytes() == data
    assert len(calls) == 2
    assert files_in(cache_in_tmp_path) == [Path(path).name]


def test_a_download_with_the_wrong_md5_is_retried(s3_env, checkpoint, monkeypatch):
    data = os.urandom(50_000)
    checkpoint.put(data)

    def flip_first_byte_once(call: int, body: bytes) -> bytes:
        return bytes([body[0] ^ 0xFF]) + body[1:] if call == 1 else body

    calls = count_reads(monkeypatch, flip_first_byte_once)

    path = weights.fetch_weights(checkpoint.uri, s3_env)

    assert Path(path).read_bytes() == data
    assert len(calls) == 2


def test_a_checkpoint_replaced_between_head_and_get_is_fetched_in_its_new_version(s3_env, checkpoint, monkeypatch):
    checkpoint.put(b"version one")
    original_head, heads = weights.head, []

    def head_then_overwrite(uri, endpoint_url):
        heads.append(original_head(uri, endpoint_url))
        if len(heads) == 1:
            checkpoint.put(b"version two")  # the GET pinned to the first ETag now fails with 412
        return heads[-1]

    monkeypatch.setattr(weights, "head", head_then_overwrite)

    path = weights.fetch_weights(checkpoint.uri, s3_env)

    assert Path(path).read_bytes() == b"version two"
    assert Path(path).name == heads[1].cache_name != heads[0].cache_name


def test_a_download_that_is_always_short_is_a_user_error_naming_the_uri(
    s3_env, checkpoint, cache_in_tmp_path, monkeypatch
):
    checkpoint.put(b"x" * 5000)
    calls = count_reads(monkeypatch, lambda call, body: body[:4000])

    with pytest.raises(UserError) as caught:
        weights.fetch_weights(checkpoint.uri, s3_env)

    expected = f"model.weights: cannot read {checkpoint.uri}: downloaded 4000 bytes, the object has 5000 (2 attempts)"
    assert str(caught.value) == expected
    assert len(calls) == weights.ATTEMPTS == 2
    assert files_in(cache_in_tmp_path) == []  # neither a cache file nor a temporary one


def test_a_missing_checkpoint_is_a_user_error_naming_the_uri(s3_env, s3_bucket):
    uri = f"s3://{s3_bucket}/models/missing.pt"
    with pytest.raises(UserError, match=rf"^model\.weights: cannot read {re.escape(uri)}: .*404"):
        weights.fetch_weights(uri, s3_env)


# ---------------------------------------------------------------------------------------
# The run plan's identity
# ---------------------------------------------------------------------------------------
def test_a_checkpoint_replaced_after_the_run_was_planned_is_refused(checkpoint, s3_env, s3_bucket):
    import hashlib

    checkpoint.put(b"version one")
    planned = weights.identity(weights.head(checkpoint.uri, s3_env))
    assert planned == f"etag {hashlib.md5(b'version one').hexdigest()}"
    assert Path(weights.fetch_weights(checkpoint.uri, s3_env, planned)).read_bytes() == b"version one"

    checkpoint.put(b"version two")
    with pytest.raises(UserError) as error:
        weights.fetch_weights(checkpoint.uri, s3_env, planned)
    now = f"etag {hashlib.md5(b'version two').hexdigest()}"
    assert str(error.value).startswith(f"model.weights: {checkpoint.uri} changed since this run was planned")
    assert f"({planned}, now {now})" in str(error.value)
