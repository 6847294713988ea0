"""The demo's image folders, made from scikit-learn's handwritten digits (1,797 real 8x8 scans, shipped
with the package: no download).

- `digits/`: every scan, `<digit>/<n>.png` (jobs/digits.yaml trains on it from random init).
- `source-10/`: half of the scans, all ten digits: the source of the new-domain target.
- `source-0-4/`: every scan of the digits 0-4: the source of the new-classes target.
- `new-domain/train|val/`: the other half of the scans, drifted (rotated, thicker or thinner strokes, a
  textured background, sensor noise), k of them per digit labelled for training, the rest for validation.
- `new-classes/train|val/`: the digits 5-9, which `source-0-4` never sees, k per digit for training.

The scans are split in halves by a fixed seed, so the sources never change; `seed` picks the k labelled
images of each target and the drift, so every seed is a new draw of the few labels.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlray.errors import UserError

SCAN_SPLIT_SEED = 0  # which half of the scans the ten-digit source learns from; never varies
SOURCE_CLASSES = tuple(range(5))  # what source-0-4 learns; the new-classes target is the rest
DRIFT_SIZE = 32  # drifted scans are drawn at this size (the clean ones stay 8x8, the pipeline resizes)


@dataclass(frozen=True)
class DemoFolders:
    digits: Path
    source_10: Path
    source_0_4: Path
    new_domain: Path
    new_classes: Path


def load_scans():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("the demo needs scikit-learn: pip install 'tlray[demo]'") from None
    digits = load_digits()
    return (digits.images * 255 / 16).astype(np.uint8), digits.target  # 0..16 grey levels -> 0..255


def write_digits(folder: str | Path) -> int:
    """Every scan as `<folder>/<digit>/<n>.png` (8-bit greyscale; the pipeline converts to RGB)."""
    if str(folder).startswith("s3://"):
        raise UserError("dataset.uri: the demo writes its images to a local folder, not s3://")
    images, labels = load_scans()
    _write(Path(folder), {"": np.arange(len(labels))}, images, labels)
    return len(labels)


def write_demo_folders(root: str | Path, k: int, seed: int) -> DemoFolders:
    """Write (or rewrite, when k or seed changed) every folder of the demo under `root`."""
    images, labels = load_scans()
    root = Path(root)
    half_a, half_b = scan_halves(labels)
    source_classes = np.isin(labels, SOURCE_CLASSES)
    folders = DemoFolders(
        *(root / f"digits{part}" for part in ("", "-source-10", "-source-0-4", "-new-domain", "-new-classes"))
    )
    _write(folders.digits, {"": np.arange(len(labels))}, images, labels)
    _write(folders.source_10, {"": half_a}, images, labels)
    _write(folders.source_0_4, {"": np.flatnonzero(source_classes)}, images, labels)
    rng = np.random.default_rng(seed)
    drifted = drift(images[half_b], rng)
    _write(folders.new_domain, few_shot(labels[half_b], k, rng), drifted, labels[half_b], tag=(k, seed))
    new = np.flatnonzero(~source_classes)
    _write(folders.new_classes, few_shot(labels[new], k, rng), images[new], labels[new], tag=(k, seed))
    return folders


def scan_halves(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two halves of the scans, each with half of every digit."""
    rng = np.random.default_rng(SCAN_SPLIT_SEED)
    a, b = [], []
    for digit in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == digit))
        a.append(rows[: len(rows) // 2])
        b.append(rows[len(rows) // 2 :])
    return np.sort(np.concatenate(a)), np.sort(np.concatenate(b))


def few_shot(labels: np.ndarray, k: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """k rows of each class for training, every other row for validation."""
    rarest = int(np.bincount(labels)[np.unique(labels)].min())
    if not 1 <= k < rarest:
        raise UserError(f"--k: must be 1..{rarest - 1}, so that every class keeps validation images (got {k})")
    train = np.concatenate([rng.choice(np.flatnonzero(labels == c), size=k, replace=False) for c in np.unique(labels)])
    return {"train": np.sort(train), "val": np.setdiff1d(np.arange(len(labels)), train)}


def drift(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The scans as a new scanner and new writers would give them: upsampled to 32 px, rotated up to
    30 degrees, strokes thickened or thinned, on a textured background, with sensor noise."""
    from PIL import Image, ImageFilter

    out = np.empty((len(images), DRIFT_SIZE, DRIFT_SIZE), dtype=np.uint8)
    yy, xx = np.mgrid[0:DRIFT_SIZE, 0:DRIFT_SIZE] / DRIFT_SIZE
    for i, scan in enumerate(images):
        digit = Image.fromarray(scan).resize((DRIFT_SIZE, DRIFT_SIZE), Image.BILINEAR)
        digit = digit.rotate(float(rng.uniform(-30, 30)), resample=Image.BILINEAR)
        stroke = rng.integers(3)  # 0: thinner, 1: as scanned, 2: thicker
        if stroke != 1:
            digit = digit.filter(ImageFilter.MinFilter(3) if stroke == 0 else ImageFilter.MaxFilter(3))
        ink = np.asarray(digit, dtype=np.float32) / 255
        fx, fy, phase = rng.uniform(2, 6), rng.uniform(2, 6), rng.uniform(0, 2 * np.pi)
        texture = 0.25 + 0.2 * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)  # paper grain, stripes
        pixel = np.maximum(ink, texture) + rng.normal(0, 0.08, ink.shape)
        out[i] = (np.clip(pixel, 0, 1) * 255).astype(np.uint8)
    return out


def _write(folder: Path, splits: dict[str, np.ndarray], images: np.ndarray, labels: np.ndarray, tag=None) -> None:
    """`<folder>/[<split>/]<label>/<n>.png`; kept as is when already written with the same `tag`."""
    from PIL import Image

    stamp = folder / ".written"
    expected = f"{tag} {sum(len(rows) for rows in splits.values())}"
    if stamp.is_file() and stamp.read_text() == expected:
        return
    shutil.rmtree(folder, ignore_errors=True)
    for split, rows in splits.items():
        for n in rows:
            path = folder / split / str(labels[n]) / f"{n:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[n], mode="L").save(path)
    stamp.write_text(expected)
