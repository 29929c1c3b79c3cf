"""Shards listed by URL: ``StreamingDataset([url, ...])`` and ``Manifest.from_urls``.

A caller may read shards from anywhere (local paths, s3://, http(s)://, several hosts and
prefixes at once); a manifest file may not point outside its own dataset. Every read is compared
with the read of the packed folder: the same keys, bytes, labels and order. The servers are the
real ones of _helpers_remote.py (moto's S3 in server mode, ``FaultyHTTPServer``) on 127.0.0.1.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("aiohttp")
pytest.importorskip("flask", reason="moto server mode needs moto[server] (flask, flask-cors)")

import shardkit  # noqa: E402
from shardkit import Manifest, StreamingDataset  # noqa: E402
from shardkit.errors import ManifestError, ShardError  # noqa: E402
from shardkit.shardformat import MANIFEST_PATH  # noqa: E402
from shardkit.storage import ListedStore  # noqa: E402

import _helpers_remote as _ts  # noqa: E402

BUCKET, FAST = _ts.BUCKET, _ts.FAST
check_same, clean_aws_env, read_all, upload = (_ts.check_same, _ts.clean_aws_env, _ts.read_all,
                                               _ts.upload)
# _helpers_remote.py's fixtures (its servers and packed datasets), used here as they are
moto_server, s3, served, small, big, reference = (_ts.moto_server, _ts.s3, _ts.served, _ts.small,
                                                  _ts.big, _ts.reference)


def local_urls(data) -> list[str]:
    return [str(data.local / s.url) for s in data.manifest.shards]


def _layout(s: shardkit.ShardInfo) -> tuple:
    return s.num_samples, s.num_bytes, s.index_sha256


# --------------------------------------------------------------------------- local


def test_from_urls_gives_the_counts_and_sizes_of_the_manifest(small):
    listed = Manifest.from_urls(local_urls(small))
    assert [_layout(s) for s in listed.shards] == [_layout(s) for s in small.manifest.shards]
    assert listed.num_samples == small.manifest.num_samples
    assert [s.url for s in listed.shards] == local_urls(small)
    assert [s.index_url for s in listed.shards] == [
        str(Path(u).parent / ".shardkit" / (Path(u).stem + ".idx")) for u in local_urls(small)]
    assert all(s.sha256 is None for s in listed.shards)  # unknown: not checked
    assert listed.classes is None and listed.base_url is None
    assert isinstance(listed.store, ListedStore)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_local_urls_read_like_the_dataset_folder(small, reference, tmp_path, monkeypatch,
                                                 num_workers):
    want = reference(small, num_workers=num_workers)
    urls = local_urls(small)
    check_same(read_all(urls, num_workers), want)
    # paths, file:// URLs and relative paths, in a tuple, are the same shards
    monkeypatch.chdir(small.local)
    mixed = (Path(urls[0]), "file://" + urls[1], *[Path(u).name for u in urls[2:]])
    check_same(read_all(mixed, num_workers), want)


def test_another_folder_works_when_listed_but_not_from_a_manifest(small, reference, tmp_path):
    """The caller's list may span folders; the same location in a manifest file is refused."""
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    shutil.copytree(small.local, here)
    elsewhere.mkdir()
    moved = small.manifest.shards[1]
    for name in (moved.url, moved.index_url):
        (elsewhere / name).parent.mkdir(exist_ok=True)
        (here / name).rename(elsewhere / name)
    urls = [str((elsewhere if s is moved else here) / s.url) for s in small.manifest.shards]
    check_same(read_all(urls), reference(small))
    for bad in (f"../elsewhere/{moved.url}", str(elsewhere / moved.url)):
        doc = json.loads(small.files[MANIFEST_PATH])
        doc["shards"][1]["url"] = bad
        doc["shards"][1]["index_url"] = bad[:-4] + ".idx"
        (here / MANIFEST_PATH).write_text(json.dumps(doc))
        with pytest.raises(ManifestError, match="not a plain relative name"):
            list(StreamingDataset(here))


