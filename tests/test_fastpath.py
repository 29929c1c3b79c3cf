"""The batch fast path: direct USTAR parsing of each sample's bytes, libjpeg-turbo (simplejpeg) +
OpenCV crops, .npy views, channels-last batches. It must give the same samples and crops as the
strict path (tarfile + Pillow), within resampling differences, and hand every odd input to it."""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_decode import encode, photo, reference

import shardkit
from shardkit import CenterCrop, RandomResizedCrop, StreamingDataset, batching, make_loader
from shardkit import decode as dec
from shardkit.decode import ImageDecodeError, decode_array, decode_image

from _helpers_read import image_folder, pack

pytestmark = pytest.mark.skipif(not dec.fast_path_available(), reason="simplejpeg/OpenCV missing")


def _chw(a) -> torch.Tensor:
    if isinstance(a, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)
    return a


def _close(got, want, mean_tol=5.0, max_tol=96):
    # OpenCV's bilinear (shrinks below 1.2×, enlarging) against Pillow's triangle filter: up to
    # ~4 levels apart on average on the fine synthetic texture of these tests.
    got, want = _chw(got), _chw(want)
    assert got.shape == want.shape and got.dtype == torch.uint8
    diff = (got.int() - want.int()).abs()
    assert diff.float().mean().item() < mean_tol, diff.float().mean().item()
    assert diff.max().item() <= max_tol, diff.max().item()


@pytest.fixture(scope="module")
def jpeg_set() -> dict:
    sizes = {"normal": (400, 350), "large": (1800, 1300), "tall": (300, 700), "tiny": (50, 40)}
    out = {n: encode(photo(w, h, seed=i)) for i, (n, (w, h)) in enumerate(sizes.items())}
    out["progressive"] = encode(photo(900, 700, seed=7), progressive=True)
    out["gray"] = encode(photo(320, 240, seed=3)[:, :, 0])
    return out


# ------------------------------------------------------------------------ decode


@pytest.mark.parametrize("name", ["normal", "large", "tall", "tiny", "progressive", "gray"])
@pytest.mark.parametrize("crop", [RandomResizedCrop(64), CenterCrop(56, resize=72)])
def test_fast_jpeg_crop_matches_full_decode_and_draws_the_same_box(jpeg_set, name, crop):
    data = jpeg_set[name]
    w, h = Image.open(io.BytesIO(data)).size
    for seed in range(8):
        got = dec.decode_image_hwc(data, crop=crop, rng=random.Random(seed))
        assert isinstance(got, np.ndarray) and got.dtype == np.uint8 and got.flags.c_contiguous
        p = crop.params(w, h, random.Random(seed))
        assert got.shape == (p.out_size[1], p.out_size[0], 3)
        _close(got, reference(data, p))
        # the strict path draws the same box from the same generator
        _close(got, decode_image(data, crop=crop, rng=random.Random(seed)))


def test_fast_jpeg_uses_dct_reduction_only_when_it_loses_nothing(jpeg_set, monkeypatch):
    calls = []
    real = dec._sj.decode_jpeg

    def spy(data, *a, **kw):
        out = real(data, *a, **kw)
        calls.append(out.shape[:2])
        return out

    monkeypatch.setattr(dec._sj, "decode_jpeg", spy)
    dec.decode_image_hwc(jpeg_set["large"], crop=CenterCrop(64, resize=72), rng=None)
    dec.decode_image_hwc(jpeg_set["large"], crop=CenterCrop(1200), rng=None)
    assert calls[0][0] < 1300 / 4 and calls[1] == (1300, 1800)


