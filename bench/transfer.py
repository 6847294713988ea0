"""Transfer-learning benchmark: full fine-tune, partial freezes and the feature extractor, with and
without the frozen-prefix cache, in tlray and in a plain PyTorch loop; then the seed's claim.

    .venv/bin/python bench/transfer.py [--only modes|claim] [--device cuda --arch resnet50 --image-size 224 ...]

modes: one local Ray; per row one run with 1 worker (tlray.training.trainer.fit, as `tlray train` runs it:
   one Ray actor), and the same work in one plain single-process PyTorch loop (decode ->
   resize/crop -> normalise -> forward -> backward -> step; with a cache: decode and run the frozen
   blocks once over the train and val images, as tlray's cache does, then train on the stored
   activations). Epoch time = train loop only, the median of the epochs after the first; the first
   (with the cache: the feature pass) is reported apart, and the cached feature extractor runs
   HEAD_ONLY_EPOCHS epochs of a few ms each. The FLOP model: per-block forward
   FLOPs from torch.utils.flop_counter, phi = the frozen share; predicted speedup over the full
   fine-tune 3 / (phi + 3 (1 - phi)) without the cache, 1 / (1 - phi) with it.
claim: `tlray train` on 50,000 generated 32 px images, ResNet-18 feature extractor, 10 epochs.
   Ray start-up, the feature pass, the head epochs and the total, from the command's own output, and the
   run's parts from its timings (metadata.json): indexing, worker start-up, export and publish.

Writes section "transfer" of bench/results.json; bench/run.py makes the table and RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from common import ENV, load_results, machine, random_checkpoint, save_results, write_images  # noqa: E402

PARTS = ("modes", "claim")
HEAD_ONLY_EPOCHS = 10  # the cached feature-extractor row: its steady-state epoch is a median of 9


# ---------------------------------------------------------------------------------------
# The FLOP model
# ---------------------------------------------------------------------------------------
def frozen_shares(arch: str, image_size: int) -> list[float]:
    """phi for every depth 0..blocks: the frozen blocks' share of one image's forward FLOPs."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from tlray.models import build, layout, split

    model = build.build_model(arch, None, 10).eval()
    blocks = len(layout.backbone_block_names(arch))
    x = torch.zeros(1, 3, image_size, image_size)

    def flops(module) -> int:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            module(x)
        return counter.get_total_flops()

    total = flops(model)
    return [flops(split.split(model, arch, depth).prefix) / total for depth in range(blocks + 1)]


def predicted_speedup(phi: float, cached: bool) -> float:
    return 1 / (1 - phi) if cached else 3 / (phi + 3 * (1 - phi))


