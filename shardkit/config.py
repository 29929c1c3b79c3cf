"""The read path's settings, grouped: small frozen objects, each checked once when it is made.

``StreamingDataset``'s flat keyword arguments (the public interface, unchanged) become a
:class:`PlanConfig` (who reads what: the arguments of :mod:`shardkit.plan`) and a
:class:`StorageConfig` (where bytes come from: protocol options, timeouts, cache, memory). How
samples are decoded is :class:`shardkit.modes.DecodeConfig`. Each raises ``ValueError`` (or
``TypeError``) naming the argument and what it accepts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, Optional

from .common import parse_bytes
from .plan import check_settings

# The settings that decide a plan besides (seed, epoch, world size, workers); global states
# record them under "plan" (their names are part of the state format).
PLAN_SETTINGS = ("shuffle", "block_size", "shuffle_buffer", "remainder", "batch_size", "drop_last")


@dataclass(frozen=True)
class PlanConfig:
    """Who reads what (see :mod:`shardkit.plan`). ``block_size`` None: the manifest decides
    (:meth:`resolved`)."""

    seed: int = 0
    shuffle: bool = True
    block_size: Optional[int] = None
    shuffle_buffer: int = 1000
    remainder: str = "drop"
    batch_size: Optional[int] = None
    drop_last: bool = False

    def __post_init__(self) -> None:
        # the rules live with the plan (check_settings); the values are kept as ints
        seed, block_size, shuffle_buffer, batch_size = check_settings(
            seed=self.seed, block_size=self.block_size, shuffle_buffer=self.shuffle_buffer,
            remainder=self.remainder, batch_size=self.batch_size)
        if self.drop_last and batch_size is None:
            raise ValueError("drop_last drops a rank's last partial batch: it needs batch_size")
        for name, value in (("seed", seed), ("block_size", block_size),
                            ("shuffle_buffer", shuffle_buffer), ("batch_size", batch_size),
                            ("shuffle", bool(self.shuffle)), ("drop_last", bool(self.drop_last))):
            object.__setattr__(self, name, value)

    def resolved(self, block_size: int) -> PlanConfig:
        """This config with ``block_size`` filled in where it was left to the manifest."""
        return self if self.block_size is not None else replace(self, block_size=block_size)

    def settings(self) -> dict[str, Any]:
        """The plan settings as global states record them (``PLAN_SETTINGS``), also the keyword
        arguments :func:`shardkit.plan.epoch_plan` takes besides the seed."""
        return {name: getattr(self, name) for name in PLAN_SETTINGS}


@dataclass(frozen=True)
class StorageConfig:
    """Where the bytes come from: ``storage_options`` for fsspec, ``timeout`` (seconds without
    a byte, local reads included) and ``retries`` of every read, the shared shard cache for
    remote stores (``cache_dir``, ``cache_limit`` in bytes), and ``in_memory`` preloading
    (``memory_limit`` in bytes)."""

    storage_options: Optional[dict] = None
    timeout: float = 60.0
    retries: int = 6
    cache_dir: Optional[str] = None
    cache_limit: Optional[int] = None
    in_memory: bool = False
    memory_limit: Optional[int] = None

    @classmethod
    def of(cls, *, storage_options: dict | None = None, timeout: float = 60.0,
           retries: int = 6, cache_dir: str | os.PathLike | None = None,
           cache_limit: int | str | None = None, in_memory: bool = False,
           memory_limit: int | str | None = None) -> StorageConfig:
        """From the dataset's arguments as users give them (paths, ``"10GB"`` strings)."""
        if memory_limit is not None and not in_memory:
            raise ValueError("memory_limit bounds in_memory=True; it does nothing without it")
        if cache_limit is not None and cache_dir is None:
            raise ValueError("cache_limit needs a cache_dir")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        return cls(storage_options=storage_options, timeout=float(timeout), retries=retries,
                   cache_dir=None if cache_dir is None else os.fspath(cache_dir),
                   cache_limit=None if cache_limit is None
                   else parse_bytes(cache_limit, "cache_limit"),
                   in_memory=bool(in_memory),
                   memory_limit=None if memory_limit is None
                   else parse_bytes(memory_limit, "memory_limit"))

    def __post_init__(self) -> None:
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries must be a non-negative int, got {self.retries!r}")
        if self.storage_options is not None and not isinstance(self.storage_options, dict):
            raise TypeError(f"storage_options must be a dict of fsspec options, got "
                            f"{type(self.storage_options).__name__}")

