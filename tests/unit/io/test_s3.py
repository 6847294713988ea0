"""tlray.io.s3 against a loopback moto server: URIs, listings, every error message, throttling."""

from __future__ import annotations

import pytest

from tlray.errors import UserError
from tlray.io import s3
from tlray.io.s3 import S3Error, StoredObject

import conftest
from s3_fixtures import ACCESS_DENIED, FlakyProxy, free_port, put_many, raw_client, upload_tree

if not hasattr(conftest, "s3_server"):  # until conftest.py does `from s3_fixtures import *`
    from s3_fixtures import flaky_s3, s3_bucket, s3_env, s3_server  # noqa: F401


# ---------------------------------------------------------------------------------------
# URIs
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "uri, expected",
    [
        ("s3://bucket", ("bucket", "")),
        ("s3://bucket/", ("bucket", "")),
        ("s3://bucket/a/b", ("bucket", "a/b/")),
        ("s3://bucket/a/b/", ("bucket", "a/b/")),
        ("s3://my.bucket-1/images", ("my.bucket-1", "images/")),
    ],
)
def test_split_uri(uri, expected):
    assert s3.split_uri(uri) == expected


@pytest.mark.parametrize(
    "uri", ["bucket/a", "/data/x", "S3://bucket/a", "s3://", "s3:///a", "s3://b/a", "s3://my bucket/a"]
)
def test_split_uri_rejects_malformed_uris_under_the_given_key(uri):
    with pytest.raises(S3Error, match=r"^output\.uri: .*s3://bucket/prefix"):
        s3.split_uri(uri, key="output.uri")


def test_s3_error_is_a_user_error():
    assert issubclass(S3Error, UserError)


# ---------------------------------------------------------------------------------------
# Listing and reading
# ---------------------------------------------------------------------------------------
def test_listing_gives_relative_keys_and_size_etag_versions(s3_env, s3_bucket, tmp_path):
    (tmp_path / "cats" / "deep").mkdir(parents=True)
    (tmp_path / "dogs").mkdir()
    (tmp_path / "cats" / "a.png").write_bytes(b"aaa")
    (tmp_path / "cats" / "deep" / "b.png").write_bytes(b"bbbb")
    (tmp_path / "dogs" / "c.jpg").write_bytes(b"c")
    upload_tree(s3_env, s3_bucket, "data/", tmp_path)
    raw = raw_client(s3_env)
    raw.put_object(Bucket=s3_bucket, Key="data/dogs/", Body=b"")  # console-style folder marker
    raw.put_object(Bucket=s3_bucket, Key="database/x.png", Body=b"x")  # shares "data" but not "data/"

    files = s3.list_files(f"s3://{s3_bucket}/data", s3_env)

    assert sorted(f.key for f in files) == ["cats/a.png", "cats/deep/b.png", "dogs/c.jpg"]
    etag = raw.head_object(Bucket=s3_bucket, Key="data/cats/deep/b.png")["ETag"].strip('"')
    assert StoredObject("cats/deep/b.png", f"4:{etag}") in files


def test_endpoint_comes_from_the_environment_when_not_given(s3_env, s3_bucket, monkeypatch):
    put_many(s3_env, s3_bucket, "p/", 3)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_env)
    assert len(s3.list_files(f"s3://{s3_bucket}/p/", None)) == 3


def test_ten_thousand_keys_are_listed_completely_over_several_pages(s3_env, s3_bucket):
    put_many(s3_env, s3_bucket, "many/", 10_000)
    calls = []

    def count(params, **kwargs):
        calls.append(params.get("ContinuationToken"))

    hook = s3.client(s3_env).meta.events  # the cached client list_files uses
    hook.register("before-parameter-build.s3.ListObjectsV2", count)
    try:
        files = s3.list_files(f"s3://{s3_bucket}/many", s3_env)
    finally:
        hook.unregister("before-parameter-build.s3.ListObjectsV2", count)
    assert len(files) == 10_000
    assert len({f.key for f in files}) == 10_000
    assert len(calls) >= 10  # 1,000 keys a page
    assert calls[0] is None and all(calls[1:])  # every later page continues the previous one


