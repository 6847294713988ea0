"""What one worker trains with, built from the run plan: plain PyTorch, without Ray.

The model (weights, new head, frozen blocks), its precision, the optimizer and learning-rate schedule,
the frozen-prefix cache and the batches of each epoch; and, for a resumed run, all of it loaded from a
checkpoint. Ray Train's one change to these objects (wrapping the trained part in DistributedDataParallel)
happens between `build_model` and `build_worker`, in tlray.training.trainer (and again whenever a block
unfreezes: tlray.training.unfreezing).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tlray.console import say
from tlray.data import order
from tlray.data.pipeline import BAD_LABEL, DataSource
from tlray.data.preprocessing import Preprocessing
from tlray.io.weights import fetch_weights
from tlray.models import build, freeze, split
from tlray.plan import RunPlan
from tlray.spec import JobSpec, TrainSpec
from tlray.training import prefix_cache, rng
from tlray.training.state import Progress, TrainState, say_how_streams_resume


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype | None  # autocast's dtype; None: full precision
    description: str  # what a person reads in the log and in metadata.json


@dataclass(frozen=True)
class Worker:
    """What one rank trains with; built alike on every rank."""

    model: nn.Module  # the whole model, on the device; its frozen blocks stay in eval mode (freeze.freeze)
    trained: nn.Module  # the part after the frozen blocks: DistributedDataParallel-wrapped on several workers
    features: Callable[[torch.Tensor], torch.Tensor]  # uint8 images (or cached activations) -> `trained`'s input
    cache: prefix_cache.FrozenPrefixCache | None  # None: the frozen blocks run on every batch
    precision: Precision
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module
    source: DataSource  # the data: classes, counts and a reference to the keys; never the index
    batch_size: int  # this worker's share of a training step
    steps_per_epoch: int  # the same on every worker
    val_batch_size: int
    rank: int
    world_size: int
    device: torch.device
    nodes: int  # the worker group's, which a restart after losing a node may shrink
    depth: int  # the frozen blocks now: model.freeze_depth, fewer as train.unfreeze_every unfreezes them

    @property
    def stateful(self) -> tuple:
        """What a checkpoint saves the state of, in TrainState's order."""
        return self.model, self.optimizer, self.scheduler, self.scaler


def build_model(plan: RunPlan, rank: int, device: torch.device, depth: int) -> tuple[nn.Module, split.Split, Precision]:
    """The model with its weights, new head and first `depth` blocks frozen, split at the cut; and the precision it
    runs in. `depth`: model.freeze_depth, or where a resumed run had unfrozen to (resumed_depth).

    Built on the bare model, before DDP wraps it, the same on every rank (DDP also broadcasts rank 0's weights);
    from here each rank draws from its own random streams.
    """
    spec = plan.spec
    torch.manual_seed(spec.train.seed)
    weights = fetch_weights(plan.weights.location, plan.endpoint_url, plan.weights.identity) if plan.weights else None
    model = build.build_model(spec.model.arch, weights, len(plan.classes))
    freeze.freeze(model, spec.model.arch, depth, spec.model.batchnorm, spec.freeze_depth)  # logs the counts
    parts = split.split(model, spec.model.arch, depth)  # the frozen blocks | the rest
    rng.seed_worker(spec.train.seed, rank, device)
    precision = mixed_precision(spec.train.amp, device)
    if rank == 0:
        say(f"mixed precision: {precision.description}")
    return model, parts, precision


