"""Local shard and index files, every read bounded by a timeout.

Whatever may block (open(2), a read the page cache cannot serve) runs in a helper thread
(:mod:`~shardkit.storage.bounded`) that the reader waits for at most ``timeout`` seconds: a
stalled NFS/FUSE mount or a FIFO with no writer is a ``ShardError`` naming the file, not a hang.
Reads the page cache serves go straight into the caller's buffer (``preadv2(RWF_NOWAIT)`` on
Linux), so the hot path costs what a plain read does.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import threading
from collections import deque
from pathlib import Path
from typing import Any, Callable, Protocol, TypeVar, cast

from ..errors import ShardError
from .base import BaseStore
from .bounded import call_within, in_helper

T = TypeVar("T")

LOCAL_CHUNK = 1 << 20  # a helper's read on a page-cache miss; a streaming helper's largest read
LOCAL_FIRST = 64 << 10  # a streaming helper's first read (then doubling): samples come at once
LOCAL_AHEAD = 2  # chunks a streaming helper reads ahead of the reader

_misses = 0  # reads of this process the page cache could not serve (see cache_misses)


def cache_misses() -> int:
    """How many local reads of this process had to wait for the disk so far: the reader starts
    reading ahead (:mod:`~shardkit.storage.readahead`) when the count moves."""
    return _misses


class LocalStore(BaseStore):
    """Reads shard and index files below a local folder.

    Every read has a ``timeout`` (seconds without a byte; None: none, plain blocking reads): a
    stalled NFS/FUSE mount or a FIFO with no writer is a ``ShardError`` naming the file, not a
    hang. Whatever may block (open, a read the page cache cannot serve) runs in a helper thread
    that the reader waits for at most ``timeout``; reads the page cache serves go straight into
    the caller's buffer, so the hot path costs what it did (see :class:`_LocalReader`).
    """

    def __init__(self, base: str | os.PathLike[str], timeout: float | None = 60.0) -> None:
        self.base = Path(base)
        self.timeout = timeout

    def url(self, name: str) -> str:
        return str(self.base / name)

    def read_bytes(self, name: str) -> bytes:
        if self.timeout is not None:
            reader = _LocalReader(self.base / name, self.url(name), 0, None, self.timeout,
                                  "cannot read")
            try:
                return reader.readall()
            finally:
                reader.close()
        try:
            return (self.base / name).read_bytes()
        except OSError as exc:
            raise ShardError(self.url(name), f"cannot read: {exc.strerror or exc}") from exc

    def is_local(self, name: str) -> bool:
        return True

    def stamp(self, name: str) -> str | None:
        def stat() -> str | None:
            try:
                st = os.stat(self.base / name)
            except OSError:
                return None
            return f"{st.st_size}:{st.st_mtime_ns}"

        return stat() if self.timeout is None else _bounded(stat, self.timeout, self.url(name))

    def list(self, suffix: str = "") -> list[str]:
        def names() -> list[str]:
            try:
                with os.scandir(self.base) as entries:
                    return sorted(e.name for e in entries
                                  if e.name.endswith(suffix) and e.is_file())
            except OSError as exc:
                raise ShardError(str(self.base), f"cannot list: {exc.strerror or exc}") from None

        return names() if self.timeout is None else _bounded(names, self.timeout, str(self.base))

    def exists(self, name: str) -> bool:
        """Whether ``name`` exists; a stat(2) that may block, so bounded by ``timeout`` too."""
        path = self.base / name
        if self.timeout is None:
            return path.exists()
        return _bounded(path.exists, self.timeout, self.url(name))

    def size(self, name: str) -> int | None:
        path = self.base / name

        def stat() -> int | None:
            try:
                return os.stat(path).st_size
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise ShardError(self.url(name), f"cannot stat: {exc.strerror or exc}") from None

        return stat() if self.timeout is None else _bounded(stat, self.timeout, self.url(name))

    def open_range(self, name: str, start: int, stop: int) -> io.RawIOBase:
        """A file object positioned at ``start`` that ends at ``stop`` (exclusive)."""
        if self.timeout is not None:
            return _LocalReader(self.base / name, self.url(name), start, stop, self.timeout)
        try:
            f = open(self.base / name, "rb", buffering=0)
            f.seek(start)
        except OSError as exc:
            raise ShardError(self.url(name), f"cannot open: {exc.strerror or exc}") from exc
        return RangeReader(f, stop - start)


class ReadsInto(Protocol):
    """What :class:`RangeReader` reads from: a raw or buffered binary file."""

    def readinto(self, buffer: Any, /) -> int | None: ...

    def close(self) -> None: ...


class RangeReader(io.RawIOBase):
    """At most ``length`` bytes of an underlying file object; tracks how many were read."""

    def __init__(self, raw: ReadsInto, length: int) -> None:
        self.raw, self.remaining, self.consumed = raw, length, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if self.remaining <= 0:
            return 0
        view = memoryview(buf)[: self.remaining]
        n = self.raw.readinto(view) or 0
        self.remaining -= n
        self.consumed += n
        return n

    def close(self) -> None:
        try:
            self.raw.close()
        finally:
            super().close()


# Linux: preadv2(RWF_NOWAIT) reads only what is already in the page cache and never blocks.
_NOWAIT = getattr(os, "RWF_NOWAIT", None) if hasattr(os, "preadv") else None
_NO_NOWAIT = {errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS, errno.ESPIPE}


class _ReadState:
    """What a :class:`_LocalReader` and its helper jobs share. Jobs hold no reference to the
    reader, so an abandoned reader is collected (and closed). At most one job runs at a time
    (``busy``); whoever finishes last, the reader's ``close`` or the job, closes ``fd``."""

    __slots__ = ("busy", "chunks", "cond", "done", "error", "fd", "regular", "size", "stop")

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.chunks: deque = deque()
        self.fd: int | None = None
        self.regular, self.size = False, -1
        self.busy = True  # the open job runs from the start
        self.done = self.stop = False
        self.error: BaseException | None = None

    def end_job(self, error: BaseException | None = None, *, done: bool = False) -> None:
        with self.cond:
            self.busy = False
            self.done = self.done or done
            if error is not None:
                self.error = error
            fd = self.take_fd() if self.stop else None
            self.cond.notify_all()
        if fd is not None:
            os.close(fd)

    def take_fd(self) -> int | None:  # under cond
        fd, self.fd = self.fd, None
        return fd


