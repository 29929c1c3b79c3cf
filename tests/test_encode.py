"""Encoding one source file into one sample: the three modes, image modes, arrays, bad input."""

from __future__ import annotations

import io
import json
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from shardkit.errors import SourceError
from shardkit.packing.encode import EncodeOptions, encode_sample
from shardkit.packing.folder import Item
from shardkit.shardformat import MTIME

from conftest import jpeg_bytes, photo, png_bytes, png_with_size, write

RAW = EncodeOptions("raw", None, 90)


def item(path, rel=None, label=1, kind=None) -> Item:
    rel = rel or path.name
    if kind is None:
        kind = "array" if rel.endswith((".npy", ".pt")) else "image"
    return Item(rel, str(path), "key-0123", label, None if label is None else "dog", kind)


def members(blob: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tf:
        infos = tf.getmembers()
        for m in infos:  # reproducible headers
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (MTIME, 0, 0, "", "", 0o644)
        return {m.name: tf.extractfile(m).read() for m in infos}


def encode(path, opts, **kw):
    blob, info = encode_sample(item(path, **kw), opts)
    assert len(blob) % 512 == 0
    return members(blob), info


# --------------------------------------------------------------------------- modes


@pytest.mark.parametrize("ext", ["jpg", "png", "webp", "bmp", "gif", "tiff"])
def test_raw_member_is_byte_identical_to_source(tmp_path, ext):
    im = photo(64, 48, seed=3)
    buf = io.BytesIO()
    (im.convert("P") if ext == "gif" else im).save(
        buf, format={"jpg": "JPEG", "tiff": "TIFF"}.get(ext, ext.upper()))
    path = write(tmp_path / f"pic.{ext}", buf.getvalue())
    got, _ = encode(path, RAW)
    field = "tiff" if ext == "tiff" else ext
    assert got[f"key-0123.{field}"] == path.read_bytes()
    assert got["key-0123.cls"] == b"1"
    meta = json.loads(got["key-0123.json"])
    assert meta == {"path": f"pic.{ext}", "class": "dog", "size": [64, 48]}


def test_raw_keeps_jpeg_extension_spelling_normalised(tmp_path):
    path = write(tmp_path / "PIC.JPEG", jpeg_bytes(photo()))
    got, _ = encode(path, RAW)
    assert set(got) == {"key-0123.cls", "key-0123.jpg", "key-0123.json"}


def test_unlabelled_sample_has_no_cls_member(tmp_path):
    path = write(tmp_path / "a.jpg", jpeg_bytes(photo()))
    got, _ = encode(path, RAW, label=None)
    assert set(got) == {"key-0123.jpg", "key-0123.json"}
    assert json.loads(got["key-0123.json"])["class"] is None


@pytest.mark.parametrize("w,h,size,expect", [
    (64, 48, 32, (43, 32)),    # landscape: shorter side (h) to 32
    (48, 64, 32, (32, 43)),    # portrait
    (64, 48, 48, (64, 48)),    # already that size
    (64, 48, 100, (64, 48)),   # never upscaled
])
def test_resize_scales_shorter_side_and_reencodes_jpeg(tmp_path, w, h, size, expect):
    path = write(tmp_path / "a.png", png_bytes(photo(w, h)))
    got, _ = encode(path, EncodeOptions("resize", size, 90))
    data = got["key-0123.jpg"]
    im = Image.open(io.BytesIO(data))
    assert im.format == "JPEG" and im.mode == "RGB" and im.size == expect
    assert json.loads(got["key-0123.json"])["size"] == [w, h]


def test_resize_uses_quality(tmp_path):
    path = write(tmp_path / "a.png", png_bytes(photo(96, 96)))
    low, _ = encode(path, EncodeOptions("resize", 64, 20))
    high, _ = encode(path, EncodeOptions("resize", 64, 95))
    assert len(low["key-0123.jpg"]) < 0.6 * len(high["key-0123.jpg"])
    # the quality is the one we asked for: re-encoding with it gives the same bytes
    ref = Image.open(path).convert("RGB").resize((64, 64), Image.BICUBIC)
    assert high["key-0123.jpg"] == jpeg_bytes(ref, quality=95)


def _exif_rotated_jpeg() -> tuple[bytes, Image.Image]:
    """A 64x32 landscape picture stored with EXIF Orientation=6 (display: rotate 90° clockwise)."""
    im = Image.new("RGB", (64, 32), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 32, 32))  # left half of the stored pixels red
    exif = Image.Exif()
    exif[0x0112] = 6
    return jpeg_bytes(im, quality=95, exif=exif), im


