"""Fine-tuning on Ray Train: the per-worker loop and the driver call that runs it.

`train_loop_per_worker` is plain PyTorch except for the lines marked
``# Ray n:`` — that is everything Ray Train changes.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from tlray.console import say
from tlray.data import dataset as data
from tlray.data.dataset import BAD_LABEL, MAX_BAD_FRACTION, DataError
from tlray.errors import user_error_inside
from tlray.io import checkpoints, storage
from tlray.io.weights import fetch_weights
from tlray.models.build import build_model
from tlray.models.freeze import freeze, parameter_groups
from tlray.models.preprocessing import Preprocessing
from tlray.models.split import split
from tlray.plan import TRAIN_RUN, RunPlan
from tlray.spec import JobSpec, TrainSpec
from tlray.training import prefix_cache, rng

CHECKPOINT_FILE = checkpoints.STATE_FILE
BAD_EXAMPLES = 5  # undecodable files named in the log and metadata
REPORT_POLL_ENV, REPORT_POLL_SECONDS = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"


def train_loop_per_worker(config: dict) -> None:
    try:
        fine_tune(config)
    except Exception as exc:
        # A bad input found on a worker (an undecodable image, say) arrives wrapped in Ray's
        # task errors; raise it bare so the driver reports it as bad input (exit 2). Its first
        # line is tlray's message: Ray Data appends its retry advice below.
        user_error = user_error_inside(exc)
        if user_error is None:
            raise
        raise type(user_error)(str(user_error).splitlines()[0]) from None


def fine_tune(config: dict) -> None:
    """One worker's share of the fine-tune: plain PyTorch, plus the steps marked "Ray n"."""
    plan: RunPlan = config["plan"]  # everything the driver resolved (tlray.plan): the worker's only input
    epoch_sink = config.get("epoch_sink")  # a search's trial reads each epoch's metrics from it (tlray.tune)
    spec, source = plan.spec, plan.data  # the data: classes, counts and a reference to the keys; never the index
    torch.manual_seed(spec.train.seed)  # same init on every rank; DDP also broadcasts rank 0's weights

    # Ray 1: this worker's place in the group and its device (cuda:N or cpu).
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    nodes = count_nodes(world_size)
    if device.type == "cpu":  # Ray sets 1 thread per reserved CPU; decoding uint8 leaves the node's others idle
        workers_on_node = context.get_local_world_size() * plan.runs_at_once  # a search's trials share the node
        torch.set_num_threads(cpu_threads(node_cpus(), workers_on_node, spec.scaling.cpus_per_worker))
        if rank == 0:
            say(f"{world_size} CPU worker(s) on {nodes} node(s), {torch.get_num_threads()} torch thread(s) each")

    # Load weights, new head, then freeze — all on the bare model, before DDP wraps it.
    weights = fetch_weights(plan.weights.location, plan.endpoint_url, plan.weights.identity) if plan.weights else None
    model = build_model(spec.model.arch, weights, len(plan.classes))
    freeze(model, spec.model.arch, spec.freeze_depth, spec.model.batchnorm)  # logs the counts
    parts = split(model, spec.model.arch, spec.freeze_depth)  # the frozen blocks | the rest
    rng.seed_worker(spec.train.seed, rank, device)  # built alike on every rank; from here each its own stream
    frozen, trained = parts.prefix, parts.rest
    optimizer = make_optimizer(model, spec.train)  # its trainable parameters, no weight decay on norms and biases
    precision = mixed_precision(spec.train.amp, device)
    amp_dtype = precision.dtype
    if rank == 0:
        say(f"mixed precision: {precision.description}")

    # Ray 2: move to the device and wrap the trained part in DistributedDataParallel (when world_size > 1):
    # gradients exist, and are all-reduced, for the trained blocks only.
    # channels_last: NHWC convolutions run on the GPU's tensor cores without layout changes
    model.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.preserve_format)
    trained = ray.train.torch.prepare_model(trained, move_to_device=False)

    # what the trained part gets: decoded images through the frozen blocks (no autograd), or their cached output
    frozen_output = run_frozen(frozen, source.preprocessing, device, amp_dtype)
    cache = prefix_cache.for_worker(
        spec, source, frozen, frozen_output, device, amp_dtype, rank, world_size
    )  # None: no cache
    features = (lambda cached: cached) if cache else frozen_output

    # every step a full batch (a last batch of one image breaks BatchNorm), the same count on every worker
    batch_size, steps_per_epoch = data.train_batches(source.counts["train"], world_size, spec.train.batch_size)

    scheduler = make_lr_schedule(optimizer, spec.train, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=spec.train.label_smoothing, ignore_index=BAD_LABEL)

    # Ray 3: a re-run of the same run name (or a restarted worker group) resumes: from the newest complete
    # checkpoint in the run's storage, never older than the one Ray recorded (tlray.checkpoints says why).
    start_epoch, history, bad_examples, resumes = 0, [], [], 0
    state = resume_state(plan.checkpoints_uri, plan.endpoint_url, rank, world_size)
    if state:
        resumes = state.get("resumes", 0) + 1  # each epoch's metrics say how many restarts came before it
        restore(state, model, optimizer, scheduler, scaler)
        start_epoch, history, bad_examples = state["epoch"] + 1, state["history"], state["bad_image_examples"]
        if rank == 0:
            say(f"resuming after epoch {start_epoch} of {spec.train.epochs}")
            say_how_streams_resume(state.get("rng"), world_size)

    # Ray 4: this worker's fixed share of the rows, in a new order each epoch, decoded to uint8 by Ray Data tasks; one
    # pipeline runs on across epochs, so the next epoch's batches are ready when this one ends. With the
    # cache, the rows' activations instead (computed by the frozen blocks the first time a row comes up).
    reader = cache or data  # the cache answers the pipeline's two calls with activations in place of images
    epochs = range(start_epoch, spec.train.epochs)
    epoch_started = time.perf_counter()
    if state:  # each rank goes on with its own random streams (dropout masks), as if never stopped
        rng.resume(state.get("rng"), spec.train.seed, start_epoch, rank, device)
    for epoch, batches in reader.train_epochs(source, spec.train.seed, epochs, rank, world_size, batch_size, device):
        started = time.perf_counter()
        loss_sum, seen, bad_rows = train_epoch(
            model, trained, features, batches, optimizer, scheduler, scaler, loss_fn, amp_dtype
        )
        elapsed = time.perf_counter() - started

        val_rows = data.val_rows(source.counts["val"], rank, world_size)
        val_batches = reader.iter_batches(source, "val", val_rows, spec.train.batch_size, device)
        val, val_bad_rows = evaluate(  # the bare trained part: a DDP forward would sync buffers
            model,
            lambda images: unwrap(trained)(features(images)),
            val_batches,
            len(source.classes),
            loss_fn,
            amp_dtype,
        )
        bad_locations = [source.location("train", r) for r in bad_rows] + [
            source.location("val", r) for r in val_bad_rows
        ]
        bad_examples = (bad_examples + bad_locations)[:BAD_EXAMPLES] if epoch == 0 else bad_examples
        loss_sum, seen, elapsed, bad, total_rows = all_reduce_sum(
            [loss_sum, seen, elapsed, len(bad_locations), batch_size * steps_per_epoch + val["rows"]], device
        )
        if bad and rank == 0:
            say(
                f"skipped {int(bad)} undecodable image(s) this epoch, "
                f"e.g. {', '.join(bad_examples) or '(other workers)'}"
            )
        if bad / total_rows > MAX_BAD_FRACTION:
            raise DataError(
                f"dataset.uri: {int(bad)} of {int(total_rows)} images ({bad / total_rows:.1%}) cannot be decoded, "
                f"more than {MAX_BAD_FRACTION:.0%}; e.g. {', '.join(bad_examples)}"
            )
        metrics = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(seen, 1),
            "train_images": int(seen),  # decoded and trained on, all workers
            # images/s of the whole group: all images over the mean worker wall time
            "images_per_second": seen / (elapsed / world_size),
            "epoch_seconds": time.perf_counter() - epoch_started,  # feature pass, training and validation
            "lr": optimizer.param_groups[0]["lr"],
            "bad_images": int(bad),
            "resumes": resumes,
            "nodes": nodes,  # the worker group's, which a restart after losing a node may shrink
            **{k: v for k, v in val.items() if k != "rows"},
        }
        if device.type == "cuda":  # this epoch's peak, the first after a resume with the checkpoint's load in it
            metrics["gpu_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
            torch.cuda.reset_peak_memory_stats(device)
        if cache:  # activations computed this epoch (not found in the cache), and the seconds that took
            images, seconds = all_reduce_sum(list(cache.take_fill_stats()), device)
            metrics |= {"feature_pass_images": int(images), "feature_pass_seconds": seconds / world_size}
        history.append(metrics)

        # Ray 5: report metrics every epoch; rank 0 adds a checkpoint that Ray copies to the run's storage.
        with tempfile.TemporaryDirectory() as checkpoint_dir:
            checkpoint = None
            rank_rngs = rng.gather(device, world_size)  # every rank's streams, so each resumes its own
            if rank == 0:
                state = snapshot(model, optimizer, scheduler, scaler, epoch, history, bad_examples, resumes, rank_rngs)
                state["precision"] = precision.description  # metadata.json records it
                checkpoints.write(state, checkpoint_dir)  # the state, then its seal
                checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoints.folder_name(epoch))
        if rank == 0 and epoch_sink is not None:  # a search's trial: the epoch, its checkpoint sealed, goes to Tune
            epoch_sink.put(metrics)
        if rank == 0:  # once its checkpoint is stored: a run stopped after this line resumes after this epoch
            say(trial_prefix(context.get_experiment_name()) + format_metrics(metrics, spec.train.epochs))
        epoch_started = time.perf_counter()


