"""What one sample costs: 1,000 seeded random reads through :class:`shardkit.MapDataset` against
a naive torchvision ``ImageFolder`` doing the same reads of the same images
(``shardkit bench --random``; the random-access issue's figure).

Two pairs, each in one process (no DataLoader: the cost of one ``m[i]``): the stored bytes
(MapDataset ``decode="raw"`` against reading the image file), and decoded ``uint8`` tensors
(MapDataset ``decode="uint8"`` against ``ImageFolder`` + ``PILToTensor``), warm (page cache) and
cold (the files dropped from it before each run, where the OS allows). Runs alternate; medians
count."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from .loaders import evict

__all__ = ["format_random_report", "run_random"]


def _timed(read, order) -> float:
    start = time.perf_counter()
    for i in order:
        read(int(i))
    return len(order) / (time.perf_counter() - start)


def run_random(folder: Path | None = None, out: Path = Path("bench-out"), *, classes: int = 10,
               per_class: int = 200, reads: int = 1000, repeats: int = 3, seed: int = 0,
               cold: bool = True) -> dict:
    import torch
    from torchvision import datasets
    from torchvision.transforms import v2

    import shardkit

    from .synth import make_image_folder

    out.mkdir(parents=True, exist_ok=True)
    images = Path(folder or make_image_folder(out / "images", classes=classes, per_class=per_class))
    m = shardkit.pack_folder(images, out / "raw", mode="raw", resume=True, progress=False,
                             max_samples=max(1, sum(1 for p in images.rglob("*") if p.is_file())
                                             // 16))
    shards = [out / "raw" / s.url for s in m.shards]
    folder_ds = datasets.ImageFolder(str(images), transform=v2.PILToTensor())
    files = [Path(p) for p, _ in folder_ds.samples]
    raw_map = shardkit.MapDataset(out / "raw", decode="raw")
    u8_map = shardkit.MapDataset(out / "raw", decode="uint8")
    # the same images in both: MapDataset index i and its ImageFolder index, by original path
    path_of = {str(p.relative_to(images)): i for i, p in enumerate(files)}
    order = np.random.default_rng(seed).choice(len(raw_map), size=min(reads, len(raw_map)),
                                               replace=False)
    folder_index = np.array([path_of[_path(raw_map, int(i))] for i in order])
    raw_map.close()
    assert torch.equal(u8_map[int(order[0])][0], folder_ds[int(folder_index[0])][0])

    configs = {
        "ImageFolder, bytes (open + read)": (lambda i: files[i].read_bytes(), folder_index, files),
        "MapDataset, decode='raw'": (raw_map.__getitem__, order, shards),
        "ImageFolder + PILToTensor, uint8": (folder_ds.__getitem__, folder_index, files),
        "MapDataset, decode='uint8'": (u8_map.__getitem__, order, shards),
    }
    temps = ["warm", "cold"] if cold else ["warm"]
    runs: dict[str, list[float]] = {f"{name} ({t})": [] for t in temps for name in configs}
    for _ in range(repeats):
        for t in temps:
            for name, (read, idx, paths) in configs.items():
                if t == "cold":
                    raw_map.close()
                    u8_map.close()
                    evict(paths)
                else:
                    _timed(read, idx[:50])  # files open, pages in
                runs[f"{name} ({t})"].append(_timed(read, idx))
    rates = {k: statistics.median(v) for k, v in runs.items()}
    ratios = {}
    for t in temps:
        ratios[f"bytes, {t}"] = rates[f"MapDataset, decode='raw' ({t})"] / \
            rates[f"ImageFolder, bytes (open + read) ({t})"]
        ratios[f"uint8, {t}"] = rates[f"MapDataset, decode='uint8' ({t})"] / \
            rates[f"ImageFolder + PILToTensor, uint8 ({t})"]
    return {"samples": m.num_samples, "shards": len(m.shards), "reads": len(order),
            "repeats": repeats, "samples_per_s": rates,
            "runs": runs, "MapDataset / ImageFolder": ratios}


def _path(m, i: int) -> str:
    import json

    return json.loads(m.sample(i)["json"])["path"]


def format_random_report(report: dict) -> str:
    lines = [f"{report['reads']} random reads of {report['samples']} samples "
             f"({report['shards']} raw shards), one process, median of {report['repeats']} "
             "alternated runs"]
    for name, rate in report["samples_per_s"].items():
        runs = ", ".join(f"{r:.0f}" for r in report["runs"][name])
        lines.append(f"  {name:48s} {rate:8.0f} samples/s  ({runs})")
    for name, ratio in report["MapDataset / ImageFolder"].items():
        lines.append(f"MapDataset / ImageFolder, {name}: {ratio:.2f}x")
    return "\n".join(lines)
