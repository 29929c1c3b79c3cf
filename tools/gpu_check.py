"""GPU check: does GpuPrefetcher keep a training step fed, and are its batches right?

    python tools/gpu_check.py [--out DIR] [--images 2000] [--workers 8] [--epochs 2]

On a CUDA machine: makes a photo-like image folder, packs it as raw JPEG and as 256 tensor shards,
and times, per shard kind, after a warm-up epoch (samples/s over ``--epochs`` epochs):

- ``loader``: the DataLoader alone (batches to pinned host memory; workers recycle batch memory),
  and once more with ``recycle_batches=False``;
- ``step``: a ResNet-18 training step (bf16 autocast, channels-last) on one batch already on the
  GPU, repeated: the rate the GPU could take;
- ``prefetcher``: loader + ``GpuPrefetcher`` (uint8 copied on a side stream, normalized on the
  device) + the step, and without the step;
- ``naive``: loader + the common recipe: float conversion and normalization on the CPU, then a
  blocking ``.cuda()`` of float32, + the step.

It also checks that GpuPrefetcher's batches equal the same normalization done on the CPU. Prints
one JSON document (and writes it to ``DIR/gpu.json``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import shardkit
from shardkit.bench.synth import make_image_folder

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _loader(shards: Path, workers: int):
    ds = shardkit.StreamingDataset(shards, batch_size=256, crop=shardkit.RandomResizedCrop(224))
    return shardkit.make_loader(ds, num_workers=workers)


def _model():
    import torchvision

    model = torchvision.models.resnet18(num_classes=10).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step(images, labels):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(images), labels % 10)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _rate(batches, step, epochs: int) -> float:
    for images, labels in batches():  # warm-up epoch
        step(images, labels)
    torch.cuda.synchronize()
    n, start = 0, time.perf_counter()
    for _ in range(epochs):
        for images, labels in batches():
            step(images, labels)
            n += len(labels)
    torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("gpu-check"))
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--kinds", default="raw,tensor256", help="shard kinds to time")
    p.add_argument("--switch-interval", type=float, default=None,
                   help="sys.setswitchinterval for the main process (GIL hand-over, seconds)")
    a = p.parse_args(argv)
    if a.switch_interval:
        import sys

        sys.setswitchinterval(a.switch_interval)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device")
    images = make_image_folder(a.out / "images", classes=10, per_class=a.images // 10)
    per = max(1, a.images // 16)
    packs = {"raw": shardkit.pack_folder(images, a.out / "raw", mode="raw", max_samples=per,
                                         resume=True, progress=False),
             "tensor256": shardkit.pack_folder(images, a.out / "tensor256", mode="tensor",
                                               size=256, max_samples=per, resume=True,
                                               progress=False, workers=a.workers)}
    step = _model()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "workers": a.workers, "images": a.images, "switch_interval": a.switch_interval,
              "results": {}}
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)

    # correctness: the prefetcher's first batch == the CPU normalization of the same batch
    ds = shardkit.StreamingDataset(a.out / "raw", batch_size=64, shuffle=False,
                                   crop=shardkit.CenterCrop(224, resize=256))
    cpu_images, _ = next(iter(shardkit.make_loader(ds, num_workers=2)))
    gpu_images, _ = next(iter(shardkit.GpuPrefetcher(shardkit.make_loader(ds, num_workers=2),
                                                     "cuda", mean=MEAN, std=STD,
                                                     channels_last=True)))
    want = (cpu_images.float() / 255 - mean) / std
    report["max_abs_diff_vs_cpu"] = float((gpu_images.cpu() - want).abs().max())
    report["channels_last"] = gpu_images.is_contiguous(memory_format=torch.channels_last)

    for kind in a.kinds.split(","):
        loader = _loader(a.out / kind, a.workers)
        r = {}
        r["loader"] = _rate(lambda: loader, lambda i, lab: None, a.epochs)
        plain = _loader(a.out / kind, a.workers)
        plain.recycle_batches = False
        r["loader, batches not recycled"] = _rate(lambda: plain, lambda i, lab: None, a.epochs)
        del plain
        fixed = (torch.randint(0, 255, (256, 3, 224, 224), dtype=torch.uint8, device="cuda")
                 .float().contiguous(memory_format=torch.channels_last),
                 torch.randint(0, 10, (256,), device="cuda"))
        r["step"] = _rate(lambda: [fixed] * (a.images // 256), step, a.epochs)
        pf = shardkit.GpuPrefetcher(loader, "cuda", mean=MEAN, std=STD, channels_last=True)
        r["prefetcher, no step"] = _rate(lambda: pf, lambda i, lab: None, a.epochs)
        r["prefetcher"] = _rate(lambda: pf, step, a.epochs)
        unpinned = _loader(a.out / kind, a.workers)
        unpinned.pin_memory = False
        unpinned.recycle_batches = True
        pf2 = shardkit.GpuPrefetcher(unpinned, "cuda", mean=MEAN, std=STD, channels_last=True)
        r["prefetcher, not pinned"] = _rate(lambda: pf2, step, a.epochs)
        del pf2, unpinned

        def naive():
            for images, labels in loader:
                x = ((images.float() / 255 - mean) / std).contiguous(
                    memory_format=torch.channels_last)
                yield x.cuda(), labels.cuda()
        r["naive"] = _rate(naive, step, a.epochs)
        r["prefetcher / min(loader, step)"] = r["prefetcher"] / min(r["loader"], r["step"])
        r["prefetcher / naive"] = r["prefetcher"] / r["naive"]
        report["results"][kind] = r
        del loader, pf
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "gpu.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
