"""Remote stores (``s3://``, ``http(s)://``) through fsspec: range streams, retries, resumes.

fsspec filesystems (s3fs for ``s3://``, aiohttp for ``http(s)://``) are created lazily in each
process, so a store pickles into DataLoader workers. Every read is one streamed range GET (a span
of samples, or a whole shard for the cache), handed on in ``PIECE``-byte pieces as they arrive; a
server that ignores Range is an error. Transient faults (dropped connections, 5xx, timeouts) are
retried with exponential backoff, resuming at the first byte not yet delivered (the try count
restarts once bytes have come); errors that cannot heal (missing, forbidden, any other 4xx, a bad
request, huggingface_hub offline) end the read at the first try (:func:`_transient`). After
``retries`` tries without progress the error names the URL.
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
import queue
import random
import threading
import time
import weakref
from collections import deque
from collections.abc import Generator
from concurrent.futures import Future
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

# Errors that no retry heals, by class name anywhere in the exception's MRO (so they are known
# without importing their package): huggingface_hub's (hf://) offline mode, missing or gated
# repos, revisions and files, bad requests and names. OfflineModeIsEnabled is a ConnectionError,
# and the hub's HTTP errors are OSErrors: without this they would look like dropped connections.
_PERMANENT_NAMES = frozenset({
    "OfflineModeIsEnabled", "LocalEntryNotFoundError", "EntryNotFoundError",
    "RemoteEntryNotFoundError", "RepositoryNotFoundError", "GatedRepoError", "DisabledRepoError",
    "RevisionNotFoundError", "BucketNotFoundError", "BadRequestError", "HFValidationError",
    "HfUriError", "LocalTokenNotFoundError",
    "InvalidURL", "UnsupportedProtocol", "LocalProtocolError", "TooManyRedirects",  # httpx
})
_PERMANENT_TYPES = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                    ValueError)
# Transient errors of HTTP clients that are no OSError (httpx, httpcore: huggingface_hub >= 1).
_TRANSIENT_NAMES = frozenset({"TimeoutException", "NetworkError", "RemoteProtocolError",
                              "ProxyError"})
_TRANSIENT_MODULES = ("aiohttp", "botocore", "aiobotocore", "urllib3", "http.client", "asyncio")
# huggingface_hub's offline mode (the hub is not asked at all), and its "not in the local cache"
# (offline, or the hub cannot be reached): a FileNotFoundError, but the file may well exist.
_OFFLINE = "OfflineModeIsEnabled"
_NOT_CACHED = "LocalEntryNotFoundError"


def _names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and the errors it was explicitly raised from (``raise ... from``), at most 5."""
    chain = [exc]
    while len(chain) < 5 and chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    return chain


