"""Remote stores (``s3://``, ``http(s)://``) through fsspec: range streams, retries, resumes.

fsspec filesystems (s3fs for ``s3://``, aiohttp for ``http(s)://``) are created lazily in each
process, so a store pickles into DataLoader workers. Every read is one streamed range GET (a span
of samples, or a whole shard for the cache), handed on in ``PIECE``-byte pieces as they arrive; a
server that ignores Range is an error. Transient faults (dropped connections, 5xx, timeouts) are
retried with exponential backoff, resuming at the first byte not yet delivered (the try count
restarts once bytes have come). After ``retries`` tries without progress the error names the URL.
Credentials come from the standard AWS variables and files, or from ``storage_options``; they
never appear in URLs, messages or the manifest.

One class per protocol says what differs: how its filesystem is made, how a name becomes a path,
and how a range GET is opened (:data:`STORES`). Any other protocol fsspec knows is read through
the generic :class:`~shardkit.storage.generic.FsspecStore`, which shares the retry logic here.
"""

from __future__ import annotations

import errno
import io
import os
import random
import time
from collections import deque
from collections.abc import Generator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Callable, TypeVar

from ..errors import ShardError
from .base import BaseStore, redact

# Remote reads are one streamed GET per byte range (a span of samples, or a whole shard for the
# cache), handed on in PIECE-byte pieces; a reader's helper thread keeps up to AHEAD pieces ready.
T = TypeVar("T")
PIECE = 1 << 20
AHEAD = 2


_PERMANENT_ERRNO = {errno.EINVAL, errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR,
                    errno.ENOTDIR}


def _status(exc: BaseException) -> int | None:
    """The HTTP status behind an exception, looking through ``__cause__`` (s3fs wraps botocore)."""
    for attr in ("status", "status_code"):  # aiohttp's ClientResponseError, requests-like errors
        status = getattr(exc, attr, None)
        if isinstance(status, int) and 100 <= status < 600:
            return status
    seen = 0
    cause: BaseException | None = exc
    while cause is not None and seen < 4:
        response = getattr(cause, "response", None)  # botocore ClientError
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(status, int):
                return status
        cause, seen = cause.__cause__, seen + 1
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


