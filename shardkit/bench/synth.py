"""Photo-like synthetic image folders for the demo, the benchmark and tests.

Images have ImageNet-like sizes (about 400x350, varying) and entropy: smooth multi-scale colour
fields, edges and fine grain, so JPEGs come out near 100 KB at quality 90, not flat colours that
compress to nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image


def photo_like(rng: np.random.Generator, width: int, height: int, hue: float = 0.0) -> Image.Image:
    """One photo-like RGB image."""
    acc = np.zeros((height, width, 3), np.float32)
    for cells, weight in ((3, 90.0), (9, 50.0), (27, 30.0), (81, 22.0), (200, 16.0)):
        small = rng.random((cells, cells, 3), dtype=np.float32)
        layer = Image.fromarray((small * 255).astype(np.uint8)).resize((width, height),
                                                                       Image.Resampling.BICUBIC)
        acc += (np.asarray(layer, np.float32) / 255.0 - 0.5) * weight
    tint = np.array([np.cos(hue), np.cos(hue + 2.1), np.cos(hue + 4.2)], np.float32) * 40
    acc += 128 + tint
    acc += rng.normal(0, 22.0, acc.shape).astype(np.float32)  # sensor grain
    return Image.fromarray(np.clip(acc, 0, 255).astype(np.uint8))


def make_image_folder(dest: str | os.PathLike, *, classes: int = 10, per_class: int = 30,
                      seed: int = 0, size: tuple[int, int] = (400, 350), quality: int = 90,
                      jitter: float = 0.25) -> Path:
    """Write ``classes`` class folders of ``per_class`` JPEGs each; returns the folder.

    Existing files are kept (re-running is cheap), so the same call gives the same folder.
    """
    root = Path(dest)
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class_{c:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w = int(size[0] * (1 + rng.uniform(-jitter, jitter)))
            h = int(size[1] * (1 + rng.uniform(-jitter, jitter)))
            path = folder / f"img_{i:05d}.jpg"
            sub = np.random.default_rng([seed, c, i])
            if path.exists():
                continue
            photo_like(sub, w, h, hue=c * 0.7).save(path, quality=quality)
    return root
