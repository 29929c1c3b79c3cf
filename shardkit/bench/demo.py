"""The Quick start demo: make a photo-like image folder, pack it, stream it, compare with ImageFolder."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..common import format_bytes


def _naive_imagefolder(images: Path, batch_size: int, workers: int) -> float:
    """Samples/s of torchvision's ImageFolder + DataLoader with the same train recipe."""
    import torch
    from torchvision import datasets
    from torchvision.transforms import v2

    tf = v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(224, antialias=True),
                     v2.RandomHorizontalFlip()])
    ds = datasets.ImageFolder(str(images), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers)
    start, n = time.perf_counter(), 0
    for x, _ in loader:
        n += len(x)
    return n / (time.perf_counter() - start)


def _stream(dest: Path, batch_size: int, workers: int) -> tuple[float, int, int]:
    from tqdm.auto import tqdm

    from ..dataset import StreamingDataset
    from ..decode import RandomResizedCrop
    from ..loader import make_loader

    ds = StreamingDataset(dest, batch_size=batch_size, crop=RandomResizedCrop(224), with_keys=True)
    loader = make_loader(ds, num_workers=workers, persistent_workers=False)
    keys: set = set()
    start, n = time.perf_counter(), 0
    with tqdm(total=len(ds), unit="batch", desc="stream", disable=not sys.stderr.isatty()) as bar:
        for images, _labels, batch_keys in loader:
            n += len(images)
            keys.update(batch_keys)
            bar.update(1)
    return n / (time.perf_counter() - start), n, len(keys)


def run_demo(workdir: str = "demo-data", classes: int = 10, per_class: int = 30) -> int:
    from ..packing import pack_folder
    from .synth import make_image_folder

    root = Path(workdir)
    t0 = time.perf_counter()
    images = make_image_folder(root / "images", classes=classes, per_class=per_class)
    n = classes * per_class
    print(f"[1/3] image folder: {images} ({classes} classes x {per_class} photo-like JPEGs, "
          f"{format_bytes(sum(p.stat().st_size for p in images.rglob('*.jpg')))}) "
          f"in {time.perf_counter() - t0:.1f} s")
    for mode, size in (("raw", None), ("resize", 256), ("tensor", 224)):
        dest = root / f"shards-{mode}"
        m = pack_folder(images, dest, mode=mode, size=size, max_bytes="8MB", overwrite=True)
        s = m.stats
        assert s is not None  # pack_folder's manifest has its stats
        print(f"[2/3] packed {mode:6s}: {s['samples']} samples -> {s['shards']} shards "
              f"({format_bytes(s['bytes'])}) in {s['seconds']:.1f} s "
              f"({s['samples'] / max(s['seconds'], 1e-9):.0f} images/s) -> {dest}")
    assert m.classes is not None  # an ImageFolder layout: classes
    print(f"      classes: {', '.join(m.classes[:3])}, ... ({len(m.classes)} in all)")
    workers = 2
    rate, seen, unique = _stream(root / "shards-raw", batch_size=32, workers=workers)
    print(f"[3/3] streamed one epoch of shards-raw (RandomResizedCrop 224 + flip, batches of 32, "
          f"{workers} workers): {seen} samples, {unique} distinct keys, {rate:.0f} samples/s")
    naive = _naive_imagefolder(images, batch_size=32, workers=workers)
    print(f"      naive ImageFolder + DataLoader, same recipe: {naive:.0f} samples/s "
          f"-> shardkit is {rate / naive:.2f}x (tiny dataset, warm cache: see tools/bench.py)")
    print(f"try: python tools/show.py {root / 'shards-resize'}  and  "
          f"python tools/verify.py {root / 'shards-resize'}")
    ok = seen == n and unique == n
    if not ok:
        print(f"error: expected {n} distinct samples, got {unique} of {seen}", file=sys.stderr)
    return 0 if ok else 1
