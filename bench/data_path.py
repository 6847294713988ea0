#!/usr/bin/env python
"""Data-path throughput: images/s decoded AND preprocessed, local disk vs S3 through Ray Data.

    python bench/data_path.py [--images N] [--size PX] [--cpus C]

Lines of the table:
  local, 1 process   read bytes from disk, tlray.data.open_rgb, resnet50 eval transform; 1 core
  S3 Ray Data (cold) tlray.data.image_dataset over s3:// on a moto server, first pass (workers start)
  S3 Ray Data (warm) the same, second pass
  local Ray Data     tlray.data.image_dataset over the same files on local disk (Ray Data overhead alone)
  S3 ... variant *   NOT tlray's code: the same plan with FetchAheadDecode (one GET per image, a
                     batch's GETs concurrent), to size the gain of changing DecodeBatch that way

The S3 store is moto's server in a separate process on 127.0.0.1 (its own GIL), but on the same
cores as the Ray tasks: every GET costs CPU that AWS S3 would not charge this machine, so the S3
line is pessimistic. The CPU table says how much of it went to moto. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

# --- environment first: before ray, boto3 or pyarrow are imported ------------------------
_AWS_ENV_REMOVED = (
    "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_AUTHORIZATION_TOKEN", "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
)
for _name in _AWS_ENV_REMOVED:
    os.environ.pop(_name, None)
os.environ.update(
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_DEFAULT_REGION="us-east-1",
    AWS_REGION="us-east-1",
    AWS_EC2_METADATA_DISABLED="true",
    RAY_USAGE_STATS_ENABLED="0",  # nothing leaves the machine
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # a single-machine Ray keeps every socket on 127.0.0.1
)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tlray from this checkout

import argparse  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter  # noqa: E402

BUCKET, PREFIX = "tlray-bench", "images"
CLASSES = 4
BATCH = 64  # iter_batches batch size, as tlray/report.py consumes the val split
ARCH = "resnet50"


# ---------------------------------------------------------------------------------------
# Synthetic but realistic JPEGs
# ---------------------------------------------------------------------------------------
def make_jpeg(args: tuple[int, int, str]) -> int:
    """One 4:3 (or 3:4) JPEG, q90: gradient background, shapes, mild blur and sensor-like noise."""
    i, size, folder = args
    rng = np.random.default_rng(1234 + i)
    w = int(rng.integers(int(size * 0.64), size + 1))
    h = round(w * 0.75)
    if rng.random() < 0.25:
        w, h = h, w
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0.0, 1.0, w)[None, :, None] * rng.uniform(0.3, 1.0) + np.linspace(0.0, 1.0, h)[:, None, None] * rng.uniform(0.0, 0.7)
    t = t / t.max()
    image = Image.fromarray((c0 + (c1 - c0) * t).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(8, 25))):
        x0, y0 = int(rng.integers(-w // 4, w)), int(rng.integers(-h // 4, h))
        x1, y1 = x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = rng.integers(0, 4)
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        elif kind == 2:
            pts = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(int(rng.integers(3, 7)))]
            draw.polygon(pts, fill=colour)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(1, 8)))
    image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 1.5))))
    pixels = np.asarray(image, dtype=np.float32) + rng.standard_normal((h, w, 3), dtype=np.float32) * 10.0
    path = Path(folder, f"class_{i % CLASSES}", f"img_{i:06d}.jpg")
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(path, quality=90)
    return path.stat().st_size


def generate(folder: Path, n: int, size: int, workers: int) -> list[int]:
    for c in range(CLASSES):
        (folder / f"class_{c}").mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(workers) as pool:  # before torch/ray are imported: plain fork is safe
        return list(pool.map(make_jpeg, [(i, size, str(folder)) for i in range(n)], chunksize=32))


# ---------------------------------------------------------------------------------------
# CPU accounting: our process tree (driver, moto, Ray) and the whole machine
# ---------------------------------------------------------------------------------------
class CpuMeter:
    """CPU seconds spent between start() and stop(), split into driver / moto / Ray (every other
    descendant of this process: raylet, GCS, workers) and the rest of the machine (other users).
    Read from /proc (Linux), so the benchmark needs nothing beyond tlray's own dependencies."""

    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self, moto_pid: int | None = None):
        self.moto_pid = moto_pid

    @classmethod
    def _tree(cls) -> dict[int, tuple[str, float]]:
        """{pid: (command name, CPU seconds)} for this process and all its descendants."""
        parent, cpu = {}, {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
                comm, fields = text[text.index("(") + 1 : text.rindex(")")], text.rsplit(")", 1)[1].split()
            except (OSError, ValueError, IndexError):
                continue  # exited meanwhile
            pid = int(stat.parent.name)
            parent[pid] = int(fields[1])
            cpu[pid] = (comm, (int(fields[11]) + int(fields[12])) / cls.TICK)  # utime + stime
        ours, frontier = {os.getpid()}, [os.getpid()]
        children: dict[int, list[int]] = {}
        for pid, ppid in parent.items():
            children.setdefault(ppid, []).append(pid)
        while frontier:
            for child in children.get(frontier.pop(), []):
                if child not in ours:
                    ours.add(child)
                    frontier.append(child)
        return {pid: cpu[pid] for pid in ours if pid in cpu}

    @classmethod
    def _machine_busy(cls) -> float:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
        return (user + nice + system + irq + softirq + steal) / cls.TICK

    def start(self) -> "CpuMeter":
        self.load = os.getloadavg()
        self.t0, self.tree0, self.busy0 = time.perf_counter(), self._tree(), self._machine_busy()
        return self

    def stop(self) -> dict:
        wall, tree1, busy = time.perf_counter() - self.t0, self._tree(), self._machine_busy() - self.busy0
        delta = {pid: (comm, cpu - self.tree0.get(pid, ("", 0.0))[1]) for pid, (comm, cpu) in tree1.items()}
        driver = delta.pop(os.getpid(), ("", 0.0))[1]
        moto = delta.pop(self.moto_pid, ("", 0.0))[1] if self.moto_pid else 0.0
        workers = sum(cpu for comm, cpu in delta.values() if comm.startswith("ray::"))  # task workers
        ray_system = sum(cpu for comm, cpu in delta.values() if not comm.startswith("ray::"))  # raylet, GCS, agents
        ours = driver + moto + workers + ray_system
        return dict(wall=wall, driver=driver, moto=moto, workers=workers, ray_system=ray_system, ours=ours,
                    machine=busy, other=max(0.0, busy - ours), load=self.load)


# ---------------------------------------------------------------------------------------
# The measured paths
# ---------------------------------------------------------------------------------------
def local_baseline(root: Path, keys: list[str], transform) -> dict:
    """One process, one core: read bytes, open_rgb, transform; per-step times as well."""
    import torch

    from tlray.data import open_rgb

    torch.set_num_threads(1)
    transform(open_rgb((root / keys[0]).read_bytes()))  # first-call costs out of the timing
    steps = {"read": 0.0, "decode": 0.0, "transform": 0.0}
    meter, cpu0 = CpuMeter().start(), time.process_time()
    for key in keys:
        t0 = time.perf_counter()
        data = (root / key).read_bytes()
        t1 = time.perf_counter()
        image = open_rgb(data)
        t2 = time.perf_counter()
        tensor = transform(image)
        t3 = time.perf_counter()
        steps["read"] += t1 - t0
        steps["decode"] += t2 - t1
        steps["transform"] += t3 - t2
        assert tensor.shape == (3, 224, 224)
    result = meter.stop()
    result.update(images=len(keys), process_cpu=time.process_time() - cpu0, steps=steps)
    return result


def ray_pass(index, transform, moto_pid: int | None) -> dict:
    from tlray.data import BAD_LABEL, image_dataset

    meter = CpuMeter(moto_pid).start()
    ds = image_dataset(index, "train", transform, "skip")
    rows = bad = 0
    for batch in ds.iter_batches(batch_size=BATCH):
        rows += len(batch["label"])
        bad += int((batch["label"] == BAD_LABEL).sum())
        del batch
    result = meter.stop()
    result.update(images=rows, bad=bad)
    return result


def s3_get_probe(index, n: int, moto_pid: int) -> dict:
    """Sequential reads of n objects from the driver through tlray.storage.read_bytes (what
    DecodeBatch does per image): wall ms and moto CPU ms per image."""
    from tlray import storage

    keys = [k for k, _ in index.train[:n]]
    storage.read_bytes(index.location(keys[0]), index.endpoint_url)  # client creation out of the timing
    meter = CpuMeter(moto_pid).start()
    for key in keys:
        storage.read_bytes(index.location(key), index.endpoint_url)
    result = meter.stop()
    result.update(images=len(keys))
    return result


class FetchAheadDecode:
    """NOT tlray's pipeline: a bench-only model of two suggested changes to tlray.data.DecodeBatch,
    to size their gain. (a) one GET per image through boto3 (pyarrow's open_input_stream sends a
    HEAD before every GET); (b) all of a batch's GETs in flight at once on a thread pool instead of
    one after the other. Decode and transform are tlray's (open_rgb, the same transform)."""

    def __init__(self, root: str, endpoint_url: str, transform, threads: int = 16):
        self.bucket, _, self.prefix = root[len("s3://"):].partition("/")
        self.endpoint_url, self.transform, self.threads = endpoint_url, transform, threads

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from tlray import s3
        from tlray.data import open_rgb

        client = s3.client(self.endpoint_url)  # cached per worker process by tlray.s3

        def get(key) -> bytes:
            return client.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}")["Body"].read()

        with ThreadPoolExecutor(self.threads) as pool:
            blobs = list(pool.map(get, batch["key"]))
        images = np.stack([self.transform(open_rgb(b)).numpy() for b in blobs])
        return {"image": images, "label": batch["label"].astype(np.int64), "row": batch["row"].astype(np.int64)}


