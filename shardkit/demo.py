"""The Quick start demo: make a photo-like image folder, pack it, show what was made."""

from __future__ import annotations

import time
from pathlib import Path

from .cli import _fmt_bytes


def run_demo(workdir: str = "demo-data", classes: int = 10, per_class: int = 30) -> int:
    from .synth import make_image_folder
    from .writer import pack_folder

    root = Path(workdir)
    t0 = time.perf_counter()
    images = make_image_folder(root / "images", classes=classes, per_class=per_class)
    n = classes * per_class
    print(f"[1/2] image folder: {images} ({classes} classes x {per_class} photo-like JPEGs, "
          f"{_fmt_bytes(sum(p.stat().st_size for p in images.rglob('*.jpg')))}) "
          f"in {time.perf_counter() - t0:.1f} s")
    for mode, size in (("raw", None), ("resize", 256), ("tensor", 224)):
        dest = root / f"shards-{mode}"
        m = pack_folder(images, dest, mode=mode, size=size, max_bytes="8MB", overwrite=True)
        s = m.stats
        print(f"[2/2] packed {mode:6s}: {s['samples']} samples -> {s['shards']} shards "
              f"({_fmt_bytes(s['bytes'])}) in {s['seconds']:.1f} s "
              f"({s['samples'] / max(s['seconds'], 1e-9):.0f} images/s) -> {dest}")
    m = pack_folder(images, root / "shards-raw", mode="raw", max_bytes="8MB", resume=True)
    print(f"classes: {', '.join(m.classes[:5])}, ... ({len(m.classes)} in all); "
          f"{n} images expected, {m.num_samples} packed")
    print(f"try: python tools/show.py {root / 'shards-resize'}  and  "
          f"python tools/verify.py {root / 'shards-resize'}")
    return 0 if m.num_samples == n else 1
