"""Discriminative learning rates and gradual unfreezing, without Ray: ResNet-18 at 32 px (blocks stem, layer1 ..
layer4, head fc) built and trained by the worker's own setup and loop, as tlray.training.trainer.fine_tune runs
them, on in-memory images in place of Ray Data's pipeline."""

from __future__ import annotations

import copy
import functools
import math
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torchvision
from test_workers import run_group
from torch import nn

from tlray.data import order
from tlray.data.pipeline import DataSource
from tlray.errors import UserError
from tlray.io import checkpoints
from tlray.models import build
from tlray.models.trained import load_model_state
from tlray.plan import RunPlan, Weights
from tlray.plan import preprocessing as preprocessing_for
from tlray.spec import JobSpec
from tlray.training import loop, prefix_cache, rng, setup, unfreezing
from tlray.training.state import TrainState

from conftest import spec_dict

CPU = torch.device("cpu")
BLOCKS = ["stem", "layer1", "layer2", "layer3", "layer4"]
PREFIXES = {"stem": ("conv1.", "bn1."), **{name: (f"{name}.",) for name in BLOCKS[1:]}}  # written out by hand
COUNTS = {"train": 16, "val": 8}  # 2 steps of 8 an epoch


def job(depth=4, batchnorm="frozen", **train) -> JobSpec:
    model = {"arch": "resnet18", "weights": "DEFAULT", "mode": "partial", "freeze_depth": depth, "batchnorm": batchnorm}
    return JobSpec.model_validate(
        spec_dict(
            "/images",
            "/out",
            model=model,
            train={"epochs": 5, "batch_size": 8, "lr": 0.01, "seed": 3, "cache": "off", **train},
        )
    )


def plan_of(spec: JobSpec, weights: Weights | None = None) -> RunPlan:
    preprocessing = preprocessing_for("resnet18", 32)
    source = DataSource("/images", None, ("a", "b", "c"), COUNTS, "fp", None, preprocessing, False, "skip", 1, 1.0)
    # weights None: random init in place of the pretrained ones (nothing downloads)
    return RunPlan(spec, "/out/tiny/runs/r", weights, source.classes, preprocessing, None, source, "/out/r/train")


def weights_file(folder: Path, identity: str = "sha256 0a0a") -> Weights:
    """A ResNet-18 checkpoint of random weights in place of pretrained ones, and the identity a plan records."""
    torch.manual_seed(11)
    path = folder / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), path)
    return Weights(str(path), identity)