def variant_pass(index, transform, moto_pid: int) -> dict:
    """tlray.data.image_dataset's plan (same blocks, same batch size) with FetchAheadDecode."""
    import ray.data

    meter = CpuMeter(moto_pid).start()
    items = [{"key": key, "row": i, "label": label} for i, (key, label) in enumerate(index.train)]
    blocks = max(1, min(200, len(items) // 64))
    ds = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        FetchAheadDecode(index.root, index.endpoint_url, transform), batch_size=32
    )
    rows = 0
    for batch in ds.iter_batches(batch_size=BATCH):
        rows += len(batch["label"])
        del batch
    result = meter.stop()
    result.update(images=rows, bad=0)
    return result


def boto3_get_probe(index, n: int, moto_pid: int) -> dict:
    """As s3_get_probe, with one boto3 get_object per object (what FetchAheadDecode sends)."""
    from tlray import s3

    bucket, _, prefix = index.root[len("s3://"):].partition("/")
    client = s3.client(index.endpoint_url)
    keys = [k for k, _ in index.train[:n]]
    client.get_object(Bucket=bucket, Key=f"{prefix}/{keys[0]}")["Body"].read()
    meter = CpuMeter(moto_pid).start()
    for key in keys:
        client.get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"].read()
    result = meter.stop()
    result.update(images=len(keys))
    return result


# ---------------------------------------------------------------------------------------
# moto in its own process
# ---------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# `python -m moto.server -H 127.0.0.1 -p PORT`, minus werkzeug's line per request (its CPU
# would be charged to the S3 path although no real store spends it).
MOTO_MAIN = "import logging, sys; logging.getLogger('werkzeug').setLevel(logging.WARNING); from moto.server import main; main(sys.argv[1:])"


def start_moto(log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-c", MOTO_MAIN, "-H", "127.0.0.1", "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode}; see {log_path}")
        try:
            urllib.request.urlopen(endpoint + "/", timeout=2).read()
            return proc, endpoint
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"moto server did not answer on {endpoint} within 60 s; see {log_path}") from None
            time.sleep(0.2)


