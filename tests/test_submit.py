"""`ray job submit` to a running Ray cluster, with the exact entrypoint of the RayJob manifest.

A RayJob's submitter uploads the mounted spec folder as the job's working dir and runs
`tlray train|tune job.yaml` in it; here a local head (loopback, Ray 2.60's token auth) gets the
same command with `--working-dir` holding the spec as job.yaml.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from tlray import k8s
from tlray.data import build_index
from tlray.publish import run_uri
from tlray.spec import load_spec

from conftest import ROOT, spec_dict, write_image_folder, write_spec

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_runs_the_rayjob_entrypoint_and_publishes(tmp_path):
    data = write_image_folder(tmp_path / "images", classes=3, per_class=10)
    spec_path = write_spec(
        tmp_path / "spec.yaml",
        spec_dict(
            str(data),
            str(tmp_path / "out"),
            name="submitted",
            train={"epochs": 1, "batch_size": 8},
            scaling={"num_workers": 1, "cpus_per_worker": 0.5},
        ),
    )
    spec = load_spec(spec_path)
    (rayjob,) = [o for o in k8s.render(spec, spec_path.read_text(), "tlray:test") if o["kind"] == "RayJob"]
    entrypoint = rayjob["spec"]["entrypoint"]
    assert entrypoint == "tlray train job.yaml"
    assert yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"]) == {"working_dir": k8s.SPEC_DIR}
    working_dir = tmp_path / "submit"
    working_dir.mkdir()
    (working_dir / k8s.SPEC_FILE).write_text(spec_path.read_text())  # what the ConfigMap mount holds

    gcs, dashboard = free_port(), free_port()
    env = {
        **os.environ,
        "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }
    client_env = {**env, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard}", "RAY_AUTH_MODE": "token"}
    started = subprocess.run(
        [
            "ray",
            "start",
            "--head",
            "--num-cpus",
            "2",
            "--port",
            str(gcs),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dashboard),
            "--disable-usage-stats",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        submitted = subprocess.run(
            ["ray", "job", "submit", "--working-dir", str(working_dir), "--", *shlex.split(entrypoint)],
            env=client_env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        output = submitted.stdout + submitted.stderr
        assert submitted.returncode == 0 and "succeeded" in output, output[-4000:]
    finally:
        subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)

    run = Path(run_uri(spec, build_index(spec.dataset)))
    metadata = json.loads((run / "metadata.json").read_text())
    assert (run / "model" / "model.pt2").stat().st_size > 0
    assert metadata["classes"] == ["class_0", "class_1", "class_2"] and metadata["metrics"]["epoch"] == 1
