"""Shared fixtures for the packing tests: photo-like images generated with numpy + Pillow.

Nothing binary is checked in and nothing touches the network. Images are small (64x48 by default)
but noisy, so JPEG sizes and shard boundaries behave like real data rather than flat colour.
"""

from __future__ import annotations

import io
import os
import re
import struct
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture(autouse=True)
def _own_index_key(tmp_path_factory, monkeypatch):
    """``shardkit index`` signs manifests with a key of the user's config folder: the tests use
    one of their own, never the machine's (signing.py)."""
    monkeypatch.delenv("SHARDKIT_INDEX_KEY", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.getbasetemp() / "config"))


# --------------------------------------------------------------------------- image makers


def photo(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: smooth colour field plus grain (compresses like a photo)."""
    rng = np.random.default_rng(seed)
    small = rng.random((4, 4, 3), dtype=np.float32)
    field = Image.fromarray((small * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    arr = np.asarray(field, np.float32) + rng.normal(0, 20.0, (height, width, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def jpeg_bytes(im: Image.Image, quality: int = 90, **kw) -> bytes:
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=quality, **kw)
    return out.getvalue()


def png_bytes(im: Image.Image, **kw) -> bytes:
    out = io.BytesIO()
    im.save(out, format="PNG", **kw)
    return out.getvalue()


def png_with_size(data: bytes, width: int, height: int) -> bytes:
    """Patch a PNG's IHDR to claim another size (CRC fixed): a decompression-bomb header."""
    assert data[12:16] == b"IHDR"
    body = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
    return data[:8] + struct.pack(">I", 13) + body + struct.pack(">I", zlib.crc32(body)) + data[33:]


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_class_folder(root: Path, classes=("cat", "dog", "eel"), per_class: int = 8,
                      size=(64, 48), seed: int = 0) -> Path:
    """An ImageFolder tree of JPEGs with a few different sizes."""
    for c, name in enumerate(classes):
        for i in range(per_class):
            w, h = size[0] + (i % 3) * 8, size[1] + (i % 2) * 6
            write(root / name / f"img_{i:03d}.jpg", jpeg_bytes(photo(w, h, seed * 10007 + c * 101 + i)))
    return root


# --------------------------------------------------------------------------- reading shards


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path, mode="r:") as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]


def samples_of(path: Path) -> list[dict]:
    """Group a shard's members into samples: [{"__key__": key, field: bytes, ...}, ...]."""
    out: list[dict] = []
    for name, data in tar_members(path):
        key, field = name.split(".", 1)
        if not out or out[-1]["__key__"] != key:
            out.append({"__key__": key})
        assert field not in out[-1], f"duplicate member {name}"
        out[-1][field] = data
    return out


def dataset_samples(dest: Path) -> list[dict]:
    return [s for tar in sorted(Path(dest).glob("*.tar")) for s in samples_of(tar)]


def all_files(dest: Path) -> dict[str, bytes]:
    """Every file's bytes under ``dest`` (names relative), for byte-for-byte comparisons."""
    dest = Path(dest)
    return {p.relative_to(dest).as_posix(): p.read_bytes() for p in sorted(dest.rglob("*")) if p.is_file()}


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("PYTHONWARNINGS", None)
    return env


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def class_folder(tmp_path_factory) -> Path:
    """3 classes x 8 JPEGs (read-only by convention: copy it before changing anything)."""
    return make_class_folder(tmp_path_factory.mktemp("src") / "images")


@pytest.fixture
def src(tmp_path) -> Path:
    """A fresh, writable copy-sized class folder per test."""
    return make_class_folder(tmp_path / "src", per_class=4)


# --------------------------------------------------------------------------- after a killed packer

JOURNAL = ".shardkit-pack.json"
FINAL = re.compile(r"shard-\d{6}\.(tar|idx)")
TEMPORARY = re.compile(r"\..+\.tmp-[0-9a-f]{32}")


def check_interrupted(dest: Path) -> int:
    """After a packer was stopped: no manifest; every file is a final shard or index, the journal
    or a temporary; every final shard is complete (its index gives exactly its samples' first
    members, it ends with the end-of-archive blocks) and, when the journal lists it, has the
    journal's size and sha256. Returns the number of final shards."""
    import hashlib
    import json
    import tarfile

    from shardkit.shardformat import END_OF_ARCHIVE, MANIFEST_PATH, decode_index, index_name

    names = [p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()] \
        if dest.exists() else []
    assert MANIFEST_PATH not in names
    for name in names:
        base = name.removeprefix(".shardkit/")
        assert FINAL.fullmatch(base) or name == JOURNAL or TEMPORARY.fullmatch(base), name
    journal = {}
    if JOURNAL in names:
        doc = json.loads((dest / JOURNAL).read_text())
        for entry in doc["shards"]:  # a finished manifest not yet published lists ShardInfo
            shard = entry if "format" in doc else entry["shard"]
            journal[shard["url"]] = shard
    tars = sorted(n for n in names if n.endswith(".tar") and FINAL.fullmatch(n))
    for name in tars:
        data = (dest / name).read_bytes()
        index = (dest / index_name(name)).read_bytes()  # written before the rename
        offsets = decode_index(index, (len(index) - 8) // 8 - 1, len(data), name)
        assert int(offsets[-1]) + len(END_OF_ARCHIVE) == len(data), name
        assert data.endswith(END_OF_ARCHIVE), name
        starts, last = [], None
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            for m in tf:
                key = m.name.split(".", 1)[0]
                tf.extractfile(m).read()
                if key != last:
                    starts.append(m.offset)
                    last = key
        assert starts == offsets[:-1].tolist(), name
        if name in journal:
            assert hashlib.sha256(data).hexdigest() == journal[name]["sha256"], name
            assert len(data) == journal[name]["num_bytes"], name
    return len(tars)


def damage_shard(folder: Path, damage: str, shard: str = "shard-000001") -> None:
    """Damage one shard of a packed folder: ``flip_byte``, ``truncate``, ``missing`` or
    ``flip_index`` (a byte of its index file)."""
    target = folder / f"{shard}.tar"
    data = bytearray(target.read_bytes())
    if damage == "flip_byte":
        data[len(data) // 3] ^= 0x01
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(bytes(data[: len(data) - 1536]))
    elif damage == "missing":
        target.unlink()
    else:
        idx = folder / ".shardkit" / f"{shard}.idx"
        raw = bytearray(idx.read_bytes())
        raw[-1] ^= 0x01
        idx.write_bytes(bytes(raw))
