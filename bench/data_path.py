"""Data-path benchmark: tlray against a plain PyTorch loop, S3 against local files, and the index at scale.

    .venv/bin/python bench/data_path.py            # about 8 minutes on 2 cores; `make bench` runs it

1. Training epoch time, steady state (epochs 2..N): `tlray train` with 1 worker against a plain
   single-process PyTorch loop doing identical work (same images, model, freeze, batch size,
   optimizer; decode -> resize/crop -> normalise -> forward -> backward -> step), for a feature
   extractor and a partial freeze. Target: tlray at most 1.15x the plain loop.
2. Images/s of tlray's Ray Data pipeline (data.iter_batches: GET, decode, resize to uint8) from
   local files, from S3 (moto on loopback, its own process), and from S3 behind a proxy that adds
   30 ms to every request. Target: with the latency, at least 0.8x the local images/s.
3. The driver's time and memory to index 1,000,000 keys (bench/index_scale.py).

Results: printed as one table, and written to bench/results.json (section "data_path") and to
the "Data path" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PYTHON = sys.executable
ENV = {
    **os.environ,
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
MODES = {"feature_extractor": "all", "partial (depth 3)": 3}
PARTS = ("training", "pipeline", "index")


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------
def write_images(root: Path, count: int, size: int, fmt: str, classes: int = 10) -> Path:
    """Noisy colour classes (any model separates them), `count` in all, as <class>/<n>.<fmt>."""
    from PIL import Image

    rng = np.random.default_rng(0)
    if len(list(root.glob(f"*/*.{fmt}"))) == count:
        return root
    for n in range(count):
        k = n % classes
        colour = np.array([(37 * k * 7) % 256, (91 * k + 40) % 256, (173 * k + 90) % 256])
        pixels = np.clip(colour + rng.integers(-40, 41, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
        path = root / f"class_{k}" / f"{n:05d}.{fmt}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90) if fmt == "jpg" else Image.fromarray(pixels).save(path)
    return root


def random_checkpoint(path: Path) -> Path:
    import torch

    from tlray import models

    if not path.exists():
        torch.manual_seed(0)
        torch.save(models.build_model("resnet18", None, 1000).state_dict(), path)
    return path


# ---------------------------------------------------------------------------------------
# 1. tlray against a plain loop
# ---------------------------------------------------------------------------------------
def plain_loop(images: Path, weights: Path, depth, epochs: int, batch: int, image_size: int) -> list[float]:
    """Train-loop seconds per epoch of a single-process PyTorch loop doing tlray's work."""
    import torch

    from tlray import models
    from tlray.data import DatasetSpec, build_index, epoch_order, open_rgb

    index = build_index(DatasetSpec(uri=str(images), image_size=image_size))
    preprocessing = models.preprocessing("resnet18", image_size)
    transform = preprocessing.uint8_transform(False)
    torch.manual_seed(0)
    model = models.build_model("resnet18", str(weights), len(index.classes))
    models.freeze(model, "resnet18", depth)
    optimizer = torch.optim.AdamW(models.trainable_parameters(model), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    times = []
    for epoch in range(epochs):
        model.train()
        order = epoch_order(len(index.train), 0, epoch)
        started = time.perf_counter()
        for start in range(0, len(order) - batch + 1, batch):
            rows = order[start : start + batch]
            pixels = torch.stack([transform(open_rgb(index.location(index.train[r][0]))) for r in rows])
            labels = torch.tensor([index.train[r][1] for r in rows])
            loss = loss_fn(model(preprocessing.normalise(pixels)), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        times.append(time.perf_counter() - started)
    return times


def tlray_run(images: Path, weights: Path, depth, epochs: int, batch: int, image_size: int, out: Path) -> dict:
    """`tlray train` with 1 worker (1 CPU; Ray Data decodes on the other core)."""
    import yaml

    spec = {
        "name": "bench",
        "dataset": {"uri": str(images), "image_size": image_size},
        "model": {"arch": "resnet18", "weights": str(weights), "mode": "partial", "freeze_depth": depth},
        "train": {"epochs": epochs, "batch_size": batch, "lr": 1e-3, "scheduler": "constant"},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "output": {"uri": str(out)},
    }
    path = out / f"spec-{depth}.yaml"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec))
    started = time.perf_counter()
    done = subprocess.run(
        [str(Path(PYTHON).parent / "tlray"), "train", str(path)], env=ENV, capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"tlray train failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    metrics = json.loads(next(out.rglob("metrics.json")).read_text())
    history = metrics["history"]
    times = [h["train_images"] / h["images_per_second"] for h in history]
    return {"epoch_seconds": times, "wall_seconds": wall}


def steady(times: list[float]) -> float:
    return float(np.mean(times[1:])) if len(times) > 1 else times[0]


# ---------------------------------------------------------------------------------------
# 2. S3 against local files, with and without latency
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

    from tlray import models
    from tlray.data import DatasetSpec, build_index, data_source, iter_batches, train_rows

    spec = DatasetSpec(uri=uri, endpoint_url=endpoint, image_size=image_size)
    index = build_index(spec)
    source = data_source(index, spec, models.preprocessing("resnet18", image_size))
    rate = 0.0
    for epoch in range(passes):
        rows = train_rows(len(index.train), 0, epoch, 0, 1)
        started, count = time.perf_counter(), 0
        for b in iter_batches(source, "train", rows, batch, torch.device("cpu")):
            count += len(b["row"])
        rate = count / (time.perf_counter() - started)
    return rate


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------
def machine() -> dict:
    import ray
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "load_average_before": os.getloadavg(),
    }


