"""The search: Ray Tune over learning rate x freeze depth (or random init), each trial a Tune function trainable.

A one-worker trial runs the worker's loop (tlray.training.trainer.fine_tune) in the trial's own process, which
reserves the worker's resources: starting a Ray Train controller and worker group would take longer than a short
head-only trial trains. A trial of several workers builds and fits a TorchTrainer (Ray 2.60: `Tuner(trainer)` is
gone) and hands Tune the trainer's epochs; its process only waits on the trainer, so it reserves memory, not a
CPU: holding a CPU per trial is what starves the trainers' workers on a small cluster.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import math
import os
import signal
import threading
from dataclasses import dataclass

import ray
import ray.train
import ray.tune
import ray.util.queue
from ray.tune.experiment import Trial
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from tlray.compat import ray as compat_ray
from tlray.console import say
from tlray.data.index import DatasetIndex
from tlray.errors import UserError, user_error_inside
from tlray.io import checkpoints, mlflow, storage
from tlray.metrics import SEARCH_HISTORY, too_few_classes
from tlray.plan import RunPlan
from tlray.spec import RANDOM_INIT, JobSpec
from tlray.training.trainer import (
    in_one_process,
    make_trainer,
    one_process_seat,
    run_loop,
    warn_if_no_cpu_left_for_data,
    worker_resources,
)

TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 64 * 1024**2}  # Tune needs a non-empty request
RESULT_COLUMNS = ("trial", "lr", "freeze_depth", "epochs", "metric", "best_metric", "stopped_early", "status")


def check_searchable(spec: JobSpec, index: DatasetIndex) -> None:
    """What only the data can tell: the metric must be one the loop reports for this dataset."""
    if problem := too_few_classes(spec.tune.metric, len(index.classes)):
        raise UserError(f"tune.metric: {problem}")


def run_search(plan: RunPlan) -> ray.tune.ResultGrid:
    """Run (or resume) the search whose state lives in `<run>/search`; trials train into `<run>/trials`."""
    spec, run = plan.spec, plan.run_uri
    filesystem, path = storage.filesystem(run, plan.endpoint_url)
    concurrency, verbosity = concurrent_trials(spec), tune_verbosity()
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(run_trial, plan=plan, trials_at_once=concurrency),
        worker_resources(spec) if in_one_process(spec) else TRIAL_DRIVER_RESOURCES,
    )
    experiment = storage.join(path, "search")
    if ray.tune.Tuner.can_restore(experiment, storage_filesystem=filesystem):
        say(f"resuming the search in {storage.join(run, 'search')}")
        tuner = ray.tune.Tuner.restore(
            experiment, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=filesystem
        )
    else:
        say(f"searching {trial_count(spec)} trials, {concurrency} at a time ({scheduler_name(spec)})")
        warn_if_no_cpu_left_for_data(spec, trials=concurrency)
        tuner = ray.tune.Tuner(
            trainable,
            param_space=search_space(spec),
            tune_config=ray.tune.TuneConfig(
                metric=spec.tune.metric,
                mode=spec.tune.mode,
                num_samples=1,  # the grid holds one point per trial (search_space)
                reuse_actors=in_one_process(spec),  # the next trial in a warm process: torch and tlray imported
                # the same spec samples the same lrs; the generator caps concurrency, except under hyperband
                search_alg=BasicVariantGenerator(
                    random_state=spec.train.seed,
                    max_concurrent=0 if spec.tune.scheduler == "hyperband" else concurrency,
                ),
                scheduler=make_scheduler(spec, concurrency),
            ),
            run_config=ray.tune.RunConfig(
                name="search",
                storage_path=path,
                storage_filesystem=filesystem,
                verbose=verbosity,
                failure_config=trial_failures(spec),
            ),
        )
    with ctrl_c_stops_the_search():
        return tuner.fit()


def trial_failures(spec: JobSpec) -> ray.tune.FailureConfig:
    """`scaling.max_failures` for a trial in its own process, which Tune restarts (from its latest checkpoint); a
    trial of several workers has Ray Train restart its worker group instead."""
    return ray.tune.FailureConfig(max_failures=spec.scaling.max_failures if in_one_process(spec) else 0)


STOP_REQUESTED = threading.Event()  # set by Ctrl-C or SIGTERM during the search: what Tune ran is not all


@contextlib.contextmanager
def ctrl_c_stops_the_search():
    """Ctrl-C (and tlray's SIGTERM, which calls the SIGINT handler) asks Tune to save its state and return, as
    Tune's own handler does, and records that it did: Tune marks the trials it stopped as terminated, so its
    result alone reads like a finished search. Tune's SIGUSR1 handler is its graceful stop."""
    STOP_REQUESTED.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(signum, frame):
        if STOP_REQUESTED.is_set():
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        STOP_REQUESTED.set()
        os.kill(os.getpid(), signal.SIGUSR1)

    on_sigint.graceful = True  # it returns, and the search then stops (tlray.cli's SIGTERM handler reads this)

    saved = os.environ.get(TUNE_OWN_SIGINT), signal.signal(signal.SIGINT, on_sigint)
    os.environ[TUNE_OWN_SIGINT] = "1"  # Tune leaves SIGINT to this handler
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, saved[1])
        if saved[0] is None:
            os.environ.pop(TUNE_OWN_SIGINT)
        else:
            os.environ[TUNE_OWN_SIGINT] = saved[0]


