"""The generic fsspec store (``storage.generic``) and its dispatch (``storage.urls``): sources
under any protocol fsspec knows, read through one range-read path with the remote stores' retries.

No network: fsspec's ``memory://`` filesystem, and ``flakymem://``, a test-only subclass of it
(the same files) whose opened ``.tar`` files drop the connection or stall on demand. Every read
is compared with the local read of the same dataset: the same keys, bytes and order.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.registry import _registry, known_implementations

import shardkit
from shardkit import Manifest, StreamingDataset, cli, make_loader
from shardkit.errors import ShardError
from shardkit.storage import FsspecStore, open_store

from _helpers_read import all_keys, image_folder, pack

BASE = "shardkit-test/ds"  # the dataset's prefix in the memory filesystem
LOADER_TIMEOUT = 60


# --------------------------------------------------------------------------- filesystems


class FlakyFS(MemoryFileSystem):
    """``flakymem://``: the files of ``memory://``, whose ``.tar`` files misbehave as told.

    ``drop_after=N, drops=K``: the first K opens of each .tar file (all of them when K < 0)
    deliver N bytes, then every read raises ConnectionError. ``stall=True``: reads of .tar files
    block until :attr:`release` is set. ``pause=S``: each read sleeps S seconds between taking
    the file's position and reading (memory files are one object for every opener: another
    stream's seek then moves this one). Every open and read is logged in :attr:`log` as
    ``(path, "open" | "read" | "drop", (start, stop) or position)``."""

    protocol = "flakymem"
    log: list = []
    release = threading.Event()

    def __init__(self, *args, drop_after: int | None = None, drops: int = 0,
                 stall: bool = False, pause: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.drop_after, self.drops, self.stall, self.pause = drop_after, drops, stall, pause

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, str):
            path = path.removeprefix("flakymem://")
        return super()._strip_protocol(path)

    def _open(self, path, mode="rb", **kwargs):
        path = self._strip_protocol(path)
        if mode != "rb" or not path.endswith(".tar"):
            return super()._open(path, mode, **kwargs)
        opened = sum(1 for p, what, _ in self.log if p == path and what == "open")
        self.log.append((path, "open", None))
        file = super()._open(path, mode, **kwargs)  # FileNotFoundError when missing
        dropping = self.drop_after is not None and (self.drops < 0 or opened < self.drops)
        return _Misbehaving(file, path, self.drop_after if dropping else None, self.stall,
                            self.pause)


class _Misbehaving:
    """A file object that ends its connection after ``limit`` bytes, stalls, or pauses."""

    def __init__(self, file, path: str, limit: int | None, stall: bool, pause: float):
        self.file, self.path, self.limit, self.stall, self.sent = file, path, limit, stall, 0
        self.pause = pause

    def seek(self, pos, whence=0):
        return self.file.seek(pos, whence)

    def tell(self):
        return self.file.tell()

    def read(self, n=-1):
        if self.stall:
            FlakyFS.release.wait(30)
        pos = self.file.tell()
        time.sleep(self.pause)
        if self.limit is not None:
            if self.sent >= self.limit:
                FlakyFS.log.append((self.path, "drop", pos))
                raise ConnectionError("connection reset by the test filesystem")
            n = self.limit - self.sent if n is None or n < 0 else min(n, self.limit - self.sent)
        data = self.file.read(n)
        self.sent += len(data)
        FlakyFS.log.append((self.path, "read", (pos, pos + len(data))))
        return data

    def close(self):
        pass  # memory files are shared by every opener


fsspec.register_implementation("flakymem", FlakyFS, clobber=True)


# --------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> Path:
    """24 small JPEGs in 5 shards (max_samples=5), packed into a local folder."""
    root = tmp_path_factory.mktemp("fsspec")
    src = image_folder(root / "src", classes=3, per_class=8, size=(48, 40))
    pack(src, root / "local", max_samples=5)
    return root / "local"


@pytest.fixture
def memory(local):
    """The local dataset's files copied to ``memory://shardkit-test/ds``; removed afterwards."""
    fs = fsspec.filesystem("memory")
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        fs.pipe_file(f"/{BASE}/{path.relative_to(local).as_posix()}", path.read_bytes())
    FlakyFS.log.clear()
    FlakyFS.release.clear()
    yield f"memory://{BASE}"
    FlakyFS.release.set()  # stalled test reads end
    fs.rm(f"/{BASE.split('/')[0]}", recursive=True)


def read(source, num_workers: int = 0, **kw) -> list[tuple[str, bytes, int]]:
    """``(key, raw image bytes, label)`` of one epoch, through make_loader when num_workers > 0."""
    kw.setdefault("seed", 7)
    ds = StreamingDataset(source, decode="raw", with_keys=True, **kw)
    items = list(ds) if num_workers == 0 else list(make_loader(
        ds, num_workers=num_workers, persistent_workers=False, timeout=LOADER_TIMEOUT))
    return [(key, bytes(image), int(label)) for image, label, key in items]


