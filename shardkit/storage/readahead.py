"""Read a worker's next spans of local shards into the page cache while it decodes the current one.

On a cold disk a worker used to wait for each of its reads (one 1 MiB ``pread`` at a time, see
:class:`~shardkit.storage.local._LocalReader`) and leave the disk idle while it decoded: on an
emulated HDD (150 MB/s, 120 requests/s) raw JPEG training ran at 0.56× of its cold rate on the
unthrottled disk while the disk was two-thirds idle. Here one helper thread per process reads the
byte ranges of the spans the worker will read next, in requests of ``AHEAD_CHUNK`` (large, so a
disk seeks rarely), into a scratch buffer: the pages land in the page cache, where the worker's
own reads then find them without waiting. Nothing it reads is used directly, so the read path's
checks, errors and timeouts are unchanged; a range it cannot read is left to the reader.

It costs one more copy of each byte (kernel to scratch, on the helper thread, the GIL released),
so it runs only while reads are cold: the reader asks for it after its own reads missed the page
cache, and :attr:`ReadAhead.found_cold` says whether the last range had pages to read. A range whose
first MiB is in the page cache is taken as cached and left at that.
"""

from __future__ import annotations

import os
import stat
import threading
from collections import deque
from typing import Deque, Optional, Tuple

# One read of the read-ahead thread. Sequential reads of 0.5-1 MiB let the kernel's own readahead
# grow its window and issue ~1.8 MB requests at the full 150 MB/s of the emulated HDD; single reads
# of 4 MiB came out as ~0.9 MB requests at 135 MB/s, and a RWF_NOWAIT probe before every read as
# ~0.8 MB at 103 MB/s (measured with the benchmark's cgroup throttle, 5 MB ranges).
AHEAD_CHUNK = 1 << 20
AHEAD_LIMIT = 64 << 20  # at most this much of one span is read ahead
AHEAD_PENDING = 3  # ranges waiting at most (older ones are dropped: the reader has passed them)
THREAD_NAME = "shardkit-read-ahead"

# Linux: preadv2(RWF_NOWAIT) takes only what the page cache holds: how a cached range is told.
_NOWAIT = getattr(os, "RWF_NOWAIT", None) if hasattr(os, "preadv") else None

Range = Tuple[str, int, int]  # path, start, stop


_shared: dict[int, "ReadAhead"] = {}  # the process's ReadAhead, by pid (forked workers: their own)


def shared() -> "ReadAhead":
    """This process's :class:`ReadAhead` (one helper thread per process, whatever the number
    of readers)."""
    pid = os.getpid()
    ahead = _shared.get(pid)
    if ahead is None:
        _shared.clear()  # a forked child: the parent's thread is not here
        ahead = _shared[pid] = ReadAhead()
    return ahead


class ReadAhead:
    """One helper thread of a process that reads ranges of local files into the page cache, in
    the order they are submitted; see the module docstring. ``submit`` never blocks."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._pending: Deque[Range] = deque()
        self._recent: Deque[Range] = deque(maxlen=8)  # done or in progress: not read again
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self.found_cold = False  # the last range read had pages that were not cached
        self.ranges_read = 0  # ranges it read (and found cold), for tests and the benchmark

    def submit(self, ranges) -> None:
        """Read these ``(path, start, stop)`` ranges after the ones already asked for."""
        with self._cond:
            if self._closed:
                return
            for path, start, stop in ranges:
                item = (os.fspath(path), int(start), int(min(stop, start + AHEAD_LIMIT)))
                if item[2] > item[1] and item not in self._recent and item not in self._pending:
                    self._pending.append(item)
            while len(self._pending) > AHEAD_PENDING:
                self._pending.popleft()
            if self._pending and self._thread is None:
                self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._pending.clear()
            self._cond.notify_all()

    def _run(self) -> None:
        scratch = memoryview(bytearray(AHEAD_CHUNK))
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                item = self._pending.popleft()
                self._recent.append(item)
            cold = _read_range(scratch, *item)
            self.found_cold = cold
            self.ranges_read += cold


def _cold(fd: int, piece: memoryview, pos: int) -> bool:
    """Whether ``piece`` at ``pos`` is out of the page cache: asked of a range's first read,
    once. A miss starts the kernel's readahead there with a window sized by the read: a
    one-byte probe (of the first or the last byte) gave smaller requests, -14 to -20% on the
    emulated HDD; probing before every read upsets the readahead too. False where it cannot be told (no
    ``RWF_NOWAIT``: not Linux, NFS, FUSE; the reader streams ahead there by itself), so nothing
    is read twice on a filesystem that would send each read over the network."""
    if _NOWAIT is None:
        return False
    try:
        return os.preadv(fd, (piece,), pos, _NOWAIT) < len(piece)
    except BlockingIOError:
        return True
    except OSError:
        return False


def _read_range(scratch: memoryview, path: str, start: int, stop: int) -> bool:
    """Read ``[start, stop)`` of ``path`` into ``scratch`` piece by piece; whether any of it had to
    come from the disk. Only regular files (opening a FIFO would take its data); any error ends
    the range quietly (the reader meets it and names it)."""
    fd = -1
    cold = False
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        pos = start
        if not _cold(fd, scratch[:min(len(scratch), stop - pos)], start):
            return False  # cached, or no way to tell: left to the reader
        cold = True
        while pos < stop:
            got = os.preadv(fd, (scratch[:min(len(scratch), stop - pos)],), pos)
            if got <= 0:
                break  # the file ended
            pos += got
    except OSError:
        pass
    finally:
        if fd >= 0:
            os.close(fd)
    return cold
