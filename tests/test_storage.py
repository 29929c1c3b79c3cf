"""Object storage end to end: packing into s3://, reading from s3:// and http(s)://, faults, cache.

Real servers on 127.0.0.1 only (tests/servers.py): moto's S3 in server mode, and
``FaultyHTTPServer`` serving a dataset folder, both over plain HTTP and as an S3 endpoint (it
answers ``GET /bucket/key`` with ``root/bucket/key``, which is all a range GetObject needs), so
every fault is tried through aiohttp (http://) and through s3fs/botocore (s3://).

Every read is compared with the local read of the same dataset: exactly the same keys, bytes and
order, nothing lost or duplicated. Every wait is bounded: DataLoader ``timeout=``, subprocess
``timeout=``, small ``timeout``/``retries`` on the dataset where a server misbehaves on purpose.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path
from urllib.parse import urlsplit

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("aiohttp")
pytest.importorskip("flask", reason="moto server mode needs moto[server] (flask, flask-cors)")

import shardkit  # noqa: E402
from conftest import REPO, subprocess_env  # noqa: E402
from servers import FaultyHTTPServer, MotoS3, server_down_url  # noqa: E402
from shardkit import StreamingDataset, make_loader  # noqa: E402
from shardkit.cache import CacheIntegrityError, ShardCache  # noqa: E402
from shardkit.errors import DestinationError, ManifestError, ShardError  # noqa: E402
from shardkit.manifest import MANIFEST_NAME, decode_index  # noqa: E402
from shardkit.storage import RemoteDest  # noqa: E402
from shardkit.writer import JOURNAL_NAME, _ShardWriter  # noqa: E402

from _helpers_read import image_folder, pack, shard_samples  # noqa: E402

BUCKET = "shards"
LOADER_TIMEOUT = 60  # seconds a DataLoader may wait for one item before the test fails
FAST = dict(timeout=2.0, retries=2)  # for servers that misbehave on purpose


# --------------------------------------------------------------------------- data


class Data:
    """A packed dataset: its source folder, pack options, local copy and reference read."""

    def __init__(self, src: Path, local: Path, options: dict):
        self.src, self.local, self.options = src, local, options
        self.manifest = shardkit.Manifest.load(local)
        self.files = {p.name: p.read_bytes() for p in sorted(local.iterdir()) if p.is_file()}

    def offsets(self, shard_no: int):
        s = self.manifest.shards[shard_no]
        return decode_index(self.files[s.index_url], s.num_samples, s.num_bytes, s.index_url)

    def shard_urls(self) -> list[str]:
        return [s.url for s in self.manifest.shards]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Data:
    """24 small JPEGs in 5 shards (max_samples=5)."""
    root = tmp_path_factory.mktemp("small")
    src = image_folder(root / "src", classes=3, per_class=8, size=(48, 40))
    options = dict(max_samples=5)
    pack(src, root / "local", **options)
    return Data(src, root / "local", options)


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Data:
    """120 tensor-mode samples (128x128x3 uint8, ~50 KB each) in 2 shards of ~3 MB."""
    root = tmp_path_factory.mktemp("big")
    src = image_folder(root / "src", classes=2, per_class=60, size=(48, 40))
    options = dict(mode="tensor", size=128, max_samples=60)
    pack(src, root / "local", **options)
    data = Data(src, root / "local", options)
    assert all(s.num_bytes > 2_500_000 for s in data.manifest.shards)
    return data


def read_all(source, num_workers: int = 0, **kw) -> list[tuple[str, bytes, int]]:
    """``(key, raw image bytes, label)`` of one epoch, through make_loader when num_workers > 0."""
    kw.setdefault("seed", 7)
    ds = StreamingDataset(source, decode="raw", with_keys=True, **kw)
    if num_workers == 0:
        items = list(ds)
    else:
        items = list(make_loader(ds, num_workers=num_workers, persistent_workers=False,
                                 timeout=LOADER_TIMEOUT))
    return [(key, bytes(image), int(label)) for image, label, key in items]


def check_same(got, want) -> None:
    """Exactly the same samples in the same order; on failure, say what was lost or duplicated."""
    keys = [k for k, _, _ in got]
    dup = {k: n for k, n in Counter(keys).items() if n > 1}
    lost = {k for k, _, _ in want} - set(keys)
    assert not dup and not lost, f"duplicated {dup}, lost {sorted(lost)}"
    assert keys == [k for k, _, _ in want], "same samples, different order"
    assert got == want, "same keys, different bytes or labels"


@pytest.fixture(scope="module")
def reference(small, big):
    """The local read of a dataset with the same arguments: what every remote read must give."""
    cache: dict = {}

    def ref(data: Data, **kw):
        key = (id(data), tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = read_all(data.local, **kw)
        return cache[key]

    return ref


# --------------------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def moto_server():
    with MotoS3() as s3:
        yield s3


@pytest.fixture
def s3(moto_server) -> MotoS3:
    moto_server.reset()
    moto_server.make_bucket(BUCKET)
    return moto_server


def clean_aws_env(monkeypatch, tmp_path) -> None:
    """No AWS configuration from this machine: no profile, no files, no endpoint."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "missing-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "missing-aws-credentials"))


