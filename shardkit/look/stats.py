"""A dataset's numbers (:func:`dataset_stats`): samples per class and per shard, shard sizes and
image sizes, from one pass over the samples.

Every sample is read once, shard after shard (one sequential read per shard), or a seeded subset
(``max_samples``): labels as the manifest says, image sizes from the ``.json`` the packer keeps
(the original size), else from the image's header (JPEG frame header, Pillow's header read, the
``.npy`` header); nothing is decoded.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from .choosing import check_count, label_reader, location_of, mode_of, open_source
from .pictures import image_size

if TYPE_CHECKING:
    from ..access import MapDataset
    from ..manifest import Manifest
    from .choosing import Source


def _all_samples(m: MapDataset) -> Iterator[dict]:
    """Every raw sample, shard after shard: one sequential read of each shard."""
    for shard, info in enumerate(m.manifest.shards):
        yield from m.reader.samples(shard, 0, info.num_samples)


def dataset_stats(source: Source, *, seed: int = 0, max_samples: int | None = None,
                  storage_options: dict | None = None, cache_dir: str | os.PathLike | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """The numbers :func:`stats_picture` draws, from one pass over the samples.

    Every sample is read, shard after shard (one sequential read each), or with
    ``max_samples`` a seeded subset of that many (``seed``). Nothing is decoded: labels as the
    manifest says, sizes from the packer's ``.json`` (original sizes) or image headers. A
    progress bar shows when this takes over a second (``progress``). Returns ``{"location",
    "mode", "num_samples", "num_shards", "num_bytes", "classes", "looked_at", "subset", "seed",
    "per_class" (name -> count, in class order; None without labels), "unlabeled",
    "shard_samples", "shard_bytes" (per shard, from the manifest), "widths", "heights" (per
    sample read, -1 where unknown), "sizes_from_metadata", "seconds"}``."""
    from tqdm import tqdm

    if max_samples is not None:
        check_count("max_samples", max_samples)
    start = time.perf_counter()
    m = open_source(source, storage_options, cache_dir)
    man, n = m.manifest, len(m)
    label = label_reader(man)
    packed = bool(man.options.get("mode")) if isinstance(man.options, dict) else False
    layout = (man.tensor or {}).get("layout")
    subset = max_samples is not None and max_samples < n
    if subset:
        assert max_samples is not None
        chosen = np.sort(np.random.default_rng(seed).choice(n, max_samples, replace=False))
        count = max_samples
        it: Iterator[dict] = (m.sample(int(i)) for i in chosen)
    else:
        count, it = n, _all_samples(m)
    labels = np.full(count, -1, dtype=np.int64)
    widths = np.full(count, -1, dtype=np.int64)
    heights = np.full(count, -1, dtype=np.int64)
    from_meta = 0
    seen = 0
    with tqdm(total=count, desc="reading samples", unit="sample", delay=1.0, leave=False,
              disable=not progress) as bar:
        for j, sample in enumerate(it):
            if j >= count:  # more than the manifest counts: the reader would have said so
                break
            labels[j] = label(sample)
            size, meta = image_size(sample, packed, layout)
            if size is not None:
                widths[j], heights[j] = size
                from_meta += meta
            seen = j + 1
            bar.update(1)
    labels, widths, heights = labels[:seen], widths[:seen], heights[:seen]
    names = man.classes
    per_class: dict[str, int] | None = None
    known = labels >= 0
    if names:
        inside = known & (labels < len(names))
        counts = np.bincount(labels[inside], minlength=len(names))
        per_class = {name: int(c) for name, c in zip(names, counts)}
        unlabeled = int(seen - inside.sum())
    elif known.any():
        values, counts = np.unique(labels[known], return_counts=True)
        per_class = {str(v): int(c) for v, c in zip(values.tolist(), counts.tolist())}
        unlabeled = int(seen - known.sum())
    else:
        unlabeled = seen
    return {"location": location_of(man), "mode": mode_of(man), "num_samples": n,
            "num_shards": len(man.shards), "num_bytes": man.num_bytes, "classes": names,
            "looked_at": seen, "subset": subset, "seed": seed, "per_class": per_class,
            "unlabeled": unlabeled, "shard_samples": np.asarray(man.shard_sizes(), dtype=np.int64),
            "shard_bytes": _shard_bytes(man), "widths": widths, "heights": heights,
            "sizes_from_metadata": int(from_meta), "seconds": time.perf_counter() - start}


def _shard_bytes(man: Manifest) -> np.ndarray:
    shards = man.shards
    table_bytes = getattr(shards, "num_bytes", None)
    if callable(table_bytes):  # a ShardTable (manifest.cols): one column
        return np.asarray(table_bytes(), dtype=np.int64)
    return np.fromiter((s.num_bytes for s in shards), dtype=np.int64, count=len(shards))
