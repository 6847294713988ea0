"""Loading a published model refuses what this tlray cannot read."""

from __future__ import annotations

import pytest

from tlray.artifacts.manifest import FORMAT_VERSION, ManifestError, write_manifest
from tlray.artifacts.published import load_published
from tlray.errors import UserError
from tlray.io import storage

from run_fixtures import fake_run


def test_a_metadata_version_this_tlray_cannot_read_is_refused(tmp_path):
    run = fake_run(str(tmp_path / "job" / "runs" / "a"), sealed=False)
    storage.write_json(f"{run}/metadata.json", {"format_version": FORMAT_VERSION + 1, "run_id": "a"})
    write_manifest(run)
    with pytest.raises(ManifestError, match=f"metadata.json has format version {FORMAT_VERSION + 1}"):
        load_published(run)
    with pytest.raises(UserError, match="no champion was published there yet"):
        load_published(str(tmp_path / "job" / "latest.json"))