@pytest.mark.parametrize("kind", ["png", "cmyk", "truncated", "garbage", "empty"])
def test_whatever_the_fast_decoder_refuses_goes_to_pillow(jpeg_set, kind):
    crop = RandomResizedCrop(32)
    data = {"png": encode(photo(60, 50), "PNG"),
            "cmyk": encode(Image.fromarray(photo(60, 50)).convert("CMYK")),
            "truncated": jpeg_set["normal"][:len(jpeg_set["normal"]) // 2],
            "garbage": b"\xff\xd8\xff" + b"\x00garbage" * 50,
            "empty": b""}[kind]
    try:
        want = decode_image(data, crop=crop, rng=random.Random(1))
    except ImageDecodeError as exc:
        with pytest.raises(ImageDecodeError) as info:
            dec.decode_image_hwc(data, crop=crop, rng=random.Random(1))
        assert info.value.reason == exc.reason
        return
    got = dec.decode_image_hwc(data, crop=crop, rng=random.Random(1))
    assert torch.equal(_chw(got), want)


def test_fast_path_checks_the_pixel_limit_before_decoding(jpeg_set, monkeypatch):
    monkeypatch.setattr(dec._sj, "decode_jpeg", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(ImageDecodeError, match="over the limit"):
        dec.decode_image_hwc(jpeg_set["large"], crop=RandomResizedCrop(32), rng=random.Random(0),
                             max_pixels=1000)


@pytest.mark.parametrize("crop", [None, RandomResizedCrop(24), CenterCrop(20, resize=28)])
@pytest.mark.parametrize("channels", [1, 3])
def test_fast_array_matches_decode_array(crop, channels):
    arr = photo(40, 30, seed=2)[:, :, :channels].copy()
    buf = io.BytesIO()
    np.save(buf, arr)
    data = buf.getvalue()
    for seed in range(4):
        got = dec.decode_array_hwc(memoryview(data), crop=crop, rng=random.Random(seed))
        want = decode_array(data, crop=crop, rng=random.Random(seed))
        assert got.shape[2] == channels
        if crop is None:
            assert torch.equal(_chw(got), want)
        else:
            _close(got, want)


def test_fast_array_refuses_what_decode_array_refuses():
    buf = io.BytesIO()
    np.save(buf, np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ImageDecodeError, match="dtype"):
        dec.decode_array_hwc(buf.getvalue())
    buf = io.BytesIO()
    np.save(buf, np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ImageDecodeError, match="truncated"):  # same header, cached, short data
        dec.decode_array_hwc(buf.getvalue())
        dec.decode_array_hwc(buf.getvalue()[:-5])
    dec.decode_array_hwc(buf.getvalue())
    with pytest.raises(ImageDecodeError, match="truncated"):
        dec.decode_array_hwc(buf.getvalue()[:-5])


# ------------------------------------------------------------------------ tar parsing


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> dict:
    src = image_folder(tmp_path_factory.mktemp("src"), classes=3, per_class=7)
    out = {}
    for mode, size in (("raw", None), ("tensor", 32)):
        dest = tmp_path_factory.mktemp(mode)
        pack(src, dest, mode=mode, size=size, max_samples=5)
        out[mode] = dest
    return out


def _samples(source, **kw) -> dict:
    ds = StreamingDataset(source, decode="raw", shuffle=False, with_keys=True, **kw)
    return {k: bytes(img) for img, _, k in ds}


def test_batches_are_channels_last_and_match_the_per_sample_path(packed):
    for source, crop in ((packed["raw"], RandomResizedCrop(24)), (packed["tensor"], None),
                         (packed["tensor"], CenterCrop(24))):
        kw = dict(crop=crop, shuffle=False, with_keys=True)
        single = {k: img for img, _, k in StreamingDataset(source, transform=lambda x: x, **kw)}
        seen = 0
        for num_workers in (0, 2):
            ds = StreamingDataset(source, batch_size=4, **kw)
            for images, _labels, keys in make_loader(ds, num_workers=num_workers,
                                                     persistent_workers=False):
                assert images.dtype == torch.uint8 and images.shape[1:] == single[keys[0]].shape
                assert images.is_contiguous(memory_format=torch.channels_last)
                for img, key in zip(images, keys):
                    _close(img, single[key])
                    seen += 1
        assert seen == 2 * len(single)


def test_a_nonzero_archive_end_is_noticed(packed, tmp_path):
    import shutil

    dest = tmp_path / "tail"
    shutil.copytree(packed["raw"], dest)
    m = shardkit.Manifest.load(dest)
    shard = dest / m.shards[0].url
    data = bytearray(shard.read_bytes())
    end = int(shardkit.shardformat.decode_index((dest / m.shards[0].index_url).read_bytes(),
                                             m.shards[0].num_samples, len(data), "idx")[-1])
    info = tarfile.TarInfo("extra.cls")
    info.size = 1
    data[end:end + 1024] = info.tobuf(tarfile.USTAR_FORMAT) + b"7".ljust(512, b"\0")
    shard.write_bytes(bytes(data))
    with pytest.raises(shardkit.errors.ShardError, match="more samples than its index"):
        _samples(dest)


# ------------------------------------------------------------------------ fuzz

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_JPEG = encode(photo(120, 90, seed=5))


@settings(max_examples=int(__import__("os").environ.get("SHARDKIT_FUZZ_EXAMPLES", 120)),
          deadline=None, database=None)
@given(flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), max_size=6),
       cut=st.floats(0.05, 1.0), seed=st.integers(0, 2**16))