def test_a_manifest_file_cannot_claim_an_unknown_sha256(small, tmp_path):
    """``sha256: null`` (not checked) is what only a caller's list gets, never a file."""
    dest = tmp_path / "ds"
    shutil.copytree(small.local, dest)
    doc = json.loads(small.files[MANIFEST_PATH])
    doc["shards"][0]["sha256"] = None
    (dest / MANIFEST_PATH).write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="sha256"):
        Manifest.load(dest)


def test_missing_index_file_is_an_error_naming_the_shard_url(small, tmp_path):
    dest = tmp_path / "ds"
    shutil.copytree(small.local, dest)
    shard = small.manifest.shards[2]
    (dest / shard.index_url).unlink()
    urls = [str(dest / s.url) for s in small.manifest.shards]
    for attempt in (lambda: Manifest.from_urls(urls), lambda: list(StreamingDataset(urls))):
        with pytest.raises(ShardError) as info:
            attempt()
        assert info.value.url == str(dest / shard.url)
        assert str(dest / shard.index_url) in str(info.value)


def test_bad_index_files_and_changed_ones_are_errors_naming_them(small, tmp_path):
    dest = tmp_path / "ds"
    shutil.copytree(small.local, dest)
    urls = [str(dest / s.url) for s in small.manifest.shards]
    index = dest / small.manifest.shards[1].index_url
    good = index.read_bytes()
    for bad in (b"", good[:-3], b"NOTANIDX" + good[8:], good[:8] + good[16:24] + good[8:16]
                + good[24:]):
        index.write_bytes(bad)
        with pytest.raises(ShardError) as info:
            Manifest.from_urls(urls)
        assert info.value.url == str(index)
    index.write_bytes(good)
    ds = StreamingDataset(urls)
    assert len(ds) == small.manifest.num_samples  # the index files are read (and pinned) here
    index.write_bytes(good[:-8] + (int.from_bytes(good[-8:], "little") + 512).to_bytes(8, "little"))
    with pytest.raises(ShardError, match=r"its index .* is not the one the manifest lists"):
        list(ds)


@pytest.mark.parametrize("urls,error", [
    ([], "no shard URLs"),
    (["a/shard-000000.idx"], "must name a .tar file"),
    (["a/.tar"], "must name a .tar file"),
    (["a/x.tar", "a/../a/x.tar"], "listed twice"),
    (["nosuch://host/x.tar"], "unsupported protocol 'nosuch'"),  # ftp:// now reads via fsspec
    (["https://host/x.tar?X-Amz-Signature=abc"], "query string"),
    (["s3://bucket"], "not the URL of a file"),
])
def test_bad_url_lists_are_refused_before_any_read(urls, error):
    with pytest.raises(ValueError, match=error):
        Manifest.from_urls(urls)


def test_a_single_string_is_not_a_list_of_urls():
    with pytest.raises(TypeError, match="list of shard URLs"):
        Manifest.from_urls("a/shard-000000.tar")
    with pytest.raises(TypeError):
        Manifest.from_urls([3])


def test_only_the_listed_files_can_be_read_through_the_store(small):
    store = Manifest.from_urls(local_urls(small)).store
    assert store.read_bytes(local_urls(small)[0]) == small.files[small.manifest.shards[0].url]
    for name in (str(small.local / MANIFEST_PATH), small.manifest.shards[0].url, "/etc/passwd"):
        with pytest.raises(ShardError, match="not one of the listed"):
            store.read_bytes(name)


# --------------------------------------------------------------------------- s3 and http


