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
        epochs = transfer.HEAD_ONLY_EPOCHS if row["cached"] else 2  # the cached head's epochs take milliseconds
        assert len(row["tlray"]["epoch_s"]) == len(row["plain"]["epoch_s"]) == epochs
        assert all(t > 0 for t in row["tlray"]["epoch_s"] + row["plain"]["epoch_s"])
        assert (row["tlray"]["feature_pass_s"] > 0) == (row["plain"]["feature_pass_s"] > 0) == row["cached"]
        assert row["tlray"]["precision"] == "bf16 (train.amp: bf16)" and row["tlray"]["cache"] == row["cached"]
        assert row["tlray"]["gpu_peak_mib"] == 0.0  # CPU: the GPU rows of a real check record their peak
    assert rows[0]["tlray"]["speedup"] == 1.0
    assert rows[0]["phi"] == 0 < rows[1]["phi"] == rows[2]["phi"] <= 1
    table = bench_run.table({"transfer": section})
    assert "| feature extractor, cache (phi " in table
    assert "cached head-only epoch against recomputing the backbone" in table


def test_shards_bench_writes_shards_the_webdataset_layout_indexes_and_a_table_row(tmp_path):
    import shards

    from tlray.data.index import build_index
    from tlray.spec import DatasetSpec

    images = shards.jpeg_images(2 * shards.SHARD_SAMPLES // 100)
    for name, data in shards.tar_shards(images).items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    index = build_index(DatasetSpec(uri=str(tmp_path / "shards"), layout="webdataset", val_fraction=0.25))
    assert index.classes == [str(k) for k in range(shards.CLASSES)] and len(index.train) + len(index.val) == 20
    rates = {
        "webdataset": {"images_per_second": 900.0, "gets_per_batch": 2.5, "images": 40_000},
        "objects": {"images_per_second": 150.0, "gets_per_batch": 64.0, "images": 4_000},
    }
    row = bench_run.shards_lines({"rates": rates, "latency_ms": 30, "batch": 64, "ratio": 6.0})
    assert row == [
        "| images/s read + decoded, S3 + 30 ms per request: WebDataset tar shards (2.5 GETs per batch of 64) | 900 "
        "| one object per image (4,000 images) 150 | 6.00x | >= 3x | yes |"
    ]


def test_demo_seeds_answers_whether_the_search_and_unfreezing_beat_the_hand_picked_rows():
    import demo_seeds

    def rows(target: str, accuracies: dict, search: tuple, extra: dict | None = None) -> list[dict]:
        fixed = [("random init", 0), ("partial", 0), ("partial", 2), ("partial", 4), ("feature extractor", 5)]
        out = [
            {"target": target, "mode": m, "freeze_depth": d, "val_accuracy": accuracies[(m, d)], "train_seconds": 2.0}
            for m, d in fixed
        ]
        depth, accuracy, random_init = search
        out.append(
            {
                "target": target,
                "mode": "tune",
                "freeze_depth": depth,
                "val_accuracy": accuracy,
                "train_seconds": 9.0,
                "random_init": random_init,
            }
        )
        for mode, accuracy in (extra or {}).items():
            out.append(
                {"target": target, "mode": mode, "freeze_depth": 2, "val_accuracy": accuracy, "train_seconds": 3.0}
            )
        return out

    domain = {("random init", 0): 0.60, ("partial", 0): 0.80, ("partial", 2): 0.85, ("partial", 4): 0.82}
    domain[("feature extractor", 5)] = 0.70
    classes = {("random init", 0): 0.88, ("partial", 0): 0.85, ("partial", 2): 0.80, ("partial", 4): 0.63}
    classes[("feature extractor", 5)] = 0.26
    modes = [mode for mode, _ in demo_seeds.variants(rows("new domain", domain, (2, 0.85, False)))]
    assert modes == ["layer_lr_decay 0.5", "gradual unfreezing", "gradual unfreezing + layer_lr_decay 0.5"]
    assert demo_seeds.variants(rows("new domain", domain, (2, 0.85, False)))[0][1] == (
        "model.freeze_depth=2",  # the seed's best fixed depth
        "train.layer_lr_decay=0.5",
    )
    runs = [
        {
            "rows": rows("new domain", domain, (2, 0.86, False), dict(zip(modes, (0.88, 0.84, 0.851), strict=True)))
            + rows("new classes", classes, (0, 0.881, True))
        },
        {
            "rows": rows("new domain", domain, (2, 0.847, False), dict(zip(modes, (0.87, 0.80, 0.86), strict=True)))
            + rows("new classes", classes, (2, 0.80, False))
        },
    ]
    answers = demo_seeds.answers(runs)
    assert answers[2] == (
        "- new domain: yes, in 2 of 2 seeds; search minus best row 0.350 ± 0.650 points (+1.0, -0.3); "
        "it picked depth 2, depth 2"
    )
    assert answers[3] == (
        "- new classes: no, in 1 of 2 seeds; search minus best row -3.950 ± 4.050 points (+0.1, -8.0); "
        "it picked random init, depth 2"
    )
    assert answers[4] == "- both targets: no"
    assert answers[7:] == [
        "- layer_lr_decay 0.5: helps (2 of 2 seeds more than 0.5 points above); minus the best fixed depth "
        "2.500 ± 0.500 points (+3.0, +2.0)",
        "- gradual unfreezing: does not help (0 of 2 seeds more than 0.5 points above); minus the best fixed depth "
        "-3.000 ± 2.000 points (-1.0, -5.0)",
        "- gradual unfreezing + layer_lr_decay 0.5: mixed (1 of 2 seeds more than 0.5 points above); minus the best "
        "fixed depth 0.550 ± 0.450 points (+0.1, +1.0)",
    ]
    assert "| new domain | gradual unfreezing | 0.820 ± 0.020 | 3.0 |" in demo_seeds.summary(
        [{**run, "wall_seconds": 1.0, "console_lines": 30} for run in runs]
    )


def test_claim_rows_split_the_run_into_its_timed_parts_and_judge_each_target():
    timings = {"index": 1.0, "weights": 0.5, "cluster": 3.0, "plan": 0.5, "fit": 24.0, "epochs": 22.0, "publish": 1.0}
    plain = {"feature_pass_s": 20.0, "feature_pass_images": 40_000, "epoch_s": [0.1] * 10}
    claim = {
        "images": 40_000,
        "total_s": 32.0,  # over 30 s, and 1.52x the plain loop: missed
        "feature_pass_s": 21.0,
        "feature_pass_images": 40_000,
        "head_epoch_s": [0.1] * 10,
        "val_accuracy": 0.99,
        "timings": timings,
        "plain_cached": plain,
    }
    lines = bench_run.claim_lines(claim)
    assert lines[0].endswith("| 1905 | plain loop 2000 | 0.95x | >= 0.9x | yes |")  # the feature pass's images/s
    assert lines[1].endswith("| 22.0 s | plain loop with a cache 21.0 s | 1.05x | <= 1.2x | yes |")
    assert lines[2].endswith("| 32.0 s | plain loop with a cache 21.0 s | 1.52x | <= 30 s, <= 1.2x | **no** |")
    parts = {line.split("|")[1].split(": ", 1)[1].strip(): line.split("|")[2].strip() for line in lines[3:7]}
    assert parts == {
        "indexing the files": "1.00 s",
        "weights and the run plan": "1.00 s",
        "worker start-up, checkpoints": "2.00 s",  # the fit less its epochs
        "export and publish": "1.00 s",
    }
    # 5 s outside the work and Ray start-up; the command's 32 s less its 30 timed ones: imports and shutdown
    assert lines[7].endswith("| 5.0 s | the command's other time (imports, Ray shutdown) 2.0 s | | <= 5 s | yes |")


def test_demo_row_reports_the_wall_time_against_five_minutes():
    demo = {"wall_s": 301.0, "k": 10, "quick": False, "jobs": 14, "sources_wall_s": [18.0, 15.0]}
    demo |= {"searches_wall_s": [38.4, 26.2], "rows_train_s": 90.8, "target": "<= 300 s", "met": "**no**"}
    assert bench_run.demo_lines(demo) == [
        "| `make demo` (k = 10) in a fresh folder: 14 jobs; sources 18 + 15 s, searches 38 + 26 s, every row's "
        "epochs 91 s | 301 s | | | <= 300 s | **no** |"
    ]
