"""Feeding a GPU, measured in one run (``python tools/gpu_check.py``; one JSON document).

On ImageNet-sized photo-like JPEGs (500×375, ~110 KB at quality 90), packed as raw JPEG shards
and as 256² tensor shards, with ``--workers`` DataLoader workers (default: every CPU):

- per shard kind: the loader alone (batches into pinned memory), a ResNet-18 step alone (bf16
  autocast, channels-last, on one batch already on the device), and loader + ``GpuPrefetcher`` +
  the step, with the prefetcher's bounded run-ahead (``max_ahead=2``, the default) and without
  it (``max_ahead=None``): ``combined / min(loader, step)`` is the overlap (1.0: perfect);
- raw JPEG with ``decode="gpu"``: the same three, the decode limit of the device alone (one
  encoded batch decoded again and again), and the CPU cores the workers used;
- ResNet-50 from raw JPEG (CPU decode and ``decode="gpu"``): ``combined / step alone``;
- GPU utilization, sampled every 0.1 s during each combined run (NVML through
  ``torch.cuda.utilization``; None where it is not available);
- a correctness check: the prefetcher's normalized batch against the same normalization on the
  CPU, and ``decode="gpu"`` against the CPU decoder on the same crops.

Every rate is samples per second over a fixed number of batches after a warm-up, so the whole run
takes a few minutes on a GPU machine. ``--device cpu --smoke`` runs the same code on a tiny case
(CI runs it so the script works when a GPU is lent).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import torch

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Utilization:
    """GPU utilization sampled in a thread while the ``with`` block runs (mean, percent)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        read = self._nvml
        while not self._stop.wait(0.1):
            try:
                self.samples.append(read())
            except Exception:  # noqa: BLE001 - no NVML: try nvidia-smi, else unknown
                if read == self._smi:
                    return
                read = self._smi

    def _nvml(self) -> float:
        return float(torch.cuda.utilization(self.device))

    def _smi(self) -> float:
        import subprocess

        index = self.device.index if self.device.index is not None else \
            torch.cuda.current_device()
        res = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu",
                              "--format=csv,noheader,nounits", f"--id={index}"],
                             capture_output=True, text=True, timeout=5, check=True)
        return float(res.stdout.strip().splitlines()[0])

    def __enter__(self) -> Utilization:
        if self.device.type == "cuda":
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model(name: str, device: torch.device):
    import torchvision

    model = getattr(torchvision.models, name)(num_classes=10).to(device)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    amp = torch.bfloat16

    def step(images, labels):
        with torch.autocast(device.type, dtype=amp):
            loss = torch.nn.functional.cross_entropy(model(images), labels % 10)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _rate(items, step, device: torch.device, batches: int, warmup: int, cores: list | None = None
          ) -> tuple[float, float | None]:
    """Samples/s of ``step`` over ``batches`` items of the iterable ``items`` after ``warmup``,
    and the mean GPU utilization meanwhile (``cores``: gets the CPU cores used meanwhile by this
    process and its children, the loader's workers)."""
    it = iter(items)
    for _ in range(warmup):
        images, labels = next(it)[:2]
        step(images, labels)
    _sync(device)
    n, cpu0, start = 0, _cpu_seconds(), time.perf_counter()
    with Utilization(device) as util:
        for _ in range(batches):
            try:
                images, labels = next(it)[:2]
            except StopIteration:
                break
            step(images, labels)
            n += len(labels)
        _sync(device)
    seconds = time.perf_counter() - start
    if cores is not None:
        cores.append(_cores(cpu0, seconds))
    return n / seconds, util.mean


def _forever(make):
    """Items of ``make()`` (a loader or prefetcher), epoch after epoch."""
    while True:
        yield from make()


def _cpu_seconds() -> dict[int, float]:
    """CPU seconds so far of this process and of each live child (the loaders' workers)."""
    from .loaders import proc_cpu_seconds

    pids = {os.getpid()}
    for task in Path(f"/proc/{os.getpid()}/task").glob("*/children"):
        try:
            pids |= {int(p) for p in task.read_text().split()}
        except OSError:
            pass
    return {p: proc_cpu_seconds(p) for p in pids}


