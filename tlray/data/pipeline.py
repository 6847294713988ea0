"""The Ray Data pipeline: a split's row numbers in, uint8 images and labels out, per worker and epoch.

The driver puts the index's keys into Ray's object store once (`data_source`); each epoch every worker
reads its rows (tlray.data.order) through Ray Data tasks that fetch the bytes with the layout's reader,
decode, and resize/crop to uint8. Consecutive epochs share one pipeline, so the next epoch's first
batches are decoded while this one ends.
"""

from __future__ import annotations

import io
import itertools
from dataclasses import dataclass

import numpy as np
from PIL import Image

from tlray.data import layouts, readers
from tlray.data.errors import DataError
from tlray.data.index import DatasetIndex, KeyTable
from tlray.data.order import train_batches, train_rows
from tlray.data.preprocessing import Preprocessing
from tlray.data.split import SPLIT_FOLDERS
from tlray.errors import READ_FAILURE_PREFIX
from tlray.io import storage
from tlray.spec import DatasetSpec

MAX_BAD_FRACTION = 0.05  # more undecodable images than this stops a run, whatever on_bad_image says
BAD_LABEL = -1  # rows whose image could not be decoded (skipped by the loss and the metrics)
MAX_STREAM_ROWS = 4_000_000  # rows (8 bytes each) one training pipeline holds across epochs
# The consumer waits for a pipeline's first block, and its last block is consumed with no decoding beside it:
# small blocks keep both waits short: 16 per CPU fed the seed's claim's feature pass (one worker, 2 cores) 2,220
# images/s against 2,171 with 4.
BLOCKS_PER_CPU = 16


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
    reader: str = "objects"  # the module of tlray.data.readers that fetches the bytes: the layout's READER
    reader_options: tuple[tuple[str, str], ...] = ()  # its `read`'s keyword arguments (the layout's)
    run_length: int = 1  # consecutive rows the training order keeps together (the layout's RUN_LENGTH)

    def key(self, split: str, row: int) -> str:
        return key_tables(self.tables)[split].key(row)

    def location(self, split: str, row: int) -> str:
        return storage.join(self.root, self.key(split, row))


def data_source(index: DatasetIndex, dataset: DatasetSpec, preprocessing: Preprocessing, seed: int = 0) -> DataSource:
    """Put the index's keys into Ray's object store (needs a connected Ray) and describe how to read them."""
    import ray

    readers.reader(layouts.layout(dataset.layout).READER)  # a reader that cannot be imported fails here
    return describe_source(index, dataset, preprocessing, ray.put(key_tables_of(index)), seed)


def key_tables_of(index: DatasetIndex) -> dict[str, KeyTable]:
    return {split: KeyTable.of(getattr(index, split)) for split in SPLIT_FOLDERS}


def describe_source(
    index: DatasetIndex, dataset: DatasetSpec, preprocessing: Preprocessing, tables, seed: int = 0
) -> DataSource:
    """How to read `index`'s images, its key tables held by `tables` (an ObjectRef, or any handle whose
    `hex()` names an entry of LOADED_TABLES: how benchmarks and tests decode without Ray)."""
    return DataSource(
        root=index.root,
        endpoint_url=index.endpoint_url,
        classes=tuple(index.classes),
        counts={split: len(getattr(index, split)) for split in SPLIT_FOLDERS},
        fingerprint=index.fingerprint,
        tables=tables,
        preprocessing=preprocessing,
        augment=dataset.augment,
        on_bad_image=dataset.on_bad_image,
        read_concurrency=dataset.read_concurrency,
        read_retry_seconds=dataset.read_retry_seconds,
        seed=seed,
        reader=layouts.layout(dataset.layout).READER,
        reader_options=tuple(sorted(layouts.reader_options(dataset).items())),
        run_length=layouts.run_length(dataset),
    )


# per process, by the ObjectRef's hex: the object store maps the tables, so holding them copies nothing
LOADED_TABLES: dict[str, dict[str, KeyTable]] = {}


def key_tables(ref) -> dict[str, KeyTable]:
    import ray

    if ref.hex() not in LOADED_TABLES:
        LOADED_TABLES[ref.hex()] = ray.get(ref)
    return LOADED_TABLES[ref.hex()]


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
        rows = [
            train_rows(source.counts["train"], seed, epoch, rank, world_size, source.run_length)[:per_epoch]
            for epoch in group
        ]
        epoch_of_row = np.repeat(group, [len(r) for r in rows])  # seeds the rows' random augmentation
        stream = iter(iter_batches(source, "train", np.concatenate(rows), batch_size, device, epoch_of_row))
        for epoch in group:
            yield epoch, itertools.islice(stream, steps)


def image_dataset(source: DataSource, split: str, rows: np.ndarray, batch_size: int, cluster_cpus: float, epochs=None):
    """A lazy Ray Dataset of {"image": uint8 N x 3 x H x W, "label": int64, "row": int64}, in `rows`' order.

    Blocks hold a whole number of batches, so no batch straddles two blocks, and there are
    at least BLOCKS_PER_CPU blocks per CPU of the cluster (when the rows allow), so every CPU has work.
    "row" is the image's row in the split, so the consumer can name an undecodable file.
    `epochs`: each row's epoch (default 0), which with the row seeds its random augmentation.
    """
    import ray.data

    batches_per_block = max(1, len(rows) // (batch_size * BLOCKS_PER_CPU * max(1, int(cluster_cpus))))
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


MAX_WARM_PROCESSES = 4  # a run's first decoding tasks at once, on a small node; a large cluster warms up anyway


def warm_decoding_processes(count: int) -> None:
    """Have `count` of Ray's worker processes import what decoding needs (torch, torchvision, PIL, this module)
    while the training worker starts. A run's first decoding tasks then find them warm: a cold process imports for
    about 2 s before its first image, and a run's first epoch (its feature pass) waits for it. Fire and forget:
    Ray keeps a job's idle worker processes for its next tasks."""
    import ray

    warm = ray.remote(num_cpus=1, max_retries=0)(import_decoding)
    for _ in range(max(0, min(count, MAX_WARM_PROCESSES))):
        warm.remote()


def import_decoding() -> None:
    """Unpickling this function imports this module and, with it, the decoding's modules."""
    import torchvision.transforms.v2  # noqa: F401 — the transforms of preprocessing.uint8_transform


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
        reads = readers.reader(source.reader).read(
            source.root,
            keys,
            source.endpoint_url,
            source.read_concurrency,
            source.read_retry_seconds,
            **dict(source.reader_options),
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