# ---------------------------------------------------------------------------------------
# A plain PyTorch loop doing tlray's work
# ---------------------------------------------------------------------------------------
def plain_loop(images: Path, weights: Path, args, depth: int, cached: bool) -> dict:
    """Seconds per epoch (train loop only) and of the feature pass (train and val images), in one process."""
    import torch

    from tlray.data.index import build_index
    from tlray.data.order import epoch_order
    from tlray.data.pipeline import open_rgb
    from tlray.models import build, freeze, split
    from tlray.plan import preprocessing as preprocessing_for
    from tlray.spec import DatasetSpec

    device = torch.device(args.device)
    index = build_index(DatasetSpec(uri=str(images), image_size=args.image_size))
    preprocessing = preprocessing_for(args.arch, args.image_size)
    transform = preprocessing.uint8_transform(False)
    torch.manual_seed(0)
    model = build.build_model(args.arch, str(weights), len(index.classes))
    freeze.freeze(model, args.arch, depth)
    parts = split.split(model, args.arch, depth)
    model.to(device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
    optimizer = torch.optim.AdamW(freeze.trainable_parameters(model), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")
    labels_of = torch.tensor([label for _, label in index.train])

    def decode(rows, split: list = index.train) -> torch.Tensor:
        pixels = torch.stack([transform(open_rgb(index.location(split[r][0]))) for r in rows]).to(device)
        return preprocessing.normalise(pixels)

    def frozen(x):
        with torch.no_grad(), amp:
            return parts.prefix(x)

    feature_pass, computed = 0.0, 0
    if cached:  # decode and run the frozen blocks once, in row order: train and val, as tlray's cache does

        def features(split: list) -> torch.Tensor:
            starts = range(0, len(split), args.batch)
            return torch.cat([frozen(decode(range(i, min(i + args.batch, len(split))), split)).float() for i in starts])

        started = time.perf_counter()
        stored = features(index.train)
        features(index.val)  # validated on by tlray; this loop trains only
        feature_pass, computed = time.perf_counter() - started, len(index.train) + len(index.val)
    times = []
    for epoch in range(args.epochs):
        model.train()
        order = epoch_order(len(index.train), 0, epoch)
        started = time.perf_counter()
        for start in range(0, len(order) - args.batch + 1, args.batch):
            rows = order[start : start + args.batch]
            inputs = stored[rows] if cached else frozen(decode(rows))
            with amp:
                loss = loss_fn(parts.rest(inputs), labels_of[rows].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return {"epoch_s": times, "feature_pass_s": feature_pass, "feature_pass_images": computed}


# ---------------------------------------------------------------------------------------
# tlray, 1 worker
# ---------------------------------------------------------------------------------------
def tlray_run(images: Path, weights: Path, args, depth: int, cache: str, out: Path) -> dict:
    from tlray.data.index import build_index
    from tlray.data.pipeline import data_source
    from tlray.io import checkpoints
    from tlray.models import build
    from tlray.plan import plan_run
    from tlray.plan import preprocessing as preprocessing_for
    from tlray.spec import JobSpec
    from tlray.training.trainer import fit

    spec = JobSpec.model_validate(
        {
            "name": "bench",
            "dataset": {"uri": str(images), "image_size": args.image_size},
            "model": {"arch": args.arch, "weights": str(weights), "mode": "partial", "freeze_depth": depth},
            "train": {
                "epochs": args.epochs,
                "batch_size": args.batch,
                "lr": 1e-3,
                "scheduler": "constant",
                "cache": cache,
                "amp": args.amp,
            },
            "scaling": {"num_workers": 1, "cpus_per_worker": 1, "use_gpu": args.device == "cuda"},
            "output": {"uri": str(out)},
        }
    )
    index = build_index(spec.dataset)
    source = data_source(index, spec.dataset, preprocessing_for(args.arch, args.image_size))
    model = build.build_model(args.arch, None, len(source.classes))
    plan = plan_run(spec, source, str(out / f"d{depth}-{cache}"), model)
    fit(plan)
    state = checkpoints.newest_complete(plan.checkpoints_uri, None).state
    history = state["history"]
    return {
        "precision": state["precision"],  # what train.amp resolved to on the worker's device
        "cache": "feature_pass_images" in history[-1],  # the group's decision (the cache's fill stats are reported)
        "gpu_peak_mib": max((h.get("gpu_peak_mib", 0.0) for h in history), default=0.0),
        "epoch_s": [h["train_images"] / h["images_per_second"] for h in history],
        "feature_pass_s": sum(h.get("feature_pass_seconds", 0.0) for h in history),
        "images_per_second": [h["images_per_second"] for h in history],
    }


def modes(work: Path, args) -> dict:
    import ray

    from tlray.models import layout
    from tlray.training import prefix_cache

    os.environ[prefix_cache.CACHE_DIR_ENV] = str(work / f"cache-{time.time_ns()}")  # a cold cache, inherited by Ray
    images = write_images(work / f"images-{args.images}-{args.image_size}", args.images, args.image_size)
    weights = random_checkpoint(work / f"{args.arch}-random.pt", args.arch)
    blocks = len(layout.backbone_block_names(args.arch))
    depths = [0, *args.depths, blocks]
    phis = frozen_shares(args.arch, args.image_size)
    rows = []
    runs = work / f"runs-{time.time_ns()}"  # new runs: the same run folder again would resume the last bench's
    ray.init(num_cpus=args.ray_cpus, num_gpus=1 if args.device == "cuda" else 0, include_dashboard=False)
    try:
        for depth in depths:
            for cached in (False, True) if depth else (False,):
                name = mode_name(depth, blocks)
                print(f"[bench] {name}, {'with' if cached else 'without'} the cache", flush=True)
                row_args = args
                if cached and depth == blocks:  # epochs of a few ms: enough of them that a stray ms cannot decide
                    row_args = argparse.Namespace(**{**vars(args), "epochs": max(args.epochs, HEAD_ONLY_EPOCHS)})
                ours = tlray_run(images, weights, row_args, depth, "on" if cached else "off", runs)
                plain = plain_loop(images, weights, row_args, depth, cached)
                rows.append(
                    {"mode": name, "depth": depth, "cached": cached, "phi": phis[depth], "tlray": ours, "plain": plain}
                )
                print(f"[bench]   tlray {steady(ours['epoch_s']):.3f} s/epoch, plain {steady(plain['epoch_s']):.3f}")
    finally:
        ray.shutdown()
    full = next(r for r in rows if r["depth"] == 0)
    for row in rows:
        for who in ("tlray", "plain"):
            row[who]["steady_s"] = steady(row[who]["epoch_s"])
            row[who]["speedup"] = full[who]["steady_s"] / row[who]["steady_s"]
        row["predicted"] = predicted_speedup(row["phi"], row["cached"])
        row["achieved_over_predicted"] = row["tlray"]["speedup"] / row["predicted"]
    return {"rows": rows, "images": args.images, "image_size": args.image_size, "arch": args.arch}


def mode_name(depth: int, blocks: int) -> str:
    return "full fine-tune" if depth == 0 else "feature extractor" if depth == blocks else f"partial, depth {depth}"


def steady(times: list[float]) -> float:
    """The epochs after the first, their median: Ray's own processes wake now and then on a 2-core machine."""
    return float(np.median(times[1:])) if len(times) > 1 else times[0]


# ---------------------------------------------------------------------------------------
# The seed's claim, through `tlray train`
# ---------------------------------------------------------------------------------------
def claim(work: Path, args) -> dict:
    import yaml

    images = write_images(work / f"images-{args.claim_images}-32", args.claim_images, 32)
    weights = random_checkpoint(work / "resnet18-random.pt", "resnet18")
    out = work / f"claim-{time.time_ns()}"
    spec = {
        "name": "claim",
        "dataset": {"uri": str(images), "image_size": 32},
        "model": {"arch": "resnet18", "weights": str(weights), "mode": "feature_extractor"},
        "train": {"epochs": 10, "batch_size": 256, "lr": 1e-3},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "output": {"uri": str(out)},
    }
    out.mkdir(parents=True)
    (out / "job.yaml").write_text(yaml.safe_dump(spec))
    env = {**ENV, "TLRAY_CACHE_DIR": str(out / "cache")}
    print(f"[bench] the claim: tlray train, {args.claim_images:,} images, feature extractor, 10 epochs", flush=True)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-u", "-m", "tlray", "train", str(out / "job.yaml")], env=env, capture_output=True, text=True
    )
    total = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"tlray train failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    history = json.loads(next(out.rglob("metrics.json")).read_text())["history"]
    metadata = json.loads(next(out.rglob("metadata.json")).read_text())
    result = {
        "images": args.claim_images,
        "total_s": total,
        "ray_startup_s": float(re.search(r"Ray up in ([\d.]+) s", done.stdout)[1]),
        "train_s": float(re.search(r"trained in ([\d.]+) s", done.stdout)[1]),  # the fit, start to end
        "feature_pass_s": sum(h["feature_pass_seconds"] for h in history),
        "feature_pass_images": sum(h["feature_pass_images"] for h in history),  # train and val rows, once
        "timings": metadata["timings"],  # the run's own: index, weights, cluster, plan, fit, epochs, publish
        "head_epoch_s": [h["train_images"] / h["images_per_second"] for h in history],
        "val_accuracy": history[-1]["val_accuracy"],
    }
    result["excluding_ray_startup_s"] = total - result["ray_startup_s"]
    # the same work in the plain loop with a cache: decode and run the backbone once, then 10 head epochs
    plain_args = argparse.Namespace(**{**vars(args), "arch": "resnet18", "image_size": 32, "batch": 256, "epochs": 10})
    result["plain_cached"] = plain_loop(images, weights, plain_args, depth=5, cached=True)
    print(f"[bench]   {json.dumps({k: v for k, v in result.items() if k != 'head_epoch_s'})}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=PARTS, action="append", help="run only these parts (repeatable)")
    parser.add_argument("--images", type=int, default=3000, help="images of the mode rows")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument(
        "--depths", type=lambda s: [int(d) for d in s.split(",") if d], default=[2, 4], help="partial rows (e.g. 2,4)"
    )
    parser.add_argument("--epochs", type=int, default=3, help="epochs of a mode row (the first is reported apart)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--amp", choices=("off", "bf16"), default="off")
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format (CUDA)")
    parser.add_argument("--ray-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--claim-images", type=int, default=50_000)
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "tlray-bench"))
    parser.add_argument("--json", default=str(BENCH / "results.json"), help="where the results go")
    parser.add_argument("--section", default="transfer", help="the results.json section")
    args = parser.parse_args(argv)
    os.environ.update(ENV)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    parts = args.only or PARTS
    results = {**load_results(args.json).get(args.section, {}), "machine": machine(), "settings": vars(args)}
    if "modes" in parts:
        results["modes"] = modes(work, args)
    if "claim" in parts:
        results["claim"] = claim(work, args)
    save_results(args.json, args.section, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
