"""Where a dataset lives and how its bytes move: local folders, S3-compatible stores, HTTP(S).

A *source* is a dataset folder, a ``manifest.json`` path, ``s3://bucket/prefix[/manifest.json]``
or ``http(s)://host/path/[manifest.json]``. It resolves to a :class:`Store` rooted at the dataset's
folder or prefix; shard and index names from the manifest are plain relative names resolved inside
it, never elsewhere. Only a caller's own list of shard URLs (:class:`ListedStore`, built by
``Manifest.from_urls``) reads from other folders, prefixes or hosts.

Local reads (:class:`LocalStore`) have a timeout as remote ones do: whatever may block runs in a
helper thread that the reader waits for at most ``timeout`` seconds.

Remote reads go through fsspec (s3fs for ``s3://``, aiohttp for ``http(s)://``), created lazily in
each process (so a store pickles into DataLoader workers). Every read is one streamed range GET
(a span of samples, or a whole shard for the cache), handed on in ``PIECE``-byte pieces as they
arrive; a server that ignores Range is an error. Transient faults (dropped connections, 5xx,
timeouts) are retried with exponential backoff, resuming at the first byte not yet delivered
(the try count restarts once bytes have come). After ``retries`` tries without progress the
error names the URL. Credentials come from the standard AWS variables and files, or from
``storage_options``; they never appear in URLs, messages or the manifest.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import queue
import random
import re
import shutil
import stat
import tempfile
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .errors import ShardError

MANIFEST_NAME = "manifest.json"
# Remote reads are one streamed GET per byte range (a span of samples, or a whole shard for the
# cache), handed on in PIECE-byte pieces; a reader's helper thread keeps up to AHEAD pieces ready.
PIECE = 1 << 20
AHEAD = 2
REMOTE_PROTOCOLS = ("s3", "http", "https")


def redact(url: str) -> str:
    """A URL without ``user:password@`` and without query-string secrets."""
    url = re.sub(r"(://)[^/@]*@", r"\1", url)
    return re.sub(r"\?.*$", "", url)


def _scheme(text: str) -> tuple[str | None, str]:
    """``(protocol, rest)`` of a remote URL, ``(None, text)`` of a local path; other schemes are
    refused."""
    match = re.match(r"^([a-z][a-z0-9+.-]*)://(.*)$", text)
    if not match:
        return None, text
    protocol, rest = match.group(1), match.group(2)
    if protocol not in REMOTE_PROTOCOLS:
        raise ValueError(f"{redact(text)}: unsupported protocol {protocol!r} "
                         f"(use a local path, s3://, http:// or https://)")
    return protocol, rest


def split_source(source) -> tuple[str, str, str]:
    """``(protocol, base, manifest_name)`` for a dataset source."""
    text = os.fspath(source) if not isinstance(source, str) else source
    text = text.removeprefix("file://")
    protocol, rest = _scheme(text)
    if protocol is not None:
        if rest.endswith(".json"):
            base, _, name = rest.rpartition("/")
            return protocol, base, name
        return protocol, rest.rstrip("/"), MANIFEST_NAME
    path = Path(text).expanduser()
    if path.suffix == ".json" and not path.is_dir():
        return "file", str(path.parent), path.name
    return "file", str(path), MANIFEST_NAME


def make_store(source, storage_options: dict | None = None, *, retries: int = 6,
               timeout: float = 60.0) -> tuple["Store", str]:
    protocol, base, name = split_source(source)
    if protocol == "file":
        return LocalStore(base, timeout=timeout), name
    return RemoteStore(protocol, base, storage_options, retries=retries, timeout=timeout), name


def split_file_url(url) -> tuple[str, str, str]:
    """``(protocol, base, name)`` of one file's URL or path: its folder or prefix, and its name.

    Local paths are made absolute (so DataLoader workers and later ``chdir`` agree). Remote URLs
    with a query string or fragment are refused: shardkit derives other URLs from them."""
    if not isinstance(url, (str, os.PathLike)):
        raise TypeError(f"a shard URL must be a str or a path, got {type(url).__name__}")
    text = os.fspath(url)
    if not isinstance(text, str):
        raise TypeError(f"a shard URL must be a str or a path, got {type(text).__name__}")
    text = text.removeprefix("file://")
    protocol, rest = _scheme(text)
    if protocol is not None:
        if "?" in rest or "#" in rest:
            raise ValueError(f"{redact(text)}: URLs with a query string or fragment are not "
                             "supported")
        base, _, name = rest.rpartition("/")
        if not base or not name:
            raise ValueError(f"{redact(text)}: not the URL of a file")
        return protocol, base, name
    path = os.path.abspath(os.path.expanduser(text))
    return "file", os.path.dirname(path), os.path.basename(path)


def load_manifest(source, storage_options: dict | None = None, *, timeout: float = 60.0,
                  retries: int = 6):
    """The manifest of a source; a list or tuple of shard URLs makes one in memory
    (:meth:`shardkit.Manifest.from_urls`)."""
    from .manifest import Manifest

    if isinstance(source, Manifest):
        return source
    if isinstance(source, (list, tuple)):
        return Manifest.from_urls(source, storage_options, timeout=timeout, retries=retries)
    return Manifest.load(source, storage_options=storage_options, timeout=timeout, retries=retries)


def store_for(manifest, storage_options: dict | None = None) -> "Store":
    if manifest.store is not None:
        return manifest.store
    return LocalStore(manifest.base_url or os.getcwd())


# --------------------------------------------------------------------------- reading


class Store:
    def url(self, name: str) -> str: ...

    def read_bytes(self, name: str) -> bytes: ...

    def open_range(self, name: str, start: int, stop: int): ...

    def iter_bytes(self, name: str, start: int, stop: int, chunk: int = 1 << 20):
        """The bytes ``[start, stop)`` as a stream of chunks (for the cache's downloads)."""
        reader = self.open_range(name, start, stop)
        try:
            while True:
                data = reader.read(chunk)
                if not data:
                    return
                yield data
        finally:
            reader.close()


LOCAL_CHUNK = 1 << 20  # a helper's read on a page-cache miss; a streaming helper's largest read
LOCAL_FIRST = 64 << 10  # a streaming helper's first read (then doubling): samples come at once
LOCAL_AHEAD = 2  # chunks a streaming helper reads ahead of the reader


class LocalStore(Store):
    """Reads shard and index files below a local folder.

    Every read has a ``timeout`` (seconds without a byte; None: none, plain blocking reads): a
    stalled NFS/FUSE mount or a FIFO with no writer is a ``ShardError`` naming the file, not a
    hang. Whatever may block (open, a read the page cache cannot serve) runs in a helper thread
    that the reader waits for at most ``timeout``; reads the page cache serves go straight into
    the caller's buffer, so the hot path costs what it did (see :class:`_LocalReader`).
    """

    def __init__(self, base: str, timeout: float | None = 60.0):
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

    def exists(self, name: str) -> bool:
        """Whether ``name`` exists; a stat(2) that may block, so bounded by ``timeout`` too."""
        path = self.base / name
        if self.timeout is None:
            return path.exists()
        return _bounded(path.exists, self.timeout, self.url(name))

    def open_range(self, name: str, start: int, stop: int):
        """A file object positioned at ``start`` that ends at ``stop`` (exclusive)."""
        if self.timeout is not None:
            return _LocalReader(self.base / name, self.url(name), start, stop, self.timeout)
        try:
            f = open(self.base / name, "rb", buffering=0)
            f.seek(start)
        except OSError as exc:
            raise ShardError(self.url(name), f"cannot open: {exc.strerror or exc}") from exc
        return RangeReader(f, stop - start)


class RangeReader(io.RawIOBase):
    """At most ``length`` bytes of an underlying file object; tracks how many were read."""

    def __init__(self, raw, length: int):
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

    def __init__(self):
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


# Idle helper threads, reused: starting a thread costs ~0.1 ms per file opened. A thread stuck in
# a stalled read is simply never idle again. Reset in a forked child (no threads there).
_MAX_IDLE = 8
_helpers_lock = threading.Lock()
_helpers: dict = {"jobs": None, "idle": 0}


def _reset_helpers() -> None:
    global _helpers_lock
    _helpers_lock = threading.Lock()
    _helpers.update(jobs=None, idle=0)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_helpers)