# ---------------------------------------------------------------------------------------
# Small pure helpers
# ---------------------------------------------------------------------------------------
def train_epoch(model, trained, features, batches, optimizer, scheduler, scaler, loss_fn, amp_dtype):
    """One pass over this worker's batches: (summed loss, images trained on, rows of undecodable images).

    `model` is the whole model (switched to train mode; frozen blocks stay in eval, tlray.models.freeze), `trained`
    its trained part (DDP-wrapped on several workers), `features` uint8 images (or cached activations) -> its
    input. Plain PyTorch: runs without Ray.
    """
    model.train()
    device = next(model.parameters()).device
    seen, loss_sum, bad_rows = 0, torch.zeros((), device=device), []
    for batch in batches:
        labels = batch["label"]
        good = int((labels != BAD_LABEL).sum())  # the step's one read-back from the device
        if good < len(labels):
            bad_rows += batch["row"][labels == BAD_LABEL].tolist()
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = trained(features(batch["image"]))
            # an all-bad batch still runs backward, so DDP's gradient sync stays in step
            loss = loss_fn(logits, labels) if good else logits.sum() * 0.0
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        seen, loss_sum = seen + good, loss_sum + loss.detach().float() * good
    average_buffers(model)
    return float(loss_sum), seen, bad_rows