def _open_job(state: _ReadState, path: str, start: int) -> None:
    """open(2) may block for good (a FIFO without a writer, a dead NFS server): a helper's job."""
    fd = None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        info = os.fstat(fd)
        regular = stat.S_ISREG(info.st_mode)
        if start and not regular:
            os.lseek(fd, start, os.SEEK_SET)  # a FIFO cannot: "cannot open: Illegal seek"
    except BaseException as exc:  # noqa: BLE001 - handed to the reader
        if fd is not None:
            os.close(fd)
        state.end_job(exc)
        return
    with state.cond:
        state.fd, state.regular, state.size = fd, regular, info.st_size if regular else -1
    state.end_job()


def _pread_job(state: _ReadState, fd: int, pos: int, n: int) -> None:
    """One blocking read (a page-cache miss) into a new bytes object: a helper's job."""
    try:
        data = os.pread(fd, n, pos)
    except BaseException as exc:  # noqa: BLE001 - handed to the reader
        state.end_job(exc)
        return
    with state.cond:
        state.chunks.append(data)  # b"": the end of the file
    state.end_job()


def _stream_job(state: _ReadState, fd: int, regular: bool, pos: int, stop: int | None) -> None:
    """Read ``[pos, stop)`` (to EOF when ``stop`` is None) in chunks, at most ``LOCAL_AHEAD``
    ahead of the reader: for FIFOs and filesystems without ``RWF_NOWAIT``. A helper's job."""
    chunk, error = LOCAL_FIRST, None
    try:
        while stop is None or pos < stop:
            with state.cond:
                while len(state.chunks) >= LOCAL_AHEAD and not state.stop:
                    state.cond.wait()
                if state.stop:
                    break
            want = chunk if stop is None else min(chunk, stop - pos)
            chunk = min(2 * chunk, LOCAL_CHUNK)
            data = os.pread(fd, want, pos) if regular else os.read(fd, want)
            if not data:
                break
            pos += len(data)
            with state.cond:
                state.chunks.append(data)
                state.cond.notify_all()
    except BaseException as exc:  # noqa: BLE001 - handed to the reader
        error = exc
    state.end_job(error, done=True)


