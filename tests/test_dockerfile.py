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

from tlray import k8s

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


def test_base_image_takes_its_digest_from_one_documented_build_arg():
    # The digest itself needs registry access (none here): `docker build --build-arg RAY_DIGEST=sha256:...`
    # pins it per build, and the header says how to look it up and set it here.
    assert "ARG RAY_DIGEST=" in DOCKERFILE
    assert "${RAY_DIGEST:+@${RAY_DIGEST}}" in DOCKERFILE
    assert "docker buildx imagetools inspect rayproject/ray:2.60.0-py311-cpu" in DOCKERFILE
