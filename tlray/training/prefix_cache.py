"""Frozen-prefix cache: the frozen blocks' output, computed once per image, kept on the node's disk.

With the first d blocks frozen (eval mode, no gradient) and a deterministic transform, the
prefix output is a pure function of the image. A worker computes it for the rows it is
about to train on that are not in its entry yet (the *feature pass*), then every epoch reads
its rows' activations back and trains only the blocks after the cut.

Once per image across the cluster: every rank trains on a fixed share of the rows, a seeded
random partition (tlray.data.order.rank_shares), in a new order every epoch. So a rank meets the
same rows every epoch and its node computes each of them once: over a run the frozen blocks
run about once per image in all, on one node or many. (A global reshuffle every epoch would
have every node meet almost every row: k nodes, almost k times the work and the disk.) What
this costs the shuffle: a rank's batches always come from its own share, a uniform random
sample of the data; the global step still mixes every share, each epoch in a new order.

Layout: one entry per key and share under $TLRAY_CACHE_DIR (default <tmp>/tlray-cache),
per split two arrays over the share's rows: the activations, and the label a row was filled
with (UNFILLED until then, BAD_LABEL for an undecodable image). The files are allocated in
full when the entry is made, so a full disk is a clear refusal then, never a SIGBUS from a
memory-mapped write later. Any worker on the node with the same share (of another trial, of
a resumed run) reads rows another one filled. The key covers everything the activations
depend on (frozen tensors, cut point, preprocessing, the split's keys and labels, dataset
content, dtype, the share), so a stale entry is never read: anything that changes makes a
new key.

`train.cache_budget_gb` bounds all entries on a node together, whatever trials or runs made
them: a new entry first removes entries no process has open (oldest first) to fit. Whether
to cache is decided once for the worker group (`group_refusals`): if any rank cannot (its
node's disk or budget), none does, so every rank runs the same collectives.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from tlray.console import say
from tlray.data import order, pipeline
from tlray.data.pipeline import DataSource
from tlray.data.split import SPLIT_FOLDERS
from tlray.models import split as model_split
from tlray.spec import JobSpec

CACHE_DIR_ENV = "TLRAY_CACHE_DIR"
FORMAT = 2  # bump when the layout changes: old entries are then never read
UNFILLED = -2  # label of a row whose activations are not in the cache yet
UNUSED_DAYS = 7  # entries no run opened for this long are removed when a new one is made
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
    tables = pipeline.key_tables(source.tables)
    splits = hashlib.blake2b(digest_size=16)
    for split in SPLIT_FOLDERS:  # which image and label each row number means
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
# One entry: made once (allocated in full) under the node's lock, filled, read in batches
# ---------------------------------------------------------------------------------------
@dataclass
class FrozenPrefixCache:
    """One worker's view of its entry; answers the same calls as tlray.data's pipeline."""

    path: Path
    dtype: str
    rows: dict[str, np.ndarray]  # split -> the split's rows this entry holds, sorted (the rank's share)
    features: dict[str, np.memmap]  # split -> len(rows) x activation shape
    labels: dict[str, np.memmap]  # split -> len(rows): UNFILLED, BAD_LABEL or the class
    frozen: Callable[[torch.Tensor], torch.Tensor]  # uint8 images -> activations (the frozen blocks)
    announce: bool  # rank 0 says what it computes
    lease: object = None  # a shared lock on the entry while this process has it open: never removed meanwhile
    filled: tuple[int, float] = (0, 0.0)  # activations computed, seconds spent: since take_fill_stats()

    def train_epochs(
        self, source: DataSource, seed: int, epochs: range, rank: int, world: int, batch_size: int, device
    ):
        """As pipeline.train_epochs: (epoch, batches) in the epoch's shuffle order, activations in place of images."""
        per_epoch = batch_size * order.train_batches(source.counts["train"], world, batch_size)[1]
        val_rows = order.val_rows(source.counts["val"], rank, world)
        for epoch in epochs:
            rows = order.train_rows(source.counts["train"], seed, epoch, rank, world, source.run_length)[:per_epoch]
            self.fill(source, {"train": rows, "val": val_rows}, batch_size, device)  # validation's too, at once
            yield epoch, self.batches("train", rows, batch_size, device)

    def iter_batches(self, source: DataSource, split: str, rows: np.ndarray, batch_size: int, device):
        """As pipeline.iter_batches, activations in place of images."""
        self.fill(source, {split: rows}, batch_size, device)
        return self.batches(split, rows, batch_size, device)

    def slots(self, split: str, rows: np.ndarray) -> np.ndarray:
        """Where `rows` (the split's row numbers) sit in this entry: it holds the rank's share only."""
        held = self.rows[split]
        slots = np.searchsorted(held, rows)
        if len(rows) and (slots.max() >= len(held) or not np.array_equal(held[slots], rows)):
            raise ValueError(f"{split} rows outside this rank's share asked of the frozen-prefix cache {self.path}")
        return slots

    def fill(self, source: DataSource, wanted: dict[str, np.ndarray], batch_size: int, device) -> None:
        """Decode the wanted rows not cached yet and store their activations (the feature pass).

        Workers of two trials with the same share take turns (a lock per entry): the later one
        finds the rows already there. Its seconds include the wait for such a turn.
        """
        started, computed = time.perf_counter(), 0
        with locked(self.path / "fill.lock"):
            for split, rows in wanted.items():
                labels, features = self.labels[split], self.features[split]
                todo = np.sort(rows[labels[self.slots(split, rows)] == UNFILLED])
                if not len(todo):
                    continue
                if self.announce:
                    cached = len(rows) - len(todo)
                    say(f"frozen-prefix cache: computing {len(todo):,} {split} activations ({cached:,} already cached)")
                for batch in pipeline.iter_batches(source, split, todo, batch_size, device):
                    out = self.frozen(batch["image"]).to("cpu", STORAGE[self.dtype][0]).contiguous()
                    slots = self.slots(split, batch["row"].cpu().numpy())
                    features[slots] = out.view(torch.int16).numpy() if self.dtype == "bfloat16" else out.numpy()
                    labels[slots] = batch["label"].cpu().numpy()  # last: a labelled row is a complete row
                features.flush()
                labels.flush()
                computed += len(todo)
        self.filled = (self.filled[0] + computed, self.filled[1] + time.perf_counter() - started)

    def batches(self, split: str, rows: np.ndarray, batch_size: int, device) -> Iterator[dict[str, torch.Tensor]]:
        """The cached activations of `rows`, in that order, as float32 batches on `device`."""
        features, labels = np.asarray(self.features[split]), np.asarray(self.labels[split])  # views, no copy
        for start in range(0, len(rows), batch_size):
            part = rows[start : start + batch_size].astype(np.int64)
            slots = self.slots(split, part)
            values = torch.from_numpy(np.take(features, slots, axis=0))  # a plain gather: cheaper than a memmap's
            if self.dtype == "bfloat16":
                values = values.view(torch.bfloat16)
            yield {
                "image": values.to(device, torch.float32),
                "label": torch.from_numpy(np.take(labels, slots)).to(device),
                "row": torch.from_numpy(part).to(device),
            }

    def take_fill_stats(self) -> tuple[int, float]:
        filled, self.filled = self.filled, (0, 0.0)
        return filled

    def close(self) -> None:
        """Stop using the entry (the worker goes on without the cache): the node may remove it again to make room."""
        if self.lease is not None:
            self.lease.close()


