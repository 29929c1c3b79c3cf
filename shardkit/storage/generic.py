"""Any other filesystem fsspec knows (``gs://``, ``az://``, ``hf://``, ``memory://``, …): one
generic range read.

:class:`FsspecStore` reads through ``fsspec.filesystem(protocol, **storage_options)``, made
lazily in each process like the tuned stores of :mod:`~shardkit.storage.remote`, whose retry,
backoff and resume logic it shares. A range is one ``fs.open(path, "rb")`` read piece by piece
from ``start`` (:class:`_FileStream`), whether the filesystem is sync or async; a dropped read
is retried from the first byte not yet delivered. Not every fsspec filesystem has timeouts of its
own, so each call that may block runs on a helper thread that the store waits for at most
``timeout`` seconds (:func:`~shardkit.storage.bounded.call_within`): a call that has not answered
by then is a ``TimeoutError``, retried like a dropped connection.

Read-only: packing writes to local folders and ``s3://`` only (``writable`` is False).
"""

from __future__ import annotations

import os
import threading
import weakref

from ..errors import ShardError
from .bounded import call_within
from .remote import PIECE, RemoteStore

FSSPEC_CALL = "shardkit-fsspec-call"  # the name of a helper thread while it calls fsspec


class FsspecStore(RemoteStore):
    """Files below ``protocol://base`` on a filesystem that fsspec knows and shardkit has no
    tuned store for. ``storage_options`` go to ``fsspec.filesystem`` as they are."""

    def _make_fs(self, options: dict):
        import fsspec

        # An instance of our own: fsspec shares cached instances (and their listings caches)
        # with the caller's code, and would not re-create one made with other options.
        options.setdefault("skip_instance_cache", True)
        return fsspec.filesystem(self.protocol, **options)

    def _fs_call(self, fn):
        return call_within(self.timeout, fn, name=FSSPEC_CALL)

    def _open_stream(self, name: str, start: int, stop: int) -> "_FileStream":
        return _FileStream(self, name, start, stop)

    def read_bytes(self, name: str) -> bytes:
        # Streamed rather than one cat_file: every piece is bounded by ``timeout`` (seconds
        # without a byte), so a whole large shard (verify, in_memory) is no race against it.
        def read() -> bytes:
            stream = _FileStream(self, name, 0, None)
            try:
                parts: list[bytes] = []
                while True:
                    part = stream.read(PIECE)
                    if not part:
                        return b"".join(parts)
                    parts.append(part)
            finally:
                stream.close()

        return self.retry("read", name, read)


class _FileStream:
    """Bytes ``[start, stop)`` of one file (to its end when ``stop`` is None): ``fs.open(path,
    "rb")``, then per piece a ``seek`` to the stream's position and a ``read``, each call bounded
    by the store's ``timeout``.

    Some filesystems hand every opener of a path the same file object (fsspec's ``memory://``),
    so streams of one path in a process take turns (:func:`_turns`) and each read seeks first;
    a call that timed out may hold the lock for good, so the path gets a new one (the next try
    must not wait behind it).
    A file that ends before ``stop`` is a ShardError at once (not retried: the reader then
    diagnoses a truncated shard)."""

    def __init__(self, store: FsspecStore, name: str, start: int, stop: int | None):
        self.start, self.stop, self._pos = start, stop, start
        self._url, self._path, self._timeout = store.url(name), store.path(name), store.timeout
        self._turns = _turns(self._path)
        self._file, self._stuck = None, False

        def open_file():
            fs = store.fs  # made here: making it may block too (credentials, a session)
            with self._turns.lock:
                return fs.open(self._path, "rb")

        self._file = self._call(open_file, late=_close_quietly)

    def _call(self, fn, late):
        try:
            return call_within(self._timeout, fn, name=FSSPEC_CALL, late=late)
        except TimeoutError:
            self._stuck = True  # the call goes on alone; `late` closes the file after it
            _forget(self._path, self._turns)  # it may hold the lock: the next try takes another
            raise

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes (fewer only at ``stop``; ``b""`` there, or at the end of the file
        when ``stop`` is None)."""
        if self.stop is not None:
            n = min(n, self.stop - self._pos)
        if n <= 0:
            return b""
        file, pos = self._file, self._pos

        def read_piece():
            with self._turns.lock:
                file.seek(pos)
                return file.read(n)

        data = self._call(read_piece, late=lambda _: _close_quietly(file))
        if not data:
            if self.stop is None:
                return b""
            raise ShardError(self._url, f"asked for bytes {self.start}..{self.stop}, the file "
                                        f"ends at byte {pos}")
        self._pos += len(data)
        return data

    def close(self) -> None:
        file, self._file = self._file, None
        if file is not None and not self._stuck:
            try:
                call_within(self._timeout, lambda: _close_quietly(file), name=FSSPEC_CALL)
            except TimeoutError:  # closing a stalled connection: it goes with its thread
                pass


def _close_quietly(file) -> None:
    try:
        file.close()
    except Exception:  # a broken connection may fail to close; nothing to keep
        pass


class _Turn:
    """The lock that the streams of one path in this process take turns with."""

    __slots__ = ("lock", "__weakref__")

    def __init__(self):
        self.lock = threading.Lock()


_turn_of_path: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # while streams hold it
_turn_guard = threading.Lock()


def _turns(path: str) -> _Turn:
    with _turn_guard:
        turn = _turn_of_path.get(path)
        if turn is None:
            turn = _turn_of_path[path] = _Turn()
        return turn


def _forget(path: str, turn: _Turn) -> None:
    with _turn_guard:
        if _turn_of_path.get(path) is turn:
            del _turn_of_path[path]


def _reset_after_fork() -> None:
    global _turn_of_path, _turn_guard  # a forked worker starts with no streams and free locks
    _turn_of_path, _turn_guard = weakref.WeakValueDictionary(), threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)
