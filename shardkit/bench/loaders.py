"""Loader benchmark: shardkit against the seed techniques, plain webdataset and the machine's limits.

Every configuration reads the same images in one run, repeats interleaved (A B C A B C …), so the
ratios hold on a shared, noisy machine. Train recipe: random-resized crop to 224 + flip; eval
recipe: resize 256 + center crop 224, read in order (no shuffle); batches of ``batch_size``
made by ``workers`` persistent DataLoader workers. Each repeat of a configuration is a warm-up
epoch (time to first batch) and two timed epochs (samples/s: the steady state of a long training
run, not worker start-up).
Reported per configuration: samples/s, MB/s of stored bytes, CPU cores used in the timed epochs,
time to first batch, and memory: the peak of the machine's anonymous + shared memory over all
epochs, sampled every 2 ms, above what it was before the loader was made (``peak_mb``: main
process and workers together, each page once, page cache not counted; other processes on the
machine add to it), plus RSS of the main process and the largest worker and the PSS of all at
each batch from one more epoch (``total_pss_mb``: it misses the peaks between batches).
``cold`` runs evict the files from the page cache before each timed epoch
(``posix_fadvise(DONTNEED)``, no root needed). shardkit's loaders recycle batch memory
(``recycle_batches=True``, their default with pinned memory on a GPU machine).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

TRAIN, EVAL = "train", "eval"
DALI = "DALI CPU pipeline, raw train"  # a row when nvidia-dali is installed (bench/dali.py)
PRECROPPED = "eval, pre-cropped"  # tensor shards packed at 224: nothing left to do but batch


# --------------------------------------------------------------------------- helpers


def evict(paths) -> None:
    """Drop files from the page cache (for cold runs)."""
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _cpu_seconds() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _proc_mb(pid: int | str, file: str, field: str) -> float:
    """A "<field>: <n> kB" line of /proc/<pid>/<file>, in MB (0 when unreadable)."""
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _rss_mb(pid: int | str = "self") -> float:
    """Peak resident set size."""
    return _proc_mb(pid, "status", "VmHWM:")


def _pss_mb(pid: int | str = "self") -> float:
    """Proportional set size: shared pages split between the processes that map them, so the
    sum over a main process and its forked workers is the memory they really take."""
    return _proc_mb(pid, "smaps_rollup", "Pss:")


def used_mb() -> float:
    """The machine's anonymous + shared memory (``/proc/meminfo`` AnonPages + Shmem), MB: what
    processes hold, a page shared by several once, without the page cache; ~30 µs to read."""
    total = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(("AnonPages:", "Shmem:")):
                    total += int(line.split()[1])
    except OSError:
        pass
    return total / 1024


class PeakMemory:
    """The peak of :func:`used_mb` above its value at start, sampled every ``interval`` seconds
    on a thread while the ``with`` block runs."""

    def __init__(self, interval: float = 0.002):
        import threading

        self.interval, self.peak = interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, used_mb() - self.base)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "PeakMemory":
        self.base = used_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, used_mb() - self.base)


def _reset_peak() -> None:
    try:  # Linux >= 4.0: reset VmHWM so each configuration reports its own peak
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _children() -> list[int]:
    """Pids of this process's live children (DataLoader workers, whatever wraps them)."""
    pids = []
    for task in Path("/proc/self/task").glob("*"):
        try:
            pids += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            pass
    return pids


def proc_cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), from ``/proc/PID/stat``;
    0 when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2:].split()  # from field 3 on (the name may hold spaces)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # fields 14 and 15