def check_same(got, want) -> None:
    """Exactly the same samples in the same order; on failure, say what was lost or duplicated."""
    keys = [k for k, _, _ in got]
    dup = {k: n for k, n in Counter(keys).items() if n > 1}
    lost = {k for k, _, _ in want} - set(keys)
    assert not dup and not lost, f"duplicated {dup}, lost {sorted(lost)}"
    assert keys == [k for k, _, _ in want], "same samples, different order"
    assert got == want, "same keys, different bytes or labels"


def shard_names(local: Path) -> list[str]:
    return [s.url for s in Manifest.load(local).shards]


# --------------------------------------------------------------------------- (a) reading


@pytest.mark.parametrize("num_workers", [0, 2])
def test_memory_reads_agree_with_the_local_folder(local, memory, num_workers, tmp_path):
    want = read(local, num_workers)
    assert sorted(k for k, _, _ in want) == sorted(all_keys(local))  # every sample, once
    assert isinstance(StreamingDataset(memory).manifest.store, FsspecStore)
    check_same(read(memory, num_workers), want)
    check_same(read(memory + "/.shardkit/manifest.json", num_workers), want)
    # through the shard cache: every shard downloaded whole, checked, kept under its final name
    cache = tmp_path / "cache"
    check_same(read(memory, num_workers, cache_dir=cache), want)
    cached = {p.read_bytes() for p in cache.rglob("*")
              if re.fullmatch(r"[0-9a-f]{32}\.tar", p.name)}
    assert cached == {(local / name).read_bytes() for name in shard_names(local)}
    fs = fsspec.filesystem("memory")
    for name in shard_names(local):
        fs.rm_file(f"/{BASE}/{name}")
    check_same(read(memory, num_workers, cache_dir=cache), want)  # from the cache alone
    with pytest.raises(ShardError, match="missing or empty: the file does not exist"):
        read(memory, num_workers)


def test_a_list_of_memory_urls_reads_like_the_local_list(local, memory):
    names = shard_names(local)
    urls = [f"{memory}/{name}" for name in reversed(names)]
    m = Manifest.from_urls(urls)
    assert [s.url for s in m.shards] == urls
    assert m.num_samples == Manifest.load(local).num_samples
    paths = [str(local / name) for name in reversed(names)]
    check_same(read(urls), read(paths))
    check_same(read(urls, num_workers=2), read(paths, num_workers=2))


def test_verify_reads_a_memory_dataset(local, memory, capsys):
    report = shardkit.verify(memory)
    assert report.ok and report.shards == len(shard_names(local)) and report.samples == 24
    assert cli.main(["verify", "--quiet", memory]) == 0
    assert "verify OK: 5 shards, 24 samples" in capsys.readouterr().out
    fs = fsspec.filesystem("memory")  # one byte changed: verify says so
    path = f"/{BASE}/{shard_names(local)[2]}"
    data = bytearray(fs.cat_file(path))
    data[600] ^= 1
    fs.pipe_file(path, bytes(data))
    assert not shardkit.verify(memory).ok
    assert cli.main(["verify", "--quiet", memory]) == 1


def test_packing_into_a_generic_protocol_is_refused(tmp_path):
    src = image_folder(tmp_path / "src", classes=1, per_class=2)
    with pytest.raises(ValueError, match="local folders or s3:// only"):
        pack(src, "memory://shardkit-test/out")
    assert not fsspec.filesystem("memory").exists("/shardkit-test/out/.shardkit/manifest.json")


# --------------------------------------------------------------------------- (b) faults


def _delivered(path: str) -> list[tuple[int, int]]:
    return sorted(span for p, what, span in FlakyFS.log if p == path and what == "read" and
                  span[1] > span[0])


@pytest.mark.parametrize("cached", [False, True])
def test_dropped_reads_resume_at_the_right_byte(local, memory, cached, tmp_path):
    names = shard_names(local)
    sizes = {name: (local / name).stat().st_size for name in names}
    assert all(size > 3 * 2500 for size in sizes.values())  # each shard spans several drops
    want = read([str(local / name) for name in names])
    urls = [f"flakymem://{BASE}/{name}" for name in names]
    # options keyed by protocol reach the flakymem filesystem (and only it)
    options = {"flakymem": {"drop_after": 2500, "drops": 2}, "s3": {"key": "unused"}}
    got = read(urls, storage_options=options, timeout=5, retries=2,
               cache_dir=tmp_path / "cache" if cached else None)
    check_same(got, want)
    for name in names:
        path = f"/{BASE}/{name}"
        drops = [pos for p, what, pos in FlakyFS.log if p == path and what == "drop"]
        assert len(drops) == 2, (name, drops)  # the faults happened
        spans = _delivered(path)
        for (_, stop), (start, _) in zip(spans, spans[1:]):
            assert start >= stop, f"{name}: bytes {start}..{stop} delivered twice"
        for pos in drops:  # each drop is followed by a read from exactly where it stopped
            assert any(start == pos for start, _ in spans), (name, pos, spans)
        if cached:  # the whole shard, each byte once
            assert sum(b - a for a, b in spans) == sizes[name]


