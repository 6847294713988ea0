"""Shared fixtures: tiny generated image folders, tiny specs, and no traffic off the machine."""

from __future__ import annotations

import os
import random
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from mlflow_fixtures import mlflow_server  # noqa: F401 — pytest fixtures
from s3_fixtures import flaky_s3, s3_bucket, s3_env, s3_server  # noqa: F401 — pytest fixtures

pytest.register_assert_rewrite("browser")  # check_renders' asserts show their values, as a test's own do

# Nothing leaves the machine: no usage statistics, and every Ray socket on loopback.
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# Frozen-prefix caches of this session stay in its own folder (Ray workers inherit the variable).
os.environ["TLRAY_CACHE_DIR"] = tempfile.mkdtemp(prefix="tlray-test-cache-")

ROOT = Path(__file__).resolve().parents[1]
# lines Ray prints for itself: in ray.log by default, on the console only with -v
RAY_INTERNALS = (
    "(RayTrainWorker",
    "(SingleWorker",
    "(TrainController",
    "Execution plan",
    "Reporting training result",
    "SplitCoordinator",
)
COLOURS = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 200, 30), (150, 40, 200), (30, 200, 200)]


def write_image_folder(root: Path, classes: int = 3, per_class: int = 12, size: int = 16, seed: int = 0) -> Path:
    """Class k is a noisy image of colour k: learnable in a couple of epochs by any network."""
    from PIL import Image

    rng = random.Random(seed)
    for k in range(classes):
        folder = root / f"class_{k}"
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            base = COLOURS[k % len(COLOURS)]
            pixels = bytes(max(0, min(255, c + rng.randint(-40, 40))) for _ in range(size * size) for c in base)
            Image.frombytes("RGB", (size, size), pixels).save(folder / f"{n:03d}.png")
    return root


def spec_dict(data_uri: str, output_uri: str, **sections) -> dict:
    """A small valid spec; keyword sections are merged over the defaults."""
    spec = {
        "name": "tiny",
        "dataset": {"uri": data_uri, "image_size": 32, "val_fraction": 0.25},
        "model": {"arch": "resnet18", "weights": "none", "mode": "architecture"},
        "train": {"epochs": 2, "batch_size": 8, "lr": 0.003},
        "scaling": {"num_workers": 1},
        "output": {"uri": output_uri},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(spec.get(section), dict):
            spec[section] = {**spec[section], **values}
        else:
            spec[section] = values
    return spec


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


class Driver:
    """A `tlray` command in a subprocess, its output read line by line as it comes (stdout and stderr)."""

    def __init__(self, *args: str, env: dict | None = None):
        import queue
        import subprocess
        import sys
        import threading

        self.process = subprocess.Popen(
            [sys.executable, "-m", "tlray", *args],
            env=env or dict(os.environ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = 300) -> re.Match:
        """The first line from now on that matches `pattern` (a regular expression)."""
        import queue
        import time

        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} within {timeout:.0f} s:\n" + self.output) from None
            if line is None:
                raise AssertionError(f"exited ({self.process.wait()}) before {pattern!r}:\n" + self.output)
            self.lines.append(line)
            if match := re.search(pattern, line):
                return match

    def finish(self, timeout: float = 600) -> int:
        """Its exit code, once every line is read."""
        code = self.process.wait(timeout=timeout)
        while (line := self._queue.get(timeout=30)) is not None:
            self.lines.append(line)
        return code

    @property
    def output(self) -> str:
        return "\n".join(self.lines[-80:])


USER_FOLDERS = ("data", "outputs")  # what `make demo` and the README's commands write; git ignores them


def git_status() -> str:
    """git's view of the checkout ("" outside one, e.g. an unpacked sdist)."""
    if not (ROOT / ".git").exists():
        return ""
    command = ["git", "status", "--porcelain", "--untracked-files=all"]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout


def user_files() -> dict[str, tuple[int, int]]:
    """The user's data/ and outputs/, file by file: size and modification time."""
    return {
        str(path.relative_to(ROOT)): (path.stat().st_size, path.stat().st_mtime_ns)
        for folder in USER_FOLDERS
        for path in sorted((ROOT / folder).rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="session", autouse=True)
def _checkout_left_alone():
    """The suite writes in temporary folders only: after it, `git status` says what it said before, and a demo
    the user ran (outputs/demo/, data/) is as it was."""
    status, files = git_status(), user_files()
    yield
    assert git_status() == status, f"the suite changed the checkout:\nbefore:\n{status}\nafter:\n{git_status()}"
    changed = sorted({path for path, stat in set(files.items()) ^ set(user_files().items())})
    assert not changed, f"the suite changed the user's files: {changed[:10]}"


@pytest.fixture(autouse=True)
def _fresh_ray_per_test():
    """In-process `tlray train` starts a local Ray; stop it so each test owns the machine's 2 CPUs."""
    yield
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "images")


@pytest.fixture(scope="session")
def browser():
    """One headless chromium for the session's page checks. CI sets TLRAY_REQUIRE_BROWSER=1, so there a missing
    chromium fails instead of skipping the checks without anyone noticing."""
    from browser import Browser, find_chromium

    if find_chromium() is None:
        message = "chromium is not installed (apt-get install chromium): the report pages' browser checks need it"
        if os.environ.get("TLRAY_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    with Browser() as started:
        yield started