@pytest.mark.parametrize("mode", ["resize", "tensor"])
def test_exif_orientation_is_applied(tmp_path, mode):
    data, _ = _exif_rotated_jpeg()
    path = write(tmp_path / "rot.jpg", data)
    got, _ = encode(path, EncodeOptions(mode, 32, 95))
    if mode == "resize":
        arr = np.asarray(Image.open(io.BytesIO(got["key-0123.jpg"])).convert("RGB")).astype(int)
        assert arr.shape == (64, 32, 3)  # portrait now: rotated
    else:
        arr = np.load(io.BytesIO(got["key-0123.npy"]), allow_pickle=False).astype(int)
        assert arr.shape == (32, 32, 3)
    # orientation 6 = rotate 90° clockwise for display: the left (red) half ends up on top
    top, bottom = arr[: arr.shape[0] // 8], arr[-arr.shape[0] // 8:]
    assert top[..., 0].mean() > 200 and top[..., 2].mean() < 60
    assert bottom[..., 2].mean() > 200 and bottom[..., 0].mean() < 60


@pytest.mark.parametrize("w,h", [(64, 48), (48, 64), (20, 10)])
def test_tensor_is_center_crop_uint8_hwc_npy_without_pickle(tmp_path, w, h):
    im = photo(w, h, seed=5)
    path = write(tmp_path / "a.png", png_bytes(im))
    got, info = encode(path, EncodeOptions("tensor", 16, 90))
    arr = np.load(io.BytesIO(got["key-0123.npy"]), allow_pickle=False)
    assert arr.dtype == np.uint8 and arr.shape == (16, 16, 3) and arr.flags.c_contiguous
    # same pixels as resize-shorter-side (upscaling allowed) then centre crop
    scale = 16 / min(w, h)
    rw, rh = max(16, round(w * scale)), max(16, round(h * scale))
    ref = np.asarray(im.resize((rw, rh), Image.BICUBIC))
    top, left = (rh - 16) // 2, (rw - 16) // 2
    np.testing.assert_array_equal(arr, ref[top:top + 16, left:left + 16])
    assert json.loads(got["key-0123.json"])["size"] == [w, h]


# --------------------------------------------------------------------------- Pillow image modes


def _variants():
    base = photo(64, 48, seed=9)
    grey = np.asarray(base.convert("L"))
    out = {
        "cmyk.jpg": (jpeg_bytes(base.convert("CMYK"), quality=95),
                     np.asarray(base.convert("CMYK").convert("RGB"))),
        "grey.jpg": (jpeg_bytes(base.convert("L"), quality=95), np.repeat(grey[..., None], 3, 2)),
        "p.png": (png_bytes(base.convert("P")), np.asarray(base.convert("P").convert("RGB"))),
        "p_transparent.png": (png_bytes(base.convert("P"), transparency=0),
                              np.asarray(base.convert("P").convert("RGB"))),
        "la.png": (png_bytes(base.convert("LA")), np.repeat(grey[..., None], 3, 2)),
        "rgba.png": (png_bytes(base.convert("RGBA")), np.asarray(base)),
        "grey16.png": (png_bytes(Image.fromarray(grey.astype(np.uint16) * 257)),
                       np.repeat(grey[..., None], 3, 2)),
        "bilevel.png": (png_bytes(base.convert("1")), np.asarray(base.convert("1").convert("RGB"))),
    }
    return out


VARIANTS = _variants()


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("mode", ["resize", "tensor"])
def test_any_pillow_mode_becomes_faithful_rgb(tmp_path, name, mode):
    data, expect = VARIANTS[name]
    path = write(tmp_path / name, data)
    size = 48  # no resampling: compare pixels directly
    got, _ = encode(path, EncodeOptions(mode, size, 95))
    if mode == "resize":
        arr = np.asarray(Image.open(io.BytesIO(got["key-0123.jpg"])))
        assert arr.shape == (48, 64, 3)
        # compare with the expected RGB pixels through the same JPEG encoder
        expect = np.asarray(Image.open(io.BytesIO(jpeg_bytes(Image.fromarray(expect), quality=95))))
        tol = 0.5 if not name.endswith(".jpg") else 3
    else:
        arr = np.load(io.BytesIO(got["key-0123.npy"]), allow_pickle=False)
        expect = expect[:, 8:56]
        tol = 0.5 if not name.endswith(".jpg") else 3
    assert arr.dtype == np.uint8 and arr.shape[-1] == 3
    diff = np.abs(arr.astype(float) - expect.astype(float)).mean()
    assert diff < tol, f"{name} in {mode} mode differs by {diff:.1f} per channel on average"


# --------------------------------------------------------------------------- preprocessed arrays


def test_npy_array_kept_exactly(tmp_path):
    arr = np.random.default_rng(0).random((3, 8, 8)).astype(np.float16)
    path = tmp_path / "a.npy"
    np.save(path, arr)
    got, info = encode(path, RAW)
    back = np.load(io.BytesIO(got["key-0123.npy"]), allow_pickle=False)
    np.testing.assert_array_equal(back, arr)
    assert info == {"dtype": "<f2", "layout": "CHW", "ndim": 3}
    assert json.loads(got["key-0123.json"])["shape"] == [3, 8, 8]


def test_pt_tensor_loaded_weights_only_and_uint8_chw_becomes_hwc(tmp_path):
    t = torch.arange(3 * 5 * 7, dtype=torch.uint8).reshape(3, 5, 7)
    path = tmp_path / "a.pt"
    torch.save(t, path)
    got, info = encode(path, RAW)
    back = np.load(io.BytesIO(got["key-0123.npy"]), allow_pickle=False)
    np.testing.assert_array_equal(back, t.permute(1, 2, 0).numpy())
    assert info == {"dtype": "|u1", "layout": "HWC", "ndim": 3}


class _Payload:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("how", ["torch_save", "plain_pickle"])
def test_malicious_pickle_in_pt_is_not_executed(tmp_path, how):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    if how == "torch_save":
        torch.save({"x": _Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    # the payload works: a plain unpickle would run it
    assert not marker.exists()
    with pytest.raises(SourceError) as info:
        encode_sample(item(path), RAW)
    assert not marker.exists()
    assert "evil.pt" in str(info.value)


@pytest.mark.parametrize("case,needle", [
    ("pt_dict", "dict"),
    ("pt_list", "list"),
    ("pt_bf16", "bfloat16"),
    ("pt_garbage", "torch"),
    ("pt_truncated", "torch"),
    ("npy_object", "object"),
    ("npy_structured", "plain"),
    ("npy_scalar", "plain"),
    ("npy_garbage", ""),
])
def test_arrays_that_are_not_plain_are_refused_clearly(tmp_path, case, needle):
    path = tmp_path / ("a.pt" if case.startswith("pt") else "a.npy")
    if case == "pt_dict":
        torch.save({"image": torch.zeros(3, 4, 4)}, path)
    elif case == "pt_list":
        torch.save([torch.zeros(3, 4, 4)], path)
    elif case == "pt_bf16":
        torch.save(torch.zeros(3, 4, 4, dtype=torch.bfloat16), path)
    elif case == "pt_garbage":
        path.write_bytes(b"not a torch file at all" * 10)
    elif case == "pt_truncated":
        torch.save(torch.zeros(3, 4, 4), path)
        path.write_bytes(path.read_bytes()[:150])
    elif case == "npy_object":
        np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    elif case == "npy_structured":
        np.save(path, np.zeros(3, dtype=[("a", "i4"), ("b", "f4")]))
    elif case == "npy_scalar":
        np.save(path, np.float32(3))
    elif case == "npy_garbage":
        path.write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(SourceError) as info:
        encode_sample(item(path), RAW)
    assert info.value.path == path.name
    assert needle.lower() in info.value.reason.lower()


# --------------------------------------------------------------------------- bad images


def _bad_image(case: str) -> tuple[str, bytes]:
    good = jpeg_bytes(photo(64, 48, seed=1))
    if case == "truncated_jpeg":
        return "a.jpg", good[: len(good) // 2]
    if case == "truncated_png":
        data = png_bytes(photo(64, 48, seed=1))
        return "a.png", data[: len(data) // 2]
    if case == "corrupt_bytes":
        return "a.jpg", good[:2] + np.random.default_rng(0).integers(0, 256, 4000, np.uint8).tobytes()
    if case == "zero_bytes":
        return "a.jpg", b""
    if case == "png_named_jpg":
        return "a.jpg", png_bytes(photo())
    if case == "bomb_header":
        return "a.png", png_with_size(png_bytes(photo()), 20000, 20000)
    raise AssertionError(case)


@pytest.mark.parametrize("mode", ["raw", "resize", "tensor"])
@pytest.mark.parametrize("case,reason", [
    ("truncated_jpeg", "truncated"), ("truncated_png", "truncated"),
    ("corrupt_bytes", "not a readable image"), ("zero_bytes", "empty"),
    ("png_named_jpg", "content is PNG"), ("bomb_header", "decompression bomb"),
])
def test_bad_image_raises_source_error_naming_file_and_reason(tmp_path, mode, case, reason):
    name, data = _bad_image(case)
    path = write(tmp_path / name, data)
    with pytest.raises(SourceError) as info:
        encode_sample(item(path, rel=f"dog/{name}"), EncodeOptions(mode, None if mode == "raw" else 32, 90))
    assert info.value.path == f"dog/{name}"
    assert reason.lower() in info.value.reason.lower()
    assert f"dog/{name}" in str(info.value)


@pytest.mark.parametrize("mode", ["raw", "resize"])
def test_pixel_limit_refuses_large_images(tmp_path, mode):
    path = write(tmp_path / "a.jpg", jpeg_bytes(photo(64, 48)))
    opts = EncodeOptions(mode, None if mode == "raw" else 32, 90, max_pixels=64 * 48 - 1)
    with pytest.raises(SourceError, match="pixels"):
        encode_sample(item(path), opts)
    encode_sample(item(path), EncodeOptions(mode, opts.size, 90, max_pixels=64 * 48))


def test_unreadable_paths(tmp_path):
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "nothing.jpg")
    (tmp_path / "dir.jpg").mkdir()
    for name in ("dangling.jpg", "dir.jpg"):
        with pytest.raises(SourceError, match="unreadable"):
            encode_sample(item(tmp_path / name), RAW)


def test_code_bugs_are_not_reported_as_bad_input(tmp_path):
    path = write(tmp_path / "a.jpg", jpeg_bytes(photo()))
    with pytest.raises(TypeError):
        encode_sample(item(path), EncodeOptions("resize", "32", 90))  # size of the wrong type
