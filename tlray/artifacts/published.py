"""Loading a published model: the run MODEL names (a run, or a job's latest.json), each file checked against
its MANIFEST.json before use. `tlray evaluate`, `tlray predict`, the champion gate and a warm start share it."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import torch

from tlray.artifacts import champion
from tlray.artifacts.manifest import FORMAT_VERSION, ManifestError, read_run_manifest, read_verified
from tlray.data.preprocessing import Preprocessing
from tlray.errors import UserError
from tlray.io import storage


@dataclass(frozen=True)
class PublishedModel:
    run: str
    metadata: dict
    program: bytes  # model/model.pt2, verified against MANIFEST.json
    manifest: dict

    def read(self, path: str, endpoint_url: str | None = None) -> bytes:
        """Another file of the run, verified against its manifest."""
        return read_verified(self.run, path, self.manifest, endpoint_url)

    @property
    def classes(self) -> list[str]:
        return list(self.metadata["classes"])

    @property
    def preprocessing(self) -> Preprocessing:
        p = self.metadata["preprocessing"]
        return Preprocessing(p["resize_size"], p["crop_size"], tuple(p["mean"]), tuple(p["std"]), p["interpolation"])

    def module(self, device: torch.device | str = "cpu") -> torch.nn.Module:
        # exported in eval mode; an exported module refuses .eval()
        return torch.export.load(io.BytesIO(self.program)).module().to(device)


def resolve_run(model_uri: str, endpoint_url: str | None = None) -> str:
    """MODEL as given on the command line: a run folder or URI, or a job's latest.json (its champion)."""
    uri = storage.absolute_uri(model_uri).rstrip("/")
    if not uri.endswith(".json"):
        return uri
    job = uri.rsplit("/", 1)[0]
    try:
        pointer, _ = champion.read_pointer(job, endpoint_url) if uri.endswith(champion.LATEST) else (None, None)
    except OSError as exc:
        raise UserError(f"MODEL: cannot read {uri}: {exc}") from None
    if pointer is None:
        raise UserError(
            f"MODEL: {uri} does not exist or is not a {champion.LATEST}: no champion was published there yet"
        )
    return pointer.run


def load_published(model_uri: str, endpoint_url: str | None = None) -> PublishedModel:
    """The run's metadata and exported program, each checked against MANIFEST.json (exit 2 if anything is off)."""
    run = resolve_run(model_uri, endpoint_url)
    manifest = read_run_manifest(run, endpoint_url)
    metadata = json.loads(read_verified(run, "metadata.json", manifest, endpoint_url))
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ManifestError(
            f"{run}: metadata.json has format version {metadata.get('format_version')!r}; this tlray reads "
            f"version {FORMAT_VERSION}"
        )
    program = read_verified(run, metadata["files"]["program"], manifest, endpoint_url)
    return PublishedModel(run, metadata, program, manifest)