@pytest.fixture
def aws_env(s3, monkeypatch, tmp_path) -> MotoS3:
    """moto reachable through the standard AWS variables only."""
    clean_aws_env(monkeypatch, tmp_path)
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    return s3


def upload(s3: MotoS3, data: Data, prefix: str) -> str:
    for name, blob in data.files.items():
        s3.put(BUCKET, f"{prefix}/{name}", blob)
    return f"s3://{BUCKET}/{prefix}"


def bucket_objects(s3: MotoS3, prefix: str) -> dict[str, bytes]:
    client = s3.client()
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/").get("Contents", [])
    return {o["Key"][len(prefix) + 1:]:
            client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read() for o in listing}


class Served:
    """A FaultyHTTPServer over a copy of a dataset at ``/<BUCKET>/ds/``: as http:// and as s3://."""

    def __init__(self, srv: FaultyHTTPServer, data: Data):
        self.srv, self.data = srv, data
        self.folder = srv.root / BUCKET / "ds"

    def source(self, proto: str) -> tuple[str, dict | None]:
        if proto == "http":
            return f"{self.srv.url}{BUCKET}/ds/", None
        return f"s3://{BUCKET}/ds", {
            "key": "testing", "secret": "testing",
            "client_kwargs": {"endpoint_url": self.srv.url.rstrip("/"), "region_name": "us-east-1"}}

    def path(self, name: str) -> str:
        return f"/{BUCKET}/ds/{name}"

    def gets(self, name: str) -> list[str | None]:
        """Range headers of the GETs of one file, in order."""
        return [rng for method, path, rng in self.srv.requests
                if method == "GET" and urlsplit(path).path == self.path(name)]

    def bytes_asked(self, name: str) -> int:
        total = 0
        for rng in self.gets(name):
            if rng is None:
                total += len(self.data.files[name])
            else:
                a, b = rng.split("=")[1].split("-")
                total += min(int(b) + 1, len(self.data.files[name])) - int(a)
        return total


def _serve(tmp_path, data: Data):
    root = tmp_path / "www"
    shutil.copytree(data.local, root / BUCKET / "ds")
    return FaultyHTTPServer(root)


@pytest.fixture
def served(tmp_path, small):
    with _serve(tmp_path, small) as srv:
        yield Served(srv, small)


@pytest.fixture
def served_big(tmp_path, big):
    with _serve(tmp_path, big) as srv:
        yield Served(srv, big)


PROTOS = ["http", "s3"]


# --------------------------------------------------------------------------- 1: writing


def _record_uploads(monkeypatch, s3, prefix):
    """Record every upload in order, with the objects present when it started."""
    log: list[tuple[str, set[str]]] = []
    real_commit, real_write = RemoteDest.commit, RemoteDest.write_atomic

    def present():
        return set(bucket_objects(s3, prefix))

    def commit(self, tmp, name):
        log.append((name, present()))
        return real_commit(self, tmp, name)

    def write_atomic(self, name, data):
        log.append((name, present()))
        return real_write(self, name, data)

    monkeypatch.setattr(RemoteDest, "commit", commit)
    monkeypatch.setattr(RemoteDest, "write_atomic", write_atomic)
    return log


