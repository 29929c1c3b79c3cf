"""The read path's settings, grouped: small frozen objects, each checked once when it is made.

``StreamingDataset``'s flat keyword arguments (the public interface, unchanged) become a
:class:`PlanConfig` (who reads what: the arguments of :mod:`shardkit.plan`) and a
:class:`StorageConfig` (where bytes come from: protocol options, timeouts, cache, memory). How
samples are decoded is :class:`shardkit.modes.DecodeConfig`. Each raises ``ValueError`` (or
``TypeError``) naming the argument and what it accepts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Any, Optional

from .common import parse_bytes
from .layout import MIXES
from .plan import check_settings, shuffle_start_of

# The settings that decide a plan besides (seed, epoch, world size, workers); global states
# record them under "plan" (their names are part of the state format).
PLAN_SETTINGS = ("shuffle", "block_size", "shuffle_buffer", "remainder", "batch_size", "drop_last",
                 "shuffle_start")


@dataclass(frozen=True)
class PlanConfig:
    """Who reads what (see :mod:`shardkit.plan`). ``block_size`` None: the manifest decides
    (:meth:`resolved`); ``whole_shards``: that default is the largest shard's samples
    (``block_size="shard"``, see :meth:`of`)."""

    seed: int = 0
    shuffle: bool = True
    block_size: Optional[int] = None
    shuffle_buffer: int = 1000
    remainder: str = "drop"
    batch_size: Optional[int] = None
    drop_last: bool = False
    shuffle_start: Optional[int] = None  # None: plan.shuffle_start_of's default (a tenth)
    whole_shards: bool = False  # block_size="shard": the default block is the largest shard

    @classmethod
    def of(cls, *, block_size: int | str | None = None, **settings: Any) -> PlanConfig:
        """The config for these arguments; ``block_size="shard"``: whole shards."""
        if isinstance(block_size, str):
            if block_size != "shard":
                raise ValueError(f"block_size must be an integer >= 1, None or 'shard', got "
                                 f"{block_size!r}")
            return cls(block_size=None, whole_shards=True, **settings)
        return cls(block_size=block_size, **settings)

    def __post_init__(self) -> None:
        # the rules live with the plan (check_settings); the values are kept as ints
        seed, block_size, shuffle_buffer, batch_size = check_settings(
            seed=self.seed, block_size=self.block_size, shuffle_buffer=self.shuffle_buffer,
            remainder=self.remainder, batch_size=self.batch_size)
        if self.drop_last and batch_size is None:
            raise ValueError("drop_last drops a rank's last partial batch: it needs batch_size")
        start = shuffle_start_of(shuffle_buffer, self.shuffle_start)
        for name, value in (("seed", seed), ("block_size", block_size), ("shuffle_start", start),
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



@dataclass(frozen=True)
class Source:
    """One dataset of a mixture (``StreamingDataset([Source(...), Source(...)])``).

    ``location``: anything a single dataset takes (a packed or indexed folder on any store, a
    manifest path or URL, a :class:`~shardkit.Manifest`, a list of shard URLs).
    Its share of each epoch, at most one of: ``weight`` (a fraction of ``epoch_size``; weights
    are normalized, and given to every source or to none), ``repeat`` (times its own size,
    fractional allowed: 0.5 reads half of it each epoch, 3 reads it three times) or ``choose``
    (samples per epoch); none of them: its own size. ``storage_options``: fsspec options of its
    store (default: the dataset's)."""

    location: Any
    weight: Optional[float] = None
    repeat: Optional[float] = None
    choose: Optional[int] = None
    storage_options: Optional[dict] = None

    def __post_init__(self) -> None:
        given = [n for n in ("weight", "repeat", "choose") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"Source({self.location!r}): give at most one of weight, repeat "
                             f"and choose, got {' and '.join(given)}")
        for name in ("weight", "repeat"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                raise ValueError(f"Source({self.location!r}): {name} must be a positive number, "
                                 f"got {value!r}")
        choose = self.choose
        if choose is not None and (isinstance(choose, bool) or not isinstance(choose, int)
                                   or choose < 1):
            raise ValueError(f"Source({self.location!r}): choose must be an integer >= 1 "
                             f"(samples per epoch), got {choose!r}")
        if self.storage_options is not None and not isinstance(self.storage_options, dict):
            raise TypeError(f"Source({self.location!r}): storage_options must be a dict of "
                            f"fsspec options, got {type(self.storage_options).__name__}")
        if isinstance(self.location, Source):
            raise TypeError("Source(Source(...)): give the location itself")

    @property
    def spec(self) -> tuple:
        """``(weight, repeat, choose)``, as :func:`shardkit.layout.epoch_shares` takes them."""
        return (self.weight, self.repeat, self.choose)


LABEL_SPACES = ("per_source", "by_name")


@dataclass(frozen=True)
class MixConfig:
    """What an epoch takes of each source: the ``sources`` (one for a plain dataset), whether
    the user gave a list of them (``mixture``), ``epoch_size``, ``mix`` (see
    :mod:`shardkit.layout`) and how labels of several sources relate (``label_space``:
    ``"per_source"``, each keeps its own; ``"by_name"``, one space of all class names)."""

    sources: tuple[Source, ...]
    mixture: bool = False
    epoch_size: Optional[int] = None
    mix: str = "random"
    label_space: str = "per_source"

    @classmethod
    def of(cls, source: Any, *, epoch_size: Optional[int] = None, mix: str = "random",
           label_space: str = "per_source", storage_options: Optional[dict] = None,
           batch_size: Optional[int] = None) -> MixConfig:
        """From the dataset's ``source`` argument: a location, a :class:`Source`, or a list of
        them (a list of strings is a list of shard URLs, one dataset)."""
        if isinstance(source, Source):
            items, mixture = [source], True
        elif isinstance(source, (list, tuple)) and any(isinstance(s, Source) for s in source):
            if not all(isinstance(s, Source) for s in source):
                raise TypeError("source: a list of shardkit.Source for a mixture, or a list of "
                                "shard URLs for one dataset, not both in one list")
            items, mixture = list(source), True
        else:
            if isinstance(source, list):
                source = tuple(source)  # a caller's copy
            items, mixture = [Source(source)], False
        if mixture and not items:
            raise ValueError("source: an empty list of sources")
        items = [s if s.storage_options is not None or storage_options is None
                 else replace(s, storage_options=storage_options) for s in items]
        if epoch_size is not None and (isinstance(epoch_size, bool)
                                       or not isinstance(epoch_size, int) or epoch_size < 1):
            raise ValueError(f"epoch_size must be an integer >= 1 (samples per epoch over all "
                             f"ranks), got {epoch_size!r}")
        if mix not in MIXES:
            raise ValueError(f"mix must be one of {MIXES}, got {mix!r}")
        if mix == "per_source" and batch_size is None:
            raise ValueError("mix='per_source' makes every batch from one source: it needs "
                             "batch_size")
        if label_space not in LABEL_SPACES:
            raise ValueError(f"label_space must be one of {LABEL_SPACES}, got {label_space!r}")
        return cls(tuple(items), mixture, epoch_size, mix, label_space)

    @property
    def plain(self) -> bool:
        """One dataset read whole each epoch (nothing for a state to record)."""
        return not self.mixture and self.epoch_size is None
