"""MANIFEST.json: what a complete run holds, byte for byte.

It is written last, so a run folder without one is incomplete (killed mid-publish, or still training):
nothing loads it and the champion pointer never names it. Loaders check each file they read against it,
so a file changed or damaged after publishing is refused rather than used.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone

import tlray
from tlray.console import LOG_FILE
from tlray.errors import UserError
from tlray.io import storage

MANIFEST = "MANIFEST.json"
FORMAT_VERSION = 1  # of metadata.json and MANIFEST.json; loaders refuse versions they do not know
# Not part of the published artifact: Ray's resume state (pruned and rewritten by Ray) and the search
# report (redrawn at any time by `tlray report`).
UNSEALED_PREFIXES = ("train/", "search/", "trials/", "report/")
# ... nor the run's Ray log (a local run's `<run>/ray.log`), which Ray goes on writing after the run is sealed
UNSEALED_FILES = (LOG_FILE,)


class ManifestError(UserError):
    """A run that is incomplete, altered, or from a tlray that wrote another format: exit 2."""


def utc_timestamp() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_manifest(run: str, endpoint_url: str | None = None) -> dict:
    """List every published file of `run` with its size and sha256 (of the stored bytes, so an upload
    that went wrong shows), as MANIFEST.json, written last."""
    files = {
        path: {"size": size, "sha256": storage.sha256_of(storage.join(run, path), endpoint_url)}
        for path, size in sorted(storage.list_tree(run, endpoint_url).items())
        if path != MANIFEST and path not in UNSEALED_FILES and not path.startswith(UNSEALED_PREFIXES)
    }
    manifest = {"format_version": FORMAT_VERSION, "created_at": utc_timestamp(), "files": files}
    storage.write_json(storage.join(run, MANIFEST), manifest, endpoint_url)
    return manifest


def read_run_manifest(run: str, endpoint_url: str | None = None) -> dict:
    """The run's manifest, or ManifestError when it has none (an incomplete run) or one of another format."""
    try:
        manifest = json.loads(storage.read_bytes(storage.join(run, MANIFEST), endpoint_url))
    except FileNotFoundError:
        raise ManifestError(
            f"{run} has no {MANIFEST}: the run is incomplete (still training, or stopped before it was published); "
            "give a finished run, or its job's latest.json"
        ) from None
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{run}: cannot read {MANIFEST}: {exc}") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ManifestError(
            f"{run}: {MANIFEST} has format version {manifest.get('format_version')!r}; this tlray "
            f"({tlray.__version__}) reads version {FORMAT_VERSION}: use the tlray that wrote it"
        )
    return manifest


def read_verified(run: str, path: str, manifest: dict, endpoint_url: str | None = None) -> bytes:
    """One file of a sealed run, checked against the manifest before anyone uses it."""
    entry = manifest["files"].get(path)
    if entry is None:
        raise ManifestError(f"{run}: {path} is not in its {MANIFEST}; the run is not one tlray published")
    try:
        data = storage.read_bytes(storage.join(run, path), endpoint_url)
    except FileNotFoundError:
        raise ManifestError(f"{run}: {path} is listed in {MANIFEST} but missing; the run was altered") from None
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != entry["size"] or digest != entry["sha256"]:
        raise ManifestError(
            f"{run}: {path} does not match its {MANIFEST} (sha256 {digest[:12]}…, expected {entry['sha256'][:12]}…); "
            "the file was changed or damaged after publishing"
        )
    return data


def is_sealed(run: str, endpoint_url: str | None = None) -> bool:
    """A manifest is there and every file it lists has the size it says (sizes: cheap, no download)."""
    try:
        manifest = read_run_manifest(run, endpoint_url)
    except ManifestError:
        return False
    sizes = storage.list_tree(run, endpoint_url)
    return all(sizes.get(path) == entry["size"] for path, entry in manifest["files"].items())


def manifest_digest(run: str, endpoint_url: str | None = None) -> str:
    """sha256 of the MANIFEST.json bytes: names one exact published artifact (latest.json records it)."""
    return hashlib.sha256(storage.read_bytes(storage.join(run, MANIFEST), endpoint_url)).hexdigest()
