"""BLAKE3 for indexed shards: ``shardkit index`` records each shard's BLAKE3 by default (sha256
with ``hash="sha256"``); every place that checks a shard's bytes checks the hash its manifest
names — the shard cache's downloads, ``verify``, the columns and msgpack shard lists — and a
packed dataset's manifest is what it always was."""

from __future__ import annotations

import hashlib
import json
import shutil

import blake3
import pytest
from test_cache import FakeFetch, make_data, wait_for_downloads, within
from test_indexer import check_once, index_on_s3, read, write_wds

import shardkit
from shardkit import ManifestError, index_shards
from shardkit.cache import CacheIntegrityError, ShardCache
from shardkit.cli import main as cli_main
from shardkit.manifest import Manifest, ShardInfo
from shardkit.shardformat import MANIFEST_PATH

from _helpers_remote import (  # noqa: E402, F401 - fixtures
    BUCKET,
    moto_server,
    s3,
)


def b3(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digests") / "shards"
    return folder, write_wds(folder, n=30, per_shard=10)


def copy_of(shards, tmp_path):
    folder, want = shards
    shutil.copytree(folder, tmp_path / "s")
    return tmp_path / "s", want


# --------------------------------------------------------------------------- index


@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
def test_index_records_the_hash_it_was_asked_for_and_reads_back(shards, tmp_path, algorithm):
    folder, want = copy_of(shards, tmp_path)
    kw = {} if algorithm == "blake3" else {"hash": "sha256"}  # blake3 is the default
    m = index_shards(folder, progress=False, **kw)
    entries = json.loads((folder / MANIFEST_PATH).read_text())["shards"]
    for s, entry in zip(m.shards, entries):
        data = (folder / s.url).read_bytes()
        expected = b3(data) if algorithm == "blake3" else hashlib.sha256(data).hexdigest()
        assert s.digest == (algorithm, expected)
        if algorithm == "blake3":
            assert s.sha256 is None and entry["blake3"] == expected and entry["sha256"] is None
        else:  # the manifest entry as before BLAKE3: no blake3 key at all
            assert s.blake3 is None and "blake3" not in entry and entry["sha256"] == expected
    check_once(read(folder, 2), want)
    assert shardkit.verify(folder).ok


def test_verify_names_the_hash_that_differs(shards, tmp_path):
    folder, _ = copy_of(shards, tmp_path)
    index_shards(folder, progress=False)
    path = folder / "train-000001.tar"
    data = bytearray(path.read_bytes())
    data[700] ^= 0xFF  # inside the first member's bytes: same size, tar still walks
    path.write_bytes(bytes(data))
    report = shardkit.verify(folder)
    assert ("train-000001.tar", "blake3 differs from the manifest") in report.problems


def killed_at_the_third_shard(folder, monkeypatch, **kw):
    """An index run of ``folder`` that fails at its third shard; returns the real indexer."""
    real = shardkit.indexer.index_shard

    def fail_on_third(url, *a, **kwargs):
        if url.endswith("train-000002.tar"):
            raise OSError("killed")
        return real(url, *a, **kwargs)

    monkeypatch.setattr(shardkit.indexer, "index_shard", fail_on_third)
    with pytest.raises(OSError):
        index_shards(folder, progress=False, workers=1, **kw)
    return real


def test_resume_with_another_hash_indexes_the_finished_shards_again(shards, tmp_path,
                                                                    monkeypatch):
    folder, want = copy_of(shards, tmp_path)
    real = killed_at_the_third_shard(folder, monkeypatch, hash="sha256")
    monkeypatch.setattr(shardkit.indexer, "index_shard", real)
    m = index_shards(folder, progress=False, resume=True)  # blake3 now: nothing is kept
    assert all(s.digest[0] == "blake3" for s in m.shards)
    check_once(read(folder), want)


def test_resume_with_the_same_hash_keeps_the_finished_shards(shards, tmp_path, monkeypatch):
    folder, _ = copy_of(shards, tmp_path)
    real = killed_at_the_third_shard(folder, monkeypatch)
    seen = []
    monkeypatch.setattr(shardkit.indexer, "index_shard",
                        lambda url, *a, **kw: seen.append(url) or real(url, *a, **kw))
    m = index_shards(folder, progress=False, resume=True)
    assert [u.rsplit("/", 1)[-1] for u in seen] == ["train-000002.tar"]
    assert all(s.digest[0] == "blake3" for s in m.shards)


def test_an_unknown_hash_is_refused_before_any_read(shards, tmp_path):
    folder, _ = copy_of(shards, tmp_path)
    with pytest.raises(ValueError, match="blake3, sha256|sha256, blake3"):
        index_shards(folder, progress=False, hash="md5")
    assert not (folder / MANIFEST_PATH).exists()


def test_cli_hash_option(shards, tmp_path, capsys):
    folder, want = copy_of(shards, tmp_path)
    assert cli_main(["index", str(folder), "--quiet", "--hash", "sha256"]) == 0
    assert all(s.digest[0] == "sha256" for s in Manifest.load(folder).shards)
    assert cli_main(["index", str(folder), "--quiet"]) == 0
    assert all(s.digest[0] == "blake3" for s in Manifest.load(folder).shards)
    with pytest.raises(SystemExit):
        cli_main(["index", str(folder), "--hash", "md5"])
    assert "invalid choice" in capsys.readouterr().err


def test_s3_shards_indexed_with_blake3_read_through_the_shard_cache(shards, s3, tmp_path):
    folder, want = shards
    m, options = index_on_s3(folder, s3, "b3")
    assert all(s.blake3 == b3((folder / s.url).read_bytes()) for s in m.shards)
    cache = tmp_path / "cache"
    check_once(read(f"s3://{BUCKET}/b3", 2, storage_options=options, cache_dir=str(cache)), want)
    assert len(list(cache.glob("*.tar"))) == 3  # downloaded whole, checked by BLAKE3
    # an object replaced by other bytes of the same size: the cache refuses it by its BLAKE3
    first = (folder / "train-000000.tar").read_bytes()
    s3.put(BUCKET, "b3/train-000000.tar", first[:600] + bytes([first[600] ^ 1]) + first[601:])
    with pytest.raises(Exception, match="blake3"):
        read(f"s3://{BUCKET}/b3", storage_options=options, cache_dir=str(tmp_path / "cache2"))


# --------------------------------------------------------------------------- the cache


def test_cache_checks_a_download_by_blake3(tmp_path):
    data = make_data()
    url = "https://data.example.com/b3/shard.tar"
    cache = ShardCache(tmp_path)
    with cache.open(url, size=len(data), blake3=b3(data), fetch=FakeFetch(data)) as f:
        assert within(10, f.read) == data
    other = ShardCache(tmp_path / "other")
    fetch = FakeFetch(data, corrupt=2, corrupt_at=100)
    with other.open(url, size=len(data), blake3=b3(data), fetch=fetch) as f:
        with pytest.raises(CacheIntegrityError, match="blake3"):
            within(10, f.read)
    wait_for_downloads()
    assert not other.path_for(url).exists()
    with pytest.raises(ValueError, match="not both"):
        cache.open(url, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                   blake3=b3(data), fetch=FakeFetch(data))
    with pytest.raises(ValueError, match="blake3 must be 64 hex digits"):
        cache.open(url, size=len(data), blake3="xyz", fetch=FakeFetch(data))


# --------------------------------------------------------------------------- manifests


def blake3_manifest(n: int = 3) -> Manifest:
    shards = [ShardInfo(url=f"s-{i:06d}.tar", num_samples=2, num_bytes=4096, sha256=None,
                        index_url=f".shardkit/s-{i:06d}.idx", index_sha256=f"{i:064x}",
                        blake3=f"{i + 100:064x}") for i in range(n)]
    return Manifest(classes=None, num_samples=2 * n, shards=shards, options={})


def test_columns_and_msgpack_keep_blake3(tmp_path):
    m = blake3_manifest()
    files = dict(m.files(compact=True))
    table = Manifest.from_json(files[MANIFEST_PATH],
                               columns=lambda name: (name, files[f".shardkit/{name}"],
                                                     hashlib.sha256(files[f".shardkit/{name}"])
                                                     .hexdigest()))
    assert [s.digest for s in table.shards] == [s.digest for s in m.shards]
    assert all(s.sha256 is None for s in table.shards)
    back = Manifest.from_msgpack(m.to_msgpack())
    assert list(back.shards) == list(m.shards)


def test_a_packed_manifest_is_as_before(tmp_path):
    from _helpers_read import image_folder, pack

    m = pack(image_folder(tmp_path / "src", classes=2, per_class=3), tmp_path / "ds")
    text = (tmp_path / "ds" / MANIFEST_PATH).read_text()
    assert "blake3" not in text and all(s.digest[0] == "sha256" for s in m.shards)
    assert "blake3" not in str(Manifest.from_msgpack(m.to_msgpack()).to_msgpack())
    # an older msgpack file (no blake3 column at all) still loads
    assert list(Manifest.from_msgpack(m.to_msgpack()).shards) == list(m.shards)


def test_mixed_hashes_stay_a_json_list(tmp_path):
    m = blake3_manifest(2)
    m.shards[1].blake3, m.shards[1].sha256 = None, "ab" * 32
    with pytest.raises(ValueError, match="one hash for every shard"):
        m.files(compact=True)
    again = Manifest.from_json(m.to_json())
    assert [s.digest[0] for s in again.shards] == ["blake3", "sha256"]


@pytest.mark.parametrize("bad", ["both", "neither", "number", "empty", "not hex"])
def test_a_shard_needs_one_digest(bad):
    entry = blake3_manifest(1).shards[0].as_json()
    if bad == "both":
        entry["sha256"] = "ab" * 32
    elif bad == "neither":
        entry["blake3"] = None
    else:
        entry["blake3"] = {"number": 5, "empty": "", "not hex": "zz" * 32}[bad]
    doc = json.loads(blake3_manifest(1).to_json())
    doc["shards"] = [entry]
    with pytest.raises(ManifestError, match="sha256 or a blake3|64 hex digits"):
        Manifest.from_json(json.dumps(doc))
    m = blake3_manifest(1)
    m.shards[0].blake3, m.shards[0].sha256 = entry["blake3"], entry["sha256"]
    with pytest.raises(ManifestError, match="sha256 or a blake3|64 hex digits"):
        Manifest.from_msgpack(m.to_msgpack())


def test_look_names_the_hash(shards, tmp_path):
    from shardkit.look.overview import summary

    folder, _ = copy_of(shards, tmp_path)
    index_shards(folder, progress=False)
    assert "  blake3 " in summary(Manifest.load(folder), str(folder))


def test_without_the_blake3_package_the_error_says_what_to_install(monkeypatch):
    import sys

    from shardkit import digests

    monkeypatch.setitem(sys.modules, "blake3", None)  # an import of it fails
    with pytest.raises(ImportError, match="pip install blake3"):
        digests.new("blake3")
    assert digests.hexdigest(b"x", "sha256") == hashlib.sha256(b"x").hexdigest()
