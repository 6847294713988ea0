"""Shards benchmark: images/s read and decoded from WebDataset tar shards against one S3 object per image.

    .venv/bin/python bench/shards.py [--images 50000] [--objects 5000]     # `make bench` runs it (bench/run.py)

A set of `--images` tiny JPEGs (32x32, 10 classes) is stored twice on a loopback S3 (moto, its own
process) behind bench/latency_proxy.py, which adds 30 ms to every request, as S3's round trip:
- as `.tar` shards of 1,000 samples (`dataset.layout: webdataset`);
- as one object per image (`dataset.layout: imagefolder`); uploading 50,000 objects to moto takes
  minutes, so this side holds the first `--objects` images only (a rate per image does not depend on
  the count; the output says so).
Both are indexed with tlray's index and read in the training order (tlray.data.order, with the layout's
runs) in batches of 64 through the pipeline's batch function (tlray.data.pipeline.DecodeBatch: the
layout's reader, decode, resize to uint8), in this process, as one Ray Data task runs it. Target: shards
at least 3x the images/s of one object per image. Writes section "shards" of bench/results.json.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from common import ENV, machine, save_results  # noqa: E402
from data_path import PYTHON, cpu_seconds, start, start_moto  # noqa: E402

CLASSES = 10
SHARD_SAMPLES = 1000
BATCH = 64
LATENCY_MS = 30


def jpeg_images(count: int, size: int = 32) -> list[bytes]:
    """`count` distinct noisy JPEGs, image n of class n % CLASSES."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for n in range(count):
        k = n % CLASSES
        colour = np.array([(37 * k * 7) % 256, (91 * k + 40) % 256, (173 * k + 90) % 256])
        pixels = np.clip(colour + rng.integers(-40, 41, (size, size, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def tar_shards(images: list[bytes]) -> dict[str, bytes]:
    """shards/shard-000000.tar …: sample n is `s{n:06d}.jpg` + `s{n:06d}.cls`."""
    shards = {}
    for first in range(0, len(images), SHARD_SAMPLES):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for n in range(first, min(len(images), first + SHARD_SAMPLES)):
                for name, data in ((f"s{n:06d}.jpg", images[n]), (f"s{n:06d}.cls", str(n % CLASSES).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards[f"shards/shard-{first // SHARD_SAMPLES:06d}.tar"] = buffer.getvalue()
    return shards


def put_all(endpoint: str, bucket: str, objects: dict[str, bytes], threads: int = 32) -> None:
    import boto3
    from botocore.config import Config

    s3 = boto3.client("s3", endpoint_url=endpoint, config=Config(max_pool_connections=threads))
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda item: s3.put_object(Bucket=bucket, Key=item[0], Body=item[1]), objects.items()))


class TablesRef:
    """The key tables, held in this process (DecodeBatch finds them by this name instead of an ObjectRef)."""

    def __init__(self, name: str):
        self.name = name

    def hex(self) -> str:
        return self.name


def images_per_second(spec, label: str) -> dict:
    """Index `spec`'s data, then read and decode its training split in the training order, batch by batch."""
    from tlray.data import pipeline
    from tlray.data.index import build_index
    from tlray.data.order import train_rows
    from tlray.data.preprocessing import Preprocessing

    started = time.perf_counter()
    index = build_index(spec)
    index_s = time.perf_counter() - started
    ref = TablesRef(f"bench-{label}")
    pipeline.LOADED_TABLES[ref.hex()] = pipeline.key_tables_of(index)
    preprocessing = Preprocessing(32, 32, (0.5,) * 3, (0.5,) * 3, "bilinear")
    source = pipeline.describe_source(index, spec, preprocessing, ref)
    decode = pipeline.DecodeBatch(source, "train")
    rows = train_rows(len(index.train), 0, 0, 0, 1, source.run_length)
    requests = requests_per_batch(source, rows)
    started, decoded = time.perf_counter(), 0
    for first in range(0, len(rows) - BATCH + 1, BATCH):
        batch = rows[first : first + BATCH]
        out = decode({"data": np.stack([batch, np.zeros_like(batch)], axis=1)})
        decoded += int(np.sum(out["label"] >= 0))
    seconds = time.perf_counter() - started
    rate = decoded / seconds
    print(
        f"[bench]   {label}: {decoded:,} images in {seconds:.1f} s = {rate:.0f} images/s; "
        f"{requests:.1f} GETs per batch of {BATCH}; index {index_s:.1f} s",
        flush=True,
    )
    return {
        "images": decoded,
        "seconds": round(seconds, 2),
        "images_per_second": round(rate, 1),
        "gets_per_batch": round(requests, 2),
        "index_s": round(index_s, 2),
    }


def requests_per_batch(source, rows: np.ndarray) -> float:
    """GETs the reader makes per batch: one per span for shards, one per image otherwise."""
    from tlray.data.pipeline import key_tables
    from tlray.data.readers import tar

    table = key_tables(source.tables)["train"]
    batches = [rows[i : i + BATCH] for i in range(0, len(rows) - BATCH + 1, BATCH)]
    if source.reader != "tar":
        return float(BATCH)
    return float(np.mean([len(tar.spans_of([table.key(r) for r in batch])) for batch in batches]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000, help="images in the set (32x32 JPEG)")
    parser.add_argument("--objects", type=int, default=5_000, help="of them, stored as one object each")
    parser.add_argument("--json", default=str(BENCH / "results.json"))
    args = parser.parse_args(argv)
    os.environ.update(ENV)
    from tlray.spec import DatasetSpec

    wall = time.perf_counter()
    print(
        f"[bench] shards: {args.images:,} images as tar shards, {args.objects:,} as one object each, "
        f"S3 + {LATENCY_MS} ms per request",
        flush=True,
    )
    images = jpeg_images(args.images)
    moto, port = start_moto()
    proxy, proxy_port = start([PYTHON, str(BENCH / "latency_proxy.py"), str(port), str(LATENCY_MS)])
    try:
        direct, slow = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{proxy_port}"
        import boto3

        boto3.client("s3", endpoint_url=direct).create_bucket(Bucket="bench")
        started = time.perf_counter()
        put_all(direct, "bench", tar_shards(images))
        objects = {f"objects/class_{n % CLASSES}/{n:06d}.jpg": images[n] for n in range(min(args.objects, args.images))}
        put_all(direct, "bench", objects)
        print(f"[bench]   uploaded in {time.perf_counter() - started:.0f} s", flush=True)
        results, busy = {}, {}
        for name, spec in (
            ("webdataset", DatasetSpec(uri="s3://bench/shards", layout="webdataset", endpoint_url=slow, image_size=32)),
            ("objects", DatasetSpec(uri="s3://bench/objects", endpoint_url=slow, image_size=32)),
        ):
            before, started = cpu_seconds(moto, proxy), time.perf_counter()
            results[name] = images_per_second(spec, name)
            busy[name] = round((cpu_seconds(moto, proxy) - before) / (time.perf_counter() - started), 2)
    finally:
        proxy.kill()
        moto.kill()
    ratio = results["webdataset"]["images_per_second"] / results["objects"]["images_per_second"]
    print(
        f"[bench]   shards / one object per image: {ratio:.2f}x (target >= 3x); store server cores busy {busy}; "
        f"the per-object side read {results['objects']['images']:,} of the {args.images:,} images",
        flush=True,
    )
    summary = {
        "machine": machine(),
        "settings": vars(args),
        "latency_ms": LATENCY_MS,
        "batch": BATCH,
        "rates": results,
        "ratio": round(ratio, 2),
        "store_server_cores_busy": busy,
        "wall_s": round(time.perf_counter() - wall, 1),
    }
    save_results(args.json, "shards", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