TUNE_OWN_SIGINT = "TUNE_DISABLE_SIGINT_HANDLER"


def tune_verbosity() -> int:
    """Tune's trial table only with -v: tlray prints each trial's epochs itself. Tune's newer console output
    prints its experiment banner even when silent; its classic reporter at verbosity 0 prints nothing."""
    from tlray import console

    if console.is_verbose():
        return 1
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    return 0


def run_trial(config: dict, plan: RunPlan, trials_at_once: int) -> None:
    """One trial: the spec with this trial's hyper-parameters, trained in this process (one worker) or by its own
    TorchTrainer (several).

    Tune pauses a trial (hyperband) or stops it by ending this actor, and a paused trial resumes by calling this
    function again: the trial's checkpoints are its own folder, so it resumes from its latest checkpoint, as a
    resumed search does. Each epoch reaches Tune once its checkpoint is stored (`hand_to_tune`), in order.
    """
    trial_id = ray.tune.get_context().get_trial_id()
    trial = tracked_trial(plan, plan.for_trial(trial_spec(plan.spec, config), trial_id, trials_at_once), trial_id)
    settings = storage.join(trial.checkpoints_uri, TRIAL_FILE)
    storage.write_json(settings, trial_settings(trial, config["freeze_depth"]), trial.endpoint_url)
    drop_epochs_tune_never_saw(trial.checkpoints_uri, trial.endpoint_url)
    if in_one_process(trial.spec):
        run_loop(trial, one_process_seat(trial, trial_id), ToTune(trial))
    else:
        run_trainer(trial, trial_id)


def run_trainer(trial: RunPlan, trial_id: str) -> None:
    """The trial's TorchTrainer fits in a second thread; its rank 0 puts each epoch's metrics in a queue once the
    epoch's checkpoint is stored, and this thread hands them to Tune, in order.

    The workers never wait for Tune: while Tune decides on an epoch (and pauses the trial), they may train the
    next ones. Before each report, the trial records the epoch it hands to Tune (`tune_reported.json`); a resumed
    trial first drops the checkpoints of epochs Tune never saw, so that it resumes from the last one Tune did, and
    Tune gets every epoch once, in order.
    """
    reports = ray.util.queue.Queue(actor_options={"num_cpus": 0})  # unbounded: a worker's put never waits
    trainer = make_trainer(trial, epoch_queue=reports)
    failure: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as error:  # raised below, in Tune's thread
            failure.append(error)
        finally:
            reports.put(None)  # after every worker's put: the workers have ended

    threading.Thread(target=fit, name=f"fit-{trial_id}", daemon=True).start()
    while (metrics := reports.get()) is not None:
        hand_to_tune(trial, metrics)
    if failure:
        raise failure[0]


def hand_to_tune(trial: RunPlan, metrics: dict) -> None:
    """An epoch whose checkpoint is stored, to Tune: recorded first as the last epoch Tune saw."""
    epoch = metrics["epoch"]
    storage.write_json(storage.join(trial.checkpoints_uri, REPORTED_FILE), {"epoch": epoch}, trial.endpoint_url)
    checkpoint = storage.join(trial.checkpoints_uri, checkpoints.folder_name(epoch - 1))
    # training_iteration is the epoch itself: Tune counts a resumed trial's reports from 1 again
    ray.tune.report({**metrics, "training_iteration": epoch, CHECKPOINT_PATH_KEY: checkpoint})


