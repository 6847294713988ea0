"""What the per-node task checks (tests/e2e/test_faults.py runs it on a node that cannot see the run's folder)."""

from __future__ import annotations

import dataclasses

from tlray.data.index import build_index
from tlray.spec import JobSpec
from tlray.training import nodes

from conftest import spec_dict, write_image_folder


def test_local_paths_are_a_sample_image_the_weights_and_the_output_folder(tmp_path):
    data = write_image_folder(tmp_path / "images")
    (tmp_path / "w.pt").write_bytes(b"12345")
    spec = JobSpec.model_validate(
        spec_dict(
            str(data),
            str(tmp_path / "out"),
            model={"arch": "resnet18", "weights": str(tmp_path / "w.pt"), "mode": "partial", "freeze_depth": 1},
        )
    )
    index = build_index(spec.dataset)
    paths = nodes.local_paths(spec, index)
    sample = index.location(index.train[0][0])
    assert [(p.key, p.path, p.size) for p in paths] == [
        ("dataset.uri", sample, (data / index.train[0][0]).stat().st_size),
        ("model.weights", str(tmp_path / "w.pt"), 5),
        ("output.uri", str(tmp_path / "out"), None),
    ]
    s3_spec = JobSpec.model_validate(spec_dict("s3://b/images", "s3://b/out"))
    assert nodes.local_paths(s3_spec, dataclasses.replace(index, root="s3://b/images")) == []


def test_problems_name_each_path_a_node_cannot_use(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "marker").write_text("x")
    (tmp_path / "w.pt").write_bytes(b"12345")
    same = [
        nodes.LocalPath("model.weights", str(tmp_path / "w.pt"), 5),
        nodes.LocalPath("output.uri", str(tmp_path / "out"), None, "marker"),
    ]
    assert nodes.problems_here(same) == []
    other = [
        nodes.LocalPath("dataset.uri", str(tmp_path / "missing.png"), 3),
        nodes.LocalPath("model.weights", str(tmp_path / "w.pt"), 6),
        nodes.LocalPath("output.uri", str(tmp_path / "out"), None, "another-marker"),
    ]
    assert nodes.problems_here(other) == [
        f"dataset.uri: {tmp_path / 'missing.png'} does not exist here",
        f"model.weights: {tmp_path / 'w.pt'} here is not the driver's file (5 bytes)",
        f"output.uri: {tmp_path / 'out'} is not the driver's folder here (its marker file is missing)",
    ]
