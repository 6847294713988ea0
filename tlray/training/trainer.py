"""Fine-tuning: the per-worker function, and the driver call that runs it, on a Ray Train worker group or, for one
worker, in one Ray actor.

`fine_tune` is plain PyTorch (tlray.training.setup builds the worker, tlray.training.loop runs each epoch)
except for the lines marked ``# Ray n:`` — that is everything Ray changes. A run of one worker has no collectives
to set up, and a Ray Train controller and worker group take longer to start (6-8 s) than a head-only run trains:
it runs the same loop in one Ray actor (`one_process_seat`), which stores and prunes its checkpoints as Ray Train
would, and which Ray runs again from the newest complete checkpoint when its process dies.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from tlray import sinks
from tlray.console import say
from tlray.data import pipeline
from tlray.errors import user_error_inside
from tlray.io import checkpoints, storage
from tlray.metrics import metric_mode, select_epoch
from tlray.plan import TRAIN_RUN, RunPlan
from tlray.spec import JobSpec, TrainSpec
from tlray.training import loop, rng, setup, unfreezing
from tlray.training.setup import cpu_threads
from tlray.training.state import TrainState

REPORT_POLL_ENV, REPORT_POLL_SECONDS = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"


@dataclass(frozen=True)
class Seat:
    """Where one worker's loop runs: a place in a Ray Train worker group (`ray_train_seat`), or a process of its own
    (`one_process_seat`: a one-worker run's Ray actor, a one-worker search trial). All the loop asks of Ray goes
    through it."""

    rank: int
    world_size: int
    local_world_size: int  # workers on this node
    device: torch.device
    run_name: str  # TRAIN_RUN, or the search trial's id
    wrap: Callable[[nn.Module], nn.Module]  # the trained part, made ready for the group (DDP with several workers)
    report: Callable[[dict, TrainState | None], None]  # an epoch's metrics, and rank 0's state: stored, recorded
    recorded_state: Callable[[], dict | None]  # the checkpoint Ray recorded for this run, if any


def run_loop(plan: RunPlan, seat: Seat, epoch_queue=None) -> None:
    """`fine_tune`, with a bad input found on a worker raised bare."""
    try:
        fine_tune(plan, seat, epoch_queue)
    except Exception as exc:
        # A bad input found on a worker (an undecodable image, say) arrives wrapped in Ray's
        # task errors; raise it bare so the driver reports it as bad input (exit 2). Its first
        # line is tlray's message: Ray Data appends its retry advice below.
        user_error = user_error_inside(exc)
        if user_error is None:
            raise
        raise type(user_error)(str(user_error).splitlines()[0]) from None


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's entry point on each worker of the group."""
    run_loop(config["plan"], ray_train_seat(), config.get("epoch_queue"))


def fine_tune(plan: RunPlan, seat: Seat, epoch_queue=None) -> None:
    """One worker's share of the fine-tune: plain PyTorch, plus the steps marked "Ray n".

    `plan`: everything the driver resolved (tlray.plan), the worker's only input; plan.data holds the classes,
    counts and a reference to the keys, never the index. `epoch_queue`: where rank 0 hands each stored epoch to
    a search's trial (tlray.sinks.tune_queue)."""
    spec = plan.spec

    # Ray 1: this worker's place in the group and its device (cuda:N or cpu).
    rank, world_size, device = seat.rank, seat.world_size, seat.device
    nodes = count_nodes(world_size)
    if device.type == "cpu":  # Ray sets 1 thread per reserved CPU; decoding uint8 leaves the node's others idle
        workers_on_node = seat.local_world_size * plan.runs_at_once  # a search's trials share the node
        torch.set_num_threads(cpu_threads(node_cpus(), workers_on_node, spec.scaling.cpus_per_worker))
        if rank == 0:
            say(f"{world_size} CPU worker(s) on {nodes} node(s), {torch.get_num_threads()} torch thread(s) each")

    # Ray 2: a re-run of the same run name (or a restarted worker group) resumes: from the newest complete
    # checkpoint in the run's storage, never older than the one Ray recorded (tlray.io.checkpoints says why),
    # at the freeze depth of its epoch (train.unfreeze_every), which decides the model's cut and optimizer groups.
    saved = resume_state(plan.checkpoints_uri, plan.endpoint_url, rank, world_size, seat.recorded_state)
    depth = setup.resumed_depth(spec, saved)
    model, parts, precision = setup.build_model(plan, rank, device, depth)  # alike on every rank, then its own streams

    # Ray 3: move to the device and wrap the trained part in DistributedDataParallel (when world_size > 1):
    # gradients exist, and are all-reduced, for the trained blocks only. A block that unfreezes grows the trained
    # part: every rank wraps it anew, with `seat.wrap` (tlray.training.unfreezing).
    # channels_last: NHWC convolutions run on the GPU's tensor cores without layout changes
    model.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.preserve_format)
    trained = seat.wrap(parts.rest)
    worker = setup.build_worker(plan, model, parts.prefix, trained, precision, rank, world_size, device, nodes, depth)
    del trained  # the worker holds the wrapper alone: an unfrozen block's rewrap leaves no stale gradient hooks
    progress = setup.resume(worker, saved, spec.train, plan.weights_identity)

    # Ray 4: this worker's fixed share of the rows, in a new order each epoch, decoded to uint8 by Ray Data tasks; one
    # pipeline runs on across epochs, so the next epoch's batches are ready when this one ends. With the
    # cache, the rows' activations instead (computed by the frozen blocks the first time a row comes up).
    # Each epoch comes with the worker at its freeze depth: unfrozen and rewrapped where the depth falls.
    epochs = range(progress.start_epoch, spec.train.epochs)
    epoch_started = time.perf_counter()
    with contextlib.closing(open_sinks(plan, seat.run_name, epoch_queue, rank)) as epoch_sinks:
        for worker, epoch, batches in unfreezing.train_epochs(worker, spec, epochs, seat.wrap):  # noqa: B020 — drops the old one
            metrics = loop.run_epoch(worker, epoch, batches, progress, epoch_started)

            # Ray 5: report metrics every epoch; rank 0 adds a checkpoint: the trained tensors, optimizer and
            # schedule (the frozen blocks are the starting weights'), stored in the run's storage.
            rank_rngs = rng.gather(device, world_size)  # every rank's streams, so each resumes its own
            state = None
            if rank == 0:
                state = TrainState.capture(
                    *worker.stateful, epoch, progress, rank_rngs, precision.description, plan.weights_identity
                )
            seat.report(metrics, state)
            # rank 0's sinks, once its checkpoint is stored: a run stopped after this resumes after this epoch
            epoch_sinks.log_epoch(epoch + 1, metrics)
            epoch_started = time.perf_counter()