def build_worker(
    plan: RunPlan,
    model: nn.Module,
    frozen: nn.Module,
    trained: nn.Module,
    precision: Precision,
    rank: int,
    world_size: int,
    device: torch.device,
    nodes: int,
    depth: int,
) -> Worker:
    """Everything else a rank trains with, around the model on its device (`trained`: its part after `frozen`, the
    first `depth` blocks)."""
    spec, source = plan.spec, plan.data
    # its trainable parameters, each block at its rate, no weight decay on norms and biases
    optimizer = make_optimizer(optimizer_groups(model, spec, depth), spec.train)
    # what the trained part gets: decoded images through the frozen blocks (no autograd), or their cached output
    frozen_output = run_frozen(frozen, source.preprocessing, device, precision.dtype)
    uncached = cache_stops_too_soon(spec, depth)
    if uncached and rank == 0:
        say(f"frozen-prefix cache: off for all {world_size} worker(s) ({uncached})")
    cache = None
    if not uncached:  # a collective: every rank has the same depth, so every rank calls it or none
        cache = prefix_cache.for_worker(spec, source, frozen, frozen_output, device, precision.dtype, rank, world_size)
    # every step a full batch (a last batch of one image breaks BatchNorm), the same count on every worker
    batch_size, steps_per_epoch = order.train_batches(source.counts["train"], world_size, spec.train.batch_size)
    return Worker(
        model=model,
        trained=trained,
        features=(lambda cached: cached) if cache else frozen_output,
        cache=cache,
        precision=precision,
        optimizer=optimizer,
        scheduler=make_lr_schedule(optimizer, spec.train, steps_per_epoch),
        scaler=torch.amp.GradScaler(device.type, enabled=precision.dtype == torch.float16),
        loss_fn=nn.CrossEntropyLoss(label_smoothing=spec.train.label_smoothing, ignore_index=BAD_LABEL),
        source=source,
        batch_size=batch_size,
        steps_per_epoch=steps_per_epoch,
        val_batch_size=spec.train.batch_size,
        rank=rank,
        world_size=world_size,
        device=device,
        nodes=nodes,
        depth=depth,
    )


def resumed_depth(spec: JobSpec, saved: dict | None) -> int:
    """The freeze depth a run starts this run of the loop at: model.freeze_depth, or for a resumed run the depth of
    its checkpoint's epoch, whose optimizer state has that depth's parameter groups (the loop then unfreezes
    further where the next epoch does)."""
    if saved is None:
        return spec.freeze_depth
    return spec.train.freeze_depth_at(spec.freeze_depth, saved["epoch"])


def cache_stops_too_soon(spec: JobSpec, depth: int) -> str | None:
    """Why gradual unfreezing leaves the frozen-prefix cache off from the start; None: it may cache until the first
    block unfreezes (the cached activations are the output of the first model.freeze_depth blocks only)."""
    train = spec.train
    if train.cache == "off" or train.freeze_depth_at(spec.freeze_depth, train.epochs - 1) == spec.freeze_depth:
        return None  # nothing unfreezes: the cache decides as usual
    if depth != spec.freeze_depth:
        return f"resumed at freeze_depth {depth}, after the first block unfroze (train.unfreeze_every)"
    if train.unfreeze_every == 1:
        return "train.unfreeze_every is 1: a block unfreezes after the first epoch, before any epoch reads it back"
    return None


def resume(worker: Worker, saved: dict | None, train: TrainSpec, weights_identity: str | None) -> Progress:
    """Where this run of the loop starts: epoch 0, or after the checkpoint `saved` (its weights, optimizer and
    schedule loaded into the worker's, over the starting weights of `weights_identity`), each rank going on with
    its own random streams (dropout masks)."""
    if saved is None:
        return Progress()
    state = TrainState.from_checkpoint(saved)
    state.restore(*worker.stateful, weights_identity)
    progress = Progress.after(state)
    if worker.rank == 0:
        say(f"resuming after epoch {progress.start_epoch} of {train.epochs}")
        say_how_streams_resume(state.rng, worker.world_size)
    rng.resume(state.rng, train.seed, progress.start_epoch, worker.rank, worker.device)
    return progress


def cpu_threads(node_cpus: float, workers_on_node: int, cpus_per_worker: float) -> int:
    """Torch threads of a CPU worker: its share of the node's CPUs, never fewer than it reserved.

    The CPUs left for Ray Data's decoding tasks are shared, not idle: a worker waits for its
    batches anyway, so the two never both need the cores for long.
    """
    return max(1, math.floor(cpus_per_worker), math.floor(node_cpus / max(1, workers_on_node)))


