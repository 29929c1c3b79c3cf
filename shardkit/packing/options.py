"""The settings of one pack: :class:`PackOptions`, checked once when made.

``pack_folder`` keeps its flat keyword arguments (the public interface); it builds one
``PackOptions`` from them, and everything inside packing takes that object. A bad value is a
``ValueError`` naming the argument and what it may be, raised before any file is read or written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..common import available_cpus, parse_bytes
from ..errors import OnError
from ..shardformat import MAX_PIXELS

MODES = ("raw", "resize", "tensor")


@dataclass(frozen=True)
class PackOptions:
    """What ``pack_folder`` was asked to do (its keyword arguments, same names and defaults, less
    ``storage_options``, which only reach the destination).

    Checked in ``__post_init__``; after that ``size``, ``quality`` and ``max_pixels`` are ints,
    ``shuffle`` a bool, ``part`` a checked ``(index, count)`` or None (``(0, 1)`` is an ordinary
    pack, so None), and two fields are derived: ``limit`` (``max_bytes`` in bytes) and
    ``num_workers`` (``workers``, or the usable CPUs when None).
    """

    mode: str = "raw"
    size: int | None = None
    quality: int = 90
    max_bytes: int | str = "256MB"
    max_samples: int | None = None
    workers: int | None = None
    seed: int = 0
    shuffle: bool = True
    on_error: OnError = OnError.RAISE
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    prefix: str = "shard"
    max_pixels: int = MAX_PIXELS
    durable: bool = True
    part: tuple[int, int] | None = None
    finalize: bool = True
    limit: int = field(init=False, repr=False)  # max_bytes in bytes: the largest shard
    num_workers: int = field(init=False, repr=False)  # encode processes (or threads)

    def __post_init__(self) -> None:
        mode, size, quality = self.mode, self.size, self.quality
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode in ("resize", "tensor") and (size is None or int(size) < 1):
            raise ValueError(f"size is required (a positive number of pixels) for mode={mode!r}")
        if mode == "raw" and size is not None:
            raise ValueError(f"size={size!r} does nothing in mode='raw', which stores the original "
                             "bytes; use mode='resize' (JPEG, shorter side to size) or 'tensor'")
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"quality must be between 1 and 100, got {quality!r}")
        if mode != "resize" and int(quality) != 90:
            raise ValueError(f"quality={quality!r} does nothing in mode={mode!r}: only mode='resize' "
                             "encodes JPEGs")
        if self.max_samples is not None and int(self.max_samples) < 1:
            raise ValueError(f"max_samples must be at least 1, got {self.max_samples!r}")
        if not re.fullmatch(r"[A-Za-z0-9_]+", self.prefix):
            raise ValueError(f"prefix must be letters, digits or _, got {self.prefix!r}")
        limit = parse_bytes(self.max_bytes)
        workers = available_cpus() if self.workers is None else max(1, int(self.workers))
        plain = {"size": None if size is None else int(size), "quality": int(quality),
                 "limit": limit, "num_workers": workers,
                 "shuffle": bool(self.shuffle), "part": check_part(self.part),
                 "max_pixels": int(self.max_pixels)}
        for name, value in plain.items():
            object.__setattr__(self, name, value)


def check_part(part: object) -> tuple[int, int] | None:
    """``(index, count)`` checked (0-based index); None for no part or ``(0, 1)``."""
    if part is None:
        return None
    try:
        i, n = (int(v) for v in part)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        raise ValueError(f"part must be (index, count), e.g. (0, 4), got {part!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"part index must be in 0..count-1 (0-based), got {i} of {n}")
    return None if n == 1 else (i, n)