def ray_train_seat() -> Seat:
    """A worker's place in a Ray Train worker group."""
    context = ray.train.get_context()

    def report(metrics: dict, state: TrainState | None) -> None:
        with tempfile.TemporaryDirectory() as checkpoint_dir:
            checkpoint = None
            if state is not None:
                checkpoints.write(state.to_checkpoint(), checkpoint_dir)  # the state, then its seal
                checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir)
            name = checkpoints.folder_name(metrics["epoch"] - 1)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)  # Ray copies it to storage

    def recorded_state() -> dict | None:
        recorded = ray.train.get_checkpoint()  # every rank has it
        return load_checkpoint_state(recorded) if recorded else None

    return Seat(
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        local_world_size=context.get_local_world_size(),
        device=ray.train.torch.get_device(),
        run_name=context.get_experiment_name(),
        wrap=functools.partial(ray.train.torch.prepare_model, move_to_device=False),
        report=report,
        recorded_state=recorded_state,
    )


def in_one_process(spec: JobSpec) -> bool:
    """A run (or search trial) of one worker trains in one process: no Ray Train controller and worker group to
    start, which is most of a short run's time; several workers need the group's collectives."""
    return spec.scaling.num_workers == 1


def one_process_seat(plan: RunPlan, run_name: str) -> Seat:
    """A process of its own as a worker group of one: its checkpoints stored and pruned as Ray Train would."""

    def report(metrics: dict, state: TrainState | None) -> None:
        checkpoints.store(state.to_checkpoint(), plan.checkpoints_uri, plan.endpoint_url)  # the seal last
        checkpoints.prune(plan.checkpoints_uri, plan.endpoint_url, epochs_to_keep(state.history, plan.spec.train))

    device = torch.device("cuda") if plan.spec.scaling.use_gpu else torch.device("cpu")  # Ray set the visible GPU
    return Seat(0, 1, 1, device, run_name, lambda trained: trained, report, lambda: None)


def open_sinks(plan: RunPlan, run_name: str, epoch_queue, rank: int) -> sinks.Sinks:
    """Rank 0's metrics sinks (tlray.sinks); the other ranks log nowhere."""
    if rank != 0:
        return sinks.Sinks([])
    trial = None if run_name == TRAIN_RUN else run_name
    return sinks.open_all(sinks.SinkContext(trial, plan.spec.train.epochs, epoch_queue, plan.tracking))