def table(results: dict) -> str:
    lines = ["| measurement | tlray | reference | ratio | target | met |", "| --- | --- | --- | --- | --- | --- |"]
    for name, row in results["training"].items():
        ratio = row["tlray_steady_s"] / row["plain_steady_s"]
        lines.append(
            f"| epoch time, {name} (s, steady state; first epoch {row['tlray_first_s']:.1f} vs "
            f"{row['plain_first_s']:.1f}) | {row['tlray_steady_s']:.2f} | plain loop {row['plain_steady_s']:.2f} "
            f"| {ratio:.2f}x | <= 1.15x | {'yes' if ratio <= 1.15 else 'no'} |"
        )
    io = results["pipeline_images_per_second"]
    for name in ("s3", "s3_30ms"):
        ratio = io[name] / io["local"]
        target = "" if name == "s3" else ">= 0.8x"
        met = "" if name == "s3" else ("yes" if ratio >= 0.8 else "no")
        label = "S3 (moto, loopback)" if name == "s3" else "S3 + 30 ms per request"
        busy = results["store_server_cores_busy"][name]
        lines.append(
            f"| pipeline images/s, {label} (store server busy {busy:.2f} cores) | {io[name]:.0f} "
            f"| local files {io['local']:.0f} | {ratio:.2f}x | {target} | {met} |"
        )
    ix = results["index_1m"]
    lines.append(
        f"| driver: index {ix['keys']:,} keys | {ix['index_seconds']:.1f} s, peak +{ix['peak_rss_growth_mib']} MiB "
        f"RSS (+{ix['rss_growth_mib']} MiB kept) | | | | |"
    )
    lines.append(
        f"| shipped to workers for {ix['keys']:,} keys | {ix['shipped_to_workers_mib']} MiB (key tables) | | | | |"
    )
    return "\n".join(lines)


def write_results_md(path: Path, section: str, results: dict, table_text: str) -> None:
    """Replace the text between `<!-- {section}:begin -->` and `<!-- {section}:end -->` with this run's table."""
    m = results["machine"]
    body = (
        f"Run `{' '.join(['.venv/bin/python', 'bench/data_path.py', *sys.argv[1:]])}` on {time.strftime('%Y-%m-%d')}: "
        f"{m['cpus']} CPUs ({m['cpu_model']}), Python {m['python']}, torch {m['torch']}, Ray {m['ray']}, "
        f"load average before {', '.join(f'{x:.1f}' for x in m['load_average_before'])}.\n\n{table_text}\n"
    )
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        text = text[: text.index(begin) + len(begin)] + "\n" + body + text[text.index(end) :]
    else:
        text += f"\n{begin}\n{body}{end}\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000, help="training benchmark images (32 px PNG)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256)
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
    previous = json.loads(Path(args.json).read_text()).get("data_path", {}) if Path(args.json).exists() else {}
    results: dict = {**previous, "machine": machine(), "settings": vars(args)}
    if "training" in parts:
        results["training"] = training(work, args)
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

    text = table(results)
    print(text)
    write_results_md(BENCH / "RESULTS.md", "data_path", results, text)
    existing = json.loads(Path(args.json).read_text()) if Path(args.json).exists() else {}
    Path(args.json).write_text(json.dumps({**existing, "data_path": results}, indent=2) + "\n")
    print(f"[bench] wrote {args.json}")
    return 0


def training(work: Path, args) -> dict:
    print("[bench] training: plain loop and tlray train, 1 worker", flush=True)
    small = write_images(work / "small", args.images, (32, 32), "png")
    weights = random_checkpoint(work / "resnet18-random.pt")
    out = {}
    for name, depth in MODES.items():
        plain = plain_loop(small, weights, depth, args.epochs, args.batch, 32)
        ours = tlray_run(small, weights, depth, args.epochs, args.batch, 32, work / f"out-{time.time_ns()}")
        out[name] = {
            "plain_epoch_s": plain,
            "tlray_epoch_s": ours["epoch_seconds"],
            "tlray_wall_s": ours["wall_seconds"],
            "plain_steady_s": steady(plain),
            "tlray_steady_s": steady(ours["epoch_seconds"]),
            "plain_first_s": plain[0],
            "tlray_first_s": ours["epoch_seconds"][0],
        }
        print(
            f"[bench]   {name}: plain {steady(plain):.2f} s/epoch, tlray {steady(ours['epoch_seconds']):.2f}",
            flush=True,
        )
    return out


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
