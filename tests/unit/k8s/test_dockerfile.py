"""The image, checked without building it (no Docker engine in CI): lint, versions, layer order, base pin."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from tlray.k8s import manifests as k8s

from conftest import ROOT

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11; the image and CI use 3.11

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(.*)$", DOCKERFILE, flags=re.M))


def dependencies() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {(r := Requirement(line)).name: r for line in project["dependencies"]}


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    done = subprocess.run(
        [hadolint, "--failure-threshold", "warning", str(ROOT / "Dockerfile")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "\nUSER 1000:100\n" in DOCKERFILE, "runs as the image's non-root ray user"


def test_dockerfile_and_pyproject_agree_on_ray_torch_and_python():
    args, deps = dockerfile_args(), dependencies()
    assert args["RAY_VERSION"] in deps["ray"].specifier, (
        f"Dockerfile Ray {args['RAY_VERSION']} vs pyproject {deps['ray']}"
    )
    assert args["RAY_VERSION"] == k8s.RAY_VERSION, "the manifests' rayVersion is the image's Ray"
    assert args["TORCH_VERSION"] in deps["torch"].specifier
    assert args["TORCHVISION_VERSION"] in deps["torchvision"].specifier
    python = re.fullmatch(r"py3(\d+)", args["PYTHON_TAG"])
    requires_python = SpecifierSet(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"])
    assert python and f"3.{python[1]}" in requires_python
    assert "FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-cpu" in DOCKERFILE


def test_the_second_install_keeps_the_installed_ray_and_torch():
    install = next(block for block in DOCKERFILE.split("\n\n") if "pip install -r /tmp/requirements.txt" in block)
    assert "--constraint /tmp/constraints.txt" in install
    assert "pip list --format=freeze | grep -iE '^(ray|torch|torchvision)=='" in install
    assert 'SHELL ["/bin/bash", "-o", "pipefail", "-c"]' in DOCKERFILE, "a failed grep fails the build"


def test_readme_is_not_in_the_dependency_layer():
    copies = re.findall(r"^COPY .*$", DOCKERFILE, flags=re.M)
    dependency_layer = next(c for c in copies if "pyproject.toml" in c)
    assert "README.md" not in dependency_layer
    assert DOCKERFILE.index("COPY --chown=1000:100 README.md") > DOCKERFILE.index(
        "pip install -r /tmp/requirements.txt"
    )


DIGEST = "sha256:" + "0123456789abcdef" * 4


def base_image(dockerfile: str, build_args: dict[str, str] | None = None) -> str:
    """The FROM image as a build resolves it: ARG defaults, overridden by --build-arg, expanded by a POSIX
    shell (Docker's ${VAR:+word} has the shell's meaning)."""
    args = {**dict(re.findall(r"^ARG (\w+)=(.*)$", dockerfile, flags=re.M)), **(build_args or {})}
    image = re.search(r"^FROM (\S+)", dockerfile, flags=re.M)[1]
    done = subprocess.run(["sh", "-c", f'printf %s "{image}"'], env=args, capture_output=True, text=True, check=True)
    return done.stdout


def test_base_image_takes_its_digest_from_one_documented_build_arg(tmp_path):
    assert base_image(DOCKERFILE) == "rayproject/ray:2.60.0-py311-cpu"  # empty: by tag only
    pinned = f"rayproject/ray:2.60.0-py311-cpu@{DIGEST}"
    assert base_image(DOCKERFILE, {"RAY_DIGEST": DIGEST}) == pinned  # docker build --build-arg RAY_DIGEST=...
    # the one command the header gives, run with the registry's answer stubbed: the value lands in FROM
    command = next(line for line in DOCKERFILE.splitlines() if "sed -i" in line).lstrip("# ").strip()
    assert (
        command.startswith('sed -i "s|^ARG RAY_DIGEST=') and "crane digest rayproject/ray:2.60.0-py311-cpu" in command
    )
    copy = tmp_path / "Dockerfile"
    copy.write_text(DOCKERFILE)
    (tmp_path / "crane").write_text(f"#!/bin/sh\necho {DIGEST}\n")
    (tmp_path / "crane").chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, check=True)
    filled = copy.read_text()
    assert f"\nARG RAY_DIGEST={DIGEST}\n" in filled and base_image(filled) == pinned
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    linted = subprocess.run([hadolint, "--failure-threshold", "warning", str(copy)], capture_output=True, text=True)
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_the_image_says_which_cpu_architecture_it_supports():
    assert "CPU architecture: linux/amd64 only" in DOCKERFILE
    readme = (ROOT / "README.md").read_text()
    assert "pinned by digest" not in readme.replace("not pinned by digest", "")
    assert "linux/amd64" in readme
