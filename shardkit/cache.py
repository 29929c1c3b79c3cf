"""A size-bounded shard cache on local disk, shared by processes, streaming while it downloads.

Storage-agnostic: callers pass ``fetch(offset)``, which yields the shard's bytes from ``offset``
(retrying network faults itself), and the manifest's ``size`` and ``sha256`` (or ``blake3``). A
final name (``sha256(url)[:32].tar``; ``.idx`` for a shard's index file) only ever holds a complete, verified
file (unique temp, fsync, check, rename); one mismatch downloads again, a second raises
:class:`CacheIntegrityError`. One download per machine: the downloader holds ``flock`` on
``<name>.lock`` (it dies with the process; a forked child drops its copies) and writes the name of
its temp file into it; other readers follow the download as it is written: in the same process
through shared state, in other processes by reading the growing temp file (and if that download
fails or its process dies, they go on from their own download or the finished file, after checking
that the bytes already returned match). ``read()`` raises the download's errors and returns ``b""``
only once the shard is verified.
Early close: the download goes on to completion in the background (daemon thread). After each
added file, LRU files (mtime, touched on hits) are evicted down to ``limit``, never a
locked one nor the new one, and temps whose lock is free (killed processes) are removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import re
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Literal, Optional, cast, overload

from . import digests
from .errors import ShardError

__all__ = ["CacheIntegrityError", "ShardCache"]

Fetch = Callable[[int], Iterable[bytes]]
_NAME = re.compile(r"^[0-9a-f]{32}\.(?:tar|idx)$")  # shards, and their index files
_TEMP = re.compile(r"^\.([0-9a-f]{32}\.(?:tar|idx))\.tmp-[0-9a-f]{32}$")
_BUFFER = 256 << 10
_POLL = 0.002  # seconds between looks at another process's download when no new bytes are there
_HELD: set[int] = set()  # lock fds this process holds


class CacheIntegrityError(ShardError):
    """A downloaded shard does not match the manifest's size and hash (names the shard URL)."""

    gave_up = True  # downloaded twice already: its other samples are not worth trying


@overload
def _lock(path: Path, blocking: Literal[True] = True) -> int: ...
@overload
def _lock(path: Path, blocking: bool) -> Optional[int]: ...


def _lock(path: Path, blocking: bool = True) -> Optional[int]:
    """An fd holding ``flock(LOCK_EX)`` on ``path`` (created if needed); None if busy, non-blocking."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    _HELD.add(fd)  # before flock: a fork while we wait must not leave the child holding it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BaseException as exc:
        _unlock(fd)
        if isinstance(exc, BlockingIOError):
            return None
        raise
    return fd


def _lock_free(path: Path) -> bool:
    held = _lock(path, blocking=False)
    if held is None:
        return False
    _unlock(held)
    return True


def _unlock(fd: int) -> None:
    _HELD.discard(fd)
    os.close(fd)


def _drop_inherited_locks() -> None:
    """In a forked child: close the copies of the parent's locks, or the child waits on itself."""
    for fd in _HELD:
        os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


class _State:
    """What a download and its reader share, guarded by ``cond``."""

    def __init__(self, fds: list[int], users: int = 2, written: int = 0, done: bool = False):
        self.cond = threading.Condition()
        self.fds = fds  # one fd per attempt, the last is current; closed by the last user
        self.written = written  # bytes the current attempt has written
        self.done = done  # verified, in place, unlocked
        self.error: Optional[BaseException] = None
        self.users = users  # the download thread and the reader

    def drop(self) -> None:
        with self.cond:
            self.users -= 1
            if self.users == 0:
                for fd in self.fds:
                    os.close(fd)