def average_buffers(model: nn.Module) -> None:
    """Every rank's floating-point buffers (BatchNorm's running statistics) set to their mean over the group.

    DDP syncs the trained part's buffers only from rank 0 at each forward, and the frozen blocks are not in DDP: with
    `model.batchnorm: train` their statistics drift apart per rank. Averaged after each epoch, every rank validates
    and checkpoints the same model (a collective: every rank calls it once per epoch).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.detach().reshape(-1).double() for b in buffers])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for buffer, mean in zip(buffers, flat.split([b.numel() for b in buffers]), strict=True):
        buffer.copy_(mean.view_as(buffer))


def snapshot(model, optimizer, scheduler, scaler, epoch, history, bad_examples, resumes, rank_rngs) -> dict:
    """What a checkpoint holds: everything a resumed run needs to go on exactly as an undisturbed one."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,  # 0-based, the last one trained
        "history": history,
        "bad_image_examples": bad_examples,
        "resumes": resumes,
        "rng": rank_rngs,  # every rank's random streams (tlray.rng)
    }


def restore(state: dict, model, optimizer, scheduler, scaler) -> None:
    """Load a `snapshot` into freshly built training objects (the random streams: tlray.rng.resume)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])


def say_how_streams_resume(saved: rng.RankStates | None, world_size: int) -> None:
    restored = min(len(saved or ()), world_size)
    if restored < world_size:
        say(
            f"random streams: {restored} of {world_size} rank(s) resume their own; the others start new ones "
            "from train.seed, the epoch and their rank (the checkpoint was saved by a group of "
            f"{len(saved or ())} rank(s))"
        )


def cpu_threads(node_cpus: float, workers_on_node: int, cpus_per_worker: float) -> int:
    """Torch threads of a CPU worker: its share of the node's CPUs, never fewer than it reserved.

    The CPUs left for Ray Data's decoding tasks are shared, not idle: a worker waits for its
    batches anyway, so the two never both need the cores for long.
    """
    return max(1, math.floor(cpus_per_worker), math.floor(node_cpus / max(1, workers_on_node)))


def node_cpus() -> float:
    """CPUs Ray gives this node (from its cgroup limits in a container, unlike os.cpu_count())."""
    node_id = ray.get_runtime_context().get_node_id()
    return next((n["Resources"].get("CPU", 1.0) for n in ray.nodes() if n["NodeID"] == node_id), 1.0)


def resume_state(checkpoints_uri: str, endpoint_url: str | None, rank: int, world_size: int) -> dict | None:
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
        recorded = ray.train.get_checkpoint()  # every rank has it
        return load_checkpoint_state(recorded) if recorded else None
    return state if rank == 0 else checkpoints.read_epoch(checkpoints_uri, chosen, endpoint_url)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def make_optimizer(trainable: nn.Module | list[nn.Parameter], train: TrainSpec) -> torch.optim.Optimizer:
    """The optimizer of a model's trainable parameters, with weight decay on those it suits (not on norm layers,
    biases, or ViT's position embedding and class token: tlray.models.freeze.parameter_groups). Given a list of
    parameters rather than the model, their names are unknown and every one decays."""
    if isinstance(trainable, nn.Module):
        groups = parameter_groups(trainable, train.weight_decay)
    else:
        groups = [{"params": list(trainable), "weight_decay": train.weight_decay}]
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=train.lr)


def make_lr_schedule(optimizer: torch.optim.Optimizer, train: TrainSpec, steps_per_epoch: int):
    """Per-step schedule: linear warm-up for `warmup_epochs`, then cosine / constant; or one-cycle."""
    total = max(1, train.epochs * steps_per_epoch)
    warmup = train.warmup_epochs * steps_per_epoch
    if train.scheduler == "onecycle":
        pct_start = train.warmup_epochs / train.epochs if train.warmup_epochs else 0.3
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=train.lr, total_steps=total, pct_start=pct_start)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if train.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype | None  # autocast's dtype; None: full precision
    description: str  # what a person reads in the log and in metadata.json


def mixed_precision(amp: str, device: torch.device) -> Precision:
    """`train.amp` on this device. `auto`: bf16 where the GPU computes it natively (compute capability 8.0 and up),
    fp16 with a GradScaler below that, off on CPU. torch.cuda.is_bf16_supported() would also count the emulated
    bf16 of a T4 or V100, several times slower than their fp16."""
    if amp == "off":
        return Precision(None, "off (train.amp: off)")
    if amp in ("bf16", "fp16"):
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        return Precision(dtype, f"{amp} (train.amp: {amp})")
    if device.type != "cuda":
        return Precision(None, "off (train.amp: auto, on CPU)")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) >= (8, 0):
        return Precision(torch.bfloat16, f"bf16 (train.amp: auto, native on compute capability {major}.{minor})")
    return Precision(
        torch.float16,
        f"fp16 with loss scaling (train.amp: auto, compute capability {major}.{minor} < 8.0 has no native bf16)",
    )


def count_nodes(world_size: int) -> int:
    """The Ray nodes the worker group is on, by node ID (Ray Train's local ranks go by IP address)."""
    node_ids = [ray.get_runtime_context().get_node_id()] * world_size
    if world_size > 1:
        dist.all_gather_object(node_ids, node_ids[0])
    return len(set(node_ids))


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


@torch.no_grad()
def evaluate(model, forward, batches, num_classes, loss_fn, amp_dtype) -> tuple[dict, list[int]]:
    """Loss and accuracy over this worker's share of the validation split, summed over all workers.

    `forward`: uint8 images (or cached activations) -> logits; `model` is switched to eval mode meanwhile.
    Returns the metrics (plus "rows": this worker's row count) and the rows of undecodable images.
    """
    was_training = model.training
    model.eval()
    loss_sum = correct = correct5 = count = rows = 0.0
    bad_rows, device = [], next(model.parameters()).device
    for batch in batches:
        good = batch["label"] != BAD_LABEL
        bad_rows += batch["row"][~good].tolist()
        rows += len(good)
        images, labels = batch["image"][good], batch["label"][good]
        if not len(labels):
            continue
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = forward(images).float()
        loss_sum += loss_fn(logits, labels).item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        if num_classes >= 5:
            correct5 += (logits.topk(5, 1).indices == labels[:, None]).any(1).sum().item()
        count += len(labels)
    model.train(was_training)
    loss_sum, correct, correct5, count = all_reduce_sum([loss_sum, correct, correct5, count], device)
    count = max(count, 1)
    metrics = {"val_loss": loss_sum / count, "val_accuracy": correct / count, "rows": rows}
    if num_classes >= 5:
        metrics["val_top5"] = correct5 / count
    return metrics, bad_rows


def run_frozen(frozen: nn.Module, preprocessing: Preprocessing, device, amp_dtype):
    """uint8 images -> the frozen blocks' output: no autograd graph, the blocks in eval mode (tlray.models.freeze)."""

    def forward(images: torch.Tensor) -> torch.Tensor:
        with (
            torch.no_grad(),
            torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None),
        ):
            inputs = preprocessing.normalise(images)
            return frozen(inputs.contiguous(memory_format=torch.channels_last) if inputs.is_cuda else inputs)

    return forward


