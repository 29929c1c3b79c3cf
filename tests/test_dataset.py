"""Behaviour of StreamingDataset: exactly once, equal work, rank and world size, order, shuffle
quality, decoding. Resume is in test_state.py, reading and bad shards in test_reader.py. Data is
generated in module fixtures (_helpers_read.py)."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import get_worker_info

import shardkit
from shardkit import CenterCrop, RandomResizedCrop, StreamingDataset, make_loader

from _helpers_read import (  # noqa: F401 - fixtures, used by name
    LAYOUTS,
    NUM,
    datasets,
    duplicates,
    folder,
    image_folder,
    iter_samples,
    keys,
    keys_of,
    pack,
    run,
    shard_samples,
)

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
    single.set_epoch(0)
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

    from shardkit import modes

    monkeypatch.setattr(modes, "decode_image", boom)
    items = list(StreamingDataset(tmp_path / "t", with_keys=True))
    assert len(items) == NUM
    for image, _label, _key in items:
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
    a = by_key(loader)
    ds.set_epoch(0)
    b = by_key(loader)
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


# --------------------------------------------------------------------------- arguments, checked


def test_a_crop_that_is_not_shardkits_is_a_type_error_pointing_to_transform(datasets):
    from torchvision.transforms import v2

    with pytest.raises(TypeError, match=r"shardkit.RandomResizedCrop.*CenterCrop.*"
                                        r"torchvision.transforms.v2.*CenterCrop.*transform="):
        StreamingDataset(datasets["nine"], crop=v2.CenterCrop(8))
    with pytest.raises(TypeError, match="transform="):
        StreamingDataset(datasets["nine"], crop=lambda im: im)
    # the way it is meant: the torchvision transform after the decoding
    ds = StreamingDataset(datasets["nine"], transform=v2.CenterCrop(8))
    image, _ = next(iter(ds))
    assert tuple(image.shape) == (3, 8, 8)


@pytest.mark.parametrize("kw,match", [
    (dict(drop_last=True), "drop_last.*needs batch_size"),
    (dict(memory_limit="1GB"), "memory_limit.*in_memory=True"),
])
def test_options_that_would_do_nothing_are_refused(datasets, kw, match):
    with pytest.raises(ValueError, match=match):
        StreamingDataset(datasets["nine"], **kw)


def test_make_loader_refuses_to_batch_batches(datasets):
    ds = StreamingDataset(datasets["nine"], batch_size=4, crop=CenterCrop(8))
    with pytest.raises(ValueError, match="batches of 4 in the workers.*batch_size=8"):
        make_loader(ds, batch_size=8)
    unbatched = StreamingDataset(datasets["nine"], crop=CenterCrop(8))
    images, labels = next(iter(make_loader(unbatched, num_workers=0, batch_size=8)))
    assert tuple(images.shape) == (8, 3, 8, 8)  # a per-sample dataset may be batched by it


def test_a_center_crop_larger_than_the_image_is_padded_as_torchvision_pads(tmp_path):
    from torchvision.transforms import v2

    src = image_folder(tmp_path / "src", classes=1, per_class=3, size=(40, 30))
    pack(src, tmp_path / "ds")
    crop = CenterCrop(48, resize=32)  # the resized image is 42x32: zero rows above and below
    plain = StreamingDataset(tmp_path / "ds", with_keys=True, transform=lambda x: x, crop=crop)
    batched = StreamingDataset(tmp_path / "ds", with_keys=True, batch_size=3, crop=crop)
    got = {k: im for im, _, k in plain}
    (images, _, keys), = list(make_loader(batched, num_workers=0))
    for raw, _, key in StreamingDataset(tmp_path / "ds", decode="raw", with_keys=True):
        ref = v2.CenterCrop(48)(v2.Resize(32, antialias=True)(
            torch.from_numpy(np.asarray(Image.open(io.BytesIO(bytes(raw))).convert("RGB"))
                             ).permute(2, 0, 1)))
        for im in (got[key], images[keys.index(key)]):
            assert im.shape == ref.shape == (3, 48, 48)
            assert torch.equal(im.sum(0) == 0, ref.sum(0) == 0)  # the same zero borders
            assert (im.float() - ref.float()).abs().mean() < 8


def test_class_labels_that_are_numbers_are_ascii_digits_only():
    from shardkit.assembly import SampleDecoder
    from shardkit.decode import ImageDecodeError
    from shardkit.modes import DecodeConfig

    decoder = SampleDecoder(DecodeConfig.of("raw", max_pixels=1 << 20))
    assert decoder.label({"cls": b" 7\n"}) == 7 and decoder.label({}) == -1
    for bad in ("٣".encode(), b"-1", b"", b"12345678901", b"3a"):
        with pytest.raises(ImageDecodeError, match="not a number"):
            decoder.label({"cls": bad})
    decoder.configure({"json": "y"}, None)  # labels from a JSON key, as numbers
    assert decoder.label({"json": b'{"y": 3}'}) == 3
    assert decoder.label({"json": b'{"y": "4"}'}) == 4
    with pytest.raises(ImageDecodeError, match="not a number"):
        decoder.label({"json": '{"y": "٣"}'.encode()})  # Arabic-Indic 3: isdigit() says yes