def test_read_bytes_returns_the_object(s3_env, s3_bucket):
    raw_client(s3_env).put_object(Bucket=s3_bucket, Key="m/manifest.csv", Body=b"path,label\n")
    assert s3.read_bytes(f"s3://{s3_bucket}/m/manifest.csv", s3_env, key="dataset.manifest") == b"path,label\n"


def test_check_writable_passes_for_an_existing_bucket_and_writes_nothing(s3_env, s3_bucket):
    s3.check_writable(f"s3://{s3_bucket}/out", s3_env)
    assert "Contents" not in raw_client(s3_env).list_objects_v2(Bucket=s3_bucket)


# ---------------------------------------------------------------------------------------
# Errors: S3Error, message starting with the key, and a hint
# ---------------------------------------------------------------------------------------
def test_missing_bucket(s3_env):
    expected = (
        r"^dataset\.uri: bucket 'no-such-bucket' does not exist at http://127\.0\.0\.1:\d+; check the bucket name"
    )
    with pytest.raises(S3Error, match=expected):
        s3.list_files("s3://no-such-bucket/data", s3_env)


def test_check_writable_on_a_missing_bucket(s3_env):
    expected = (
        r"^output\.uri: bucket 'no-such-bucket' does not exist.*create the bucket first "
        r"\(tlray does not create buckets\)"
    )
    with pytest.raises(S3Error, match=expected):
        s3.check_writable("s3://no-such-bucket/runs", s3_env)


def test_empty_prefix(s3_env, s3_bucket):
    put_many(s3_env, s3_bucket, "other/", 2)
    raw_client(s3_env).put_object(Bucket=s3_bucket, Key="data/", Body=b"")  # only a folder marker
    with pytest.raises(S3Error, match=rf"^dataset\.uri: s3://{s3_bucket}/data/ is empty.*upload the data first"):
        s3.list_files(f"s3://{s3_bucket}/data", s3_env)


def test_no_credentials(s3_env, s3_bucket, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    (tmp_path / "credentials").write_text("")
    (tmp_path / "config").write_text("")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    s3.clear_client_cache()
    with pytest.raises(S3Error) as info:
        s3.list_files(f"s3://{s3_bucket}/data", s3_env, max_attempts=1)
    message = str(info.value)
    assert message.startswith("dataset.uri: no AWS credentials found")
    for hint in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "IRSA", "EKS Pod Identity"):
        assert hint in message


