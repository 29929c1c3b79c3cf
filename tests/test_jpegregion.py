"""Decoding only a JPEG's crop box (shardkit.jpegregion) and the antialiased shrink of the fast
path: the same pixels as a whole decode cut to the box, the same crop boxes as before, every
refusal handed back to the usual path, and a quiet import."""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import simplejpeg
from PIL import Image
from test_decode import encode, photo, reference

from shardkit import CenterCrop, RandomResizedCrop, jpegregion
from shardkit import decode as dec

needs_region = pytest.mark.skipif(not jpegregion.available(),
                                  reason="nvidia-nvimgcodec-cu12 not installed (region decoding off)")


def _jpeg(width, height, seed=0, **kw) -> bytes:
    return encode(photo(width, height, seed=seed), **kw)


@pytest.fixture(scope="module")
def kinds() -> dict:
    """JPEGs of every chroma layout the fast path meets, odd sizes, progressive, restart markers."""
    base = photo(333, 251, seed=4)
    out = {f"sub{s}": encode(base, subsampling=s) for s in (0, 1, 2)}  # 4:4:4, 4:2:2, 4:2:0
    out["gray"] = encode(base[:, :, 0])
    out["progressive"] = _jpeg(301, 217, seed=5, progressive=True)
    out["tiny"] = _jpeg(19, 17, seed=6)
    im = Image.fromarray(photo(260, 190, seed=7))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90, restart_marker_blocks=4)
    out["restarts"] = buf.getvalue()
    return out


