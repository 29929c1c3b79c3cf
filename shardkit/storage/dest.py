"""Where packing writes: a local folder (temporary name, fsync, rename) or an S3 prefix.

Both implement :class:`~shardkit.storage.base.Dest`; :class:`BaseDest` holds what they share.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable, TypeVar

from ..errors import DestinationError, ShardError
from ..shardformat import META_DIR
from .base import redact
from .remote import RemoteStore
from .urls import open_store, split_source

T = TypeVar("T")


class BaseDest:
    """What every destination shares (see :class:`~shardkit.storage.base.Dest` for the
    contract): ``names`` from the listing of two folders, removal one by one, and nothing to do
    for ``prepare``, ``sync``, ``remove_temporaries`` and ``close`` unless the storage needs it."""

    remote: bool = False
    staging: Path

    def url(self, name: str) -> str:
        raise NotImplementedError

    def _list(self, folder: str) -> list[str]:
        """The names directly in ``folder`` (``""``: the top), ``[]`` when it does not exist."""
        raise NotImplementedError

    def prepare(self) -> None:
        pass

    def names(self) -> list[str]:
        """The names in the folder and in its ``.shardkit/`` sub-folder (as ``.shardkit/x``)."""
        top = [n for n in self._list("") if n != META_DIR]
        return top + [f"{META_DIR}/{n}" for n in self._list(META_DIR)]

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def read_bytes(self, name: str) -> bytes | None:
        raise NotImplementedError

    def write_atomic(self, name: str, data: bytes, sync: bool = True) -> None:
        raise NotImplementedError

    def sync(self, names: list[str]) -> None:
        pass

    def commit(self, tmp: Path, name: str) -> None:
        raise NotImplementedError

    def publish(self, journal: str, name: str, data: bytes) -> None:
        raise NotImplementedError

    def remove(self, name: str) -> None:
        raise NotImplementedError

    def remove_all(self, names: list[str]) -> None:
        """Remove ``names`` (missing ones ignored)."""
        for name in names:
            self.remove(name)

    def intact(self, name: str, size: int | None, sha256: str | None) -> bool:
        raise NotImplementedError

    def remove_temporaries(self, starting: tuple[str, ...] = (".",)) -> None:
        pass

    def close(self) -> None:
        pass


class LocalDest(BaseDest):
    """A local destination folder: temporary name, fsync, rename. Names may hold one sub-folder
    (``.shardkit/manifest.json``), made when first written to."""

    remote = False

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder).expanduser()
        self.staging = self.folder

    def url(self, name: str) -> str:
        return str(self.folder / name)

    def prepare(self) -> None:
        if self.folder.exists() and not self.folder.is_dir():
            raise DestinationError(f"{self.folder}: destination exists and is not a folder")
        self.folder.mkdir(parents=True, exist_ok=True)

    def _list(self, folder: str) -> list[str]:
        path = self.folder / folder
        if folder and not path.is_dir():
            return []
        return [p.name for p in path.iterdir()]

    def exists(self, name: str) -> bool:
        return (self.folder / name).exists()

    def read_bytes(self, name: str) -> bytes | None:
        try:
            return (self.folder / name).read_bytes()
        except FileNotFoundError:
            return None

    def _target(self, name: str) -> Path:
        path = self.folder / name
        path.parent.mkdir(exist_ok=True)
        return path

    def write_atomic(self, name: str, data: bytes, sync: bool = True) -> None:
        """Write ``name`` whole or not at all; ``sync``: on disk when this returns (else see
        :meth:`sync`)."""
        path = self._target(name)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
        with open(tmp, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if sync:
            fsync_dir(path.parent)

    def sync(self, names: list[str]) -> None:
        """Put files written with ``sync=False`` on disk (many fsyncs at once, then their
        folders'), before a file that refers to them is written."""
        from concurrent.futures import ThreadPoolExecutor

        def one(name: str) -> None:
            fd = os.open(self.folder / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(one, names))
        for folder in {(self.folder / n).parent for n in names}:
            fsync_dir(folder)

    def commit(self, tmp: Path, name: str) -> None:
        path = self._target(name)
        os.replace(tmp, path)
        fsync_dir(path.parent)

    def publish(self, journal: str, name: str, data: bytes) -> None:
        """Write ``data`` as ``name`` and remove ``journal`` in one step that a kill cannot
        split: ``data`` replaces the journal (atomically), then the journal is renamed."""
        self.write_atomic(journal, data)
        self.commit(self.folder / journal, name)

    def remove(self, name: str) -> None:
        (self.folder / name).unlink(missing_ok=True)

    def intact(self, name: str, size: int | None, sha256: str | None) -> bool:
        path = self.folder / name
        try:
            if size is not None and path.stat().st_size != size:
                return False
            return sha256_file(path) == sha256
        except OSError:
            return False

    def remove_temporaries(self, starting: tuple[str, ...] = (".",)) -> None:
        """Remove ``.<name>.tmp-<hex>`` files (a killed writer's) whose name starts with one of
        ``starting``, in the folder and in ``.shardkit/``."""
        for name in self.names():
            base = name.rpartition("/")[2]
            if base.startswith(starting) and ".tmp-" in base:
                (self.folder / name).unlink(missing_ok=True)


class RemoteDest(BaseDest):
    """An object-store prefix: shards are staged locally, uploaded when finished (multipart for
    large ones, by s3fs), the journal and manifest are single PUTs, which are atomic."""

    remote = True

    def __init__(self, source: str, storage_options: dict | None = None) -> None:
        protocol, base, _ = split_source(source)
        store = None if protocol == "file" else open_store(protocol, base, storage_options)
        if not isinstance(store, RemoteStore) or not store.writable:
            raise ValueError(f"{redact(source)}: packing writes to local folders or s3:// only")
        self.store = store
        self.staging = Path(tempfile.mkdtemp(prefix="shardkit-stage-"))

    def url(self, name: str) -> str:
        return self.store.url(name)

    def _do(self, what: str, name: str, fn: Callable[[], T]) -> T:
        return self.store.retry(what, name, fn)

    def _list(self, folder: str) -> list[str]:
        prefix = f"{self.store.base}/{folder}" if folder else self.store.base

        def ls() -> list[str]:
            try:
                return [p.rsplit("/", 1)[-1] for p in self.store.fs.ls(prefix, detail=False,
                                                                      refresh=True)]
            except FileNotFoundError:
                return []

        return self._do("list", folder, ls)

    def exists(self, name: str) -> bool:
        return self.store.exists(name)

    def read_bytes(self, name: str) -> bytes | None:
        try:
            return self.store.read_bytes(name)
        except ShardError as exc:
            if exc.reason == "not found":
                return None
            raise

    def write_atomic(self, name: str, data: bytes, sync: bool = True) -> None:
        self._do("upload", name, lambda: self.store.fs.pipe_file(self.store.path(name), data))

    def remove_all(self, names: list[str]) -> None:
        """Remove ``names`` (missing ones ignored) in bulk requests."""
        paths = [self.store.path(n) for n in names]
        for i in range(0, len(paths), 1000):
            part = paths[i:i + 1000]

            def rm(part: list[str] = part) -> None:
                try:
                    self.store.fs.rm(part)
                except FileNotFoundError:
                    pass

            self._do("delete", names[i], rm)

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

    def intact(self, name: str, size: int | None, sha256: str | None) -> bool:
        # Uploads are atomic: an object that exists with the recorded size is the finished shard.
        try:
            info = self._do("stat", name, lambda: self.store.fs.info(self.store.path(name)))
        except ShardError:
            return False
        if size is None:
            data = self.read_bytes(name)
            return data is not None and hashlib.sha256(data).hexdigest() == sha256
        return int(info.get("size", -1)) == size

    def close(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def make_dest(dest: str | os.PathLike[str],
              storage_options: dict | None = None) -> LocalDest | RemoteDest:
    """The destination for a local folder (or ``file://`` URL) or an ``s3://`` prefix."""
    text = os.fspath(dest)
    if "://" in text and not text.startswith("file://"):
        return RemoteDest(text, storage_options)
    return LocalDest(text[len("file://"):] if text.startswith("file://") else text)


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(folder: str | os.PathLike[str]) -> None:
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
