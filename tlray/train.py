"""Fine-tuning on Ray Train: the per-worker loop and the driver call that runs it.

`train_loop_per_worker` is plain PyTorch except for the lines marked
``# Ray n:`` — that is everything Ray Train changes.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from tlray import models
from tlray.data import DatasetIndex, ImageDataset
from tlray.spec import JobSpec, TrainSpec

CHECKPOINT_FILE = "state.pt"


def train_loop_per_worker(config: dict) -> None:
    spec = JobSpec.model_validate(config["spec"])
    index = DatasetIndex.from_dict(config["index"])
    torch.manual_seed(spec.train.seed)  # same init on every rank; DDP also broadcasts rank 0's weights

    # Ray 1: this worker's place in the group and its device (cuda:N or cpu).
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    # Load weights, new head, then freeze — all on the bare model, before DDP wraps it.
    model = models.build_model(spec.model.arch, config["weights"], len(index.classes))
    models.freeze(model, spec.model.arch, spec.freeze_depth, spec.model.batchnorm)  # logs the counts
    optimizer = make_optimizer(models.trainable_parameters(model), spec.train)

    # Ray 2: move to the device and wrap in DistributedDataParallel (when world_size > 1).
    model = ray.train.torch.prepare_model(model)

    preprocessing = models.preprocessing(spec.model.arch, spec.dataset.image_size)
    train_set = ImageDataset(index, index.train, preprocessing.train_transform(spec.dataset.augment))
    val_set = ImageDataset(index, index.val[rank::world_size], preprocessing.eval_transform())
    # Equal-length shards (DistributedSampler pads), so every rank runs the same number of steps.
    sampler = torch.utils.data.DistributedSampler(train_set, world_size, rank, shuffle=True, seed=spec.train.seed)
    # drop_last: a final batch of one image breaks BatchNorm in train mode
    train_loader = torch.utils.data.DataLoader(
        train_set, spec.train.batch_size, sampler=sampler, drop_last=len(sampler) > spec.train.batch_size
    )
    val_loader = torch.utils.data.DataLoader(val_set, spec.train.batch_size)

    scheduler = make_lr_schedule(optimizer, spec.train, steps_per_epoch=len(train_loader))
    amp_dtype = autocast_dtype(spec.train.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=spec.train.label_smoothing)

    # Ray 3: a re-run of the same run name (or a restarted worker group) resumes from the latest checkpoint.
    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as checkpoint_dir:
            state = torch.load(Path(checkpoint_dir, CHECKPOINT_FILE), map_location=device, weights_only=False)
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        if rank == 0:
            say(f"resuming after epoch {start_epoch} of {spec.train.epochs}")

    for epoch in range(start_epoch, spec.train.epochs):
        sampler.set_epoch(epoch)
        model.train()  # frozen BatchNorm layers stay in eval mode (models.freeze)
        started, seen, loss_sum = time.perf_counter(), 0, 0.0
        for images, labels in train_loader:
            images, labels = images.to(device), labels.to(device)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = loss_fn(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            seen += len(labels)
            loss_sum += loss.item() * len(labels)
        elapsed = time.perf_counter() - started

        train_totals = all_reduce_sum([loss_sum, seen, elapsed], device)
        val = evaluate(unwrap(model), val_loader, loss_fn, device, amp_dtype, top5=len(index.classes) >= 5)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": train_totals[0] / train_totals[1],
            # images/s of the whole group: all images over the mean worker wall time
            "images_per_second": train_totals[1] / (train_totals[2] / world_size),
            "lr": optimizer.param_groups[0]["lr"],
            **val,
        }
        history.append(metrics)
        if rank == 0:
            say(format_metrics(metrics, spec.train.epochs))

        # Ray 4: report metrics every epoch; rank 0 adds a checkpoint that Ray copies to the run's storage.
        with tempfile.TemporaryDirectory() as checkpoint_dir:
            checkpoint = None
            if rank == 0:
                state = {
                    "model": unwrap(model).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "epoch": epoch,
                    "history": history,
                }
                torch.save(state, Path(checkpoint_dir, CHECKPOINT_FILE))
                checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch_{epoch + 1:04d}")


# ---------------------------------------------------------------------------------------
# Small pure helpers
# ---------------------------------------------------------------------------------------
def say(message: str) -> None:
    # Ray Train routes print() through its logger, which echoes lines twice; the raw stream does not.
    print(f"[tlray] {message}", file=sys.__stdout__, flush=True)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def make_optimizer(params: list[nn.Parameter], train: TrainSpec) -> torch.optim.Optimizer:
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train.lr, momentum=0.9, nesterov=True, weight_decay=train.weight_decay)
    return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)


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


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """None = full precision. `auto` is bf16 on GPUs that have it, fp16 on older ones, off on CPU."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


@torch.no_grad()
def evaluate(model, loader, loss_fn, device, amp_dtype, top5: bool) -> dict[str, float]:
    """Loss and accuracy over this rank's validation shard, summed over all ranks.

    Runs on the unwrapped model: a DDP forward would sync buffers, and shards differ in length.
    """
    was_training = model.training
    model.eval()
    loss_sum = correct = correct5 = count = 0.0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images)
        loss_sum += loss_fn(logits.float(), labels).item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        if top5:
            correct5 += (logits.topk(5, 1).indices == labels[:, None]).any(1).sum().item()
        count += len(labels)
    model.train(was_training)
    loss_sum, correct, correct5, count = all_reduce_sum([loss_sum, correct, correct5, count], device)
    metrics = {"val_loss": loss_sum / count, "val_accuracy": correct / count}
    if top5:
        metrics["val_top5"] = correct5 / count
    return metrics


def format_metrics(metrics: dict, epochs: int) -> str:
    parts = [f"epoch {metrics['epoch']}/{epochs}"]
    parts += [f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch"]
    return " ".join(parts)


# ---------------------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------------------
def fit(spec: JobSpec, index: DatasetIndex, weights: str | None, storage_path: str) -> ray.train.Result:
    """Run the loop on `scaling.num_workers` Ray Train workers; checkpoints go to `storage_path/train`."""
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec.model_dump(mode="json"), "index": index.to_dict(), "weights": weights},
        scaling_config=ray.train.ScalingConfig(
            num_workers=spec.scaling.num_workers,
            use_gpu=spec.scaling.use_gpu,
            resources_per_worker=worker_resources(spec),
        ),
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if spec.scaling.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name="train",  # fixed: the run folder is already unique per spec, and a re-run resumes
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=spec.scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=spec.train.checkpoints_to_keep),
        ),
    )
    return trainer.fit()


def worker_resources(spec: JobSpec) -> dict[str, float]:
    resources = {"CPU": spec.scaling.cpus_per_worker}
    if spec.scaling.use_gpu:
        resources["GPU"] = spec.scaling.gpus_per_worker
    return resources


def load_checkpoint_state(checkpoint: ray.train.Checkpoint) -> dict:
    with checkpoint.as_directory() as checkpoint_dir:
        return torch.load(Path(checkpoint_dir, CHECKPOINT_FILE), map_location="cpu", weights_only=False)