def _boxes(width, height, n, seed=0):
    r = random.Random(seed)
    side = jpegregion.MIN_SIDE
    boxes = [(0, 0, width, height), (0, 0, side, side), (width - side, height - side, width, height),
             (0, height // 3, side, height), (width // 3, 0, width // 3 + side, height)]
    while len(boxes) < n:
        x0, x1 = sorted(r.sample(range(width + 1), 2))
        y0, y1 = sorted(r.sample(range(height + 1), 2))
        if x1 - x0 >= side and y1 - y0 >= side:
            boxes.append((x0, y0, x1, y1))
    return boxes


@needs_region
@pytest.mark.parametrize("kind", ["sub0", "sub1", "sub2", "gray", "progressive", "tiny", "restarts"])
def test_a_region_holds_the_pixels_of_a_whole_decode_cut_to_the_box(kinds, kind):
    data = kinds[kind]
    full = simplejpeg.decode_jpeg(data, "RGB")
    height, width = full.shape[:2]
    decoded = 0
    for i, box in enumerate(_boxes(width, height, 40, seed=len(kind))):
        # bytes, or a view of a read buffer as the batch fast path passes (taken as it is)
        got = jpegregion.decode_region(data if i % 2 else memoryview(bytearray(data)), box)
        if got is None:  # allowed (the usual path then decodes), but not for these plain JPEGs
            pytest.fail(f"{kind}: region {box} refused")
        left, top, right, bottom = box
        assert got.shape == (bottom - top, right - left, 3) and got.dtype == np.uint8
        np.testing.assert_array_equal(got, full[top:bottom, left:right], err_msg=f"{kind} {box}")
        decoded += 1
    assert decoded == 40
    assert jpegregion.decode_region(data, (0, 0, jpegregion.MIN_SIDE - 1, height)) is None


@needs_region
@pytest.mark.parametrize("bad", ["truncated", "garbage", "empty", "png"])
def test_what_the_region_decoder_cannot_read_comes_back_as_none(bad):
    data = _jpeg(120, 90)
    blob = {"truncated": data[: len(data) // 2], "garbage": b"\xff\xd8\xff" + os.urandom(500),
            "empty": b"", "png": encode(photo(40, 30), "PNG")}[bad]
    assert jpegregion.decode_region(blob, (0, 0, 10, 10)) is None


@needs_region
def test_the_fast_path_gives_the_same_crops_with_and_without_region_decoding(monkeypatch):
    """Same boxes (same generator draws), same pixels: region decoding changes only the speed."""
    data = _jpeg(500, 375, seed=11)
    crops = [RandomResizedCrop(224), RandomResizedCrop(96), CenterCrop(224, resize=256),
             CenterCrop(64, resize=72)]
    used = []
    real = jpegregion.decode_region

    def spy(blob, box):
        out = real(blob, box)
        used.append(out is not None)
        return out

    for crop in crops:
        for seed in range(12):
            monkeypatch.setattr(jpegregion, "decode_region", spy)
            r1 = random.Random(seed)
            with_region = dec.decode_image_hwc(data, crop=crop, rng=r1)
            monkeypatch.setattr(jpegregion, "decode_region", lambda blob, box: None)
            r2 = random.Random(seed)
            without = dec.decode_image_hwc(data, crop=crop, rng=r2)
            np.testing.assert_array_equal(with_region, without)
            assert r1.getstate() == r2.getstate()
    assert sum(used) >= 5  # the boxes whose bottom edge is high enough were decoded as regions


def test_a_truncated_jpeg_still_reaches_pillow_which_names_it(monkeypatch):
    data = _jpeg(300, 200)
    with pytest.raises(dec.ImageDecodeError):
        dec.decode_image_hwc(data[: len(data) // 3], crop=RandomResizedCrop(64), rng=random.Random(0))


def test_region_decoding_can_be_switched_off_and_its_import_prints_nothing(tmp_path):
    code = ("from shardkit import jpegregion; import sys; "
            "sys.stdout.write(str(jpegregion.available()))")
    env = dict(os.environ, **{jpegregion.SWITCH: "0"})
    off = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert off.stdout == "False"
    env.pop(jpegregion.SWITCH)
    on = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        check=True)
    assert on.stderr == ""  # nvImageCodec names every GPU library it did not find, on fd 2
    assert on.stdout in ("True", "False")


# ------------------------------------------------------------------ the antialiased shrink


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("writeable", [True, False])
def test_the_shrink_is_pillows_bilinear_filter_within_one_level(channels, writeable):
    img = photo(410, 333, seed=channels)
    arr = img if channels == 3 else (img[:, :, :1] if channels == 1 else
                                     np.concatenate([img, img[:, :, :1]], axis=2))
    arr = np.ascontiguousarray(arr)
    arr.flags.writeable = writeable
    region = arr[17:300, 40:390]  # a view: not contiguous, as a crop of a decoded image is
    out_w, out_h = 160, 120
    got = dec._shrink_antialiased(region, out_w, out_h, None)
    assert got.shape == (out_h, out_w, channels) and got.flags.c_contiguous
    src = np.ascontiguousarray(region)  # each channel alone (Pillow premultiplies RGBA's alpha)
    want = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(src[:, :, c]), "L").resize(
        (out_w, out_h), Image.Resampling.BILINEAR)) for c in range(channels)], axis=2)
    assert np.abs(got.astype(int) - want).max() <= 1
    slot = np.zeros((out_h, out_w, channels), np.uint8)
    assert dec._shrink_antialiased(region, out_w, out_h, slot) is slot
    np.testing.assert_array_equal(slot, got)


def test_fast_path_crops_that_shrink_are_within_one_level_of_pillow():
    data = _jpeg(640, 480, seed=3)
    crop = RandomResizedCrop(224, scale=(0.3, 0.6))  # boxes of ~300-430 px: full scale, shrunk
    checked = 0
    for seed in range(10):
        got = dec.decode_image_hwc(data, crop=crop, rng=random.Random(seed))
        p = crop.params(640, 480, random.Random(seed))
        if dec._dct_scale(p.box, p.inner_size) != 1:
            continue
        want = reference(data, p).permute(1, 2, 0).numpy()
        assert np.abs(got.astype(int) - want).max() <= 1, seed
        checked += 1
    assert checked >= 5