class RemoteStore(BaseStore):
    """Files below one remote prefix, through fsspec, with retries and range reads. Subclasses
    (one per protocol, :data:`STORES`) make the filesystem, map names to paths and open range
    GETs; the retry and resume logic is here."""

    writable = False  # packing may write to it (RemoteDest)

    def __init__(self, protocol: str, base: str, storage_options: dict | None = None, *,
                 retries: int = 6, timeout: float = 60.0, backoff: float = 0.2) -> None:
        self.protocol, self.base = protocol, base.rstrip("/")
        self._options = dict(storage_options or {})
        self.retries, self.timeout, self.backoff = retries, timeout, backoff
        self._fs: Any = None
        self._pid: int | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fs"] = None
        return state

    @property
    def fs(self) -> Any:
        if self._fs is None or self._pid != os.getpid():
            self._fs, self._pid = self._make_fs(dict(self._options)), os.getpid()
        return self._fs

    def _make_fs(self, options: dict):
        """The fsspec filesystem of this protocol, with ``timeout`` applied (subclasses)."""
        raise NotImplementedError

    def path(self, name: str) -> str:
        """The fsspec path of ``name``."""
        return f"{self.protocol}://{self.base}/{name}"

    async def _open_get(self, stream: "_RangeStream", path: str) -> None:
        """Start the range GET of ``stream`` (subclasses): set its body, check its status."""
        raise NotImplementedError

    def _open_stream(self, name: str, start: int, stop: int):
        """A stream of the bytes ``[start, stop)`` of ``name``: ``read(n)`` (fewer bytes only at
        the end; ``b""`` when the connection closed early) and ``close()``. Here one range GET
        through fsspec's event loop (:class:`_RangeStream`)."""
        return _RangeStream(self, name, start, stop)

    def _fs_call(self, fn):
        """``fn()``, a call on the filesystem (stat, whole-file read). The tuned stores rely on
        their client's timeouts; the generic store bounds it itself."""
        return fn()

    def url(self, name: str) -> str:
        return redact(f"{self.protocol}://{self.base}/{name}")

    def retry(self, what: str, name: str, fn: Callable[[], T]) -> T:
        """``fn()``, retried with backoff while it fails with a transient error; the last error
        (or a permanent one at once) is a ShardError naming ``name``. At least one try, whatever
        ``retries`` says."""
        delay, attempt = self.backoff, 0
        while True:
            try:
                return fn()
            except Exception as exc:  # classified below; non-transient ones re-raise at once
                self._give_up_or_wait(what, name, exc, attempt, delay)
                delay = min(delay * 2, 5.0)
                attempt += 1

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
            error = ShardError(self.url(name), f"{what} failed{tries}: "
                               f"{type(exc).__name__}: {redact(str(exc))[:200]}")
            error.gave_up = _transient(exc)
            raise error from None
        time.sleep(delay * (0.5 + random.random()))

    def read_bytes(self, name: str) -> bytes:
        return self.retry("read", name,
                          lambda: self._fs_call(lambda: self.fs.cat_file(self.path(name))))

    def open_range(self, name: str, start: int, stop: int) -> io.RawIOBase:
        return ChunkedReader(self, name, start, stop)

    def iter_bytes(self, name: str, start: int, stop: int,
                   chunk: int = 1 << 20) -> Generator[bytes, None, None]:
        """The bytes ``[start, stop)`` in pieces of ``chunk`` bytes (the last may be shorter), as
        they arrive: one stream of the whole range (:meth:`_open_stream`; the cache's
        whole-shard downloads), not a request per piece. A dropped connection, 5xx or timeout is
        retried with backoff from the first byte not yet delivered (the try count restarts once
        bytes have come)."""
        pos, delay, attempt = start, self.backoff, 0
        while pos < stop:
            stream = None
            try:
                stream = self._open_stream(name, pos, stop)
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

    def stamp(self, name: str) -> str | None:
        try:
            info = self.retry("stat", name,
                              lambda: self._fs_call(lambda: self.fs.info(self.path(name))))
        except ShardError:
            return None
        for key in ("ETag", "etag", "LastModified", "last_modified", "mtime", "updated"):
            if info.get(key) is not None:
                return f"{info.get('size')}:{info[key]}"
        return None

    def list(self, suffix: str = "") -> list[str]:
        root = self.path("").rstrip("/")

        def ls() -> list[dict]:
            return self.fs.ls(root, detail=True)

        entries = self.retry("list", "", lambda: self._fs_call(ls))
        names = []
        for entry in entries:
            name = str(entry.get("name", "")).rstrip("/").rsplit("/", 1)[-1]
            if entry.get("type", "file") == "file" and name.endswith(suffix) and name:
                names.append(name)
        return sorted(set(names))

    def exists(self, name: str) -> bool:
        return self.retry("stat", name,
                          lambda: self._fs_call(lambda: self.fs.exists(self.path(name))))

    def size(self, name: str) -> int | None:
        try:
            info = self.retry("stat", name,
                              lambda: self._fs_call(lambda: self.fs.info(self.path(name))))
        except ShardError as exc:
            if exc.reason == "not found":
                return None
            raise
        size = info.get("size")
        return -1 if size is None else int(size)  # a server that does not say


