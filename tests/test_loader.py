"""Behaviour of make_loader, ShardkitLoader and GpuPrefetcher (resume through torchdata's
StatefulDataLoader is in test_state.py). Data is generated in a module fixture."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import get_worker_info

import shardkit
from shardkit import GpuPrefetcher, RandomResizedCrop, StreamingDataset, make_loader

from _helpers_read import image_folder, pack, packed_raw

NUM = 60


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    dest = packed_raw(tmp_path_factory, classes=4, per_class=15, max_samples=7)
    assert len(shardkit.Manifest.load(dest).shards) == 9
    return dest


# --------------------------------------------------------------------------- 7: batches, defaults


def _mark_worker(image):  # transform: fill the image with the id of the worker that decoded it
    return torch.full_like(image, get_worker_info().id)


def test_batches_are_made_inside_the_workers(source):
    ds = StreamingDataset(source, batch_size=8, crop=RandomResizedCrop(16), transform=_mark_worker)
    loader = make_loader(ds, num_workers=2)
    assert loader.batch_size is None  # no collation in the main process
    batches = list(loader)
    assert len(batches) == len(loader) == len(ds) == -(-NUM // 8)
    workers = set()
    for images, labels in batches:
        assert images.dtype == torch.uint8 and images.dim() == 4 and images.shape[1:] == (3, 16, 16)
        assert labels.dtype == torch.int64 and labels.shape == (images.shape[0],)
        ids = images.unique().tolist()
        assert len(ids) == 1  # every sample of a batch came from one worker
        workers |= set(ids)
    assert workers == {0, 1}
    assert sum(len(b[1]) for b in batches) == NUM


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_make_loader_defaults(source, monkeypatch):
    ds = StreamingDataset(source)
    loader = make_loader(ds)
    assert loader.num_workers == len(os.sched_getaffinity(0))
    assert loader.pin_memory is torch.cuda.is_available()
    assert loader.persistent_workers is True
    assert loader.prefetch_factor == 2
    assert loader.batch_size is None

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert make_loader(ds, num_workers=1).pin_memory is True  # only decided, never iterated here
    monkeypatch.setattr(shardkit.loader, "available_cpus", lambda: 5)
    assert make_loader(ds).num_workers == 5


def test_make_loader_overrides(source):
    ds = StreamingDataset(source)
    loader = make_loader(ds, num_workers=1, pin_memory=False, persistent_workers=False,
                         prefetch_factor=4)
    assert (loader.num_workers, loader.pin_memory, loader.persistent_workers,
            loader.prefetch_factor) == (1, False, False, 4)
    single = make_loader(ds, num_workers=0)
    assert single.num_workers == 0 and single.persistent_workers is False
    assert len(list(single)) == NUM
    with pytest.raises(ValueError, match="num_workers"):
        make_loader(ds, num_workers=-1)


def test_len_of_loader_matches_per_rank(source):
    for world in (1, 2, 3):
        for batch in (None, 4):
            ds = StreamingDataset(source, rank=world - 1, world_size=world, batch_size=batch,
                                  decode="raw")
            loader = make_loader(ds, num_workers=2)
            assert len(loader) == len(ds) == len(list(loader))


# --------------------------------------------------------------------------- 8: GpuPrefetcher

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_gpu_prefetcher_on_cpu_normalizes_like_by_hand(source):
    ds = StreamingDataset(source, batch_size=8, crop=RandomResizedCrop(16), with_keys=True)
    loader = make_loader(ds, num_workers=0)
    raw = list(loader)
    ds.set_epoch(0)  # the same epoch again (each new iteration starts the next one)
    pre = GpuPrefetcher(loader, "cpu", mean=MEAN, std=STD)
    assert len(pre) == len(loader) == len(raw)
    out = list(pre)
    assert len(out) == len(raw)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    for (x, y, k), (images, labels, keys) in zip(raw, out):
        assert images.dtype == torch.float32 and images.device.type == "cpu"
        assert torch.allclose(images, (x.float() / 255 - mean) / std, atol=1e-5)
        assert torch.equal(labels, y) and keys == k


def test_gpu_prefetcher_channels_last(source):
    ds = StreamingDataset(source, batch_size=8, crop=RandomResizedCrop(16))
    loader = make_loader(ds, num_workers=0)
    for images, _ in GpuPrefetcher(loader, "cpu", mean=MEAN, std=STD, channels_last=True):
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert not images.is_contiguous()
    for images, _ in GpuPrefetcher(loader, "cpu"):
        assert images.is_contiguous()
        assert float(images.max()) <= 1.0 and float(images.min()) >= 0.0


def test_gpu_prefetcher_rejects_bad_std(source):
    with pytest.raises(ValueError, match="std"):
        GpuPrefetcher([], "cpu", mean=MEAN, std=(1.0, 0.0, 1.0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_prefetcher_on_cuda(source):
    ds = StreamingDataset(source, batch_size=8, crop=RandomResizedCrop(16))
    loader = make_loader(ds, num_workers=2)
    raw = list(loader)
    out = list(GpuPrefetcher(loader, "cuda", mean=MEAN, std=STD, channels_last=True))
    assert len(out) == len(raw) == len(loader)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    for (x, y), (images, labels) in zip(raw, out):
        assert images.is_cuda and labels.is_cuda
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(images.cpu(), (x.float() / 255 - mean) / std, atol=1e-5)
        assert torch.equal(labels.cpu(), y)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_iterator_left_open_at_exit_exits_cleanly(tmp_path, num_workers):
    """A script that stops reading mid-epoch and exits: no traceback, no crash (the loader's
    end-of-iteration report ran while the interpreter tore down its modules)."""
    import subprocess
    import sys

    from conftest import subprocess_env

    pack(image_folder(tmp_path / "src", classes=2, per_class=6), tmp_path / "ds",
         max_samples=4)
    script = (f"import shardkit\n"
              f"ds = shardkit.StreamingDataset({str(tmp_path / 'ds')!r}, batch_size=2)\n"
              f"it = iter(shardkit.make_loader(ds, num_workers={num_workers}))\n"
              f"next(it)\n"
              f"print('read one')\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=subprocess_env(), timeout=120)
    assert res.returncode == 0 and "read one" in res.stdout, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "Exception ignored" not in res.stderr, res.stderr


def test_labels_made_in_a_worker_are_tensors_there_and_arrive_as_tensors(tmp_path):
    """Labels cross from workers by value (no shared memory): in the worker they are still
    tensors a collate_fn can compute with, and the main process gets plain int64 tensors."""
    from torch.utils.data import DataLoader

    pack(image_folder(tmp_path / "src", classes=2, per_class=6), tmp_path / "ds",
         max_samples=4)
    ds = StreamingDataset(tmp_path / "ds", batch_size=3, decode="uint8", shuffle=False)
    plain = [b[1] for b in DataLoader(ds, batch_size=None, num_workers=2)]
    shifted = [b[1] for b in DataLoader(ds, batch_size=None, num_workers=2,
                                        collate_fn=lambda b: (b[0], b[1].float() + 1))]
    assert all(type(t) is torch.Tensor and t.dtype == torch.int64 for t in plain)
    assert all(type(t) is torch.Tensor and t.dtype == torch.float32 for t in shifted)
    assert [t.tolist() for t in shifted] == [(t + 1).float().tolist() for t in plain]
