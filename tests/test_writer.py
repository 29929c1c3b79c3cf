"""pack_folder end to end: format, shard limits, reproducibility, mixing, atomicity, resume, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from math import comb
from pathlib import Path

import numpy as np
import pytest
import torch

from shardkit import Manifest, pack_folder
from shardkit.common import parse_bytes
from shardkit.errors import DestinationError, SourceError
from shardkit.packing import pool
from shardkit.packing.journal import JOURNAL_NAME
from shardkit.packing.shards import ShardWriter
from shardkit.shardformat import MANIFEST_NAME, MANIFEST_PATH

from conftest import (
    all_files,
    check_interrupted,
    dataset_samples,
    jpeg_bytes,
    make_class_folder,
    photo,
    png_bytes,
    png_with_size,
    samples_of,
    tar_members,
    write,
)

MODES = {"raw": None, "resize": 32, "tensor": 24}


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> Path:
    """JPEGs and PNGs of several sizes in 3 classes, plus a text file."""
    root = make_class_folder(tmp_path_factory.mktemp("mixed") / "src", per_class=6)
    write(root / "dog" / "extra.png", png_bytes(photo(50, 70, seed=77)))
    write(root / "eel" / "notes.txt", b"not an image")
    return root


def pack(src, dest, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("workers", 1)
    return pack_folder(src, dest, **kw)


# --------------------------------------------------------------------------- modes through pack


@pytest.mark.parametrize("mode", list(MODES))
def test_pack_modes_members_labels_and_json(mixed_folder, tmp_path, mode):
    m = pack(mixed_folder, tmp_path / "out", mode=mode, size=MODES[mode])
    samples = dataset_samples(tmp_path / "out")
    assert len(samples) == m.num_samples == 19 and m.ignored == 1 and not m.skipped
    assert m.classes == ["cat", "dog", "eel"]
    for s in samples:
        meta = json.loads(s["json"])
        assert int(s["cls"]) == m.classes.index(meta["class"]) == m.classes.index(meta["path"].split("/")[0])
        src_bytes = (mixed_folder / meta["path"]).read_bytes()
        assert meta["size"] == list(__import__("PIL.Image").Image.open(mixed_folder / meta["path"]).size)
        if mode == "raw":
            field = "png" if meta["path"].endswith(".png") else "jpg"
            assert set(s) == {"__key__", "cls", "json", field} and s[field] == src_bytes
        elif mode == "resize":
            assert set(s) == {"__key__", "cls", "json", "jpg"}
            assert s["jpg"][:2] == b"\xff\xd8"
        else:
            arr = np.load(__import__("io").BytesIO(s["npy"]), allow_pickle=False)
            assert arr.shape == (24, 24, 3) and arr.dtype == np.uint8
    if mode == "tensor":
        assert m.tensor == {"dtype": "|u1", "layout": "HWC", "ndim": 3}
    assert {k: m.options[k] for k in ("mode", "size", "seed", "shuffle")} == \
        {"mode": mode, "size": MODES[mode], "seed": 0, "shuffle": True}


@pytest.mark.parametrize("fmt", ["npy", "pt"])
def test_preprocessed_array_folder_becomes_tensor_shards(tmp_path, fmt):
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    arrays = {}
    for c in ("a", "b"):
        for i in range(5):
            arr = rng.random((3, 6, 5)).astype(np.float32)
            path = src / c / f"{i}.{fmt}"
            path.parent.mkdir(parents=True, exist_ok=True)
            if fmt == "npy":
                np.save(path, arr)
            else:
                torch.save(torch.from_numpy(arr), path)
            arrays[f"{c}/{i}.{fmt}"] = arr
    m = pack(src, tmp_path / "out", mode="raw")
    assert m.options["mode"] == "tensor" and m.num_samples == 10
    assert m.tensor == {"dtype": "<f4", "layout": "CHW", "ndim": 3}
    for s in dataset_samples(tmp_path / "out"):
        path = json.loads(s["json"])["path"]
        np.testing.assert_array_equal(np.load(__import__("io").BytesIO(s["npy"]), allow_pickle=False),
                                      arrays[path])


def test_arrays_of_different_dtype_are_refused_or_skipped(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        np.save(src / f"{i}.npy", np.zeros((4, 4, 3), np.uint8 if i != 2 else np.float32))
    with pytest.raises(SourceError, match="2.npy"):
        pack(src, tmp_path / "a", shuffle=False)
    m = pack(src, tmp_path / "b", shuffle=False, on_error="skip")
    assert m.num_samples == 3 and [s["path"] for s in m.skipped] == ["2.npy"]


@pytest.mark.parametrize("case", ["pt_dict", "npy_object"])
def test_non_plain_array_files_fail_the_pack(tmp_path, case):
    src = tmp_path / "src"
    src.mkdir()
    np.save(src / "ok.npy", np.zeros((4, 4, 3), np.uint8))
    if case == "pt_dict":
        torch.save({"x": torch.zeros(2)}, src / "bad.pt")
        src_ok = src / "ok.pt"
        torch.save(torch.zeros(4, 4, 3, dtype=torch.uint8), src_ok)
        (src / "ok.npy").unlink()
    else:
        np.save(src / "bad.npy", np.array([None, {}], dtype=object), allow_pickle=True)
    with pytest.raises(SourceError, match="bad"):
        pack(src, tmp_path / "out")
    assert not (tmp_path / "out" / MANIFEST_PATH).exists()


# --------------------------------------------------------------------------- format


@pytest.fixture(scope="module")
def packed(mixed_folder, tmp_path_factory):
    out = {}
    for mode, size in MODES.items():
        dest = tmp_path_factory.mktemp(f"packed-{mode}")
        out[mode] = (pack(mixed_folder, dest, mode=mode, size=size, max_samples=4), dest)
    return out


@pytest.mark.parametrize("mode", list(MODES))
def test_gnu_tar_lists_and_extracts_every_shard(packed, tmp_path, mode):
    m, dest = packed[mode]
    assert len(m.shards) == 5
    for shard in m.shards:
        path = dest / shard.url
        listed = subprocess.run(["/usr/bin/tar", "tf", str(path)], capture_output=True, text=True)
        assert listed.returncode == 0 and listed.stderr == ""
        names = [n for n, _ in tar_members(path)]
        assert listed.stdout.splitlines() == names
        target = tmp_path / shard.url
        target.mkdir()
        done = subprocess.run(["/usr/bin/tar", "xf", str(path), "-C", str(target)], capture_output=True)
        assert done.returncode == 0 and done.stderr == b""
        assert {p.name: p.read_bytes() for p in target.iterdir()} == dict(tar_members(path))


@pytest.mark.parametrize("mode", list(MODES))
def test_webdataset_reads_every_shard(packed, mode):
    import webdataset as wds

    m, dest = packed[mode]
    urls = [str(dest / s.url) for s in m.shards]
    got = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(got) == m.num_samples
    image = {"raw": {"jpg", "png"}, "resize": {"jpg"}, "tensor": {"npy"}}[mode]
    for s in got:
        fields = set(s) - {"__key__", "__url__", "__local_path__"}
        assert len(fields & image) == 1 and {"cls", "json"} <= fields and len(fields) == 3
    assert len({s["__key__"] for s in got}) == m.num_samples
    per_shard = [sum(1 for s in got if s["__url__"] == u) for u in urls]
    assert per_shard == [s.num_samples for s in m.shards]


def test_hugging_face_datasets_reads_shards_offline(packed, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    m, dest = packed["resize"]
    files = [str(dest / s.url) for s in m.shards]
    ds = datasets.load_dataset("webdataset", data_files={"train": files}, split="train",
                               cache_dir=str(tmp_path / "hf-cache"))
    assert len(ds) == m.num_samples
    row = ds[0]
    assert row["jpg"].size[1] == 32 or row["jpg"].size[0] == 32
    assert m.classes[row["cls"]] == row["json"]["class"]


def test_keys_unique_stable_dot_free_for_tricky_names(tmp_path):
    src = tmp_path / "src"
    names = ["a.jpg", "a.png", "a.b.c.jpg", "my photo.jpg", "café.jpg", "日本語.jpg", "x.y z.jpeg"]
    for i, name in enumerate(names):
        data = png_bytes(photo(seed=i)) if name.endswith("png") else jpeg_bytes(photo(seed=i))
        write(src / "c.1" / name, data)
        write(src / "ü 2" / name, data)
    m1 = pack(src, tmp_path / "one")
    shutil.copytree(src, tmp_path / "copy")
    pack(tmp_path / "copy", tmp_path / "two", workers=2)
    s1, s2 = dataset_samples(tmp_path / "one"), dataset_samples(tmp_path / "two")
    keys = [s["__key__"] for s in s1]
    assert len(keys) == len(set(keys)) == 2 * len(names) == m1.num_samples
    assert all("." not in k and k.isascii() for k in keys)
    assert keys == [s["__key__"] for s in s2]
    paths = sorted(json.loads(s["json"])["path"] for s in s1)
    assert paths == sorted(f"{c}/{n}" for c in ("c.1", "ü 2") for n in names)
    assert all_files(tmp_path / "one") == all_files(tmp_path / "two")


# --------------------------------------------------------------------------- shard size


@pytest.mark.parametrize("text,expect", [
    ("256MB", 256_000_000), ("1GiB", 2**30), ("1.5 GB", 1_500_000_000), ("64KiB", 65536),
    ("100000", 100_000), (100_000, 100_000), ("5kb", 5000),
])
def test_parse_bytes(text, expect):
    assert parse_bytes(text) == expect


@pytest.mark.parametrize("bad", ["", "MB", "12 parsecs", "-5MB", "1e9", "10", 100, True, "4095"])
def test_parse_bytes_rejects(bad):
    with pytest.raises(ValueError):
        parse_bytes(bad)


def test_max_bytes_is_never_exceeded_and_shards_are_filled(mixed_folder, tmp_path):
    limit = 16384
    m = pack(mixed_folder, tmp_path / "out", max_bytes=limit)
    assert len(m.shards) > 3
    sizes = [os.path.getsize(tmp_path / "out" / s.url) for s in m.shards]
    assert sizes == [s.num_bytes for s in m.shards]
    assert max(sizes) <= limit
    # greedy: the next shard's first sample would not have fitted
    idx = {s.url: np.frombuffer((tmp_path / "out" / s.index_url).read_bytes()[8:], "<u8") for s in m.shards}
    for a, b in zip(m.shards, m.shards[1:]):
        first_b = int(idx[b.url][1] - idx[b.url][0])
        assert a.num_bytes + first_b > limit


def test_sample_larger_than_max_bytes_gets_its_own_shard_with_a_warning(tmp_path):
    src = make_class_folder(tmp_path / "src", per_class=4)
    noise = np.random.default_rng(0).integers(0, 256, (120, 120, 3), np.uint8)
    write(src / "dog" / "huge.png", png_bytes(__import__("PIL.Image").Image.fromarray(noise)))
    limit = 16384
    with pytest.warns(UserWarning, match=r"dog/huge\.png.*max_bytes"):
        m = pack(src, tmp_path / "out", max_bytes=limit)
    big = [s for s in m.shards if s.num_bytes > limit]
    assert len(big) == 1 and big[0].num_samples == 1
    assert "huge" in samples_of(tmp_path / "out" / big[0].url)[0]["__key__"]
    assert m.num_samples == 13


def test_max_samples_is_never_exceeded(mixed_folder, tmp_path):
    m = pack(mixed_folder, tmp_path / "out", max_samples=4)
    assert [s.num_samples for s in m.shards] == [4, 4, 4, 4, 3]
    for s in m.shards:
        assert len(samples_of(tmp_path / "out" / s.url)) == s.num_samples


# --------------------------------------------------------------------------- reproducible


@pytest.mark.parametrize("mode", list(MODES))
def test_byte_identical_for_any_worker_count_and_run(mixed_folder, tmp_path, mode):
    kw = dict(mode=mode, size=MODES[mode], max_samples=5)
    pack(mixed_folder, tmp_path / "w1", workers=1, **kw)
    pack(mixed_folder, tmp_path / "w4", workers=4, **kw)
    pack(mixed_folder, tmp_path / "again" / "w1", workers=1, **kw)
    ref = all_files(tmp_path / "w1")
    assert len(ref) == 2 * 4 + 1
    assert all_files(tmp_path / "w4") == ref
    assert all_files(tmp_path / "again" / "w1") == ref


def test_byte_identical_for_arrays(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(9):
        np.save(src / f"{i}.npy", np.full((4, 4, 3), i, np.uint8))
    pack(src, tmp_path / "w1", workers=1, max_samples=2)
    pack(src, tmp_path / "w4", workers=4, max_samples=2)
    assert all_files(tmp_path / "w1") == all_files(tmp_path / "w4")


def test_options_change_the_bytes(mixed_folder, tmp_path):
    a = all_files(Path(pack(mixed_folder, tmp_path / "a", seed=0).base_url))
    b = all_files(Path(pack(mixed_folder, tmp_path / "b", seed=1).base_url))
    assert a["shard-000000.tar"] != b["shard-000000.tar"]


# --------------------------------------------------------------------------- mixed shards


def _tail_probability(count: int, total: int, in_class: int, drawn: int) -> float:
    """min(P[X <= count], P[X >= count]) for X ~ Hypergeometric(total, in_class, drawn)."""
    pmf = [comb(in_class, k) * comb(total - in_class, drawn - k) / comb(total, drawn)
           for k in range(drawn + 1)]
    return min(sum(pmf[: count + 1]), sum(pmf[count:]))


@pytest.fixture(scope="module")
def sorted_classes(tmp_path_factory):
    root = tmp_path_factory.mktemp("sorted") / "src"
    data = jpeg_bytes(photo(16, 16))  # content does not matter here, only labels
    for c in range(4):
        for i in range(60):
            write(root / f"c{c}" / f"{i:03d}.jpg", data)
    return root


def test_pack_time_shuffle_mixes_classes_in_every_shard(sorted_classes, tmp_path):
    # 240 samples, 4 classes of 60, shards of 60. Under a uniform shuffle a shard's count of one
    # class is hypergeometric; demand every count be no rarer than 1e-9 in either tail. Union bound
    # over 5 seeds x 4 shards x 4 classes: a correct shuffle fails with probability < 1e-7.
    orders = set()
    for seed in range(5):
        m = pack(sorted_classes, tmp_path / f"s{seed}", seed=seed, max_samples=60)
        labels = [[int(s["cls"]) for s in samples_of(tmp_path / f"s{seed}" / sh.url)] for sh in m.shards]
        assert [len(x) for x in labels] == [60] * 4
        for shard in labels:
            for c in range(4):
                assert _tail_probability(shard.count(c), 240, 60, 60) > 1e-9, (seed, shard)
        orders.add(tuple(map(tuple, labels)))
    assert len(orders) == 5  # the seed decides the order


def test_no_shuffle_keeps_sorted_order_and_one_class_shards(sorted_classes, tmp_path):
    m = pack(sorted_classes, tmp_path / "out", shuffle=False, max_samples=60)
    samples = dataset_samples(tmp_path / "out")
    assert [json.loads(s["json"])["path"] for s in samples] == \
        [f"c{c}/{i:03d}.jpg" for c in range(4) for i in range(60)]
    for c, sh in enumerate(m.shards):
        labels = [int(s["cls"]) for s in samples_of(tmp_path / "out" / sh.url)]
        assert labels == [c] * 60
        assert _tail_probability(60, 240, 60, 60) < 1e-9  # what the shuffled test would reject


# --------------------------------------------------------------------------- atomic + resume


class _Crash(BaseException):
    """Stands in for SIGKILL: nothing catches it."""


def test_manifest_is_written_last(mixed_folder, tmp_path, monkeypatch):
    order = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (order.append(Path(b).name), real(a, b)))
    pack(mixed_folder, tmp_path / "out", max_samples=4)
    assert order[-1] == MANIFEST_NAME and order.count(MANIFEST_NAME) == 1
    assert [n for n in order if n.endswith(".tar")] == [f"shard-{i:06d}.tar" for i in range(5)]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [".shardkit"] + [f"shard-{i:06d}.tar" for i in range(5)])  # nothing but tars beside them
    assert sorted(p.name for p in (tmp_path / "out" / ".shardkit").iterdir()) == sorted(
        [MANIFEST_NAME] + [f"shard-{i:06d}.idx" for i in range(5)])


@pytest.mark.parametrize("where", ["before_tar_rename", "before_journal", "mid_shard"])
def test_resume_after_crash_at_each_step(mixed_folder, tmp_path, monkeypatch, where):
    kw = dict(max_samples=4, mode="resize", size=32)
    ref = all_files(Path(pack(mixed_folder, tmp_path / "ref", **kw).base_url))
    dest = tmp_path / "out"
    real_replace = os.replace
    seen = {"tar": 0}

    def replace(a, b):  # every rename into a final name goes through os.replace
        name = Path(b).name
        if name.endswith(".tar"):
            if where == "before_tar_rename" and seen["tar"] == 2:
                raise _Crash()
            seen["tar"] += 1
        if where == "before_journal" and name == JOURNAL_NAME and seen["tar"] == 3:
            raise _Crash()
        return real_replace(a, b)

    added = {"n": 0}
    real_add = ShardWriter.add

    def add(self, *a, **k):
        added["n"] += 1
        if where == "mid_shard" and added["n"] == 10:
            raise _Crash()
        return real_add(self, *a, **k)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(ShardWriter, "add", add)
    with pytest.raises(_Crash):
        pack(mixed_folder, dest, **kw)
    monkeypatch.undo()
    assert not (dest / MANIFEST_PATH).exists()
    assert check_interrupted(dest) == (3 if where == "before_journal" else 2)
    with pytest.raises(DestinationError, match="resume"):
        pack(mixed_folder, dest, **kw)
    m = pack(mixed_folder, dest, resume=True, workers=2, **kw)
    assert m.stats["resumed_shards"] == 2
    assert all_files(dest) == ref


def test_kill_before_the_manifest_is_published_resumes_to_the_same_files(mixed_folder, tmp_path,
                                                                          monkeypatch):
    """The finished manifest replaces the journal, then is renamed: a kill between the two
    leaves the journal only (never both), and --resume publishes it without packing again."""
    kw = dict(max_samples=4)
    ref_m = pack(mixed_folder, tmp_path / "ref", **kw)
    ref = all_files(Path(ref_m.base_url))
    dest = tmp_path / "out"
    real_replace = os.replace

    def replace(a, b):
        if Path(b).name == MANIFEST_NAME:
            raise _Crash()
        return real_replace(a, b)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(_Crash):
        pack(mixed_folder, dest, **kw)
    monkeypatch.undo()
    assert not (dest / MANIFEST_PATH).exists()
    assert json.loads((dest / JOURNAL_NAME).read_bytes())["format"] == "shardkit"
    encoded = []
    monkeypatch.setattr(pool, "_encode_chunk", lambda *a: encoded.append(a) or [])
    m = pack(mixed_folder, dest, resume=True, **kw)
    assert not encoded  # nothing packed again
    assert m == ref_m and m.stats["resumed_shards"] == len(ref_m.shards) == 5
    assert all_files(dest) == ref


def test_resume_of_a_complete_pack_removes_a_stale_journal(mixed_folder, tmp_path):
    """An object store cannot rename: a kill between its manifest and the journal's removal
    leaves both; --resume keeps the dataset and removes the journal."""
    kw = dict(max_samples=4)
    ref = all_files(Path(pack(mixed_folder, tmp_path / "ref", **kw).base_url))
    dest = tmp_path / "out"
    pack(mixed_folder, dest, **kw)
    (dest / JOURNAL_NAME).write_bytes(b'{"fingerprint": "x", "shards": []}')
    m = pack(mixed_folder, dest, resume=True, **kw)
    assert m.stats["resumed_shards"] == 5
    assert all_files(dest) == ref


def test_resume_redoes_a_damaged_shard(mixed_folder, tmp_path, monkeypatch):
    kw = dict(max_samples=4)
    ref = all_files(Path(pack(mixed_folder, tmp_path / "ref", **kw).base_url))
    dest = tmp_path / "out"
    real = ShardWriter._close_shard
    monkeypatch.setattr(ShardWriter, "_close_shard",
                        lambda self, consumed: (real(self, consumed),
                                                len(self.shards) == 4 and (_ for _ in ()).throw(_Crash())))
    with pytest.raises(_Crash):
        pack(mixed_folder, dest, **kw)
    monkeypatch.undo()
    shard1 = dest / "shard-000001.tar"
    shard1.write_bytes(shard1.read_bytes()[:-700])  # truncated behind our back
    m = pack(mixed_folder, dest, resume=True, **kw)
    assert m.stats["resumed_shards"] == 1
    assert all_files(dest) == ref


def test_resume_with_other_options_or_files_is_refused(mixed_folder, tmp_path, monkeypatch):
    src = tmp_path / "src"
    shutil.copytree(mixed_folder, src)
    dest = tmp_path / "out"
    monkeypatch.setattr(ShardWriter, "finish", lambda self, total: (_ for _ in ()).throw(_Crash()))
    with pytest.raises(_Crash):
        pack(src, dest, max_samples=4)
    monkeypatch.undo()
    for kw in (dict(max_samples=5), dict(max_samples=4, seed=3), dict(max_samples=4, mode="resize", size=32),
               dict(max_samples=4, shuffle=False)):
        with pytest.raises(DestinationError, match="different"):
            pack(src, dest, resume=True, **kw)
    write(src / "cat" / "new.jpg", jpeg_bytes(photo(seed=999)))
    with pytest.raises(DestinationError, match="different"):
        pack(src, dest, resume=True, max_samples=4)
    (src / "cat" / "new.jpg").unlink()
    (src / "cat" / "img_000.jpg").write_bytes(jpeg_bytes(photo(seed=998), quality=50))
    with pytest.raises(DestinationError, match="different"):
        pack(src, dest, resume=True, max_samples=4)
    m = pack(src, dest, overwrite=True, max_samples=4)
    assert m.num_samples == 19 and not (dest / JOURNAL_NAME).exists()


def test_destination_with_another_dataset(mixed_folder, class_folder, tmp_path):
    dest = tmp_path / "out"
    pack(class_folder, dest, max_samples=2)  # 12 shards
    before = all_files(dest)
    for kw in ({}, {"resume": True}):
        with pytest.raises(DestinationError, match="different dataset"):
            pack(mixed_folder, dest, max_samples=4, **kw)
    assert all_files(dest) == before  # untouched
    m = pack(mixed_folder, dest, max_samples=4, overwrite=True)
    fresh = all_files(Path(pack(mixed_folder, tmp_path / "fresh", max_samples=4).base_url))
    assert all_files(dest) == fresh and len(m.shards) == 5  # no stale shards left behind
    # resuming a finished pack of the same data is a no-op
    again = pack(mixed_folder, dest, max_samples=4, resume=True)
    assert again.num_samples == 19 and all_files(dest) == fresh


def test_destination_that_is_a_file(mixed_folder, tmp_path):
    (tmp_path / "out").write_bytes(b"x")
    with pytest.raises(DestinationError):
        pack(mixed_folder, tmp_path / "out")


# --------------------------------------------------------------------------- bad input


def _setup_bad(root: Path, case: str) -> tuple[str, str]:
    """Make one bad thing in ``root`` (a class folder). Returns (relative path, reason part)."""
    good = jpeg_bytes(photo(64, 48, seed=5))
    if case == "truncated_jpeg":
        write(root / "dog" / "bad.jpg", good[: len(good) // 2])
        return "dog/bad.jpg", "truncated"
    if case == "corrupt_bytes":
        write(root / "dog" / "bad.jpg", good[:2] + np.random.default_rng(0).bytes(3000))
        return "dog/bad.jpg", "not a readable image"
    if case == "zero_bytes":
        write(root / "dog" / "bad.jpg", b"")
        return "dog/bad.jpg", "empty"
    if case == "png_named_jpg":
        write(root / "dog" / "bad.jpg", png_bytes(photo()))
        return "dog/bad.jpg", "content is PNG"
    if case == "bomb_header":
        write(root / "dog" / "bad.png", png_with_size(png_bytes(photo()), 20000, 20000))
        return "dog/bad.png", "decompression bomb"
    if case == "dangling_symlink":
        (root / "dog" / "x.jpg").symlink_to(root / "dog" / "gone.jpg")
        return "dog/x.jpg", "unreadable"
    if case == "self_symlink":
        (root / "dog" / "x.jpg").symlink_to("x.jpg")
        return "dog/x.jpg", "symbolic links"
    if case == "symlink_loop":
        (root / "dog" / "loop").symlink_to("..")
        return "dog/loop", "symlink loop"
    if case == "empty_class":
        (root / "empty").mkdir()
        return "empty", "empty class folder"
    raise AssertionError(case)


BAD_CASES = ["truncated_jpeg", "corrupt_bytes", "zero_bytes", "png_named_jpg", "bomb_header",
             "dangling_symlink", "self_symlink", "symlink_loop", "empty_class"]


@pytest.mark.parametrize("case", BAD_CASES)
@pytest.mark.parametrize("mode", ["raw", "resize"])
def test_bad_input_raises_by_default_and_is_skipped_on_request(tmp_path, case, mode):
    src = make_class_folder(tmp_path / "src", per_class=3)
    write(src / "cat" / "notes.txt", b"ignored, never fatal")
    rel, reason = _setup_bad(src, case)
    size = 32 if mode == "resize" else None
    with pytest.raises(SourceError) as info:
        pack(src, tmp_path / "a", mode=mode, size=size)
    assert rel in str(info.value) and reason.lower() in str(info.value).lower()
    assert not (tmp_path / "a" / MANIFEST_PATH).exists()
    m = pack(src, tmp_path / "b", mode=mode, size=size, on_error="skip")
    assert m.num_samples == 9 and m.ignored == 1
    assert len(m.skipped) == 1 and m.skipped[0]["path"] == rel
    assert reason.lower() in m.skipped[0]["reason"].lower()
    assert Manifest.load(tmp_path / "b").skipped == m.skipped


@pytest.mark.parametrize("mode", ["raw", "resize"])
def test_folders_named_like_images_are_packed_like_imagefolder_reads_them(tmp_path, mode):
    from shardkit import StreamingDataset, make_loader

    src = make_class_folder(tmp_path / "src", per_class=2)
    write(src / "cat" / "directory.jpg" / "inner.jpg", jpeg_bytes(photo(seed=7)))
    size = 32 if mode == "resize" else None
    m = pack(src, tmp_path / "out", mode=mode, size=size)  # on_error="raise": nothing is bad
    assert m.num_samples == 7 and m.skipped == []
    items = list(make_loader(StreamingDataset(tmp_path / "out", decode="raw", with_keys=True),
                             num_workers=2))
    by_key = {k: int(y) for _, y, k in items}
    paths = {json.loads(s["json"])["path"]: s["__key__"] for s in dataset_samples(tmp_path / "out")}
    assert by_key[paths["cat/directory.jpg/inner.jpg"]] == m.classes.index("cat")
    assert len(by_key) == 7


def test_pixel_limit_via_pack(tmp_path):
    src = make_class_folder(tmp_path / "src", per_class=2)
    write(src / "dog" / "big.jpg", jpeg_bytes(photo(200, 200)))
    with pytest.raises(SourceError, match=r"dog/big\.jpg.*pixels"):
        pack(src, tmp_path / "a", max_pixels=100 * 100)
    m = pack(src, tmp_path / "b", max_pixels=100 * 100, on_error="skip")
    assert [s["path"] for s in m.skipped] == ["dog/big.jpg"] and m.num_samples == 6


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_chmod_000(tmp_path):
    src = make_class_folder(tmp_path / "src", per_class=2)
    bad = src / "dog" / "img_000.jpg"
    bad.chmod(0)
    try:
        with pytest.raises(SourceError, match="img_000.jpg"):
            pack(src, tmp_path / "a")
        m = pack(src, tmp_path / "b", on_error="skip")
        assert [s["path"] for s in m.skipped] == ["dog/img_000.jpg"]
    finally:
        bad.chmod(0o644)


@pytest.mark.parametrize("case", ["missing", "empty"])
@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_missing_or_empty_source_always_fails(tmp_path, case, on_error):
    src = tmp_path / "src"
    if case == "empty":
        src.mkdir()
    with pytest.raises(SourceError, match="src"):
        pack(src, tmp_path / "out", on_error=on_error)
    assert not (tmp_path / "out" / MANIFEST_PATH).exists()


@pytest.mark.parametrize("kw,name", [
    (dict(mode="zip"), "mode"), (dict(mode="resize"), "size"), (dict(on_error="ignore"), "on_error"),
    (dict(quality=0), "quality"), (dict(max_samples=0), "max_samples"), (dict(max_bytes="lots"), "max_bytes"),
])
def test_bad_options_name_the_argument(class_folder, tmp_path, kw, name):
    with pytest.raises(ValueError, match=name):
        pack(class_folder, tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()