def test_a_file_that_keeps_failing_is_an_error_naming_its_url(local, memory):
    first = shard_names(local)[0]
    ds = StreamingDataset(f"flakymem://{BASE}", decode="raw", shuffle=False, timeout=5, retries=2,
                          storage_options={"drop_after": 0, "drops": -1})
    with pytest.raises(ShardError) as info:
        list(ds)
    assert str(info.value).startswith(f"flakymem://{BASE}/{first}: ")
    assert "after 3 tries" in str(info.value) and "ConnectionError" in str(info.value)
    opens = [p for p, what, _ in FlakyFS.log if what == "open"]
    assert opens == [f"/{BASE}/{first}"] * 3  # retries=2: three tries, then the error
    # the store says it gave up (skip mode then writes the rest of the file off)
    store = open_store("flakymem", BASE, {"drop_after": 0, "drops": -1}, retries=1, timeout=5)
    with pytest.raises(ShardError, match="after 2 tries") as info:
        list(store.iter_bytes(first, 0, 1000))
    assert info.value.gave_up


def test_a_stalled_read_times_out_and_is_retried(local, memory):
    first = shard_names(local)[0]
    store = open_store("flakymem", BASE, {"stall": True}, retries=1, timeout=0.5)
    began = time.monotonic()
    with pytest.raises(ShardError, match=r"after 2 tries: TimeoutError: no answer for 0.5 s") \
            as info:
        list(store.iter_bytes(first, 0, 1000))
    assert time.monotonic() - began < 5
    assert info.value.gave_up and info.value.url == f"flakymem://{BASE}/{first}"
    assert [what for _, what, _ in FlakyFS.log] == ["open", "open"]  # the retry did not wait
    FlakyFS.release.set()  # the stuck calls end; their threads with them
    deadline = time.monotonic() + 10
    while any(t.name == "shardkit-fsspec-call" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "helper threads left behind"
        time.sleep(0.01)


def test_streams_of_one_file_in_one_process_do_not_mix(local, memory):
    name = shard_names(local)[0]
    data = (local / name).read_bytes()
    store = open_store("flakymem", BASE, {"pause": 0.002}, timeout=10)
    ranges = [(i * 1500, i * 1500 + 6000) for i in range(8)]
    got: dict = {}

    def read_range(rng):
        got[rng] = b"".join(store.iter_bytes(name, *rng, chunk=1000))

    threads = [threading.Thread(target=read_range, args=(rng,)) for rng in ranges]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert all(got[(a, b)] == data[a:b] for a, b in ranges)


def test_missing_and_short_files_fail_at_once(local, memory):
    first = shard_names(local)[0]
    size = (local / first).stat().st_size
    store = open_store("flakymem", BASE, retries=3, timeout=5)
    assert store.size(first) == size and store.size("nope.tar") is None
    assert store.exists(first) and not store.exists("nope.tar")
    assert store.read_bytes(first) == (local / first).read_bytes()
    began = time.monotonic()
    with pytest.raises(ShardError, match="not found"):
        list(store.iter_bytes("nope.tar", 0, 100))
    with pytest.raises(ShardError, match="not found"):
        store.read_bytes("nope.tar")
    with pytest.raises(ShardError, match=f"asked for bytes 0..{size + 512}, the file ends at "
                                         f"byte {size}") as info:
        b"".join(store.iter_bytes(first, 0, size + 512))
    assert not info.value.gave_up  # the reader diagnoses it (a truncated shard)
    assert time.monotonic() - began < 0.5  # no backoff (0.7 s at least for 3 retries)
    opened = [p.rsplit("/", 1)[1] for p, what, _ in FlakyFS.log if what == "open"]
    assert opened == [first, "nope.tar", "nope.tar", first]  # one try each


# --------------------------------------------------------------------------- (c) dispatch


def test_an_unknown_protocol_is_refused_by_name():
    for call in (lambda: Manifest.load("nosuch://bucket/ds"),
                 lambda: Manifest.from_urls(["nosuch://bucket/ds/shard-000000.tar"]),
                 lambda: StreamingDataset("nosuch://bucket/ds").manifest):
        with pytest.raises(ValueError, match="unsupported protocol 'nosuch'"):
            call()


def test_a_known_protocol_without_its_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # `import gcsfs` fails
    monkeypatch.delitem(_registry, "gs", raising=False)  # not imported yet
    fsspec_says = known_implementations["gs"]["err"]
    for call in (lambda: Manifest.load("gs://bucket/ds"),
                 lambda: StreamingDataset(["gs://bucket/ds/shard-000000.tar"]).manifest):
        with pytest.raises(ImportError) as info:
            call()
        assert str(info.value) == f"gs:// needs gcsfs: pip install gcsfs ({fsspec_says})"


def test_file_urls_stay_local_paths(local):
    store = Manifest.load(f"file://{local}").store
    assert type(store).__name__ == "LocalStore"
    with pytest.raises(ValueError, match="simplecache"):
        Manifest.load(f"simplecache://{local}")

