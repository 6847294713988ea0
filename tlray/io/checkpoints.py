"""Training checkpoints: each one sealed, and a resume from the newest complete one in the run's storage.

Ray Train records a checkpoint only once its controller has taken the worker's report. A driver stopped
between the upload and that record (SIGTERM on preemption, SIGKILL, a lost head node) leaves a complete
checkpoint Ray never heard of; an upload cut off part-way leaves a partial one. So every checkpoint carries a
seal, written after its state file: the state's size and SHA-256. A run resumes from the newest checkpoint in
its storage whose state matches its seal, which is never older than the one Ray recorded.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from tlray.io import storage

STATE_FILE = "state.pt"
SEAL_FILE = "sealed.json"
EPOCH_FOLDER = re.compile(r"^epoch_(\d{4,})$")


def folder_name(epoch: int) -> str:
    """The folder of the checkpoint taken after 0-based `epoch` (Ray names it after the report's argument)."""
    return f"epoch_{epoch + 1:04d}"


def write(state: dict, folder: str | Path) -> None:
    """`state` (its "epoch" 0-based) into the local `folder`: the state file, then its seal."""
    data, seal = encode(state)
    Path(folder, STATE_FILE).write_bytes(data)
    Path(folder, SEAL_FILE).write_text(seal)


def store(state: dict, checkpoints_uri: str, endpoint_url: str | None) -> str:
    """`state` straight into its epoch's folder under `checkpoints_uri` (local or S3), the seal last; its URI."""
    folder = storage.join(checkpoints_uri, folder_name(state["epoch"]))
    data, seal = encode(state)
    storage.write_bytes(storage.join(folder, STATE_FILE), data, endpoint_url)
    storage.write_bytes(storage.join(folder, SEAL_FILE), seal.encode(), endpoint_url)
    return folder


def encode(state: dict) -> tuple[bytes, str]:
    """(the state file's bytes, its seal: the epoch, the size and SHA-256 of those bytes)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    seal = {"epoch": state["epoch"] + 1, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return data, json.dumps(seal)


def prune(checkpoints_uri: str, endpoint_url: str | None, keep: set[int]) -> None:
    """Delete the checkpoints under `checkpoints_uri` but those of the 1-based epochs in `keep`."""
    files = storage.list_tree(checkpoints_uri, endpoint_url)
    dropped = {name for name, epoch in epoch_folders(files).items() if epoch not in keep}
    for rel in files:
        if rel.split("/", 1)[0] in dropped:
            storage.delete_file(storage.join(checkpoints_uri, rel), endpoint_url)


def epoch_folders(files: dict[str, int]) -> dict[str, int]:
    """The checkpoint folders in a listing of a trainer's storage folder (paths relative to it): name -> epoch."""
    return {top: int(m[1]) for rel in files if (m := EPOCH_FOLDER.match(top := rel.split("/", 1)[0]))}


@dataclass(frozen=True)
class Found:
    state: dict
    folder: str  # its URI
    skipped: tuple[str, ...]  # newer checkpoint folders that were not complete, each with the reason


def newest_complete(checkpoints_uri: str, endpoint_url: str | None, map_location="cpu") -> Found | None:
    """The newest checkpoint under `checkpoints_uri` (a trainer's storage folder) whose state matches its seal."""
    files = storage.list_tree(checkpoints_uri, endpoint_url)
    folders = sorted(epoch_folders(files), reverse=True)
    skipped = []
    for name in folders:
        folder = storage.join(checkpoints_uri, name)
        state, problem = read_sealed(folder, name, files, endpoint_url, map_location)
        if state is not None:
            return Found(state, folder, tuple(skipped))
        skipped.append(f"{name} ({problem})")
    return None


def read_epoch(checkpoints_uri: str, epoch: int, endpoint_url: str | None, map_location="cpu") -> dict:
    """The state of 0-based `epoch`'s checkpoint under `checkpoints_uri`, checked against its seal."""
    name = folder_name(epoch)
    files = storage.list_tree(checkpoints_uri, endpoint_url)
    state, problem = read_sealed(storage.join(checkpoints_uri, name), name, files, endpoint_url, map_location)
    if state is None:
        raise RuntimeError(f"checkpoint {storage.join(checkpoints_uri, name)}: {problem}")
    return state


def read_sealed(folder: str, name: str, files: dict[str, int], endpoint_url: str | None, map_location):
    """(state, None) when the folder's state matches its seal, else (None, what is wrong). `files`: the listing
    of the storage folder above, by path relative to it (`name` is the folder's)."""
    if f"{name}/{SEAL_FILE}" not in files:
        return None, "no seal: its upload did not finish"
    seal = storage.read_json(storage.join(folder, SEAL_FILE), endpoint_url)
    size = files.get(f"{name}/{STATE_FILE}")
    if size != seal["bytes"]:
        return None, f"{STATE_FILE} has {size or 0} of {seal['bytes']} bytes"
    data = storage.read_bytes(storage.join(folder, STATE_FILE), endpoint_url)
    if hashlib.sha256(data).hexdigest() != seal["sha256"]:
        return None, f"{STATE_FILE} does not match its SHA-256"
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=False), None
