"""Gradual unfreezing (`train.unfreeze_every`): the run starts at model.freeze_depth, and every N epochs the deepest
frozen block (the one nearest the head) joins the trained part, down to `train.unfreeze_to`. Plain PyTorch: the
one Ray step, wrapping the grown trained part in DistributedDataParallel, is the `wrap` the caller hands in.

What unfreezing a block changes, in this order: the model is frozen anew at the shorter depth (its BatchNorm
layers follow model.batchnorm: tlray.models.freeze), the cut moves, the optimizer gains the block's parameter
groups at their rates (train.layer_lr_decay), the schedule is made anew at the step reached, so every group is
where the uninterrupted schedule has it, and the trained part is wrapped anew on every rank.

The frozen-prefix cache stops at the first unfreezing rather than being rebuilt: its activations are the output of
the block that now trains. A rebuilt cache would cost a feature pass over the data and a new entry on every node's
disk for each depth, to serve only `unfreeze_every` epochs, and a shorter prefix's activations are larger (an
early block's feature maps are wider than a late one's): it would rarely fit the budget or pay for its pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

from torch import nn

from tlray.archs import block_lr_factor
from tlray.console import say
from tlray.data import pipeline
from tlray.models import freeze, split
from tlray.models.layout import backbone_block_names
from tlray.spec import JobSpec
from tlray.training import setup
from tlray.training.setup import Worker

Wrap = Callable[[nn.Module], nn.Module]  # the trained part -> what trains it (DDP-wrapped on several workers)


def train_epochs(worker: Worker, spec: JobSpec, epochs: range, wrap: Wrap) -> Iterator[tuple[Worker, int, object]]:
    """(the worker to train with, 0-based epoch, its batches) for each epoch, the worker unfrozen to the epoch's
    depth first. The cache (if any) reads the epochs before the first unfreezing; one pipeline of decoded images
    reads the rest, running on across the epochs as without unfreezing."""
    source, train = worker.source, spec.train

    def depth_at(epoch: int) -> int:
        return train.freeze_depth_at(spec.freeze_depth, epoch)

    cached_until = epochs.start
    if worker.cache:
        cached_until = next((e for e in epochs if depth_at(e) != worker.depth), epochs.stop)
    readers = [(worker.cache, range(epochs.start, cached_until)), (pipeline, range(cached_until, epochs.stop))]
    for reader, span in readers:
        if not span:
            continue
        args = (source, train.seed, span, worker.rank, worker.world_size, worker.batch_size, worker.device)
        for epoch, batches in reader.train_epochs(*args):
            if depth_at(epoch) != worker.depth:
                worker = unfreeze(worker, spec, depth_at(epoch), wrap, epoch)
            yield worker, epoch, batches


def unfreeze(worker: Worker, spec: JobSpec, depth: int, wrap: Wrap, epoch: int) -> Worker:
    """The worker trained from freeze `depth` on (fewer blocks than worker.depth): the same model and optimizer,
    grown. A collective where `wrap` is DDP: every rank calls it at the same epoch. The caller drops the old worker
    (its DDP wrapper, whose gradient hooks go with it) before the next step."""
    model, arch, train = worker.model, spec.model.arch, spec.train
    frozen = freeze.freeze(model, arch, depth, spec.model.batchnorm, spec.freeze_depth)  # logs the counts
    parts = split.split(model, arch, depth)
    groups = setup.gained_groups(model, spec, worker.depth, depth)
    for group in groups:
        worker.optimizer.add_param_group(setup.with_lr(group, train.lr))
    # the schedule at the step reached, the new groups included; last_epoch: the steps taken so far
    schedule = setup.make_lr_schedule(worker.optimizer, train, worker.steps_per_epoch, worker.scheduler.last_epoch)
    if worker.rank == 0:
        blocks = backbone_block_names(arch)
        peak = train.lr * block_lr_factor(arch, depth, train.layer_lr_decay)
        say(
            f"epoch {epoch + 1}: unfreezing {blocks[depth]} (freeze_depth {worker.depth} -> {depth}, every "
            f"{train.unfreeze_every} epoch(s)): {frozen.trainable_params:,} trainable parameters, its peak lr "
            f"{peak:.3g}"
        )
        if worker.cache:
            say(
                f"frozen-prefix cache: off from epoch {epoch + 1} for all {worker.world_size} worker(s) (it holds the "
                f"output of the first {worker.depth} blocks, and {blocks[depth]} now trains)"
            )
    if worker.cache:
        worker.cache.close()  # the entry stays on the node's disk for another run or trial
    frozen_output = setup.run_frozen(parts.prefix, worker.source.preprocessing, worker.device, worker.precision.dtype)
    return dataclasses.replace(
        worker, trained=wrap(parts.rest), features=frozen_output, cache=None, scheduler=schedule, depth=depth
    )