def _time_loader(make: Callable[[], object], stored_bytes: int, expected: int,
                 cold_files=None, memory: bool = False, epochs: int = 2,
                 before_epoch: Callable[[], None] | None = None) -> dict:
    """A warm-up epoch, then ``epochs`` timed epochs over the same (persistent) workers.

    The warm-up epoch starts the workers and gives the time to the first batch; the timed epochs
    give the steady-state rate a weeks-long training run sees (on a small dataset, starting the
    workers would otherwise weigh as much as the work). ``cold_files`` are evicted from the page
    cache before every timed epoch. CPU is the main process's and its workers' during the timed
    epochs. ``peak_mb`` (:class:`PeakMemory`) covers every epoch, from before the loader is made.
    With ``memory``, RSS and PSS are read at every batch of the warm-up epoch instead of timing
    epochs (reading /proc/PID/smaps_rollup costs milliseconds, so timed runs do not do it).
    ``before_epoch`` is called before every epoch (the warm-up too) and once after the last.
    """
    with PeakMemory() as peak:
        result = _run_loader(make, stored_bytes, expected, cold_files, memory, epochs,
                             before_epoch or (lambda: None))
    result["peak_mb"] = peak.peak
    return result


def _run_loader(make, stored_bytes, expected, cold_files, memory, epochs, before_epoch) -> dict:
    _reset_peak()
    if cold_files:
        evict(cold_files)
    before_epoch()
    start = time.perf_counter()
    loader = make()
    first, n, worker_rss, total_pss = None, 0, 0.0, 0.0
    for batch in loader:  # warm-up epoch
        if first is None:
            first = time.perf_counter() - start
        n += len(batch[0])
        if memory:
            pids = _children()  # DataLoader worker processes
            for pid in pids:
                worker_rss = max(worker_rss, _rss_mb(pid))
            total_pss = max(total_pss, _pss_mb() + sum(_pss_mb(p) for p in pids))
    if n != expected:
        raise RuntimeError(f"loader yielded {n} samples, expected {expected}")
    seconds, cpu, n = 0.0, 0.0, 0
    for _ in range(0 if memory else epochs):
        if cold_files:
            evict(cold_files)
        before_epoch()
        procs: list[int | str] = ["self", *_children()]
        cpu0, t0 = sum(proc_cpu_seconds(p) for p in procs), time.perf_counter()
        for batch in loader:
            n += len(batch[0])
        seconds += time.perf_counter() - t0
        cpu += sum(proc_cpu_seconds(p) for p in procs) - cpu0
    before_epoch()
    del loader, batch  # joins the workers
    import gc

    gc.collect()
    if n != expected * (0 if memory else epochs):
        raise RuntimeError(f"loader yielded {n} samples in {epochs} epochs, expected "
                           f"{expected} each")
    seconds = seconds or float("nan")
    return {"samples_per_s": n / seconds, "mb_per_s": stored_bytes * epochs / 1e6 / seconds,
            "first_batch_s": first, "cpu_cores": cpu / seconds,
            "main_rss_mb": _rss_mb(), "worker_rss_mb": worker_rss, "total_pss_mb": total_pss,
            "samples": expected}  # per epoch, every epoch checked


def _tv_train():
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip()])


def _tv_eval():
    from torchvision.transforms import v2

    return v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(224)])


def _collate_stack(batch):
    images, labels = zip(*batch)
    return torch.stack(images), torch.tensor(labels)


# --------------------------------------------------------------------------- the seed techniques


def naive_imagefolder(images: Path, batch_size: int, workers: int, recipe: str = TRAIN):
    from torchvision import datasets
    from torchvision.transforms import v2

    tf = v2.Compose([v2.PILToTensor(), _tv_train() if recipe == TRAIN else _tv_eval()])
    ds = datasets.ImageFolder(str(images), transform=tf)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True,
                                       num_workers=workers, persistent_workers=workers > 0)


class _TensorFiles(torch.utils.data.Dataset):
    """The "preprocess once and torch.save each image" technique."""

    def __init__(self, files, labels):
        self.files, self.labels, self.tf = files, labels, _tv_train()

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return self.tf(torch.load(self.files[i], weights_only=True)), self.labels[i]