@dataclass(frozen=True)
class ToTune:
    """A one-worker trial's epoch queue (tlray.sinks.tune_queue): each epoch straight to Tune, which may stop the
    trial there (Tune's report returns once Tune took the epoch)."""

    trial: RunPlan

    def put(self, metrics: dict) -> None:
        hand_to_tune(self.trial, metrics)


def tracked_trial(search: RunPlan, trial: RunPlan, trial_id: str) -> RunPlan:
    """The trial with an MLflow run of its own, a child of the search's, which its epochs go to (a resumed or
    paused trial finds the same one again); without the search's, untracked."""
    parent = search.tracking
    if parent is None:
        return trial
    tags = {mlflow.PARENT_TAG: parent.run_id, "tlray.trial": trial_id, "tlray.run_uri": trial.checkpoints_uri}
    key = f"{search.run_id}/trials/{trial_id}"
    run = mlflow.start_run(parent.uri, parent.experiment_id, key, f"{search.run_id} trial {trial_id}", tags)
    if run is not None:
        run.log_params(trial.tracking_params())
    return dataclasses.replace(trial, tracking=run)


REPORTED_FILE = "tune_reported.json"  # beside a trial's checkpoints: the last epoch handed to Tune
TRIAL_FILE = "trial.json"  # beside a trial's checkpoints: what it trains with (trial_settings)


def drop_epochs_tune_never_saw(checkpoints_uri: str, endpoint_url: str | None) -> None:
    """Delete a resumed trial's checkpoints newer than the last epoch it handed to Tune, and Ray Train's record of
    its checkpoints (Ray would otherwise prune a re-trained epoch's folder as the stale one of the same name)."""
    reported_uri = storage.join(checkpoints_uri, REPORTED_FILE)
    if not storage.exists(reported_uri, endpoint_url):
        return
    reported = storage.read_json(reported_uri, endpoint_url)["epoch"]
    saved = checkpoints.epoch_folders(storage.list_tree(checkpoints_uri, endpoint_url))
    ahead = sorted(name for name, epoch in saved.items() if epoch > reported)
    if not ahead:
        return
    say(
        f"trial {checkpoints_uri.rsplit('/', 1)[-1]}: dropping {', '.join(ahead)}, "
        "trained past the last epoch the search saw"
    )
    checkpoints.prune(checkpoints_uri, endpoint_url, keep={epoch for epoch in saved.values() if epoch <= reported})
    storage.delete_file(storage.join(checkpoints_uri, compat_ray.CHECKPOINT_MANAGER_SNAPSHOT), endpoint_url)


# ---------------------------------------------------------------------------------------
# The search space and its schedule
# ---------------------------------------------------------------------------------------
def trial_count(spec: JobSpec) -> int:
    return spec.tune.num_samples


def search_space(spec: JobSpec) -> dict:
    """One grid point per trial (Tune's grid_search keeps a list's repeats), each with its own lr sample: with
    `num_samples: 1` in the TuneConfig, Tune runs exactly `spec.trial_choices`. The searcher's state (its trials and
    random state) is saved with the search, so a resumed search runs the same trials."""
    lr = spec.tune.lr
    return {
        "lr": ray.tune.loguniform(lr.min, lr.max) if lr else spec.train.lr,
        "freeze_depth": ray.tune.grid_search(spec.trial_choices),
    }


def trial_spec(spec: JobSpec, config: dict) -> JobSpec:
    """The search's spec with one trial's lr and choice. `random`: the architecture alone, as `mode: architecture`
    trains it: no weights, nothing frozen (so nothing to unfreeze), and every block at train.lr, since
    layer_lr_decay spares what pretraining taught the input-side blocks, and random init taught them nothing."""
    data = spec.model_dump(mode="json")
    data["train"]["lr"] = float(config["lr"])
    if config["freeze_depth"] == RANDOM_INIT:
        data["model"].update(mode="architecture", weights="none", freeze_depth=None)
        data["train"].update(unfreeze_every=None, unfreeze_to=0, layer_lr_decay=1.0)
    elif spec.model.mode == "partial":
        data["model"]["freeze_depth"] = config["freeze_depth"]
    return JobSpec.model_validate(data)


def trial_settings(trial: RunPlan, choice) -> dict:
    """What a trial trains with, resolved: written to `<run>/trials/<trial id>/trial.json`."""
    spec = trial.spec
    return {
        "choice": choice,
        "mode": spec.model.mode,
        "weights": spec.model.builder_weights,
        "weights_identity": trial.weights_identity,
        "freeze_depth": spec.freeze_depth,
        "frozen_blocks": trial.freeze.frozen_blocks,
        "lr": spec.train.lr,
    }