def _cores(before: dict[int, float], seconds: float) -> float:
    after = _cpu_seconds()
    used = sum(t - before.get(p, 0.0) for p, t in after.items())
    return round(used / seconds, 1)


def run(out: Path, *, device: str = "cuda", images: int = 3000, workers: int | None = None,
        batch_size: int = 256, batches: int = 30, warmup: int = 5, smoke: bool = False) -> dict:
    import shardkit
    from shardkit.common import available_cpus

    from .synth import make_image_folder

    dev = torch.device(device)
    workers = available_cpus() if workers is None else workers
    size = (500, 375)
    if smoke:  # the same code, tiny: CI checks that the script runs
        images, batch_size, batches, warmup, size = 48, 8, 2, 1, (96, 72)
    folder = make_image_folder(out / "images", classes=10, per_class=max(1, images // 10),
                               size=size, quality=90)
    per = max(batch_size, images // 16)
    packs = {"raw": shardkit.pack_folder(folder, out / "raw", mode="raw", max_samples=per,
                                         resume=True, progress=False),
             "tensor256": shardkit.pack_folder(folder, out / "tensor256", mode="tensor",
                                               size=64 if smoke else 256, max_samples=per,
                                               resume=True, progress=False)}
    # Every worker needs several batches per epoch, or workers idle and each epoch starts with an
    # empty pipeline: the shards are listed several times over (hard links, indexed together).
    copies = max(1, -(-4 * workers * batch_size // images))
    for kind in packs:
        packs[kind] = _replicated(out / kind, out / f"{kind}-x{copies}", copies)
    crop_size = 32 if smoke else 224
    report: dict = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                    "torch": torch.__version__, "cpus": available_cpus(), "workers": workers,
                    "batch_size": batch_size, "images": images, "image_size": list(size),
                    "jpeg_bytes_mean": round(packs["raw"].num_bytes / packs["raw"].num_samples),
                    "samples_per_epoch": packs["raw"].num_samples, "results": {}}

    def prefetched(kind: str, max_ahead=2, **kw):
        """Epoch after epoch of one loader (persistent workers) through a GpuPrefetcher."""
        ds = shardkit.StreamingDataset(packs[kind].base_url, batch_size=batch_size, drop_last=True,
                                       crop=shardkit.RandomResizedCrop(crop_size), **kw)
        pf = shardkit.GpuPrefetcher(shardkit.make_loader(ds, num_workers=workers), dev,
                                    mean=MEAN, std=STD, channels_last=True, max_ahead=max_ahead)
        return _forever(lambda: pf)

    nothing = lambda images, labels: None  # noqa: E731
    fixed = (torch.rand((batch_size, 3, crop_size, crop_size), device=dev)
             .contiguous(memory_format=torch.channels_last),
             torch.randint(0, 10, (batch_size,), device=dev))

    report["checks"] = _checks(out, dev, crop_size)
    for model in ("resnet18", "resnet50"):
        step = _model(model, dev)
        alone, util = _rate(_forever(lambda: [fixed] * batches), step, dev, batches, warmup)
        kinds = ("raw", "tensor256") if model == "resnet18" else ("raw",)
        for kind in kinds:
            r: dict = {"step alone": round(alone), "step alone GPU %": util}
            modes: dict[str, dict[str, str]] = {"cpu decode": {}}
            if kind == "raw":
                modes["gpu decode"] = {"decode": "gpu"}
            for mode, kw in modes.items():
                cores: list = []
                lo, _ = _rate(prefetched(kind, **kw), nothing, dev, batches, warmup, cores)
                r[f"{mode}: loader + prefetcher alone"] = round(lo)
                r[f"{mode}: cores used"] = cores[0]
                both, util = _rate(prefetched(kind, **kw), step, dev,
                                   batches, warmup)
                r[f"{mode}: combined"] = round(both)
                r[f"{mode}: combined GPU %"] = util
                r[f"{mode}: combined / min(loader, step)"] = round(both / min(lo, alone), 3)
                if model == "resnet18":
                    unbounded, _ = _rate(prefetched(kind, None, **kw), step,
                                         dev, batches, warmup)
                    r[f"{mode}: combined, max_ahead=None"] = round(unbounded)
            if kind == "raw":
                r["gpu decode limit"] = round(_decode_limit(out, dev, batch_size, crop_size,
                                                            batches))
                r["gpu decode / cpu decode (loaders alone)"] = round(
                    r["gpu decode: loader + prefetcher alone"]
                    / r["cpu decode: loader + prefetcher alone"], 2)
            report["results"][f"{model}, {kind}"] = r
        del step
    # Not a GPU claim, but one for a machine with more cores than CI's two: `shardkit index` at
    # >= 0.5x the speed of `cat` warm (issue 15; sha256 caps it at ~0.38x on 2 cores).
    try:
        from .indexspeed import run_index

        report["index speed"] = run_index(out / "raw", out / "index-bench", workers=workers,
                                          repeats=1 if smoke else 3)
    except Exception as e:  # the GPU numbers above must not be lost to it
        report["index speed"] = {"error": f"{type(e).__name__}: {e}"}
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(report, indent=1))
    return report


def _replicated(folder: Path, dest: Path, copies: int):
    """``copies`` hard links of each shard of ``folder`` in ``dest``, indexed: one dataset that
    lists every sample ``copies`` times."""
    from ..indexer import index_shards

    dest.mkdir(parents=True, exist_ok=True)
    for shard in sorted(folder.glob("*.tar")):
        for k in range(copies):
            link = dest / f"copy{k}-{shard.name}"
            if not link.exists():
                os.link(shard, link)
    return index_shards(dest, progress=False, resume=True)


def _decode_limit(out: Path, dev: torch.device, batch_size: int, crop_size: int,
                  batches: int) -> float:
    """Samples/s of the device decoding one encoded batch again and again."""
    import shardkit

    ds = shardkit.StreamingDataset(out / "raw", batch_size=batch_size, decode="gpu",
                                   crop=shardkit.RandomResizedCrop(crop_size))
    encoded = next(iter(ds))[0]
    encoded.decode(dev)
    _sync(dev)
    start = time.perf_counter()
    for _ in range(batches):
        encoded.decode(dev)
    _sync(dev)
    return batches * len(encoded) / (time.perf_counter() - start)


def _checks(out: Path, dev: torch.device, crop_size: int) -> dict:
    """The prefetcher's batch against the CPU normalization; ``decode="gpu"`` against the CPU
    decoder on the same crops (mean and worst per-image mean absolute difference, grey levels)."""
    import shardkit

    crop = shardkit.CenterCrop(crop_size)
    kw = dict(batch_size=16, shuffle=False, crop=crop)
    cpu_images, _ = next(iter(shardkit.StreamingDataset(out / "raw", **kw)))
    pf = shardkit.GpuPrefetcher(shardkit.make_loader(shardkit.StreamingDataset(out / "raw", **kw),
                                                     num_workers=0), dev, mean=MEAN, std=STD)
    gpu_images = next(iter(pf))[0].cpu()
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    want = (cpu_images.float() / 255 - mean) / std
    encoded = next(iter(shardkit.StreamingDataset(out / "raw", decode="gpu", **kw)))[0]
    diff = (encoded.decode(dev).cpu().float() - cpu_images.float()).abs()
    return {"prefetcher max abs diff vs cpu": float((gpu_images - want).abs().max()),
            "gpu decode mean abs diff (levels)": round(float(diff.mean()), 2),
            "gpu decode worst image mean abs diff": round(float(diff.mean(dim=(1, 2, 3)).max()),
                                                          2)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("gpu-check"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--workers", type=int, help="DataLoader workers (default: every CPU)")
    p.add_argument("--batches", type=int, default=30, help="timed batches per measurement")
    p.add_argument("--smoke", action="store_true", help="a tiny run of the same code (CI)")
    a = p.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (--device cpu --smoke runs the code on the CPU)")
    report = run(a.out, device=a.device, images=a.images, workers=a.workers, batches=a.batches,
                 smoke=a.smoke)
    print(json.dumps(report, indent=1))
    return report