def test_pack_into_s3_uploads_shards_then_the_manifest_byte_identical(small, s3, monkeypatch):
    log = _record_uploads(monkeypatch, s3, "train")
    m = pack(small.src, f"s3://{BUCKET}/train", storage_options=s3.storage_options(),
             **small.options)
    names = [name for name, _ in log]
    shards = small.shard_urls()
    assert [n for n in names if n.endswith(".tar")] == shards
    assert names[-1] == MANIFEST_NAME and names.count(MANIFEST_NAME) == 1
    for name, before in log:
        assert MANIFEST_NAME not in before, f"manifest visible before uploading {name}"
        if name.endswith(".tar"):  # every earlier shard (and its journal entry) is already up
            done = shards[:shards.index(name)]
            assert set(done) <= before and (not done or JOURNAL_NAME in before)
    assert bucket_objects(s3, "train") == small.files  # shards, indexes, manifest; no journal
    assert m.num_samples == small.manifest.num_samples and m.base_url == f"s3://{BUCKET}/train"


def _cli_env(s3: MotoS3, tmp_path) -> dict:
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("AWS_")}
    env.update(s3.env(), AWS_CONFIG_FILE=str(tmp_path / "missing-config"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "missing-credentials"))
    return env


def _pack_cli(data: Data, dest: str, env: dict, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, str(REPO / "tools" / "pack.py"), str(data.src), dest, "--workers", "1"]
    if "max_samples" in data.options:
        args += ["--max-samples", str(data.options["max_samples"])]
    return subprocess.run(args + list(extra), capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=120)