class _Reader(io.RawIOBase):
    """Bytes ``[start, stop)`` of a shard, following its download's current attempt by ``pread``."""

    def __init__(self, url: str, state: _State, start: int, stop: int):
        super().__init__()
        self._url, self._st, self._start, self._stop = url, state, start, stop
        self._pos, self._attempt = start, 0

    def readable(self) -> bool:
        return True

    def _ready(self) -> bool:
        st = self._st
        if st.error is not None or not st.fds:
            return st.error is not None
        if self._attempt != len(st.fds) - 1:  # a new attempt: ready once it covers what we returned
            return st.written >= self._pos
        return st.written > self._pos if self._pos < self._stop else st.done  # EOF once verified

    def readinto(self, buf) -> int:
        st = self._st
        while len(buf):
            with st.cond:
                st.cond.wait_for(self._ready)
                if st.error is not None:
                    raise st.error
                newest, avail = len(st.fds) - 1, min(st.written, self._stop) - self._pos
                old, cur = st.fds[self._attempt], st.fds[newest]
            if newest == self._attempt:
                data = os.pread(cur, min(len(buf), avail), self._pos) if avail > 0 else b""
                buf[:len(data)] = data
                self._pos += len(data)
                return len(data)
            for pos in range(self._start, self._pos, 1 << 20):  # we returned bytes of a bad attempt
                n = min(1 << 20, self._pos - pos)
                if os.pread(old, n, pos) != os.pread(cur, n, pos):
                    raise CacheIntegrityError(self._url, "bytes already returned by read() came "
                                              "from a corrupt download and differ from the shard")
            self._attempt = newest
        return 0

    def close(self) -> None:
        if not self.closed:
            self._st.drop()
        super().close()


class _FileFollower(io.RawIOBase):
    """Bytes ``[start, stop)`` of a shard that another process is downloading, read from its temp
    file as it grows. EOF once that file is the verified shard (renamed to its final name). If the
    download fails or its process dies, the rest comes from ``reopen(start)`` (our own download or
    the finished file) once the bytes already returned are found to be the same."""

    def __init__(self, url: str, fd: int, path: Path, start: int, stop: int,
                 reopen: Callable[[int], BinaryIO]):
        super().__init__()
        self._url, self._fd, self._path = url, fd, path
        self._start, self._stop, self._pos = start, stop, start
        self._reopen = reopen
        self._next: BinaryIO | None = None

    def readable(self) -> bool:
        return True

    def _state(self) -> str:
        """"done" (our file is the verified shard), "gone" (that download ended without it) or
        "growing"."""
        mine = os.fstat(self._fd)

        def final() -> bool:
            with contextlib.suppress(FileNotFoundError):
                f = os.stat(self._path)
                return (f.st_ino, f.st_dev) == (mine.st_ino, mine.st_dev)
            return False

        if final():
            return "done"
        if mine.st_nlink == 0:  # the downloader removed it: a bad attempt, or it gave up
            return "gone"
        if not _lock_free(self._path.with_name(self._path.name + ".lock")):
            return "growing"
        # the lock was free: the downloader's process died, or it finished just now
        return "done" if final() else "gone"

    def readinto(self, buf) -> int:
        while self._next is None:
            want = min(len(buf), self._stop - self._pos)
            if want > 0:  # straight into the caller's buffer: no bytes object in between
                got = os.preadv(self._fd, [memoryview(buf).cast("B")[:want]], self._pos)
                if got:
                    self._pos += got
                    return got
            elif not len(buf):
                return 0
            state = self._state()
            if state == "done":
                if want == 0:
                    return 0  # the end of the range, and the shard is verified
                if not os.pread(self._fd, 1, self._pos):
                    raise CacheIntegrityError(self._url, "the cached shard is shorter than its "
                                              "size")
            elif state == "gone":
                self._switch()
            else:
                time.sleep(_POLL)
        # ShardCache.open returns io.BufferedReader objects (typed BinaryIO, which lacks readinto)
        return cast(io.BufferedReader, self._next).readinto(buf)

    def _switch(self) -> None:
        new = self._reopen(self._start)
        try:
            pos = self._start
            while pos < self._pos:  # what we returned must be what the shard holds
                n = min(1 << 20, self._pos - pos)
                if os.pread(self._fd, n, pos) != new.read(n):
                    raise CacheIntegrityError(self._url, "bytes already returned by read() came "
                                              "from a corrupt download and differ from the shard")
                pos += n
        except BaseException:
            new.close()
            raise
        os.close(self._fd)
        self._fd, self._next = -1, new

    def close(self) -> None:
        if not self.closed:
            if self._next is not None:
                self._next.close()
            elif self._fd >= 0:
                os.close(self._fd)
        super().close()