class _RangeStream:
    """One GET of bytes ``[start, stop)`` of a remote object, read piece by piece as it arrives.

    Driven from the calling thread through fsspec's event loop (s3fs's ``get_object`` for s3://,
    the aiohttp session for http(s)://). A server that answers with another length than asked
    (it ignores Range) is a ``ShardError`` at once. Timeouts are those of the filesystem's client
    (``read_timeout`` / ``sock_read``), with ``store.timeout`` more as a backstop per piece."""

    def __init__(self, store: RemoteStore, name: str, start: int, stop: int):
        from fsspec.asyn import sync

        self._sync, self._fs = sync, store.fs
        self._url, self.start, self.stop = store.url(name), start, stop
        self._timeout = store.timeout * 2 + 10
        self.body: Any = None  # set by store._open_get (the client's response objects)
        self.resp: Any = None
        try:
            self._call(store._open_get, self, store.path(name))
        except BaseException:
            self.close()
            raise

    def _call(self, fn, *args):
        return self._sync(self._fs.loop, fn, *args, timeout=self._timeout)

    def check_range(self, status, length) -> None:
        """A Range request must get ``206 Partial Content`` with the asked length (a server that
        ignores Range answers ``200`` with the whole object)."""
        if status != 206 or (length is not None and int(length) != self.stop - self.start):
            error = ShardError(self._url, f"asked for bytes {self.start}..{self.stop}, got "
                               f"status {status} with {length} bytes (server ignores Range "
                               "requests?)")
            error.gave_up = True  # no other range of this file will do better
            raise error

    async def _read(self, n: int) -> bytes:
        parts, got = [], 0
        while got < n:
            part = await self.body.read(n - got)
            if not part:
                break
            parts.append(part)
            got += len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes (fewer only at the end of the response)."""
        return self._call(self._read, n)

    async def _close(self) -> None:
        for thing in (self.resp, self.body):
            close = getattr(thing, "close", None)
            if close is not None:
                result = close()
                if hasattr(result, "__await__"):
                    await result

    def close(self) -> None:
        """Drop the response (its connection is not reused when bytes were left unread)."""
        if self.resp is None and self.body is None:
            return
        try:
            self._call(self._close)
        except Exception:  # closing a broken connection may fail; nothing to keep
            pass
        self.resp = self.body = None


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


class S3Store(RemoteStore):
    """``s3://bucket/prefix`` (s3fs): endpoint from ``AWS_ENDPOINT_URL(_S3)`` or
    ``storage_options``; one range GET is one ``get_object``."""

    writable = True

    def _make_fs(self, options: dict):
        import fsspec

        try:
            import s3fs  # noqa: F401 - fsspec finds it by name
        except ImportError as exc:
            raise ImportError("s3:// needs s3fs: pip install 's3fs'") from exc
        timeout = self.timeout
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

    def path(self, name: str) -> str:
        return f"{self.base}/{name}"

    def list(self, suffix: str = "") -> list[str]:
        """The names directly under this prefix that end with ``suffix``, a page of 1,000 keys
        at a time (``ListObjectsV2``; each page retried on its own, from its continuation
        token), keeping only the names: 10⁶ shards list in 1,000 requests and ~100 MB less
        than fsspec's listing of the same (which keeps a dict per key), with a progress bar
        on a terminal."""
        import sys

        from tqdm.auto import tqdm

        bucket, _, prefix = self.base.partition("/")
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        names: list[str] = []
        token: str | None = None
        bar = tqdm(desc="list", unit=" keys", dynamic_ncols=True, file=sys.stderr,
                   disable=not sys.stderr.isatty())
        try:
            while True:
                args = {"Bucket": bucket, "Prefix": prefix, "Delimiter": "/", "MaxKeys": 1000}
                if token:
                    args["ContinuationToken"] = token
                page = self.retry("list", "", partial(self.fs.call_s3, "list_objects_v2", **args))
                keys = [c["Key"][len(prefix):] for c in page.get("Contents", [])]
                names += [k for k in keys if k.endswith(suffix) and k and "/" not in k]
                bar.update(len(keys))
                token = page.get("NextContinuationToken")
                if not page.get("IsTruncated") or not token:
                    break
        finally:
            bar.close()
        return sorted(set(names))

    async def _open_get(self, stream: "_RangeStream", path: str) -> None:
        from s3fs.core import version_id_kw

        bucket, key, version = self.fs.split_path(path)
        resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key,
                                      Range=f"bytes={stream.start}-{stream.stop - 1}",
                                      **version_id_kw(version))
        stream.body = resp["Body"]
        stream.check_range(resp.get("ResponseMetadata", {}).get("HTTPStatusCode"),
                           resp.get("ContentLength"))


class HttpStore(RemoteStore):
    """``http(s)://host/path`` (aiohttp): one range GET is one request on fsspec's session."""

    def _make_fs(self, options: dict):
        import fsspec

        try:
            import aiohttp
        except ImportError as exc:
            raise ImportError("http(s):// needs aiohttp: pip install aiohttp") from exc
        client = dict(options.pop("client_kwargs", {}) or {})
        client.setdefault("timeout", aiohttp.ClientTimeout(
            total=None, sock_connect=min(self.timeout, 10), sock_read=self.timeout))
        options.setdefault("skip_instance_cache", True)
        return fsspec.filesystem(self.protocol, client_kwargs=client, **options)

    async def _open_get(self, stream: "_RangeStream", url: str) -> None:
        fs = self.fs
        kw = fs.kwargs.copy()
        headers = dict(kw.pop("headers", None) or {})
        headers["Range"] = f"bytes={stream.start}-{stream.stop - 1}"
        session = await fs.set_session()
        stream.resp = await session.get(fs.encode_url(url), headers=headers, **kw)
        if stream.resp.status == 404:
            raise FileNotFoundError(url)
        stream.resp.raise_for_status()
        stream.check_range(stream.resp.status, stream.resp.content_length)
        stream.body = stream.resp.content


# The protocols with a tuned store class (any other that fsspec knows is read through the generic
# FsspecStore; storage/urls.py dispatches). s3a:// is fsspec's other name for s3://.
STORES: dict[str, type[RemoteStore]] = {"s3": S3Store, "s3a": S3Store, "http": HttpStore,
                                        "https": HttpStore}
