"""Tests for shardkit.decode: fused crops, modes, errors, .npy arrays."""

from __future__ import annotations

import io
import random
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

from shardkit.decode import (
    MAX_PIXELS,
    CenterCrop,
    CropParams,
    ImageDecodeError,
    RandomResizedCrop,
    decode_array,
    decode_image,
)


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A photo-like uint8 HxWx3 array: smooth gradients, soft blobs, fine texture, mild noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    x /= max(width - 1, 1)
    y /= max(height - 1, 1)
    img = np.stack([200 * x + 30, 180 * y + 40, 120 * (1 - x) * y + 60 * x + 50], axis=-1)
    for _ in range(4):
        cx, cy, r = rng.random(), rng.random(), 0.05 + 0.2 * rng.random()
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        img += blob[..., None] * rng.uniform(-80, 80, size=3)
    px, py = np.mgrid[0:height, 0:width].astype(np.float32)[::-1]
    img += (20 * np.sin(px / 2.5 + 3 * y) * np.sin(py / 4.0))[..., None]  # fine texture
    img += rng.normal(0, 4, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(arr_or_im, fmt: str = "JPEG", **kw) -> bytes:
    im = Image.fromarray(arr_or_im) if isinstance(arr_or_im, np.ndarray) else arr_or_im
    buf = io.BytesIO()
    if fmt == "JPEG":
        kw.setdefault("quality", 90)
    im.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def jpegs() -> dict:
    sizes = {"normal": (400, 350), "large": (2000, 1500), "tall": (300, 700), "tiny": (50, 40)}
    out = {name: encode(photo(w, h, seed=i)) for i, (name, (w, h)) in enumerate(sizes.items())}
    out["progressive"] = encode(photo(1200, 900, seed=9), progressive=True)
    return out


def reference(data: bytes, p: CropParams, resample=Image.Resampling.BILINEAR) -> torch.Tensor:
    """Full decode -> crop box -> resize with the same filter -> flip."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    out = im.crop(p.box).resize(p.out_size, resample=resample)
    if p.flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.array(out)).permute(2, 0, 1)


def assert_close(got: torch.Tensor, want: torch.Tensor, mean_tol: float = 1.5, max_tol: int = 16) -> None:
    assert got.shape == want.shape and got.dtype == torch.uint8
    diff = (got.int() - want.int()).abs()
    assert diff.float().mean().item() < mean_tol, diff.float().mean().item()
    assert diff.max().item() <= max_tol, diff.max().item()


# ---------------------------------------------------------------- fused crops match the slow path


@pytest.mark.parametrize("name", ["normal", "large", "tall", "tiny", "progressive"])
def test_random_resized_crop_matches_full_decode(jpegs, name):
    data = jpegs[name]
    size = 96 if name in ("large", "progressive") else 64
    crop = RandomResizedCrop(size)
    w, h = Image.open(io.BytesIO(data)).size
    for seed in range(12 if name == "large" else 20):
        p = crop.params(w, h, random.Random(seed))
        got = decode_image(data, crop=crop, rng=random.Random(seed))
        assert got.is_contiguous() and got.shape == (3, size, size)
        assert_close(got, reference(data, p))


@pytest.mark.parametrize("name", ["normal", "large", "tall", "tiny", "progressive"])
def test_center_crop_matches_full_decode(jpegs, name):
    data = jpegs[name]
    crop = CenterCrop((48, 64), resize=80)  # (height, width)
    w, h = Image.open(io.BytesIO(data)).size
    p = crop.params(w, h, None)
    got = decode_image(data, crop=crop, rng=random.Random(0))
    assert got.shape == (3, 48, 64)
    assert_close(got, reference(data, p))


def test_center_crop_pil_mode_and_bicubic(jpegs):
    data = jpegs["large"]
    crop = CenterCrop(224, interpolation="bicubic")
    assert crop.resize == 256
    out = decode_image(data, mode="pil", crop=crop, rng=random.Random(0))
    assert isinstance(out, Image.Image) and out.mode == "RGB" and out.size == (224, 224)
    p = crop.params(2000, 1500, None)
    want = reference(data, p, Image.Resampling.BICUBIC)
    assert_close(torch.from_numpy(np.array(out)).permute(2, 0, 1), want)


def test_center_crop_matches_torchvision_geometry():
    from torchvision.transforms.v2 import functional as F

    img = torch.from_numpy(photo(400, 350)).permute(2, 0, 1)
    want = F.center_crop(F.resize(img, [256], antialias=True), [224, 224])
    p = CenterCrop(224, resize=256).params(400, 350, None)
    pil = Image.fromarray(photo(400, 350)).resize(p.out_size, Image.Resampling.BILINEAR, box=p.box)
    got = torch.from_numpy(np.array(pil)).permute(2, 0, 1)
    assert_close(got, want, mean_tol=2.5)


def _record_draft(monkeypatch) -> list:
    seen = []
    orig = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        full = self.size
        res = orig(self, mode, size)
        seen.append((full, self.size))
        return res

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    return seen


def test_draft_reduces_large_image_for_small_crop(jpegs, monkeypatch):
    seen = _record_draft(monkeypatch)
    decode_image(jpegs["large"], crop=CenterCrop(224, resize=256), rng=random.Random(0))
    # box is 1312 px high; 1312 / 4 >= 224 but 1312 / 8 < 224, so the DCT scale is 1/4
    assert seen == [((2000, 1500), (500, 375))]
    seen.clear()
    decode_image(jpegs["large"], crop=RandomResizedCrop(32, scale=(0.5, 0.5), ratio=(1, 1)),
                 rng=random.Random(3))
    assert seen == [((2000, 1500), (250, 188))]  # 1/8


def test_draft_not_used_when_it_would_lose_detail(jpegs, monkeypatch):
    seen = _record_draft(monkeypatch)
    decode_image(jpegs["normal"], crop=RandomResizedCrop(224), rng=random.Random(0))
    decode_image(jpegs["normal"], mode="uint8")  # no crop -> full decode, draft unused
    assert all(after == full for full, after in seen)


# ---------------------------------------------------------------- crop parameters


def test_params_deterministic_and_seed_dependent():
    crop = RandomResizedCrop(224)
    a = [crop.params(640, 480, random.Random(s)) for s in range(20)]
    b = [crop.params(640, 480, random.Random(s)) for s in range(20)]
    assert a == b
    assert len({p.box for p in a}) > 15
    assert {p.flip for p in a} == {True, False}
    assert not any(RandomResizedCrop(224, flip=False).params(640, 480, random.Random(s)).flip
                   for s in range(20))


@pytest.mark.parametrize("w,h", [(640, 480), (300, 900), (1000, 100), (37, 23)])
def test_params_inside_image_and_within_ranges(w, h):
    scale, ratio = (0.2, 0.7), (0.6, 1.5)
    crop = RandomResizedCrop((32, 48), scale=scale, ratio=ratio)
    for s in range(200):
        p = crop.params(w, h, random.Random(s))
        left, top, right, bottom = p.box
        assert 0 <= left < right <= w and 0 <= top < bottom <= h
        assert p.out_size == (48, 32)
        bw, bh = right - left, bottom - top
        if (bw, bh) in _fallback_boxes(w, h, ratio):
            continue
        # rounding to whole pixels moves area/ratio a little, more for small boxes
        slack = 1.5 / min(bw, bh) * 2 + 1e-9
        assert scale[0] * (1 - slack) <= bw * bh / (w * h) <= scale[1] * (1 + slack)
        assert ratio[0] * (1 - slack) <= bw / bh <= ratio[1] * (1 + slack)


def _fallback_boxes(w, h, ratio):
    import torchvision.transforms.v2 as T

    _, _, fh, fw = T.RandomResizedCrop.get_params(torch.zeros(1, h, w), scale=[5.0, 6.0], ratio=list(ratio))
    return {(fw, fh)}


@pytest.mark.parametrize("w,h", [(640, 480), (100, 1000), (1000, 100), (500, 500)])
def test_fallback_matches_torchvision(w, h):
    import torchvision.transforms.v2 as T

    ratio = (3 / 4, 4 / 3)
    crop = RandomResizedCrop(10, scale=(5.0, 6.0), ratio=ratio)  # never fits: always the fallback
    p = crop.params(w, h, random.Random(0))
    top, left, ch, cw = T.RandomResizedCrop.get_params(torch.zeros(1, h, w), scale=[5.0, 6.0],
                                                       ratio=list(ratio))
    assert p.box == (left, top, left + cw, top + ch)


def test_random_resized_crop_needs_rng():
    with pytest.raises(TypeError):
        decode_image(encode(photo(40, 30)), crop=RandomResizedCrop(16))
    # CenterCrop is deterministic and does not need one
    assert decode_image(encode(photo(40, 30)), crop=CenterCrop(16)).shape == (3, 16, 16)


def test_bad_recipe_arguments():
    with pytest.raises(ValueError):
        RandomResizedCrop(224, interpolation="cubic-ish")
    with pytest.raises(ValueError):
        RandomResizedCrop(224, scale=(0.9, 0.1))
    with pytest.raises(ValueError):
        CenterCrop(0)


# ---------------------------------------------------------------- modes and input kinds


def _inputs() -> dict:
    rgb = Image.fromarray(photo(60, 40))
    cmyk = rgb.convert("CMYK")
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    pal_t = pal.copy()
    pal_t.info["transparency"] = 0
    return {
        "rgb_jpeg": encode(rgb),
        "l_jpeg": encode(rgb.convert("L")),
        "cmyk_jpeg": encode(cmyk),
        "rgb_png": encode(rgb, "PNG"),
        "l_png": encode(rgb.convert("L"), "PNG"),
        "rgba_png": encode(rgb.convert("RGBA"), "PNG"),
        "p_png": encode(pal, "PNG"),
        "p_png_transparent": encode(pal_t, "PNG", transparency=0),
        "la_png": encode(rgb.convert("LA"), "PNG"),
        "webp": encode(rgb, "WEBP"),
    }


@pytest.mark.parametrize("kind", list(_inputs()))
def test_modes_give_rgb(kind):
    data = _inputs()[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = decode_image(data)
        assert t.dtype == torch.uint8 and t.shape == (3, 40, 60) and t.is_contiguous()
        c = decode_image(data, crop=RandomResizedCrop(24), rng=random.Random(1))
        assert c.shape == (3, 24, 24)
        im = decode_image(data, mode="pil")
        assert isinstance(im, Image.Image) and im.mode == "RGB" and im.size == (60, 40)
    assert decode_image(data, mode="raw") is data


def test_uint8_matches_pil_pixels():
    data = encode(photo(60, 40), "PNG")
    assert np.array_equal(decode_image(data).permute(1, 2, 0).numpy(), photo(60, 40))


def test_bad_mode_and_raw_with_crop():
    with pytest.raises(ValueError):
        decode_image(b"x", mode="float")
    with pytest.raises(ValueError):
        decode_image(b"x", mode="raw", crop=CenterCrop(8))


# ---------------------------------------------------------------- errors


def test_garbage_empty_truncated(jpegs):
    with pytest.raises(ImageDecodeError, match="not an image"):
        decode_image(random.Random(0).randbytes(5000))
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(b"")
    for crop in (None, RandomResizedCrop(32)):
        with pytest.raises(ImageDecodeError, match="truncated") as info:
            decode_image(jpegs["normal"][: len(jpegs["normal"]) // 2], crop=crop, rng=random.Random(0))
        assert isinstance(info.value, ValueError) and info.value.reason


def _png_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.fixture
def no_load(monkeypatch):
    def boom(self):
        raise AssertionError("pixels were decoded")

    from PIL import ImageFile

    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)


def test_pixel_limit_checked_before_decoding(jpegs, no_load):
    with pytest.raises(ImageDecodeError, match=r"400x350=140000 pixels, over the limit of 100000"):
        decode_image(jpegs["normal"], max_pixels=100_000)
    with pytest.raises(ImageDecodeError, match="over the limit"):
        decode_image(jpegs["normal"], crop=CenterCrop(8), max_pixels=100_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(ImageDecodeError, match=f"over the limit of {MAX_PIXELS}"):
            decode_image(_png_claiming(10_000, 10_001))
    with pytest.raises(ImageDecodeError, match="pixel limit"):  # Pillow's own guard, also wrapped
        decode_image(_png_claiming(100_000, 100_000))


def test_type_errors_propagate():
    with pytest.raises(TypeError):
        decode_image("not bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        decode_array("not bytes")  # type: ignore[arg-type]

    class BuggyCrop:
        def params(self, w, h, rng):
            return None + 1

    with pytest.raises(TypeError):
        decode_image(encode(photo(20, 20)), crop=BuggyCrop(), rng=random.Random(0))


# ---------------------------------------------------------------- .npy arrays


def npy(arr: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_array_round_trip(channels):
    arr = (photo(50, 30)[..., :channels] if channels != 4
           else np.dstack([photo(50, 30), photo(50, 30)[..., :1]]))
    t = decode_array(npy(arr))
    assert t.dtype == torch.uint8 and t.shape == (channels, 30, 50) and t.is_contiguous()
    assert np.array_equal(t.permute(1, 2, 0).numpy(), arr)


def test_array_crop_matches_torchvision():
    from torchvision.transforms.v2 import functional as F

    arr = photo(256, 200)
    data = npy(arr)
    full = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    for crop in (RandomResizedCrop(96), RandomResizedCrop(300), CenterCrop(128)):
        for seed in range(8):
            p = crop.params(256, 200, random.Random(seed))
            left, top, right, bottom = p.box
            want = F.resized_crop(full, top, left, bottom - top, right - left,
                                  [p.out_size[1], p.out_size[0]], antialias=True)
            if p.flip:
                want = F.horizontal_flip(want)
            got = decode_array(data, crop=crop, rng=random.Random(seed))
            assert got.is_contiguous()
            assert_close(got, want, mean_tol=0.5, max_tol=2)


def _touch(path: str) -> None:
    Path(path).touch()


class Evil:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (_touch, (self.path,))


def test_array_never_unpickles(tmp_path):
    marker = tmp_path / "pwned"
    data = npy(np.array([Evil(str(marker))], dtype=object), allow_pickle=True)
    # sanity: the payload does run when loaded with pickle allowed
    probe = tmp_path / "probe"
    np.load(io.BytesIO(npy(np.array([Evil(str(probe))], dtype=object), allow_pickle=True)), allow_pickle=True)
    assert probe.exists()
    with pytest.raises(ImageDecodeError, match="pickle"):
        decode_array(data)
    import pickle

    with pytest.raises(ImageDecodeError):
        decode_array(pickle.dumps(Evil(str(marker))))
    assert not marker.exists()


@pytest.mark.parametrize(
    "arr,match",
    [
        (np.zeros((8, 8, 3), np.float32), "dtype"),
        (np.zeros((8, 8), np.uint8), "shape"),
        (np.zeros((2, 8, 8, 3), np.uint8), "shape"),
        (np.zeros((8, 8, 2), np.uint8), "shape"),
        (np.zeros((0, 8, 3), np.uint8), "shape"),
    ],
)
def test_array_refused(arr, match):
    with pytest.raises(ImageDecodeError, match=match):
        decode_array(npy(arr))


def test_array_garbage():
    with pytest.raises(ImageDecodeError):
        decode_array(b"")
    with pytest.raises(ImageDecodeError):
        decode_array(b"\x93NUMPY garbage")
    with pytest.raises(ImageDecodeError):
        decode_array(npy(np.zeros((8, 8, 3), np.uint8))[:-10])


def test_array_header_claiming_huge_shape_allocates_nothing():
    small = npy(np.zeros((4, 4, 3), np.uint8))
    buf = io.BytesIO()  # ~30 GB claimed; np.load would allocate it before noticing the data is short
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "|u1", "fortran_order": False, "shape": (99999, 99999, 3)})
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_array(buf.getvalue() + bytes(48))
    with pytest.raises(ImageDecodeError, match="trailing"):
        decode_array(small + b"extra")


def test_array_fortran_order_and_no_warning():
    arr = np.asfortranarray(photo(20, 10))
    data = npy(arr)
    assert b"'fortran_order': True" in data
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(decode_array(data).permute(1, 2, 0).numpy(), arr)
        assert decode_array(npy(photo(20, 10)[..., :1])).shape == (1, 10, 20)
        assert decode_array(npy(photo(20, 10)), crop=CenterCrop(8), rng=random.Random(0)).shape == (3, 8, 8)


def test_recipe_box_outside_image_is_a_bug_not_a_decode_error():
    class OutOfBounds:
        def params(self, w, h, rng):
            return CropParams((0, 0, w + 5, h), (8, 8), False)

    for fn, data in ((decode_image, encode(photo(20, 20))), (decode_array, npy(photo(20, 20)))):
        with pytest.raises(ValueError, match="not inside") as info:
            fn(data, crop=OutOfBounds(), rng=random.Random(0))
        assert not isinstance(info.value, ImageDecodeError)


def test_center_crop_says_when_it_enlarges_an_image_more_than_twice():
    with pytest.warns(UserWarning, match=r"enlarges a 400x300 image 15.6x .*resize="):
        CenterCrop(4096).params(400, 300)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CenterCrop(224).params(400, 300)  # shrinking: nothing to say


def test_crop_boxes_are_seeded_by_the_key_bytes_and_unchanged_for_utf8_keys():
    from shardkit.decode import _crop_params, crop_rng

    crop = RandomResizedCrop(32)
    for key in ["plain", "n0001/n0001_00017", "café", "日本語/写真", "emoji-🙂"]:
        old = _crop_params(crop, 640, 480, random.Random("3/1/" + key))
        assert _crop_params(crop, 640, 480, crop_rng("3/1/", key)) == old
    latin1 = b"caf\xe9".decode("utf-8", "surrogateescape")  # a Latin-1 member name
    box = _crop_params(crop, 640, 480, crop_rng("3/1/", latin1))
    assert box == _crop_params(crop, 640, 480, random.Random(b"3/1/caf\xe9"))
    assert box != _crop_params(crop, 640, 480, crop_rng("3/1/", "café"))
