"""Data-path benchmark: S3 against local files, and the index at scale.

    .venv/bin/python bench/data_path.py [--only pipeline|index]     # `make bench` runs it (bench/run.py)

1. Images/s of tlray's Ray Data pipeline (tlray.data.pipeline.iter_batches: GET, decode, resize to uint8) from
   local files, from S3 (moto on loopback, its own process), and from S3 behind a proxy that adds
   30 ms to every request. Target: with the latency, at least 0.8x the local images/s.
2. The driver's time and memory to index 1,000,000 keys (bench/index_scale.py).

Writes section "data_path" of bench/results.json; bench/run.py makes the table and RESULTS.md.
(Training epoch time against a plain loop is bench/transfer.py's.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from common import ENV, load_results, machine, save_results, write_images  # noqa: E402

PYTHON = sys.executable
PARTS = ("pipeline", "index")


# ---------------------------------------------------------------------------------------
# 1. S3 against local files, with and without latency
# ---------------------------------------------------------------------------------------
def start(command: list[str]) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return process, process.stdout.readline().strip()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, int]:
    port = free_port()
    code = (
        "import logging, sys; logging.getLogger('werkzeug').setLevel(logging.ERROR); "
        "from moto.server import main; print('up', flush=True); sys.exit(main(['-H', '127.0.0.1', '-p', sys.argv[1]]))"
    )
    process, _ = start([PYTHON, "-c", code, str(port)])
    import urllib.request

    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
            return process, port
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto did not start")


def upload(endpoint: str, root: Path, bucket: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket=bucket)
    files = [p for p in root.rglob("*") if p.is_file()]
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda p: s3.put_object(
                    Bucket=bucket, Key=f"images/{p.relative_to(root).as_posix()}", Body=p.read_bytes()
                ),
                files,
            )
        )


def cpu_seconds(*processes: subprocess.Popen) -> float:
    """User + system CPU seconds used so far by these processes (from /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for process in processes:
        fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def pipeline_images_per_second(uri: str, endpoint: str | None, image_size: int, batch: int, passes: int = 2) -> float:
    """Images/s of tlray's Ray Data pipeline over the training split, last of `passes` passes."""
    import torch

    from tlray.data.index import build_index
    from tlray.data.order import train_rows
    from tlray.data.pipeline import data_source, iter_batches
    from tlray.plan import preprocessing as preprocessing_for
    from tlray.spec import DatasetSpec

    spec = DatasetSpec(uri=uri, endpoint_url=endpoint, image_size=image_size)
    index = build_index(spec)
    source = data_source(index, spec, preprocessing_for("resnet18", image_size))
    rate = 0.0
    for epoch in range(passes):
        rows = train_rows(len(index.train), 0, epoch, 0, 1)
        started, count = time.perf_counter(), 0
        for b in iter_batches(source, "train", rows, batch, torch.device("cpu")):
            count += len(b["row"])
        rate = count / (time.perf_counter() - started)
    return rate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--s3-images", type=int, default=2000, help="pipeline benchmark images (320x240 JPEG)")
    parser.add_argument("--index-keys", type=int, default=1_000_000)
    parser.add_argument("--data-cpus", type=int, default=1, help="Ray CPUs for the pipeline benchmark")
    parser.add_argument(
        "--only",
        choices=PARTS,
        action="append",
        help="run only these parts (repeatable); the others keep their numbers from bench/results.json",
    )
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "tlray-bench"))
    parser.add_argument("--json", default=str(BENCH / "results.json"))
    args = parser.parse_args(argv)
    os.environ.update(ENV)
    work = Path(args.work)
    parts = args.only or PARTS
    results: dict = {**load_results(args.json).get("data_path", {}), "machine": machine(), "settings": vars(args)}
    results.pop("training", None)  # measured by bench/transfer.py since the frozen-prefix cache
    if "pipeline" in parts:
        results.update(pipeline(work, args))
    if "index" in parts:
        print(f"[bench] index of {args.index_keys:,} keys", flush=True)
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            subprocess.run(
                [PYTHON, str(BENCH / "index_scale.py"), "--keys", str(args.index_keys), "--json", out.name],
                env=ENV,
                check=True,
                capture_output=True,
            )
            results["index_1m"] = json.loads(Path(out.name).read_text())

    save_results(args.json, "data_path", results)
    return 0


def pipeline(work: Path, args) -> dict:
    print("[bench] pipeline: local files, S3, S3 + 30 ms", flush=True)
    import ray

    big = write_images(work / "big", args.s3_images, (320, 240), "jpg")
    moto, port = start_moto()
    proxy, proxy_port = start([PYTHON, str(BENCH / "latency_proxy.py"), str(port), "30"])
    try:
        upload(f"http://127.0.0.1:{port}", big, "bench")
        # Ray Data gets `--data-cpus` CPUs whatever the source; the store's server (moto, one
        # Python process) and the proxy run on what is left of the machine, and their CPU is reported.
        ray.init(num_cpus=args.data_cpus, include_dashboard=False, log_to_driver=False)
        rates, server_cpu = {}, {}
        for name, uri, endpoint in (
            ("local", str(big), None),
            ("s3", "s3://bench/images", f"http://127.0.0.1:{port}"),
            ("s3_30ms", "s3://bench/images", f"http://127.0.0.1:{proxy_port}"),
        ):
            before = cpu_seconds(moto, proxy)
            started = time.perf_counter()
            rates[name] = pipeline_images_per_second(uri, endpoint, 224, 64)
            server_cpu[name] = round((cpu_seconds(moto, proxy) - before) / (time.perf_counter() - started), 2)
        print(f"[bench]   images/s {rates}; store server cores busy {server_cpu}", flush=True)
        # store_server_cores_busy: moto + proxy CPU-seconds per second over both passes
        return {"pipeline_images_per_second": rates, "store_server_cores_busy": server_cpu}
    finally:
        ray.shutdown()
        proxy.kill()
        moto.kill()


if __name__ == "__main__":
    sys.exit(main())
