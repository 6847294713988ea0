"""What the benchmarks share: generated images, an offline checkpoint, the machine, results.json."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np

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


def write_images(root: Path, count: int, size: int | tuple[int, int], fmt: str = "png", classes: int = 10) -> Path:
    """Noisy colour classes (any model separates them), `count` in all, as <class>/<n>.<fmt>; kept between runs."""
    from PIL import Image

    width, height = (size, size) if isinstance(size, int) else size
    if len(list(root.glob(f"*/*.{fmt}"))) == count:
        return root
    rng = np.random.default_rng(0)
    for n in range(count):
        k = n % classes
        colour = np.array([(37 * k * 7) % 256, (91 * k + 40) % 256, (173 * k + 90) % 256])
        pixels = np.clip(colour + rng.integers(-40, 41, (height, width, 3)), 0, 255).astype(np.uint8)
        path = root / f"class_{k}" / f"{n:05d}.{fmt}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, **({"quality": 90} if fmt == "jpg" else {}))
    return root


def random_checkpoint(path: Path, arch: str = "resnet18") -> Path:
    """A random-init checkpoint standing in for pretrained weights (nothing is downloaded)."""
    import torch

    from tlray.models.build import build_model

    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        torch.save(build_model(arch, None, 1000).state_dict(), path)
    return path


def machine() -> dict:
    import ray
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "gpu": gpu,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "load_average_before": os.getloadavg(),
    }


def load_results(path: str | Path) -> dict:
    return json.loads(Path(path).read_text()) if Path(path).exists() else {}


def save_results(path: str | Path, section: str, results: dict) -> None:
    """Replace one section of results.json, keeping the others."""
    Path(path).write_text(json.dumps({**load_results(path), section: results}, indent=2) + "\n")
    print(f"[bench] wrote section {section} of {path}", flush=True)