class Images:
    """Stands in for tlray.data.pipeline: uint8 images, a pure function of the rank, split and row (a class shifts
    the colour), in a new order each epoch."""

    def __init__(self, rank: int = 0) -> None:
        self.rank = rank
        self.train_epochs_read: list[int] = []

    def batch(self, split: str, rows: torch.Tensor) -> dict:
        labels = rows % 3
        images = []
        for row in rows.tolist():
            generator = torch.Generator().manual_seed(1_000_000 * self.rank + 1000 * (split == "val") + row)
            images.append(torch.randint(0, 150, (3, 32, 32), generator=generator, dtype=torch.uint8))
        images = torch.stack(images) + (labels * 50).to(torch.uint8)[:, None, None, None]
        return {"image": images, "label": labels, "row": rows}

    def train_epochs(self, source, seed, epochs, rank, world_size, batch_size, device):
        steps = order.train_batches(source.counts["train"], world_size, batch_size)[1]  # what the schedule counts
        for epoch in epochs:
            self.train_epochs_read.append(epoch)
            rows = torch.randperm(source.counts["train"], generator=torch.Generator().manual_seed(100 * seed + epoch))
            rows = rows[rank::world_size][: steps * batch_size]
            yield epoch, iter([self.batch("train", rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)])

    def iter_batches(self, source, split, rows, batch_size, device):
        rows = torch.as_tensor(rows, dtype=torch.int64)
        return [self.batch(split, rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]


@dataclass
class Run:
    worker: setup.Worker
    history: list[dict]
    groups: list[list[tuple[float, int]]] = field(default_factory=list)  # per epoch: each group's (lr, parameters)
    saved: dict | None = None  # the checkpoint taken after `stop_after`, read back through the file format
    initial: dict | None = None  # the model's state before the first epoch


def train(
    spec: JobSpec,
    images: Images,
    saved=None,
    stop_after=None,
    folder: Path | None = None,
    wrap=None,
    weights: Weights | None = None,
    whole_checkpoint: bool = False,
) -> Run:
    """What fine_tune runs, without Ray: `wrap` stands for prepare_model (one worker: no wrapper). Starting from
    `weights`, the checkpoint holds what was trained only, unless `whole_checkpoint`."""
    plan = plan_of(spec, weights)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rank = torch.distributed.get_rank() if world > 1 else 0
    depth = setup.resumed_depth(spec, saved)
    model, parts, precision = setup.build_model(plan, rank, CPU, depth)
    wrap = wrap or (lambda rest: rest)
    worker = setup.build_worker(plan, model, parts.prefix, wrap(parts.rest), precision, rank, world, CPU, 1, depth)
    progress = setup.resume(worker, saved, spec.train, plan.weights_identity)
    run = Run(worker, progress.history, initial=copy.deepcopy(model.state_dict()))
    epochs = range(progress.start_epoch, spec.train.epochs)
    for worker, epoch, batches in unfreezing.train_epochs(worker, spec, epochs, wrap):  # noqa: B020
        loop.run_epoch(worker, epoch, batches, progress, time.perf_counter())
        run.worker = worker
        run.groups.append([(g["lr"], sum(p.numel() for p in g["params"])) for g in worker.optimizer.param_groups])
        if epoch == stop_after:
            identity = None if whole_checkpoint else plan.weights_identity
            state = TrainState.capture(*worker.stateful, epoch, progress, rng.gather(CPU, world), None, identity)
            folder.mkdir(parents=True, exist_ok=True)
            checkpoints.write(state.to_checkpoint(), folder)
            run.saved = torch.load(folder / checkpoints.STATE_FILE, map_location="cpu", weights_only=False)
    return run


@pytest.fixture
def images(monkeypatch) -> Images:
    fake = Images()
    monkeypatch.setattr(unfreezing, "pipeline", fake)
    monkeypatch.setattr(loop, "pipeline", fake)
    monkeypatch.setattr(prefix_cache, "for_worker", lambda *args: None)  # the cache's decision reads Ray's store
    return fake


def names_of(model: nn.Module, params) -> set[str]:
    ids = {id(p) for p in params}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def block_of(name: str) -> str:
    return next((block for block, prefixes in PREFIXES.items() if name.startswith(prefixes)), "head")


def numel_after(model: nn.Module, depth: int) -> int:
    """Parameters of the blocks after the first `depth`, and the head: counted by name, without tlray."""
    return sum(p.numel() for name, p in model.named_parameters() if block_of(name) not in BLOCKS[:depth])


# ---------------------------------------------------------------------------------------
# train.layer_lr_decay: each block's rate, through every schedule
# ---------------------------------------------------------------------------------------
def reference_lrs(spec: JobSpec, steps: int) -> list[float]:
    """The schedule of one parameter group at train.lr, step by step, computed without tlray (onecycle: torch's)."""
    train, total, warmup = spec.train, spec.train.epochs * 2, spec.train.warmup_epochs * 2
    if train.scheduler == "onecycle":
        optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=train.lr)
        pct = train.warmup_epochs / train.epochs
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, train.lr, total_steps=total, pct_start=pct)
        lrs = [optimizer.param_groups[0]["lr"]]
        for _ in range(steps):
            optimizer.step()
            schedule.step()
            lrs.append(optimizer.param_groups[0]["lr"])
        return lrs
    cosine = [0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))) for s in range(steps + 1)]
    constant = [1.0] * (steps + 1)
    return [
        train.lr * ((s + 1) / warmup if s < warmup else (cosine if train.scheduler == "cosine" else constant)[s])
        for s in range(steps + 1)
    ]


@pytest.mark.parametrize("scheduler", ["cosine", "onecycle", "constant"])
def test_each_block_trains_at_lr_times_decay_to_its_distance_from_the_head_at_every_step(images, scheduler):
    spec = job(depth=1, layer_lr_decay=0.5, scheduler=scheduler, warmup_epochs=1)  # the stem frozen
    plan = plan_of(spec)
    model, parts, precision = setup.build_model(plan, 0, CPU, 1)
    worker = setup.build_worker(plan, model, parts.prefix, parts.rest, precision, 0, 1, CPU, 1, 1)
    optimizer, schedule = worker.optimizer, worker.scheduler

    groups = [names_of(model, g["params"]) for g in optimizer.param_groups]
    blocks = [{block_of(name) for name in group} for group in groups]
    # head first, then layer4 .. layer1, each as (decayed weights, then norms and biases)
    assert blocks == [{"head"}] * 2 + [{"layer4"}] * 2 + [{"layer3"}] * 2 + [{"layer2"}] * 2 + [{"layer1"}] * 2
    assert groups[0] == {"fc.weight"} and groups[1] == {"fc.bias"}
    assert [g["weight_decay"] for g in optimizer.param_groups] == [spec.train.weight_decay, 0.0] * 5
    distance = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]  # layer4 is 1 block from the head, layer1 4
    assert set().union(*groups) == set(names_of(model, (p for p in model.parameters() if p.requires_grad)))

    expected = reference_lrs(spec, steps=6)
    for step in range(7):  # step 0 is before any scheduler step: the first warm-up rate
        lrs = [g["lr"] for g in optimizer.param_groups]
        assert lrs == pytest.approx([expected[step] * 0.5**i for i in distance], rel=1e-12, abs=0), f"step {step}"
        optimizer.step()  # no gradients: nothing moves, but the schedule sees the step it expects first
        schedule.step()
    assert expected[0] < expected[2]  # the steps crossed the warm-up


