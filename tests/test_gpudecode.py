"""``decode="gpu"``: JPEGs shipped encoded, decoded batched on the device (here the CPU, which is
how CI runs the same code path; the CUDA cases skip without a GPU)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import shardkit
from shardkit import DecodeError, GpuPrefetcher, StreamingDataset, index_shards, make_loader
from shardkit.gpudecode import GpuBatch, jpeg_header

from _helpers_read import image_folder, pack
from conftest import jpeg_bytes, photo, png_bytes

wds = pytest.importorskip("webdataset")

CUDA = torch.cuda.is_available()
CROPS = {"train": shardkit.RandomResizedCrop(48), "eval": shardkit.CenterCrop(48, resize=56)}


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    folder = image_folder(root / "src", classes=3, per_class=10, size=(96, 72))
    pack(folder, root / "raw", mode="raw", max_samples=8)
    return root / "raw"


def batches(source, num_workers=0, device="cpu", **kw):
    """Every batch of one epoch as (float images 0..1, labels, keys) through GpuPrefetcher."""
    kw.setdefault("batch_size", 8)
    kw.setdefault("seed", 4)
    ds = StreamingDataset(source, with_keys=True, **kw)
    loader = make_loader(ds, num_workers=num_workers, persistent_workers=False)
    pf = GpuPrefetcher(loader, device)
    return [(im.cpu(), lab.cpu(), keys) for im, lab, keys in pf], pf


@pytest.mark.parametrize("crop", sorted(CROPS))
@pytest.mark.parametrize("num_workers", [0, 2])
def test_gpu_path_on_the_cpu_matches_the_cpu_decoder(raw, crop, num_workers):
    want, _ = batches(raw, num_workers, crop=CROPS[crop])
    got, pf = batches(raw, num_workers, crop=CROPS[crop], decode="gpu")
    assert [k for _, _, ks in got for k in ks] == [k for _, _, ks in want for k in ks]
    assert torch.equal(torch.cat([g[1] for g in got]), torch.cat([w[1] for w in want]))
    a, b = torch.cat([g[0] for g in got]), torch.cat([w[0] for w in want])
    assert a.shape == b.shape == (30, 3, 48, 48)
    diff = (a - b).abs() * 255  # decoders and filters differ (DCT scaling + area vs bilinear)
    assert diff.mean() < 2.5 and diff.mean(dim=(1, 2, 3)).max() < 5, float(diff.mean())
    assert pf.cpu_decoded == pf.fallbacks == pf.skipped == 0


def test_workers_draw_the_crop_boxes_the_cpu_path_draws(raw):
    ds = StreamingDataset(raw, batch_size=30, crop=CROPS["train"], decode="gpu", seed=9,
                          with_keys=True)
    encoded, labels, keys = next(iter(ds))
    assert isinstance(encoded, GpuBatch) and len(encoded) == 30
    for j, i in enumerate(encoded.where.tolist()):
        blob = encoded.data[encoded.offsets[j]:encoded.offsets[j + 1]].numpy().tobytes()
        w, h, _ = jpeg_header(blob)
        p = CROPS["train"].params(w, h, random.Random(f"9/0/{keys[i]}"))
        assert tuple(encoded.boxes[j].tolist()) == p.box and bool(encoded.flips[j]) == p.flip


# --------------------------------------------------------------------------- what nvJPEG cannot take


def _odd_shards(folder, corrupt: bool):
    folder.mkdir(parents=True)
    im = photo(80, 64, seed=1)
    members = [("rgb", jpeg_bytes(im)), ("prog", jpeg_bytes(im, progressive=True)),
               ("gray", jpeg_bytes(im.convert("L"))), ("cmyk", jpeg_bytes(im.convert("CMYK"))),
               ("png", None)]
    if corrupt:
        good = jpeg_bytes(photo(80, 64, seed=2))
        members.append(("bad", good[:600] + bytes(range(256)) * 8 + good[-2:]))
    with wds.TarWriter(str(folder / "odd.tar")) as sink:
        for i, (key, data) in enumerate(members):
            sample = {"__key__": key, "cls": i}
            if data is None:
                sample["png"] = png_bytes(im)
            else:
                sample["jpg"] = data
            sink.write(sample)
    index_shards(folder, progress=False)


def test_images_nvjpeg_cannot_take_are_decoded_by_the_workers_and_counted(tmp_path):
    _odd_shards(tmp_path / "odd", corrupt=False)
    crop = shardkit.CenterCrop(32, resize=40)
    got, pf = batches(tmp_path / "odd", crop=crop, decode="gpu", batch_size=5, shuffle=False)
    want, _ = batches(tmp_path / "odd", crop=crop, batch_size=5, shuffle=False)
    assert pf.cpu_decoded == 2  # CMYK and PNG; progressive and grey JPEGs go to the device
    diff = (got[0][0] - want[0][0]).abs() * 255
    assert diff.mean(dim=(1, 2, 3)).max() < 6
    assert got[0][1].tolist() == want[0][1].tolist() == [0, 1, 2, 3, 4]


def test_a_corrupt_jpeg_raises_naming_its_key_or_is_replaced_under_skip(tmp_path):
    _odd_shards(tmp_path / "odd", corrupt=True)
    crop = shardkit.CenterCrop(32, resize=40)
    kw = dict(crop=crop, decode="gpu", batch_size=6, shuffle=False)
    with pytest.raises(DecodeError, match="'bad'"):
        batches(tmp_path / "odd", **kw)
    got, pf = batches(tmp_path / "odd", on_error="skip", **kw)
    images, labels, keys = got[0]
    assert keys[5] == "bad" and pf.skipped == 1
    assert labels.tolist() == [0, 1, 2, 3, 4, 4]  # the previous good image and its label
    assert torch.equal(images[5], images[4])


def test_jpeg_header():
    im = photo(40, 30)
    assert jpeg_header(jpeg_bytes(im)) == (40, 30, 3)
    assert jpeg_header(jpeg_bytes(im, progressive=True)) == (40, 30, 3)
    assert jpeg_header(jpeg_bytes(im.convert("L"))) == (40, 30, 1)
    assert jpeg_header(jpeg_bytes(im.convert("CMYK"))) is None
    assert jpeg_header(png_bytes(im)) is None
    assert jpeg_header(jpeg_bytes(im)[:20]) is None
    assert jpeg_header(b"") is None


def test_gpu_decode_needs_batches_a_crop_and_no_transform(raw):
    for kw in ({}, {"batch_size": 4}, {"crop": CROPS["eval"]},
               {"batch_size": 4, "crop": CROPS["eval"], "transform": lambda x: x}):
        with pytest.raises(ValueError, match="decode='gpu'"):
            StreamingDataset(raw, decode="gpu", **kw)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_nvjpeg_batches_match_the_cpu_run_of_the_same_path(raw):
    got, pf = batches(raw, 2, device="cuda", crop=CROPS["train"], decode="gpu")
    want, _ = batches(raw, 2, device="cpu", crop=CROPS["train"], decode="gpu")
    a, b = torch.cat([g[0] for g in got]), torch.cat([w[0] for w in want])
    assert np.abs((a - b).numpy()).mean() * 255 < 2
    assert pf.fallbacks == 0


def test_replaced_labels_reach_the_user_when_a_pin_thread_copied_them(tmp_path):
    """With pinned memory the DataLoader hands on a pinned copy of the labels, not the tensor
    GpuBatch patches: the prefetcher must hand out the patched one."""
    _odd_shards(tmp_path / "odd", corrupt=True)
    ds = StreamingDataset(tmp_path / "odd", crop=shardkit.CenterCrop(32, resize=40),
                          decode="gpu", batch_size=6, shuffle=False, on_error="skip")
    encoded, labels = next(iter(ds))
    pinned_copy = (encoded, labels.clone())  # what torch's pin_memory() makes of the tuple
    pf = GpuPrefetcher([pinned_copy], "cpu")
    images, got = next(iter(pf))
    assert got.tolist() == [0, 1, 2, 3, 4, 4] and pf.skipped == 1


def test_an_interpolation_the_device_cannot_do_is_refused_when_the_dataset_is_made(raw):
    with pytest.raises(ValueError, match="lanczos"):
        StreamingDataset(raw, decode="gpu", batch_size=4,
                         crop=shardkit.RandomResizedCrop(32, interpolation="lanczos"))
