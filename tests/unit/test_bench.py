"""bench/: the GPU check's CPU dry run end to end, and the FLOP model and table of `make bench`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import run as bench_run  # noqa: E402
import transfer  # noqa: E402


def test_flop_model_predictions():
    assert transfer.predicted_speedup(0.0, cached=False) == 1.0
    assert transfer.predicted_speedup(0.5, cached=False) == pytest.approx(1.5)  # 3 / (0.5 + 1.5)
    assert transfer.predicted_speedup(0.5, cached=True) == pytest.approx(2.0)
    phis = transfer.frozen_shares("resnet18", 32)
    assert phis[0] == 0.0 and phis[-1] == pytest.approx(1.0, abs=1e-3)  # the head is a tiny share
    assert all(a < b for a, b in zip(phis, phis[1:], strict=False))


def test_gpu_check_dry_run_measures_every_mode_on_cpu(tmp_path):
    out = tmp_path / "results.json"
    done = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run", "--json", str(out), "--work", str(tmp_path / "work")],
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    section = json.loads(out.read_text())["gpu"]
    assert (section["settings"]["arch"], section["settings"]["amp"], section["settings"]["channels_last"]) == (
        "resnet50",
        "bf16",
        True,
    )
    rows = section["modes"]["rows"]
    assert [(r["depth"], r["cached"]) for r in rows] == [(0, False), (5, False), (5, True)]  # full, feature extractor
    for row in rows:
        assert len(row["tlray"]["epoch_s"]) == len(row["plain"]["epoch_s"]) == 2
        assert all(t > 0 for t in row["tlray"]["epoch_s"] + row["plain"]["epoch_s"])
        assert (row["tlray"]["feature_pass_s"] > 0) == (row["plain"]["feature_pass_s"] > 0) == row["cached"]
        assert row["tlray"]["precision"] == "bf16 (train.amp: bf16)" and row["tlray"]["cache"] == row["cached"]
        assert row["tlray"]["gpu_peak_mib"] == 0.0  # CPU: the GPU rows of a real check record their peak
    assert rows[0]["tlray"]["speedup"] == 1.0
    assert rows[0]["phi"] == 0 < rows[1]["phi"] == rows[2]["phi"] <= 1
    table = bench_run.table({"transfer": section})
    assert "| feature extractor, cache (phi " in table
    assert "cached head-only epoch against recomputing the backbone" in table