def tensor_files(folder: Path, batch_size: int, workers: int):
    files = sorted(folder.rglob("*.pt"))
    labels = [int(p.parent.name) for p in files]
    return torch.utils.data.DataLoader(_TensorFiles([str(p) for p in files], labels),
                                       batch_size=batch_size, shuffle=True, num_workers=workers,
                                       collate_fn=_collate_stack, persistent_workers=workers > 0)


class _InMemory(torch.utils.data.Dataset):
    """Everything decoded into one uint8 tensor in (shared) memory."""

    def __init__(self, data: torch.Tensor, labels: torch.Tensor):
        self.data, self.labels, self.tf = data, labels, _tv_train()

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.tf(self.data[i]), int(self.labels[i])


def in_memory(data: torch.Tensor, labels: torch.Tensor, batch_size: int, workers: int):
    return torch.utils.data.DataLoader(_InMemory(data, labels), batch_size=batch_size,
                                       shuffle=True, num_workers=workers,
                                       collate_fn=_collate_stack, persistent_workers=workers > 0)


def plain_webdataset(shards: Path, batch_size: int, workers: int):
    """webdataset's documented pipeline over the same raw shards."""
    import webdataset as wds
    from torchvision.transforms import v2

    urls = sorted(str(p) for p in shards.glob("*.tar"))
    tf = v2.Compose([v2.PILToTensor(), _tv_train()])
    ds = (wds.WebDataset(urls, shardshuffle=len(urls), nodesplitter=wds.split_by_node,
                         workersplitter=wds.split_by_worker, empty_check=False)
          .shuffle(1000).decode("pil").to_tuple("jpg", "cls").map_tuple(tf, int)
          .batched(batch_size, partial=True))
    return wds.WebLoader(ds, batch_size=None, num_workers=workers,
                         persistent_workers=workers > 0)


def shardkit_loader(shards: Path, batch_size: int, workers: int, recipe: str = TRAIN,
                    prefetch: int | None = None, recycle: bool = True,
                    block_size: int | str | None = None):
    import shardkit

    crop = {TRAIN: shardkit.RandomResizedCrop(224), EVAL: shardkit.CenterCrop(224, resize=256),
            PRECROPPED: None}[recipe]
    # evaluation reads in order, as torchvision's reference scripts do (SequentialSampler)
    ds = shardkit.StreamingDataset(shards, batch_size=batch_size, crop=crop,
                                   shuffle=recipe == TRAIN, block_size=block_size)
    # Recycled batch memory: the default on a GPU machine (pinned memory); asked for here, where
    # the consumer only counts and drops each batch.
    return shardkit.make_loader(ds, num_workers=workers, persistent_workers=workers > 0,
                                prefetch_factor=prefetch, recycle_batches=recycle and workers > 0)


def halves(shards: Path) -> list:
    """A packed dataset as two manifests of half its shards each (two sources of a mixture)."""
    import dataclasses

    import shardkit

    m = shardkit.Manifest.load(shards)
    half = len(m.shards) // 2
    return [dataclasses.replace(m, shards=part, num_samples=sum(s.num_samples for s in part))
            for part in (m.shards[:half], m.shards[half:])]


def shardkit_mixture(shards: Path, batch_size: int, workers: int, recycle: bool = True):
    """The same raw shards as a 50/50 mixture of two sources (each half of the shards), an
    epoch as large as the whole: what mixing costs over reading them as one dataset."""
    import shardkit

    parts = halves(shards)
    ds = shardkit.StreamingDataset([shardkit.Source(m, weight=1) for m in parts],
                                   epoch_size=sum(m.num_samples for m in parts),
                                   batch_size=batch_size, crop=shardkit.RandomResizedCrop(224))
    return shardkit.make_loader(ds, num_workers=workers, persistent_workers=workers > 0,
                                recycle_batches=recycle and workers > 0)


# --------------------------------------------------------------------------- limits


