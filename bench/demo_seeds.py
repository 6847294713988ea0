"""The demo's claims over seeds: `tlray demo --seed S` for each seed, then mean ± spread per row.

    .venv/bin/python bench/demo_seeds.py              # seeds 0 1 2, about 30 minutes on 2 cores
    .venv/bin/python bench/demo_seeds.py --seeds 0 1  # fewer

After each seed's demo, three more runs of the new-domain target on that seed's images and source weights
(`tlray train jobs/digits-new-domain.yaml`): the seed's best fixed depth with `train.layer_lr_decay: 0.5`,
gradual unfreezing from the head (`freeze_depth: all`, `train.unfreeze_every: 1`), and both.

Writes bench/demo_seeds.json (every seed's rows and wall time) and prints the summary table in Markdown:
per target and mode, val accuracy as mean ± half the range; transfer's margin over random init (the best of the
partial depths and the feature extractor, per seed); the feature extractor's train time against full
fine-tuning's; and two answers:
- does the search (lr x random init and freeze depths) match or beat the best hand-picked row, per target?
- do layer_lr_decay and gradual unfreezing beat the best fixed depth on the new domain?
"""

from __future__ import annotations

import argparse
import json
import re
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
    wall = time.perf_counter() - started
    results["rows"] += [train_variant(seed, *variant) for variant in variants(results["rows"])]
    return {**results, "wall_seconds": wall, "console_lines": len(lines)}


HAND_PICKED = ("random init", "partial", "feature extractor")  # the demo's fixed rows (its search space's choices)
TARGET = "new domain"  # where transfer pays: the target that discriminative rates and unfreezing are for
DECAY = "0.5"


def best_fixed_depth(rows: list[dict]) -> dict:
    """The seed's best fixed-depth row on the new domain: a partial depth or the feature extractor."""
    fixed = [r for r in rows if r["target"] == TARGET and r["mode"] in ("partial", "feature extractor")]
    return max(fixed, key=lambda r: r["val_accuracy"])


def variants(rows: list[dict]) -> list[tuple[str, tuple[str, ...]]]:
    """(row mode, `--set` overrides) of the runs that answer whether decay and unfreezing help; the decay alone
    starts at the seed's best fixed depth (below the block count, since it decays the trained blocks' rates)."""
    depth = min(best_fixed_depth(rows)["freeze_depth"], 4)
    return [
        (f"layer_lr_decay {DECAY}", (f"model.freeze_depth={depth}", f"train.layer_lr_decay={DECAY}")),
        ("gradual unfreezing", ("model.freeze_depth=all", "train.unfreeze_every=1")),
        (
            f"gradual unfreezing + layer_lr_decay {DECAY}",
            ("model.freeze_depth=all", "train.unfreeze_every=1", f"train.layer_lr_decay={DECAY}"),
        ),
    ]


JOB_NAMES = {"layer_lr_decay": "lrdecay", "gradual unfreezing": "unfreeze", "+": ""}  # job names stay short


def train_variant(seed: int, mode: str, overrides: tuple[str, ...]) -> dict:
    """`tlray train` on the new-domain target as the demo left it: this seed's images and source weights."""
    short = mode
    for words, word in JOB_NAMES.items():
        short = short.replace(words, word)
    name = "digits-new-domain-" + re.sub(r"[^a-z0-9]+", "-", short).strip("-")  # at most 41 characters
    sets = [f"name={name}", "tune=null", f"train.seed={seed}", *overrides]
    command = [str(ROOT / ".venv" / "bin" / "tlray"), "train", "jobs/digits-new-domain.yaml"]
    done = subprocess.run(
        command + [arg for item in sets for arg in ("--set", item)], cwd=ROOT, env=ENV, capture_output=True, text=True
    )
    if done.returncode != 0:
        sys.exit(f"{mode} (seed {seed}) failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    run = Path(re.search(r"model published to (\S+)/model", done.stdout).group(1))
    metadata = json.loads((run / "metadata.json").read_text())
    history = json.loads((run / "metrics.json").read_text())["history"]
    return {
        "target": TARGET,
        "mode": mode,
        "freeze_depth": metadata["freeze_depth"],
        "val_accuracy": metadata["selection"]["value"],
        "train_seconds": sum(epoch["epoch_seconds"] for epoch in history),
        "run": str(run),
    }


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
        margins, full_margins, speedups = [], [], []
        for rows in per_seed:
            by = {label(r): r for r in rows}
            frozen = [
                r["val_accuracy"] for r in rows if r["mode"] in ("partial", "feature extractor") and r["freeze_depth"]
            ]
            margins.append(100 * (max(frozen) - by["random init"]["val_accuracy"]))
            full_margins.append(100 * (by["partial 0"]["val_accuracy"] - by["random init"]["val_accuracy"]))
            speedups.append(by["partial 0"]["train_seconds"] / by["feature extractor"]["train_seconds"])
        notes.append(
            f"- {target}: transfer (best of partial depths > 0 and feature extractor) minus random init: "
            f"{spread(margins)} points; full fine-tune minus random init: {spread(full_margins)} points; "
            f"feature extractor train time {spread(speedups)}x below full fine-tuning"
        )
    notes += answers(runs)
    walls = [run["wall_seconds"] for run in runs]
    notes.append(
        f"- demo wall time: {', '.join(f'{w:.0f} s' for w in walls)}; console lines: "
        f"{', '.join(str(run['console_lines']) for run in runs)}"
    )
    return "\n".join(lines + [""] + notes)


def answers(runs: list[dict]) -> list[str]:
    """The two questions, answered seed by seed (a difference within 0.5 points counts as a match)."""
    lines = ["", "Does the search match or beat the best hand-picked row on both targets?"]
    targets = list(dict.fromkeys(r["target"] for r in runs[0]["rows"]))
    verdicts = []
    for target in targets:
        gaps, picks = [], []
        for run in runs:
            rows = [r for r in run["rows"] if r["target"] == target]
            search = next(r for r in rows if r["mode"] == "tune")
            best_row = max(r["val_accuracy"] for r in rows if r["mode"] in HAND_PICKED)
            gaps.append(100 * (search["val_accuracy"] - best_row))
            picks.append("random init" if search.get("random_init") else f"depth {search['freeze_depth']}")
        matched = sum(gap >= -0.5 for gap in gaps)
        verdicts.append(matched == len(runs))
        lines.append(
            f"- {target}: {'yes' if matched == len(runs) else 'no'}, in {matched} of {len(runs)} seeds; search minus "
            f"best row {spread(gaps)} points ({', '.join(f'{g:+.1f}' for g in gaps)}); it picked {', '.join(picks)}"
        )
    lines.append(f"- both targets: {'yes' if all(verdicts) else 'no'}")
    lines += ["", f"Do layer_lr_decay and gradual unfreezing help on the {TARGET} against the best fixed depth?"]
    variant_modes = [mode for mode, _ in variants(runs[0]["rows"])]
    for mode in variant_modes:
        gaps = []
        for run in runs:
            row = next(r for r in run["rows"] if r["mode"] == mode)
            gaps.append(100 * (row["val_accuracy"] - best_fixed_depth(run["rows"])["val_accuracy"]))
        better = sum(gap > 0.5 for gap in gaps)
        verdict = "helps" if better == len(runs) else "does not help" if better == 0 else "mixed"
        lines.append(
            f"- {mode}: {verdict} ({better} of {len(runs)} seeds more than 0.5 points above); minus the best fixed "
            f"depth {spread(gaps)} points ({', '.join(f'{g:+.1f}' for g in gaps)})"
        )
    return lines


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