# ---------------------------------------------------------------------------------------
# train.unfreeze_every: the depth, the parameters and the optimizer, epoch by epoch
# ---------------------------------------------------------------------------------------
def test_every_two_epochs_the_deepest_frozen_block_unfreezes_and_the_optimizer_gains_its_groups(images):
    spec = job(depth=4, unfreeze_every=2, layer_lr_decay=0.5, scheduler="cosine", warmup_epochs=1)
    run = train(spec, images)
    model = run.worker.model

    assert [h["freeze_depth"] for h in run.history] == [4, 4, 3, 3, 2]
    assert [h["trainable_parameters"] for h in run.history] == [numel_after(model, d) for d in (4, 4, 3, 3, 2)]
    assert numel_after(model, 4) < numel_after(model, 3) < numel_after(model, 2)
    assert [len(g) for g in run.groups] == [4, 4, 6, 6, 8]  # (decayed, kept) of fc, layer4; then layer3; then layer2
    assert [n for _, n in run.groups[2][:4]] == [n for _, n in run.groups[1]]  # the groups it had keep their params
    groups = run.worker.optimizer.param_groups
    assert {block_of(n) for g in groups[4:6] for n in names_of(model, g["params"])} == {"layer3"}
    assert {block_of(n) for g in groups[6:] for n in names_of(model, g["params"])} == {"layer2"}
    # after each epoch (2 steps), every group where the schedule has it, the groups gained mid-run included
    expected = reference_lrs(spec, steps=10)
    distance = [0, 0, 1, 1, 2, 2, 3, 3]  # fc, layer4, then layer3, layer2 as they join
    for epoch, lrs in enumerate(run.groups):
        scaled = [expected[2 * (epoch + 1)] * 0.5**i for i in distance[: len(lrs)]]
        assert [lr for lr, _ in lrs] == pytest.approx(scaled, rel=1e-12, abs=1e-15), f"epoch {epoch + 1}"
    assert run.groups[2][4][0] == pytest.approx(0.0025 * expected[6] / 0.01)  # layer3 joined at the epoch's rate
    # what trains: exactly what the depth leaves, frozen blocks never move
    assert names_of(model, (p for p in model.parameters() if p.requires_grad)) == {
        n for n, _ in model.named_parameters() if block_of(n) not in ("stem", "layer1")
    }
    moved = {block_of(n) for n, p in model.state_dict().items() if not torch.equal(p, run.initial[n])}
    assert moved == {"layer2", "layer3", "layer4", "head"}
    assert images.train_epochs_read == [0, 1, 2, 3, 4]  # one pipeline, on across the unfreezing


@pytest.mark.parametrize("batchnorm", ["frozen", "train"])
def test_an_unfrozen_blocks_batchnorm_follows_model_batchnorm(images, batchnorm):
    spec = job(depth=4, unfreeze_every=1, batchnorm=batchnorm, epochs=2)  # layer3 trains in epoch 2
    run = train(spec, images)
    model = run.worker.model
    assert [h["freeze_depth"] for h in run.history] == [4, 3]
    model.train()
    bns = [m for m in model.layer3.modules() if isinstance(m, nn.BatchNorm2d)]
    assert {m.training for m in bns} == {batchnorm == "train"}  # frozen: eval mode through model.train()
    state = model.state_dict()

    def moved(part: str) -> set[bool]:
        return {not torch.equal(state[n], run.initial[n]) for n in state if n.startswith("layer3.") and part in n}

    assert moved("running") == {batchnorm == "train"}  # running_mean and running_var
    assert moved("bn1.weight") == {True}  # the scale and shift train either way
    assert {m.training for m in model.layer4.modules() if isinstance(m, nn.BatchNorm2d)} == {True}  # trained throughout