def share_rows(source: DataSource, seed: int, rank: int, world: int) -> dict[str, np.ndarray]:
    """The rows a rank ever reads, per split, sorted: its training share, its validation rows."""
    return {
        "train": order.rank_shares(source.counts["train"], seed, world, source.run_length)[rank],
        "val": order.val_rows(source.counts["val"], rank, world),
    }


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
    """This worker's cache, or None (the frozen blocks then run every epoch): the same answer on every rank.

    A collective: every rank of the group calls it once. Each rank checks its own node (free disk,
    the node's budget, an entry already there), then the group agrees: the cache is used only if
    every rank can. Otherwise ranks with a cache would all-reduce its statistics while the others
    wait in the next collective, and the group would hang. Rank 0 logs the group's decision.
    """
    train = spec.train
    shape = model_split.prefix_output_shape(frozen, source.preprocessing.crop_size) if spec.freeze_depth else ()
    rows = share_rows(source, train.seed, rank, world)
    needed = entry_bytes(shape, {split: len(r) for split, r in rows.items()}, train.cache_dtype)
    compute = f"{device.type} {amp_dtype}"
    key = cache_key(spec.model.arch, spec.freeze_depth, frozen, source, train.cache_dtype, compute) if shape else ""
    name = entry_name(key, rows) if key else ""
    exists = bool(name) and (cache_root() / name / LAYOUT).exists()
    budget = train.cache_budget_gb * 1024**3
    use, why = decide(
        train.cache,
        spec.freeze_depth,
        source.augment,
        spec.model.batchnorm,
        needed,
        budget,
        needed if exists else free_bytes(),
    )
    entry = None
    if use:
        try:
            entry = open_entry(name, shape, rows, train.cache_dtype, budget if train.cache == "auto" else math.inf)
        except NoRoom as exc:
            use, why = False, str(exc)
    refused = group_refusals(use, rank, world, device)
    if refused and entry is not None:
        entry.close()  # the group runs without it; the entry stays for a later run
        entry = None
    if use and refused:
        why = f"rank(s) {', '.join(map(str, refused))} cannot use it on their node; every rank runs the frozen blocks"
    elif not use and rank != 0 and len(refused) < world:
        say(f"frozen-prefix cache: rank {rank}: off ({why})")  # its node's reason, which rank 0 cannot see
    if rank == 0:
        place = f", in {cache_root()} on each node ({CACHE_DIR_ENV})" if entry is not None else ""
        say(f"frozen-prefix cache: {'on' if entry else 'off'} for all {world} worker(s) ({why}){place}")
    if entry is None:
        return None
    return FrozenPrefixCache(
        entry.path, train.cache_dtype, rows, entry.features, entry.labels, frozen_output, rank == 0, entry.lease
    )


