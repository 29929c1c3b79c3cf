"""Local reads have a timeout: a stalled file (a FIFO standing in for a hung NFS/FUSE mount) is a
``ShardError`` naming the shard within seconds, never a hang, in the main process and in
DataLoader workers. Every wait in these tests is bounded by a thread join or DataLoader timeout.
"""

from __future__ import annotations

import gc
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import shardkit
from shardkit import StreamingDataset, make_loader
from shardkit.errors import ManifestError, ShardError
from shardkit.storage import LocalStore, make_store
from shardkit.storage import bounded as helper_threads
from shardkit.storage import local as local_storage

from _helpers_read import image_folder, pack

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")

STALLED = "shard-000000.tar"
LIMIT = 60  # seconds before a test gives up waiting (a hang fails, it never blocks the suite)


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("timeout")
    src = image_folder(root / "src", classes=2, per_class=6, size=(32, 24))
    pack(src, root / "ds", max_samples=4)
    return root / "ds"


class Stalled:
    """A copy of the dataset whose ``name`` is a FIFO: a writer thread serves the file's first
    ``serve`` bytes to whoever opens it, then stalls (keeps it open, writes nothing more)."""

    def __init__(self, packed: Path, dest: Path, name: str = STALLED, serve: int | None = 4096):
        shutil.copytree(packed, dest)
        self.path = dest / name
        self.folder, self.data = dest, self.path.read_bytes()
        self.path.unlink()
        os.mkfifo(self.path)
        self.release = threading.Event()
        self.opened = threading.Event()
        self.writer = None
        if serve is not None:
            self.writer = threading.Thread(target=self._serve, args=(serve,), daemon=True)
            self.writer.start()

    def _serve(self, n: int) -> None:
        with open(self.path, "wb") as f:  # blocks until a reader opens the FIFO
            self.opened.set()
            f.write(self.data[:n])
            f.flush()
            self.release.wait(LIMIT)

    def close(self) -> None:
        self.release.set()
        try:  # a writer still waiting for a reader: give it one, so it ends
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
            os.close(fd)
        except OSError:
            pass
        if self.writer is not None:
            self.writer.join(10)


@pytest.fixture
def stalled(packed, tmp_path):
    s = Stalled(packed, tmp_path / "ds")
    yield s
    s.close()


def bounded(fn, limit: float = LIMIT):
    """``(result or exception, seconds)`` of ``fn()`` run in a thread; fails if it hangs."""
    out: list = []

    def run():
        try:
            out.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out.append(exc)

    t0 = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    assert not thread.is_alive(), f"still blocked after {limit} s: a hang, not an error"
    return out[0], time.monotonic() - t0


def test_stalled_local_shard_is_an_error_naming_it(stalled):
    ds = StreamingDataset(stalled.folder, timeout=1, shuffle=False, decode="raw")
    result, seconds = bounded(lambda: list(ds))
    assert isinstance(result, ShardError), result
    assert result.url == str(stalled.folder / STALLED)
    assert "no data for 1 s" in str(result)
    assert stalled.opened.is_set()  # the shard was opened and served: the read stalled
    assert seconds < 15


def test_stalled_local_shard_in_a_loader_worker_ends_the_loader_with_an_error(stalled):
    ds = StreamingDataset(stalled.folder, timeout=1, shuffle=False, decode="raw")
    loader = make_loader(ds, num_workers=1, persistent_workers=False, timeout=LIMIT)
    result, seconds = bounded(lambda: list(loader))
    assert isinstance(result, ShardError), result
    assert STALLED in str(result) and "no data for 1 s" in str(result)
    assert stalled.opened.is_set()
    assert seconds < 30
    # The failed iteration's DataLoader iterator sits in a reference cycle (the error's
    # traceback): shut its worker down here, not in whatever thread the garbage collector
    # happens to run in during the next test (it once ran inside a helper's open(2) job there).
    result = loader = None
    gc.collect()


def test_file_that_never_opens_is_an_error_too(packed, tmp_path):
    """A FIFO nobody writes to blocks open(2) itself, like a dead NFS server."""
    s = Stalled(packed, tmp_path / "ds", serve=None)
    try:
        ds = StreamingDataset(s.folder, timeout=1, shuffle=False)
        result, seconds = bounded(lambda: list(ds))
        assert isinstance(result, ShardError), result
        assert result.url == str(s.path) and "cannot open: no answer for 1 s" in str(result)
        assert seconds < 15
    finally:
        s.close()


def test_stalled_index_file_is_an_error_naming_it(packed, tmp_path):
    s = Stalled(packed, tmp_path / "ds", name=".shardkit/shard-000000.idx", serve=16)
    try:
        ds = StreamingDataset(s.folder, timeout=1, shuffle=False)
        result, _ = bounded(lambda: list(ds))
        assert isinstance(result, ShardError), result
        # the shard is named, and its index, whose read stalled
        assert result.url == str(s.folder / "shard-000000.tar") and "no data for 1 s" in str(result)
        assert f"its index {s.path} cannot be read" in str(result)
    finally:
        s.close()