# ---------------------------------------------------------------------------------------
# What a worker asks Ray: its node, the group's nodes, the checkpoint to resume from
# ---------------------------------------------------------------------------------------
def node_cpus() -> float:
    """CPUs Ray gives this node (from its cgroup limits in a container, unlike os.cpu_count())."""
    node_id = ray.get_runtime_context().get_node_id()
    return next((n["Resources"].get("CPU", 1.0) for n in ray.nodes() if n["NodeID"] == node_id), 1.0)


def count_nodes(world_size: int) -> int:
    """The Ray nodes the worker group is on, by node ID (Ray Train's local ranks go by IP address)."""
    node_ids = [ray.get_runtime_context().get_node_id()] * world_size
    if world_size > 1:
        dist.all_gather_object(node_ids, node_ids[0])
    return len(set(node_ids))


def resume_state(
    checkpoints_uri: str, endpoint_url: str | None, rank: int, world_size: int, recorded_state=lambda: None
) -> dict | None:
    """The newest complete checkpoint's state, else the one Ray recorded (older checkpoints have no seal); None
    for a new run. Rank 0 picks the checkpoint and hands the others its epoch; each rank reads it into CPU memory.
    A broadcast of the state itself would stage model and optimizer state on every GPU (NCCL's object collectives
    pickle through device memory): with AdamW three times the parameters, on top of the model."""
    state, chosen = None, None
    if rank == 0:
        found = checkpoints.newest_complete(checkpoints_uri, endpoint_url)
        if found is not None:
            state, chosen = found.state, found.state["epoch"]
            if found.skipped:
                say(f"checkpoints not resumed from, being incomplete: {', '.join(found.skipped)}")
    if world_size > 1:
        holder = [chosen]
        dist.broadcast_object_list(holder, src=0)  # an int
        chosen = holder[0]
    if chosen is None:
        return recorded_state()
    return state if rank == 0 else checkpoints.read_epoch(checkpoints_uri, chosen, endpoint_url)


def load_checkpoint_state(checkpoint: ray.train.Checkpoint) -> dict:
    with checkpoint.as_directory() as checkpoint_dir:
        return torch.load(Path(checkpoint_dir, checkpoints.STATE_FILE), map_location="cpu", weights_only=False)


# ---------------------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------------------
def fit(plan: RunPlan) -> None:
    """Run the loop on `scaling.num_workers` Ray Train workers, or one worker's in one Ray actor; checkpoints go to
    `plan.checkpoints_uri`."""
    warn_if_no_cpu_left_for_data(plan.spec, trials=1)
    if in_one_process(plan.spec):
        fit_in_one_process(plan)
    else:
        make_trainer(plan).fit()


def fit_in_one_process(plan: RunPlan) -> None:
    """The loop in one Ray actor holding one worker's resources. Ray restarts the actor and calls it again
    (`scaling.max_failures` times) when its process dies, and the loop resumes from the newest complete checkpoint,
    as a restarted worker group does; an error the loop raises ends the run. Stopped (Ctrl-C, SIGTERM), the driver
    ends the actor with it: the checkpoints it sealed are kept."""
    spec, resources = plan.spec, worker_resources(plan.spec)
    pipeline.warm_decoding_processes(int(ray.available_resources().get("CPU", 0) - resources["CPU"]))
    worker = (
        ray.remote(SingleWorker)
        .options(
            num_cpus=resources["CPU"],
            num_gpus=resources.get("GPU", 0),
            max_restarts=spec.scaling.max_failures,
            max_task_retries=spec.scaling.max_failures,
        )
        .remote()
    )
    try:
        ray.get(worker.fit.remote(plan))
    finally:
        ray.kill(worker)


class SingleWorker:
    """The Ray actor of a one-worker run. An actor, not a task: a task that blocks on Ray Data's blocks lends its CPU
    back to the scheduler meanwhile, and the same loop in a task ran its uncached epochs 2.8x slower (4.5 s against
    1.6 s an epoch, full fine-tune at the demo's size)."""

    def fit(self, plan: RunPlan) -> None:
        run_loop(plan, one_process_seat(plan, TRAIN_RUN))


