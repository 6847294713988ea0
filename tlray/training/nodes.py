"""Nothing assumes one machine: on a cluster of several nodes, every local path a run uses must be the same
file on every node, since workers and Ray Data tasks read and write it wherever they run.

One tiny task per node checks it before training: a sample image and the weights file are there with the
driver's size, and the output folder holds the marker file the driver just wrote (the same folder, not one
that only happens to exist). S3 URIs need no check; a manifest is read by the driver alone.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from tlray.errors import UserError
from tlray.io import storage

MARKER_PREFIX = ".tlray-node-check-"


@dataclass(frozen=True)
class LocalPath:
    key: str  # the spec key that names it
    path: str  # absolute
    size: int | None  # what the driver sees; None for the output folder
    marker: str | None = None  # the output folder: a file the driver wrote in it


def local_paths(spec, index) -> list[LocalPath]:
    """The run's local files and folders, as the driver sees them (empty when everything is in S3)."""
    paths = []
    if index.train and not storage.is_s3(index.root):
        sample = index.location(index.train[0][0])
        paths.append(LocalPath("dataset.uri", sample, Path(sample).stat().st_size))
    weights = spec.model.builder_weights
    if weights and not storage.is_s3(weights) and Path(weights).is_file():
        path = storage.absolute_uri(weights)
        paths.append(LocalPath("model.weights", path, Path(path).stat().st_size))
    if not storage.is_s3(spec.output.uri):
        paths.append(LocalPath("output.uri", storage.absolute_uri(spec.output.uri), None))
    return paths


def problems_here(paths: list[LocalPath]) -> list[str]:
    """Run on each node: what of `paths` this node cannot read (or write, for the output folder)."""
    found = []
    for p in paths:
        if p.marker is not None:
            if not Path(p.path, p.marker).is_file():
                found.append(f"{p.key}: {p.path} is not the driver's folder here (its marker file is missing)")
            elif not os.access(p.path, os.W_OK):
                found.append(f"{p.key}: {p.path} is not writable here")
        elif not Path(p.path).is_file():
            found.append(f"{p.key}: {p.path} does not exist here")
        elif Path(p.path).stat().st_size != p.size or not os.access(p.path, os.R_OK):
            found.append(f"{p.key}: {p.path} here is not the driver's file ({Path(p.path).stat().st_size} bytes)")
    return found


def check_every_node_sees_local_paths(spec, index) -> None:
    """Exit 2 before training when a node of a multi-node cluster cannot see a local path of the run."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    paths = local_paths(spec, index)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if not paths or len(nodes) < 2:
        return
    marker = f"{MARKER_PREFIX}{uuid.uuid4().hex}"
    paths = [LocalPath(p.key, p.path, p.size, marker) if p.key == "output.uri" else p for p in paths]
    output = next((p for p in paths if p.key == "output.uri"), None)
    if output:
        Path(output.path).mkdir(parents=True, exist_ok=True)
        Path(output.path, marker).write_text("written by the tlray driver; removed after the check\n")
    probe = ray.remote(num_cpus=0, max_retries=0)(problems_here)
    try:
        answers = ray.get(
            [
                probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(paths)
                for n in nodes
            ]
        )
    finally:
        if output:
            Path(output.path, marker).unlink(missing_ok=True)
    lines = [
        f"  node {n['NodeManagerAddress']} (Ray node {n['NodeID'][:12]}): {problem}"
        for n, found in zip(nodes, answers, strict=True)
        for problem in found
    ]
    if lines:
        raise UserError(
            f"the cluster has {len(nodes)} nodes, and local paths of this run are not the same on all of them:\n"
            + "\n".join(lines)
            + "\nWorkers and data tasks run on every node: use s3:// URIs, or mount one shared filesystem at the "
            "same path on every node."
        )
