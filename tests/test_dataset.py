"""Behaviour of StreamingDataset: exactly once, equal work, order, shuffle quality, exact resume,
decoding, in-memory datasets and bad shards. Data is generated in module fixtures."""

from __future__ import annotations

import builtins
import gc
import io
import json
import logging
import os
import pickle
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import get_worker_info

import shardkit
from shardkit import CenterCrop, RandomResizedCrop, StreamingDataset, make_loader
from shardkit.errors import DecodeError, ShardError
from shardkit.manifest import decode_index
from shardkit.storage import LocalStore

from _helpers_read import (all_keys, duplicates, image_folder, iter_samples, keys_of, members_of,
                           pack, shard_samples, write_shard)

NUM = 65  # 5 classes x 13: leaves a remainder for 2 and 3 ranks
LAYOUTS = {"one": NUM, "nine": 8, "many": 3}  # max_samples -> 1, 9 (= 3 ranks x 3 workers), 22 shards


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return image_folder(tmp_path_factory.mktemp("src"), classes=5, per_class=13)


@pytest.fixture(scope="module")
def datasets(folder, tmp_path_factory) -> dict[str, Path]:
    out = {}
    for name, max_samples in LAYOUTS.items():
        dest = tmp_path_factory.mktemp(f"ds_{name}")
        pack(folder, dest, mode="raw", max_samples=max_samples)
        out[name] = dest
    assert [len(shardkit.Manifest.load(out[n]).shards) for n in LAYOUTS] == [1, 9, 22]
    return out


@pytest.fixture(scope="module")
def keys(datasets) -> list[str]:
    ks = all_keys(datasets["one"])
    assert len(ks) == NUM == len(set(ks))
    return ks


def run(source, num_workers=0, **kw):
    """(dataset, len before iterating, items of one epoch through make_loader)."""
    kw.setdefault("decode", "raw")
    kw.setdefault("with_keys", True)
    ds = StreamingDataset(source, **kw)
    n = len(ds)
    loader = make_loader(ds, num_workers=num_workers)
    return ds, n, list(loader)


# --------------------------------------------------------------------------- 1 + 2: exactly once


@pytest.mark.parametrize("num_workers", [0, 1, 2, pytest.param(3, marks=pytest.mark.slow)])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_key_exactly_once_over_ranks_and_workers(datasets, keys, layout, num_workers):
    for world in (1, 2, 3):
        for remainder in ("drop", "pad"):
            seen = []
            for rank in range(world):
                ds, n, items = run(datasets[layout], num_workers, rank=rank, world_size=world,
                                   remainder=remainder)
                assert len(items) == n, (rank, world, remainder)  # len() said it up front
                seen += keys_of(items, batched=False)
            per_rank = NUM // world if remainder == "drop" else -(-NUM // world)
            assert len(seen) == per_rank * world
            counts = Counter(seen)
            assert set(counts) <= set(keys)
            if remainder == "drop":
                assert max(counts.values()) == 1, duplicates(seen)
                assert len(set(keys) - set(counts)) == NUM - per_rank * world
            else:
                assert set(counts) == set(keys)
                assert sum(c - 1 for c in counts.values()) == per_rank * world - NUM
                assert max(counts.values()) <= 2


