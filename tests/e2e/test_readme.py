"""Every shell command the README shows is run here, as a user would type it (litgpt's test_readme)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from browser import check_renders
from conftest import RAY_INTERNALS, ROOT
from test_tune import check_search, run_dir

pytestmark = pytest.mark.slow

# `make test` is the command that runs this very test; everything else in a bash block runs.
RUNS_THIS_SUITE = "make test"
# `make demo` at the smoke-test size: the full demo (about 4 minutes) measures; this one checks it all fits together
DEMO_FLAGS = "--quick --k 5"


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_quick_start_is_the_two_make_commands():
    assert bash_blocks()[0].split("\n")[:2] == ["make demo", RUNS_THIS_SUITE]
    assert RUNS_THIS_SUITE in (ROOT / ".ci" / "run").read_text()


@pytest.fixture
def checkout_copy(tmp_path) -> Path:
    """The checkout's files (tracked, and new ones git does not ignore) in a temporary folder, with a link to its
    .venv: the README's commands write their data/ and outputs/ there, never over the user's. Modification times
    are kept, so `make` finds the virtual environment up to date and installs nothing."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    copy = tmp_path / "checkout"
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():  # a tracked file deleted in the working tree is not copied
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    (copy / ".venv").symlink_to(ROOT / ".venv")
    return copy


@pytest.mark.timeout(2400)  # several whole runs, each under its own 900 s limit
def test_every_readme_command_runs(monkeypatch, checkout_copy, browser):
    monkeypatch.chdir(checkout_copy)  # the README's specs name paths relative to the checkout
    path = f"{checkout_copy / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"
    env = {**os.environ, "PATH": path, "DEMO_FLAGS": DEMO_FLAGS}
    try:
        for block in bash_blocks():
            script = "\n".join(line for line in block.splitlines() if line.strip() != RUNS_THIS_SUITE)
            done = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", script],
                cwd=checkout_copy,
                env=env,
                capture_output=True,
                text=True,
                timeout=900,
            )
            assert done.returncode == 0, f"README block failed:\n{block}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
            if "make demo" in block:
                check_demo(checkout_copy, done.stdout, browser)
            if "tlray tune" in block:
                search = checkout_copy / "jobs" / "digits-new-domain.yaml"
                check_search(search, done.stdout)
                check_search_page(browser, run_dir(search) / "report" / "index.html")
            if "ray job submit" in block:
                assert "succeeded" in done.stdout + done.stderr
                assert "[tlray] epoch 6/6" in done.stdout  # the job's log reads as `tlray train` does here:
                assert not [line for line in done.stdout.splitlines() if any(i in line for i in RAY_INTERNALS)]
    finally:
        subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)


def check_demo(checkout: Path, stdout: str, browser) -> None:
    """The demo's outputs agree with each other and with what it printed, and it printed for people."""
    demo = checkout / "outputs" / "demo"
    results = json.loads((demo / "results.json").read_text())
    assert (results["k"], results["quick"]) == (5, True)
    rows = results["rows"]
    assert {r["target"] for r in rows} == {"new domain"}  # --quick: one target, in every mode
    modes = [(r["mode"], r["freeze_depth"]) for r in rows]
    # random init, partial at 0 (full fine-tune), 2 and 4 of ResNet-18's 5 blocks, feature extractor, the search
    assert [m for m, _ in modes] == ["random init", "partial", "partial", "partial", "feature extractor", "tune"]
    assert [d for _, d in modes[:5]] == [0, 0, 2, 4, 5]
    for row in rows:
        run = Path(row["run"])
        assert (run / "MANIFEST.json").is_file() and (run / "model" / "state_dict.pt").is_file(), row
        metadata = json.loads((run / "metadata.json").read_text())
        assert metadata["selection"]["value"] == row["val_accuracy"]
        assert metadata["trainable_parameters"] == row["trainable"]
        epochs = len(row["curve"])  # --quick trains 2 epochs; a search's best trial may be one ASHA stopped
        assert epochs == 2 if row["mode"] != "tune" else 1 <= epochs <= 2, row
    table = (demo / "table.md").read_text().strip()
    assert table in stdout
    assert len(table.splitlines()) == len(rows) + 2
    assert (demo / "ray.log").stat().st_size > 0
    check_demo_page(browser, demo / "report" / "index.html", rows)
    extractor = next(row for row in rows if row["mode"] == "feature extractor")  # its epoch 1 has the feature pass
    check_run_page(browser, Path(extractor["run"]) / "report" / "index.html", epochs=len(extractor["curve"]))
    console = stdout.splitlines()
    assert len(console) <= 60, f"the demo printed {len(console)} lines"
    assert not [line for line in console if any(internal in line for internal in RAY_INTERNALS)]
    assert "(SingleWorker" in (demo / "ray.log").read_text()  # the training actors' output went to the log


def check_demo_page(browser, page: Path, rows: list[dict]) -> None:
    checked = check_renders(browser, page, {"modes": len(rows)})
    assert sorted(src for src, _ in checked.images) == ["accuracy.png", "learning_curves.png"]
    assert checked.table("modes").first_cells == [row["target"] for row in rows]


def check_run_page(browser, page: Path, epochs: int) -> None:
    metadata = json.loads((page.parent.parent / "metadata.json").read_text())
    classes = len(metadata["classes"])
    checked = check_renders(browser, page, {"epochs": epochs, "per-class": classes, "freeze": 6})
    assert checked.table("per-class").first_cells == metadata["classes"]
    assert sorted(src for src, _ in checked.images) == ["confusion_matrix.png", "curves.png", "epoch_times.png"]


def check_search_page(browser, page: Path) -> None:
    trials = json.loads((page.parent.parent / "tune_results.json").read_text())["trials"]
    checked = check_renders(browser, page, {"trials": len(trials)})
    assert checked.table("trials").first_cells == [t["trial"] for t in trials]
    assert len(checked.images) == 3 + len(trials)  # the search's three charts and a curve per trial


def test_cluster_commands_name_what_exists():
    """The README's cluster-only commands (```console) cannot run here; what they name must exist and is
    rendered and validated by tests/unit/k8s/test_k8s.py."""
    text = (ROOT / "README.md").read_text()
    consoles = "\n".join(re.findall(r"```console\n(.*?)```", text, flags=re.S))
    for path in re.findall(r"kubectl apply -k (\S+)", consoles):
        assert (ROOT / path / "kustomization.yaml").is_file(), path
    assert "kubectl apply -k k8s/overlays/gpu-prod" in consoles
    for overlay in (ROOT / "k8s" / "overlays").iterdir():
        assert f"kubectl kustomize k8s/overlays/{overlay.name}" in text, f"README previews {overlay.name}"
        assert (overlay / "README.md").is_file()