def trial_prefix(run_name: str) -> str:
    return "" if run_name == TRAIN_RUN else f"trial {run_name}: "


def format_metrics(metrics: dict, epochs: int) -> str:
    parts = [f"epoch {metrics['epoch']}/{epochs}"]
    parts += [f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch"]
    return " ".join(parts)


# ---------------------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------------------
def fit(plan: RunPlan) -> ray.train.Result:
    """Run the loop on `scaling.num_workers` Ray Train workers; checkpoints go to `plan.checkpoints_uri`."""
    warn_if_no_cpu_left_for_data(plan.spec, trials=1)
    return make_trainer(plan).fit()


def make_trainer(plan: RunPlan, epoch_sink=None):
    """A TorchTrainer for one run of the loop; its checkpoints go to `plan.checkpoints_uri`, named after its last
    part, so that running the same plan again resumes.

    `plan.runs_at_once`: trainers sharing the cluster (a search's concurrent trials), so that CPU workers do not
    start more torch threads than there are cores: oversubscribed, they run several times slower.
    Each worker builds its own Ray Data pipeline per epoch from `plan.data` (data.iter_batches):
    that is what lets every epoch read a new global permutation of the keys.
    `epoch_sink`: a queue (ray.util.queue.Queue) that rank 0 puts each epoch's metrics in, once its checkpoint is
    stored: how a search's trial hands its epochs to Tune.
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
        train_loop_config={"plan": plan, "epoch_sink": epoch_sink},
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
    from tlray.artifacts.publish import metric_mode

    if train.select_metric == "last":
        return ray.train.CheckpointConfig(num_to_keep=train.checkpoints_to_keep)
    return ray.train.CheckpointConfig(
        num_to_keep=train.checkpoints_to_keep,
        checkpoint_score_attribute=train.select_metric,
        checkpoint_score_order=metric_mode(train.select_metric),
    )


def load_selected_checkpoint(checkpoints_uri: str, endpoint_url: str | None, select_metric: str):
    """(state of the epoch `select_metric` picks, every epoch's metrics), from a trainer's storage folder.

    The newest complete checkpoint holds the whole history: it, not the one Ray recorded, since a run stopped
    between sealing its last checkpoint and Ray recording it (and then run again, with no epoch left to train)
    has that epoch in storage only. The selected epoch's checkpoint is a sibling that checkpoint_config kept.
    """
    from tlray.artifacts.publish import select_epoch

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


def load_checkpoint_state(checkpoint: ray.train.Checkpoint) -> dict:
    with checkpoint.as_directory() as checkpoint_dir:
        return torch.load(Path(checkpoint_dir, CHECKPOINT_FILE), map_location="cpu", weights_only=False)
