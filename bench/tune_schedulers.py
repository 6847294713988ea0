#!/usr/bin/env python
"""ASHA vs no scheduler: the same `tlray tune` search on scikit-learn digits, run twice.

    python bench/tune_schedulers.py [--samples 8] [--epochs 6] [--reduction-factor 3] [--workdir DIR]

A real transfer inside the digits data: `tlray train` first fits a ResNet-18 from random init on
the digits 0-4 (the "pretrained" model), then both searches fine-tune it on the digits 5-9 over
learning rate x freeze depth. The two searches share every setting but `tune.scheduler`, and the
same seed samples the same learning rates, so they try identical trials. Reported per search:
trial-epochs spent (from tune_results.json), wall time of the `tlray tune` command, best metric.
Target: ASHA spends <= 40% of the full search's trial-epochs and its best metric is within
1 point (0.01) of the full search's.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
TLRAY = [sys.executable, "-m", "tlray"]
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8, help="trials per search (shared over 2 freeze depths)")
    parser.add_argument("--epochs", type=int, default=6, help="epochs of a trial that is never stopped")
    parser.add_argument("--reduction-factor", type=int, default=3, help="ASHA's tune.reduction_factor")
    parser.add_argument("--workdir", type=Path, help="keep data and runs here (default: a temporary folder)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tlray-bench-tune-"))
    workdir.mkdir(parents=True, exist_ok=True)

    weights = pretrain_on_first_five_digits(workdir)
    results = {}
    for scheduler in ("none", "asha"):
        spec = search_spec(workdir, weights, scheduler, args)
        results[scheduler] = run_search(spec)
    print_table(results, args)


def pretrain_on_first_five_digits(workdir: Path) -> Path:
    from tlray.demo import write_digits

    images = workdir / "digits"
    write_digits(str(images))
    for name, digits in (("source", range(0, 5)), ("target", range(5, 10))):
        with open(workdir / f"{name}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "label"])
            for digit in digits:
                for image in sorted((images / str(digit)).glob("*.png")):
                    writer.writerow([f"{digit}/{image.name}", str(digit)])
    weights = workdir / "digits-0-4-resnet18.pt"
    if weights.exists():
        return weights
    spec = {
        "name": "bench-pretrain",
        "dataset": {
            "uri": str(images),
            "layout": "manifest",
            "manifest": str(workdir / "source.csv"),
            "image_size": 32,
        },
        "model": {"arch": "resnet18", "weights": "none", "mode": "architecture"},
        "train": {"epochs": 4, "batch_size": 64, "lr": 0.003},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "output": {"uri": str(workdir / "runs")},
    }
    path = write(workdir / "pretrain.yaml", spec)
    step(f"pretraining ResNet-18 on digits 0-4 ({path})")
    subprocess.run([*TLRAY, "train", str(path)], check=True, env=ENV, cwd=ROOT)
    published = next((workdir / "runs" / "bench-pretrain" / "runs").glob("*/model/state_dict.pt"))
    weights.write_bytes(published.read_bytes())
    return weights


def search_spec(workdir: Path, weights: Path, scheduler: str, args: argparse.Namespace) -> Path:
    spec = {
        "name": f"bench-{scheduler}",
        "dataset": {
            "uri": str(workdir / "digits"),
            "layout": "manifest",
            "manifest": str(workdir / "target.csv"),
            "image_size": 32,
        },
        "model": {"arch": "resnet18", "weights": str(weights), "mode": "partial", "freeze_depth": 1},
        "train": {"epochs": args.epochs, "batch_size": 64, "optimizer": "adamw", "lr": 0.001, "scheduler": "cosine"},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
        "tune": {
            "num_samples": args.samples,
            "lr": {"min": 1e-5, "max": 3e-2},
            "freeze_depth": [1, 4],
            "scheduler": scheduler,
            "grace_period": 1,
            "reduction_factor": args.reduction_factor,
            "metric": "val_accuracy",
            "mode": "max",
        },
        "output": {"uri": str(workdir / "runs")},
    }
    return write(workdir / f"search-{scheduler}.yaml", spec)


def run_search(spec_path: Path) -> dict:
    step(f"tlray tune {spec_path}")
    started = time.monotonic()
    subprocess.run([*TLRAY, "tune", str(spec_path)], check=True, env=ENV, cwd=ROOT)
    wall = time.monotonic() - started
    from tlray.data import build_index
    from tlray.publish import run_uri
    from tlray.spec import load_spec

    spec = load_spec(spec_path)
    results = json.loads((Path(run_uri(spec, build_index(spec.dataset), "tune")) / "tune_results.json").read_text())
    trials = results["trials"]
    return {
        "trials": len(trials),
        "trial_epochs": sum(t["epochs"] for t in trials),
        "stopped_early": sum(bool(t["stopped_early"]) for t in trials),
        "best": max(t["best_metric"] for t in trials if t["best_metric"] is not None),
        "best_final": trials[0]["metric"],
        "best_trial": f"lr {trials[0]['lr']:.3g}, freeze_depth {trials[0]['freeze_depth']}",
        "wall_s": wall,
    }


def print_table(results: dict, args: argparse.Namespace) -> None:
    full, asha = results["none"], results["asha"]
    print(
        f"\n{args.samples} trials x up to {args.epochs} epochs, ASHA grace 1, "
        f"reduction factor {args.reduction_factor}\n"
    )
    print(
        "| search | trials | stopped early | trial-epochs | wall time | best val_accuracy (final epoch) | best trial |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in (("no scheduler", full), ("ASHA", asha)):
        print(
            f"| {name} | {r['trials']} | {r['stopped_early']} | {r['trial_epochs']} | {r['wall_s']:.0f} s "
            f"| {r['best_final']:.4f} | {r['best_trial']} |"
        )
    share = asha["trial_epochs"] / full["trial_epochs"]
    gap = full["best_final"] - asha["best_final"]
    print(
        f"\nASHA trial-epochs: {share:.0%} of the full search (target <= 40%): {'met' if share <= 0.40 else 'NOT met'}"
    )
    print(f"best metric gap: {gap * 100:+.2f} points (target within 1): {'met' if gap <= 0.01 else 'NOT met'}")
    print(f"wall time: ASHA {asha['wall_s'] / full['wall_s']:.0%} of the full search")


def write(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def step(message: str) -> None:
    print(f"\n=== {message}", flush=True)


if __name__ == "__main__":
    main()