def test_fuzz_fast_jpeg_decode_gives_an_image_or_a_decode_error(flips, cut, seed):
    data = bytearray(_JPEG[:max(4, int(len(_JPEG) * cut))])
    for frac, x in flips:
        data[min(int(frac * len(data)), len(data) - 1)] ^= x
    crop = RandomResizedCrop(32)
    try:
        out = dec.decode_image_hwc(bytes(data), crop=crop, rng=random.Random(seed))
    except ImageDecodeError:
        return
    assert tuple(_chw(out).shape) == (3, 32, 32)


# ------------------------------------------------------------------------ packing


def _item(name="a/x.jpg"):
    from shardkit.packing.folder import Item

    return Item(relpath=name, path="/nonexistent/" + name, key="k", label=0, class_name="a",
                kind="image")


@pytest.mark.parametrize("mode,size", [("resize", 64), ("resize", 500), ("tensor", 48),
                                       ("tensor", 400)])
@pytest.mark.parametrize("name", ["normal", "large", "gray", "progressive"])
def test_fast_pack_encoding_matches_the_pillow_path(jpeg_set, monkeypatch, mode, size, name):
    from shardkit.packing import encode as enc

    opts = enc.EncodeOptions(mode=mode, size=size, quality=90)
    data = jpeg_set[name]
    fast = enc._encode_image(_item(), data, opts)
    monkeypatch.setattr(enc, "_sj", None)
    slow = enc._encode_image(_item(), data, opts)
    assert fast[0] == slow[0] and fast[2] == slow[2]
    if mode == "resize":
        a, b = (np.asarray(Image.open(io.BytesIO(x[1])).convert("RGB")) for x in (fast, slow))
    else:
        a, b = (np.load(io.BytesIO(x[1]), allow_pickle=False) for x in (fast, slow))
    assert a.shape == b.shape
    _close(a, b, mean_tol=6.0)