class ShardCache:
    """Shards under ``cache_dir``, at most ``limit`` bytes of complete files (None: no limit).

    Shared safely by threads, DataLoader workers and ranks on one machine. No I/O until used."""

    def __init__(self, cache_dir: str | os.PathLike, limit: int | None = None):
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ValueError(f"limit must be None or a non-negative number of bytes, got {limit!r}")
        self.cache_dir = Path(cache_dir)
        self.limit = limit
        # Downloads this process is running: another reader here follows one as it arrives
        # instead of waiting on the file lock for the whole shard (the lock is per process).
        self._live: dict[Path, _State] = {}
        self._live_lock = threading.Lock()
        self._live_pid = os.getpid()

    def _own_live(self) -> None:
        """In a forked child (a DataLoader worker), forget the parent's downloads: their threads
        did not come along, so following one would wait for ever (and its lock may have been
        held at the fork). The child follows them through their temp files instead."""
        if self._live_pid != os.getpid():
            self._live, self._live_lock, self._live_pid = {}, threading.Lock(), os.getpid()

    def __getstate__(self) -> dict:  # a DataLoader worker gets its own (empty) table
        state = self.__dict__.copy()
        state.pop("_live", None)
        state.pop("_live_lock", None)
        state.pop("_live_pid", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._live, self._live_lock, self._live_pid = {}, threading.Lock(), os.getpid()

    def _follow(self, path: Path, url: str, start: int, stop: int) -> BinaryIO | None:
        """A reader of a download this process is running, or None."""
        with self._live_lock:
            st = self._live.get(path)
            if st is None:
                return None
            with st.cond:
                if st.users == 0 or st.error is not None:
                    return None
                st.users += 1  # under cond: the fds stay open for us
        return io.BufferedReader(_Reader(url, st, start, stop), buffer_size=_BUFFER)

    def path_for(self, url: str) -> Path:
        """Where the complete shard for ``url`` lives: a hash, so no collisions and no URL text
        (``.idx`` for a shard's index file, ``.tar`` for anything else)."""
        suffix = ".idx" if url.split("?", 1)[0].split("#", 1)[0].endswith(".idx") else ".tar"
        return self.cache_dir / (hashlib.sha256(url.encode("utf-8")).hexdigest()[:32] + suffix)

    def cached(self, url: str, size: int, sha256: str | None) -> Path | None:
        """The complete cached file, touched for LRU, or None. (Its sha256 was checked when added.)"""
        path = self.path_for(url)
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_size == size:
                os.utime(path, ns=(time.time_ns(),) * 2)
                return path
        return None

    @overload
    def open(self, url: str, *, size: int, sha256: str | None = None, fetch: Fetch,
             start: int = 0, stop: int | None = None, prefetch: Literal[False] = False,
             blake3: str | None = None) -> BinaryIO: ...
    @overload
    def open(self, url: str, *, size: int, sha256: str | None = None, fetch: Fetch,
             start: int = 0, stop: int | None = None, prefetch: bool,
             blake3: str | None = None) -> BinaryIO | None: ...

    def open(self, url: str, *, size: int, sha256: str | None = None, fetch: Fetch,
             start: int = 0, stop: int | None = None, prefetch: bool = False,
             blake3: str | None = None) -> BinaryIO | None:
        """A readable binary file over bytes ``[start, stop)`` of the shard at ``url``: from disk
        when cached, else downloaded once per machine and returned as the bytes arrive.
        A download is checked against ``sha256`` or ``blake3`` (what the manifest names; both
        None for shards listed by URL, whose hash nobody recorded: only the size is checked).
        ``prefetch``: only to start the download (closing the file lets it go on); returns None
        at once when another process is downloading it."""
        stop = size if stop is None else stop
        if not (isinstance(size, int) and 0 <= start <= stop <= size):
            raise ValueError(f"need 0 <= start <= stop <= size, got {start=}, {stop=}, {size=}")
        if sha256 is not None and blake3 is not None:
            raise ValueError("pass sha256 or blake3, not both")
        expected = None if sha256 is None and blake3 is None else (
            ("sha256", digests.check_hex(sha256, "sha256")) if sha256 is not None
            else ("blake3", digests.check_hex(blake3, "blake3")))
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._own_live()
        path = self.path_for(url)
        opened = self._open_cached(url, size, sha256, start, stop)
        if opened is not None:
            return opened
        opened = self._follow(path, url, start, stop)
        if opened is not None:
            return opened
        lock_path = path.with_name(path.name + ".lock")
        lock = _lock(lock_path, blocking=False)
        if lock is None and prefetch:
            return None
        if lock is None:  # another process is downloading it: follow its temp file
            opened = self._follow_other(path, url, start, stop, lambda s: self.open(
                url, size=size, sha256=sha256, blake3=blake3, fetch=fetch, start=s, stop=stop))
            if opened is not None:
                return opened
            lock = _lock(lock_path)
        try:
            opened = self._open_cached(url, size, sha256, start, stop)  # finished while we waited?
            if opened is not None:
                _unlock(lock)
                return opened
            os.ftruncate(lock, 0)  # no reader may follow a dead download's temp from here on
            for temp in self.cache_dir.glob(f".{path.name}.tmp-*"):  # only we write these now
                temp.unlink(missing_ok=True)
            reader = _Reader(url, state := _State([]), start, stop)
            with self._live_lock:
                self._live[path] = state
            threading.Thread(target=self._download, args=(url, size, expected, fetch, lock,
                             state), name=f"shardkit-cache-{path.stem[:8]}", daemon=True).start()
        except BaseException:
            with self._live_lock:
                self._live.pop(path, None)
            _unlock(lock)
            raise
        return io.BufferedReader(reader, buffer_size=_BUFFER)

    def _follow_other(self, path: Path, url: str, start: int, stop: int,
                      reopen: Callable[[int], BinaryIO]) -> BinaryIO | None:
        """A reader of the temp file another process's download is writing, or None (the
        download ended or cannot be found: the caller waits for the lock as before)."""
        lock_path = path.with_name(path.name + ".lock")
        for _ in range(100):  # the downloader names its temp file just after taking the lock
            with contextlib.suppress(OSError):
                name = lock_path.read_bytes().decode("ascii", "replace")
                if _TEMP.match(name) and name.startswith(f".{path.name}.tmp-"):
                    fd = os.open(self.cache_dir / name, os.O_RDONLY)
                    reader = _FileFollower(url, fd, path, start, stop, reopen)
                    return io.BufferedReader(reader, buffer_size=_BUFFER)
            if path.exists() or _lock_free(lock_path):  # finished, or nobody downloads it now
                return None
            time.sleep(_POLL)
        return None

    def _open_cached(self, url: str, size: int, sha256: str | None, start: int, stop: int
                     ) -> BinaryIO | None:
        path = self.cached(url, size, sha256)
        try:
            f = None if path is None else open(path, "rb")
        except FileNotFoundError:  # evicted between the check and the open
            return None
        if f is not None and stop == size:  # a plain file
            f.seek(start)
        elif f is not None:  # limited to stop
            state = _State([os.dup(f.fileno())], users=1, written=size, done=True)
            f.close()
            f = io.BufferedReader(_Reader(url, state, start, stop), _BUFFER)
        return f

    def _download(self, url: str, size: int, expected: tuple[str, str] | None, fetch: Fetch,
                  lock: int, st: _State) -> None:
        """The download thread: up to two attempts, evict, unlock, then tell the reader."""
        path, error, problems = self.path_for(url), None, []
        try:
            for _ in range(2):
                temp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
                fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
                os.pwrite(lock, temp.name.encode("ascii"), 0)  # for readers in other processes
                with st.cond:  # the reader moves to this attempt at its next wake-up
                    st.fds.append(fd)
                    st.written = 0
                try:
                    problem = self._fill(fd, size, expected, fetch, st)
                    if problem is None:
                        os.fsync(fd)
                        os.replace(temp, path)
                        break
                    problems.append(problem)
                finally:
                    temp.unlink(missing_ok=True)  # gone already if renamed
            else:
                raise CacheIntegrityError(url, "downloaded twice, both differ from the manifest: "
                                          + "; ".join(problems))
            os.utime(path, ns=(time.time_ns(),) * 2)
            try:  # still under our lock, so nobody evicts the new file meanwhile
                self._evict_and_sweep(keep=path)
            except OSError as exc:  # the shard itself is fine: eviction is best effort
                warnings.warn(f"shard cache eviction failed: {exc}", RuntimeWarning, stacklevel=2)
        except BaseException as exc:  # goes to the reader's read(), never swallowed
            error = exc
        finally:
            _unlock(lock)  # first, so a reader that sees the outcome sees the lock free
            with self._live_lock:
                if self._live.get(path) is st:
                    del self._live[path]
                with st.cond:
                    st.error, st.done = error, error is None
                    st.cond.notify_all()
            st.drop()

    @staticmethod
    def _fill(fd: int, size: int, expected: tuple[str, str] | None, fetch: Fetch,
              st: _State) -> Optional[str]:
        """Write the shard into ``fd``; None if its size and ``expected`` ``(algorithm, hex
        digest)`` match, else what was wrong."""
        digest, offset = (None if expected is None else digests.new(expected[0])), 0
        while offset < size:
            start, chunks = offset, iter(fetch(offset))  # again from `offset` if it ended early
            try:
                for chunk in chunks:
                    if offset + len(chunk) > size:
                        return f"more than the expected {size} bytes"
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
                    if digest is not None:
                        digest.update(chunk)
                    offset += len(chunk)
                    with st.cond:
                        st.written = offset
                        st.cond.notify_all()
            finally:
                getattr(chunks, "close", lambda: None)()
            if offset == start:
                return f"{offset} bytes, expected {size}"
        if expected is not None and digest is not None and digest.hexdigest() != expected[1]:
            return f"{expected[0]} {digest.hexdigest()}, expected {expected[1]}"
        return None

    def _evict_and_sweep(self, keep: Path) -> None:
        """Remove LRU complete files until within ``limit``, then temps left by dead processes."""
        with os.scandir(self.cache_dir) as it:
            entries = list(it)
        if self.limit is not None:  # concurrent evictors agree on the order: no lock needed
            files = []
            for e in filter(lambda e: _NAME.match(e.name), entries):
                with contextlib.suppress(FileNotFoundError):  # evicted by someone else meanwhile
                    files.append((e.stat().st_mtime_ns, Path(e.path), e.stat().st_size))
            total = sum(size for _, _, size in files)
            for _, path, size in sorted(files):
                if total <= self.limit:
                    break
                held = None if path == keep else _lock(path.with_name(path.name + ".lock"), False)
                if held is not None:  # None: the new file, or being downloaded or checked
                    path.unlink(missing_ok=True)
                    _unlock(held)
                    total -= size
            if total > self.limit:
                warnings.warn(f"shard cache {self.cache_dir} holds {total} bytes, over its limit "
                              f"of {self.limit} (a shard larger than the limit, or files in use)",
                              RuntimeWarning, stacklevel=2)
        for e in entries:  # temps whose shard nobody is downloading were left by dead processes
            match = _TEMP.match(e.name)
            held = _lock(self.cache_dir / (match.group(1) + ".lock"), False) if match else None
            if held is not None:
                Path(e.path).unlink(missing_ok=True)
                _unlock(held)
