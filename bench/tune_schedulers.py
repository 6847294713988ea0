"""Search benchmark: ASHA against synchronous HyperBand, and trials sharing the frozen-prefix cache.

    .venv/bin/python bench/tune_schedulers.py [--samples 6 --epochs 3 --reduction-factor 3 --images 320]

Every search is one `tlray tune` command on generated 32 px images (a manifest with a fixed split,
whole train batches) and a random-init ResNet-18 checkpoint; the commands join one local Ray that
this script starts, each with an emptied (cold) $TLRAY_CACHE_DIR. Wall time = the whole command.
Every trial: 1 worker x 0.5 CPU, so 2 trials at a time on 2 CPUs (1 left for Ray Data).
searches: learning rate x freeze depth (1, 4), the same spec and seed, `tune.scheduler: asha` or
   `hyperband`: trial-epochs run against the full search's trials x epochs (target <= 40%), best
   final metric; per trial, training = the sum of its epochs' `epoch_seconds`, start-up = its time
   in Tune (the sum of time_this_iter_s in Tune's result.json, over every resume) minus that.
trial_startup: a 4-trial, 4-epoch ASHA search at the demo's size (its new-domain images, 16 px) over random init
   and freeze depths 0, 2 and all: start-up per trial (as above; target <= 3 s) and the search's wall (<= 40 s).
cache_sharing: a 4-trial feature-extractor search over the learning rate (no scheduler) with
   `train.cache: on` and `off`. Feature passes = trials whose history (state.pt of their last
   checkpoint) computed activations; one freeze depth, one cache on the node: target 1.

Writes section "tune" of bench/results.json; bench/run.py makes the table and RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from common import ENV, load_results, machine, random_checkpoint, save_results, write_images  # noqa: E402

TLRAY = [sys.executable, "-u", "-m", "tlray"]
IMAGE_SIZE = 32
BATCH = 32
SHARING_TRIALS = 4
CACHE_DIR_ENV = "TLRAY_CACHE_DIR"  # tlray.training.prefix_cache.CACHE_DIR_ENV
TARGET_SHARE = 0.40


# ---------------------------------------------------------------------------------------
# Data: generated images, a manifest with a fixed split
# ---------------------------------------------------------------------------------------
def dataset(work: Path, images: int) -> Path:
    """`images` generated images and a manifest: 80% train (whole batches, so no epoch leaves rows out), 20% val."""
    root = write_images(work / f"images-{images}-{IMAGE_SIZE}", images, IMAGE_SIZE)
    paths = sorted(root.glob("*/*.png"), key=lambda p: p.name)  # by number: the classes interleave
    train = max(BATCH, len(paths) * 4 // 5 // BATCH * BATCH)
    if train >= len(paths):
        raise SystemExit(f"--images {images}: too few for one train batch of {BATCH} and a validation split")
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        for n, path in enumerate(paths):
            writer.writerow([f"{path.parent.name}/{path.name}", path.parent.name, "train" if n < train else "val"])
    return manifest


def base_spec(name: str, manifest: Path, weights: Path, epochs: int, output: Path) -> dict:
    return {
        "name": name,
        "dataset": {
            "uri": str(manifest.parent),
            "layout": "manifest",
            "manifest": str(manifest),
            "image_size": IMAGE_SIZE,
        },
        "model": {"arch": "resnet18", "weights": str(weights), "mode": "partial", "freeze_depth": 1},
        "train": {"epochs": epochs, "batch_size": BATCH, "optimizer": "adamw", "lr": 1e-3, "scheduler": "cosine"},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
        "output": {"uri": str(output)},
    }


# ---------------------------------------------------------------------------------------
# One `tlray tune` command, and what its trials recorded
# ---------------------------------------------------------------------------------------
def run_search(work: Path, spec: dict, label: str) -> dict:
    """`tlray tune` on `spec` in the running Ray, a fresh output folder, a cold cache: wall time, per-trial records."""
    stamp = time.time_ns()
    spec["output"]["uri"] = str(work / f"runs-{stamp}")  # a fresh run: never a resumed, finished search
    path = work / f"{spec['name']}-{stamp}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    log = work / f"{spec['name']}-{stamp}.log"
    shutil.rmtree(os.environ[CACHE_DIR_ENV], ignore_errors=True)  # the workers' cache dir (set before Ray started)
    print(f"[bench] {label}: tlray tune {path} (log {log})", flush=True)
    started = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run([*TLRAY, "tune", str(path)], env=os.environ, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"tlray tune failed ({done.returncode}); the end of {log}:\n{log.read_text()[-4000:]}")
    (run,) = Path(spec["output"]["uri"]).glob(f"{spec['name']}/runs/*/tune_results.json")
    trials = trial_records(run.parent, json.loads(run.read_text()))
    print(f"[bench]   {len(trials)} trials, {sum(len(t['history']) for t in trials)} trial-epochs in {wall:.0f} s")
    return {"wall_s": wall, "trials": trials}


def trial_records(run: Path, results: dict) -> list[dict]:
    """Per trial: its row in tune_results.json, every epoch's metrics and its time in Tune.

    The epochs' metrics (`epoch_seconds`, `feature_pass_images`) are the `history` in the state.pt of the
    trial's last checkpoint (the row's `checkpoint`; a resumed trial's history goes on from its checkpoint).
    The time: Tune's result.json of the trial (under `<run>/search`), the sum of time_this_iter_s: time_total_s
    starts again from 0 when a HyperBand-paused trial resumes without a Tune checkpoint.
    """
    import torch

    seconds: dict[str, float] = {}
    for result_file in (run / "search").glob("*/result.json"):
        for line in result_file.read_text().splitlines():
            if line.strip():
                report = json.loads(line)
                trial = report["trial_id"]
                seconds[trial] = seconds.get(trial, 0.0) + report["time_this_iter_s"]
    records = []
    for row in results["trials"]:
        if not row.get("checkpoint"):
            raise RuntimeError(f"trial {row['trial']} has no checkpoint ({row['status']})")
        history = torch.load(Path(row["checkpoint"], "state.pt"), map_location="cpu", weights_only=False)["history"]
        if len(history) != row["epochs"]:
            print(f"[bench] warning: trial {row['trial']}: {len(history)} epochs in state.pt, {row['epochs']} in Tune")
        records.append(
            {
                "trial": row["trial"],
                "lr": row["lr"],
                "freeze_depth": row["freeze_depth"],
                "epochs": row["epochs"],
                "metric": row["metric"],
                "tune_s": seconds[row["trial"]],
                "history": [
                    {k: h.get(k) for k in ("epoch", "epoch_seconds", "feature_pass_images", "feature_pass_seconds")}
                    for h in history
                ],
            }
        )
    return records


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


# ---------------------------------------------------------------------------------------
# ASHA against HyperBand
# ---------------------------------------------------------------------------------------
def searches(work: Path, manifest: Path, weights: Path, args) -> tuple[dict, dict]:
    summary, details = {}, {}
    for name, scheduler in (("ASHA", "asha"), ("HyperBand", "hyperband")):
        spec = base_spec(f"bench-{scheduler}", manifest, weights, args.epochs, work)
        spec["tune"] = {
            "num_samples": args.samples,
            "lr": {"min": 1e-4, "max": 1e-1},
            "freeze_depth": [1, 4],
            "scheduler": scheduler,
            "grace_period": 1,
            "reduction_factor": args.reduction_factor,
            "metric": "val_accuracy",
            "mode": "max",
        }
        run = run_search(work, spec, f"{name}, {args.samples} trials x {args.epochs} epochs")
        trials = run["trials"]
        full = len(trials) * args.epochs  # every trial to the last epoch: the search without a scheduler
        trial_epochs = sum(t["epochs"] for t in trials)
        training = [sum(h["epoch_seconds"] for h in t["history"]) for t in trials]
        share = trial_epochs / full
        summary[name] = {
            "trials": len(trials),
            "max_epochs": args.epochs,
            "trial_epochs": trial_epochs,
            "wall_s": run["wall_s"],
            "best": max(t["metric"] for t in trials if t["metric"] is not None),
            "startup_s_per_trial": mean([t["tune_s"] - s for t, s in zip(trials, training, strict=True)]),
            "train_s_per_trial": mean(training),
            "reference": f"full search {full} trial-epochs",
            "epochs_share": share,
            "target": f"<= {TARGET_SHARE:.0%}",
            "met": "yes" if share <= TARGET_SHARE else "**no**",
        }
        details[name] = trials
        print(f"[bench]   {json.dumps(summary[name])}", flush=True)
    return summary, details


# ---------------------------------------------------------------------------------------
# Trials sharing the frozen-prefix cache
# ---------------------------------------------------------------------------------------
def cache_sharing(work: Path, manifest: Path, weights: Path, args) -> tuple[dict, dict]:
    runs = {}
    for cache in ("on", "off") if args.compare_uncached else ("on",):
        spec = base_spec(f"bench-sharing-{cache}", manifest, weights, args.epochs, work)
        spec["model"] = {"arch": "resnet18", "weights": str(weights), "mode": "feature_extractor"}
        spec["train"]["cache"] = cache
        spec["tune"] = {
            "num_samples": SHARING_TRIALS,
            "lr": {"min": 1e-4, "max": 1e-1},
            "scheduler": "none",
            "metric": "val_accuracy",
            "mode": "max",
        }
        runs[cache] = run_search(work, spec, f"feature extractor, {SHARING_TRIALS} trials, cache {cache}")
    cached = runs["on"]["trials"]
    result = {
        "trials": len(cached),
        "images": len(manifest.read_text().splitlines()) - 1,  # train and val
        "cached": {
            "feature_passes": sum(any((h["feature_pass_images"] or 0) > 0 for h in t["history"]) for t in cached),
            "images_computed": sum(h["feature_pass_images"] or 0 for t in cached for h in t["history"]),
            "wall_s": runs["on"]["wall_s"],
        },
    }
    if "off" in runs:
        result["uncached"] = {"wall_s": runs["off"]["wall_s"]}
    # trials racing for a split's fill lock may share the one pass (train by one, val by another): every image
    # computed once reads 1.0 here, however many trials took part
    result["cached"]["passes_over_the_data"] = result["cached"]["images_computed"] / result["images"]
    print(f"[bench]   {json.dumps(result)}", flush=True)
    return result, {cache: run["trials"] for cache, run in runs.items()}


# ---------------------------------------------------------------------------------------
# Trial start-up at the demo's size
# ---------------------------------------------------------------------------------------
STARTUP_TARGET_S = 3.0
STARTUP_SEARCH_TARGET_S = 40.0


def trial_startup(work: Path, weights: Path) -> tuple[dict, dict]:
    """A 4-trial, 4-epoch ASHA search on the demo's new-domain images (10 per digit, 16 px) over random init and
    freeze depths: how long a trial takes to start against how long it trains."""
    from tlray.data.demo_data import write_demo_folders

    folders = write_demo_folders(work / "demo-data", k=10, seed=0)
    spec = {
        "name": "bench-startup",
        "dataset": {"uri": str(folders.new_domain), "image_size": 16},
        "model": {"arch": "resnet18", "weights": str(weights), "mode": "partial", "freeze_depth": 2},
        "train": {"epochs": 4, "batch_size": 16, "optimizer": "adamw", "lr": 1e-3, "scheduler": "cosine"},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
        "tune": {
            "num_samples": 4,
            "lr": {"min": 3e-4, "max": 3e-3},
            "freeze_depth": ["random", 0, 2, "all"],
            "scheduler": "asha",
            "grace_period": 1,
            "metric": "val_accuracy",
            "mode": "max",
        },
        "output": {"uri": str(work)},
    }
    run = run_search(work, spec, "trial start-up: 4 trials x 4 epochs, ASHA, the demo's size")
    trials = run["trials"]
    training = [sum(h["epoch_seconds"] for h in t["history"]) for t in trials]
    startup = mean([t["tune_s"] - s for t, s in zip(trials, training, strict=True)])
    result = {
        "trials": len(trials),
        "trial_epochs": sum(t["epochs"] for t in trials),
        "startup_s_per_trial": startup,
        "train_s_per_trial": mean(training),
        "wall_s": run["wall_s"],
        "target": f"start-up <= {STARTUP_TARGET_S:.0f} s, search <= {STARTUP_SEARCH_TARGET_S:.0f} s",
        "met": "yes" if startup <= STARTUP_TARGET_S and run["wall_s"] <= STARTUP_SEARCH_TARGET_S else "**no**",
    }
    print(f"[bench]   {json.dumps(result)}", flush=True)
    return result, trials


@contextlib.contextmanager
def local_ray(work: Path):
    """One local Ray for every command (RAY_ADDRESS), its workers' $TLRAY_CACHE_DIR = <work>/cache.

    Started here, so the commands inherit what joining it takes (the address, Ray's auth settings); Ray's
    warnings to every driver (e.g. "N PYTHON worker processes have been started") still print here.
    """
    import ray

    os.environ.update({**ENV, CACHE_DIR_ENV: str(work / "cache")})  # before Ray starts: its workers inherit it
    began = time.perf_counter()
    # with the dashboard: Ray Train cleans up stopped trials through its state API
    ray.init(logging_level="WARNING", log_to_driver=False)  # the commands log their own
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    print(f"[bench] Ray up in {time.perf_counter() - began:.1f} s at {os.environ['RAY_ADDRESS']}", flush=True)
    try:
        yield
    finally:
        os.environ.pop("RAY_ADDRESS", None)
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--samples", type=int, default=6, help="trials of each scheduler's search; its 2 freeze depths take turns"
    )
    parser.add_argument("--epochs", type=int, default=3, help="epochs of a trial that is never stopped")
    parser.add_argument("--reduction-factor", type=int, default=3, help="tune.reduction_factor of both schedulers")
    parser.add_argument("--images", type=int, default=320, help="generated images (80%% train, 20%% val)")
    parser.add_argument(
        "--compare-uncached", action="store_true", help="also run the feature-extractor search with train.cache: off"
    )
    parser.add_argument("--only", choices=["searches", "cache_sharing", "trial_startup"], help="one part alone")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "tlray-bench"))
    parser.add_argument("--json", default=str(BENCH / "results.json"), help="where the results go")
    args = parser.parse_args(argv)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = {"machine": machine(), "settings": vars(args)}
    manifest = dataset(work, args.images)
    weights = random_checkpoint(work / "resnet18-random.pt", "resnet18")
    parts = {
        "searches": lambda: searches(work, manifest, weights, args),
        "cache_sharing": lambda: cache_sharing(work, manifest, weights, args),
        "trial_startup": lambda: trial_startup(work, weights),
    }
    results["trials"] = {}
    with local_ray(work):
        for name, part in parts.items():
            if args.only in (None, name):
                results[name], results["trials"][name] = part()
    results["wall_s"] = time.perf_counter() - started
    print(f"[bench] tune: {results['wall_s']:.0f} s in all", flush=True)
    if args.only:  # the other parts keep their last results
        kept = load_results(args.json).get("tune", {})
        results = {**kept, **results, "trials": {**kept.get("trials", {}), **results["trials"]}}
    save_results(args.json, "tune", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
