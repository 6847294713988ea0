"""The dataset: an index built once on the driver, then a Ray Data pipeline per worker and epoch.

The index (which image is which class, train or val) is built before any cluster
work: listing is cheap, and every data problem surfaces as one clear error (exit 2)
instead of a worker crash hours later. Local folders and S3 prefixes go through the
same code; only the listing differs.

Workers never get the index: the keys go into Ray's object store as flat arrays
(`DataSource`), and each epoch every worker reads its fixed share of the rows in a new
order (`train_rows`) through Ray Data tasks that fetch, decode and resize to uint8.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from tlray.errors import READ_FAILURE_PREFIX, UserError
from tlray.io import storage
from tlray.io.fetch import read_as_completed
from tlray.io.s3 import S3Error, StoredObject
from tlray.spec import DatasetSpec

if TYPE_CHECKING:  # torch stays out of the index: `tlray launch --if-data-changed` builds one in a small pod
    from tlray.models.preprocessing import Preprocessing

log = logging.getLogger("tlray")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
SPLIT_FOLDERS = ("train", "val")
MAX_BAD_FRACTION = 0.05  # more undecodable images than this stops a run, whatever on_bad_image says
BAD_LABEL = -1  # rows whose image could not be decoded (skipped by the loss and the metrics)
MAX_STREAM_ROWS = 4_000_000  # rows (8 bytes each) one training pipeline holds across epochs


class DataError(UserError):
    pass


@dataclass(frozen=True)
class DatasetIndex:
    root: str  # absolute folder or s3://bucket/prefix
    endpoint_url: str | None
    classes: list[str]
    train: list[tuple[str, int]]  # (key relative to root, class index)
    val: list[tuple[str, int]]
    fingerprint: str

    def location(self, key: str) -> str:
        return storage.join(self.root, key)

    def summary(self) -> str:
        return (
            f"{len(self.classes)} classes, {len(self.train)} train / {len(self.val)} val images "
            f"from {self.root} (fingerprint {self.fingerprint[:12]})"
        )


# ---------------------------------------------------------------------------------------
# Driver side: the index
# ---------------------------------------------------------------------------------------
def build_index(dataset: DatasetSpec) -> DatasetIndex:
    """List the dataset, assign labels and the train/val split, and check it can train."""
    files = list_files(dataset.uri, dataset.endpoint_url)
    images = {f.key: f for f in files if is_image_key(f.key)}
    if not images:
        raise DataError(f"dataset.uri: no images ({', '.join(IMAGE_EXTENSIONS)}) under {dataset.uri}")
    if dataset.layout == "manifest":
        labelled = manifest_labels(dataset, images)
    else:
        labelled = imagefolder_labels(list(images.values()), dataset)
    classes = sorted({label for _, label, _ in labelled})
    where = dataset.manifest if dataset.layout == "manifest" else dataset.uri
    key = "dataset.manifest" if dataset.layout == "manifest" else "dataset.uri"
    if len(classes) < 2:
        raise DataError(f"{key}: found {len(classes)} class(es) in {where}; a classifier needs at least 2")
    class_index = {name: i for i, name in enumerate(classes)}
    train = sorted((k, class_index[label]) for k, label, split in labelled if split == "train")
    val = sorted((k, class_index[label]) for k, label, split in labelled if split == "val")
    empty = sorted(set(classes) - {classes[label] for _, label in train})
    if empty:
        raise DataError(f"{key}: class(es) {', '.join(empty)} have no training images in {where}")
    if not val:
        raise DataError(
            f"dataset.val_fraction: the validation split of {where} is empty; add images or raise val_fraction"
        )
    used = {k for k, _, _ in labelled}
    return DatasetIndex(
        root=storage.absolute_uri(dataset.uri).rstrip("/"),
        endpoint_url=dataset.endpoint_url,
        classes=classes,
        train=train,
        val=val,
        fingerprint=fingerprint([f for k, f in images.items() if k in used]),
    )


def list_files(uri: str, endpoint_url: str | None) -> list[StoredObject]:
    """Every object under a dataset root: key relative to the root, and a version for the fingerprint."""
    if storage.is_s3(uri):
        from tlray.io import s3

        try:
            return s3.list_files(uri, endpoint_url, key="dataset.uri", max_attempts=storage.s3_max_attempts())
        except S3Error as exc:
            raise DataError(str(exc)) from None
    root = Path(uri)
    if not root.is_dir():
        raise DataError(f"dataset.uri: folder '{uri}' does not exist")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        for name in sorted(filenames):
            path, stat = Path(dirpath, name), Path(dirpath, name).stat()
            # size and modification time, as make and rsync judge a file: a same-size rewrite (a BMP, a re-encoded
            # JPEG) is new data, which a fingerprint of sizes alone would miss (S3 has ETags for this)
            out.append(StoredObject(path.relative_to(root).as_posix(), f"{stat.st_size}:{stat.st_mtime_ns}"))
    return out


def is_hidden(name: str) -> bool:
    return name.startswith((".", "_")) or name.upper().startswith("README")


def is_image_key(key: str) -> bool:
    return key.lower().endswith(IMAGE_EXTENSIONS) and not any(is_hidden(p) for p in key.split("/"))


def imagefolder_labels(images: list[StoredObject], dataset: DatasetSpec) -> list[tuple[str, str, str]]:
    """(key, class name, split) for `<class>/<file>` or `train|val/<class>/<file>` layouts."""
    presplit = {f.key.split("/")[0] for f in images} <= set(SPLIT_FOLDERS)
    out = []
    for f in images:
        parts = f.key.split("/")
        if presplit and len(parts) >= 3:
            out.append((f.key, parts[1], parts[0]))
        elif not presplit and len(parts) >= 2:
            out.append((f.key, parts[0], hash_split(f.key, dataset)))
        else:
            log.warning("ignoring %s: not inside a class folder", f.key)
    return out


def manifest_labels(dataset: DatasetSpec, images: dict[str, StoredObject]) -> list[tuple[str, str, str]]:
    """(key, label, split) from a CSV or JSONL index with columns path, label and optional split."""
    rows = read_manifest(dataset)
    root = dataset.uri.rstrip("/") + "/"
    out, problems = [], []
    for line, row in rows:
        path, label, split = (
            str(row.get("path") or ""),
            str(row.get("label") or "").strip(),
            str(row.get("split") or ""),
        )
        key = path[len(root) :] if path.startswith(root) else path
        if "://" in key:
            problems.append(f"line {line}: '{path}' is outside dataset.uri ({dataset.uri})")
        elif key not in images:
            problems.append(f"line {line}: image '{path}' does not exist under {dataset.uri}")
        elif not label:
            problems.append(f"line {line}: empty label for '{path}'")
        elif split not in ("", *SPLIT_FOLDERS):
            problems.append(f"line {line}: split '{split}' is neither train nor val")
        else:
            out.append((key, label, split or hash_split(key, dataset)))
    if problems:
        shown = "; ".join(problems[:5]) + (f"; … {len(problems) - 5} more" if len(problems) > 5 else "")
        raise DataError(f"dataset.manifest: {len(problems)} bad row(s) in {dataset.manifest}: {shown}")
    return out


def read_manifest(dataset: DatasetSpec) -> list[tuple[int, dict]]:
    """(line number, row) pairs; the manifest is a path/URI, or a key relative to dataset.uri."""
    name = dataset.manifest
    uri = manifest_location(dataset)
    try:
        text = storage.read_bytes(uri, dataset.endpoint_url).decode("utf-8-sig")
    except (OSError, S3Error) as exc:
        raise DataError(f"dataset.manifest: cannot read {uri}: {exc}") from None
    if name.lower().endswith((".jsonl", ".json", ".ndjson")):
        rows = []
        for line, raw in enumerate(text.splitlines(), start=1):
            if raw.strip():
                try:
                    rows.append((line, json.loads(raw)))
                except json.JSONDecodeError as exc:
                    raise DataError(f"dataset.manifest: line {line} of {name} is not JSON: {exc.msg}") from None
        columns = set().union(*(r.keys() for _, r in rows)) if rows else set()
    else:
        reader = csv.DictReader(io.StringIO(text))
        rows = [(line, row) for line, row in enumerate(reader, start=2)]
        columns = set(reader.fieldnames or ())
    missing = [c for c in ("path", "label") if c not in columns]
    if missing:
        raise DataError(
            f"dataset.manifest: {name} lacks column(s) {', '.join(missing)}; "
            "it needs 'path' and 'label' (and optionally 'split': train or val)"
        )
    return rows


def manifest_location(dataset: DatasetSpec) -> str:
    """A URI or absolute path as given; a relative name is a key under dataset.uri (for a local
    dataset, a path relative to the working directory also works when nothing of that name is there)."""
    name = dataset.manifest
    if "://" in name or os.path.isabs(name):
        return name
    under_root = storage.join(storage.absolute_uri(dataset.uri), name)
    if storage.is_s3(dataset.uri) or os.path.exists(under_root) or not os.path.exists(name):
        return under_root
    return storage.absolute_uri(name)


def hash_split(key: str, dataset: DatasetSpec) -> str:
    return "val" if in_val_split(key, dataset.split_seed, dataset.val_fraction) else "train"


def in_val_split(key: str, seed: int, val_fraction: float) -> bool:
    """Stable split: depends only on the key and the seed, never on the other files."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def fingerprint(files: list[StoredObject]) -> str:
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.key):
        h.update(f"{f.key}\0{f.version}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------
# What workers get: a split's keys as three flat arrays in the object store, not the index
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KeyTable:
    """One split's keys and labels: compact to ship, and read zero-copy from Ray's object store."""

    blob: np.ndarray  # uint8: every key's UTF-8 bytes, back to back
    offsets: np.ndarray  # int64, len(keys) + 1
    labels: np.ndarray  # int64

    @classmethod
    def of(cls, samples: list[tuple[str, int]]) -> KeyTable:
        encoded = [key.encode() for key, _ in samples]
        offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum([len(k) for k in encoded], out=offsets[1:])
        blob = np.frombuffer(b"".join(encoded), np.uint8)
        return cls(blob, offsets, np.array([label for _, label in samples], np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def key(self, row: int) -> str:
        return self.blob[self.offsets[row] : self.offsets[row + 1]].tobytes().decode()


@dataclass(frozen=True)
class DataSource:
    """Everything a worker or a Ray Data task needs to read one dataset: built once on the driver."""

    root: str
    endpoint_url: str | None
    classes: tuple[str, ...]
    counts: dict[str, int]  # split -> images
    fingerprint: str
    tables: object  # ObjectRef of {split: KeyTable}
    preprocessing: Preprocessing
    augment: bool
    on_bad_image: str
    read_concurrency: int
    read_retry_seconds: float
    seed: int = 0  # train.seed: with the epoch and the row, the seed of an image's random augmentation

    def key(self, split: str, row: int) -> str:
        return key_tables(self.tables)[split].key(row)

    def location(self, split: str, row: int) -> str:
        return storage.join(self.root, self.key(split, row))


def data_source(index: DatasetIndex, dataset: DatasetSpec, preprocessing: Preprocessing, seed: int = 0) -> DataSource:
    """Put the index's keys into Ray's object store (needs a connected Ray) and describe how to read them."""
    import ray

    tables = {split: KeyTable.of(getattr(index, split)) for split in SPLIT_FOLDERS}
    return DataSource(
        root=index.root,
        endpoint_url=index.endpoint_url,
        classes=tuple(index.classes),
        counts={split: len(table) for split, table in tables.items()},
        fingerprint=index.fingerprint,
        tables=ray.put(tables),
        preprocessing=preprocessing,
        augment=dataset.augment,
        on_bad_image=dataset.on_bad_image,
        read_concurrency=dataset.read_concurrency,
        read_retry_seconds=dataset.read_retry_seconds,
        seed=seed,
    )


_TABLES: dict[str, dict[str, KeyTable]] = {}  # per process: the object store maps them, no copy


def key_tables(ref) -> dict[str, KeyTable]:
    import ray

    if ref.hex() not in _TABLES:
        _TABLES[ref.hex()] = ray.get(ref)
    return _TABLES[ref.hex()]


# ---------------------------------------------------------------------------------------
# Which rows, in which order: pure functions of (seed, epoch, rank, world size)
# ---------------------------------------------------------------------------------------
SHARES_STREAM = 0x5A4E  # tags the random stream of the shares, apart from the epochs' streams


def epoch_order(rows: int, seed: int, epoch: int, rank: int = 0) -> np.ndarray:
    """A permutation of range(rows), new every epoch and the same on every re-run: the order in which
    rank `rank` walks its share that epoch (its own stream, so the ranks' orders are independent)."""
    return np.random.default_rng([seed, epoch, rank]).permutation(rows)


def rank_shares(rows: int, seed: int, world_size: int) -> list[np.ndarray]:
    """The training rows split into one fixed share per rank (sorted row numbers), for the whole run.

    A seeded random partition, never contiguous ranges (an index is sorted by class): each share is
    a uniform sample of the dataset. Fixed shares are what keeps the frozen-prefix cache at one
    forward pass per image across a cluster: a rank meets the same rows every epoch, so its node
    computes them once, where a global reshuffle would walk every node through almost every row.
    """
    order = np.random.default_rng([SHARES_STREAM, seed]).permutation(rows)
    return [np.sort(order[rank::world_size]) for rank in range(world_size)]


def train_rows(rows: int, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    """This worker's rows for the epoch: its fixed share (`rank_shares`) in a new order every epoch.

    Every worker gets the same count, rows // world_size, so DDP steps stay in lock-step: a share one
    row larger than that leaves out one row an epoch, a different one each epoch (its order's last).
    """
    share = rank_shares(rows, seed, world_size)[rank]
    return share[epoch_order(len(share), seed, epoch, rank)][: rows // world_size]


def train_batches(rows: int, world_size: int, batch_size: int) -> tuple[int, int]:
    """(batch size, steps per epoch) of every worker: whole batches only, at least one step."""
    batch = max(1, min(batch_size, rows // world_size))
    return batch, (rows // world_size) // batch


def train_epochs(source: DataSource, seed: int, epochs: range, rank: int, world_size: int, batch_size: int, device):
    """(epoch, that epoch's batches) for each epoch, each epoch exactly `train_batches` steps long.

    Consecutive epochs read through one pipeline (up to MAX_STREAM_ROWS rows of them), so the next
    epoch's first batches are decoded while this one ends and validates: no start-up per epoch.
    """
    steps = train_batches(source.counts["train"], world_size, batch_size)[1]
    per_epoch = steps * batch_size
    chunk = max(1, MAX_STREAM_ROWS // max(1, per_epoch))
    epochs = list(epochs)
    for first in range(0, len(epochs), chunk):
        group = epochs[first : first + chunk]
        rows = [train_rows(source.counts["train"], seed, epoch, rank, world_size)[:per_epoch] for epoch in group]
        epoch_of_row = np.repeat(group, [len(r) for r in rows])  # seeds the rows' random augmentation
        stream = iter(iter_batches(source, "train", np.concatenate(rows), batch_size, device, epoch_of_row))
        for epoch in group:
            yield epoch, itertools.islice(stream, steps)


def val_rows(rows: int, rank: int, world_size: int) -> np.ndarray:
    """Fixed rows in a fixed order; across workers every validation image exactly once."""
    return np.arange(rank, rows, world_size)


# ---------------------------------------------------------------------------------------
# The Ray Data pipeline: row numbers in, uint8 images out
# ---------------------------------------------------------------------------------------
def image_dataset(source: DataSource, split: str, rows: np.ndarray, batch_size: int, cluster_cpus: float, epochs=None):
    """A lazy Ray Dataset of {"image": uint8 N x 3 x H x W, "label": int64, "row": int64}, in `rows`' order.

    Blocks hold a whole number of batches, so no batch straddles two blocks, and there are
    at least 4 blocks per CPU of the cluster (when the rows allow), so every CPU has work.
    "row" is the image's row in the split, so the consumer can name an undecodable file.
    `epochs`: each row's epoch (default 0), which with the row seeds its random augmentation.
    """
    import ray.data

    batches_per_block = max(1, len(rows) // (batch_size * 4 * max(1, int(cluster_cpus))))
    block_rows = batch_size * batches_per_block
    epochs = np.zeros(len(rows), np.int64) if epochs is None else np.asarray(epochs, np.int64)
    pairs = np.stack([np.asarray(rows, np.int64), epochs], axis=1)  # (row, epoch)
    blocks = [pairs[i : i + block_rows] for i in range(0, len(pairs), block_rows)] or [pairs[:0]]
    decode = DecodeBatch(source, split)
    return ray.data.from_numpy(blocks).map_batches(decode, batch_size=batch_size)


def iter_batches(source: DataSource, split: str, rows: np.ndarray, batch_size: int, device, epochs=None):
    """Batches of `image_dataset` as tensors on `device`, images still uint8 (normalise on the device).

    To a GPU they go from pinned memory, without blocking the host (Ray Data's copy is non_blocking).
    """
    import ray
    import torch

    configure_ray_data()
    cpus = ray.cluster_resources().get("CPU", 1)
    dataset = image_dataset(source, split, rows, batch_size, cpus, epochs)
    dtypes = {"image": torch.uint8, "label": torch.int64, "row": torch.int64}
    return dataset.iter_torch_batches(
        batch_size=batch_size, dtypes=dtypes, device=device, prefetch_batches=2, pin_memory=device.type == "cuda"
    )


def configure_ray_data() -> None:
    """This process's Ray Data settings (each worker runs its own pipelines)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the epoch lines are the progress
    context.raise_original_map_exception = True  # keep DataError / ReadFailure recognisable
    context.execution_options.preserve_order = True  # the epoch's order is the permutation's
    # a task whose read failed after its own retries (fetch.ReadFailure) is run again, twice, then the run stops
    context.retried_map_errors = [READ_FAILURE_PREFIX]
    context.max_map_retries = 2


class DecodeBatch:
    """The Ray Data batch function: fetch a batch concurrently, decode, resize/crop to uint8 (in CPU tasks)."""

    def __init__(self, source: DataSource, split: str):
        self.source, self.split = source, split
        self.augment = source.augment and split == "train"
        self.transform = source.preprocessing.uint8_transform(self.augment)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        source, pairs = self.source, batch["data"].astype(np.int64)
        rows, epochs = pairs[:, 0], pairs[:, 1]
        table = key_tables(source.tables)[self.split]
        keys = [table.key(r) for r in rows]
        crop = source.preprocessing.crop_size
        images = np.zeros((len(rows), 3, crop, crop), np.uint8)
        labels = table.labels[rows].copy()
        # each image is decoded as soon as it arrives, while the batch's other reads are in flight; a read
        # that still fails after retries raises ReadFailure (never a bad image)
        reads = read_as_completed(
            source.root, keys, source.endpoint_url, source.read_concurrency, source.read_retry_seconds
        )
        for i, blob in reads:
            try:
                images[i] = self.decode(blob, int(epochs[i]), int(rows[i]))
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                if source.on_bad_image == "fail":
                    raise DataError(
                        f"dataset.on_bad_image: cannot decode {storage.join(source.root, keys[i])} ({exc}); "
                        "set dataset.on_bad_image: skip to skip such files"
                    ) from None
                labels[i] = BAD_LABEL
        return {"image": images, "label": labels, "row": rows}

    def decode(self, blob: bytes, epoch: int, row: int) -> np.ndarray:
        """One image as uint8 C x H x W. A random augmentation draws from a stream of (train.seed, epoch, row)
        alone: the same in every run, whichever task or batch the image lands in."""
        if not self.augment:
            return self.transform(open_rgb(blob)).numpy()
        import torch

        seed = int(np.random.SeedSequence([self.source.seed, epoch, row]).generate_state(1, np.uint64)[0] >> 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(open_rgb(blob)).numpy()


def open_rgb(source: bytes | str) -> Image.Image:
    """Decode any PIL mode (L, LA, P, RGBA, CMYK, 16-bit) to RGB; GIFs give their first frame."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        image.seek(0)
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            image = image.point(lambda v: v / 256).convert("L")
        return image.convert("RGB")