LOCAL_READ = "shardkit-local-read"  # the name of a helper thread while it reads a local file


def _bounded(fn: Callable[[], T], timeout: float, url: str) -> T:
    """``fn()`` run by a helper thread, waiting at most ``timeout`` for it (a ShardError)."""
    return call_within(timeout, fn, name=LOCAL_READ, stalled=lambda what: _stalled(url, what))


def _stalled(url: str, what: str) -> ShardError:
    error = ShardError(url, f"{what} (stalled file or mount?)")
    error.gave_up = True
    return error


def _read_error(url: str, what: str, exc: BaseException) -> BaseException:
    if isinstance(exc, ShardError) or not isinstance(exc, OSError):
        return exc
    return ShardError(url, f"{what}: {exc.strerror or exc}")


class _LocalReader(io.RawIOBase):
    """Bytes ``[start, stop)`` of a local file (to its end when ``stop`` is None); no wait for
    the file is longer than ``timeout``. A helper thread opens the file (open(2) can block for
    good). Then, on Linux, each read goes straight into the caller's buffer with
    ``preadv2(RWF_NOWAIT)``, which takes only what the page cache holds and never blocks: the
    hot path is the plain read it always was. On a miss (the kernel starts its readahead), a
    helper does one blocking read of up to ``LOCAL_CHUNK`` while the caller waits at most
    ``timeout``. FIFOs and filesystems without ``RWF_NOWAIT`` (NFS, FUSE, not Linux) are read
    by a helper that streams ahead instead. A timed-out wait is a ``ShardError`` naming the
    file; the stuck thread is a daemon and closes the file if its read ever returns."""

    def __init__(self, path, url: str, start: int, stop: int | None, timeout: float,
                 opening: str = "cannot open"):
        self.url, self.timeout, self._opening = url, timeout, opening
        self._pos, self._stop, self.consumed = start, stop, 0
        self._buf, self._off = b"", 0  # bytes a helper read, not yet handed out
        self._mode: str | None = None  # after the open: "direct" or "stream"
        self._fd = -1  # in "direct" mode: the descriptor for RWF_NOWAIT reads
        self._failed: BaseException | None = None
        self._pid = os.getpid()
        self._state = _ReadState()
        in_helper(LOCAL_READ, _open_job, self._state, os.fspath(path), start)

    @property
    def remaining(self) -> int | None:
        return None if self._stop is None else max(self._stop - self._pos, 0)

    def readable(self) -> bool:
        return True

    def _fail(self, error: BaseException) -> BaseException:
        """Remember ``error``: every later read raises it, and none touches the file."""
        self._failed, self._fd = error, -1
        return error

    def _wait(self, ready, what: str) -> None:
        """Under ``cond``: wait at most ``timeout`` for ``ready()``."""
        if not self._state.cond.wait_for(ready, self.timeout):
            raise self._fail(_stalled(self.url, f"{what} for {self.timeout:g} s"))

    def _start(self) -> None:
        st = self._state
        with st.cond:
            self._wait(lambda: not st.busy, f"{self._opening}: no answer")
            error = st.error
        if error is not None:
            raise self._fail(_read_error(self.url, self._opening, error))
        if st.regular and _NOWAIT is not None:
            if st.fd is None:  # closed before its first read
                raise ValueError("I/O operation on closed file")
            self._mode, self._fd = "direct", st.fd
        else:
            self._stream()

    def _stream(self) -> None:
        st = self._state
        self._mode, self._fd = "stream", -1
        with st.cond:
            st.busy = True
        in_helper(LOCAL_READ, _stream_job, st, st.fd, st.regular, self._pos, self._stop)

    def readinto(self, b) -> int:
        if self._fd >= 0 and self._off >= len(self._buf):  # the hot path: from the page cache
            if type(b) is not bytearray:
                b = memoryview(b).cast("B")
            stop, pos = self._stop, self._pos
            if stop is not None and len(b) > stop - pos:
                if stop <= pos:
                    return 0
                b = memoryview(b)[:stop - pos]
            try:
                got = os.preadv(self._fd, (b,), pos, cast(int, _NOWAIT))  # _fd >= 0: "direct" mode
            except OSError:
                return self._readinto(b)  # decides what the error means
            self._pos = pos + got
            self.consumed += got
            return got
        return self._readinto(b)

    def _readinto(self, b) -> int:
        if self._failed is not None:
            raise self._failed
        if self.closed:
            raise ValueError("I/O operation on closed file")
        view = memoryview(b).cast("B")
        n = len(view) if self._stop is None else min(len(view), self._stop - self._pos)
        if n <= 0:
            return 0
        if self._off >= len(self._buf):
            if self._mode is None:
                self._start()
            if self._mode == "direct":
                try:
                    got = os.preadv(self._fd, (view[:n],), self._pos, cast(int, _NOWAIT))  # "direct"
                except BlockingIOError:  # not in the page cache: a helper reads it
                    got = None
                except OSError as exc:
                    if exc.errno not in _NO_NOWAIT:
                        raise self._fail(ShardError(self.url, "cannot read: "
                                                    f"{exc.strerror or exc}")) from None
                    got = None
                    self._stream()  # this filesystem does not take RWF_NOWAIT
                if got is not None:
                    self._pos += got
                    self.consumed += got
                    return got
            if not self._fetch(n):
                return 0
        k = min(n, len(self._buf) - self._off)
        view[:k] = memoryview(self._buf)[self._off:self._off + k]
        self._off += k
        self._pos += k
        self.consumed += k
        return k

    def _fetch(self, n: int) -> bool:
        """The next bytes from a helper into ``_buf``; False at the end of the range."""
        st = self._state
        if self._mode == "direct":  # at most LOCAL_CHUNK: the timeout bounds one read(2)
            global _misses
            _misses += 1
            want = LOCAL_CHUNK if self._stop is None else min(LOCAL_CHUNK, self._stop - self._pos)
            with st.cond:
                st.busy = True
            in_helper(LOCAL_READ, _pread_job, st, st.fd, self._pos, want)
        with st.cond:
            self._wait(lambda: st.chunks or st.error is not None or not st.busy, "no data")
            data = st.chunks.popleft() if st.chunks else None
            st.cond.notify_all()
            error = st.error
        if data is None and error is not None:
            raise self._fail(_read_error(self.url, "cannot read", error))
        if not data:
            return False
        self._buf, self._off = data, 0
        return True

    def readall(self) -> bytes:
        if self._mode is None:
            self._start()
        size, got = max(self._state.size - self._pos, 0), 0  # a regular file: read into one
        buf = bytearray(size)
        with memoryview(buf) as view:
            while got < size:
                n = self.readinto(view[got:])
                if not n:
                    break
                got += n
        del buf[got:]
        parts, want = [bytes(buf)], 1 << 12
        if got == size:  # a FIFO, or a file that grew: read on to the end
            while data := self.read(want):
                parts.append(data)
                want = LOCAL_CHUNK
        return b"".join(parts)

    def close(self) -> None:
        st = getattr(self, "_state", None)
        self._fd = -1
        # Not in a forked child: the helper threads (and the lock's owner) live in the parent.
        if st is not None and not self.closed and self._pid == os.getpid():
            with st.cond:
                st.stop = True
                st.chunks.clear()
                fd = None if st.busy else st.take_fd()
                st.cond.notify_all()
            if fd is not None:
                os.close(fd)
        self._buf = b""
        super().close()
