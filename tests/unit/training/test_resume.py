"""A resumed run goes on exactly as the undisturbed one: the training loop on one worker, without Ray."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tlray.io import checkpoints
from tlray.spec import TrainSpec
from tlray.training import rng
from tlray.training.loop import train_epoch
from tlray.training.setup import make_lr_schedule, make_optimizer
from tlray.training.state import Progress, TrainState

SEED, EPOCHS, STEPS, BATCH = 7, 4, 6, 8
CPU = torch.device("cpu")
TRAIN = TrainSpec(epochs=EPOCHS, lr=0.05, optimizer="adamw", warmup_epochs=1, seed=SEED)


def batches(epoch: int) -> list[dict]:
    """The epoch's batches: a pure function of the epoch, as tlray.data's global shuffle is."""
    generator = torch.Generator().manual_seed(epoch)
    labels = torch.randint(0, 3, (STEPS, BATCH), generator=generator)
    images = torch.randn(STEPS, BATCH, 12, generator=generator) + labels[..., None]
    rows = torch.arange(STEPS * BATCH).view(STEPS, BATCH)
    return [{"image": images[i], "label": labels[i], "row": rows[i]} for i in range(STEPS)]


def start():
    """What the worker does before its first epoch (setup.build_model): identical init, then the rank's own streams."""
    torch.manual_seed(SEED)
    # dropout draws from the global stream: without the restored streams a resumed epoch draws other masks
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3))
    optimizer = make_optimizer(list(model.parameters()), TRAIN)
    scheduler = make_lr_schedule(optimizer, TRAIN, STEPS)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    rng.seed_worker(SEED, rank=0, device=CPU)
    return model, optimizer, scheduler, scaler


def run_epochs(parts, epochs: range, stop_after: int | None = None, folder: Path | None = None):
    """(each epoch's mean loss, the checkpoint taken after epoch `stop_after` and read back from `folder`)."""
    model, optimizer, scheduler, scaler = parts
    losses, saved = [], None
    for epoch in epochs:
        loss_sum, seen, bad, _ = train_epoch(
            model, model, lambda x: x, batches(epoch), optimizer, scheduler, scaler, nn.CrossEntropyLoss(), None
        )
        assert (seen, bad) == (STEPS * BATCH, [])
        losses.append(loss_sum / seen)
        if epoch == stop_after:  # the checkpoint, through the real file format
            state = TrainState.capture(model, optimizer, scheduler, scaler, epoch, Progress(), rng.gather(CPU, 1))
            saved = round_trip(state.to_checkpoint(), folder)
    return losses, saved


def round_trip(state: dict, folder: Path) -> dict:
    checkpoints.write(state, folder)
    return torch.load(folder / checkpoints.STATE_FILE, map_location="cpu", weights_only=False)


def test_a_run_resumed_from_a_mid_run_checkpoint_repeats_the_undisturbed_epochs_exactly(tmp_path):
    undisturbed, saved = run_epochs(start(), range(EPOCHS), stop_after=1, folder=tmp_path)
    assert len(set(undisturbed)) == EPOCHS  # it trains: each epoch's loss differs

    parts = start()  # a new process: the model rebuilt and the streams re-seeded, as the worker does
    TrainState.from_checkpoint(saved).restore(*parts, None)
    restored = rng.resume(saved["rng"], SEED, saved["epoch"] + 1, rank=0, device=CPU)
    resumed, _ = run_epochs(parts, range(saved["epoch"] + 1, EPOCHS))
    assert restored
    assert resumed == undisturbed[2:]  # bit for bit, not approximately

    parts = start()  # the same checkpoint without its streams: epoch 3 draws epoch 1's masks again
    TrainState.from_checkpoint(saved).restore(*parts, None)
    replayed, _ = run_epochs(parts, range(saved["epoch"] + 1, EPOCHS))
    assert replayed[0] != undisturbed[2]


def test_every_rank_resumes_its_own_streams_and_ranks_without_one_derive_them_deterministically():
    rng.seed_worker(SEED, rank=0, device=CPU)
    rank0 = rng.capture(CPU)
    rng.seed_worker(SEED, rank=1, device=CPU)
    rank1 = rng.capture(CPU)
    assert not torch.equal(rank0["torch"], rank1["torch"])  # two ranks draw different dropout masks

    saved = [rank0, rank1]
    assert rng.resume(saved, SEED, 3, rank=1, device=CPU)
    assert torch.equal(torch.get_rng_state(), rank1["torch"])

    # a group of three resumes from a checkpoint of two: rank 2 has no saved state and derives one
    assert not rng.resume(saved, SEED, 3, rank=2, device=CPU)
    first = torch.rand(4)
    assert not rng.resume(saved, SEED, 3, rank=2, device=CPU)
    assert torch.equal(torch.rand(4), first)  # the same on every restart
    rng.resume(saved, SEED, 4, rank=2, device=CPU)
    assert not torch.equal(torch.rand(4), first)  # but not the same stream at another epoch


def test_a_checkpoint_keeps_the_keys_and_order_it_always_had():
    model, optimizer, scheduler, scaler = start()
    progress = Progress(history=[{"epoch": 1}], bad_image_examples=["a.jpg"], resumes=2)
    state = TrainState.capture(model, optimizer, scheduler, scaler, 0, progress, rng.gather(CPU, 1), "off")
    saved = state.to_checkpoint()
    assert list(saved) == [
        "model",
        "optimizer",
        "scheduler",
        "scaler",
        "epoch",
        "history",
        "bad_image_examples",
        "resumes",
        "rng",
        "precision",
    ]
    loaded = TrainState.from_checkpoint(saved)
    assert (loaded.epoch, loaded.history, loaded.resumes, loaded.precision) == (0, [{"epoch": 1}], 2, "off")
    older = TrainState.from_checkpoint({k: v for k, v in saved.items() if k not in ("resumes", "rng", "precision")})
    assert (older.resumes, older.rng, Progress.after(older).resumes) == (0, None, 1)  # an older tlray's checkpoint
