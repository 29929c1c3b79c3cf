"""Reading a worker's next local spans into the page cache (shardkit/storage/readahead.py): only
regular files, cold ranges read once, cached ones left alone, nothing raised, and an epoch read
with it on gives the same samples."""

from __future__ import annotations

import os
import threading
import time

import pytest

from shardkit import StreamingDataset, fetching
from shardkit.storage import readahead


def _evict(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _cold(path) -> bool:
    """Whether the file's first page is out of the page cache (tmpfs: never)."""
    if readahead._NOWAIT is None:
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.preadv(fd, [bytearray(4096)], 0, readahead._NOWAIT)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


@pytest.fixture
def big_file(tmp_path):
    path = tmp_path / "shard.tar"
    path.write_bytes(os.urandom(3 << 20))
    return path


def test_a_cold_range_is_read_and_then_found_cached(big_file):
    _evict(big_file)
    if not _cold(big_file):
        pytest.skip("this filesystem keeps the file cached (tmpfs?)")
    scratch = memoryview(bytearray(readahead.AHEAD_CHUNK))
    assert readahead._read_range(scratch, str(big_file), 0, 3 << 20) is True
    assert not _cold(big_file)
    assert readahead._read_range(scratch, str(big_file), 0, 3 << 20) is False


def test_a_fifo_a_folder_and_a_missing_file_are_left_to_the_reader(tmp_path):
    scratch = memoryview(bytearray(readahead.AHEAD_CHUNK))
    fifo = tmp_path / "fifo.tar"
    os.mkfifo(fifo)
    done = []
    # opening a FIFO without a writer would block for good (and reading it would take its data)
    t = threading.Thread(target=lambda: done.append(
        readahead._read_range(scratch, str(fifo), 0, 1 << 20)), daemon=True)
    t.start()
    t.join(10)
    assert done == [False]
    assert readahead._read_range(scratch, str(tmp_path), 0, 100) is False
    assert readahead._read_range(scratch, str(tmp_path / "gone.tar"), 0, 100) is False


def test_where_the_cache_cannot_be_asked_nothing_is_read_twice(big_file, monkeypatch):
    # no RWF_NOWAIT (not Linux; NFS and FUSE refuse it): the reader streams ahead by itself there
    monkeypatch.setattr(readahead, "_NOWAIT", None)
    reads = []
    real = os.preadv
    monkeypatch.setattr(readahead.os, "preadv", lambda *a: reads.append(a) or real(*a))
    _evict(big_file)
    scratch = memoryview(bytearray(readahead.AHEAD_CHUNK))
    assert readahead._read_range(scratch, str(big_file), 0, 3 << 20) is False
    assert reads == []


def test_one_helper_thread_per_process():
    assert readahead.shared() is readahead.shared()


def test_submitted_ranges_are_read_once_each_in_the_background(big_file, monkeypatch):
    monkeypatch.setattr(readahead, "_cold", lambda fd, piece, pos: True)  # every range is cold
    ahead = readahead.ReadAhead()
    ranges = [(big_file, 0, 1 << 20), (big_file, 1 << 20, 2 << 20)]
    ahead.submit(ranges)
    ahead.submit(ranges)  # already asked for: not again
    deadline = time.monotonic() + 30
    while ahead.ranges_read < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert ahead.ranges_read == 2 and ahead.found_cold
    ahead.submit([(big_file, 0, 0)])  # empty: nothing to do
    ahead.close()
    ahead.submit(ranges[:1])  # closed: ignored
    assert ahead.ranges_read == 2


def test_an_epoch_read_with_read_ahead_gives_the_same_samples(tmp_path, monkeypatch):
    import shardkit

    from _helpers_read import image_folder

    src = image_folder(tmp_path / "src", classes=3, per_class=30)
    shardkit.pack_folder(src, tmp_path / "ds", mode="raw", max_samples=7, progress=False)
    kw = dict(decode="raw", with_keys=True, block_size=4, shuffle_buffer=12, seed=3)
    want = [(bytes(x[0]), x[1], x[2]) for x in StreamingDataset(tmp_path / "ds", **kw)]
    submitted = []
    real = readahead.ReadAhead.submit

    def spy(self, ranges):
        ranges = list(ranges)
        submitted.extend(ranges)
        return real(self, ranges)

    misses = iter(range(1, 10**6))
    monkeypatch.setattr(fetching, "cache_misses", lambda: next(misses))  # always "cold"
    monkeypatch.setattr(readahead.ReadAhead, "submit", spy)
    got = [(bytes(x[0]), x[1], x[2]) for x in StreamingDataset(tmp_path / "ds", **kw)]
    assert got == want
    assert submitted  # it was asked to read ahead, for ranges inside the shards
    for path, start, stop in submitted:
        assert 0 <= start < stop <= os.path.getsize(path)


def test_no_read_ahead_once_the_reads_have_a_thread_of_their_own(tmp_path, monkeypatch):
    """Reads moved to a Background thread (a cold disk under a decoding worker) read all along:
    the helper's reads of the next span would only take the disk from them. Reads in the
    worker's own thread still get it."""
    import shardkit
    from shardkit import RandomResizedCrop
    from shardkit.assembly import _Reading
    from shardkit.background import running

    from _helpers_read import image_folder

    src = image_folder(tmp_path / "src", classes=3, per_class=30)
    shardkit.pack_folder(src, tmp_path / "ds", mode="raw", max_samples=7, progress=False)
    kw = dict(batch_size=8, crop=RandomResizedCrop(16), block_size=4, shuffle_buffer=12, seed=3)
    submitted: list[bool] = []  # for each submission: made on a reader thread?
    real = readahead.ReadAhead.submit

    def spy(self, ranges):
        submitted.append(running())
        return real(self, ranges)

    misses = iter(range(1, 10**6))
    monkeypatch.setattr(fetching, "cache_misses", lambda: next(misses))  # always "cold"
    monkeypatch.setattr(readahead.ReadAhead, "submit", spy)
    in_worker = [labels.tolist() for _, labels in StreamingDataset(tmp_path / "ds", **kw)]
    assert submitted and not any(submitted)  # reads never waited: the helper read ahead

    submitted.clear()
    monkeypatch.setattr(_Reading, "WAITED", -1.0)  # every read "waited": to the reader thread
    ran_in_background = []
    real_read = StreamingDataset._read

    def read(self, *args, **kw):
        for item in real_read(self, *args, **kw):
            ran_in_background.append(running())
            yield item

    monkeypatch.setattr(StreamingDataset, "_read", read)
    in_background = [labels.tolist() for _, labels in StreamingDataset(tmp_path / "ds", **kw)]
    assert in_background == in_worker
    assert sum(ran_in_background) > len(ran_in_background) // 2  # the reads did move
    assert submitted == []
