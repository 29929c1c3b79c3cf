"""``manifest.cols``: a large manifest's shard list, column-wise, mapped instead of parsed."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

import shardkit
import shardkit.manifest as manifestlib
from shardkit import Manifest, ShardInfo, StreamingDataset, make_loader
from shardkit.bench.scale import synthetic_manifest
from shardkit.cli import main as cli
from shardkit.columns import ShardTable, encode
from shardkit.errors import ManifestError
from shardkit.manifest import compact, write_manifest
from shardkit.shardformat import COLUMNS_PATH, MANIFEST_PATH

from _helpers_read import image_folder, pack


def _write(m: Manifest, folder: Path, compact_form: bool = True) -> Path:
    write_manifest(m, folder, compact=compact_form)
    return folder


def test_round_trip_of_a_synthetic_manifest(tmp_path):
    m = synthetic_manifest(3_000, 3_000_000)
    folder = _write(m, tmp_path)
    ref = json.loads((folder / MANIFEST_PATH).read_text())["shards"]
    assert set(ref) == {"columns", "count", "sha256"} and ref["count"] == 3_000
    got = Manifest.load(folder)
    assert isinstance(got.shards, ShardTable) and len(got.shards) == 3_000
    assert list(got.shards) == m.shards  # every field of every shard
    assert got.shards[-1] == m.shards[-1] and got.shards[5:8] == m.shards[5:8]
    assert np.array_equal(got.shard_sizes(), m.shard_sizes())
    assert got.num_bytes == m.num_bytes and got.num_samples == m.num_samples
    assert got.classes == m.classes and got.options == m.options


def test_urls_without_a_pattern_round_trip(tmp_path):
    names = ["a/b-1.tar", "zz.tar", "naïve dir/日本.tar", "x\udce9y.tar"]  # (one not UTF-8)
    shards = [ShardInfo(u, 2, 4096, "ab" * 32, f".shardkit/{i}.idx", "cd" * 32)
              for i, u in enumerate(names)]
    m = Manifest(classes=["c"], num_samples=8, shards=shards, options={})
    table = ShardTable(encode(shards), ShardInfo)
    assert list(table) == shards
    got = Manifest.load(_write(m, tmp_path))
    assert [s.url for s in got.shards] == names


def test_a_packed_dataset_reads_the_same_compacted(tmp_path):
    src = image_folder(tmp_path / "src", classes=3, per_class=7, size=(8, 8))
    pack(src, tmp_path / "ds", mode="raw", max_samples=4)
    kw = dict(decode="raw", with_keys=True, seed=2)
    before = [(it[1], it[2]) for it in make_loader(StreamingDataset(tmp_path / "ds", **kw),
                                                     num_workers=2)]
    assert cli(["compact", str(tmp_path / "ds")]) == 0
    assert (tmp_path / "ds" / COLUMNS_PATH).exists()
    ds = StreamingDataset(tmp_path / "ds", **kw)
    assert isinstance(ds.manifest.shards, ShardTable)
    after = [(it[1], it[2]) for it in make_loader(ds, num_workers=2)]
    assert after == before
    assert shardkit.verify(tmp_path / "ds").ok
    assert cli(["compact", "--expand", str(tmp_path / "ds")]) == 0
    assert isinstance(Manifest.load(tmp_path / "ds").shards, list)


def test_pack_index_and_merge_write_it_above_the_threshold(tmp_path, monkeypatch):
    monkeypatch.setattr(manifestlib, "COMPACT_SHARDS", 3)
    src = image_folder(tmp_path / "src", classes=2, per_class=5, size=(8, 8))
    m = pack(src, tmp_path / "ds", mode="raw", max_samples=2)
    assert len(m.shards) == 5 and (tmp_path / "ds" / COLUMNS_PATH).exists()
    assert isinstance(Manifest.load(tmp_path / "ds").shards, ShardTable)
    for i in range(2):  # in parts, merged: the merged manifest is compact, the parts' are not
        pack(src, tmp_path / "parts", mode="raw", max_samples=2, part=(i, 2))
    merged = shardkit.merge_parts(tmp_path / "parts", 2)
    assert isinstance(Manifest.load(tmp_path / "parts").shards, ShardTable)
    assert merged.num_samples == 10
    plain = tmp_path / "plain"  # the packed shards as anyone's webdataset shards, indexed
    plain.mkdir()
    for tar in sorted((tmp_path / "ds").glob("*.tar")):
        (plain / tar.name).write_bytes(tar.read_bytes())
    shardkit.index_shards(plain, progress=False)
    indexed = Manifest.load(plain)
    assert isinstance(indexed.shards, ShardTable) and indexed.num_samples == 10
    # below the threshold: one manifest.json, as ever
    monkeypatch.setattr(manifestlib, "COMPACT_SHARDS", 100)
    pack(src, tmp_path / "small", mode="raw", max_samples=2)
    assert not (tmp_path / "small" / COLUMNS_PATH).exists()


@pytest.mark.parametrize("damage,needle", [
    ("flip", "sha256 differs"),
    ("missing", "cannot read the shard list"),
])
def test_a_columns_file_that_does_not_match_is_refused(tmp_path, damage, needle):
    folder = _write(synthetic_manifest(50, 5000), tmp_path)
    cols = folder / COLUMNS_PATH
    if damage == "flip":
        data = bytearray(cols.read_bytes())
        data[-5] ^= 1
        cols.write_bytes(bytes(data))
    else:
        cols.unlink()
    with pytest.raises(ManifestError, match=needle):
        Manifest.load(folder)


def _forged(tmp_path, shards, num_samples=None, data: bytes | None = None) -> Path:
    """A manifest.json naming a columns file that matches it (a stranger's, well formed)."""
    import hashlib

    data = encode(shards) if data is None else data
    m = Manifest(classes=None, num_samples=sum(s.num_samples for s in shards)
                 if num_samples is None else num_samples, shards=shards, options={})
    (tmp_path / ".shardkit").mkdir(parents=True, exist_ok=True)
    (tmp_path / COLUMNS_PATH).write_bytes(data)
    text = json.loads(m.to_json())
    text["shards"] = {"columns": "manifest.cols", "count": len(shards),
                      "sha256": hashlib.sha256(data).hexdigest()}
    (tmp_path / MANIFEST_PATH).write_text(json.dumps(text))
    return tmp_path


@pytest.mark.parametrize("url", ["../etc/passwd", "/abs.tar", "s3://b/x.tar", "a\\b.tar"])
def test_a_columns_file_naming_shards_outside_the_dataset_is_refused(tmp_path, url):
    shards = [ShardInfo(url, 1, 4096, "ab" * 32, ".shardkit/a.idx", "cd" * 32),
              ShardInfo("ok.tar", 1, 4096, "ab" * 32, ".shardkit/b.idx", "cd" * 32)]
    with pytest.raises(ManifestError, match="not a plain relative name"):
        Manifest.load(_forged(tmp_path, shards))


def test_counts_that_no_shard_could_hold_are_refused(tmp_path):
    shards = [ShardInfo("a-000000.tar", 10**6, 4096, "ab" * 32, "a-000000.idx", "cd" * 32)]
    with pytest.raises(ManifestError, match="claims"):
        Manifest.load(_forged(tmp_path, shards))
    shards = [ShardInfo("a-000000.tar", 2, 4096, "ab" * 32, "a-000000.idx", "cd" * 32)]
    with pytest.raises(ManifestError, match="add up"):
        Manifest.load(_forged(tmp_path / "b", shards, num_samples=3))


@pytest.mark.parametrize("cut", [0, 7, 20, -1])
def test_a_malformed_columns_file_is_refused(tmp_path, cut):
    shards = [ShardInfo(f"s{i}.tar", 1, 4096, "ab" * 32, f"s{i}.idx", "cd" * 32)
              for i in range(3)]
    data = encode(shards)
    data = data[:cut] if cut >= 0 else data[:8] + (10**9).to_bytes(8, "little") + data[16:]
    with pytest.raises(ManifestError):
        Manifest.load(_forged(tmp_path, shards, data=data))


def test_a_table_travels_to_spawned_workers(tmp_path):
    folder = _write(synthetic_manifest(40, 4000), tmp_path)
    table = Manifest.load(folder).shards
    again = pickle.loads(pickle.dumps(table))
    assert list(again) == list(table)


def test_a_compact_dataset_loads_from_s3(tmp_path):
    remote = pytest.importorskip("_helpers_remote")
    from servers import MotoS3

    src = image_folder(tmp_path / "src", classes=2, per_class=4, size=(8, 8))
    pack(src, tmp_path / "ds", mode="raw", max_samples=3)
    compact(tmp_path / "ds")
    with MotoS3() as s3:
        s3.make_bucket(remote.BUCKET)
        for p in sorted((tmp_path / "ds").rglob("*")):
            if p.is_file():
                s3.put(remote.BUCKET, f"ds/{p.relative_to(tmp_path / 'ds').as_posix()}",
                       p.read_bytes())
        ds = StreamingDataset(f"s3://{remote.BUCKET}/ds", storage_options=s3.storage_options(),
                              decode="raw", with_keys=True)
        assert isinstance(ds.manifest.shards, ShardTable)
        assert len({it[2] for it in make_loader(ds, num_workers=0)}) == 8


def test_an_index_naming_shards_elsewhere_is_compact_and_signed(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDKIT_INDEX_KEY", "test-key")
    monkeypatch.setattr(manifestlib, "COMPACT_SHARDS", 3)
    src = image_folder(tmp_path / "src", classes=2, per_class=5, size=(8, 8))
    pack(src, tmp_path / "ds", mode="raw", max_samples=2)
    shards = tmp_path / "wds"
    shards.mkdir()
    for tar in sorted((tmp_path / "ds").glob("*.tar")):
        (shards / tar.name).write_bytes(tar.read_bytes())
    m = shardkit.index_shards(shards, tmp_path / "elsewhere", progress=False)
    assert (tmp_path / "elsewhere" / COLUMNS_PATH).exists() and m.external
    text = json.loads((tmp_path / "elsewhere" / MANIFEST_PATH).read_text())
    assert "signature" in text and set(text["shards"]) == {"columns", "count", "sha256"}
    ds = StreamingDataset(tmp_path / "elsewhere", decode="raw", with_keys=True)
    assert len({it[2] for it in make_loader(ds, num_workers=0)}) == 10
    monkeypatch.setenv("SHARDKIT_INDEX_KEY", "another-machine")
    with pytest.raises(ManifestError, match="not signed by this machine"):
        Manifest.load(tmp_path / "elsewhere")
