"""Where a dataset lives and how its bytes move: local folders, S3-compatible stores, HTTP(S).

A *source* is a dataset folder, a ``manifest.json`` path, ``s3://bucket/prefix[/manifest.json]``
or ``http(s)://host/path/[manifest.json]``. It resolves to a :class:`Store` rooted at the dataset's
folder or prefix; shard and index names from the manifest are plain relative names resolved inside
it, never elsewhere.

Remote reads go through fsspec (s3fs for ``s3://``, aiohttp for ``http(s)://``), created lazily in
each process (so a store pickles into DataLoader workers). Every request is a range request of at
most ``CHUNK`` bytes; transient faults (dropped connections, 5xx, timeouts) are retried with
exponential backoff, resuming at the first byte not yet delivered. After ``retries`` tries the
error names the URL. Credentials come from the standard AWS variables and files, or from
``storage_options``; they never appear in URLs, messages or the manifest.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import random
import re
import shutil
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .errors import ShardError

MANIFEST_NAME = "manifest.json"
CHUNK = 4 << 20
FIRST_CHUNK = 1 << 20
REMOTE_PROTOCOLS = ("s3", "http", "https")


def redact(url: str) -> str:
    """A URL without ``user:password@`` and without query-string secrets."""
    url = re.sub(r"(://)[^/@]*@", r"\1", url)
    return re.sub(r"\?.*$", "", url)


def split_source(source) -> tuple[str, str, str]:
    """``(protocol, base, manifest_name)`` for a dataset source."""
    text = os.fspath(source) if not isinstance(source, str) else source
    if text.startswith("file://"):
        text = text[len("file://"):]
    match = re.match(r"^([a-z][a-z0-9+.-]*)://(.*)$", text)
    if match:
        protocol, rest = match.group(1), match.group(2)
        if protocol not in REMOTE_PROTOCOLS:
            raise ValueError(f"{redact(text)}: unsupported protocol {protocol!r} "
                             f"(use a local path, s3://, http:// or https://)")
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
        return LocalStore(base), name
    return RemoteStore(protocol, base, storage_options, retries=retries, timeout=timeout), name


def load_manifest(source, storage_options: dict | None = None, *, timeout: float = 60.0,
                  retries: int = 6):
    from .manifest import Manifest

    if isinstance(source, Manifest):
        return source
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


class LocalStore(Store):
    """Reads shard and index files below a local folder."""

    def __init__(self, base: str):
        self.base = Path(base)

    def url(self, name: str) -> str:
        return str(self.base / name)

    def read_bytes(self, name: str) -> bytes:
        try:
            return (self.base / name).read_bytes()
        except OSError as exc:
            raise ShardError(self.url(name), f"cannot read: {exc.strerror or exc}") from exc

    def open_range(self, name: str, start: int, stop: int):
        """A file object positioned at ``start`` that ends at ``stop`` (exclusive)."""
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
                if isinstance(exc, ShardError):
                    raise
                if isinstance(exc, FileNotFoundError):
                    raise ShardError(self.url(name), "not found") from None
                if not _transient(exc) or attempt == self.retries:
                    tries = f" after {attempt + 1} tries" if attempt else ""
                    raise ShardError(self.url(name), f"{what} failed{tries}: "
                                     f"{type(exc).__name__}: {redact(str(exc))[:200]}") from None
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 5.0)

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

    def exists(self, name: str) -> bool:
        return self._retry("stat", name, lambda: self.fs.exists(self.path(name)))


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
    """Bytes ``[start, stop)`` of a remote object as a stream of range requests.

    The next chunk is fetched in a background thread while the current one is consumed, so
    samples flow before the whole shard has arrived. Each chunk is retried on its own.
    """

    def __init__(self, store: RemoteStore, name: str, start: int, stop: int):
        self.store, self.name, self.pos, self.stop = store, name, start, stop
        self._buf = memoryview(b"")
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._next = None
        self._size = FIRST_CHUNK
        self._schedule()

    def readable(self) -> bool:
        return True

    def _schedule(self) -> None:
        if self.pos < self.stop:
            end = min(self.pos + self._size, self.stop)
            self._next = self._pool.submit(self.store.read_range, self.name, self.pos, end)
            self.pos = end
            self._size = CHUNK
        else:
            self._next = None

    def readinto(self, buf) -> int:
        if not len(self._buf):
            if self._next is None:
                return 0
            self._buf = memoryview(self._next.result())
            self._schedule()
        n = min(len(buf), len(self._buf))
        buf[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def close(self) -> None:
        if self._next is not None:
            self._next.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
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


__all__ = ["LocalDest", "LocalStore", "RangeReader", "RemoteDest", "RemoteStore", "load_manifest",
           "make_dest", "make_store", "redact", "split_source", "store_for", "MANIFEST_NAME"]