def test_the_timeout_reaches_the_local_store(packed):
    assert StreamingDataset(packed, timeout=7).manifest.store.timeout == 7
    assert shardkit.Manifest.load(packed, timeout=3).store.timeout == 3
    assert make_store(packed, timeout=5)[0].timeout == 5
    assert LocalStore(packed).timeout == 60


def _evict(path: Path) -> None:
    """Drop a file from the page cache (where possible), so reads take the miss path."""
    if hasattr(os, "posix_fadvise"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@pytest.mark.parametrize("mode", ["cached", "evicted", "streamed", "no timeout"])
def test_local_reads_give_the_same_bytes_in_every_mode(tmp_path, monkeypatch, mode):
    """cached: reads straight from the page cache (RWF_NOWAIT); evicted: misses read by a
    helper; streamed: a helper reading ahead (FIFOs, NFS, FUSE, not Linux); no timeout: plain."""
    data = np.random.default_rng(0).integers(0, 256, 5_000_000, dtype=np.uint8).tobytes()
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    if mode == "streamed":
        monkeypatch.setattr(local_storage, "_NOWAIT", None)
    store = LocalStore(tmp_path, timeout=None if mode == "no timeout" else 60)
    assert store.read_bytes("f.bin") == data
    rng = np.random.default_rng(1)
    for start, stop in [(0, 0), (0, 1), (5, 5), (0, len(data)), (len(data) - 1, len(data)),
                        (1000, len(data) + 100)] + \
            [tuple(sorted(rng.integers(0, len(data), 2))) for _ in range(20)]:
        for size in (1, 10240, 100_000, 1 << 20, -1):
            if mode == "evicted":
                _evict(path)
            reader = store.open_range("f.bin", int(start), int(stop))
            parts = []
            while True:
                part = reader.read(size)
                if not part:
                    break
                parts.append(part)
                if size == 1 and len(parts) > 50:
                    parts.append(reader.read())
            reader.close()
            assert b"".join(parts) == data[start:stop], (start, stop, size)
        reader = store.open_range("f.bin", int(start), int(stop))
        buf = bytearray(stop - start + 10)
        got = 0
        while True:
            n = reader.readinto(memoryview(buf)[got:got + 77_777])
            if not n:
                break
            got += n
        reader.close()
        assert bytes(buf[:got]) == data[start:stop]
    assert b"".join(store.iter_bytes("f.bin", 10, 3_000_000)) == data[10:3_000_000]
    with pytest.raises(ShardError, match="cannot read: No such file"):
        store.read_bytes("missing.bin")
    with pytest.raises(ShardError, match="cannot open: No such file"):
        store.open_range("missing.bin", 0, 10).read(10)
    closed = store.open_range("f.bin", 0, 10)
    closed.close()
    for read in (closed.read, closed.readall):
        with pytest.raises(ValueError, match="closed file"):
            read()


def test_readers_leave_no_threads_behind(packed, tmp_path):
    before = threading.active_count()
    ds = StreamingDataset(packed, decode="raw")
    for epoch in range(3):
        ds.set_epoch(epoch)
        list(ds)
    assert threading.active_count() <= before + 8  # idle helpers are kept for reuse, a few
    (tmp_path / "big.bin").write_bytes(bytes(20 << 20))
    idle = helper_threads._helpers["idle"]
    reader = LocalStore(tmp_path).open_range("big.bin", 0, 20 << 20)
    reader.read(10)  # its helper has read ahead and now waits for the reader
    del reader  # abandoned, not closed: the helper stops all the same, and is idle again
    deadline = time.monotonic() + 10
    while helper_threads._helpers["idle"] < max(idle, 1) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert helper_threads._helpers["idle"] >= max(idle, 1)


def test_stalled_folder_is_an_error_when_loading_the_manifest(packed, monkeypatch):
    """Loading a manifest stats it first: on a dead mount that stat hangs, and is bounded too."""
    real = os.stat
    release = threading.Event()

    def hung(path, *a, **k):
        if os.fspath(path).endswith("manifest.json"):
            release.wait(LIMIT)  # what stat(2) on a dead NFS server does
        return real(path, *a, **k)

    monkeypatch.setattr(os, "stat", hung)
    try:
        result, seconds = bounded(lambda: shardkit.Manifest.load(packed, timeout=1))
        assert isinstance(result, ManifestError), result
        where = packed / ".shardkit" / "manifest.json"
        assert str(result).startswith(f"{where}: cannot read the manifest")
        assert "no answer for 1 s" in str(result)
        assert seconds < 15
    finally:
        release.set()
