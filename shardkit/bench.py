"""Loader benchmark: shardkit against the naive ImageFolder loader and plain webdataset.

Every configuration reads the same images with the same recipe (random-resized crop to 224 +
flip, batches of ``batch_size``, ``workers`` DataLoader workers) in one run, repeats interleaved,
so the ratios are meaningful on a shared, noisy machine. Reported: samples/s, MB/s of stored
bytes, time to first batch.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def _time_loader(make: Callable[[], object], stored_bytes: int, expected: int) -> dict:
    start = time.perf_counter()
    loader = make()
    first = None
    n = 0
    for batch in loader:
        if first is None:
            first = time.perf_counter() - start
        n += len(batch[0])
    seconds = time.perf_counter() - start
    if n != expected:
        raise RuntimeError(f"loader yielded {n} samples, expected {expected}")
    return {"samples_per_s": n / seconds, "mb_per_s": stored_bytes / 1e6 / seconds,
            "first_batch_s": first, "seconds": seconds, "samples": n}


def naive_imagefolder(images: Path, batch_size: int, workers: int):
    from torchvision import datasets
    from torchvision.transforms import v2

    tf = v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(224, antialias=True),
                     v2.RandomHorizontalFlip()])
    ds = datasets.ImageFolder(str(images), transform=tf)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True,
                                       num_workers=workers)


def plain_webdataset(shards: Path, batch_size: int, workers: int):
    """webdataset's documented pipeline over the same raw shards."""
    import webdataset as wds
    from torchvision.transforms import v2

    urls = sorted(str(p) for p in shards.glob("*.tar"))
    tf = v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(224, antialias=True),
                     v2.RandomHorizontalFlip()])
    ds = (wds.WebDataset(urls, shardshuffle=len(urls), nodesplitter=wds.split_by_node,
                         empty_check=False)
          .shuffle(1000).decode("pil").to_tuple("jpg", "cls").map_tuple(tf, int)
          .batched(batch_size, partial=True))
    return wds.WebLoader(ds, batch_size=None, num_workers=workers)


def shardkit_loader(shards: Path, batch_size: int, workers: int, crop):
    import shardkit

    ds = shardkit.StreamingDataset(shards, batch_size=batch_size, crop=crop)
    return shardkit.make_loader(ds, num_workers=workers, persistent_workers=False)


def run(folder: Path | None = None, out: Path = Path("bench-out"), *, classes: int = 10,
        per_class: int = 100, batch_size: int = 64, workers: int = 2, repeats: int = 3) -> dict:
    """Make (or take) an image folder, pack it, and time every loader ``repeats`` times."""
    import shardkit
    from shardkit.synth import make_image_folder

    out.mkdir(parents=True, exist_ok=True)
    images = folder or make_image_folder(out / "images", classes=classes, per_class=per_class)
    raw = shardkit.pack_folder(images, out / "raw", mode="raw", resume=True, progress=False)
    tensor = shardkit.pack_folder(images, out / "tensor256", mode="tensor", size=256, resume=True,
                                  progress=False)
    n = raw.num_samples
    folder_bytes = sum(p.stat().st_size for p in Path(images).rglob("*") if p.is_file())
    configs = {
        "naive ImageFolder": (lambda: naive_imagefolder(images, batch_size, workers), folder_bytes),
        "plain webdataset": (lambda: plain_webdataset(out / "raw", batch_size, workers),
                             raw.num_bytes),
        "shardkit raw, train": (lambda: shardkit_loader(out / "raw", batch_size, workers,
                                                        shardkit.RandomResizedCrop(224)),
                                raw.num_bytes),
        "shardkit tensor256, train": (lambda: shardkit_loader(out / "tensor256", batch_size,
                                                              workers,
                                                              shardkit.RandomResizedCrop(224)),
                                      tensor.num_bytes),
    }
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    for _ in range(repeats):
        for name, (make, nbytes) in configs.items():
            runs[name].append(_time_loader(make, nbytes, n))
    results = {}
    for name, rs in runs.items():
        results[name] = {key: statistics.median(r[key] for r in rs)
                         for key in ("samples_per_s", "mb_per_s", "first_batch_s")}
    base = results["naive ImageFolder"]["samples_per_s"]
    wds_rate = results["plain webdataset"]["samples_per_s"]
    for r in results.values():
        r["vs_naive"] = r["samples_per_s"] / base
        r["vs_webdataset"] = r["samples_per_s"] / wds_rate
    report = {"samples": n, "batch_size": batch_size, "workers": workers, "repeats": repeats,
              "cpus": os.cpu_count(), "results": results}
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    return report