@pytest.mark.parametrize("scheduler", ["cosine", "onecycle"])
@pytest.mark.parametrize("from_weights", [False, True], ids=["random-init", "from-weights"])
def test_a_run_resumed_after_epoch_3_unfreezes_as_the_undisturbed_one_to_the_bit(
    images, tmp_path, scheduler, from_weights
):
    spec = job(depth=4, unfreeze_every=2, layer_lr_decay=0.5, scheduler=scheduler, warmup_epochs=1)
    weights = weights_file(tmp_path) if from_weights else None
    undisturbed = train(spec, images, stop_after=2, folder=tmp_path / "ckpt", weights=weights)  # epoch 3: depth 3
    assert undisturbed.saved["epoch"] == 2
    # from weights: the checkpoint holds the blocks trained by then (layer4, layer3 and the head) and the buffers
    parameters = {n for n, _ in undisturbed.worker.model.named_parameters()}
    trained_by_then = {n for n in parameters if block_of(n) in ("layer3", "layer4", "head")}
    assert set(undisturbed.saved["model"]) & parameters == (trained_by_then if from_weights else parameters)

    images.train_epochs_read.clear()
    resumed = train(spec, images, saved=undisturbed.saved, weights=weights)  # a new process: at the saved depth
    assert images.train_epochs_read == [3, 4]
    assert [h["freeze_depth"] for h in resumed.history] == [4, 4, 3, 3, 2]
    assert resumed.history == undisturbed.history[:3] + resumed.history[3:]
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in undisturbed.history]
    assert resumed.groups == undisturbed.groups[3:]  # the same groups, at the same rates, before and after epoch 5
    ours, theirs = resumed.worker.model.state_dict(), undisturbed.worker.model.state_dict()
    assert all(torch.equal(ours[n], theirs[n]) for n in theirs)
    assert not torch.equal(theirs["layer2.0.conv1.weight"], undisturbed.initial["layer2.0.conv1.weight"])


# ---------------------------------------------------------------------------------------
# The frozen-prefix cache: on until the first unfreezing, then off
# ---------------------------------------------------------------------------------------
class Cache:
    """Stands in for the frozen-prefix cache: the frozen blocks' output of the same images, in the same order."""

    def __init__(self, images: Images, frozen) -> None:
        self.images, self.frozen, self.read, self.closed = images, frozen, [], False

    def cached(self, batch: dict) -> dict:
        return {**batch, "image": self.frozen(batch["image"])}

    def train_epochs(self, *args):
        for epoch, batches in self.images.train_epochs(*args):
            self.read.append(epoch)
            yield epoch, [self.cached(batch) for batch in batches]

    def iter_batches(self, *args):
        return [self.cached(batch) for batch in self.images.iter_batches(*args)]

    def take_fill_stats(self):
        return 0, 0.0

    def close(self):
        self.closed = True


def test_the_cache_serves_the_epochs_before_the_first_unfreezing_then_the_images_do(images, monkeypatch, capfd):
    spec = job(depth=4, unfreeze_every=2, epochs=4)
    uncached = train(spec, images)
    caches = []

    def for_worker(spec, source, frozen, frozen_output, *args):
        caches.append(Cache(Images(), frozen_output))
        return caches[-1]

    monkeypatch.setattr(prefix_cache, "for_worker", for_worker)
    images.train_epochs_read.clear()
    cached = train(spec.model_copy(update={"train": spec.train.model_copy(update={"cache": "auto"})}), images)
    assert caches[0].read == [0, 1] and caches[0].closed
    assert images.train_epochs_read == [2, 3]
    said = capfd.readouterr().out
    assert "frozen-prefix cache: off from epoch 3 for all 1 worker(s) (it holds the output of the first 4 " in said
    assert "epoch 3: unfreezing layer3 (freeze_depth 4 -> 3, every 2 epoch(s))" in said
    ours, theirs = cached.worker.model.state_dict(), uncached.worker.model.state_dict()
    assert all(torch.equal(ours[n], theirs[n]) for n in theirs)  # activations or images: the same training


def test_the_cache_stays_off_where_it_would_stop_before_being_read():
    assert setup.cache_stops_too_soon(job(unfreeze_every=1, cache="auto"), 4).startswith("train.unfreeze_every is 1")
    assert setup.cache_stops_too_soon(job(unfreeze_every=2, cache="auto"), 3).startswith("resumed at freeze_depth 3")
    assert setup.cache_stops_too_soon(job(unfreeze_every=2, cache="auto"), 4) is None  # cached for 2 epochs
    assert setup.cache_stops_too_soon(job(depth=0, unfreeze_every=1, cache="auto"), 0) is None  # nothing unfreezes


