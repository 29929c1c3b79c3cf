"""``shardkit bench --index``: how fast ``shardkit index`` reads a folder of shards, against ``cat``.

``cat shards/* > /dev/null`` is the floor: one sequential read of every byte. Indexing reads every
byte too (the hash of each shard: BLAKE3 by default, ``hash="sha256"`` to time the old one) and
walks the tar headers. Both are timed warm (files in the
page cache, after a read) and cold (pages dropped with ``posix_fadvise(DONTNEED)`` first, where the
kernel honours it), the median of ``repeats`` runs each, interleaved.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path


def _shards(source: Path | None, out: Path, classes: int, per_class: int, workers: int) -> Path:
    """A folder of plain ``.tar`` shards: ``source`` itself, or packed from a synthetic folder."""
    if source is not None:
        return source
    from ..packing import pack_folder
    from ..shardformat import MANIFEST_PATH
    from .synth import make_image_folder

    folder = out / "index-images"
    if not folder.exists():
        make_image_folder(folder, classes=classes, per_class=per_class)
    packed = out / "index-packed"
    if not (packed / MANIFEST_PATH).exists():  # packed by an earlier run: kept
        pack_folder(folder, packed, workers=workers, progress=False)
    shards = out / "index-shards"  # the tar files alone, as webdataset shards with no index
    shutil.rmtree(shards, ignore_errors=True)
    shards.mkdir(parents=True)
    for tar in sorted(packed.glob("*.tar")):
        os.link(tar, shards / tar.name)
    return shards


def _drop_pages(files: list[Path]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_index(source: Path | None, out: Path, *, classes: int = 10, per_class: int = 200,
              workers: int = 2, repeats: int = 3, hash: str = "blake3") -> dict:
    """Seconds and GB/s of ``cat`` and ``index_shards`` on the same shards, warm and cold."""
    from ..indexer import index_shards

    out.mkdir(parents=True, exist_ok=True)
    folder = _shards(source, out, classes, per_class, workers)
    files = sorted(folder.glob("*.tar"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .tar shards")
    total = sum(f.stat().st_size for f in files)
    index_dir = out / "index-out"
    samples = []

    def cat() -> float:
        start = time.perf_counter()
        subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
        return time.perf_counter() - start

    def index() -> float:
        shutil.rmtree(index_dir, ignore_errors=True)
        start = time.perf_counter()
        manifest = index_shards(folder, index_dir, workers=workers, progress=False, hash=hash)
        took = time.perf_counter() - start
        samples.append(manifest.num_samples)
        return took

    seconds: dict[str, list[float]] = {k: [] for k in ("cat warm", "index warm", "cat cold",
                                                        "index cold")}
    cat()  # the page cache holds the shards from here on (warm)
    for _ in range(repeats):
        seconds["cat warm"].append(cat())
        seconds["index warm"].append(index())
        _drop_pages(files)
        seconds["cat cold"].append(cat())
        _drop_pages(files)
        seconds["index cold"].append(index())
    median = {k: statistics.median(v) for k, v in seconds.items()}
    return {
        "shards": len(files), "bytes": total, "samples": samples[-1], "workers": workers,
        "hash": hash,
        "cpus": os.cpu_count(), "repeats": repeats,
        "seconds": median,
        "gb_per_s": {k: total / 1e9 / v for k, v in median.items()},
        "ratios": {"index / cat, warm": median["cat warm"] / median["index warm"],
                   "index / cat, cold": median["cat cold"] / median["index cold"]},
    }


def format_index_report(report: dict) -> str:
    lines = [f"{report['shards']} shards, {report['bytes'] / 1e6:.0f} MB, {report['samples']} "
             f"samples; index workers {report['workers']} of {report['cpus']} CPUs; median of "
             f"{report['repeats']}"]
    for name, sec in report["seconds"].items():
        lines.append(f"{name:12s} {sec:7.3f} s  {report['gb_per_s'][name]:6.2f} GB/s")
    hashed = report.get("hash", "sha256")
    targets = {"index / cat, warm": f"bound by the CPU: {hashed} and the header walk",
               "index / cat, cold": "target >= 0.8x"}
    for name, ratio in report["ratios"].items():
        lines.append(f"{name:20s} {ratio:5.2f}x  ({targets.get(name, '')})")
    return "\n".join(lines)
