"""Frozen-prefix cache: the frozen blocks' output, computed once per image, kept on the node's disk.

With the first d blocks frozen (eval mode, no gradient) and a deterministic transform, the
prefix output is a pure function of the image. A worker computes it for the rows it is
about to train on that no one on its node has computed yet (the *feature pass*), then every
epoch reads its rows' activations back and trains only the blocks after the cut, still in
the epoch's global shuffle order.

Layout: one entry per key under $TLRAY_CACHE_DIR (default <tmp>/tlray-cache), per split two
memory-mapped arrays over *all* rows of the split: the activations, and the label a row was
filled with (UNFILLED until then, BAD_LABEL for an undecodable image). Any worker on the
node — of this run, of another trial, of a resumed run — reads rows another one filled.
The key covers everything the activations depend on (frozen tensors, cut point,
preprocessing, the split's keys and labels, dataset content, dtype), so a stale entry is
never read: anything that changes makes a new key.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tlray import data, models
from tlray.console import say
from tlray.data import DataSource
from tlray.spec import JobSpec

CACHE_DIR_ENV = "TLRAY_CACHE_DIR"
FORMAT = 1  # bump when the layout changes: old entries are then never read
UNFILLED = -2  # label of a row whose activations are not in the cache yet
UNUSED_DAYS = 7  # entries no run touched for this long are removed when a new one is built
STORAGE = {
    "float32": (torch.float32, np.float32),
    "bfloat16": (torch.bfloat16, np.int16),
    "float16": (torch.float16, np.float16),
}


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or Path(tempfile.gettempdir(), "tlray-cache"))


# ---------------------------------------------------------------------------------------
# Whether to cache: a pure decision, logged with the sizes that made it
# ---------------------------------------------------------------------------------------
def decide(
    setting: str, depth: int, augment: bool, batchnorm: str, needed_bytes: int, budget_bytes: float, free_bytes: int
) -> tuple[bool, str]:
    """(use the cache, why) for `train.cache` = setting. `on` was checked by the spec, except the disk."""
    size = f"{gib(needed_bytes)} of activations"
    if setting == "off":
        return False, "train.cache is off"
    if depth == 0:
        return False, "nothing is frozen"
    if augment:
        return False, "dataset.augment is on: every epoch crops anew, so the frozen output changes"
    if batchnorm == "train":
        return False, "model.batchnorm is train: the frozen blocks' statistics keep changing"
    if needed_bytes > free_bytes:
        return False, f"{size} > {gib(free_bytes)} free in {cache_root()}"
    if setting == "auto" and needed_bytes > budget_bytes:
        return False, f"{size} > train.cache_budget_gb {gib(budget_bytes)}"
    return True, f"{size}" + (f" <= train.cache_budget_gb {gib(budget_bytes)}" if setting == "auto" else "")


def gib(n: float) -> str:
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.1f} MiB"


# ---------------------------------------------------------------------------------------
# The key
# ---------------------------------------------------------------------------------------
def tensors_digest(module: nn.Module) -> str:
    """Identity of the frozen weights: their values, whatever file, URI or name they came from."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_key(arch: str, depth: int, prefix: nn.Module, source: DataSource, dtype: str, compute: str) -> str:
    tables = data.key_tables(source.tables)
    splits = hashlib.blake2b(digest_size=16)
    for split in data.SPLIT_FOLDERS:  # which image and label each row number means
        for array in (tables[split].blob, tables[split].offsets, tables[split].labels):
            splits.update(np.ascontiguousarray(array).tobytes())
    identity = {
        "format": FORMAT,
        "torch": torch.__version__,
        "arch": arch,
        "cut": depth,
        "frozen_tensors": tensors_digest(prefix),
        "preprocessing": source.preprocessing.to_dict(),
        "fingerprint": source.fingerprint,
        "rows": splits.hexdigest(),
        "dtype": dtype,
        "compute": compute,  # device type and autocast dtype
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


# ---------------------------------------------------------------------------------------
# One entry: open (creating it once, under a lock), fill missing rows, read batches
# ---------------------------------------------------------------------------------------
@dataclass
class FrozenPrefixCache:
    """One worker's view of a cache entry; answers the same calls as tlray.data's pipeline."""

    path: Path
    dtype: str
    features: dict[str, np.memmap]  # split -> rows x activation shape
    labels: dict[str, np.memmap]  # split -> rows: UNFILLED, BAD_LABEL or the class
    frozen: Callable[[torch.Tensor], torch.Tensor]  # uint8 images -> activations (the frozen blocks)
    slot: str  # rank and world size: workers in the same slot of two trials take turns filling
    announce: bool  # rank 0 says what it computes
    filled: tuple[int, float] = (0, 0.0)  # activations computed, seconds spent: since take_fill_stats()

    def train_epochs(
        self, source: DataSource, seed: int, epochs: range, rank: int, world: int, batch_size: int, device
    ):
        """As data.train_epochs: (epoch, batches) in the epoch's shuffle order, activations in place of images."""
        per_epoch = batch_size * data.train_batches(source.counts["train"], world, batch_size)[1]
        val_rows = data.val_rows(source.counts["val"], rank, world)
        for epoch in epochs:
            rows = data.train_rows(source.counts["train"], seed, epoch, rank, world)[:per_epoch]
            self.fill(source, {"train": rows, "val": val_rows}, batch_size, device)  # validation's too, at once
            yield epoch, self.batches("train", rows, batch_size, device)

    def iter_batches(self, source: DataSource, split: str, rows: np.ndarray, batch_size: int, device):
        """As data.iter_batches, activations in place of images."""
        self.fill(source, {split: rows}, batch_size, device)
        return self.batches(split, rows, batch_size, device)

    def fill(self, source: DataSource, wanted: dict[str, np.ndarray], batch_size: int, device) -> None:
        """Decode the wanted rows not cached yet and store their activations (the feature pass).

        The lock is per slot (rank and world size), so workers of one run fill their shares
        side by side, while trials in the same slot take turns: the later one finds the rows
        already there. Its seconds include the wait for such a turn.
        """
        started, computed = time.perf_counter(), 0
        with locked(self.path / f"fill-{self.slot}.lock"):
            for split, rows in wanted.items():
                todo = np.sort(rows[self.labels[split][rows] == UNFILLED])
                if not len(todo):
                    continue
                if self.announce:
                    cached = len(rows) - len(todo)
                    say(f"frozen-prefix cache: computing {len(todo):,} {split} activations ({cached:,} already cached)")
                features, labels = self.features[split], self.labels[split]
                for batch in data.iter_batches(source, split, todo, batch_size, device):
                    out = self.frozen(batch["image"]).to("cpu", STORAGE[self.dtype][0]).contiguous()
                    batch_rows = batch["row"].cpu().numpy()
                    features[batch_rows] = out.view(torch.int16).numpy() if self.dtype == "bfloat16" else out.numpy()
                    labels[batch_rows] = batch["label"].cpu().numpy()  # last: a labelled row is a complete row
                features.flush()
                labels.flush()
                computed += len(todo)
        self.filled = (self.filled[0] + computed, self.filled[1] + time.perf_counter() - started)

    def batches(self, split: str, rows: np.ndarray, batch_size: int, device) -> Iterator[dict[str, torch.Tensor]]:
        """The cached activations of `rows`, in that order, as float32 batches on `device`."""
        features, labels = np.asarray(self.features[split]), np.asarray(self.labels[split])  # views, no copy
        for start in range(0, len(rows), batch_size):
            part = rows[start : start + batch_size].astype(np.int64)
            values = torch.from_numpy(np.take(features, part, axis=0))  # a plain gather: cheaper than a memmap's
            if self.dtype == "bfloat16":
                values = values.view(torch.bfloat16)
            yield {
                "image": values.to(device, torch.float32),
                "label": torch.from_numpy(np.take(labels, part)).to(device),
                "row": torch.from_numpy(part).to(device),
            }

    def take_fill_stats(self) -> tuple[int, float]:
        filled, self.filled = self.filled, (0, 0.0)
        return filled


def for_worker(
    spec: JobSpec,
    source: DataSource,
    frozen: nn.Module,
    frozen_output: Callable,
    device,
    amp_dtype,
    rank: int,
    world: int,
) -> FrozenPrefixCache | None:
    """This worker's cache, or None (the frozen blocks then run every epoch); rank 0 logs why."""
    train = spec.train
    shape = models.prefix_output_shape(frozen, source.preprocessing.crop_size) if spec.freeze_depth else ()
    needed = activation_bytes(shape, source.counts, train.cache_dtype)
    compute = f"{device.type} {amp_dtype}"
    key = cache_key(spec.model.arch, spec.freeze_depth, frozen, source, train.cache_dtype, compute) if shape else ""
    exists = bool(key) and (cache_root() / key / "complete-layout").exists()
    use, why = decide(
        train.cache,
        spec.freeze_depth,
        source.augment,
        spec.model.batchnorm,
        needed,
        train.cache_budget_gb * 1024**3,
        needed if exists else free_bytes(),
    )
    if rank == 0:
        say(f"frozen-prefix cache: {'on' if use else 'off'} ({why})" + (f", in {cache_root() / key}" if use else ""))
    if not use:
        return None
    entry = open_cache(key, shape, source.counts, train.cache_dtype)
    return FrozenPrefixCache(
        entry.path, train.cache_dtype, entry.features, entry.labels, frozen_output, f"r{rank}-w{world}", rank == 0
    )


@dataclass(frozen=True)
class Entry:
    path: Path
    features: dict[str, np.memmap]
    labels: dict[str, np.memmap]


def open_cache(key: str, shape: tuple[int, ...], counts: dict[str, int], dtype: str) -> Entry:
    """The entry for `key`, created (sparse files, every row UNFILLED) by the first worker that asks."""
    root = cache_root()
    path = root / key
    root.mkdir(parents=True, exist_ok=True)
    with locked(root / f"{key}.lock"):
        if not (path / "complete-layout").exists():
            remove_unused_entries(root)
            path.mkdir(exist_ok=True)
            for split, rows in counts.items():
                np.lib.format.open_memmap(path / f"{split}.npy", "w+", STORAGE[dtype][1], (rows, *shape)).flush()
                labels = np.lib.format.open_memmap(path / f"{split}-labels.npy", "w+", np.int64, (rows,))
                labels[:] = UNFILLED
                labels.flush()
            (path / "complete-layout").write_text(json.dumps({"shape": list(shape), "counts": counts, "dtype": dtype}))
    os.utime(path)  # entries in use are never the unused ones removed
    return Entry(
        path,
        {split: np.load(path / f"{split}.npy", mmap_mode="r+") for split in counts},
        {split: np.load(path / f"{split}-labels.npy", mmap_mode="r+") for split in counts},
    )


def remove_unused_entries(root: Path) -> None:
    cutoff = time.time() - UNUSED_DAYS * 86400
    for entry in root.iterdir():
        if entry.is_dir() and entry.stat().st_mtime < cutoff:
            shutil.rmtree(entry, ignore_errors=True)
            (root / f"{entry.name}.lock").unlink(missing_ok=True)


@contextlib.contextmanager
def locked(path: Path):
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, also if the process dies
        yield


def activation_bytes(shape: tuple[int, ...], counts: dict[str, int], dtype: str) -> int:
    return int(np.prod(shape)) * sum(counts.values()) * torch.empty(0, dtype=STORAGE[dtype][0]).element_size()


def free_bytes() -> int:
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(root).free