def format_report(report: dict) -> str:
    lines = [f"{report['samples']} samples, batch {report['batch_size']}, {report['workers']} "
             f"workers, median of {report['repeats']}",
             f"{'loader':28s} {'samples/s':>10s} {'MB/s':>8s} {'1st batch':>10s} "
             f"{'vs naive':>9s} {'vs wds':>8s}"]
    for name, r in report["results"].items():
        lines.append(f"{name:28s} {r['samples_per_s']:10.0f} {r['mb_per_s']:8.1f} "
                     f"{r['first_batch_s']:9.2f}s {r['vs_naive']:8.2f}x {r['vs_webdataset']:7.2f}x")
    return "\n".join(lines)


def _pillow_resize(args) -> int:
    """The plain recipe packing is compared with: open, RGB, shorter side to size, JPEG."""
    import io

    from PIL import Image

    path, size = args
    im = Image.open(path).convert("RGB")
    w, h = im.size
    scale = size / min(w, h)
    if scale < 1:
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=90)
    return len(out.getvalue())


def run_pack(folder: Path | None = None, out: Path = Path("bench-out"), *, classes: int = 10,
             per_class: int = 60, workers: int = 2, repeats: int = 3) -> dict:
    """Packing speed against ``tar cf`` (raw) and a plain Pillow pool (resize, tensor)."""
    import multiprocessing
    import shutil
    import subprocess

    import shardkit
    from shardkit.synth import make_image_folder

    out.mkdir(parents=True, exist_ok=True)
    images = Path(folder or make_image_folder(out / "images", classes=classes, per_class=per_class))
    files = sorted(str(p) for p in images.rglob("*") if p.is_file())

    def tar_cf():
        subprocess.run(["tar", "cf", str(out / "plain.tar"), "-C", str(images), "."], check=True)

    def pillow_pool():
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers) as pool:
            pool.map(_pillow_resize, [(f, 256) for f in files], chunksize=8)

    def pack(mode, size, w):
        def go():
            shardkit.pack_folder(images, out / f"pack-{mode}", mode=mode, size=size, workers=w,
                                 overwrite=True, progress=False)
        return go

    configs = {"tar cf": tar_cf, "pack raw": pack("raw", None, workers),
               "plain Pillow resize 256": pillow_pool,
               "pack resize 256, 1 worker": pack("resize", 256, 1),
               f"pack resize 256, {workers} workers": pack("resize", 256, workers),
               "pack tensor 224, 1 worker": pack("tensor", 224, 1),
               f"pack tensor 224, {workers} workers": pack("tensor", 224, workers)}
    times: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(repeats):
        for name, fn in configs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    shutil.rmtree(out / "plain.tar", ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    report = {"files": len(files), "workers": workers, "repeats": repeats, "seconds": med,
              "ratios": {"raw / tar cf": med["pack raw"] / med["tar cf"],
                         "plain Pillow / resize pack (speed-up)":
                             med["plain Pillow resize 256"] / med[f"pack resize 256, {workers} workers"],
                         "resize: 1 worker / N workers":
                             med["pack resize 256, 1 worker"] / med[f"pack resize 256, {workers} workers"],
                         "tensor: 1 worker / N workers":
                             med["pack tensor 224, 1 worker"] / med[f"pack tensor 224, {workers} workers"]}}
    (out / "bench-pack.json").write_text(json.dumps(report, indent=1))
    return report
