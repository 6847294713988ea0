"""The embedded demo data: scikit-learn's handwritten digits (shipped with the package, no download)."""

from __future__ import annotations

from pathlib import Path

from tlray.errors import UserError


def write_digits(folder: str) -> int:
    """Write the 1,797 8x8 digits as `<folder>/<digit>/<n>.png`; skip if already complete."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("the demo needs scikit-learn: pip install 'tlray[demo]'") from None
    import numpy as np
    from PIL import Image

    if folder.startswith("s3://"):
        raise UserError("dataset.uri: the demo writes its images to a local folder, not s3://")
    digits = load_digits()
    root = Path(folder)
    if len(list(root.glob("*/*.png"))) == len(digits.target):
        return len(digits.target)
    for n, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        path = root / str(label) / f"{n:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        # 0..16 grey levels -> 0..255, 8-bit greyscale (the pipeline converts to RGB)
        Image.fromarray((pixels * 255 / 16).astype(np.uint8), mode="L").save(path)
    return len(digits.target)