def _http_status(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and \
        100 <= value < 600 else None


def _status(exc: BaseException, *, own: bool = True) -> int | None:
    """The HTTP status that ``exc`` carries: ``exc.status`` / ``exc.status_code`` (aiohttp,
    urllib, azure), ``exc.response.status_code`` / ``.status`` (requests, httpx,
    huggingface_hub's HfHubHTTPError), botocore's response dict, and where ``exc`` is the error
    raised itself (``own``), ``exc.code`` (gcsfs, google-api-core). Not the ``code`` of an
    error it was raised from, nor aiohttp's parser errors' (``400`` for a response cut short,
    the cause of a ClientPayloadError). A requests Response is falsy for 4xx: tested with
    ``is None``, never for truth."""
    attrs: tuple[str, ...] = ("status", "status_code")
    if own and "HttpProcessingError" not in _names(exc):
        attrs += ("code",)
    for attr in attrs:
        status = _http_status(getattr(exc, attr, None))
        if status is not None:
            return status
    try:
        response = getattr(exc, "response", None)
    except Exception:  # a lazy property that cannot say (httpx raises RuntimeError when unset)
        return None
    if response is None:
        return None
    if isinstance(response, dict):  # botocore ClientError
        return _http_status(response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
    for attr in ("status_code", "status"):
        try:
            status = _http_status(getattr(response, attr, None))
        except Exception:  # a response object that cannot say
            continue
        if status is not None:
            return status
    return None


def _transient(exc: BaseException) -> bool:
    """Worth retrying: connection faults, timeouts, 5xx/408/429. Not: missing, forbidden, bad
    request or range, offline (huggingface_hub's ``OfflineModeIsEnabled``, a ConnectionError),
    any other 4xx, nor code bugs.

    ``exc`` is not when it is one of :data:`_PERMANENT_TYPES`. Else the first of ``exc`` and the
    errors it was raised from that says decides: a class that never heals (a name of
    :data:`_PERMANENT_NAMES` along its MRO), then an HTTP status. Else ``exc``'s own kind: a
    permanent errno is not, a connection error, timeout, early EOF or other OSError is, and so
    are the network clients' own errors."""
    if isinstance(exc, _PERMANENT_TYPES):
        return False
    for link in _causes(exc):
        if _names(link) & _PERMANENT_NAMES:
            return False
        status = _status(link, own=link is exc)
        if status is not None:
            return status >= 500 or status in (408, 429)
    if isinstance(exc, OSError) and exc.errno in _PERMANENT_ERRNO:
        return False
    if isinstance(exc, (OSError, TimeoutError, ConnectionError, EOFError)):
        return True
    if _names(exc) & _TRANSIENT_NAMES:
        return True
    module = type(exc).__module__ or ""
    return module.startswith(_TRANSIENT_MODULES)


def _why(what: str, exc: BaseException, tries: int) -> str:
    """The reason of the error that ends a read: what failed, after how many tries, and why."""
    after = f" after {tries} tries" if tries > 1 else ""
    detail = f"{type(exc).__name__}: {redact(str(exc))[:200]}"
    names = set().union(*(_names(link) for link in _causes(exc)))
    if _OFFLINE in names:
        return (f"{what} failed: the Hugging Face Hub is offline: HF_HUB_OFFLINE is set, unset "
                f"it to download ({detail})")
    if _NOT_CACHED in names:
        return (f"{what} failed: not in the local Hugging Face cache, and the hub is offline "
                f"(HF_HUB_OFFLINE) or cannot be reached ({detail})")
    return f"{what} failed{after}: {detail}"


# The filesystems made in this process, and those a forked child inherited from its parent:
# the child keeps those alive for good. Collected there, s3fs's and fsspec's HTTP finalizers
# would close their session on the parent's event loop, which has no thread in the child: each
# waited ~1 s (a DataLoader worker forked after the parent read the manifest stalled 2 s).
_MADE: "weakref.WeakSet[Any]" = weakref.WeakSet()
_INHERITED: list = []


def _keep_inherited() -> None:
    _INHERITED.extend(_MADE)
    _MADE.clear()


os.register_at_fork(after_in_child=_keep_inherited)


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
            try:
                _MADE.add(self._fs)
            except TypeError:  # a class that cannot be weakly referenced: not followed
                pass
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
        if isinstance(exc, FileNotFoundError) and _NOT_CACHED not in _names(exc):
            raise ShardError(self.url(name), "not found") from None
        transient = _transient(exc)
        if not transient or attempt >= self.retries:
            error = ShardError(self.url(name), _why(what, exc, attempt + 1))
            error.gave_up = transient
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

    :meth:`close` may run anywhere, the garbage collector's finalizer included (a reader dropped
    unclosed is closed when it is collected, which can happen inside another thread pool's
    ``submit``): it only sets a flag and puts a request on a ``SimpleQueue`` (reentrant), never
    takes a lock another thread may hold. The helper thread holds no reference to the reader."""

    def __init__(self, store: RemoteStore, name: str, start: int, stop: int, *,
                 piece: int = PIECE, ahead: int = AHEAD):
        self.store, self.name, self.start, self.stop = store, name, start, stop
        self._buf = memoryview(b"")
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = [False]  # read by the helper: set when the reader is closed
        pieces = store.iter_bytes(name, start, stop, max(1, piece))
        threading.Thread(target=_step_pieces, args=(pieces, self._requests, self._stop),
                         name="shardkit-remote-read", daemon=True).start()
        self._pending: deque = deque()
        self._ahead, self._done = max(1, ahead), False
        self._schedule()

    def readable(self) -> bool:
        return True

    def _schedule(self) -> None:
        while not self._done and len(self._pending) < self._ahead:
            future: Future = Future()
            self._requests.put(future)
            self._pending.append(future)
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
            self._stop[0] = True  # the helper skips the steps still queued ...
            self._done = True
            self._requests.put(None)  # ... and then closes the GET (after a step in progress)
            self._pending.clear()
            self._buf = memoryview(b"")
        super().close()


def _step_pieces(pieces: Generator, requests: queue.SimpleQueue, stop: list) -> None:
    """A :class:`ChunkedReader`'s helper: one step of ``pieces`` per request (a Future for its
    result), until the ``None`` request; then the generator is closed (the GET dropped)."""
    try:
        while True:
            future = requests.get()
            if future is None:
                return
            if stop[0] or not future.set_running_or_notify_cancel():
                future.cancel()
                continue
            try:
                future.set_result(next(pieces, None))
            except BaseException as exc:  # noqa: BLE001 - handed to the reader, which raises it
                future.set_exception(exc)
    finally:
        pieces.close()


_DATA_LOADER: Any = None  # botocore's loader of this process (see _botocore_session)


def _botocore_session():
    """A new aiobotocore session that loads botocore's data (the S3 service model, endpoints)
    through the one loader of this process, where it is parsed once and kept: a DataLoader
    worker forked after the manifest was read makes its client in ~0.05 s instead of ~0.25 s
    (every epoch without persistent workers). Only the parsed data is shared: credentials and
    everything else are each session's own."""
    global _DATA_LOADER
    import aiobotocore.session

    session = aiobotocore.session.AioSession()
    if _DATA_LOADER is None:
        _DATA_LOADER = session.get_component("data_loader")
    else:
        session.register_component("data_loader", _DATA_LOADER)
    return session


def _session_options(options: dict) -> dict:
    """The options s3fs would pass on to the session it makes (``profile``, …): with any, s3fs
    makes its own."""
    import inspect

    import s3fs

    named = set(inspect.signature(s3fs.S3FileSystem.__init__).parameters)
    fsspec_own = {"skip_instance_cache", "use_listings_cache", "listings_expiry_time",
                  "max_paths"}
    return {k: v for k, v in options.items() if k not in named and k not in fsspec_own}


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
        if "session" not in options and not _session_options(options):
            options["session"] = _botocore_session()
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
