"""The search: Ray Tune over learning rate x freeze depth, one TorchTrainer per trial.

Ray 2.60 pattern: a Tune *function* trainable builds and fits a TorchTrainer
(`Tuner(trainer)` is gone), reporting through TuneReportCallback. The trial's
driver function only waits on its trainer, so it reserves memory, not a CPU:
holding a CPU per trial is what starves the trainers' workers on a small cluster.
"""

from __future__ import annotations

import csv
import io
import math

import ray
import ray.tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.search.basic_variant import BasicVariantGenerator

from tlray import storage
from tlray.data import DatasetIndex, DataSource
from tlray.errors import UserError, user_error_inside
from tlray.spec import JobSpec
from tlray.train import make_trainer, say, warn_if_no_cpu_left_for_data, weights_location, worker_resources

TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 64 * 1024**2}  # Tune needs a non-empty request
RESULT_COLUMNS = ("trial", "lr", "freeze_depth", "epochs", "metric", "best_metric", "stopped_early", "status")


def check_searchable(spec: JobSpec, index: DatasetIndex) -> None:
    """What only the data can tell: the metric must be one the loop reports for this dataset."""
    if spec.tune.metric == "val_top5" and len(index.classes) < 5:
        raise UserError(
            f"tune.metric: val_top5 is only reported with 5 or more classes; this dataset has {len(index.classes)}"
        )


def search(spec: JobSpec, source: DataSource, run: str) -> ray.tune.ResultGrid:
    """Run (or resume) the search whose state lives in `<run>/search`; trials train into `<run>/trials`."""
    filesystem, path = storage.filesystem(run, spec.dataset.endpoint_url)
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(
            run_trial,
            spec_json=spec.model_dump(mode="json"),
            source=source,
            weights=weights_location(spec.model.builder_weights),  # resolved here: trials run elsewhere
            run=run,
        ),
        TRIAL_DRIVER_RESOURCES,
    )
    experiment = storage.join(path, "search")
    if ray.tune.Tuner.can_restore(experiment, storage_filesystem=filesystem):
        say(f"resuming the search in {storage.join(run, 'search')}")
        tuner = ray.tune.Tuner.restore(
            experiment, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=filesystem
        )
    else:
        concurrency = concurrent_trials(spec)
        say(f"searching {trial_count(spec)} trials, {concurrency} at a time ({scheduler_name(spec)})")
        warn_if_no_cpu_left_for_data(spec, trials=concurrency)
        tuner = ray.tune.Tuner(
            trainable,
            param_space=search_space(spec),
            tune_config=ray.tune.TuneConfig(
                metric=spec.tune.metric,
                mode=spec.tune.mode,
                num_samples=samples_per_depth(spec),
                # the same spec samples the same lrs; the generator itself caps concurrency
                search_alg=BasicVariantGenerator(random_state=spec.train.seed, max_concurrent=concurrency),
                scheduler=make_scheduler(spec),
            ),
            run_config=ray.tune.RunConfig(name="search", storage_path=path, storage_filesystem=filesystem, verbose=1),
        )
    return tuner.fit()


def run_trial(config: dict, spec_json: dict, source: DataSource, weights: str | None, run: str) -> None:
    """One trial: the spec with this trial's hyper-parameters, trained by its own TorchTrainer."""
    spec = trial_spec(JobSpec.model_validate(spec_json), config)
    # The trainer's run is named after the trial, so a resumed search resumes each trial's training.
    trial_id = ray.tune.get_context().get_trial_id()
    trainer = make_trainer(spec, source, weights, storage.join(run, "trials"), trial_id, [TuneReportCallback()])
    trainer.fit()


# ---------------------------------------------------------------------------------------
# The search space and its schedule
# ---------------------------------------------------------------------------------------
def samples_per_depth(spec: JobSpec) -> int:
    """Freeze depths are a grid; `num_samples` is shared out over it (rounded up)."""
    depths = spec.tune.freeze_depth
    return math.ceil(spec.tune.num_samples / len(depths)) if depths else spec.tune.num_samples


def trial_count(spec: JobSpec) -> int:
    return samples_per_depth(spec) * len(spec.tune.freeze_depth or [None])


def search_space(spec: JobSpec) -> dict:
    lr = spec.tune.lr
    depths = spec.tune.freeze_depth
    return {
        "lr": ray.tune.loguniform(lr.min, lr.max) if lr else spec.train.lr,
        "freeze_depth": ray.tune.grid_search(depths) if depths else spec.model.freeze_depth,
    }


def trial_spec(spec: JobSpec, config: dict) -> JobSpec:
    data = spec.model_dump(mode="json")
    data["train"]["lr"] = float(config["lr"])
    if spec.model.mode == "partial":
        data["model"]["freeze_depth"] = config["freeze_depth"]
    return JobSpec.model_validate(data)


def scheduler_name(spec: JobSpec) -> str:
    return (
        f"ASHA, grace period {spec.tune.grace_period}, keeps 1/{spec.tune.reduction_factor} per rung"
        if spec.tune.scheduler == "asha"
        else "no early stopping"
    )


