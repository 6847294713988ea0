"""The demo's claims over seeds: `tlray demo --seed S` for each seed, then mean ± spread per row.

    .venv/bin/python bench/demo_seeds.py              # seeds 0 1 2, about 30 minutes on 2 cores
    .venv/bin/python bench/demo_seeds.py --seeds 0 1  # fewer

Writes bench/demo_seeds.json (every seed's rows and wall time) and prints the summary table in Markdown:
per target and mode, val accuracy as mean ± half the range; transfer's margin over random init (the best of the
partial depths and the feature extractor, per seed); the feature extractor's train time against full
fine-tuning's; and whether the search's choice matched the best row.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import ENV

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "outputs" / "demo"


def run_seed(seed: int, k: int) -> dict:
    started = time.perf_counter()
    done = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "tlray"), "demo", "--seed", str(seed), "--k", str(k)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        sys.exit(f"tlray demo --seed {seed} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    results = json.loads((DEMO / "results.json").read_text())
    kept = ROOT / "outputs" / f"demo-seed{seed}"
    shutil.copytree(DEMO, kept, dirs_exist_ok=True)
    (kept / "console.txt").write_text(done.stdout + done.stderr)
    lines = (done.stdout + done.stderr).splitlines()
    return {**results, "wall_seconds": time.perf_counter() - started, "console_lines": len(lines)}


def label(row: dict) -> str:
    return f"{row['mode']} {row['freeze_depth']}" if row["mode"] == "partial" else row["mode"]


def spread(values: list[float]) -> str:
    mean = sum(values) / len(values)
    return f"{mean:.3f} ± {(max(values) - min(values)) / 2:.3f}"


def summary(runs: list[dict]) -> str:
    lines = ["| target | mode | val accuracy (mean ± half range) | train s (mean) |", "|---|---|---|---|"]
    targets = list(dict.fromkeys(r["target"] for r in runs[0]["rows"]))
    notes = []
    for target in targets:
        per_seed = [[r for r in run["rows"] if r["target"] == target] for run in runs]
        for i, row in enumerate(per_seed[0]):
            accuracy = [rows[i]["val_accuracy"] for rows in per_seed]
            seconds = [rows[i]["train_seconds"] for rows in per_seed]
            lines.append(f"| {target} | {label(row)} | {spread(accuracy)} | {sum(seconds) / len(seconds):.1f} |")
        margins, full_margins, speedups, tune_gaps = [], [], [], []
        for rows in per_seed:
            by = {label(r): r for r in rows}
            frozen = [
                r["val_accuracy"] for r in rows if r["mode"] in ("partial", "feature extractor") and r["freeze_depth"]
            ]
            margins.append(100 * (max(frozen) - by["random init"]["val_accuracy"]))
            full_margins.append(100 * (by["partial 0"]["val_accuracy"] - by["random init"]["val_accuracy"]))
            speedups.append(by["partial 0"]["train_seconds"] / by["feature extractor"]["train_seconds"])
            best_row = max(r["val_accuracy"] for r in rows if r["mode"] != "tune")
            tune_gaps.append(100 * (by["tune"]["val_accuracy"] - best_row))
        notes.append(
            f"- {target}: transfer (best of partial depths > 0 and feature extractor) minus random init: "
            f"{spread(margins)} points; full fine-tune minus random init: {spread(full_margins)} points; "
            f"feature extractor train time {spread(speedups)}x below full fine-tuning; "
            f"tune minus best row: {spread(tune_gaps)} points"
        )
    walls = [run["wall_seconds"] for run in runs]
    notes.append(
        f"- demo wall time: {', '.join(f'{w:.0f} s' for w in walls)}; console lines: "
        f"{', '.join(str(run['console_lines']) for run in runs)}"
    )
    return "\n".join(lines + [""] + notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    runs = []
    for seed in args.seeds:
        runs.append(run_seed(seed, args.k))
        print(f"seed {seed}: {runs[-1]['wall_seconds']:.0f} s", flush=True)
    (ROOT / "bench" / "demo_seeds.json").write_text(json.dumps(runs, indent=2))
    print(summary(runs))


if __name__ == "__main__":
    main()