def group_refusals(can_use: bool, rank: int, world: int, device) -> list[int]:
    """The ranks that cannot use the cache, the same list on every rank (one all-reduce, always run)."""
    votes = torch.zeros(world, dtype=torch.int32, device=device)  # on the device: NCCL reduces nothing else
    votes[rank] = int(not can_use)
    if world > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(votes)  # SUM of one-hot votes: every rank learns who refused
    return [r for r, refusing in enumerate(votes.tolist()) if refusing]


def entry_name(key: str, rows: dict[str, np.ndarray]) -> str:
    """The entry of one share under one key: which rows of each split it holds are part of its name."""
    share = hashlib.blake2b(digest_size=8)
    for split in sorted(rows):
        share.update(split.encode() + np.ascontiguousarray(rows[split], np.int64).tobytes())
    return f"{key}-{share.hexdigest()}"


class NoRoom(Exception):
    """This node cannot hold the entry (its budget or its disk): the group then runs without the cache."""


@dataclass(frozen=True)
class Entry:
    path: Path
    features: dict[str, np.memmap]
    labels: dict[str, np.memmap]
    lease: object  # the open lock file: a shared lock until closed (or the process ends)

    def close(self) -> None:
        self.lease.close()


LAYOUT = "complete-layout"  # written last: an entry without it is incomplete
IN_USE = "in-use.lock"  # shared-locked by every process that has the entry open
NODE_LOCK = ".node.lock"  # one at a time: make, open or remove entries on this node


def open_entry(name: str, shape: tuple[int, ...], rows: dict[str, np.ndarray], dtype: str, budget: float) -> Entry:
    """The entry `name`, made by the first worker on the node that asks: its files allocated in full, every row
    UNFILLED. To fit `budget` (all entries on the node together) and the disk, entries no process has open are
    removed first, oldest first; NoRoom when that is not enough, or the disk runs out while allocating."""
    root = cache_root()
    path = root / name
    counts = {split: len(r) for split, r in rows.items()}
    root.mkdir(parents=True, exist_ok=True)
    with locked(root / NODE_LOCK):
        if not (path / LAYOUT).exists():
            make_room(root, entry_bytes(shape, counts, dtype), budget)
            make_entry(path, shape, counts, dtype)
        lease = open(path / IN_USE, "a")  # noqa: SIM115 — held for the worker's life, closed by Entry.close
        fcntl.flock(lease, fcntl.LOCK_SH)
    os.utime(path)  # the oldest entries are the first removed
    return Entry(
        path,
        {split: np.load(path / f"{split}.npy", mmap_mode="r+") for split in counts},
        {split: np.load(path / f"{split}-labels.npy", mmap_mode="r+") for split in counts},
        lease,
    )