def optimizer_groups(model: nn.Module, spec: JobSpec, depth: int) -> list[dict]:
    """The parameter groups of a run at freeze `depth` (freeze.parameter_groups): those of the parameters that train
    from model.freeze_depth on, then those each block unfrozen since added, in the order it unfroze (the order of
    the groups in its checkpoints' optimizer state). Each block at its own rate (train.layer_lr_decay)."""
    start = spec.freeze_depth
    groups = freeze.parameter_groups(
        model, spec.train.weight_decay, lr_scales(spec), freeze.trainable_at(model, spec.model.arch, start)
    )
    for unfrozen in range(start - 1, depth - 1, -1):
        groups += gained_groups(model, spec, unfrozen + 1, unfrozen)
    return groups


def gained_groups(model: nn.Module, spec: JobSpec, before: int, after: int) -> list[dict]:
    """The parameter groups of what trains at freeze depth `after` and did not at `before`: the unfrozen block (and,
    from `all`, the neck after it: ViT's final LayerNorm)."""
    arch = spec.model.arch
    trained = {id(p) for p in freeze.trainable_at(model, arch, before)}
    gained = [p for p in freeze.trainable_at(model, arch, after) if id(p) not in trained]
    return freeze.parameter_groups(model, spec.train.weight_decay, lr_scales(spec), gained)


def lr_scales(spec: JobSpec) -> Callable[[str], float] | None:
    decay = spec.train.layer_lr_decay
    return freeze.layer_lr_scales(spec.model.arch, decay) if decay != 1 else None


def with_lr(group: dict, lr: float) -> dict:
    """A group of freeze.parameter_groups as the optimizer takes it: at its factor of `lr`."""
    return {"params": group["params"], "weight_decay": group["weight_decay"], "lr": lr * group["lr_scale"]}


def make_optimizer(trainable: nn.Module | list[nn.Parameter] | list[dict], train: TrainSpec) -> torch.optim.Optimizer:
    """The optimizer of a model's trainable parameters, with weight decay on those it suits (not on norm layers,
    biases, or ViT's position embedding and class token: freeze.parameter_groups). Given a list of parameters
    rather than the model, their names are unknown and every one decays; given parameter groups
    (freeze.parameter_groups), each trains at its factor of train.lr."""
    if isinstance(trainable, nn.Module):
        groups = freeze.parameter_groups(trainable, train.weight_decay)
    elif trainable and isinstance(trainable[0], dict):
        groups = trainable
    else:
        groups = [{"params": list(trainable), "weight_decay": train.weight_decay, "lr_scale": 1.0}]
    groups = [with_lr(group, train.lr) for group in groups]
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=train.lr)


def make_lr_schedule(optimizer: torch.optim.Optimizer, train: TrainSpec, steps_per_epoch: int, step: int = 0):
    """Per-step schedule: linear warm-up for `warmup_epochs`, then cosine / constant; or one-cycle. Every parameter
    group follows it relative to its own peak rate (train.layer_lr_decay sets them apart): the "lr" it joined the
    optimizer with. `step`: the steps already taken, for a schedule made anew when the optimizer gains a group
    mid-run (tlray.training.unfreezing): its rates are then those of that step."""
    total = max(1, train.epochs * steps_per_epoch)
    warmup = train.warmup_epochs * steps_per_epoch
    if train.scheduler == "onecycle":
        pct_start = train.warmup_epochs / train.epochs if train.warmup_epochs else 0.3
        peaks = [group.get("max_lr", group["lr"]) for group in optimizer.param_groups]  # max_lr: OneCycleLR's own

        def one_cycle(last_epoch: int):
            return torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=peaks, total_steps=total, pct_start=pct_start, last_epoch=last_epoch
            )

        made = one_cycle(-1)  # sets every group's start, peak and final rate and momentum from its peak
        return one_cycle(step - 1) if step else made

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if train.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])  # LambdaLR's base rate: a group gained mid-run joins at its peak
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=step - 1)


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


def run_frozen(frozen: nn.Module, preprocessing: Preprocessing, device, amp_dtype):
    """uint8 images -> the frozen blocks' output: no autograd graph, the blocks in eval mode (freeze.freeze)."""

    def forward(images: torch.Tensor) -> torch.Tensor:
        with (
            torch.no_grad(),
            torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None),
        ):
            inputs = preprocessing.normalise(images)
            return frozen(inputs.contiguous(memory_format=torch.channels_last) if inputs.is_cuda else inputs)

    return forward
