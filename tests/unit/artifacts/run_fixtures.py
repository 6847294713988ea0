"""Stand-ins for published runs: the files a run has, tiny, sealed by a real MANIFEST.json."""

from __future__ import annotations

from tlray.artifacts.manifest import FORMAT_VERSION, write_manifest
from tlray.io import storage


def fake_run(uri: str, endpoint: str | None = None, content: bytes = b"weights", sealed: bool = True) -> str:
    """A run folder with the files a published run has (tiny stand-ins), sealed by manifest.write_manifest."""
    storage.write_bytes(storage.join(uri, "model", "model.pt2"), content, endpoint)
    storage.write_json(storage.join(uri, "metrics.json"), {"history": []}, endpoint)
    storage.write_json(
        storage.join(uri, "metadata.json"),
        {
            "format_version": FORMAT_VERSION,
            "run_id": uri.rsplit("/", 1)[-1],
            "dataset": {"fingerprint": "f" * 64},
        },
        endpoint,
    )
    storage.write_bytes(storage.join(uri, "train", "epoch_0001", "state.pt"), b"resume state", endpoint)
    if sealed:
        write_manifest(uri, endpoint)
    return uri
