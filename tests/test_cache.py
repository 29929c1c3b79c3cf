"""ShardCache: download once, stream while downloading, verify, survive kills, evict LRU.

Unit tests: shard bytes are random data made in the test; ``fetch`` is a fake that yields chunks
of them, optionally slowly, corrupted or failing. Then the cache under ``StreamingDataset`` with
the real test servers on 127.0.0.1 (``_helpers_remote``): shared by workers and ranks, ahead of
the reader, bounded, and checked.
"""

from __future__ import annotations

import fcntl
import hashlib
import multiprocessing as mp
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from shardkit import StreamingDataset, make_loader
from shardkit.cache import CacheIntegrityError, ShardCache
from shardkit.errors import ShardError

from _helpers_read import shard_samples
from _helpers_remote import (  # noqa: E402  # noqa: E402, F401 - fixtures
    BUCKET,
    LOADER_TIMEOUT,
    Data,
    big,
    check_same,
    read_all,
    reference,
    served,
    served_big,
    small,
)

CHUNK = 16 << 10
URL = "https://data.example.com/train/shard-000001.tar"


def make_data(n: int = 200_000, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FakeFetch:
    """``fetch(offset)``: yields ``data[offset:]`` in chunks; counts calls.

    corrupt: the first ``corrupt`` calls flip the byte at ``corrupt_at``; fail_at: raise once a
    chunk would start at or past it; gate: block on it after the first chunk; delay: per chunk.
    """

    def __init__(self, data: bytes, *, corrupt: int = 0, corrupt_at: int = 0, fail_at=None,
                 gate: threading.Event | None = None, delay: float = 0.0):
        self.data, self.corrupt, self.corrupt_at = data, corrupt, corrupt_at
        self.fail_at, self.gate, self.delay = fail_at, gate, delay
        self.calls, self.finished = 0, threading.Event()

    def __call__(self, offset: int):
        self.calls += 1
        return self._chunks(offset, self.calls)

    def _chunks(self, offset: int, call: int):
        data = self.data
        if call <= self.corrupt:
            i = self.corrupt_at
            data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
        for i in range(offset, len(data), CHUNK):
            if self.fail_at is not None and i >= self.fail_at:
                raise ConnectionError("connection reset by fake peer")
            yield data[i:i + CHUNK]
            if self.gate is not None and i == offset:
                assert self.gate.wait(10)
            if self.delay:
                time.sleep(self.delay)
        self.finished.set()


def within(seconds: float, fn, *args):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it takes too long."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args).result(timeout=seconds)


def lock_is_free(cache: ShardCache, url: str) -> bool:
    path = cache.path_for(url)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def leftovers(cache: ShardCache) -> list[str]:
    return sorted(p.name for p in cache.cache_dir.iterdir() if ".tmp-" in p.name)


def wait_for_downloads(seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while any(t.name.startswith("shardkit-cache") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "a cache download thread never finished"
        time.sleep(0.01)


@pytest.fixture(autouse=True)
def no_leaked_downloads():
    """Every test's background downloads end (litdata's thread police, in small)."""
    yield
    wait_for_downloads()


def test_constructor_does_no_io(tmp_path):
    ShardCache(tmp_path / "not-yet", limit=10)
    assert not (tmp_path / "not-yet").exists()
    with pytest.raises(ValueError, match="limit"):
        ShardCache(tmp_path, limit=-1)


def test_path_for_hashes_urls(tmp_path):
    cache = ShardCache(tmp_path)
    a, b = cache.path_for(URL), cache.path_for(URL.replace("000001", "000002"))
    assert a != b and a.parent == b.parent == tmp_path
    assert a == cache.path_for(URL)
    for path in (a, b):
        assert len(path.name) == 36 and path.suffix == ".tar"
        assert "shard" not in path.name and "example" not in path.name


def test_download_once_then_disk_and_exact_ranges(tmp_path):
    data = make_data()
    cache, fetch = ShardCache(tmp_path / "c"), FakeFetch(data)
    with cache.open(URL, size=len(data), sha256=sha(data), fetch=fetch) as f:
        assert within(10, f.read) == data
    assert fetch.calls == 1
    assert cache.cached(URL, len(data), sha(data)) == cache.path_for(URL)
    assert cache.path_for(URL).read_bytes() == data
    assert [p.name for p in cache.cache_dir.iterdir() if not p.name.endswith(".lock")] == [
        cache.path_for(URL).name]
    ranges = [(0, None), (0, 10), (5, 100_000), (123, 123), (CHUNK, CHUNK + 1), (len(data) - 7, None)]
    for start, stop in ranges:
        with cache.open(URL, size=len(data), sha256=sha(data), fetch=fetch, start=start,
                        stop=stop) as f:
            assert f.read() == data[start:stop]
    assert fetch.calls == 1
    # the same ranges while downloading (each from a fresh cache)
    for i, (start, stop) in enumerate(ranges):
        other = ShardCache(tmp_path / f"d{i}")
        with other.open(URL, size=len(data), sha256=sha(data), fetch=FakeFetch(data),
                        start=start, stop=stop) as f:
            got = b"".join(iter(lambda: f.read(1000), b""))
        assert got == data[start:stop]
    with pytest.raises(ValueError, match="start"):
        cache.open(URL, size=len(data), sha256=sha(data), fetch=fetch, start=10, stop=5)


def test_reader_streams_before_fetch_finishes(tmp_path):
    data, gate = make_data(), threading.Event()
    fetch = FakeFetch(data, gate=gate)
    cache = ShardCache(tmp_path)
    f = cache.open(URL, size=len(data), sha256=sha(data), fetch=fetch)
    try:
        assert within(10, f.read, CHUNK) == data[:CHUNK]
        assert not fetch.finished.is_set() and cache.cached(URL, len(data), sha(data)) is None
    finally:
        gate.set()
    assert within(10, f.read) == data[CHUNK:]
    f.close()
    assert cache.cached(URL, len(data), sha(data)) is not None


def test_mismatch_once_redownloads(tmp_path):
    data = make_data()
    cache = ShardCache(tmp_path)
    # corruption past what this reader has seen: it gets exact bytes after the re-download
    fetch = FakeFetch(data, corrupt=1, corrupt_at=len(data) - 1)
    with cache.open(URL, size=len(data), sha256=sha(data), fetch=fetch, stop=5000) as f:
        assert within(10, f.read) == data[:5000]
    assert fetch.calls == 2 and cache.path_for(URL).read_bytes() == data
    # corruption in bytes the reader already got: it is told, and the cache is still right
    other = ShardCache(tmp_path / "other")
    gate = threading.Event()
    fetch = FakeFetch(data, corrupt=1, corrupt_at=10, gate=gate)
    with other.open(URL, size=len(data), sha256=sha(data), fetch=fetch) as f:
        assert within(10, f.read, CHUNK) != data[:CHUNK]  # the corrupt first attempt
        gate.set()
        with pytest.raises(CacheIntegrityError, match="differ"):
            within(10, f.read)
    wait_for_downloads()  # the re-download goes on in the background and fills the cache
    assert fetch.calls == 2 and other.path_for(URL).read_bytes() == data
    assert leftovers(other) == [] and lock_is_free(other, URL)


def test_mismatch_twice_raises_and_leaves_nothing(tmp_path):
    data = make_data()
    cache, fetch = ShardCache(tmp_path), FakeFetch(data, corrupt=2, corrupt_at=100)
    with cache.open(URL, size=len(data), sha256=sha(data), fetch=fetch) as f:
        with pytest.raises(CacheIntegrityError) as info:
            within(10, f.read)
    assert isinstance(info.value, ShardError) and URL in str(info.value) and info.value.url == URL
    assert fetch.calls == 2
    assert not cache.path_for(URL).exists() and leftovers(cache) == []
    assert lock_is_free(cache, URL)
    # a wrong size counts as a mismatch too
    with cache.open(URL, size=len(data) + 1, sha256=sha(data), fetch=FakeFetch(data)) as f:
        with pytest.raises(CacheIntegrityError, match="bytes"):
            within(10, f.read)


def test_fetch_error_reaches_reader(tmp_path):
    data = make_data()
    cache, fetch = ShardCache(tmp_path), FakeFetch(data, fail_at=100_000)
    f = cache.open(URL, size=len(data), sha256=sha(data), fetch=fetch)
    with pytest.raises(ConnectionError):
        within(10, f.read)
    with pytest.raises(ConnectionError):  # sticky: never a silent EOF afterwards
        within(10, f.read, 1)
    f.close()
    assert not cache.path_for(URL).exists() and leftovers(cache) == []
    assert lock_is_free(cache, URL)
    with cache.open(URL, size=len(data), sha256=sha(data), fetch=FakeFetch(data)) as f:
        assert within(10, f.read) == data


def test_early_close_still_completes_download(tmp_path):
    data, gate = make_data(), threading.Event()
    cache, fetch = ShardCache(tmp_path), FakeFetch(data, gate=gate)
    with cache.open(URL, size=len(data), sha256=sha(data), fetch=fetch) as f:
        assert within(10, f.read, 100) == data[:100]
    gate.set()
    # a second open waits for the background download, then reads the file without fetching
    with cache.open(URL, size=len(data), sha256=sha(data), fetch=fetch) as f:
        assert within(10, f.read) == data
    assert fetch.calls == 1


def test_short_fetch_is_resumed_at_the_right_byte(tmp_path):
    data, calls = make_data(), []

    def fetch(offset):  # ends early every time: the cache asks again from where it stopped
        calls.append(offset)
        yield data[offset:offset + 70_000]

    cache = ShardCache(tmp_path)
    with cache.open(URL, size=len(data), sha256=sha(data), fetch=fetch) as f:
        assert within(10, f.read) == data
    assert calls == [0, 70_000, 140_000]


def _worker(cache_dir, data_seed, counter, barrier, results):
    data = make_data(seed=data_seed)

    def fetch(offset):
        with counter.get_lock():
            counter.value += 1
        for i in range(offset, len(data), CHUNK):
            time.sleep(0.002)
            yield data[i:i + CHUNK]

    barrier.wait(10)
    with ShardCache(cache_dir).open(URL, size=len(data), sha256=sha(data), fetch=fetch) as f:
        results.put(sha(f.read()))


def test_many_processes_download_once(tmp_path):
    ctx = mp.get_context("fork")
    counter, barrier, results = ctx.Value("i", 0), ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(tmp_path, 3, counter, barrier, results))
             for _ in range(4)]
    for p in procs:
        p.start()
    try:
        got = [results.get(timeout=20) for _ in procs]
        for p in procs:
            p.join(10)
            assert p.exitcode == 0
    finally:
        for p in procs:
            p.kill()
    assert counter.value == 1
    assert got == [sha(make_data(seed=3))] * 4


def _doomed(cache_dir, started):
    data = make_data()

    def fetch(offset):
        yield data[offset:offset + CHUNK]
        time.sleep(60)  # killed here
        yield data[offset + CHUNK:]

    f = ShardCache(cache_dir).open(URL, size=len(data), sha256=sha(data), fetch=fetch)
    assert f.read(CHUNK) == data[:CHUNK]
    started.set()
    time.sleep(60)


def test_killed_downloader_leaves_no_trace(tmp_path):
    ctx = mp.get_context("fork")
    started = ctx.Event()
    child = ctx.Process(target=_doomed, args=(tmp_path, started))
    child.start()
    try:
        assert started.wait(20)
        cache = ShardCache(tmp_path)
        assert not lock_is_free(cache, URL)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
    assert not cache.path_for(URL).exists() and len(leftovers(cache)) == 1
    assert lock_is_free(cache, URL)
    data = make_data()
    fetch = FakeFetch(data)
    with cache.open(URL, size=len(data), sha256=sha(data), fetch=fetch) as f:
        assert within(10, f.read) == data
    assert fetch.calls == 1 and leftovers(cache) == []
    assert cache.path_for(URL).read_bytes() == data


def _fork_reader(cache_dir, results):
    data = make_data()
    nothing = lambda offset: iter(())  # noqa: E731 -- the parent's download must serve us
    with ShardCache(cache_dir).open(URL, size=len(data), sha256=sha(data), fetch=nothing) as f:
        results.put(sha(f.read()))


def test_fork_during_download_does_not_deadlock(tmp_path):
    """A child forked mid-download (DataLoader workers) must not keep the parent's lock alive."""
    data, gate = make_data(), threading.Event()
    cache = ShardCache(tmp_path)
    f = cache.open(URL, size=len(data), sha256=sha(data), fetch=FakeFetch(data, gate=gate))
    assert within(10, f.read, CHUNK) == data[:CHUNK]  # download in flight, lock held
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    child = ctx.Process(target=_fork_reader, args=(tmp_path, results))
    child.start()
    try:
        time.sleep(0.2)  # the child now waits on the lock
        gate.set()
        assert within(10, f.read) == data[CHUNK:]
        f.close()
        assert results.get(timeout=20) == sha(data)
        child.join(10)
        assert child.exitcode == 0
    finally:
        gate.set()
        child.kill()


def test_lru_eviction(tmp_path):
    size = 50_000
    shards = {name: make_data(size, seed=i) for i, name in enumerate("ABCDE")}
    url = {name: f"s3://bucket/{name}.tar" for name in shards}
    cache = ShardCache(tmp_path, limit=2 * size + 100)

    def add(name):
        data = shards[name]
        with cache.open(url[name], size=size, sha256=sha(data), fetch=FakeFetch(data)) as f:
            assert within(10, f.read) == data
        time.sleep(0.01)

    def present():
        return {n for n in shards if cache.path_for(url[n]).exists()}

    def total():
        return sum(p.stat().st_size for p in tmp_path.glob("*.tar"))

    add("A"), add("B")
    assert cache.cached(url["A"], size, sha(shards["A"])) is not None  # touch: A is now newer
    time.sleep(0.01)
    add("C")
    assert present() == {"A", "C"} and total() <= cache.limit
    # A is the least recently used now, but someone holds its lock: C goes instead
    os.utime(cache.path_for(url["A"]), (1, 1))
    lock = cache.path_for(url["A"]).with_name(cache.path_for(url["A"]).name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        add("D")
    finally:
        os.close(fd)
    assert present() == {"A", "D"} and total() <= cache.limit
    # a shard larger than the limit is still cached (with a warning) and goes next time
    big = make_data(3 * size, seed=9)
    with pytest.warns(RuntimeWarning, match="over its limit"):
        with cache.open("s3://bucket/big.tar", size=len(big), sha256=sha(big),
                        fetch=FakeFetch(big)) as f:
            assert within(10, f.read) == big
    assert cache.path_for("s3://bucket/big.tar").exists() and present() == set()
    add("E")
    assert not cache.path_for("s3://bucket/big.tar").exists() and present() == {"E"}


def test_a_second_reader_in_the_process_follows_the_download(tmp_path):
    data, gate = make_data(), threading.Event()
    fetch = FakeFetch(data, gate=gate)
    cache = ShardCache(tmp_path)
    first = cache.open(URL, size=len(data), sha256=sha(data), fetch=fetch, stop=CHUNK)
    try:
        assert within(10, first.read, CHUNK) == data[:CHUNK]
        # a later span of the same shard while the download is held back: served from what has
        # arrived, without waiting for the lock (which the download holds until it is complete)
        second = within(10, lambda: cache.open(URL, size=len(data), sha256=sha(data),
                                               fetch=fetch, start=100, stop=CHUNK))
        # (exactly the span: end of file is only reported once the shard is verified)
        assert within(10, second.read, CHUNK - 100) == data[100:CHUNK]
        assert not fetch.finished.is_set() and fetch.calls == 1
        third = cache.open(URL, size=len(data), sha256=sha(data), fetch=fetch, start=CHUNK)
    finally:
        gate.set()
    assert within(10, third.read) == data[CHUNK:] and fetch.calls == 1
    for f in (first, second, third):
        f.close()
    wait_for_downloads()
    assert cache.cached(URL, len(data), sha(data)) is not None and leftovers(cache) == []
    assert lock_is_free(cache, URL) and cache._live == {}


def test_a_follower_gets_the_download_error(tmp_path):
    data, gate = make_data(), threading.Event()
    fetch = FakeFetch(data, corrupt=1, corrupt_at=len(data) - 1, gate=gate)
    fetch_bad = FakeFetch(data, corrupt=1, corrupt_at=len(data) - 1)
    cache = ShardCache(tmp_path)
    first = cache.open(URL, size=len(data), sha256="0" * 64, fetch=fetch)
    second = cache.open(URL, size=len(data), sha256="0" * 64, fetch=fetch_bad, start=10)
    gate.set()
    for f in (first, second):
        with pytest.raises(CacheIntegrityError):
            within(10, f.read)
        f.close()
    wait_for_downloads()
    assert leftovers(cache) == [] and lock_is_free(cache, URL) and fetch_bad.calls == 0


# --------------------------------------------------------------------------- other processes


def _gated_downloader(cache_dir, gate, corrupt: bool, started):
    """Download the shard in this (child) process; the first attempt holds at half-way until
    ``gate`` exists. With ``corrupt``, that first attempt has byte 10 flipped."""
    data = make_data(seed=5)
    calls = []

    def fetch(offset):
        calls.append(offset)
        body = data
        if corrupt and len(calls) == 1:
            body = data[:10] + bytes([data[10] ^ 0xFF]) + data[11:]
        deadline = time.monotonic() + 20  # no hang if the test never opens the gate
        for i in range(offset, len(body), CHUNK):
            while (len(calls) == 1 and i >= len(body) // 2 and not os.path.exists(gate)
                   and time.monotonic() < deadline):
                time.sleep(0.005)
            yield body[i:i + CHUNK]

    cache = ShardCache(cache_dir)
    with cache.open(URL, size=len(data), sha256=sha(data), fetch=fetch) as f:
        started.set()
        if not corrupt:
            assert f.read() == data
        else:  # our own reader would see the bad bytes too: just let the download finish
            deadline = time.monotonic() + 20
            while not cache.path_for(URL).exists():
                assert time.monotonic() < deadline
                time.sleep(0.01)
            wait_for_downloads()


def _start(target, *args):
    ctx = mp.get_context("fork")
    started = ctx.Event()
    child = ctx.Process(target=target, args=args + (started,))
    child.start()
    assert started.wait(20)
    return child


def test_another_process_follows_the_download_as_it_grows(tmp_path):
    gate, data = tmp_path / "go", make_data(seed=5)
    child = _start(_gated_downloader, tmp_path / "c", gate, False)
    try:
        cache, fetch = ShardCache(tmp_path / "c"), FakeFetch(data)
        f = cache.open(URL, size=len(data), sha256=sha(data), fetch=fetch, start=1000)
        # these bytes arrive while the other process's download waits at half-way
        assert within(10, f.read, 50_000) == data[1000:51_000]
        assert not cache.path_for(URL).exists()
        gate.touch()
        assert within(20, f.read) == data[51_000:]  # the end only once the shard is verified
        assert cache.path_for(URL).read_bytes() == data
        f.close()
        child.join(20)
        assert child.exitcode == 0 and fetch.calls == 0  # downloaded once, by the other one
    finally:
        child.kill()


def test_a_follower_goes_on_alone_when_the_downloading_process_dies(tmp_path):
    child = _start(_doomed, tmp_path)  # downloads one chunk, then hangs until killed
    data = make_data()
    cache, fetch = ShardCache(tmp_path), FakeFetch(data)
    try:
        f = cache.open(URL, size=len(data), sha256=sha(data), fetch=fetch)
        assert within(10, f.read, CHUNK) == data[:CHUNK]  # from the other process's temp file
        assert fetch.calls == 0
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
    assert within(20, f.read) == data[CHUNK:]  # the rest from our own download
    f.close()
    assert fetch.calls == 1 and cache.path_for(URL).read_bytes() == data


def test_a_follower_never_keeps_bytes_of_a_corrupt_download(tmp_path):
    gate, data = tmp_path / "go", make_data(seed=5)
    child = _start(_gated_downloader, tmp_path / "c", gate, True)
    try:
        cache = ShardCache(tmp_path / "c")
        f = cache.open(URL, size=len(data), sha256=sha(data), fetch=FakeFetch(data))
        got = within(10, f.read, 1000)  # byte 10 of the first attempt is wrong
        assert got != data[:1000] and got[11:] == data[11:1000]
        gate.touch()  # the other process finds the mismatch and downloads again
        with pytest.raises(CacheIntegrityError, match="differ from the shard"):
            within(20, f.read)
        f.close()
        child.join(20)
        assert child.exitcode == 0 and cache.path_for(URL).read_bytes() == data
    finally:
        child.kill()


def _read_in_child(cache, data, results):
    with cache.open(URL, size=len(data), sha256=sha(data), fetch=FakeFetch(data)) as f:
        results.put(sha(f.read()))


def test_a_forked_child_follows_the_parents_download_by_its_file(tmp_path):
    # A DataLoader worker forked while its parent downloads (e.g. a prefetch started by a first
    # look at the data) must not wait on the parent's in-process state: no thread feeds it there.
    data, gate = make_data(), threading.Event()
    cache = ShardCache(tmp_path)
    fetch = FakeFetch(data, gate=gate)  # holds after the first chunk until the gate opens
    cache.open(URL, size=len(data), sha256=sha(data), fetch=fetch, prefetch=True).close()
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(cache, data, results))
    child.start()
    try:
        time.sleep(0.2)
        gate.set()
        assert results.get(timeout=20) == sha(data)
        child.join(10)
        assert child.exitcode == 0 and fetch.calls == 1  # the parent's download, once
    finally:
        child.kill()


# --------------------------------------------------------------------------- through remote stores


def _cache_files(cache_dir: Path) -> dict[str, int]:
    out = {}
    for p in cache_dir.glob("*.tar"):
        try:  # (the cache may evict a file between the listing and the stat)
            out[p.name] = p.stat().st_size
        except FileNotFoundError:
            pass
    return out


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
    indexes = [s.index_url for s in small.manifest.shards]
    for url in small.shard_urls() + indexes:  # every shard's and index's bytes asked for once
        assert served.bytes_asked(url) == len(small.files[url]), (url, served.gets(url))
    assert sorted(_cache_files(cache_dir).values()) == sorted(len(small.files[u])
                                                              for u in small.shard_urls())
    assert sorted(p.stat().st_size for p in cache_dir.glob("*.idx")) == \
        sorted(len(small.files[u]) for u in indexes)  # index files: once per machine too
    srv.delay(0)
    srv.clear_counters()
    for ds in ranks:
        ds.set_epoch(1)
    keys = epoch()
    assert sorted(keys[0] + keys[1]) == everything
    assert not any(served.gets(url) for url in small.shard_urls() + indexes), srv.requests


def test_the_cache_downloads_the_next_spans_shards_ahead(small, served, reference, tmp_path):
    source, _ = served.source("http")
    cache_dir = tmp_path / "cache"
    ds = StreamingDataset(source, decode="raw", with_keys=True, seed=7, cache_dir=cache_dir)
    shards = [small.manifest.shards[s.shard].url for s in ds.plan(0, 1).spans]
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

    def fill(fd, size, expected, fetch, st):
        problem = real_fill(fd, size, expected, fetch, st)
        if expected == ("sha256", shard.sha256):  # not another shard's (the next start ahead)
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
    # The next shards' downloads end while the server is still up (the autouse check runs after
    # the server is gone; a download cut off there retries with backoff past its deadline).
    wait_for_downloads()