def _in_helper(job, *args) -> None:
    """Run ``job(*args)`` in an idle helper thread, or a new one."""
    with _helpers_lock:
        if _helpers["jobs"] is None:
            _helpers["jobs"] = queue.SimpleQueue()
        jobs = _helpers["jobs"]
        if _helpers["idle"]:
            _helpers["idle"] -= 1
            jobs.put((job, args))
            return
    threading.Thread(target=_helper, args=(jobs, job, args), name="shardkit-local-read",
                     daemon=True).start()


def _helper(jobs, job, args) -> None:
    while True:
        job(*args)  # handles its own errors
        job = args = None
        with _helpers_lock:
            if _helpers["jobs"] is not jobs or _helpers["idle"] >= _MAX_IDLE:
                return
            _helpers["idle"] += 1
        job, args = jobs.get()


def _bounded(fn, timeout: float, url: str):
    """``fn()`` run by a helper thread, waiting at most ``timeout`` for it (a ShardError)."""
    cond, box = threading.Condition(threading.Lock()), []

    def job():
        try:
            out = (True, fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            out = (False, exc)
        with cond:
            box.append(out)
            cond.notify_all()

    _in_helper(job)
    with cond:
        if not cond.wait_for(lambda: box, timeout):
            raise ShardError(url, f"no answer for {timeout:g} s (stalled file or mount?)")
    ok, value = box[0]
    if ok:
        return value
    raise value


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
        _in_helper(_open_job, self._state, os.fspath(path), start)

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
            raise self._fail(ShardError(self.url, f"{what} for {self.timeout:g} s (stalled "
                                                  "file or mount?)"))

    def _start(self) -> None:
        st = self._state
        with st.cond:
            self._wait(lambda: not st.busy, f"{self._opening}: no answer")
            error = st.error
        if error is not None:
            raise self._fail(_read_error(self.url, self._opening, error))
        if st.regular and _NOWAIT is not None:
            self._mode, self._fd = "direct", st.fd
        else:
            self._stream()

    def _stream(self) -> None:
        st = self._state
        self._mode, self._fd = "stream", -1
        with st.cond:
            st.busy = True
        _in_helper(_stream_job, st, st.fd, st.regular, self._pos, self._stop)

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
                got = os.preadv(self._fd, (b,), pos, _NOWAIT)
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
                    got = os.preadv(self._fd, (view[:n],), self._pos, _NOWAIT)
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
            want = LOCAL_CHUNK if self._stop is None else min(LOCAL_CHUNK, self._stop - self._pos)
            with st.cond:
                st.busy = True
            _in_helper(_pread_job, st, st.fd, self._pos, want)
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


class ListedStore(Store):
    """The shard files a caller listed, each with the index file beside it (the same name with
    ``.idx`` instead of ``.tar``), wherever each lives: local paths, ``s3://`` and ``http(s)://``
    URLs on any host or prefix. Each file is read through the store of its own folder or prefix.

    Names are the files' display URLs (credentials removed); nothing but the listed files and
    their index files can be read through it. Built by :meth:`shardkit.Manifest.from_urls` only:
    a manifest file never gets one, so only the caller's code decides where reads go.
    ``storage_options`` apply to every remote URL, or per protocol when keyed by ``"s3"``,
    ``"http"``, ``"https"``."""

    def __init__(self, urls, storage_options: dict | None = None, *, timeout: float = 60.0,
                 retries: int = 6):
        if isinstance(urls, (str, bytes, os.PathLike)):
            raise TypeError("pass a list of shard URLs, not a single one")
        self._files: dict[str, tuple[Store, str]] = {}
        self.shards: list[tuple[str, str]] = []  # (shard URL, index URL) in the given order
        stores: dict[tuple[str, str], Store] = {}
        for url in urls:
            protocol, base, name = split_file_url(url)
            if not name.endswith(".tar") or name == ".tar":
                raise ValueError(f"{redact(os.fspath(url))}: a shard URL must name a .tar file "
                                 "(its index is the same name with .idx)")
            store = stores.get((protocol, base))
            if store is None:
                if protocol == "file":
                    store = LocalStore(base, timeout=timeout)
                else:
                    store = RemoteStore(protocol, base, _options_for(storage_options, protocol),
                                        retries=retries, timeout=timeout)
                stores[(protocol, base)] = store
            index = name[:-len(".tar")] + ".idx"
            shard_url, index_url = store.url(name), store.url(index)
            if shard_url in self._files:
                raise ValueError(f"{shard_url}: listed twice")
            self._files[shard_url], self._files[index_url] = (store, name), (store, index)
            self.shards.append((shard_url, index_url))
        if not self.shards:
            raise ValueError("no shard URLs given")

    def _file(self, name: str) -> tuple[Store, str]:
        try:
            return self._files[name]
        except (KeyError, TypeError):
            raise ShardError(str(name), "not one of the listed shard URLs") from None

    def url(self, name: str) -> str:
        return name

    def read_bytes(self, name: str) -> bytes:
        store, own = self._file(name)
        return store.read_bytes(own)

    def open_range(self, name: str, start: int, stop: int):
        store, own = self._file(name)
        return store.open_range(own, start, stop)

    def iter_bytes(self, name: str, start: int, stop: int, chunk: int = 1 << 20):
        store, own = self._file(name)
        return store.iter_bytes(own, start, stop, chunk)


def _options_for(storage_options: dict | None, protocol: str) -> dict | None:
    """``storage_options`` for one protocol: the dict itself, or its entry for ``protocol`` when
    it is keyed by protocols."""
    if storage_options and set(storage_options) <= set(REMOTE_PROTOCOLS) \
            and all(v is None or isinstance(v, dict) for v in storage_options.values()):
        return storage_options.get(protocol)
    return storage_options



_PERMANENT_ERRNO = {errno.EINVAL, errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR,
                    errno.ENOTDIR}


def _status(exc: BaseException) -> int | None:
    """The HTTP status behind an exception, looking through ``__cause__`` (s3fs wraps botocore)."""
    for attr in ("status", "status_code"):  # aiohttp's ClientResponseError, requests-like errors
        status = getattr(exc, attr, None)
        if isinstance(status, int) and 100 <= status < 600:
            return status
    seen = 0
    while exc is not None and seen < 4:
        response = getattr(exc, "response", None)  # botocore ClientError
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(status, int):
                return status
        exc, seen = exc.__cause__, seen + 1
    return None


def _transient(exc: BaseException) -> bool:
    """Worth retrying: connection faults, timeouts, 5xx/408/429. Not: missing, forbidden, bad range."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    status = _status(exc)
    if status is not None:
        return status >= 500 or status in (408, 429)
    if isinstance(exc, OSError) and exc.errno in _PERMANENT_ERRNO:
        return False
    if isinstance(exc, (OSError, TimeoutError, ConnectionError, EOFError)):
        return True
    module = type(exc).__module__ or ""
    return module.startswith(("aiohttp", "botocore", "aiobotocore", "urllib3", "http.client",
                              "asyncio"))


class RemoteStore(Store):
    """s3:// or http(s):// below one prefix, through fsspec, with retries and range reads."""

    def __init__(self, protocol: str, base: str, storage_options: dict | None = None, *,
                 retries: int = 6, timeout: float = 60.0, backoff: float = 0.2):
        self.protocol, self.base = protocol, base.rstrip("/")
        self._options = dict(storage_options or {})
        self.retries, self.timeout, self.backoff = retries, timeout, backoff
        self._fs = None
        self._pid = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fs"] = None
        return state

    @property
    def fs(self):
        if self._fs is None or self._pid != os.getpid():
            self._fs, self._pid = _make_fs(self.protocol, self._options, self.timeout), os.getpid()
        return self._fs

    def path(self, name: str) -> str:
        if self.protocol == "s3":
            return f"{self.base}/{name}"
        return f"{self.protocol}://{self.base}/{name}"

    def url(self, name: str) -> str:
        return redact(f"{self.protocol}://{self.base}/{name}")

    def _retry(self, what, name: str, fn):
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except Exception as exc:  # classified below; non-transient ones re-raise at once
                self._give_up_or_wait(what, name, exc, attempt, delay)
                delay = min(delay * 2, 5.0)

    def _give_up_or_wait(self, what, name: str, exc: Exception, attempt: int,
                         delay: float) -> None:
        """After failed try number ``attempt`` (0-based): raise the error that ends it (not
        transient, or the last try), else sleep ``delay`` (jittered) before the next try."""
        if isinstance(exc, ShardError):
            raise exc
        if isinstance(exc, FileNotFoundError):
            raise ShardError(self.url(name), "not found") from None
        if not _transient(exc) or attempt >= self.retries:
            tries = f" after {attempt + 1} tries" if attempt else ""
            raise ShardError(self.url(name), f"{what} failed{tries}: "
                             f"{type(exc).__name__}: {redact(str(exc))[:200]}") from None
        time.sleep(delay * (0.5 + random.random()))

    def read_bytes(self, name: str) -> bytes:
        return self._retry("read", name, lambda: self.fs.cat_file(self.path(name)))

    def read_range(self, name: str, start: int, stop: int) -> bytes:
        def get():
            data = self.fs.cat_file(self.path(name), start=start, end=stop)
            if len(data) != stop - start:
                raise ShardError(self.url(name), f"asked for bytes {start}..{stop}, got "
                                 f"{len(data)} bytes (server ignores Range requests?)")
            return data

        return self._retry(f"range read {start}..{stop}", name, get)

    def open_range(self, name: str, start: int, stop: int):
        return ChunkedReader(self, name, start, stop)

    def iter_bytes(self, name: str, start: int, stop: int, chunk: int = 1 << 20):
        """The bytes ``[start, stop)`` in pieces of ``chunk`` bytes (the last may be shorter), as
        they arrive: one streamed GET of the whole range (the cache's whole-shard downloads), not
        a request per piece. A dropped connection, 5xx or timeout is retried with backoff from
        the first byte not yet delivered (the try count restarts once bytes have come)."""
        pos, delay, attempt = start, self.backoff, 0
        while pos < stop:
            stream = None
            try:
                stream = _RangeStream(self, name, pos, stop)
                while pos < stop:
                    data = stream.read(min(chunk, stop - pos))
                    if not data:
                        raise EOFError(f"connection closed at byte {pos} of {start}..{stop}")
                    pos += len(data)
                    attempt, delay = 0, self.backoff
                    yield data
            except Exception as exc:  # classified; transient ones go on from `pos`
                self._give_up_or_wait(f"download {pos}..{stop}", name, exc, attempt, delay)
                attempt, delay = attempt + 1, min(delay * 2, 5.0)
            finally:
                if stream is not None:
                    stream.close()

    def exists(self, name: str) -> bool:
        return self._retry("stat", name, lambda: self.fs.exists(self.path(name)))


class _RangeStream:
    """One GET of bytes ``[start, stop)`` of a remote object, read piece by piece as it arrives.

    Driven from the calling thread through fsspec's event loop (s3fs's ``get_object`` for s3://,
    the aiohttp session for http(s)://). A server that answers with another length than asked
    (it ignores Range) is a ``ShardError`` at once. Timeouts are those of the filesystem's client
    (``read_timeout`` / ``sock_read``), with ``store.timeout`` more as a backstop per piece."""

    def __init__(self, store: RemoteStore, name: str, start: int, stop: int):
        from fsspec.asyn import sync

        self._sync, self._fs = sync, store.fs
        self._url, self._start, self._stop = store.url(name), start, stop
        self._timeout = store.timeout * 2 + 10
        self._body = self._resp = None
        opener = self._open_s3 if store.protocol == "s3" else self._open_http
        try:
            self._call(opener, store.path(name))
        except BaseException:
            self.close()
            raise

    def _call(self, fn, *args):
        return self._sync(self._fs.loop, fn, *args, timeout=self._timeout)

    def _check_range(self, status, length) -> None:
        """A Range request must get ``206 Partial Content`` with the asked length (a server that
        ignores Range answers ``200`` with the whole object)."""
        if status != 206 or (length is not None and int(length) != self._stop - self._start):
            raise ShardError(self._url, f"asked for bytes {self._start}..{self._stop}, got "
                             f"status {status} with {length} bytes (server ignores Range "
                             "requests?)")

    async def _open_s3(self, path: str) -> None:
        from s3fs.core import version_id_kw

        bucket, key, version = self._fs.split_path(path)
        resp = await self._fs._call_s3("get_object", Bucket=bucket, Key=key,
                                       Range=f"bytes={self._start}-{self._stop - 1}",
                                       **version_id_kw(version))
        self._body = resp["Body"]
        self._check_range(resp.get("ResponseMetadata", {}).get("HTTPStatusCode"),
                          resp.get("ContentLength"))

    async def _open_http(self, url: str) -> None:
        fs = self._fs
        kw = fs.kwargs.copy()
        headers = dict(kw.pop("headers", None) or {})
        headers["Range"] = f"bytes={self._start}-{self._stop - 1}"
        session = await fs.set_session()
        self._resp = await session.get(fs.encode_url(url), headers=headers, **kw)
        if self._resp.status == 404:
            raise FileNotFoundError(url)
        self._resp.raise_for_status()
        self._check_range(self._resp.status, self._resp.content_length)
        self._body = self._resp.content

    async def _read(self, n: int) -> bytes:
        parts, got = [], 0
        while got < n:
            part = await self._body.read(n - got)
            if not part:
                break
            parts.append(part)
            got += len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes (fewer only at the end of the response)."""
        return self._call(self._read, n)

    async def _close(self) -> None:
        for thing in (self._resp, self._body):
            close = getattr(thing, "close", None)
            if close is not None:
                result = close()
                if hasattr(result, "__await__"):
                    await result

    def close(self) -> None:
        """Drop the response (its connection is not reused when bytes were left unread)."""
        if self._resp is None and self._body is None:
            return
        try:
            self._call(self._close)
        except Exception:  # closing a broken connection may fail; nothing to keep
            pass
        self._resp = self._body = None


def _make_fs(protocol: str, options: dict, timeout: float):
    import fsspec

    options = dict(options)
    if protocol == "s3":
        try:
            import s3fs  # noqa: F401 - fsspec finds it by name
        except ImportError as exc:
            raise ImportError("s3:// needs s3fs: pip install 's3fs'") from exc
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        client = dict(options.pop("client_kwargs", {}) or {})
        if endpoint and "endpoint_url" not in client and "endpoint_url" not in options:
            client["endpoint_url"] = endpoint
        config = dict(options.pop("config_kwargs", {}) or {})
        config.setdefault("connect_timeout", min(timeout, 10))
        config.setdefault("read_timeout", timeout)
        config.setdefault("retries", {"total_max_attempts": 1})  # we retry, at the right byte
        options.setdefault("skip_instance_cache", True)
        fs = fsspec.filesystem("s3", client_kwargs=client, config_kwargs=config, **options)
        fs.retries = 1  # s3fs's own retry loop (a class attribute) would stack with ours
        return fs
    try:
        import aiohttp
    except ImportError as exc:
        raise ImportError("http(s):// needs aiohttp: pip install aiohttp") from exc
    client = dict(options.pop("client_kwargs", {}) or {})
    client.setdefault("timeout", aiohttp.ClientTimeout(total=None, sock_connect=min(timeout, 10),
                                                       sock_read=timeout))
    options.setdefault("skip_instance_cache", True)
    return fsspec.filesystem(protocol, client_kwargs=client, **options)


class ChunkedReader(io.RawIOBase):
    """Bytes ``[start, stop)`` of a remote object: one streamed GET (:meth:`RemoteStore.iter_bytes`,
    retried from the first byte not yet delivered), read ahead by a helper thread.

    Up to ``ahead`` pieces of ``piece`` bytes are fetched while the current one is consumed, so
    samples flow before the whole range has arrived and the network overlaps the parsing.
    """

    def __init__(self, store: RemoteStore, name: str, start: int, stop: int, *,
                 piece: int = PIECE, ahead: int = AHEAD):
        self.store, self.name, self.start, self.stop = store, name, start, stop
        self._buf = memoryview(b"")
        self._pieces = store.iter_bytes(name, start, stop, max(1, piece))
        self._pool = ThreadPoolExecutor(max_workers=1)  # advances the generator, one step at once
        self._pending: deque = deque()
        self._ahead, self._done = max(1, ahead), False
        self._schedule()

    def readable(self) -> bool:
        return True

    def _schedule(self) -> None:
        while not self._done and len(self._pending) < self._ahead:
            self._pending.append(self._pool.submit(next, self._pieces, None))
            if len(self._pending) == 1 and not len(self._buf):
                break  # nothing read yet: the first piece alone, then read ahead

    def _refill(self) -> bool:
        """The next piece into ``_buf``; False at the end."""
        while self._pending:
            piece = self._pending.popleft().result()
            if piece is None:
                self._done = True
                self._pending.clear()  # queued after the end: each returns None
                return False
            self._buf = memoryview(piece)
            self._schedule()
            return True
        return False

    def readinto(self, buf) -> int:
        if not len(self._buf) and not self._refill():
            return 0
        n = min(len(buf), len(self._buf))
        buf[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def close(self) -> None:
        if not self.closed:
            for future in self._pending:
                future.cancel()
            self._pending.clear()
            self._done = True
            try:
                self._pool.submit(self._pieces.close)  # after a step in progress; drops the GET
            except RuntimeError:  # interpreter shutting down: the connection goes with it
                pass
            self._pool.shutdown(wait=False)
            self._buf = memoryview(b"")
        super().close()


# --------------------------------------------------------------------------- writing


class LocalDest:
    """A local destination folder: temporary name, fsync, rename."""

    remote = False

    def __init__(self, folder):
        self.folder = Path(folder).expanduser()
        self.staging = self.folder

    def url(self, name: str) -> str:
        return str(self.folder / name)

    def prepare(self) -> None:
        if self.folder.exists() and not self.folder.is_dir():
            from .errors import DestinationError

            raise DestinationError(f"{self.folder}: destination exists and is not a folder")
        self.folder.mkdir(parents=True, exist_ok=True)

    def names(self) -> list[str]:
        return [p.name for p in self.folder.iterdir()]

    def exists(self, name: str) -> bool:
        return (self.folder / name).exists()

    def read_bytes(self, name: str) -> bytes | None:
        try:
            return (self.folder / name).read_bytes()
        except FileNotFoundError:
            return None

    def write_atomic(self, name: str, data: bytes) -> None:
        tmp = self.folder / f".{name}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.folder / name)
        fsync_dir(self.folder)

    def commit(self, tmp: Path, name: str) -> None:
        os.replace(tmp, self.folder / name)
        fsync_dir(self.folder)

    def publish(self, journal: str, name: str, data: bytes) -> None:
        """Write ``data`` as ``name`` and remove ``journal`` in one step that a kill cannot
        split: ``data`` replaces the journal (atomically), then the journal is renamed."""
        self.write_atomic(journal, data)
        self.commit(self.folder / journal, name)

    def remove(self, name: str) -> None:
        (self.folder / name).unlink(missing_ok=True)

    def intact(self, name: str, size: int | None, sha256: str) -> bool:
        path = self.folder / name
        try:
            if size is not None and path.stat().st_size != size:
                return False
            return sha256_file(path) == sha256
        except OSError:
            return False

    def remove_temporaries(self) -> None:
        for p in self.folder.iterdir():
            if p.name.startswith(".") and ".tmp-" in p.name:
                p.unlink(missing_ok=True)

    def close(self) -> None:
        pass


class RemoteDest:
    """An object-store prefix: shards are staged locally, uploaded when finished (multipart for
    large ones, by s3fs), the journal and manifest are single PUTs, which are atomic."""

    remote = True

    def __init__(self, source: str, storage_options: dict | None = None):
        protocol, base, _ = split_source(source)
        if protocol != "s3":
            raise ValueError(f"{redact(source)}: packing writes to local folders or s3:// only")
        self.store = RemoteStore(protocol, base, storage_options)
        self.staging = Path(tempfile.mkdtemp(prefix="shardkit-stage-"))

    def url(self, name: str) -> str:
        return self.store.url(name)

    def _do(self, what, name, fn):
        return self.store._retry(what, name, fn)

    def prepare(self) -> None:
        pass

    def names(self) -> list[str]:
        def ls():
            try:
                return [p.rsplit("/", 1)[-1] for p in self.store.fs.ls(self.store.base, detail=False,
                                                                      refresh=True)]
            except FileNotFoundError:
                return []

        return self._do("list", "", ls)

    def exists(self, name: str) -> bool:
        return self.store.exists(name)

    def read_bytes(self, name: str) -> bytes | None:
        try:
            return self.store.read_bytes(name)
        except ShardError as exc:
            if exc.reason == "not found":
                return None
            raise

    def write_atomic(self, name: str, data: bytes) -> None:
        self._do("upload", name, lambda: self.store.fs.pipe_file(self.store.path(name), data))

    def commit(self, tmp: Path, name: str) -> None:
        self._do("upload", name, lambda: self.store.fs.put_file(str(tmp), self.store.path(name)))
        tmp.unlink(missing_ok=True)

    def publish(self, journal: str, name: str, data: bytes) -> None:
        """Write ``data`` as ``name``, then remove ``journal``. Object stores cannot rename
        atomically: a kill between the two leaves a stale journal beside a complete dataset,
        which ``--resume`` removes."""
        self.write_atomic(name, data)
        self.remove(journal)

    def remove(self, name: str) -> None:
        if self.exists(name):
            self._do("delete", name, lambda: self.store.fs.rm_file(self.store.path(name)))

    def intact(self, name: str, size: int | None, sha256: str) -> bool:
        # Uploads are atomic: an object that exists with the recorded size is the finished shard.
        try:
            info = self._do("stat", name, lambda: self.store.fs.info(self.store.path(name)))
        except ShardError:
            return False
        if size is None:
            data = self.read_bytes(name)
            return data is not None and hashlib.sha256(data).hexdigest() == sha256
        return int(info.get("size", -1)) == size

    def remove_temporaries(self) -> None:
        pass

    def close(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def make_dest(dest, storage_options: dict | None = None):
    text = os.fspath(dest)
    if "://" in text and not text.startswith("file://"):
        return RemoteDest(text, storage_options)
    return LocalDest(text[len("file://"):] if text.startswith("file://") else text)


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(folder) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = ["ListedStore", "LocalDest", "LocalStore", "RangeReader", "RemoteDest", "RemoteStore",
           "load_manifest", "make_dest", "make_store", "redact", "split_file_url", "split_source",
           "store_for", "MANIFEST_NAME"]
