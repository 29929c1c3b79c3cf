"""Compressed shards (``.tar.gz`` / ``.tgz``, :mod:`shardkit.gzipped`): indexed and read as
webdataset reads them, and gzip data named ``.tar`` refused wherever it is met with a message
that names the file, says it is gzip and what to do.

Shards are generated here with :mod:`tarfile` and :mod:`gzip`; images are random bytes named
``.jpg`` (read with ``decode="raw"``: nothing decodes them).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import tarfile
import tracemalloc
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from test_indexer import read  # one epoch's raw items, keys last

import shardkit
from shardkit import Manifest, ShardError, StreamingDataset, index_shards, make_loader
from shardkit.cli import main as cli_main
from shardkit.shardformat import MANIFEST_PATH, decode_index, index_name

PER_SHARD = 12
LOADER_TIMEOUT = 60


def _tar(samples: list[tuple[str, bytes, int]], *, tail: bytes = b"") -> bytes:
    """A plain tar of ``(key, image, label)`` samples (``key.jpg``, ``key.cls``)."""
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, image, label in samples:
            for name, data in ((f"{key}.jpg", image), (f"{key}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return bio.getvalue() + tail


def _samples(shard: int, n: int = PER_SHARD) -> list[tuple[str, bytes, int]]:
    rng = np.random.default_rng(shard)
    return [(f"s{shard}-{i:03d}", rng.integers(0, 256, int(rng.integers(2000, 9000)),
                                               dtype=np.uint8).tobytes(), (shard + i) % 3)
            for i in range(n)]


def write_gz_folder(folder: Path, shards: int = 4, suffix: str = ".tar.gz") -> dict[str, dict]:
    """``shards`` gzip-compressed shards in ``folder``; returns what each key holds."""
    folder.mkdir(parents=True, exist_ok=True)
    want = {}
    for s in range(shards):
        samples = _samples(s)
        (folder / f"train-{s:06d}{suffix}").write_bytes(gzip.compress(_tar(samples)))
        want.update({k: {"image": img, "label": lab} for k, img, lab in samples})
    return want


def epoch_items(source, num_workers: int = 0, **kw) -> list[tuple]:
    kw.setdefault("seed", 5)
    return read(source, num_workers, **kw)


def check_once(items, want: dict) -> None:
    keys = [it[-1] for it in items]
    dup = {k: n for k, n in Counter(keys).items() if n > 1}
    assert not dup and set(keys) == set(want), (dup, set(want) - set(keys))
    for it in items:
        assert bytes(it[0]) == want[it[-1]]["image"]
        assert int(it[1]) == want[it[-1]]["label"]


def assert_gzip_message(text: str, path: Path) -> None:
    """The message names the file, says gzip, and says what to do."""
    assert str(path) in text, text
    assert "gzip-compressed" in text, text
    assert f"rename it to {path.name}.gz" in text and "gunzip" in text, text


@pytest.fixture(scope="module")
def gz_folder(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("gz") / "shards"
    want = write_gz_folder(folder)
    index_shards(folder, progress=False)
    return folder, want


# --------------------------------------------------------------------------- gzip named .tar


@pytest.fixture
def gzip_named_tar(tmp_path) -> Path:
    folder = tmp_path / "s"
    folder.mkdir()
    path = folder / "a-000000.tar"
    path.write_bytes(gzip.compress(_tar(_samples(0))))
    return path


def test_index_says_a_gzip_file_named_tar_is_gzip_and_what_to_do(gzip_named_tar, capsys):
    for source in (gzip_named_tar.parent, gzip_named_tar, [gzip_named_tar]):
        with pytest.raises(ShardError) as info:
            index_shards(source, progress=False)
        assert_gzip_message(str(info.value), gzip_named_tar)
    assert cli_main(["index", str(gzip_named_tar.parent)]) != 0
    assert_gzip_message(capsys.readouterr().err, gzip_named_tar)
    assert not (gzip_named_tar.parent / MANIFEST_PATH).exists()


def test_a_shard_list_naming_a_gzip_file_named_tar_says_so(gzip_named_tar):
    with pytest.raises(ShardError) as info:
        Manifest.from_urls([str(gzip_named_tar)])
    assert_gzip_message(str(info.value), gzip_named_tar)
    for source in ([str(gzip_named_tar)], str(gzip_named_tar)):
        with pytest.raises(ShardError) as info:
            next(iter(StreamingDataset(source, decode="raw")))
        assert_gzip_message(str(info.value), gzip_named_tar)


def test_the_reader_says_a_shard_gzipped_after_indexing_is_gzip_and_what_to_do(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    for s in range(2):
        (folder / f"a-{s:06d}.tar").write_bytes(_tar(_samples(s)))
    index_shards(folder, progress=False)
    bad = folder / "a-000001.tar"
    bad.write_bytes(gzip.compress(bad.read_bytes()))
    for num_workers in (0, 2):
        with pytest.raises((ShardError, RuntimeError)) as info:
            epoch_items(folder, num_workers=num_workers, on_error="raise")
        assert_gzip_message(str(info.value), bad)
    ds = StreamingDataset(folder, decode="raw", with_keys=True, on_error="skip")
    keys = {it[-1] for it in ds}
    assert keys == {k for k, _, _ in _samples(0)}
    assert [b["url"] for b in ds.bad_shards] == [str(bad)]
    reason = ds.bad_shards[0]["reason"]  # (the reason alone, cut at 200 characters)
    assert reason.startswith("not a tar archive (gzip-compressed data named .tar): rename it "
                             f"to {bad.name}.gz"), reason


def test_a_folder_without_shards_names_every_kind_it_looked_for(tmp_path):
    (tmp_path / "notes.txt").write_text("no shards here")
    with pytest.raises(ShardError, match=r"no \.tar, \.tar\.gz or \.tgz shards found"):
        index_shards(tmp_path, progress=False)


# --------------------------------------------------------------------------- indexing


@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
def test_compressed_shards_are_indexed_in_place(tmp_path, algorithm):
    folder = tmp_path / "gz"
    want = write_gz_folder(folder, shards=3)
    m = index_shards(folder, progress=False, hash=algorithm)
    assert m.num_samples == len(want) == 3 * PER_SHARD and m.compressed
    plain = tmp_path / "plain"
    plain.mkdir()
    for s in range(3):
        (plain / f"train-{s:06d}.tar").write_bytes(gzip.decompress(
            (folder / f"train-{s:06d}.tar.gz").read_bytes()))
    index_shards(plain, progress=False)
    for s, shard in enumerate(m.shards):
        stored = (folder / shard.url).read_bytes()
        # the file as stored: its size and digest (what the cache and verify check) ...
        assert shard.url == f"train-{s:06d}.tar.gz"
        assert shard.num_bytes == len(stored)
        import blake3

        made = blake3.blake3 if algorithm == "blake3" else hashlib.sha256
        assert shard.digest == (algorithm, made(stored).hexdigest())
        # ... and the offsets of its uncompressed stream: those of the same tar uncompressed
        assert shard.index_url == index_name(shard.url) == f".shardkit/train-{s:06d}.tar.gz.idx"
        index = (folder / shard.index_url).read_bytes()
        assert index == (plain / index_name(f"train-{s:06d}.tar")).read_bytes()
        offsets = decode_index(index, shard.num_samples, shard.num_bytes, shard.index_url,
                               compressed=True)
        assert offsets[-1] > len(stored) * 0.9  # random bytes: no smaller compressed
    assert shardkit.verify(folder).ok


def test_tgz_brace_patterns_and_lists_are_indexed_and_read(tmp_path):
    folder = tmp_path / "tgz"
    want = write_gz_folder(folder, shards=3, suffix=".tgz")
    pattern = str(folder / "train-{000000..000002}.tgz")
    assert index_shards(pattern, tmp_path / "out", progress=False).num_samples == len(want)
    check_once(epoch_items(tmp_path / "out"), want)
    listed = [str(folder / f"train-{s:06d}.tgz") for s in (0, 2)]
    m = index_shards(listed, progress=False)
    assert [s.url for s in m.shards] == ["train-000000.tgz", "train-000002.tgz"]
    # the shards as a list of their own (index files beside them): sizes as stored
    m = Manifest.from_urls(listed)
    assert [s.num_bytes for s in m.shards] == [Path(u).stat().st_size for u in listed]
    got = epoch_items(listed)
    check_once(got, {k: v for k, v in want.items() if not k.startswith("s1-")})
    index_shards(pattern, progress=False)  # in place: the pattern reads as a shard list too
    check_once(epoch_items(pattern), want)


def test_a_gzip_bomb_after_the_archive_is_refused_in_bounded_memory(tmp_path):
    folder = tmp_path / "bomb"
    folder.mkdir()
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    blob = comp.compress(_tar(_samples(0, 2)))
    zeros = bytes(1 << 20)
    for _ in range(200):  # 200 MiB of zeros after the archive's end: ~200 KB compressed
        blob += comp.compress(zeros)
    blob += comp.flush()
    (folder / "x.tar.gz").write_bytes(blob)
    tracemalloc.start()
    try:
        with pytest.raises(ShardError, match=r"x\.tar\.gz: more than .* after the archive's end"):
            index_shards(folder, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 << 20, peak  # buffers of a few MiB, never the 200 MiB


# --------------------------------------------------------------------------- reading


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_key_read_once_per_epoch_bytes_equal(gz_folder, num_workers):
    folder, want = gz_folder
    orders = []
    for epoch in range(2):
        ds = StreamingDataset(folder, decode="raw", with_keys=True, shuffle=True, seed=5)
        ds.set_epoch(epoch)
        if num_workers:
            items = list(make_loader(ds, num_workers=num_workers, persistent_workers=False,
                                     timeout=LOADER_TIMEOUT))
        else:
            items = list(ds)
        check_once(items, want)
        orders.append([it[-1] for it in items])
    assert orders[0] != orders[1]  # shuffled, differently each epoch


def test_two_ranks_and_small_blocks_read_every_key_once(gz_folder):
    folder, want = gz_folder
    for block_size in (None, 5):  # whole shards (the default), or spans inside shards
        keys: list[str] = []
        for rank in range(2):
            items = epoch_items(folder, block_size=block_size, rank=rank, world_size=2)
            keys += [it[-1] for it in items]
        assert sorted(keys) == sorted(want)


def test_in_memory_and_compact_manifests_read_compressed_shards(gz_folder, tmp_path):
    folder, want = gz_folder
    check_once(epoch_items(folder, in_memory=True), want)
    import shutil

    copy = tmp_path / "compact"
    shutil.copytree(folder, copy)
    m = Manifest.load(copy)
    for name, blob in m.files(compact=True):  # manifest.cols, then the JSON naming it
        (copy / name).write_bytes(blob)
    assert json.loads((copy / MANIFEST_PATH).read_text())["shards"]["columns"]
    loaded = Manifest.load(copy)
    assert loaded.compressed and [s.url for s in loaded.shards] == [s.url for s in m.shards]
    check_once(epoch_items(copy, block_size=4), want)


def _damaged(tmp_path, gz_folder, how: str) -> tuple[Path, Path, set[str], int]:
    """A copy of the folder whose shard 2 is cut in the middle or has a wrong CRC: (folder,
    shard, keys intact of it, its sample count)."""
    import shutil

    folder, _ = gz_folder
    copy = tmp_path / "damaged"
    shutil.copytree(folder, copy)
    bad = copy / "train-000002.tar.gz"
    data = bytearray(bad.read_bytes())
    shard = Manifest.load(copy).shards[2]
    if how == "truncated":  # the samples that decompress before the cut: read; the others lost
        data = data[:len(data) // 2]
        good = len(zlib.decompressobj(31).decompress(bytes(data)))
        offsets = decode_index((copy / shard.index_url).read_bytes(), shard.num_samples,
                               shard.num_bytes, "idx", compressed=True)
        intact = int(np.sum(offsets[1:] <= good))
    else:  # found at the end of the data: the last sample lost (the others were handed on)
        data[-8] ^= 0xFF
        intact = shard.num_samples - 1
    bad.write_bytes(bytes(data))
    keys = {k for k, _, _ in _samples(2)[:intact]}
    return copy, bad, keys, shard.num_samples


@pytest.mark.parametrize("how", ["truncated", "crc"])
def test_a_damaged_compressed_shard_raises_naming_it(tmp_path, gz_folder, how):
    copy, bad, _, _ = _damaged(tmp_path, gz_folder, how)
    for num_workers in (0, 2):
        with pytest.raises((ShardError, RuntimeError)) as info:
            epoch_items(copy, num_workers=num_workers, on_error="raise")
        text = str(info.value)
        assert str(bad) in text and "gzip data" in text, text
        assert "corrupt or truncated gzip data" in text, text
        if num_workers:  # torch re-raises it as a RuntimeError naming the type
            assert "GzipDataError" in text, text


@pytest.mark.parametrize("how", ["truncated", "crc"])
def test_a_damaged_compressed_shard_in_skip_mode_costs_only_what_cannot_be_read(
        tmp_path, gz_folder, how, caplog):
    _, want = gz_folder
    copy, bad, intact, count = _damaged(tmp_path, gz_folder, how)
    assert 0 < len(intact) < count
    expected = {k for k in want if not k.startswith("s2-")} | intact
    for num_workers in (0, 2):
        ds = StreamingDataset(copy, decode="raw", with_keys=True, on_error="skip", seed=5)
        with caplog.at_level(logging.WARNING, logger="shardkit"):
            items = list(make_loader(ds, num_workers=num_workers, timeout=LOADER_TIMEOUT)
                         if num_workers else ds)
        assert len(items) == len(want)  # bad samples replaced: every rank yields as many
        assert {it[-1] for it in items} == expected
        for it in items:
            assert bytes(it[0]) == want[it[-1]]["image"]
        assert ds.skipped == count - len(intact)
        (listed,) = ds.bad_shards
        assert listed["url"] == str(bad) and listed["first_lost"] == len(intact)
        assert "gzip data" in listed["reason"]
    report = shardkit.verify(copy)
    assert not report.ok and any(url == bad.name for url, _ in report.problems)


def test_map_dataset_reads_compressed_shards_and_finds_their_keys(gz_folder):
    folder, want = gz_folder
    m = shardkit.MapDataset(folder, decode="raw", with_keys=True)
    assert len(m) == len(want)
    order = np.random.default_rng(1).permutation(len(m))
    for i in order:
        image, label, key = m[int(i)]
        assert bytes(image) == want[key]["image"] and label == want[key]["label"]
    for key in list(want)[::7]:
        assert m[m.index_of(key)][-1] == key


def test_a_compressed_sample_larger_than_the_limit_is_refused_not_read_into_memory(
        tmp_path, monkeypatch):
    """Deflate turns a megabyte into a gigabyte, and a sample is read whole: a compressed
    shard's samples are bounded (index time, and again when its index is read)."""
    from shardkit import indexer, shardformat

    folder = tmp_path / "gz"
    folder.mkdir()
    big = [("s0-000", bytes(300_000), 0), ("s0-001", b"small" * 10, 1)]
    (folder / "train-000000.tar.gz").write_bytes(gzip.compress(_tar(big)))
    monkeypatch.setattr(indexer, "SAMPLE_LIMIT", 100_000)
    with pytest.raises(ShardError, match=r"sample 's0-000' holds 301,\d+ bytes uncompressed, "
                                         r"over the limit of 100,000 .*gzip bomb"):
        index_shards(folder, progress=False)
    monkeypatch.setattr(indexer, "SAMPLE_LIMIT", 1 << 30)
    index_shards(folder, progress=False)  # indexed where the limit allows it ...
    monkeypatch.setattr(shardformat, "SAMPLE_LIMIT", 100_000)
    with pytest.raises(ShardError, match="over the limit of 100,000"):  # ... read where it does not
        list(StreamingDataset(folder, decode="raw"))