def make_scheduler(spec: JobSpec):
    if spec.tune.scheduler != "asha":
        return None
    return ray.tune.schedulers.ASHAScheduler(
        time_attr="training_iteration",  # one report per epoch
        max_t=spec.train.epochs,
        grace_period=spec.tune.grace_period,
        reduction_factor=spec.tune.reduction_factor,
    )


def concurrent_trials(spec: JobSpec) -> int:
    """`tune.max_concurrent_trials`, or as many trials as the cluster's CPUs (less one for Ray Data) and GPUs hold."""
    if spec.tune.max_concurrent_trials:
        return spec.tune.max_concurrent_trials
    available = ray.cluster_resources()
    fits = []
    for resource, per_worker in worker_resources(spec).items():
        have = available.get(resource, 0) - (1 if resource == "CPU" else 0)
        fits.append(math.floor(have / (per_worker * spec.scaling.num_workers) + 1e-9))
    return max(1, min(fits + [trial_count(spec)]))


# ---------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------
def result_rows(grid: ray.tune.ResultGrid, spec: JobSpec) -> list[dict]:
    """One row per trial, best first, with its per-epoch history."""
    metric, sign = spec.tune.metric, (1 if spec.tune.mode == "max" else -1)
    rows = []
    for result in grid:
        frame = result.metrics_dataframe
        history = [] if frame is None or metric not in frame else frame.to_dict("records")
        values = [h[metric] for h in history if h.get(metric) is not None]
        epochs = len(values)
        rows.append(
            {
                "trial": result.metrics.get("trial_id") or result.path.rstrip("/").rsplit("/", 1)[-1],
                "lr": float(result.config["lr"]),
                "freeze_depth": result.config["freeze_depth"],
                "epochs": epochs,
                "metric": values[-1] if values else None,
                "best_metric": (max if sign > 0 else min)(values) if values else None,
                "stopped_early": result.error is None and epochs < spec.train.epochs,
                "status": "error" if result.error else "done",
                "checkpoint": (result.metrics or {}).get(CHECKPOINT_PATH_KEY),
                "history": [{"epoch": h.get("epoch"), **{k: h.get(k) for k in HISTORY_KEYS}} for h in history],
            }
        )
    # ranked by each trial's best epoch: that epoch is what publishing the winner exports (train.select_metric)
    rows.sort(key=lambda r: (r["best_metric"] is None, -sign * (r["best_metric"] or 0)))
    return rows


HISTORY_KEYS = ("train_loss", "val_loss", "val_accuracy", "val_top5", "images_per_second")


def results_table(rows: list[dict], spec: JobSpec) -> str:
    header = ["trial", "lr", "freeze_depth", "epochs", f"{spec.tune.metric} (last)", "best", "stopped early"]
    lines = [header]
    for r in rows:
        lines.append(
            [
                r["trial"],
                f"{r['lr']:.3g}",
                str(r["freeze_depth"]),
                f"{r['epochs']}/{spec.train.epochs}",
                "-" if r["metric"] is None else f"{r['metric']:.4f}",
                "-" if r["best_metric"] is None else f"{r['best_metric']:.4f}",
                "error" if r["status"] == "error" else ("yes" if r["stopped_early"] else "no"),
            ]
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines)


def write_results(rows: list[dict], run: str, spec: JobSpec) -> None:
    endpoint = spec.dataset.endpoint_url
    storage.write_json(
        storage.join(run, "tune_results.json"),
        {"metric": spec.tune.metric, "mode": spec.tune.mode, "epochs": spec.train.epochs, "trials": rows},
        endpoint,
    )
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    storage.write_bytes(storage.join(run, "tune_results.csv"), out.getvalue().encode(), endpoint)


def raise_if_interrupted(grid: ray.tune.ResultGrid, spec: JobSpec) -> None:
    """Tune answers Ctrl-C by saving its state and returning: a search with trials still to run is not done."""
    if grid.num_terminated + grid.num_errors < trial_count(spec):
        raise KeyboardInterrupt


def raise_if_no_trial_finished(grid: ray.tune.ResultGrid) -> None:
    """A bad input met in every trial (an unreadable checkpoint, say) is the user's to fix: exit 2."""
    if not grid.errors or len(grid.errors) < len(grid):
        return
    for error in grid.errors:
        user_error = user_error_inside(error)
        if user_error is not None:
            raise type(user_error)(str(user_error).splitlines()[0]) from None
    raise RuntimeError(f"every trial of the search failed; the first error: {grid.errors[0]}")


def best_trial(rows: list[dict]) -> dict:
    usable = [r for r in rows if r["metric"] is not None and r["checkpoint"]]
    if not usable:
        raise RuntimeError("no trial of the search reported a checkpoint; see the trial errors above")
    return usable[0]


def best_trial_spec(spec: JobSpec, best: dict) -> JobSpec:
    return trial_spec(spec, {"lr": best["lr"], "freeze_depth": best["freeze_depth"]})