def test_fast_pack_leaves_exif_rotation_and_bad_jpegs_to_pillow(jpeg_set):
    from shardkit.errors import SourceError
    from shardkit.packing import encode as enc

    opts = enc.EncodeOptions(mode="resize", size=64, quality=90)
    im = Image.fromarray(photo(120, 80, seed=1))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    rotated = encode(im, exif=exif.tobytes())
    assert enc._encode_image_fast(_item(), rotated, opts) is None
    out = Image.open(io.BytesIO(enc._encode_image(_item(), rotated, opts)[1]))
    assert out.size == (64, 96)  # portrait after the rotation
    truncated = jpeg_set["normal"][:len(jpeg_set["normal"]) // 2]
    assert enc._encode_image_fast(_item(), truncated, opts) is None
    with pytest.raises((SourceError, OSError)):
        enc._encode_image(_item(), truncated, opts)


# --------------------------------------------------------------------------- decoded in place


@pytest.fixture(scope="module")
def small_raw(tmp_path_factory) -> Path:
    src = image_folder(tmp_path_factory.mktemp("inplace_src"), classes=2, per_class=10,
                       size=(48, 40))
    dest = tmp_path_factory.mktemp("inplace") / "ds"
    pack(src, dest, mode="raw", max_samples=8)
    return dest


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_are_decoded_into_place_as_one_by_one(small_raw, workers):
    crop = RandomResizedCrop(24)
    raw = {key: bytes(data) for data, _, key in
           StreamingDataset(small_raw, decode="raw", shuffle=False, with_keys=True)}
    ds = StreamingDataset(small_raw, batch_size=6, crop=crop, with_keys=True, seed=5)
    seen = 0
    for images, _, keys in make_loader(ds, num_workers=workers):
        assert images.is_contiguous(memory_format=torch.channels_last)
        for image, key in zip(images, keys):
            want = dec.decode_image_hwc(raw[key], crop=crop, rng=random.Random(f"5/0/{key}"))
            assert np.array_equal(image.permute(1, 2, 0).numpy(), want), key
            seen += 1
    assert seen == len(raw) == 20


@pytest.mark.parametrize("bad_at", [0, 3])
def test_a_bad_image_in_a_batch_is_replaced_in_its_slot(small_raw, tmp_path, bad_at):
    import shutil

    from _helpers_read import members_of, shard_samples, write_shard

    dest = tmp_path / "ds"
    shutil.copytree(small_raw, dest)
    shard = dest / shardkit.Manifest.load(dest).shards[0].url
    samples = [members_of(s) for s in shard_samples(shard)]
    samples[bad_at] = [(n, b"\xff\xd8\xff\xe0 not a jpeg" if n.endswith(".jpg") else d)
                       for n, d in samples[bad_at]]
    write_shard(dest, 0, samples)
    ds = StreamingDataset(dest, batch_size=5, crop=RandomResizedCrop(24), with_keys=True,
                          shuffle=False, on_error="skip")
    images, labels, keys = next(iter(ds))
    # replaced by the last good sample (the next good one when the first is bad), pixels too
    twin = bad_at - 1 if bad_at else 1
    assert keys[bad_at] == keys[twin] and labels[bad_at] == labels[twin]
    assert torch.equal(images[bad_at], images[twin])
    assert ds.skipped == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_uncropped_arrays_are_copied_into_their_slots_shuffled(packed, workers, monkeypatch):
    # Pre-cropped tensor shards: each array is copied into its slot as it is emitted, in the
    # shuffled order, and every sample lands once (never by batching at the end).
    want = {key: dec.decode_array_hwc(data).copy() for data, _, key in
            StreamingDataset(packed["tensor"], decode="raw", shuffle=False, with_keys=True)}
    monkeypatch.setattr(batching, "stack", lambda *a, **k: pytest.fail("batched at the end"))
    ds = StreamingDataset(packed["tensor"], batch_size=4, with_keys=True, seed=2)
    seen = []
    for images, _labels, keys in make_loader(ds, num_workers=workers, persistent_workers=False):
        assert images.is_contiguous(memory_format=torch.channels_last)
        for image, key in zip(images, keys):
            assert np.array_equal(image.permute(1, 2, 0).numpy(), want[key]), key
            seen.append(key)
    assert sorted(seen) == sorted(want) and seen != sorted(seen)


@pytest.mark.parametrize("bad_at", [0, 2, 4])  # 4: the first of the second batch
def test_a_bad_array_is_replaced_in_its_slot_without_a_crop(packed, tmp_path, bad_at):
    import shutil

    from _helpers_read import members_of, shard_samples, write_shard

    dest = tmp_path / "ds"
    shutil.copytree(packed["tensor"], dest)
    shard = dest / shardkit.Manifest.load(dest).shards[0].url
    samples = [members_of(s) for s in shard_samples(shard)]
    samples[bad_at] = [(n, b"not an array" if n.endswith(".npy") else d)
                       for n, d in samples[bad_at]]
    write_shard(dest, 0, samples)
    ds = StreamingDataset(dest, batch_size=4, with_keys=True, shuffle=False, on_error="skip")
    batches = list(ds)
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    keys = [k for b in batches for k in b[2]]
    twin = bad_at - 1 if bad_at else 1
    assert keys[bad_at] == keys[twin] and labels[bad_at] == labels[twin]
    assert torch.equal(images[bad_at], images[twin])
    assert len(set(keys)) == len(keys) - 1 and ds.skipped == 1
    assert not torch.equal(images[twin], images[bad_at + 2])


def test_uncropped_arrays_of_different_shapes_are_refused_by_name(tmp_path):
    for i, shape in enumerate([(8, 8, 3), (8, 8, 3), (6, 8, 3)]):
        (tmp_path / "src" / "a").mkdir(parents=True, exist_ok=True)
        np.save(tmp_path / "src" / "a" / f"{i}.npy", np.full(shape, i, np.uint8))
    pack(tmp_path / "src", tmp_path / "ds", mode="raw")  # arrays stay .npy members
    ds = StreamingDataset(tmp_path / "ds", batch_size=3, shuffle=False)
    with pytest.raises(ValueError, match="one size"):
        next(iter(ds))


def test_uncropped_images_of_different_sizes_are_refused_by_name(tmp_path):
    src = image_folder(tmp_path / "src", classes=1, per_class=2, size=(48, 40))
    Image.new("RGB", (30, 20), "red").save(next((tmp_path / "src").rglob("*.jpg")))
    pack(src, tmp_path / "ds", mode="raw")
    ds = StreamingDataset(tmp_path / "ds", batch_size=2, shuffle=False)
    with pytest.raises(ValueError, match="one size"):
        next(iter(ds))


@pytest.mark.parametrize("side, antialiased", [(230, False), (268, False), (269, True), (448, True),
                                               (100, False)])
def test_the_crop_shrinks_with_the_antialiased_filter_from_1_2x_on(side, antialiased):
    import cv2

    region = np.random.default_rng(side).integers(0, 255, (side, side, 3), dtype=np.uint8)
    got = dec._resize_hwc(region, (224, 224), flip=False)
    if antialiased:  # Pillow's bilinear filter, within a level
        want = np.asarray(Image.fromarray(region).resize((224, 224), Image.Resampling.BILINEAR))
        assert np.abs(got.astype(int) - want).max() <= 1
    else:
        assert np.array_equal(got, cv2.resize(region, (224, 224), interpolation=cv2.INTER_LINEAR))


def test_resize_into_a_slot_matches_a_fresh_resize():
    region = np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8)
    for flip in (False, True):
        for size in ((20, 16), (53, 37), (80, 60)):  # shrink, same size, enlarge
            batch = np.zeros((2, size[1], size[0], 3), np.uint8)
            got = dec._resize_hwc(region, size, flip, out=batch[1])
            assert np.shares_memory(got, batch) and not batch[0].any()
            assert np.array_equal(batch[1], dec._resize_hwc(region, size, flip))
    wrong = np.zeros((16, 20, 1), np.uint8)  # another channel count: an image of its own
    got = dec._resize_hwc(region, (20, 16), False, out=wrong)
    assert got.shape == (16, 20, 3) and not np.shares_memory(got, wrong)


def test_a_manifest_claiming_a_huge_shard_allocates_nothing_of_that_size(small_raw, tmp_path):
    # The archive end (1 KiB of zeros as written) is read at once by the fast path; a manifest
    # whose num_bytes claims a terabyte more must not become a buffer of that size (it was a
    # MemoryError): the strict path streams the end instead.
    import json
    import shutil
    import tracemalloc

    dest = tmp_path / "ds"
    shutil.copytree(small_raw, dest)
    doc = json.loads((dest / ".shardkit" / "manifest.json").read_text())
    doc["shards"][-1]["num_bytes"] += 1 << 40
    (dest / ".shardkit" / "manifest.json").write_text(json.dumps(doc))
    want = sorted(k for _, _, k in StreamingDataset(small_raw, decode="raw", with_keys=True))

    def keys():
        ds = StreamingDataset(dest, batch_size=4, crop=RandomResizedCrop(16), with_keys=True)
        return sorted(k for _, _, ks in ds for k in ks)

    keys()  # imports and first-use caches outside the measurement
    tracemalloc.start()
    try:
        assert keys() == want
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, peak
