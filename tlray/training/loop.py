"""One epoch of training and validation, and the metrics the worker group reports for it: plain PyTorch.

`train_epoch` and `validate` take batches and modules and run without Ray (tests drive them on a toy model);
`run_epoch` adds what the group agrees on after them: sums over every worker (a no-op outside a process
group), the undecodable images met, and the epoch's metrics (their names: tlray.metrics).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn

from tlray.console import say
from tlray.data import order, pipeline
from tlray.data.errors import DataError
from tlray.data.pipeline import BAD_LABEL, MAX_BAD_FRACTION
from tlray.metrics import BY_NAME
from tlray.training.setup import Worker
from tlray.training.state import Progress

BAD_EXAMPLES = 5  # undecodable files named in the log and metadata
TOP5_CLASSES = BY_NAME["val_top5"].min_classes  # validate reports top-5 accuracy from this many classes


def run_epoch(worker: Worker, epoch: int, batches, progress: Progress, started: float) -> dict:
    """Train on this worker's `batches` of 0-based `epoch`, validate, and return the group's metrics of the epoch
    (also appended to `progress.history`). `started`: when the epoch began, its wait for data included."""
    w, source = worker, worker.source
    train_started = time.perf_counter()
    loss_sum, seen, bad_rows, correct = train_epoch(
        w.model, w.trained, w.features, batches, w.optimizer, w.scheduler, w.scaler, w.loss_fn, w.precision.dtype
    )
    elapsed = time.perf_counter() - train_started

    val_rows = order.val_rows(source.counts["val"], w.rank, w.world_size)
    val_batches = (w.cache or pipeline).iter_batches(source, "val", val_rows, w.val_batch_size, w.device)
    val, val_bad_rows = validate(  # the bare trained part: a DDP forward would sync buffers
        w.model,
        lambda images: unwrap(w.trained)(w.features(images)),
        val_batches,
        len(source.classes),
        w.loss_fn,
        w.precision.dtype,
    )
    bad_locations = [source.location("train", r) for r in bad_rows] + [source.location("val", r) for r in val_bad_rows]
    if epoch == 0:
        progress.bad_image_examples = (progress.bad_image_examples + bad_locations)[:BAD_EXAMPLES]
    loss_sum, seen, correct, elapsed, bad, total_rows = all_reduce_sum(
        [loss_sum, seen, correct, elapsed, len(bad_locations), w.batch_size * w.steps_per_epoch + val["rows"]],
        w.device,
    )
    check_bad_images(bad, total_rows, progress.bad_image_examples, w.rank)
    metrics = {
        "epoch": epoch + 1,
        "train_loss": loss_sum / max(seen, 1),
        "train_accuracy": correct / max(seen, 1),  # on the batches as trained: augmented, weights moving
        "train_images": int(seen),  # decoded and trained on, all workers
        # images/s of the whole group: all images over the mean worker wall time
        "images_per_second": seen / (elapsed / w.world_size),
        "epoch_seconds": time.perf_counter() - started,  # feature pass, training and validation
        "lr": w.optimizer.param_groups[0]["lr"],  # the head's (train.layer_lr_decay: the blocks' are lower)
        "freeze_depth": w.depth,  # falls as train.unfreeze_every unfreezes blocks
        "trainable_parameters": sum(p.numel() for p in w.model.parameters() if p.requires_grad),
        "bad_images": int(bad),
        "resumes": progress.resumes,
        "nodes": w.nodes,  # the worker group's, which a restart after losing a node may shrink
        **{k: v for k, v in val.items() if k not in ("rows", "confusion")},
    }
    progress.val_confusion = val["confusion"]  # this epoch's: its checkpoint keeps it for the run's report
    if w.device.type == "cuda":  # this epoch's peak, the first after a resume with the checkpoint's load in it
        metrics["gpu_peak_mib"] = torch.cuda.max_memory_allocated(w.device) / 2**20
        torch.cuda.reset_peak_memory_stats(w.device)
    if w.cache:  # activations computed this epoch (not found in the cache), and the seconds that took
        images, seconds = all_reduce_sum(list(w.cache.take_fill_stats()), w.device)
        metrics |= {"feature_pass_images": int(images), "feature_pass_seconds": seconds / w.world_size}
    progress.history.append(metrics)
    return metrics


def check_bad_images(bad: float, total_rows: float, examples: list[str], rank: int) -> None:
    """Say how many images the group skipped this epoch; stop the run when they are too many."""
    if bad and rank == 0:
        say(f"skipped {int(bad)} undecodable image(s) this epoch, e.g. {', '.join(examples) or '(other workers)'}")
    if bad / total_rows > MAX_BAD_FRACTION:
        raise DataError(
            f"dataset.uri: {int(bad)} of {int(total_rows)} images ({bad / total_rows:.1%}) cannot be decoded, "
            f"more than {MAX_BAD_FRACTION:.0%}; e.g. {', '.join(examples)}"
        )


def train_epoch(model, trained, features, batches, optimizer, scheduler, scaler, loss_fn, amp_dtype):
    """One pass over this worker's batches: (summed loss, images trained on, rows of undecodable images, images
    predicted right).

    `model` is the whole model (switched to train mode; frozen blocks stay in eval, models.freeze), `trained`
    its trained part (DDP-wrapped on several workers), `features` uint8 images (or cached activations) -> its
    input. Plain PyTorch: runs without Ray.
    """
    model.train()
    device = next(model.parameters()).device
    seen, loss_sum, correct, bad_rows = 0, torch.zeros((), device=device), torch.zeros((), device=device), []
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
        correct += (logits.detach().argmax(1) == labels).sum()  # a bad image's label (-1) is never predicted
    average_buffers(model)
    return float(loss_sum), seen, bad_rows, int(correct)


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


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


@torch.no_grad()
def validate(model, forward, batches, num_classes, loss_fn, amp_dtype) -> tuple[dict, list[int]]:
    """Loss, accuracy and the confusion matrix over this worker's share of the validation split, summed over all
    workers in one collective.

    `forward`: uint8 images (or cached activations) -> logits; `model` is switched to eval mode meanwhile.
    Returns the metrics (plus "rows": this worker's row count, and "confusion": counts[true][predicted] as lists)
    and the rows of undecodable images.
    """
    was_training = model.training
    model.eval()
    loss_sum = correct5 = rows = 0.0
    bad_rows, device = [], next(model.parameters()).device
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.float64, device=device)
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
        confusion += torch.bincount(labels * num_classes + logits.argmax(1), minlength=num_classes**2)
        if num_classes >= TOP5_CLASSES:
            correct5 += (logits.topk(5, 1).indices == labels[:, None]).any(1).sum().item()
    model.train(was_training)
    sums = torch.cat([torch.tensor([loss_sum, correct5], dtype=torch.float64, device=device), confusion])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    loss_sum, correct5 = sums[:2].tolist()
    counts = sums[2:].view(num_classes, num_classes).long()
    count = max(int(counts.sum()), 1)
    metrics = {
        "val_loss": loss_sum / count,
        "val_accuracy": int(counts.trace()) / count,
        "rows": rows,
        "confusion": counts.tolist(),
    }
    if num_classes >= TOP5_CLASSES:
        metrics["val_top5"] = correct5 / count
    return metrics, bad_rows