def make_trainer(plan: RunPlan, epoch_queue=None):
    """A TorchTrainer for one run of the loop; its checkpoints go to `plan.checkpoints_uri`, named after its last
    part, so that running the same plan again resumes.

    `plan.runs_at_once`: trainers sharing the cluster (a search's concurrent trials), so that CPU workers do not
    start more torch threads than there are cores: oversubscribed, they run several times slower.
    Each worker builds its own Ray Data pipeline per epoch from `plan.data` (pipeline.iter_batches):
    that is what lets every epoch read a new global permutation of the keys.
    `epoch_queue`: a queue (ray.util.queue.Queue) that rank 0 puts each epoch's metrics in, once its checkpoint is
    stored (tlray.sinks.tune_queue): how a search's trial hands its epochs to Tune.
    """
    from ray.train.torch import TorchTrainer

    # Ray Train's controller takes each worker's report on its health-check poll (every 2 s by default), and
    # a worker's next report waits for it: up to 2 s lost per epoch. The driver's value reaches the controller.
    os.environ.setdefault(REPORT_POLL_ENV, REPORT_POLL_SECONDS)
    spec = plan.spec
    storage_uri, name = plan.checkpoints_uri.rsplit("/", 1)
    filesystem, storage_path = storage.filesystem(storage_uri, plan.endpoint_url)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": plan, "epoch_queue": epoch_queue},
        scaling_config=ray.train.ScalingConfig(
            num_workers=spec.scaling.num_workers,
            use_gpu=spec.scaling.use_gpu,
            resources_per_worker=worker_resources(spec),
            placement_strategy=spec.scaling.placement.upper(),  # soft: SPREAD packs what no other node can take
        ),
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if spec.scaling.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=spec.scaling.max_failures),
            checkpoint_config=checkpoint_config(spec.train),
        ),
    )


def checkpoint_config(train: TrainSpec) -> ray.train.CheckpointConfig:
    """Keep the best `checkpoints_to_keep` epochs by `select_metric` (the most recent ones with `last`).

    Ray's checkpoint manager always keeps the latest checkpoint besides those, and that latest one is what
    `ray.train.get_checkpoint()` hands a re-run to resume from; so the epoch publish picks is never pruned.
    """
    if train.select_metric == "last":
        return ray.train.CheckpointConfig(num_to_keep=train.checkpoints_to_keep)
    return ray.train.CheckpointConfig(
        num_to_keep=train.checkpoints_to_keep,
        checkpoint_score_attribute=train.select_metric,
        checkpoint_score_order=metric_mode(train.select_metric),
    )


def epochs_to_keep(history: list[dict], train: TrainSpec) -> set[int]:
    """The 1-based epochs whose checkpoints `checkpoint_config` keeps after the last one in `history`: the latest,
    and the best `checkpoints_to_keep` by `select_metric` (the most recent with `last`), ties to the latest."""
    left, kept = list(history), {history[-1]["epoch"]}
    for _ in range(min(train.checkpoints_to_keep, len(history))):
        best = select_epoch(left, train.select_metric).epoch
        kept.add(best)
        left = [entry for entry in left if entry["epoch"] != best]
    return kept


def load_selected_checkpoint(checkpoints_uri: str, endpoint_url: str | None, select_metric: str):
    """(state of the epoch `select_metric` picks, every epoch's metrics), from a trainer's storage folder.

    The newest complete checkpoint holds the whole history: it, not the one Ray recorded, since a run stopped
    between sealing its last checkpoint and Ray recording it (and then run again, with no epoch left to train)
    has that epoch in storage only. The selected epoch's checkpoint is a sibling that checkpoint_config kept.
    """
    found = checkpoints.newest_complete(checkpoints_uri, endpoint_url)
    if found is None:
        raise RuntimeError(f"no complete checkpoint under {checkpoints_uri}: nothing to publish")
    state, history = found.state, found.state["history"]
    selected = select_epoch(history, select_metric).epoch
    if selected != state["epoch"] + 1:
        state = checkpoints.read_epoch(checkpoints_uri, selected - 1, endpoint_url)
    return state, history


def warn_if_no_cpu_left_for_data(spec: JobSpec, trials: int) -> None:
    # Ray Data decodes in tasks that need a CPU beside the workers'; with none left they
    # wait forever (an autoscaling cluster may still add a node, so this only warns).
    spare = ray.cluster_resources().get("CPU", 0) - trials * spec.scaling.num_workers * spec.scaling.cpus_per_worker
    if spare < 1:
        say(
            f"warning: the cluster has {spare:g} CPU(s) left beside {trials} x {spec.scaling.num_workers} worker(s) x "
            f"{spec.scaling.cpus_per_worker:g} CPU; Ray Data needs at least 1 to decode images. "
            "Lower scaling.cpus_per_worker or scaling.num_workers, or add a node."
        )


def worker_resources(spec: JobSpec) -> dict[str, float]:
    resources = {"CPU": spec.scaling.cpus_per_worker}
    if spec.scaling.use_gpu:
        resources["GPU"] = spec.scaling.gpus_per_worker
    return resources