def make_entry(path: Path, shape: tuple[int, ...], counts: dict[str, int], dtype: str) -> None:
    """Every file allocated on the disk before anything is written (a sparse memory map would SIGBUS on the first
    write to a full disk). Any OSError (a full disk, a quota, a read-only mount): NoRoom, the entry removed."""
    shutil.rmtree(path, ignore_errors=True)  # what an interrupted maker left
    try:
        path.mkdir()
        for split, rows in counts.items():
            allocate(path / f"{split}.npy", STORAGE[dtype][1], (rows, *shape))
            allocate(path / f"{split}-labels.npy", np.int64, (rows,))
        for split in counts:
            labels = np.load(path / f"{split}-labels.npy", mmap_mode="r+")
            labels[:] = UNFILLED
            labels.flush()
        (path / LAYOUT).write_text(json.dumps({"shape": list(shape), "counts": counts, "dtype": dtype}))
    except OSError as exc:
        shutil.rmtree(path, ignore_errors=True)
        needed = gib(entry_bytes(shape, counts, dtype))
        raise NoRoom(f"cannot store {needed} in {cache_root()} (${CACHE_DIR_ENV}): {exc.strerror or exc}") from None


def allocate(path: Path, dtype, shape: tuple[int, ...]) -> None:
    """A .npy file of `shape`, its blocks reserved on the disk (ENOSPC here, not a SIGBUS later)."""
    np.lib.format.open_memmap(path, "w+", dtype, shape).flush()  # the header; the data still a hole
    with open(path, "r+b") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size:
            os.posix_fallocate(handle.fileno(), 0, size)


def make_room(root: Path, needed: int, budget: float) -> None:
    """Remove unused entries (no process has them open), oldest first, until `needed` more bytes fit the node's
    budget and its disk; NoRoom otherwise. Entries unused for UNUSED_DAYS go in any case."""
    entries = sorted((e for e in root.iterdir() if e.is_dir()), key=lambda e: e.stat().st_mtime)
    used, free = sum(map(folder_bytes, entries)), disk_free(root)
    stale = time.time() - UNUSED_DAYS * 86400
    for entry in entries:
        if used + needed <= budget and needed <= free and entry.stat().st_mtime >= stale:
            break
        if not in_use(entry):
            size = folder_bytes(entry)
            shutil.rmtree(entry, ignore_errors=True)
            used, free = used - size, free + size
    if used + needed > budget:
        raise NoRoom(
            f"{gib(needed)} more would make this node's caches {gib(used + needed)} > train.cache_budget_gb "
            f"{gib(budget)}, with {gib(used)} in entries in use in {root}"
        )
    if needed > free:
        raise NoRoom(f"{gib(needed)} > {gib(free)} free in {root} (${CACHE_DIR_ENV})")


def in_use(entry: Path) -> bool:
    """Whether a process has the entry open (holds its shared lock); an entry of an older layout never is."""
    lock = entry / IN_USE
    if not lock.exists():
        return False
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False


def folder_bytes(folder: Path) -> int:
    """Bytes allocated on the disk (st_blocks): what an entry takes from the node."""
    return sum(f.stat().st_blocks * 512 for f in folder.rglob("*") if f.is_file())


@contextlib.contextmanager
def locked(path: Path):
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, also if the process dies
        yield


def entry_bytes(shape: tuple[int, ...], counts: dict[str, int], dtype: str) -> int:
    """An entry's size: the activations of its rows, and their labels."""
    return activation_bytes(shape, counts, dtype) + 8 * sum(counts.values())


def activation_bytes(shape: tuple[int, ...], counts: dict[str, int], dtype: str) -> int:
    return int(np.prod(shape)) * sum(counts.values()) * torch.empty(0, dtype=STORAGE[dtype][0]).element_size()


def disk_free(root: Path) -> int:
    return shutil.disk_usage(root).free


def free_bytes() -> int:
    """What a new entry on this node can have: the disk's free space plus the entries no process has open (the
    ones make_room would remove for it)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    unused = sum(folder_bytes(e) for e in root.iterdir() if e.is_dir() and not in_use(e))
    return disk_free(root) + unused