def scheduler_name(spec: JobSpec) -> str:
    tune, epochs = spec.tune, spec.train.epochs
    if tune.scheduler == "asha":
        return f"ASHA, grace period {tune.grace_period}, keeps 1/{tune.reduction_factor} per rung"
    if tune.scheduler == "hyperband":
        first = hyperband_first_rung(epochs, tune.reduction_factor)
        if first >= epochs:
            return f"HyperBand, which stops no trial early: {epochs} epochs < reduction factor {tune.reduction_factor}"
        return (
            f"synchronous HyperBand, rungs from epoch {first}, keeps 1/{tune.reduction_factor} per rung; "
            "a trial at a rung pauses until its bracket catches up"
        )
    return "no early stopping"


def hyperband_first_rung(epochs: int, reduction_factor: int) -> int:
    """The earliest epoch at which HyperBandScheduler(max_t=epochs) compares trials (its most aggressive bracket)."""
    brackets = round(math.log(epochs) / math.log(reduction_factor)) + 1  # as Ray sizes them
    return min(r for s in range(brackets) if (r := int(epochs * reduction_factor ** (-s))) > 0)


def make_scheduler(spec: JobSpec, concurrency: int):
    """The early-stopping scheduler `tune.scheduler` names (SCHEDULERS); the Tuner's TuneConfig gives it the
    metric and mode."""
    scheduler = SCHEDULERS[spec.tune.scheduler]
    if scheduler is None:
        return None
    # ASHA's first rung is the grace period; HyperBand's brackets set their own, and it starts the trials itself
    own = {"grace_period": spec.tune.grace_period} if scheduler is ASHAScheduler else {"concurrency": concurrency}
    return scheduler(
        time_attr="training_iteration",  # one report per epoch, numbered by the epoch (run_trial)
        max_t=spec.train.epochs,
        reduction_factor=spec.tune.reduction_factor,
        **own,
    )


class CappedHyperBand(ray.tune.schedulers.HyperBandScheduler):
    """Ray's synchronous HyperBand, which itself starts the trials, at most `concurrency` at a time.

    HyperBand puts each trial in a bracket as Tune creates it, and counts a bracket full by its live trials. Capped by
    the search algorithm (which counts paused trials as running), trials would be created only as others end, and
    join the brackets those leave: every trial would land in the bracket that stops none. So the search creates
    all trials at once; they wait here, PAUSED, and this scheduler starts the next whenever fewer than `concurrency`
    trials run: first one that HyperBand resumes, else a new one in bracket order. A paused trial holds nothing.
    """

    def __init__(self, concurrency: int, **kwargs):
        super().__init__(**kwargs)
        self.concurrency = concurrency
        self.waiting: list[Trial] = []  # created but never started, oldest first
        self.started: set[Trial] = set()

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        if trial.status in (Trial.TERMINATED, Trial.ERROR):
            return  # a finished trial of a resumed search: in a bracket, it would hold back the rung forever
        super().on_trial_add(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        trials = tune_controller.get_trials()
        for trial in trials:  # Tune starts every PENDING trial: a new one waits, PAUSED, until chosen here
            if trial.status == Trial.PENDING and trial not in self.started:
                compat_ray.set_trial_status(tune_controller, trial, Trial.PAUSED)
                self.waiting.append(trial)
        if sum(t.status in (Trial.PENDING, Trial.RUNNING) for t in trials) >= self.concurrency:
            return None
        resumed = super().choose_trial_to_run(tune_controller)  # a PAUSED trial HyperBand lets go on, or a PENDING one
        if resumed is not None and resumed.status == Trial.PAUSED:
            return resumed
        while self.waiting:
            trial = self.waiting.pop(0)
            if trial.status == Trial.PAUSED:  # not stopped meanwhile
                self.started.add(trial)
                return trial
        return None


SCHEDULERS = {  # tune.scheduler -> its Tune scheduler; `none`: Tune's default, every trial runs to the end
    "asha": ASHAScheduler,
    "hyperband": CappedHyperBand,
    "none": None,
}


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
                "history": [{k: h.get(k) for k in SEARCH_HISTORY} for h in history],
            }
        )
    # ranked by each trial's best epoch: that epoch is what publishing the winner exports (train.select_metric)
    rows.sort(key=lambda r: (r["best_metric"] is None, -sign * (r["best_metric"] or 0)))
    return rows


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
    if STOP_REQUESTED.is_set() or grid.num_terminated + grid.num_errors < trial_count(spec):
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