def test_missing_profile(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_PROFILE", "nope")
    with pytest.raises(S3Error, match=r"^dataset\.uri: .*nope.*AWS_PROFILE"):
        s3.list_files("s3://bucket/data", s3_env)


def test_access_denied(s3_env):
    # moto's server enforces bucket policies only with IAM authentication switched on for the
    # whole process (INITIAL_NO_AUTH_ACTION_COUNT), which would break every other test: a
    # stub store that answers 403 AccessDenied to everything stands in for it.
    with FlakyProxy(s3_env, fail_ratio=1.0, fail_status=403, fail_body=ACCESS_DENIED) as denied:
        expected = (
            r"^dataset\.uri: access denied to s3://bucket/data at http://127\.0\.0\.1:\d+ \(AccessDenied\)"
            r".*s3:ListBucket"
        )
        with pytest.raises(S3Error, match=expected):
            s3.list_files("s3://bucket/data", denied.endpoint)
        with pytest.raises(S3Error, match=r"^output\.uri: access denied .*\(403\)"):  # HEAD: no body
            s3.check_writable("s3://bucket/runs", denied.endpoint)
        with pytest.raises(S3Error, match=r"^model\.weights: access denied .*s3:GetObject"):
            s3.read_bytes("s3://bucket/w.pt", denied.endpoint, key="model.weights")
        assert denied.failures == denied.requests == 3  # 403 is not retried


def test_unreachable_endpoint_names_it_and_the_spec_key(s3_env):
    endpoint = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(S3Error) as info:
        s3.list_files("s3://bucket/data", endpoint, max_attempts=2)
    message = str(info.value)
    assert message.startswith(f"dataset.uri: cannot reach the S3 endpoint {endpoint} (from dataset.endpoint_url)")
    assert "check dataset.endpoint_url" in message


def test_unreachable_endpoint_from_the_environment_names_the_variable(s3_env, monkeypatch):
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    with pytest.raises(
        S3Error, match=rf"^output\.uri: cannot reach the S3 endpoint {endpoint} \(from AWS_ENDPOINT_URL\)"
    ):
        s3.check_writable("s3://bucket/runs", None, max_attempts=1)


def test_missing_object(s3_env, s3_bucket):
    with pytest.raises(
        S3Error, match=rf"^dataset\.manifest: s3://{s3_bucket}/index\.csv does not exist.*case-sensitive"
    ):
        s3.read_bytes(f"s3://{s3_bucket}/index.csv", s3_env, key="dataset.manifest")


def test_read_bytes_of_a_folder(s3_env):
    with pytest.raises(S3Error, match=r"^model\.weights: s3://bkt/w/ names a folder"):
        s3.read_bytes("s3://bkt/w/", s3_env, key="model.weights")


def test_read_bytes_in_a_missing_bucket(s3_env):
    with pytest.raises(S3Error, match=r"^model\.weights: bucket 'no-such-bucket' does not exist"):
        s3.read_bytes("s3://no-such-bucket/w.pt", s3_env, key="model.weights")


# ---------------------------------------------------------------------------------------
# Throttling: botocore's standard retries ride out 503 SlowDown
# ---------------------------------------------------------------------------------------
def test_listing_and_reading_survive_throttling(s3_env, s3_bucket, flaky_s3):
    keys = put_many(s3_env, s3_bucket, "t/", 2_000)
    assert len(s3.list_files(f"s3://{s3_bucket}/t", flaky_s3.endpoint, max_attempts=10)) == 2_000
    for i, k in enumerate(keys[:50]):
        assert s3.read_bytes(f"s3://{s3_bucket}/{k}", flaky_s3.endpoint, key="dataset.uri") == str(i).encode()
    s3.check_writable(f"s3://{s3_bucket}/out", flaky_s3.endpoint)
    assert flaky_s3.failures > 0
    assert flaky_s3.requests >= 2 + 50 + 2 + flaky_s3.failures


def test_throttling_without_retries_fails_naming_the_key(s3_env, s3_bucket):
    keys = put_many(s3_env, s3_bucket, "t/", 20)
    with FlakyProxy(s3_env, fail_ratio=0.5, seed=7) as proxy:
        expected = r"^dataset\.manifest: the S3 store kept failing requests .*SlowDown, HTTP 503\) after 1 attempt\(s\)"
        with pytest.raises(S3Error, match=expected):
            for k in keys:
                s3.read_bytes(f"s3://{s3_bucket}/{k}", proxy.endpoint, key="dataset.manifest", max_attempts=1)
        with pytest.raises(S3Error, match=r"^dataset\.uri: the S3 store kept failing"):
            for _ in range(20):
                s3.list_files(f"s3://{s3_bucket}/t", proxy.endpoint, max_attempts=1)
        assert proxy.failures >= 2


def test_pyarrow_writes_and_reads_through_the_throttling_proxy(s3_env, s3_bucket, flaky_s3):
    from pyarrow import fs as pafs

    s3fs = pafs.S3FileSystem(
        endpoint_override=flaky_s3.endpoint,
        scheme="http",
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=10),
    )
    payloads = {f"{s3_bucket}/pa/{i:02d}.bin": bytes([i]) * (100 + 997 * i) for i in range(30)}
    for path, data in payloads.items():
        with s3fs.open_output_stream(path) as out:
            out.write(data)
    for path, data in payloads.items():
        with s3fs.open_input_stream(path) as f:
            assert f.read() == data
    assert flaky_s3.failures > 0
    # and boto3 sees exactly what pyarrow wrote
    listed = {f.key: f.version for f in s3.list_files(f"s3://{s3_bucket}/pa", s3_env)}
    assert {k: int(v.split(":")[0]) for k, v in listed.items()} == {
        p.split("/", 2)[2]: len(d) for p, d in payloads.items()
    }