def _decode_crop(path_or_bytes):
    import io

    from PIL import Image
    from torchvision.transforms import v2

    data = path_or_bytes
    im = Image.open(io.BytesIO(data)).convert("RGB")
    out = v2.Compose([v2.PILToTensor(), _tv_train()])(im)
    return out.shape[0]


def _crop_uint8(i):
    return _LIMIT_DATA[i % len(_LIMIT_DATA)].shape[0] if _LIMIT_TF is None else \
        _LIMIT_TF(_LIMIT_DATA[i % len(_LIMIT_DATA)]).shape[0]


_LIMIT_DATA = None
_LIMIT_TF = None


def _one_thread() -> None:
    # Forked children must not enter torch's intra-op thread pool inherited from the parent
    # (it deadlocks); DataLoader workers do the same.
    torch.set_num_threads(1)


def _init_limit(data, crop):
    global _LIMIT_DATA, _LIMIT_TF
    _one_thread()
    _LIMIT_DATA, _LIMIT_TF = data, (_tv_train() if crop else None)


def decode_limit(blobs: list[bytes], procs: int) -> float:
    """PIL decode + random-resized crop + flip, images already in RAM, on ``procs`` processes."""
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(procs, initializer=_one_thread) as pool:
        start = time.perf_counter()
        pool.map(_decode_crop, blobs, chunksize=16)
        return len(blobs) / (time.perf_counter() - start)


def uint8_limit(data: torch.Tensor, n: int, procs: int, crop: bool = True) -> float:
    """Crop + flip (or just touching a ready crop) from uint8 tensors in RAM on ``procs`` processes."""
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(procs, initializer=_init_limit, initargs=(data, crop)) as pool:
        start = time.perf_counter()
        pool.map(_crop_uint8, range(n), chunksize=64)
        return n / (time.perf_counter() - start)


def copy_limit(crops: torch.Tensor, batch_size: int) -> float:
    """Copying ready uint8 crops into batches (one process): the ceiling of any loader."""
    n = len(crops)
    out = torch.empty((batch_size,) + tuple(crops.shape[1:]), dtype=torch.uint8)
    start = time.perf_counter()
    for lo in range(0, n, batch_size):
        chunk = crops[lo:lo + batch_size]
        out[:len(chunk)].copy_(chunk)
    return n / (time.perf_counter() - start)


def read_limit(files: list[Path], cold: bool) -> float:
    """Sequential read of the shard files, MB/s."""
    if cold:
        evict(files)
    total, start = 0, time.perf_counter()
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while chunk := f.read(8 << 20):
                total += len(chunk)
    return total / 1e6 / (time.perf_counter() - start)


# --------------------------------------------------------------------------- the run