def test_s3_and_http_urls_mixed_read_like_the_dataset_folder(small, s3, served, reference,
                                                            monkeypatch, tmp_path):
    """Shards from a bucket (credentials in per-protocol storage_options) and from an HTTP host,
    interleaved, with and without worker processes."""
    clean_aws_env(monkeypatch, tmp_path)
    prefix = upload(s3, small, "ds")
    http = served.source("http")[0]
    urls = [f"{prefix}/{s.url}" if i % 2 else http + s.url
            for i, s in enumerate(small.manifest.shards)]
    options = {"s3": s3.storage_options()}
    listed = Manifest.from_urls(urls, options)
    assert [_layout(s) for s in listed.shards] == [_layout(s) for s in small.manifest.shards]
    assert [s.url for s in listed.shards] == urls
    for num_workers in (0, 2):
        check_same(read_all(urls, num_workers, storage_options=options),
                   reference(small, num_workers=num_workers))


def test_listed_urls_on_another_prefix_work_while_a_manifest_pointing_there_is_refused(
        small, s3, served, reference):
    theirs = upload(s3, small, "theirs")
    options = s3.storage_options()
    urls = [f"{theirs}/{s.url}" for s in small.manifest.shards]
    check_same(read_all(urls, storage_options=options), reference(small))
    # a manifest at another prefix that points at those same objects is refused, on s3 ...
    doc = json.loads(small.files[MANIFEST_PATH])
    for shard, url in zip(doc["shards"], urls):
        shard["url"], shard["index_url"] = url, url[:-4] + ".idx"
    s3.put(BUCKET, f"mine/{MANIFEST_PATH}", json.dumps(doc).encode())
    with pytest.raises(ManifestError, match="not a plain relative name"):
        list(StreamingDataset(f"s3://{BUCKET}/mine", storage_options=options))
    # ... and over http, for a URL on the same host outside the dataset's folder
    other = f"{served.srv.url}{BUCKET}/other/"
    (served.srv.root / BUCKET / "other").mkdir()
    for name, blob in small.files.items():
        (served.srv.root / BUCKET / "other" / name).parent.mkdir(exist_ok=True)
        (served.srv.root / BUCKET / "other" / name).write_bytes(blob)
    doc = json.loads(small.files[MANIFEST_PATH])
    doc["shards"][0]["url"] = other + doc["shards"][0]["url"]
    (served.folder / MANIFEST_PATH).write_bytes(json.dumps(doc).encode())
    served.srv.clear_counters()
    with pytest.raises(ManifestError, match="not a plain relative name"):
        list(StreamingDataset(served.source("http")[0]))
    assert not [r for r in served.srv.requests if "/other/" in r[1]]
    listed = [other + s.url for s in small.manifest.shards]
    check_same(read_all(listed), reference(small))
    assert [r for r in served.srv.requests if "/other/" in r[1]]


def test_missing_remote_index_names_the_url(small, served):
    http = served.source("http")[0]
    (served.folder / small.manifest.shards[3].index_url).unlink()
    urls = [http + s.url for s in small.manifest.shards]
    with pytest.raises(ShardError) as info:
        list(StreamingDataset(urls, **FAST))
    assert info.value.url == http + small.manifest.shards[3].url
    assert "no index file" in str(info.value)
    assert http + small.manifest.shards[3].index_url in str(info.value)


def test_listed_urls_through_the_cache(small, served, reference, tmp_path):
    """Each shard is downloaded once into cache_dir (size checked: no sha256 is known), then
    read from there."""
    http = served.source("http")[0]
    urls = [http + s.url for s in small.manifest.shards]
    want = reference(small)
    cache = tmp_path / "cache"
    check_same(read_all(urls, cache_dir=cache), want)
    deadline = time.monotonic() + 30  # the last download may still be renaming its file
    while len(list(cache.glob("*.tar"))) < len(urls) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(list(cache.glob("*.tar"))) == len(urls)
    served.srv.clear_counters()
    check_same(read_all(urls, cache_dir=cache), want)
    assert not [r for r in served.srv.requests if r[1].endswith(".tar")]  # indexes only
