"""What each rank of a worker group runs, without Ray: two processes in a gloo group on 127.0.0.1.

The paths that differ on GPUs are simulated: the device's compute capability is mocked, and each rank's
collectives are counted.
"""

from __future__ import annotations

import functools
import pickle
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tlray.io import checkpoints
from tlray.models.build import build_model
from tlray.models.freeze import freeze, lock_eval
from tlray.spec import TrainSpec
from tlray.training.loop import train_epoch
from tlray.training.setup import Precision, make_lr_schedule, make_optimizer, mixed_precision
from tlray.training.trainer import resume_state

from s3_fixtures import free_port

WORLD = 2
CPU = torch.device("cpu")


def in_group(rank: int, port: int, out: Path, work) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        (out / f"rank{rank}.pkl").write_bytes(pickle.dumps(work(rank)))
    finally:
        dist.destroy_process_group()


def run_group(tmp_path: Path, work) -> list:
    """`work(rank)` on each rank of a two-process group; what each returned, in rank order."""
    mp.spawn(in_group, args=(free_port(), tmp_path, work), nprocs=WORLD, join=True)
    return [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(WORLD)]


# ---------------------------------------------------------------------------------------
# Mixed precision: native bf16 only
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("capability", "dtype", "said"),
    [
        ((7, 5), torch.float16, "fp16 with loss scaling (train.amp: auto, compute capability 7.5 < 8.0 has no native"),
        ((7, 0), torch.float16, "fp16 with loss scaling (train.amp: auto, compute capability 7.0 < 8.0"),
        ((8, 0), torch.bfloat16, "bf16 (train.amp: auto, native on compute capability 8.0)"),
        ((9, 0), torch.bfloat16, "bf16 (train.amp: auto, native on compute capability 9.0)"),
    ],
)
def test_amp_auto_is_bf16_only_where_the_gpu_has_it_natively(capability, dtype, said):
    # is_bf16_supported() answers True on a T4 or V100 (emulated): it must not be what decides
    with (
        mock.patch("torch.cuda.get_device_capability", return_value=capability),
        mock.patch("torch.cuda.is_bf16_supported", return_value=True),
    ):
        precision = mixed_precision("auto", torch.device("cuda", 0))
    assert precision.dtype == dtype and precision.description.startswith(said)


def test_amp_settings_off_cpu_and_explicit():
    assert mixed_precision("auto", CPU) == Precision(None, "off (train.amp: auto, on CPU)")
    assert mixed_precision("off", torch.device("cuda", 0)).dtype is None
    assert mixed_precision("bf16", CPU).dtype == torch.bfloat16
    assert mixed_precision("fp16", CPU).dtype == torch.float16


# ---------------------------------------------------------------------------------------
# model.batchnorm: train with several workers
# ---------------------------------------------------------------------------------------
def frozen_bn_model() -> tuple[nn.Module, nn.Module, nn.Module]:
    """(whole, frozen prefix, trained rest): BatchNorm and Dropout in the frozen prefix, as in a real backbone."""
    torch.manual_seed(0)
    prefix = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Dropout(0.5), nn.ReLU())
    rest = nn.Sequential(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.LazyLinear(3))
    model = nn.Sequential(prefix, rest)
    model(torch.zeros(1, 3, 12, 12))  # materialise the lazy layer
    return model, prefix, rest