# ---------------------------------------------------------------------------------------
# Several workers: every rank wraps the grown trained part anew
# ---------------------------------------------------------------------------------------
def unfreeze_on_rank(folder: str, rank: int) -> dict:
    fake = Images(rank)  # each rank its own images: only DDP's all-reduce keeps the ranks equal
    unfreezing.pipeline = loop.pipeline = fake
    prefix_cache.for_worker = lambda *args: None
    wrappers = []

    def wrap(rest: nn.Module) -> nn.Module:
        wrappers.append(weakref.ref(ddp := nn.parallel.DistributedDataParallel(rest)))
        return ddp

    run = train(job(depth=4, unfreeze_every=1, epochs=3, layer_lr_decay=0.5), fake, wrap=wrap)
    return {
        "state": run.worker.model.state_dict(),
        "initial": run.initial,
        "depths": [h["freeze_depth"] for h in run.history],
        "wrappers alive": [ref() is not None for ref in wrappers],
        "wrapped": {block_of(n) for n in names_of(run.worker.model, run.worker.trained.module.parameters())},
    }


def test_with_two_workers_each_unfreezing_rewraps_ddp_on_every_rank_and_the_ranks_stay_equal(tmp_path):
    rank0, rank1 = run_group(tmp_path, functools.partial(unfreeze_on_rank, str(tmp_path)))
    assert rank0["depths"] == rank1["depths"] == [4, 3, 2]
    assert rank0["wrappers alive"] == [False, False, True]  # the old wrappers (and their gradient hooks) are gone
    assert rank0["wrapped"] == {"layer2", "layer3", "layer4", "head"}
    for name, tensor in rank0["state"].items():
        assert torch.equal(tensor, rank1["state"][name]), name
    assert not torch.equal(rank0["state"]["layer2.0.conv1.weight"], rank0["initial"]["layer2.0.conv1.weight"])


# ---------------------------------------------------------------------------------------
# Checkpoints over known weights: what was trained, the rest from the weights
# ---------------------------------------------------------------------------------------
def test_a_head_only_checkpoint_is_kilobytes_resumes_as_a_whole_one_and_refuses_other_weights(images, tmp_path):
    spec = job(depth="all", epochs=4)
    weights = weights_file(tmp_path)
    head_only = train(spec, images, stop_after=1, folder=tmp_path / "head", weights=weights)
    whole = train(spec, images, stop_after=1, folder=tmp_path / "whole", weights=weights, whole_checkpoint=True)
    head_bytes = (tmp_path / "head" / checkpoints.STATE_FILE).stat().st_size
    whole_bytes = (tmp_path / "whole" / checkpoints.STATE_FILE).stat().st_size
    assert head_bytes < 1024**2 < 40 * 1024**2 < whole_bytes  # ResNet-18's 11.2M parameters are 45 MB
    assert head_only.saved["frozen_from"] == weights.identity and "frozen_from" not in whole.saved
    parameters = {n for n in head_only.saved["model"] if n in dict(head_only.worker.model.named_parameters())}
    assert parameters == {"fc.weight", "fc.bias"}

    from_head = train(spec, images, saved=head_only.saved, weights=weights)
    from_whole = train(spec, images, saved=whole.saved, weights=weights)
    losses = [[(h["train_loss"], h["val_loss"]) for h in run.history] for run in (head_only, from_head, from_whole)]
    assert losses[0] == losses[1] == losses[2]  # to the bit: the frozen blocks came from the same weights
    ours, theirs = from_head.worker.model.state_dict(), head_only.worker.model.state_dict()
    assert all(torch.equal(ours[n], theirs[n]) for n in theirs)

    # export and scoring load it over the driver's model of the same weights: the model as trained
    driver = build.build_model("resnet18", weights.location, 3)
    load_model_state(driver, head_only.saved, weights.identity)
    whole_model = build.build_model("resnet18", weights.location, 3)
    load_model_state(whole_model, whole.saved, weights.identity)
    assert all(torch.equal(driver.state_dict()[n], t) for n, t in whole_model.state_dict().items())

    with pytest.raises(UserError, match=r"model.weights: the checkpoint of epoch 2 holds the trained tensors only"):
        train(spec, images, saved=head_only.saved, weights=Weights(weights.location, "sha256 0b0b"))