@pytest.mark.parametrize("num_workers", [0, 2, pytest.param(3, marks=pytest.mark.slow)])
@pytest.mark.parametrize("layout", ["one", "nine", "many"])
def test_equal_batches_on_every_rank(datasets, keys, layout, num_workers):
    batch = 4
    for world in (2, 3):
        counts, samples, seen = [], [], []
        for rank in range(world):
            ds = StreamingDataset(datasets[layout], decode="raw", with_keys=True, rank=rank,
                                  world_size=world, batch_size=batch)
            loader = make_loader(ds, num_workers=num_workers)
            n_ds, n_loader = len(ds), len(loader)
            items = list(loader)
            assert len(items) == n_ds == n_loader == -(-(NUM // world) // batch)
            assert all(len(b[2]) == len(b[1]) == len(b[0]) for b in items)
            # whole batches except at most one partial batch per rank
            assert sum(len(b[2]) != batch for b in items) <= 1
            counts.append(len(items))
            samples.append(sum(len(b[2]) for b in items))
            seen += keys_of(items, batched=True)
        assert len(set(counts)) == 1 and len(set(samples)) == 1
        assert not duplicates(seen) and len(seen) == NUM // world * world


def test_drop_last_gives_only_whole_batches(datasets):
    ds, n, items = run(datasets["nine"], 2, rank=1, world_size=2, batch_size=4, drop_last=True)
    assert n == len(items) == (NUM // 2) // 4
    assert all(len(b[2]) == 4 for b in items)


# --------------------------------------------------------------------------- rank and world size


@pytest.fixture
def gloo_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=0, world_size=1,
                            init_method=f"file://{tmp_path / 'store'}")
    yield dist
    dist.destroy_process_group()


def test_rank_world_from_env_when_no_arguments(datasets, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    ds = StreamingDataset(datasets["nine"], decode="raw", with_keys=True)
    assert ds.rank_world() == (1, 3)
    assert len(ds) == NUM // 3
    ref = StreamingDataset(datasets["nine"], decode="raw", with_keys=True, rank=1, world_size=3)
    assert [k for *_, k in ds] == [k for *_, k in ref]


def test_arguments_beat_process_group_and_env(datasets, gloo_group, monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert StreamingDataset(datasets["one"], rank=1, world_size=2).rank_world() == (1, 2)


def test_process_group_beats_env(datasets, keys, gloo_group, monkeypatch):
    # The env says rank 1 of 3; the initialized (1-process) group says rank 0 of 1 and wins.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    ds = StreamingDataset(datasets["nine"], decode="raw", with_keys=True)
    assert ds.rank_world() == (0, 1)
    assert len(ds) == NUM
    got = keys_of(list(make_loader(ds, num_workers=2)), batched=False)
    assert sorted(got) == sorted(keys)


@pytest.mark.slow
def test_process_group_rank_reaches_spawned_workers(datasets, keys, gloo_group, monkeypatch):
    # Spawned workers have no process group; they must not fall back to the env's rank 1 of 3.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    ds = StreamingDataset(datasets["nine"], decode="raw", with_keys=True)
    loader = make_loader(ds, num_workers=1, multiprocessing_context="spawn")
    assert sorted(keys_of(list(loader), batched=False)) == sorted(keys)


# --------------------------------------------------------------------------- 3: order


def _worker_id(image):  # transform: replace the image by the id of the worker that made it
    return get_worker_info().id


def _shard_of(source) -> dict[str, int]:
    m = shardkit.Manifest.load(source)
    return {k: i for i, s in enumerate(m.shards) for k, _ in shard_samples(Path(m.base_url) / s.url)}


def _assignment(source, epoch, num_workers=2, **kw) -> dict[int, set[int]]:
    ds = StreamingDataset(source, decode="raw", with_keys=True, transform=_worker_id, **kw)
    ds.set_epoch(epoch)
    shard = _shard_of(source)
    out: dict[int, set[int]] = {}
    for worker, _, key in make_loader(ds, num_workers=num_workers):
        out.setdefault(worker, set()).add(shard[key])
    return out


def test_same_seed_and_epoch_same_order_other_epoch_or_seed_differs(datasets, keys):
    src = datasets["nine"]
    order = lambda **kw: keys_of(run(src, 2, **kw)[2], batched=False)  # noqa: E731
    e0 = order(seed=3)
    assert e0 == order(seed=3)  # same seed + epoch: same order, every run
    assert sorted(e0) == sorted(keys)

    ds = StreamingDataset(src, decode="raw", with_keys=True, seed=3)
    ds.set_epoch(1)
    e1 = keys_of(list(make_loader(ds, num_workers=2)), batched=False)
    assert e1 != e0 and sorted(e1) == sorted(keys)
    assert order(seed=4) != e0
    # single-process iteration too
    single = StreamingDataset(src, decode="raw", with_keys=True, seed=3)
    first = [k for *_, k in single]
    assert first == [k for *_, k in single]
    single.set_epoch(1)
    assert [k for *_, k in single] != first


def test_set_epoch_changes_shard_to_worker_assignment(datasets):
    src = datasets["many"]
    a0, a0_again, a1 = (_assignment(src, 0), _assignment(src, 0), _assignment(src, 1))
    assert a0 == a0_again
    assert a0 != a1
    assert set(a0) == set(a1) == {0, 1}


def test_persistent_workers_see_set_epoch(datasets):
    src = datasets["nine"]
    ds = StreamingDataset(src, decode="raw", with_keys=True, seed=5)
    loader = make_loader(ds, num_workers=2)
    assert loader.persistent_workers
    e0 = keys_of(list(loader), batched=False)
    workers = loader._iterator._workers  # the very same processes serve epoch 1
    ds.set_epoch(1)
    e1 = keys_of(list(loader), batched=False)
    assert loader._iterator._workers is workers and all(w.is_alive() for w in workers)
    fresh = StreamingDataset(src, decode="raw", with_keys=True, seed=5)
    fresh.set_epoch(1)
    f1 = keys_of(list(make_loader(fresh, num_workers=2)), batched=False)
    assert e1 != e0
    assert e1 == f1
    ds.set_epoch(0)  # and back
    assert keys_of(list(loader), batched=False) == e0


# --------------------------------------------------------------------------- 4: shuffle quality


def test_class_sorted_shards_are_mixed_by_default(tmp_path):
    classes, per_class, batch = 10, 40, 16
    src = image_folder(tmp_path / "src", classes=classes, per_class=per_class, size=(8, 8))
    pack(src, tmp_path / "ds", mode="raw", shuffle=False, max_samples=20)
    labels = [int(f["cls"]) for _, f in iter_samples(tmp_path / "ds")]
    assert labels == sorted(labels)  # the shards really are class-sorted
    expected = classes * (1 - (1 - 1 / classes) ** batch)  # i.i.d. distinct classes per batch
    for workers in (0, 2):
        ds = StreamingDataset(tmp_path / "ds", decode="raw", batch_size=batch)
        batches = [b for b in make_loader(ds, num_workers=workers) if len(b[1]) == batch]
        mean = np.mean([len(set(b[1].tolist())) for b in batches])
        assert mean >= 0.8 * expected, (workers, mean, expected)


# --------------------------------------------------------------------------- 5: exact resume

_FULL: dict = {}


def _full(src, num_workers, **kw):
    key = (str(src), num_workers, tuple(sorted((k, repr(v)) for k, v in kw.items())))
    if key not in _FULL:
        _FULL[key] = list(make_loader(StreamingDataset(src, **kw), num_workers=num_workers))
    return _FULL[key]


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _resume_case(src, num_workers, k, **kw):
    full = _full(src, num_workers, **kw)
    ds = StreamingDataset(src, **kw)
    it = iter(make_loader(ds, num_workers=num_workers))
    head = [next(it) for _ in range(k)]
    state = ds.state_dict()
    del it
    text = json.dumps(state)  # json-serialisable, holds no sample data
    assert len(text) < 400, text
    resumed = StreamingDataset(src, **kw)
    resumed.load_state_dict(json.loads(text))
    rest = list(make_loader(resumed, num_workers=num_workers))
    assert _same(head, full[:k])
    assert len(head) + len(rest) == len(full)
    assert _same(rest, full[k:])


RESUME_KW = dict(with_keys=True, crop=RandomResizedCrop(12), block_size=4, shuffle_buffer=6)


@pytest.mark.parametrize("num_workers,ks", [(0, (0, 1, 7, 65)), (1, (0, 5, 65)),
                                            (2, (0, 3, 10, 65)),
                                            pytest.param(3, (1, 4, 20, 65), marks=pytest.mark.slow)])
def test_resume_yields_exactly_the_rest_of_the_epoch(datasets, num_workers, ks):
    for k in ks:
        _resume_case(datasets["nine"], num_workers, k, **RESUME_KW)


@pytest.mark.parametrize("num_workers,ks", [(0, (0, 2, 9)), (2, (0, 3, 9)),
                                            pytest.param(3, (1, 5, 9), marks=pytest.mark.slow)])
def test_resume_with_batches(datasets, num_workers, ks):
    kw = dict(RESUME_KW, batch_size=7)
    for k in ks:
        _resume_case(datasets["many"], num_workers, k, **kw)


def test_resume_in_a_later_epoch_and_across_ranks(datasets):
    src = datasets["many"]
    kw = dict(RESUME_KW, rank=1, world_size=2, batch_size=3)
    full_ds = StreamingDataset(src, **kw)
    full_ds.set_epoch(2)
    full = list(make_loader(full_ds, num_workers=2))
    ds = StreamingDataset(src, **kw)
    ds.set_epoch(2)
    it = iter(make_loader(ds, num_workers=2))
    head = [next(it) for _ in range(5)]
    state = ds.state_dict()
    assert state["epoch"] == 2
    resumed = StreamingDataset(src, **kw)
    resumed.load_state_dict(state)
    rest = list(make_loader(resumed, num_workers=2))
    assert _same(head + rest, full)


def test_state_after_set_epoch_starts_the_new_epoch(datasets):
    src = datasets["nine"]
    ds = StreamingDataset(src, decode="raw", with_keys=True)
    loader = make_loader(ds, num_workers=2)
    list(loader)
    ds.set_epoch(1)
    state = ds.state_dict()  # nothing of epoch 1 consumed yet
    resumed = StreamingDataset(src, decode="raw", with_keys=True)
    resumed.load_state_dict(state)
    ref = StreamingDataset(src, decode="raw", with_keys=True)
    ref.set_epoch(1)
    assert (keys_of(list(make_loader(resumed, num_workers=2)), batched=False)
            == keys_of(list(make_loader(ref, num_workers=2)), batched=False))


def _offsets(src, shard_no=0):
    m = shardkit.Manifest.load(src)
    s = m.shards[shard_no]
    return decode_index((Path(m.base_url) / s.index_url).read_bytes(), s.num_samples, s.num_bytes, "")


def _spy_open_range(monkeypatch, log_path: Path):
    real = LocalStore.open_range

    def spy(self, name, start, stop):
        with open(log_path, "a") as f:  # a file: worker processes write here too
            f.write(f"{name} {start} {os.getpid()}\n")
        return real(self, name, start, stop)

    monkeypatch.setattr(LocalStore, "open_range", spy)

    def reads():
        if not log_path.exists():
            return []
        return [(n, int(s)) for n, s, _ in (line.split() for line in log_path.read_text().splitlines())]
    return reads


@pytest.mark.parametrize("num_workers,k,first_samples", [(0, 10, {10}), (2, 10, {5, 33 + 5})])
def test_resume_reads_from_a_byte_offset(datasets, tmp_path, monkeypatch, num_workers, k,
                                         first_samples):
    src = datasets["one"]  # one shard, no shuffle: the plan is easy to state
    kw = dict(decode="raw", with_keys=True, shuffle=False)
    ds = StreamingDataset(src, **kw)
    it = iter(make_loader(ds, num_workers=num_workers))
    head = [next(it) for _ in range(k)]
    state = ds.state_dict()
    del it
    reads = _spy_open_range(monkeypatch, tmp_path / "reads.log")
    resumed = StreamingDataset(src, **kw)
    resumed.load_state_dict(state)
    rest = list(make_loader(resumed, num_workers=num_workers))
    assert len(head) + len(rest) == NUM
    offsets = _offsets(src)
    starts = {start for _, start in reads()}
    assert starts == {int(offsets[i]) for i in first_samples}
    assert all(s > 0 for s in starts)


# --------------------------------------------------------------------------- 6: decoding


def test_decode_modes(datasets):
    src = datasets["nine"]
    packed = {k: f["jpg"] for k, f in iter_samples(src)}
    labels = {k: int(f["cls"]) for k, f in iter_samples(src)}
    raw = list(StreamingDataset(src, decode="raw", with_keys=True))
    assert len(raw) == NUM
    for data, label, key in raw:
        assert isinstance(data, bytes) and data == packed[key] and label == labels[key]
    for image, label, key in StreamingDataset(src, decode="uint8", with_keys=True):
        assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 24, 32)
        ref = torch.from_numpy(np.array(Image.open(io.BytesIO(packed[key])).convert("RGB")))
        assert torch.equal(image, ref.permute(2, 0, 1)) and label == labels[key]
    pil = list(StreamingDataset(src, decode="pil"))
    assert all(isinstance(im, Image.Image) and im.size == (32, 24) and im.mode == "RGB"
               for im, _ in pil)


def test_tensor_shards_need_no_image_decoding(folder, tmp_path, monkeypatch):
    pack(folder, tmp_path / "t", mode="tensor", size=16, max_samples=20)

    def boom(*a, **k):
        raise AssertionError("decode_image called for a tensor-mode shard")

    monkeypatch.setattr(shardkit.dataset, "decode_image", boom)
    items = list(StreamingDataset(tmp_path / "t", with_keys=True))
    assert len(items) == NUM
    for image, label, key in items:
        assert image.dtype == torch.uint8 and image.shape[0] == 3 and min(image.shape[1:]) == 16
    cropped = list(StreamingDataset(tmp_path / "t", crop=CenterCrop(8, resize=10)))
    assert all(tuple(im.shape) == (3, 8, 8) for im, _ in cropped)


def test_crop_sizes(datasets):
    src = datasets["nine"]
    rrc = list(StreamingDataset(src, crop=RandomResizedCrop(16)))
    assert all(tuple(im.shape) == (3, 16, 16) and im.dtype == torch.uint8 for im, _ in rrc)
    rect = list(StreamingDataset(src, crop=RandomResizedCrop((10, 14))))
    assert all(tuple(im.shape) == (3, 10, 14) for im, _ in rect)
    cc = list(StreamingDataset(src, crop=CenterCrop(12, resize=14), decode="pil"))
    assert all(im.size == (12, 12) for im, _ in cc)


def test_crops_are_reproducible_per_epoch(datasets):
    src = datasets["nine"]
    kw = dict(crop=RandomResizedCrop(16), with_keys=True)
    by_key = lambda items: {k: im for im, _, k in items}  # noqa: E731
    ds = StreamingDataset(src, **kw)
    loader = make_loader(ds, num_workers=2)
    a, b = by_key(loader), by_key(loader)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = by_key(StreamingDataset(src, **kw))
    assert all(torch.equal(a[k], other[k]) for k in a)  # worker count does not matter
    ds.set_epoch(1)
    c = by_key(loader)
    assert sum(not torch.equal(a[k], c[k]) for k in a) > NUM // 2  # new epoch, new crops


def test_torchvision_v2_transform_runs_after_the_crop(datasets):
    from torchvision.transforms import v2

    src = datasets["nine"]
    crop = RandomResizedCrop(16, flip=False)
    base = {k: im for im, _, k in StreamingDataset(src, crop=crop, with_keys=True)}
    flipped = StreamingDataset(src, crop=crop, with_keys=True,
                               transform=v2.RandomHorizontalFlip(p=1.0))
    floats = StreamingDataset(src, crop=crop, with_keys=True,
                              transform=v2.Compose([v2.RandomHorizontalFlip(p=1.0),
                                                    v2.ToDtype(torch.float32, scale=True)]))
    for im, _, k in flipped:
        assert torch.equal(im, base[k].flip(-1))
    for im, _, k in floats:
        assert im.dtype == torch.float32 and tuple(im.shape) == (3, 16, 16)
        assert torch.allclose(im, base[k].flip(-1).float() / 255)


# --------------------------------------------------------------------------- 9: in memory


def _forbid_file_access(monkeypatch, folder: Path):
    """Any read of ``folder`` raises (also inside forked workers, where a raise reaches us)."""
    def refuse(*a, **k):
        raise AssertionError("in-memory dataset touched its files")

    real_open = builtins.open

    def guarded_open(file, *a, **k):
        if isinstance(file, (str, os.PathLike)) and str(folder) in os.fspath(file):
            refuse()
        return real_open(file, *a, **k)

    real_read_bytes = LocalStore.read_bytes

    def guarded_read_bytes(self, name):
        if not name.endswith(".json"):  # shards and index files; a new dataset reads its manifest
            refuse()
        return real_read_bytes(self, name)

    monkeypatch.setattr(LocalStore, "open_range", refuse)
    monkeypatch.setattr(LocalStore, "read_bytes", guarded_read_bytes)
    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_open)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_in_memory_opens_no_files_after_preload(datasets, monkeypatch, num_workers):
    src = datasets["nine"]
    kw = dict(crop=CenterCrop(12), with_keys=True, seed=1)
    on_disk = []
    for epoch in (0, 1):
        ds = StreamingDataset(src, **kw)
        ds.set_epoch(epoch)
        on_disk.append(list(make_loader(ds, num_workers=num_workers)))

    mem = StreamingDataset(src, in_memory=True, **kw)
    loader = make_loader(mem, num_workers=num_workers)  # preloads
    with monkeypatch.context() as m:
        _forbid_file_access(m, Path(src))
        with pytest.raises(Exception, match="touched its files"):  # the spy works
            list(StreamingDataset(src, **kw))
        got = []
        for epoch in (0, 1):
            mem.set_epoch(epoch)
            got.append(list(loader))
    assert _same(got, on_disk)


def test_in_memory_over_the_limit_is_a_memory_error_before_loading(datasets, monkeypatch):
    src = datasets["nine"]
    calls = []
    real = LocalStore.read_bytes
    monkeypatch.setattr(LocalStore, "read_bytes",
                        lambda self, name: calls.append(name) or real(self, name))
    ds = StreamingDataset(src, in_memory=True, memory_limit=4096)
    with pytest.raises(MemoryError, match="memory_limit"):
        make_loader(ds, num_workers=0)
    with pytest.raises(MemoryError, match="memory_limit"):
        next(iter(ds))
    assert not [c for c in calls if c.endswith((".tar", ".idx"))]


# --------------------------------------------------------------------------- 10: bad shards

BAD_SHARD = 1  # the middle of 4 shards of 5 samples
BAD_SAMPLE = 2  # the middle sample of that shard


@pytest.fixture(scope="module")
def good_small(tmp_path_factory) -> Path:
    src = image_folder(tmp_path_factory.mktemp("small_src"), classes=4, per_class=5)
    dest = tmp_path_factory.mktemp("small") / "ds"
    pack(src, dest, mode="raw", max_samples=5)
    assert len(shardkit.Manifest.load(dest).shards) == 4
    return dest


@pytest.fixture
def bad(good_small, tmp_path):
    """A writable copy of the small dataset and facts about its bad shard."""
    dest = tmp_path / "ds"
    shutil.copytree(good_small, dest)
    m = shardkit.Manifest.load(dest)
    shard = dest / m.shards[BAD_SHARD].url
    samples = shard_samples(shard)

    class Bad:
        path = dest
        url = str(shard)
        keys = all_keys(dest)
        shard_samples = samples
        bad_key = samples[BAD_SAMPLE][0]
        offsets = _offsets(dest, BAD_SHARD)
    return Bad


def _epoch_keys(src, world=1, num_workers=0, **kw):
    """Keys per rank of one epoch (and the datasets), with on_error as given."""
    per_rank, sets = [], []
    for rank in range(world):
        ds = StreamingDataset(src, decode="uint8", with_keys=True, rank=rank, world_size=world, **kw)
        n = len(ds)
        items = list(make_loader(ds, num_workers=num_workers))
        assert len(items) == n  # same count on every rank, bad samples or not
        per_rank.append(keys_of(items, batched=False))
        sets.append(ds)
    return per_rank, sets


def _check_raise(src, *, url, key=None, match=None, error=ShardError):
    for num_workers in (0, 2):
        # From a worker process torch re-raises what it cannot rebuild (ShardError takes url and
        # reason) as a RuntimeError carrying the original type name and message.
        with pytest.raises(error if num_workers == 0 else (error, RuntimeError)) as info:
            _epoch_keys(src, num_workers=num_workers, on_error="raise")
        text = str(info.value)
        del info
        gc.collect()  # shut the failed loader's workers down now, not at interpreter exit
        if num_workers:
            assert error.__name__ in text, text
        assert url in text, text
        if key is not None:
            assert key in text, text
        if match is not None:
            assert match in text, text


def _check_skip(src, all_keys_, missing: set, caplog, *, skipped=None):
    skipped = len(missing) if skipped is None else skipped
    with caplog.at_level(logging.WARNING, logger="shardkit"):
        (keys,), (ds,) = _epoch_keys(src, on_error="skip")
    assert ds.skipped == skipped
    assert f"{skipped} bad samples skipped" in caplog.text
    assert set(keys) == set(all_keys_) - missing  # every other key is there
    assert len(keys) == len(all_keys_)  # the epoch is not shorter: bad ones are replaced
    for world, workers in ((2, 0), (2, 2), (3, 2)):
        per_rank, _ = _epoch_keys(src, world, workers, on_error="skip")
        assert len({len(k) for k in per_rank}) == 1
        union = set().union(*map(set, per_rank))
        expected = set(all_keys_) - missing
        assert union <= expected
        assert len(expected - union) <= len(all_keys_) % world  # only the remainder dropped


def test_truncated_shard(bad, caplog):
    data = Path(bad.url).read_bytes()
    cut = int(bad.offsets[BAD_SAMPLE]) + 512 * 3 + 100  # inside the image of the bad sample
    Path(bad.url).write_bytes(data[:cut])
    _check_raise(bad.path, url=bad.url, key=bad.bad_key, match="truncated")
    lost = {k for k, _ in bad.shard_samples[BAD_SAMPLE:]}
    _check_skip(bad.path, bad.keys, lost, caplog)


def test_shard_cut_at_a_sample_boundary_ends_early(bad):
    data = Path(bad.url).read_bytes()
    Path(bad.url).write_bytes(data[:int(bad.offsets[BAD_SAMPLE])])
    prev = bad.shard_samples[BAD_SAMPLE - 1][0]
    _check_raise(bad.path, url=bad.url, key=prev, match="ended early")


def test_corrupt_header_mid_shard(bad, caplog):
    data = bytearray(Path(bad.url).read_bytes())
    start = int(bad.offsets[BAD_SAMPLE])
    data[start + 100:start + 160] = b"\xff" * 60  # mode, uid, gid, size, mtime, checksum
    Path(bad.url).write_bytes(bytes(data))
    prev = bad.shard_samples[BAD_SAMPLE - 1][0]
    _check_raise(bad.path, url=bad.url, key=prev, match=f"sample {BAD_SAMPLE}")
    # only the sample whose header is broken is lost: reading restarts at the next offset
    _check_skip(bad.path, bad.keys, {bad.bad_key}, caplog)


def test_corrupt_image_bytes(bad, caplog):
    samples = [members_of(s) for s in bad.shard_samples]
    samples[BAD_SAMPLE] = [(n, b"\xff\xd8 definitely not a jpeg" * 10 if n.endswith(".jpg") else d)
                           for n, d in samples[BAD_SAMPLE]]
    write_shard(bad.path, BAD_SHARD, samples)
    _check_raise(bad.path, url=bad.url, key=bad.bad_key, error=DecodeError)
    _check_skip(bad.path, bad.keys, {bad.bad_key}, caplog)


def test_sample_without_its_image(bad, caplog):
    samples = [members_of(s) for s in bad.shard_samples]
    samples[BAD_SAMPLE] = [(n, d) for n, d in samples[BAD_SAMPLE] if not n.endswith(".jpg")]
    write_shard(bad.path, BAD_SHARD, samples)
    _check_raise(bad.path, url=bad.url, key=bad.bad_key, match="no image", error=DecodeError)
    _check_skip(bad.path, bad.keys, {bad.bad_key}, caplog)


def test_member_with_dotdot_is_refused_and_never_written(bad, caplog, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    samples = [members_of(s) for s in bad.shard_samples]
    evil = f"../{bad.bad_key}.jpg"
    samples[BAD_SAMPLE] = [(evil if n.endswith(".jpg") else n, d) for n, d in samples[BAD_SAMPLE]]
    write_shard(bad.path, BAD_SHARD, samples)
    _check_raise(bad.path, url=bad.url, match=repr(evil))
    _check_skip(bad.path, bad.keys, {bad.bad_key}, caplog)
    for folder in (tmp_path, tmp_path.parent, bad.path.parent, Path(bad.url).parent.parent):
        assert not (folder / f"{bad.bad_key}.jpg").exists()


class _Marker:
    """Unpickling this creates a file: proof that something unpickled it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


def test_pickle_members_are_never_unpickled(bad, tmp_path):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Marker(control)))  # the payload really does create its file
    assert control.exists()
    marker = tmp_path / "marker"
    payload = pickle.dumps(_Marker(marker))
    samples = [members_of(s) for s in bad.shard_samples]
    key = bad.bad_key
    samples[BAD_SAMPLE] += [(f"{key}.pyd", payload), (f"{key}.pickle", payload),
                            (f"{key}.pth", payload)]
    write_shard(bad.path, BAD_SHARD, samples)
    for decode in ("uint8", "pil", "raw"):
        for workers in (0, 2):
            ds = StreamingDataset(bad.path, decode=decode, with_keys=True)
            got = keys_of(list(make_loader(ds, num_workers=workers)), batched=False)
            assert sorted(got) == sorted(bad.keys)
    assert not marker.exists()


def test_shard_holding_more_than_the_manifest_says(bad, caplog):
    samples = [members_of(s) for s in bad.shard_samples]
    extra = [(n.replace(bad.shard_samples[0][0], "stowaway"), d) for n, d in samples[0]]
    write_shard(bad.path, BAD_SHARD, samples + [extra], index_samples=len(samples))
    _check_raise(bad.path, url=bad.url, key="stowaway", match="more samples")
    (keys,), (ds,) = _epoch_keys(bad.path, on_error="skip")
    assert sorted(keys) == sorted(bad.keys) and ds.skipped == 1


def test_skip_never_hides_code_bugs(datasets):
    def buggy(image):
        raise TypeError("a bug in user code")

    ds = StreamingDataset(datasets["nine"], transform=buggy, on_error="skip")
    with pytest.raises(TypeError, match="a bug"):
        next(iter(ds))