def bn_epochs(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    model, prefix, rest = frozen_bn_model()
    for p in prefix.parameters():
        p.requires_grad_(False)
    for m in prefix.modules():  # what tlray.models.freeze does with batchnorm "train"
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            lock_eval(m)
    trained = DistributedDataParallel(rest)
    train = TrainSpec(epochs=3, lr=0.01, warmup_epochs=0)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], train)
    scheduler = make_lr_schedule(optimizer, train, 4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    per_epoch, modes = [], None
    for epoch in range(3):
        generator = torch.Generator().manual_seed(100 * epoch + rank)  # each rank its own images
        batches = [
            {
                "image": torch.randn(4, 3, 12, 12, generator=generator) * (rank + 1),
                "label": torch.randint(0, 3, (4,), generator=generator),
                "row": torch.arange(4),
            }
            for _ in range(4)
        ]

        def features(x):
            with torch.no_grad():
                return prefix(x)

        train_epoch(model, trained, features, batches, optimizer, scheduler, scaler, nn.CrossEntropyLoss(), None)
        modes = {type(m).__name__: m.training for m in prefix.modules() if m is not prefix}
        per_epoch.append({name: b.clone() for name, b in model.named_buffers()})
    return {"buffers": per_epoch, "modes": modes}


def test_with_batchnorm_train_every_ranks_buffers_are_bit_equal_after_each_epoch(tmp_path):
    rank0, rank1 = run_group(tmp_path, bn_epochs)
    for epoch, (mine, theirs) in enumerate(zip(rank0["buffers"], rank1["buffers"], strict=True)):
        for name, buffer in mine.items():
            assert torch.equal(buffer, theirs[name]), f"epoch {epoch + 1}: {name} differs between the ranks"
    first, last = rank0["buffers"][0]["0.1.running_mean"], rank0["buffers"][-1]["0.1.running_mean"]
    assert not torch.equal(first, last)  # the frozen block's statistics do train
    # in the frozen block, BatchNorm follows model.train(); Dropout stays off
    assert rank0["modes"] == {"Conv2d": False, "BatchNorm2d": True, "Dropout": False, "ReLU": False}


def test_models_freeze_with_batchnorm_train_keeps_frozen_stochastic_layers_off():
    model = build_model("efficientnet_b0", None, 3)  # StochasticDepth in every MBConv block
    freeze(model, "efficientnet_b0", 4, batchnorm="train")
    model.train()
    frozen, trained = model.features[:4], model.features[4:]
    kinds = {(type(m).__name__, m.training) for m in frozen.modules()}
    assert ("BatchNorm2d", True) in kinds and ("BatchNorm2d", False) not in kinds
    assert ("StochasticDepth", False) in kinds and ("StochasticDepth", True) not in kinds
    assert all(m.training for m in trained.modules()) and model.classifier.training  # the rest trains as usual


# ---------------------------------------------------------------------------------------
# Resume: the checkpoint's epoch crosses the group, not its state
# ---------------------------------------------------------------------------------------
def resume_on_rank(folder: str, rank: int) -> dict:
    sent = []
    broadcast = dist.broadcast_object_list

    def counted(objects, src=0, **kwargs):
        sent.append(pickle.dumps(objects))
        return broadcast(objects, src=src, **kwargs)

    with mock.patch.object(dist, "broadcast_object_list", counted):
        state = resume_state(folder, None, rank, WORLD)
    return {"state": state, "sent_bytes": [len(s) for s in sent]}


def test_resume_hands_the_group_the_epoch_and_every_rank_reads_the_same_checkpoint(tmp_path):
    big = {"w": torch.arange(200_000, dtype=torch.float32)}  # 800 KB of "model"
    for epoch in range(2):
        folder = tmp_path / "train" / checkpoints.folder_name(epoch)
        folder.mkdir(parents=True)
        checkpoints.write({"model": {k: v + epoch for k, v in big.items()}, "epoch": epoch, "history": []}, folder)
    rank0, rank1 = run_group(tmp_path, functools.partial(resume_on_rank, str(tmp_path / "train")))
    assert rank0["state"]["epoch"] == rank1["state"]["epoch"] == 1
    assert torch.equal(rank0["state"]["model"]["w"], rank1["state"]["model"]["w"])
    assert rank1["state"]["model"]["w"][0].item() == 1.0 and rank1["state"]["model"]["w"].device.type == "cpu"
    assert len(rank0["sent_bytes"]) == len(rank1["sent_bytes"]) == 1  # one collective on each rank
    assert max(rank0["sent_bytes"]) < 100  # an epoch number, not 800 KB of state


# ---------------------------------------------------------------------------------------
# Validation over two ranks: the whole split's numbers, the confusion matrix in the same one collective
# ---------------------------------------------------------------------------------------
def val_split() -> list[dict]:
    """Twelve rows of logits over 4 classes (the identity model's inputs), in batches of 3; the last undecodable."""
    generator = torch.Generator().manual_seed(7)
    images = torch.randn(12, 4, generator=generator)
    labels = torch.randint(0, 4, (12,), generator=generator)
    labels[-1] = -1
    return [
        {"image": images[i : i + 3], "label": labels[i : i + 3], "row": torch.arange(i, i + 3)} for i in (0, 3, 6, 9)
    ]


def identity_model() -> nn.Module:
    model = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(4))
    return model


def validate_half(rank: int) -> tuple[dict, int]:
    from tlray.training.loop import validate

    model = identity_model()
    with mock.patch.object(dist, "all_reduce", wraps=dist.all_reduce) as all_reduce:
        val, _ = validate(model, model, val_split()[rank::WORLD], 4, nn.CrossEntropyLoss(), None)
    return val, all_reduce.call_count


def test_two_ranks_validate_the_whole_split_as_one_process_does_in_one_collective(tmp_path):
    from tlray.training.loop import validate

    model = identity_model()
    alone, _ = validate(model, model, val_split(), 4, nn.CrossEntropyLoss(), None)
    (rank0, calls0), (rank1, calls1) = run_group(tmp_path, validate_half)
    assert (calls0, calls1) == (1, 1)
    assert sum(map(sum, alone["confusion"])) == 11  # every decodable row, once
    for val in (rank0, rank1):
        assert val["confusion"] == alone["confusion"]
        assert val["val_accuracy"] == alone["val_accuracy"]
        assert val["val_loss"] == pytest.approx(alone["val_loss"], rel=1e-12)
    assert rank0["rows"] + rank1["rows"] == 12  # each rank's own rows, before the sum