def _prepare(images: Path, out: Path):
    """Pack the shards and build the seed techniques' inputs (once; reused on later runs)."""
    import numpy as np
    from PIL import Image

    import shardkit

    files = sorted(p for p in Path(images).rglob("*") if p.is_file())
    # 16 shards or more, as a real dataset has: plain webdataset hands out whole shards, so with
    # fewer shards than workers it would run on fewer cores than it was given.
    opts: dict[str, Any] = dict(resume=True, progress=False, max_samples=max(1, len(files) // 16))
    packs = {
        "raw": shardkit.pack_folder(images, out / "raw", mode="raw", **opts),
        "resize256": shardkit.pack_folder(images, out / "resize256", mode="resize", size=256,
                                          **opts),
        "tensor256": shardkit.pack_folder(images, out / "tensor256", mode="tensor", size=256,
                                          **opts),
        "tensor224": shardkit.pack_folder(images, out / "tensor224", mode="tensor", size=224,
                                          **opts),
    }
    classes = sorted({p.parent.name for p in files})
    pt_dir = out / "pt256"
    arrays = []
    for p in files:
        with Image.open(p) as opened:
            im = opened.convert("RGB")
            w, h = im.size
            s = 256 / min(w, h)
            im = im.resize((max(256, round(w * s)), max(256, round(h * s))), Image.Resampling.BICUBIC)
            w, h = im.size
            im = im.crop(((w - 256) // 2, (h - 256) // 2, (w - 256) // 2 + 256, (h - 256) // 2 + 256))
            t = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).contiguous()
        arrays.append(t)
        target = pt_dir / str(classes.index(p.parent.name)) / (p.stem + ".pt")
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.save(t, target)
    data = torch.stack(arrays).share_memory_()
    labels = torch.tensor([classes.index(p.parent.name) for p in files])
    return packs, files, pt_dir, data, labels


def run(folder: Path | None = None, out: Path = Path("bench-out"), *, classes: int = 10,
        per_class: int = 200, batch_size: int = 256, workers: int = 2, repeats: int = 3,
        cold: bool = True) -> dict:
    """Make (or take) an image folder, pack it, and time every configuration ``repeats`` times."""
    from .synth import make_image_folder

    out.mkdir(parents=True, exist_ok=True)
    images = Path(folder or make_image_folder(out / "images", classes=classes, per_class=per_class))
    packs, files, pt_dir, data, labels = _prepare(images, out)
    n = packs["raw"].num_samples
    folder_bytes = sum(p.stat().st_size for p in files)
    shard_files = {k: [Path(m.base_url) / s.url for s in m.shards] for k, m in packs.items()}
    pt_files = sorted(pt_dir.rglob("*.pt"))
    pt_bytes = sum(p.stat().st_size for p in pt_files)
    B, W = batch_size, workers
    configs: dict[str, tuple] = {
        "naive ImageFolder (warm)": (lambda: naive_imagefolder(images, B, W), folder_bytes, None),
        "per-image torch.save files": (lambda: tensor_files(pt_dir, B, W), pt_bytes, None),
        "everything in memory (uint8)": (lambda: in_memory(data, labels, B, W), data.numel(), None),
        "plain webdataset": (lambda: plain_webdataset(out / "raw", B, W),
                             packs["raw"].num_bytes, None),
        "shardkit raw, train": (lambda: shardkit_loader(out / "raw", B, W),
                                packs["raw"].num_bytes, None),
        "shardkit raw, eval": (lambda: shardkit_loader(out / "raw", B, W, EVAL),
                               packs["raw"].num_bytes, None),
        "shardkit resize256, train": (lambda: shardkit_loader(out / "resize256", B, W),
                                      packs["resize256"].num_bytes, None),
        "shardkit tensor256, train": (lambda: shardkit_loader(out / "tensor256", B, W),
                                      packs["tensor256"].num_bytes, None),
        "shardkit tensor224, eval": (lambda: shardkit_loader(out / "tensor224", B, W, PRECROPPED),
                                     packs["tensor224"].num_bytes, None),
        "shardkit raw, train, 50/50 mixture of its halves": (
            lambda: shardkit_mixture(out / "raw", B, W), packs["raw"].num_bytes, None),
        "shardkit tensor256, train, not recycled": (
            lambda: shardkit_loader(out / "tensor256", B, W, recycle=False),
            packs["tensor256"].num_bytes, None),
    }
    if cold:
        configs["naive ImageFolder (cold)"] = (lambda: naive_imagefolder(images, B, W),
                                               folder_bytes, files)
        configs["shardkit raw, train (cold)"] = (lambda: shardkit_loader(out / "raw", B, W),
                                                 packs["raw"].num_bytes, shard_files["raw"])
    from . import dali
    if dali.available():  # NVIDIA DALI's CPU pipeline, when installed: the same recipe
        configs[DALI] = (lambda: dali.dali_cpu_loader(out / "raw", B, W), packs["raw"].num_bytes,
                         None)
        if cold:
            configs[DALI + " (cold)"] = (lambda: dali.dali_cpu_loader(out / "raw", B, W),
                                         packs["raw"].num_bytes, shard_files["raw"])
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    blobs = [p.read_bytes() for p in files]
    cpus = len(os.sched_getaffinity(0))
    limits_runs: dict[str, list[float]] = {"decode + crop, RAM, all cores": [],
                                           "crop + flip from uint8, RAM, all cores": [],
                                           "copy ready uint8 crops": [],
                                           "sequential read MB/s (warm)": [],
                                           "sequential read MB/s (cold)": []}
    crops224 = data[:, :, 16:240, 16:240].contiguous()
    for _ in range(repeats):
        for name, (make, nbytes, cold_files) in configs.items():
            runs[name].append(_time_loader(make, nbytes, n, cold_files))
        limits_runs["decode + crop, RAM, all cores"].append(decode_limit(blobs, cpus))
        limits_runs["crop + flip from uint8, RAM, all cores"].append(uint8_limit(data, n, cpus))
        limits_runs["copy ready uint8 crops"].append(copy_limit(crops224, B))
        limits_runs["sequential read MB/s (warm)"].append(read_limit(shard_files["raw"], False))
        if cold:
            limits_runs["sequential read MB/s (cold)"].append(read_limit(shard_files["raw"], True))
    results = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
               for name, rs in runs.items()}
    for name, (make, nbytes, cold_files) in configs.items():  # one more epoch for memory
        mem = _time_loader(make, nbytes, n, cold_files, memory=True)
        results[name].update({k: mem[k] for k in ("main_rss_mb", "worker_rss_mb", "total_pss_mb")})
    limits = {k: statistics.median(v) for k, v in limits_runs.items() if v}
    memory = memory_budget(results, packs, W)
    rate = {k: r["samples_per_s"] for k, r in results.items()}
    ratios = {
        "raw train / naive (warm)": rate["shardkit raw, train"] / rate["naive ImageFolder (warm)"],
        "raw train / plain webdataset": rate["shardkit raw, train"] / rate["plain webdataset"],
        "raw 50/50 mixture / raw one dataset":
            rate["shardkit raw, train, 50/50 mixture of its halves"] / rate["shardkit raw, train"],
        "raw train / decode limit": rate["shardkit raw, train"] / limits["decode + crop, RAM, all cores"],
        "tensor256 train / uint8 limit": rate["shardkit tensor256, train"]
        / limits["crop + flip from uint8, RAM, all cores"],
        "tensor224 eval / copy limit": rate["shardkit tensor224, eval"] / limits["copy ready uint8 crops"],
    }
    if cold:
        ratios["raw train (cold) / naive (cold)"] = (rate["shardkit raw, train (cold)"]
                                                     / rate["naive ImageFolder (cold)"])
    if DALI in rate:
        ratios["raw train / DALI CPU"] = rate["shardkit raw, train"] / rate[DALI]
        if cold:
            ratios["raw train (cold) / DALI CPU (cold)"] = (rate["shardkit raw, train (cold)"]
                                                            / rate[DALI + " (cold)"])
    for r in results.values():
        r["vs_naive"] = r["samples_per_s"] / rate["naive ImageFolder (warm)"]
    report = {"samples": n, "image_bytes": folder_bytes, "batch_size": B, "workers": W,
              "repeats": repeats, "cpus": cpus, "results": results, "limits": limits,
              "ratios": ratios, "memory": memory}
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    chart(report, out / "bench.png")
    return report


def memory_budget(results: dict, packs: dict, workers: int,
                  shuffle_buffer: int | None = None) -> dict:
    """The memory target: shardkit's peak no more than the naive loader's plus its shuffle buffers
    (each worker holds up to ``shuffle_buffer`` read samples, as stored, before emitting them;
    default: ``StreamingDataset``'s, which the benchmark's loaders use)."""
    if shuffle_buffer is None:
        import inspect

        from ..dataset import StreamingDataset

        shuffle_buffer = inspect.signature(StreamingDataset).parameters["shuffle_buffer"].default
    naive = results["naive ImageFolder (warm)"]["peak_mb"]
    out = {"naive peak MB": naive}
    for kind, row in (("raw", "shardkit raw, train"), ("tensor256", "shardkit tensor256, train"),
                      ("tensor256", "shardkit tensor256, train, not recycled")):
        m = packs[kind]
        held = min(shuffle_buffer, -(-m.num_samples // workers)) * workers
        buffer = held * m.num_bytes / m.num_samples / 2**20
        over = results[row]["peak_mb"] - naive
        out[row] = {"over naive MB": over, "shuffle buffer MB": buffer, "ok": over <= buffer}
    return out


def format_report(report: dict) -> str:
    lines = [f"{report['samples']} images ({report['image_bytes'] / 1e6:.0f} MB), batch "
             f"{report['batch_size']}, {report['workers']} workers, {report['cpus']} CPUs, "
             f"median of {report['repeats']}",
             f"{'loader':40s} {'samples/s':>9s} {'MB/s':>7s} {'1st batch':>9s} {'cores':>5s} "
             f"{'main MB':>7s} {'worker MB':>9s} {'PSS MB':>7s} {'peak MB':>7s} {'vs naive':>8s}"]
    for name, r in report["results"].items():
        lines.append(f"{name:40s} {r['samples_per_s']:9.0f} {r['mb_per_s']:7.1f} "
                     f"{r['first_batch_s']:8.2f}s {r['cpu_cores']:5.2f} {r['main_rss_mb']:7.0f} "
                     f"{r['worker_rss_mb']:9.0f} {r['total_pss_mb']:7.0f} {r['peak_mb']:7.0f} "
                     f"{r['vs_naive']:7.2f}x")
    lines.append("limits:")
    for name, v in report["limits"].items():
        unit = "" if "MB/s" in name else " samples/s"
        lines.append(f"  {name:40s} {v:9.0f}{unit}")
    lines.append("ratios:")
    for name, v in report["ratios"].items():
        lines.append(f"  {name:40s} {v:6.2f}x")
    memory = report.get("memory")
    if memory:
        lines.append(f"memory: peak above the naive loader's ({memory['naive peak MB']:.0f} MB) "
                     "against the shuffle buffers:")
        for name, m in memory.items():
            if isinstance(m, dict):
                lines.append(f"  {name:40s} {m['over naive MB']:+6.0f} MB of "
                             f"{m['shuffle buffer MB']:4.0f} MB  {'ok' if m['ok'] else 'OVER'}")
    return "\n".join(lines)


def chart(report: dict, path: Path) -> None:
    """A horizontal bar chart of samples/s (Pillow only)."""
    from PIL import Image, ImageDraw

    items = list(report["results"].items())
    width, bar_h, left = 900, 26, 300
    height = 40 + bar_h * len(items)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    top = max(r["samples_per_s"] for _, r in items)
    draw.text((10, 10), f"samples/s, {report['workers']} workers, batch {report['batch_size']} "
                        f"(median of {report['repeats']})", fill="black")
    for i, (name, r) in enumerate(items):
        y = 34 + i * bar_h
        length = int((width - left - 80) * r["samples_per_s"] / top)
        color = (46, 120, 200) if name.startswith("shardkit") else (160, 160, 160)
        draw.text((10, y + 6), name, fill="black")
        draw.rectangle((left, y + 4, left + length, y + bar_h - 4), fill=color)
        draw.text((left + length + 6, y + 6), f"{r['samples_per_s']:.0f}", fill="black")
    img.save(path)


def auto(shards: Path, batch_size: int = 256, max_workers: int | None = None,
         prefetches=(2, 4)) -> dict:
    """Sweep num_workers × prefetch for the shardkit train recipe; pick the best; name the
    bottleneck by comparing with the read and decode limits."""
    import shardkit

    m = shardkit.Manifest.load(shards)
    cpus = len(os.sched_getaffinity(0))
    max_workers = max_workers or 2 * cpus
    sweep: dict[str, float] = {}
    for w in range(1, max_workers + 1):
        for pf in prefetches:
            r = _time_loader(partial(shardkit_loader, shards, batch_size, w, TRAIN, pf),
                             m.num_bytes, m.num_samples)
            sweep[f"{w}x{pf}"] = r["samples_per_s"]
    best = max(sweep, key=lambda k: sweep[k])
    w, pf = (int(x) for x in best.split("x"))
    assert m.base_url is not None  # Manifest.load sets it
    files = [Path(m.base_url) / s.url for s in m.shards]
    read_mb = read_limit(files, cold=False)
    loader_mb = sweep[best] * m.num_bytes / m.num_samples / 1e6
    blobs = []
    store_samples = shardkit.StreamingDataset(shards, decode="raw", shuffle=False)
    for i, (data, _) in enumerate(store_samples):
        blobs.append(data)
        if i >= 255:
            break
    dec = decode_limit(blobs * 4, cpus)
    if loader_mb > 0.8 * read_mb:
        bottleneck = "read"
    elif sweep[best] > 0.8 * dec:
        bottleneck = "decode"
    else:
        bottleneck = "transform/transfer (below both the read and the decode limits)"
    return {"sweep": sweep, "best": {"num_workers": w, "prefetch_factor": pf,
                                     "samples_per_s": sweep[best]},
            "read_limit_mb_per_s": read_mb, "decode_limit_samples_per_s": dec,
            "bottleneck": bottleneck}


def _pillow_resize(args) -> int:
    """The plain recipe packing is compared with: open, RGB, shorter side to size, JPEG."""
    import io

    from PIL import Image

    path, size = args
    im = Image.open(path).convert("RGB")
    w, h = im.size
    scale = size / min(w, h)
    if scale < 1:
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=90)
    return len(out.getvalue())


def run_pack(folder: Path | None = None, out: Path = Path("bench-out"), *, classes: int = 10,
             per_class: int = 60, workers: int = 2, repeats: int = 3) -> dict:
    """Packing speed against ``tar cf`` (raw) and a plain Pillow pool (resize, tensor)."""
    import subprocess

    import shardkit

    from .synth import make_image_folder

    out.mkdir(parents=True, exist_ok=True)
    images = Path(folder or make_image_folder(out / "images", classes=classes, per_class=per_class))
    files = sorted(str(p) for p in images.rglob("*") if p.is_file())

    def tar_cf():
        subprocess.run(["tar", "cf", str(out / "plain.tar"), "-C", str(images), "."], check=True)

    def pillow_pool():
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers) as pool:
            pool.map(_pillow_resize, [(f, 256) for f in files], chunksize=8)

    def pack(mode, size, w, durable=True):
        def go():
            shardkit.pack_folder(images, out / f"pack-{mode}", mode=mode, size=size, workers=w,
                                 overwrite=True, progress=False, durable=durable)
        return go

    configs = {"tar cf": tar_cf, "pack raw, 1 worker": pack("raw", None, 1),
               "pack raw, 1 worker, --no-fsync": pack("raw", None, 1, False),
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
    (out / "plain.tar").unlink(missing_ok=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    report = {"files": len(files), "workers": workers, "repeats": repeats, "seconds": med,
              "ratios": {"raw / tar cf": med["pack raw, 1 worker"] / med["tar cf"],
                         "raw --no-fsync / tar cf": med["pack raw, 1 worker, --no-fsync"] / med["tar cf"],
                         "resize pack speed-up over plain Pillow":
                             med["plain Pillow resize 256"] / med[f"pack resize 256, {workers} workers"],
                         "resize: 1 worker / N workers":
                             med["pack resize 256, 1 worker"] / med[f"pack resize 256, {workers} workers"],
                         "tensor: 1 worker / N workers":
                             med["pack tensor 224, 1 worker"] / med[f"pack tensor 224, {workers} workers"]}}
    (out / "bench-pack.json").write_text(json.dumps(report, indent=1))
    return report