def test_pack_cli_into_s3_with_aws_variables_only(small, s3, tmp_path):
    proc = _pack_cli(small, f"s3://{BUCKET}/cli", _cli_env(s3, tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert bucket_objects(s3, "cli") == small.files


class Interrupted(RuntimeError):
    pass


def _interrupt_after(monkeypatch, n_shards: int) -> None:
    real = _ShardWriter._close_shard

    def close_shard(self, consumed):
        if len(self.shards) == n_shards:
            raise Interrupted(f"killed while finishing shard {n_shards}")
        return real(self, consumed)

    monkeypatch.setattr(_ShardWriter, "_close_shard", close_shard)


@pytest.mark.parametrize("how", ["library", "cli"])
def test_resume_against_the_bucket_gives_the_same_bytes(small, s3, monkeypatch, tmp_path, how):
    dest = f"s3://{BUCKET}/resumed"
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 2)
        with pytest.raises(Interrupted):
            pack(small.src, dest, storage_options=s3.storage_options(), **small.options)
    left = bucket_objects(s3, "resumed")
    assert MANIFEST_NAME not in left and JOURNAL_NAME in left
    assert {n for n in left if n.endswith(".tar")} == set(small.shard_urls()[:2])
    with pytest.raises(DestinationError, match="unfinished"):  # not without --resume
        pack(small.src, dest, storage_options=s3.storage_options(), **small.options)

    if how == "library":
        log = _record_uploads(monkeypatch, s3, "resumed")
        m = pack(small.src, dest, storage_options=s3.storage_options(), resume=True,
                 **small.options)
        assert m.stats["resumed_shards"] == 2
        uploaded = [name for name, _ in log if name.endswith(".tar")]
        assert uploaded == small.shard_urls()[2:]  # the first two were not uploaded again
    else:
        proc = _pack_cli(small, dest, _cli_env(s3, tmp_path), "--resume")
        assert proc.returncode == 0, proc.stderr
        assert "2 shards reused" in proc.stdout
    assert bucket_objects(s3, "resumed") == small.files


def test_packing_into_a_prefix_holding_another_dataset_is_refused(small, s3):
    dest = f"s3://{BUCKET}/taken"
    pack(small.src, dest, storage_options=s3.storage_options(), **small.options)
    before = bucket_objects(s3, "taken")
    for kw in (dict(max_samples=4), dict(max_samples=4, resume=True), dict(seed=1)):
        with pytest.raises(DestinationError, match="different dataset|different files"):
            pack(small.src, dest, storage_options=s3.storage_options(), **kw)
    assert bucket_objects(s3, "taken") == before


# --------------------------------------------------------------------------- 2: reading


@pytest.mark.parametrize("num_workers", [0, 2])
def test_s3_http_and_local_reads_agree(small, aws_env, served, reference, num_workers):
    want = reference(small, num_workers=num_workers)  # the local read with as many workers
    assert sorted(k for k, _, _ in want) == sorted(
        k for k, _, _ in read_all(small.local, shuffle=False))  # every sample once
    sources = [upload(aws_env, small, "ds"),                       # endpoint + keys from env only
               served.source("http")[0],                          # folder URL
               served.source("http")[0] + MANIFEST_NAME]          # manifest URL
    for source in sources:
        check_same(read_all(source, num_workers), want)
    # the same seed gives the same order on every backend; another seed another order
    other = read_all(sources[0], num_workers, seed=8)
    assert sorted(other) == sorted(want) and other != want
    if num_workers:  # workers forked after the parent has used the store itself
        ds = StreamingDataset(sources[0], decode="raw", with_keys=True, seed=7)
        assert len(list(ds)) == len(want)
        items = list(make_loader(ds, num_workers=num_workers, persistent_workers=False,
                                 timeout=LOADER_TIMEOUT))
        check_same([(k, bytes(x), int(y)) for x, y, k in items], want)


def test_storage_options_override_the_environment(small, s3, monkeypatch, tmp_path, reference):
    source = upload(s3, small, "ds")
    clean_aws_env(monkeypatch, tmp_path)
    with server_down_url() as down:  # the environment points at nothing
        monkeypatch.setenv("AWS_ENDPOINT_URL", down.rstrip("/"))
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-env")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "from-env")
        with pytest.raises(ManifestError, match=f"s3://{BUCKET}/ds/manifest.json"):
            read_all(source, **FAST)
        check_same(read_all(source, storage_options=s3.storage_options()), reference(small))


# --------------------------------------------------------------------------- 3: streaming


@pytest.mark.parametrize("cache", [False, True], ids=["direct", "cache"])
def test_first_sample_arrives_before_the_shard_has_been_sent(big, served_big, reference, tmp_path,
                                                              cache):
    srv = served_big.srv
    source, _ = served_big.source("http")
    ds = StreamingDataset(source, decode="raw", with_keys=True, shuffle=False,
                          cache_dir=tmp_path / "cache" if cache else None)
    ds.manifest  # noqa: B018 - loaded before the delay
    size = big.manifest.shards[0].num_bytes
    srv.delay(0.05, chunk=64 << 10)  # ~1.3 MB/s: the shard takes ~2.4 s to send
    it = iter(ds)
    first = next(it)
    sent = srv.bytes_sent
    srv.delay(0)
    rest = list(it)
    # with a cache, the next span's shard downloads alongside (as slowly): count both
    assert sent < (1.2 if cache else 0.6) * size, f"{sent} of {size} bytes sent before a sample"
    got = [(k, bytes(x), int(y)) for x, y, k in [first] + rest]
    check_same(got, reference(big, shuffle=False))


@pytest.mark.parametrize("proto", PROTOS)
def test_resume_mid_shard_is_a_range_request_at_the_sample_offset(big, served_big, reference,
                                                                   proto):
    source, options = served_big.source(proto)
    k = 45
    kw = dict(decode="raw", with_keys=True, shuffle=False, storage_options=options)
    ds = StreamingDataset(source, **kw)
    it = iter(ds)
    head = [next(it) for _ in range(k)]
    state = ds.state_dict()
    del it
    served_big.srv.clear_counters()
    resumed = StreamingDataset(source, **kw)
    resumed.load_state_dict(state)
    rest = list(resumed)
    got = [(key, bytes(x), int(y)) for x, y, key in head + rest]
    check_same(got, reference(big, shuffle=False))
    shard0 = big.manifest.shards[0]
    offset = int(big.offsets(0)[k])
    gets = served_big.gets(shard0.url)
    assert gets and gets[0].startswith(f"bytes={offset}-"), gets
    assert served_big.bytes_asked(shard0.url) == shard0.num_bytes - offset  # nothing before it


# --------------------------------------------------------------------------- 4: faults


def _after_first_index(monkeypatch, action) -> None:
    """Run ``action()`` once, when the first index file has been read (next GET: shard bytes)."""
    real = StreamingDataset._index
    pending = [action]

    def index(self, store, shard):
        offsets = real(self, store, shard)
        while pending:
            pending.pop()()
        return offsets

    monkeypatch.setattr(StreamingDataset, "_index", index)


@pytest.mark.parametrize("proto", PROTOS)
def test_connections_dropped_mid_shard(big, served_big, reference, proto):
    source, options = served_big.source(proto)
    srv = served_big.srv
    srv.drop_after(200_000, times=5)
    got = read_all(source, storage_options=options)
    check_same(got, reference(big))
    # one streamed GET per shard without faults; each drop costs one more, from the right byte
    tar_gets = sum(len(served_big.gets(url)) for url in big.shard_urls())
    assert tar_gets >= len(big.shard_urls()) + 3, "the drops did not hit the shards"


def test_connections_reset_mid_shard_with_workers(small, served, reference):
    source, _ = served.source("http")
    served.srv.drop_after(3000, times=5, reset=True)
    check_same(read_all(source, 2), reference(small, num_workers=2))


@pytest.mark.parametrize("proto", PROTOS)
def test_bursts_of_server_errors(small, served, reference, proto, monkeypatch):
    source, options = served.source(proto)
    srv = served.srv
    read_all(source, storage_options=options)
    clean = len(srv.requests)  # requests of a read without faults (s3fs adds HEADs)
    srv.clear_counters()
    srv.fail(503, times=3)  # the manifest's requests
    _after_first_index(monkeypatch, lambda: srv.fail(500, times=3))  # then the first shard's
    check_same(read_all(source, storage_options=options), reference(small))
    assert len(srv.requests) == clean + 6  # each failed request was retried once
    assert sum(len(served.gets(url)) for url in small.shard_urls()) == len(small.shard_urls()) + 3


@pytest.mark.parametrize("proto", PROTOS)
def test_slow_server_still_completes(small, served, reference, proto):
    source, options = served.source(proto)
    served.srv.delay(0.005, chunk=4096)
    check_same(read_all(source, storage_options=options), reference(small))


@pytest.mark.parametrize("proto", PROTOS)
def test_stalled_server_is_an_error_naming_the_url(small, served, proto, monkeypatch):
    source, options = served.source(proto)
    ds = StreamingDataset(source, decode="raw", shuffle=False, storage_options=options, timeout=1,
                          retries=1)
    _after_first_index(monkeypatch, served.srv.stall)  # every GET: headers, then silence
    t = time.monotonic()
    with pytest.raises(ShardError) as info:
        list(ds)
    elapsed = time.monotonic() - t
    assert elapsed < 15, f"took {elapsed:.1f} s"
    assert "after 2 tries" in str(info.value)
    assert str(info.value).startswith(f"{source.rstrip('/')}/{small.shard_urls()[0]}: "), info.value


def test_stalled_manifest_read_is_bounded_too(small, served):
    source, _ = served.source("http")
    served.srv.stall(before_headers=True)
    t = time.monotonic()
    with pytest.raises(ManifestError, match=f"{source}{MANIFEST_NAME}"):
        StreamingDataset(source, timeout=1, retries=1).manifest  # noqa: B018
    assert time.monotonic() - t < 15


@pytest.mark.parametrize("proto", PROTOS)
def test_server_that_stops_answering_gives_up_after_the_retries(small, served, proto,
                                                                 monkeypatch):
    source, options = served.source(proto)
    ds = StreamingDataset(source, decode="raw", shuffle=False, storage_options=options, **FAST)

    def stop():
        served.srv.fail(503, times=1000)
        served.srv.clear_counters()

    _after_first_index(monkeypatch, stop)
    with pytest.raises(ShardError) as info:
        list(ds)
    first = small.shard_urls()[0]
    assert str(info.value).startswith(f"{source.rstrip('/')}/{first}: ")
    assert "after 3 tries" in str(info.value)
    assert len(served.gets(first)) == 3  # retries=2: three GETs, then the error


@pytest.mark.parametrize("proto", PROTOS)
def test_server_ignoring_range_requests_is_a_clear_error_not_wrong_bytes(big, served_big, proto,
                                                                         monkeypatch):
    source, options = served_big.source(proto)
    ds = StreamingDataset(source, decode="raw", shuffle=False, storage_options=options)
    _after_first_index(monkeypatch, served_big.srv.ignore_range)  # 3 MB back for a 1 MB range
    with pytest.raises(ShardError, match="Range") as info:
        list(ds)
    assert str(info.value).startswith(f"{source.rstrip('/')}/{big.shard_urls()[0]}: ")
    assert len(served_big.gets(big.shard_urls()[0])) == 1  # not retried: it would not help


@pytest.mark.parametrize("proto", PROTOS)
def test_server_down_at_start_is_a_manifest_error(proto):
    with server_down_url() as url:
        if proto == "http":
            source, options, where = url + "ds/", None, url + "ds/" + MANIFEST_NAME
        else:
            source = f"s3://{BUCKET}/ds"
            options = {"key": "k", "secret": "s",
                       "client_kwargs": {"endpoint_url": url.rstrip("/")}}
            where = f"{source}/{MANIFEST_NAME}"
        t = time.monotonic()
        with pytest.raises(ManifestError) as info:
            list(StreamingDataset(source, storage_options=options, **FAST))
        assert time.monotonic() - t < 10
    assert str(info.value).startswith(where + ": cannot read the manifest")


# --------------------------------------------------------------------------- 5: cache


def _cache_files(cache_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in cache_dir.glob("*.tar")}


def test_cache_shared_by_workers_and_ranks_downloads_each_shard_once(small, served, tmp_path):
    source, _ = served.source("http")
    srv, cache_dir = served.srv, tmp_path / "cache"
    srv.delay(0.01, chunk=4096)  # downloads take a while, so readers overlap
    kw = dict(decode="raw", with_keys=True, cache_dir=cache_dir, world_size=2, block_size=2)
    ranks = [StreamingDataset(source, rank=r, **kw) for r in range(2)]
    loaders = [make_loader(ds, num_workers=2, persistent_workers=False, timeout=LOADER_TIMEOUT)
               for ds in ranks]

    def epoch():
        keys: list[list[str]] = [[], []]
        for pair in zip(*loaders, strict=True):  # both ranks at once, 4 worker processes
            for rank, (_, _, key) in enumerate(pair):
                keys[rank].append(key)
        return keys

    everything = sorted(k for k, _, _ in reference_keys(small))
    keys = epoch()
    assert sorted(keys[0] + keys[1]) == everything
    shard_of = {key: no for no, path in enumerate(small.shard_urls())
                for key, _ in shard_samples(small.local / path)}
    shared = {shard_of[k] for k in keys[0]} & {shard_of[k] for k in keys[1]}
    assert shared, "no shard is read by both ranks: the test proves less than it says"
    for url in small.shard_urls():  # every shard's bytes asked for exactly once
        assert served.bytes_asked(url) == len(small.files[url]), (url, served.gets(url))
    assert sorted(_cache_files(cache_dir).values()) == sorted(len(small.files[u])
                                                              for u in small.shard_urls())
    srv.delay(0)
    srv.clear_counters()
    for ds in ranks:
        ds.set_epoch(1)
    keys = epoch()
    assert sorted(keys[0] + keys[1]) == everything
    assert not any(served.gets(url) for url in small.shard_urls()), srv.requests


def test_the_cache_downloads_the_next_spans_shards_ahead(small, served, reference, tmp_path):
    source, _ = served.source("http")
    cache_dir = tmp_path / "cache"
    ds = StreamingDataset(source, decode="raw", with_keys=True, seed=7, cache_dir=cache_dir)
    shards = [small.manifest.shards[s.shard].url for s in ds._plan(0, 1).spans]
    cache = ShardCache(cache_dir)
    it = iter(ds)
    got = [next(it)]
    # while the first span is read, the shards of the next two spans are downloaded too
    deadline = time.monotonic() + 20
    while not all(cache.cached(served.srv.url + f"{BUCKET}/ds/{url}", len(small.files[url]), "")
                  for url in shards[:3]):
        assert time.monotonic() < deadline, _cache_files(cache_dir)
        time.sleep(0.01)
    assert len(set(shards)) > 3 and len(_cache_files(cache_dir)) == len(set(shards[:3]))
    got += list(it)
    check_same([(k, bytes(x), int(y)) for x, y, k in got], reference(small))
    for url in small.shard_urls():  # each downloaded once: ahead or when read, never both
        assert served.bytes_asked(url) == len(small.files[url]), (url, served.gets(url))


def reference_keys(data: Data):
    return read_all(data.local, shuffle=False)


def test_cache_limit_keeps_the_cache_small_and_yields_everything(small, served, reference,
                                                                  tmp_path):
    source, _ = served.source("http")
    cache_dir = tmp_path / "cache"
    sizes = [s.num_bytes for s in small.manifest.shards]
    limit = sum(sizes) // 3
    ds = StreamingDataset(source, decode="raw", with_keys=True, seed=7, cache_dir=cache_dir,
                          cache_limit=limit)
    got, peak = [], 0
    for x, y, k in ds:
        got.append((k, bytes(x), int(y)))
        peak = max(peak, sum(_cache_files(cache_dir).values()))
    check_same(got, reference(small))
    assert peak <= limit + max(sizes)
    assert sum(_cache_files(cache_dir).values()) <= limit + max(sizes)
    assert len(_cache_files(cache_dir)) < len(sizes)  # something was evicted


def _corrupt(path: Path, at: int) -> bytes:
    good = path.read_bytes()
    bad = bytearray(good)
    bad[at] ^= 0xFF
    path.write_bytes(bytes(bad))
    return good


def test_corrupted_once_is_downloaded_again_and_read_correctly(big, served_big, reference,
                                                               tmp_path, monkeypatch):
    source, _ = served_big.source("http")
    shard = big.manifest.shards[0]
    on_disk = served_big.folder / shard.url
    good = _corrupt(on_disk, shard.num_bytes - 10)  # end-of-archive block: only sha256 sees it
    fills = []
    real_fill = ShardCache._fill

    def fill(fd, size, sha256, fetch, st):
        problem = real_fill(fd, size, sha256, fetch, st)
        if sha256 == shard.sha256:  # not another shard's download (the next ones start ahead)
            fills.append(problem)
            on_disk.write_bytes(good)  # the server serves the right bytes from now on
        return problem

    monkeypatch.setattr(ShardCache, "_fill", staticmethod(fill))
    cache = ShardCache(tmp_path / "cache")
    ds = StreamingDataset(source, decode="raw", with_keys=True, shuffle=False,
                          cache_dir=cache.cache_dir)
    it = iter(ds)
    first = next(it)  # streams from the first download while it is still being checked
    final = cache.path_for(f"{source}{shard.url}")
    deadline = time.monotonic() + 20
    while not final.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    got = [(k, bytes(x), int(y)) for x, y, k in [first] + list(it)]
    check_same(got, reference(big, shuffle=False))
    assert fills[0] is not None and "sha256" in fills[0] and fills[1] is None
    assert hashlib.sha256(final.read_bytes()).hexdigest() == shard.sha256
    asked = served_big.bytes_asked(shard.url)
    assert asked == 2 * shard.num_bytes  # downloaded twice, then correct


def test_corrupted_for_good_is_an_integrity_error_and_nothing_is_cached(small, served, tmp_path):
    source, _ = served.source("http")
    shard = small.manifest.shards[0]
    _corrupt(served.folder / shard.url, shard.num_bytes - 10)
    cache = ShardCache(tmp_path / "cache")
    url = f"{source}{shard.url}"
    with pytest.raises(CacheIntegrityError) as info:
        read_all(source, shuffle=False, cache_dir=cache.cache_dir)
    assert url in str(info.value)
    final = cache.path_for(url)
    assert not final.exists()
    # (the next shards' downloads, started ahead, may still be writing their own temp files)
    assert not [p for p in cache.cache_dir.iterdir() if p.name.startswith(f".{final.name}.tmp-")]
    assert served.bytes_asked(shard.url) == 2 * shard.num_bytes  # two tries, then the error


# --------------------------------------------------------------------------- 6: safety


@pytest.mark.parametrize("bad_url", ["../other/shard-000000.tar", "/etc/passwd",
                                     "http://evil/x.tar"])
@pytest.mark.parametrize("proto", ["http", "s3"])
def test_manifest_pointing_outside_the_dataset_is_refused(small, s3, served, bad_url, proto):
    doc = json.loads(small.files[MANIFEST_NAME])
    doc["shards"][1]["url"] = bad_url
    text = json.dumps(doc).encode()
    if proto == "http":
        (served.folder / MANIFEST_NAME).write_bytes(text)
        source, options = served.source("http")
    else:
        upload(s3, small, "evil")
        s3.put(BUCKET, f"evil/{MANIFEST_NAME}", text)
        source, options = f"s3://{BUCKET}/evil", s3.storage_options()
    with pytest.raises(ManifestError, match="not a plain relative name"):
        shardkit.Manifest.load(source, storage_options=options)
    served.srv.clear_counters()
    with pytest.raises(ManifestError):
        list(StreamingDataset(source, storage_options=options))
    assert not [r for r in served.srv.requests if "etc" in r[1] or "other" in r[1]]


KEY, SECRET = "AKIDSECRET123", "SECRETSECRET456"


def _no_secrets(exc: BaseException, *texts: str) -> None:
    shown = [str(exc), repr(exc), "".join(traceback.format_exception(exc)), *texts]
    for text in shown:
        assert KEY not in text and SECRET not in text, text


def test_credentials_never_appear_in_errors_logs_or_the_manifest(small, s3, caplog, tmp_path):
    caplog.set_level(logging.DEBUG, logger="shardkit")
    caplog.set_level(logging.INFO)
    options = {"key": KEY, "secret": SECRET,
               "client_kwargs": {"endpoint_url": s3.endpoint_url, "region_name": "us-east-1"}}
    pack(small.src, f"s3://{BUCKET}/secret", storage_options=options, **small.options)
    for name, blob in bucket_objects(s3, "secret").items():
        assert KEY.encode() not in blob and SECRET.encode() not in blob, name

    # a bucket that does not exist
    with pytest.raises(ManifestError) as info:
        list(StreamingDataset("s3://no-such-bucket/ds", storage_options=options, **FAST))
    _no_secrets(info.value, caplog.text)
    # a shard read that fails: the object went away after the manifest was read
    ds = StreamingDataset(f"s3://{BUCKET}/secret", storage_options=options, shuffle=False, **FAST)
    ds.manifest  # noqa: B018
    s3.client().delete_object(Bucket=BUCKET, Key=f"secret/{small.shard_urls()[0]}")
    with pytest.raises(ShardError) as info:
        list(ds)
    _no_secrets(info.value, caplog.text)
    # a server that went away
    with server_down_url() as down:
        options["client_kwargs"]["endpoint_url"] = down.rstrip("/")
        with pytest.raises(ManifestError) as info:
            list(StreamingDataset(f"s3://{BUCKET}/secret", storage_options=options, **FAST))
    _no_secrets(info.value, caplog.text)
    assert "s3://shards/secret/manifest.json" in str(info.value)


def test_http_user_and_password_are_redacted(small, served, caplog):
    caplog.set_level(logging.DEBUG, logger="shardkit")
    url = served.srv.url.replace("http://", "http://alice:pa55word@") + f"{BUCKET}/ds/"
    check_same(read_all(url, shuffle=False), read_all(small.local, shuffle=False))
    ds = StreamingDataset(url, decode="raw", shuffle=False, **FAST)
    assert "pa55word" not in ds.manifest.base_url and "alice" not in ds.manifest.base_url
    served.srv.fail(503, times=1000)
    with pytest.raises(ShardError) as info:
        list(ds)
    with pytest.raises(ManifestError) as info2:
        StreamingDataset(url, **FAST).manifest  # noqa: B018
    for exc in (info.value, info2.value):
        shown = [str(exc), repr(exc), "".join(traceback.format_exception(exc)), caplog.text]
        assert not any("pa55word" in t or "alice" in t for t in shown), shown
        assert f"{served.srv.url}{BUCKET}/ds/" in str(exc)
