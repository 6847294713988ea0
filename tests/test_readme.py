"""Every shell command the README shows is run here, as a user would type it (litgpt's test_readme)."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow

# `make test` is the command that runs this very test; everything else in a bash block runs.
RUNS_THIS_SUITE = "make test"


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_quick_start_is_the_two_make_commands():
    assert bash_blocks()[0].split("\n")[:2] == ["make demo", RUNS_THIS_SUITE]
    assert RUNS_THIS_SUITE in (ROOT / ".ci" / "run").read_text()


def test_every_readme_command_runs():
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    try:
        for block in bash_blocks():
            script = "\n".join(line for line in block.splitlines() if line.strip() != RUNS_THIS_SUITE)
            done = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", script],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=900,
            )
            assert done.returncode == 0, f"README block failed:\n{block}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
            if "make demo" in block:
                assert re.search(r"digits val_accuracy 0\.9\d+ after 6 epochs", done.stdout), done.stdout[-2000:]
            if "ray job submit" in block:
                assert "succeeded" in done.stdout + done.stderr
    finally:
        subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_cluster_commands_name_what_exists():
    """The README's cluster-only commands (```console) cannot run here; what they name must exist and is
    rendered and validated by tests/test_k8s.py."""
    text = (ROOT / "README.md").read_text()
    consoles = "\n".join(re.findall(r"```console\n(.*?)```", text, flags=re.S))
    for path in re.findall(r"kubectl apply -k (\S+)", consoles):
        assert (ROOT / path / "kustomization.yaml").is_file(), path
    assert "kubectl apply -k k8s/overlays/gpu-prod" in consoles
    for overlay in (ROOT / "k8s" / "overlays").iterdir():
        assert f"kubectl kustomize k8s/overlays/{overlay.name}" in text, f"README previews {overlay.name}"
        assert (overlay / "README.md").is_file()
