"""Writing shards: the ordered stream of encoded samples cut into tar files within the limits.

Each shard is written under a temporary name, hashed on a helper thread as it is written,
flushed, fsynced (``durable``) and renamed; its index file goes first, the journal after it.
Shard boundaries are decided in order from the exact tar sizes, so they do not depend on the
number of encode workers.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, Union

from ..errors import SourceError
from ..manifest import ShardInfo
from ..shardformat import END_OF_ARCHIVE, encode_index, index_name
from ..storage import Dest
from .folder import Item
from .journal import Resume, journal_name, write_journal
from .options import PackOptions
from .parts import part_tag

Buffer = Union[bytes, bytearray, memoryview]


class _Hasher:
    """sha256 of a shard in a background thread, overlapping the reads and writes of the main one
    (hashlib releases the GIL on large buffers). One queue item per sample."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._queue: queue.Queue = queue.Queue(maxsize=64)
        self._thread = threading.Thread(target=self._run, name="shardkit-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        update = self._hash.update
        while (parts := self._queue.get()) is not None:
            for part in parts:
                update(part)

    def update(self, parts: Sequence[Buffer]) -> None:
        self._queue.put(parts)

    def hexdigest(self) -> str:
        self.close()
        return self._hash.hexdigest()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


class ShardWriter:
    """Cuts the ordered stream of encoded samples into shards no larger than the limits
    (``opts.limit`` bytes, ``opts.max_samples`` samples), going on after ``resume``'s shards."""

    def __init__(self, out: Dest, opts: PackOptions, fingerprint: str, resume: Resume,
                 skipped: list[dict]) -> None:
        part = opts.part
        self.out, self.durable = out, opts.durable
        self.prefix = opts.prefix if part is None else f"{opts.prefix}-{part_tag(part)}"
        self.journal_name = journal_name(part)
        self.max_bytes, self.max_samples = opts.limit, opts.max_samples
        self.journal = list(resume.entries)  # [{"shard": ShardInfo fields, "consumed": int}]
        self.shards = [ShardInfo(**entry["shard"]) for entry in resume.entries]
        self.skipped = list(skipped)
        self.fingerprint = fingerprint
        self.tensor_info = resume.tensor
        self.bytes_written = 0
        self._file: BinaryIO | None = None
        self._tmp: Path | None = None

    def skip(self, pos: int, item: Item, reason: str) -> None:
        self.skipped.append({"path": item.relpath, "reason": reason, "pos": pos})

    def add(self, pos: int, item: Item, blob: Buffer | Sequence[Buffer], info: dict) -> None:
        """Append one sample: its tar bytes, as ``bytes`` or a list of buffers."""
        parts = [blob] if isinstance(blob, (bytes, bytearray, memoryview)) else blob
        nbytes = sum(len(p) for p in parts)
        if info:
            if self.tensor_info is None:
                self.tensor_info = info
            elif (info["dtype"], info["layout"], info["ndim"]) != (
                    self.tensor_info["dtype"], self.tensor_info["layout"], self.tensor_info["ndim"]):
                raise SourceError(item.relpath, f"array is {info['dtype']} {info['layout']}, but earlier "
                                  f"ones are {self.tensor_info['dtype']} {self.tensor_info['layout']}")
        if self._file is not None:
            full = self._n >= (self.max_samples or float("inf"))
            if full or self._size + nbytes + len(END_OF_ARCHIVE) > self.max_bytes:
                self._close_shard(consumed=pos)
        if self._file is None:
            self._file = self._open_shard()
        if nbytes + len(END_OF_ARCHIVE) > self.max_bytes:
            warnings.warn(f"{item.relpath}: one sample takes {nbytes} bytes, more than max_bytes="
                          f"{self.max_bytes}; it gets a shard of its own", stacklevel=2)
        self._offsets.append(self._size)
        self._file.writelines(parts)
        self._hash.update(parts)
        self._size += nbytes
        self._n += 1
        self.bytes_written += nbytes
        if nbytes + len(END_OF_ARCHIVE) > self.max_bytes:
            self._close_shard(consumed=pos + 1)

    def finish(self, total: int) -> None:
        """Close the last shard (``total``: the position after the last sample)."""
        if self._file is not None:
            self._close_shard(consumed=total)
        self.skipped = [{"path": s["path"], "reason": s["reason"]} for s in self.skipped]

    def abort(self) -> None:
        """Drop an unfinished shard (its temporary file), e.g. after an error."""
        if self._file is not None:
            self._hash.close()
            self._file.close()
            self._file = None
            if self._tmp is not None:
                self._tmp.unlink(missing_ok=True)

    def _name(self, ext: str) -> str:
        return f"{self.prefix}-{len(self.shards):06d}.{ext}"

    def _open_shard(self) -> BinaryIO:
        self._tmp = self.out.staging / f".{self._name('tar')}.tmp-{uuid.uuid4().hex}"
        file = open(self._tmp, "wb")
        self._hash = _Hasher()
        self._size = 0
        self._n = 0
        self._offsets: list[int] = []
        return file

    def _close_shard(self, consumed: int) -> None:
        f, tmp = self._file, self._tmp
        assert f is not None and tmp is not None
        f.write(END_OF_ARCHIVE)
        self._hash.update([END_OF_ARCHIVE])
        f.flush()
        if self.durable:
            os.fsync(f.fileno())
        f.close()
        self._file = None
        tar_name = self._name("tar")
        idx_name = index_name(tar_name)
        index = encode_index(self._offsets + [self._size])
        self.out.write_atomic(idx_name, index)
        self.out.commit(tmp, tar_name)
        info = ShardInfo(url=tar_name, num_samples=self._n, num_bytes=self._size + len(END_OF_ARCHIVE),
                         sha256=self._hash.hexdigest(), index_url=idx_name,
                         index_sha256=hashlib.sha256(index).hexdigest())
        self.shards.append(info)
        self.journal.append({"shard": vars(info).copy(), "consumed": consumed})
        write_journal(self.out, self.journal_name, self.fingerprint, self.journal, self.skipped,
                      self.tensor_info)
