"""The content hashes a manifest names for its shards: sha256 and BLAKE3.

``pack`` records each shard's sha256 (``ShardInfo.sha256``). ``shardkit index`` records BLAKE3 by
default (``ShardInfo.blake3``; ``--hash sha256`` for the old way): indexing reads every byte of a
shard, and on a few cores sha256 (~1.8 GB/s a core here) is slower than a disk read cold, where
BLAKE3 (~4.5 GB/s a core, the official ``blake3`` wheel) is not. A shard names one of the two; the
other is None. Index files, manifests and shard lists keep sha256 (small files).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

__all__ = ["ALGORITHMS", "INDEX_DEFAULT", "all_hex", "check_algorithm", "check_hex", "hexdigest",
           "new"]

ALGORITHMS = ("sha256", "blake3")
INDEX_DEFAULT = "blake3"  # what `shardkit index` records unless told otherwise
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX = re.compile(r"[0-9a-fA-F]*")


def check_algorithm(name: object) -> str:
    """``name`` if it is a hash a manifest may name, else a ValueError listing them."""
    if name not in ALGORITHMS:
        raise ValueError(f"hash must be one of {', '.join(ALGORITHMS)}; got {name!r}")
    return str(name)


def new(algorithm: str) -> Any:
    """A new hash object (``update``, ``hexdigest``) of ``algorithm``. BLAKE3 hashes one piece
    on one thread (callers hash several shards at once, one thread each); each ``update`` of a
    large piece releases the GIL, as hashlib's do."""
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "blake3":
        try:
            from blake3 import blake3
        except ImportError as exc:  # a dependency: missing only when installed without them
            raise ImportError("this dataset's shards are checked by BLAKE3, which needs the "
                              "blake3 package (a dependency of shardkit): pip install blake3") \
                from exc
        return blake3(max_threads=1)
    raise ValueError(f"hash must be one of {', '.join(ALGORITHMS)}; got {algorithm!r}")


def hexdigest(data: Any, algorithm: str) -> str:
    """The hex digest of ``data`` (bytes or a buffer) by ``algorithm``."""
    h = new(algorithm)
    h.update(data)
    return h.hexdigest()


def all_hex(values: list[str]) -> bool:
    """Whether every value of ``values`` (strings) is 64 hex digits: one pass over them joined,
    for a manifest's many shards."""
    return all(len(v) == 64 for v in values) and _HEX.fullmatch("".join(values)) is not None


def check_hex(value: object, algorithm: str) -> str:
    """``value`` lower-cased if it is a digest of ``algorithm`` (64 hex digits for both), else
    a ValueError naming the algorithm."""
    if not isinstance(value, str) or not _HEX64.fullmatch(value.lower()):
        raise ValueError(f"{algorithm} must be 64 hex digits, got {value!r}")
    return value.lower()