def stop_moto(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def upload(endpoint: str, root: Path, threads: int = 8) -> int:
    import boto3
    from botocore.config import Config

    client = boto3.session.Session().client(
        "s3", endpoint_url=endpoint,
        config=Config(s3={"addressing_style": "path"}, max_pool_connections=threads * 2,
                      retries={"mode": "standard", "max_attempts": 10}),
    )
    client.create_bucket(Bucket=BUCKET)
    files = sorted(p for p in root.rglob("*.jpg"))

    def put(path: Path) -> None:
        client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{path.relative_to(root).as_posix()}", Body=path.read_bytes())

    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(put, files):
            pass  # re-raises the first failure
    return len(files)


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> str:
    import moto
    import pyarrow
    import PIL
    import ray
    import torch
    import torchvision

    return (f"python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
            f"ray {ray.__version__}, pyarrow {pyarrow.__version__}, moto {moto.__version__}, pillow {PIL.__version__}, "
            f"numpy {np.__version__}")


def load_text(load: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.2f}" for x in load)


def print_table(rows: list[tuple[str, dict, int]], local_per_core: float) -> None:
    head = f"| {'path':<34} | {'images':>6} | {'seconds':>7} | {'images/s':>8} | {'cores':>5} | {'images/s/core':>13} | {'ratio vs local/core':>19} |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for name, r, cores in rows:
        rate = r["images"] / r["wall"]
        per_core = rate / cores
        print(f"| {name:<34} | {r['images']:>6} | {r['wall']:>7.2f} | {rate:>8.1f} | {cores:>5} | {per_core:>13.1f} | {per_core / local_per_core:>19.2f} |")


def print_cpu_table(rows: list[tuple[str, dict, int]], local_cpu_per_image: float) -> None:
    head = (f"| {'path':<34} | {'load 1/5/15 before':>18} | {'driver':>6} | {'moto':>6} | {'ray workers':>11} | {'ray system':>10} | {'other procs':>11} "
            f"| {'ms CPU/img excl. moto':>21} | {'vs local':>8} |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for name, r, _ in rows:
        ms = 1000 * (r["ours"] - r["moto"]) / r["images"]
        print(f"| {name:<34} | {load_text(r['load']):>18} | {r['driver']:>6.1f} | {r['moto']:>6.1f} | {r['workers']:>11.1f} | {r['ray_system']:>10.1f} "
              f"| {r['other']:>11.1f} | {ms:>21.2f} | {local_cpu_per_image * 1000 / ms:>8.2f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="number of JPEGs to generate (default 2000)")
    parser.add_argument("--size", type=int, default=500, help="largest image side in px; widths are 0.64..1 x this, 4:3 (default 500)")
    parser.add_argument("--cpus", type=int, default=2, help="ray.init(num_cpus=...) for the Ray Data tasks (default 2)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (images, moto log)")
    args = parser.parse_args(argv)
    if args.images < 64:
        parser.error("--images: use at least 64")

    work = Path(tempfile.mkdtemp(prefix="tlray-bench-"))
    images_dir = work / "images"
    empty = work / "empty-aws-config"  # ~/.aws could name endpoints or credential processes: keep it out
    empty.write_text("")
    os.environ.update(AWS_SHARED_CREDENTIALS_FILE=str(empty), AWS_CONFIG_FILE=str(empty))  # before boto3/ray start
    moto_proc = None
    ray_started = False
    t_start = time.perf_counter()
    try:
        print(f"machine: {os.cpu_count()} CPUs (os.cpu_count), {cpu_model()}; load before: {load_text(os.getloadavg())}")

        t0 = time.perf_counter()
        sizes = generate(images_dir, args.images, args.size, max(1, min(args.cpus, os.cpu_count() or 1)))
        print(f"generated {len(sizes)} JPEGs in {time.perf_counter() - t0:.1f} s: mean {np.mean(sizes) / 1024:.0f} KiB, "
              f"{args.size * 0.64:.0f}..{args.size} px long side, q90, {CLASSES} classes")

        import ray  # after the fork-based generation

        from tlray import models
        from tlray.data import build_index
        from tlray.spec import DatasetSpec

        print(versions())
        pre = models.preprocessing(ARCH, None)
        transform = pre.eval_transform()
        print(f"transform: {ARCH} eval preset: resize {pre.resize_size} ({pre.interpolation}, antialias) -> "
              f"center crop {pre.crop_size} -> float32 normalise")

        val_fraction = max(0.01, min(0.5, 10 / args.images))  # 0.01 from 1,000 images up; small runs need a val split
        local_index = build_index(DatasetSpec(uri=str(images_dir), val_fraction=val_fraction))
        keys = [k for k, _ in local_index.train]

        print(f"\n[1/4] local baseline: {len(keys)} images, 1 process, torch threads 1 ...", flush=True)
        local = local_baseline(images_dir, keys, transform)
        steps = local["steps"]
        print("      per image: " + ", ".join(f"{k} {1000 * v / len(keys):.2f} ms" for k, v in steps.items())
              + f"; process CPU {1000 * local['process_cpu'] / len(keys):.2f} ms")

        print("[2/4] moto server (separate process), upload, index ...", flush=True)
        moto_proc, endpoint = start_moto(work / "moto.log")
        t0 = time.perf_counter()
        upload(endpoint, images_dir)
        print(f"      uploaded {len(sizes)} objects in {time.perf_counter() - t0:.1f} s to s3://{BUCKET}/{PREFIX} on {endpoint}")
        t0 = time.perf_counter()
        s3_index = build_index(DatasetSpec(uri=f"s3://{BUCKET}/{PREFIX}", endpoint_url=endpoint, val_fraction=val_fraction))
        print(f"      build_index: {s3_index.summary()} in {time.perf_counter() - t0:.2f} s")
        assert s3_index.train == local_index.train, "the S3 and local indexes differ"
        n_probe = min(200, len(keys))
        for what, probe in (
            ("tlray storage.read_bytes (pyarrow: HEAD + GET)", s3_get_probe(s3_index, n_probe, moto_proc.pid)),
            ("boto3 get_object (GET only)                   ", boto3_get_probe(s3_index, n_probe, moto_proc.pid)),
        ):
            print(f"      {n_probe} sequential reads from the driver, {what}: {1000 * probe['wall'] / probe['images']:.2f} ms/object wall, "
                  f"moto CPU {1000 * probe['moto'] / probe['images']:.2f} ms, driver CPU {1000 * probe['driver'] / probe['images']:.2f} ms")

        print(f"[3/4] ray.init(num_cpus={args.cpus}) ...", flush=True)
        logging.getLogger("ray").setLevel(logging.WARNING)
        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level=logging.WARNING,
                 object_store_memory=2 * 1024**3)
        ray_started = True
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)

        print("[4/4] Ray Data passes: S3 cold, S3 warm, local, S3 bench variant ...", flush=True)
        s3_cold = ray_pass(s3_index, transform, moto_proc.pid)
        s3_warm = ray_pass(s3_index, transform, moto_proc.pid)
        local_ray = ray_pass(local_index, transform, moto_proc.pid)
        variant = variant_pass(s3_index, transform, moto_proc.pid)
        for name, r in (("S3 cold", s3_cold), ("S3 warm", s3_warm), ("local Ray", local_ray), ("variant", variant)):
            assert r["images"] == len(keys), f"{name}: {r['images']} rows, expected {len(keys)}"
            assert r["bad"] == 0, f"{name}: {r['bad']} undecodable images"

        rows = [
            ("local, 1 process (baseline)", local, 1),
            ("S3 Ray Data, cold pass", s3_cold, args.cpus),
            ("S3 Ray Data, warm pass", s3_warm, args.cpus),
            ("local Ray Data (warm workers)", local_ray, args.cpus),
            ("S3 Ray Data, warm, bench variant *", variant, args.cpus),
        ]
        local_per_core = local["images"] / local["wall"]
        blocks = max(1, min(200, len(keys) // 64))
        print(f"\nRay Data pipeline: from_items -> {blocks} blocks of ~{len(keys) // blocks} keys -> map_batches(DecodeBatch, batch_size=32)"
              f" as tasks, num_cpus={args.cpus}; consumed with iter_batches(batch_size={BATCH}) on the driver\n")
        print_table(rows, local_per_core)
        warm_ratio = (s3_warm["images"] / s3_warm["wall"] / args.cpus) / local_per_core
        print("\n* not tlray's pipeline: FetchAheadDecode (this file) = one boto3 GET per image, a batch's GETs"
              " in flight together; sizes the gain of those two changes to tlray.data.DecodeBatch")
        print(f"\nS3 warm per core / local per core = {warm_ratio:.2f} (target >= 0.80: {'MET' if warm_ratio >= 0.8 else 'NOT MET'})")
        print("\nCPU seconds during each line (/proc; 'ray workers' = ray::* task processes, 'ray system' = raylet, GCS, agents; 'other procs' = the rest of the machine):\n")
        print_cpu_table(rows, local["process_cpu"] / local["images"])
        print(f"\ncolumn 'vs local' = local CPU per image / this line's CPU per image of our processes without moto "
              f"(1.00 = same CPU cost per image as the 1-process loop)")
        print(f"total run {time.perf_counter() - t_start:.0f} s; load after: {load_text(os.getloadavg())}")
        return 0
    finally:
        t_end = time.perf_counter()
        if ray_started:
            import ray

            ray.shutdown()
        stop_moto(moto_proc)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        print(f"cleanup (ray.shutdown, moto stop, temp files) {time.perf_counter() - t_end:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
