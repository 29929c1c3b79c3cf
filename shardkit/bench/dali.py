"""NVIDIA DALI's CPU pipeline over the same raw shards: a reference row for the loader benchmark.

Optional: needs ``nvidia-dali-cuda*`` (which runs without a GPU when no operator asks for one).
The recipe matches shardkit's ``RandomResizedCrop(224)`` train loader: shuffled reading (a 1000
sample buffer, as plain webdataset's ``shuffle(1000)``), a random-area crop (0.08-1, aspect
3/4-4/3) decoded from each JPEG, an antialiased resize to 224×224, a random horizontal flip, uint8
out; labels from the ``.cls`` members. Batches are ``(images, labels)``: images N×3×224×224 uint8
in channels-last memory (as shardkit's), labels int64.
"""

from __future__ import annotations

import hashlib
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch


def available() -> bool:
    """Whether DALI can be imported here."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception:
        return False
    return True


def _write_index(tar: Path, idx: Path) -> None:
    """DALI's webdataset index (``wds2idx`` format v1.2): a "v1.2 <samples>" line, then per
    sample "<ext> <data offset> <size> <member name>" for each of its members."""
    samples: list[list[str]] = []
    last = None
    with tarfile.open(tar) as t:
        for m in t:
            if not m.isreg():
                continue
            dot = m.name.find(".", m.name.rfind("/") + 1)
            key, ext = m.name[:dot], m.name[dot + 1:]
            if dot < 0 or not key or key.endswith("/"):
                continue
            if key != last:
                samples.append([])
                last = key
            samples[-1].append(f"{ext} {m.offset_data} {m.size} {m.name}")
    tmp = idx.with_suffix(".tmp")
    tmp.write_text(f"v1.2 {len(samples)}\n" + "".join(" ".join(s) + "\n" for s in samples))
    tmp.replace(idx)


def _indexes(tars: list[Path], index_dir: Path | None) -> list[Path]:
    """One index per shard, kept (and reused while newer than its shard) in ``index_dir``:
    by default a folder under the system's temp dir named after the shards folder."""
    if index_dir is None:
        tag = hashlib.sha1(str(tars[0].parent.resolve()).encode()).hexdigest()[:16]
        index_dir = Path(tempfile.gettempdir()) / "shardkit-dali-index" / tag
    index_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for tar in tars:
        idx = index_dir / (tar.name + ".idx")
        if not idx.exists() or idx.stat().st_mtime < tar.stat().st_mtime:
            _write_index(tar, idx)
        out.append(idx)
    return out


class _Loader:
    """Each iteration is one epoch, exact: DALI pads the last batch, the iterator trims it."""

    def __init__(self, shards: Path, batch_size: int, workers: int, seed: int | None,
                 index_dir: Path | None) -> None:
        from nvidia.dali import Pipeline, fn, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        tars = sorted(Path(shards).glob("*.tar"))
        if not tars:
            raise FileNotFoundError(f"no *.tar shards in {shards}")

        pipe = Pipeline(batch_size=batch_size, num_threads=max(1, workers), device_id=None, seed=seed)
        with pipe:  # device_id=None and CPU operators only: no GPU needed
            outputs: Any = fn.readers.webdataset(
                paths=[str(p) for p in tars], index_paths=[str(p) for p in _indexes(tars, index_dir)],
                ext=["jpg", "cls"], missing_component_behavior="error", random_shuffle=True,
                initial_fill=1000, pad_last_batch=True, name="reader")
            jpegs, cls = outputs
            images: Any = fn.decoders.image_random_crop(
                jpegs, device="cpu", output_type=types.DALIImageType.RGB, random_area=[0.08, 1.0],
                random_aspect_ratio=[3 / 4, 4 / 3])
            images = fn.resize(images, resize_x=224, resize_y=224, antialias=True)
            images = fn.flip(images, horizontal=fn.random.coin_flip())
            # .cls holds the class as ASCII digits: pad to the batch's longest, parse in torch
            pipe.set_outputs(images, fn.pad(cls, fill_value=0))
        self._it = DALIGenericIterator(pipe, ["images", "cls"], reader_name="reader",
                                       last_batch_policy=LastBatchPolicy.PARTIAL,
                                       auto_reset=True)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for out in self._it:
            images, cls = out[0]["images"], out[0]["cls"]
            digits = cls.to(torch.int64)
            labels = torch.zeros(len(digits), dtype=torch.int64)
            for col in digits.T:
                labels = torch.where(col > 0, labels * 10 + col - 48, labels)
            yield images.permute(0, 3, 1, 2), labels  # NHWC memory, NCHW view: as shardkit's


def dali_cpu_loader(shards: Path, batch_size: int, workers: int, seed: int | None = None,
                    index_dir: Path | None = None) -> _Loader:
    """DALI's CPU pipeline (``workers`` threads) over the raw shards in ``shards``: an iterable
    whose every iteration is one shuffled train epoch of ``(images, labels)`` batches."""
    return _Loader(shards, batch_size, workers, seed, index_dir)
