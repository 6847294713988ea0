"""MANIFEST.json: what it lists, and loaders refusing a run without one, of another format, or altered; on a
local folder and on loopback S3 (moto's server)."""

from __future__ import annotations

import hashlib
import json

import pytest

from tlray.artifacts.manifest import ManifestError, is_sealed, read_run_manifest, read_verified

from run_fixtures import fake_run
from s3_fixtures import raw_client


# ---------------------------------------------------------------------------------------
# MANIFEST.json
# ---------------------------------------------------------------------------------------
def test_manifest_lists_every_published_file_and_loaders_check_it(tmp_path):
    run = fake_run(str(tmp_path / "runs" / "a"))
    manifest = read_run_manifest(run)
    assert sorted(manifest["files"]) == ["metadata.json", "metrics.json", "model/model.pt2"]  # not train/
    assert manifest["files"]["model/model.pt2"] == {"size": 7, "sha256": hashlib.sha256(b"weights").hexdigest()}
    assert read_verified(run, "model/model.pt2", manifest) == b"weights"
    assert is_sealed(run)

    (tmp_path / "runs" / "a" / "model" / "model.pt2").write_bytes(b"weightz")  # same size, other bytes
    with pytest.raises(ManifestError, match="does not match its MANIFEST.json"):
        read_verified(run, "model/model.pt2", manifest)


def test_the_runs_ray_log_is_not_sealed_and_growing_after_the_manifest_leaves_the_run_sealed(tmp_path):
    log = tmp_path / "a" / "ray.log"  # a local run's Ray log, which Ray writes until the process ends
    log.parent.mkdir()
    log.write_text("started\n")
    run = fake_run(str(tmp_path / "a"))
    assert sorted(read_run_manifest(run)["files"]) == ["metadata.json", "metrics.json", "model/model.pt2"]
    log.write_text("started\nshutting down\n")
    assert is_sealed(run)


def test_a_run_without_manifest_or_of_another_format_is_refused(tmp_path):
    unsealed = fake_run(str(tmp_path / "b"), sealed=False)
    with pytest.raises(ManifestError, match="has no MANIFEST.json: the run is incomplete"):
        read_run_manifest(unsealed)
    assert not is_sealed(unsealed)
    future = fake_run(str(tmp_path / "c"))
    manifest = json.loads((tmp_path / "c" / "MANIFEST.json").read_text())
    (tmp_path / "c" / "MANIFEST.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ManifestError, match="format version 99"):
        read_run_manifest(future)


def test_manifest_on_s3_hashes_the_stored_bytes(s3_env, s3_bucket):
    run = fake_run(f"s3://{s3_bucket}/job/runs/a", s3_env, content=b"x" * 100_000)
    manifest = read_run_manifest(run, s3_env)
    assert manifest["files"]["model/model.pt2"]["size"] == 100_000
    assert read_verified(run, "model/model.pt2", manifest, s3_env) == b"x" * 100_000
    raw_client(s3_env).put_object(Bucket=s3_bucket, Key="job/runs/a/model/model.pt2", Body=b"y" * 100_000)
    with pytest.raises(ManifestError, match="model/model.pt2 does not match"):
        read_verified(run, "model/model.pt2", manifest, s3_env)
