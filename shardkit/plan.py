"""The epoch plan: who reads what, as a pure function of numbers.

Given the shard sizes of a manifest and ``(seed, epoch, rank, world_size, worker, num_workers)``,
:func:`epoch_plan` says which samples one DataLoader worker of one rank reads (its *input stream*, a
list of :class:`Span`) and in which order it emits them (a permutation of that stream, as a
streaming shuffle buffer would produce it). No I/O, no torch: numpy only, so it can be checked over
grids of shards x ranks x workers x epochs without starting a process.

How the plan is built:

1. Every shard is cut into blocks of ``block_size`` samples (a shard's last block may be shorter).
   With ``shuffle`` the block list is permuted by a keyed pseudo-random permutation seeded from
   ``(seed, epoch)``; the concatenation of the blocks is the epoch's *global stream* of ``N``
   samples. The permutation is stateless (see :class:`_BlockPermutation`): a worker evaluates it
   only at the stream positions it reads, plus its inverse at the shards' short last blocks to
   know where each position starts, so a plan costs O(shards + own blocks), not O(all blocks).
2. Each rank gets ``per_rank`` samples (see :func:`rank_num_samples`): ``remainder="drop"`` leaves
   out the last ``N % world_size`` samples of the stream (different ones each epoch, as the block
   order changes); ``remainder="pad"`` wraps around to the stream's start, repeating its first
   samples. ``drop_last`` with a ``batch_size`` further rounds ``per_rank`` down to whole batches.
3. Rank ``r`` reads the contiguous range ``[r * per_rank, (r + 1) * per_rank)`` of the stream.
4. The rank's range is split contiguously among workers: sample-wise without ``batch_size``, in
   whole batches with it. The rank's only partial batch (if any) is its last one and belongs to
   worker ``min(num_batches, num_workers) - 1``, which then has it as its own last batch.
5. A worker shuffles its input with :func:`shuffle_order`, seeded from the full tuple.

Every sample is read exactly once per epoch over all ranks and workers (up to the remainder policy),
every rank reads the same number of samples and batches, and none of it needs more shards than
ranks x workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

__all__ = [
    "Span",
    "WorkerPlan",
    "epoch_plan",
    "rank_num_batches",
    "rank_num_samples",
    "resume_position",
    "shuffle_order",
]

REMAINDER_POLICIES = ("drop", "pad")
_BLOCK_STREAM = 0  # SeedSequence tags keep the two generators of a plan independent.
_WORKER_STREAM = 1
_FEISTEL_ROUNDS = 8
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)  # splitmix64's finaliser constants
_MIX2 = np.uint64(0x94D049BB133111EB)


@dataclass(frozen=True)
class Span:
    """Samples ``[start, stop)`` of shard number ``shard`` (indices inside that shard)."""

    shard: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class WorkerPlan:
    """What one worker of one rank does in one epoch.

    ``spans`` is the worker's input stream in read order; ``order`` is the emission order as indices
    into that stream (an int64 permutation of ``range(num_samples)``); ``batch_sizes`` lists the
    sizes of the batches the worker yields when a ``batch_size`` was given, else it is empty.
    """

    spans: tuple[Span, ...]
    num_samples: int
    order: np.ndarray
    batch_sizes: tuple[int, ...]


def _check_int(name: str, value: object, low: int, high: Optional[int] = None) -> int:
    """Return ``value`` as an int, or raise ValueError naming ``name`` and the allowed range."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value >= high):
        allowed = f"[{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be in {allowed}, got {value}")
    return value


def _check_sizes(shard_sizes: Sequence[int]) -> np.ndarray:
    sizes = np.asarray(shard_sizes, dtype=np.int64).reshape(-1)
    if sizes.size and sizes.min() < 0:
        raise ValueError("shard_sizes must be non-negative")
    if int(sizes.sum()) == 0:
        raise ValueError("shard_sizes must hold at least one sample (total is 0)")
    return sizes


def _per_rank(total: int, world_size: int, remainder: str, batch_size: Optional[int],
              drop_last: bool) -> int:
    """Samples per rank for ``total`` samples; arguments must already be checked."""
    if remainder not in REMAINDER_POLICIES:
        raise ValueError(f"remainder must be one of {REMAINDER_POLICIES}, got {remainder!r}")
    per_rank = total // world_size if remainder == "drop" else -(-total // world_size)
    if batch_size is not None and drop_last:
        per_rank -= per_rank % batch_size
    return per_rank


def rank_num_samples(shard_sizes: Sequence[int], world_size: int, *, remainder: str = "drop",
                     batch_size: Optional[int] = None, drop_last: bool = False) -> int:
    """Number of samples every rank reads per epoch (the same on all ranks)."""
    sizes = _check_sizes(shard_sizes)
    world_size = _check_int("world_size", world_size, 1)
    if batch_size is not None:
        batch_size = _check_int("batch_size", batch_size, 1)
    return _per_rank(int(sizes.sum()), world_size, remainder, batch_size, drop_last)


def rank_num_batches(shard_sizes: Sequence[int], world_size: int, *, remainder: str = "drop",
                     batch_size: Optional[int] = None, drop_last: bool = False) -> int:
    """Batches every rank yields per epoch: ceil (floor with ``drop_last``) of samples / batch."""
    if batch_size is None:
        raise ValueError("batch_size must be an integer >= 1 to count batches, got None")
    n = rank_num_samples(shard_sizes, world_size, remainder=remainder, batch_size=batch_size,
                         drop_last=drop_last)
    return n // batch_size if drop_last else -(-n // batch_size)


def shuffle_order(n: int, buffer_size: int, rng: np.random.Generator) -> np.ndarray:
    """Emission order of a streaming shuffle buffer fed inputs ``0 .. n-1``.

    Each input is appended to the buffer; once it holds ``buffer_size`` items, a uniformly random
    one is removed (swap with the last) and emitted. At the end the rest is emitted in random
    order. The ``k``-th emitted index is always ``< k + buffer_size``, so a reader never holds more
    than ``buffer_size`` samples. ``buffer_size=1`` gives the identity.
    """
    n = _check_int("n", n, 0)
    buffer_size = _check_int("buffer_size", buffer_size, 1)
    fill = min(n, buffer_size - 1)
    buf = list(range(fill))
    out: list[int] = []
    emit = out.append
    last = buffer_size - 1
    draws = rng.integers(0, buffer_size, size=max(0, n - fill)).tolist()
    for i, j in zip(range(fill, n), draws):
        # The buffer is full with i appended at slot `last`; remove slot j, swapping in the last.
        if j == last:
            emit(i)
        else:
            emit(buf[j])
            buf[j] = i
    order = np.empty(n, dtype=np.int64)
    order[: len(out)] = out
    order[len(out):] = rng.permutation(np.asarray(buf, dtype=np.int64))
    return order


def resume_position(order: np.ndarray, consumed: int) -> int:
    """First input-stream index a reader must read from to emit ``order[consumed:]``.

    That is ``min(order[consumed:])``, or ``len(order)`` when nothing is left. Inputs from there on
    that are in ``order[:consumed]`` were already emitted and must be skipped.
    """
    order = np.asarray(order)
    consumed = _check_int("consumed", consumed, 0)
    rest = order[consumed:]
    return int(rest.min()) if rest.size else int(order.size)


def _worker_range(per_rank: int, worker: int, num_workers: int,
                  batch_size: Optional[int]) -> tuple[int, int, tuple[int, ...]]:
    """Start and stop (inside the rank's range) of one worker's samples, and its batch sizes."""
    if batch_size is None:
        q, m = divmod(per_rank, num_workers)
        start = worker * q + min(worker, m)
        return start, start + q + (worker < m), ()
    num_batches = -(-per_rank // batch_size)
    q, m = divmod(num_batches, num_workers)
    first = worker * q + min(worker, m)
    count = q + (worker < m)
    start = min(first * batch_size, per_rank)
    stop = min((first + count) * batch_size, per_rank)
    sizes = [batch_size] * count
    if count and stop - start != count * batch_size:  # this worker holds the rank's partial batch
        sizes[-1] = stop - start - (count - 1) * batch_size
    return start, stop, tuple(sizes)


class _BlockPermutation:
    """A seeded bijection of ``[0, n)`` (stream position -> block number), evaluated on demand.

    A balanced Feistel network on ``2 * half`` bits (the smallest even width covering ``n``) with
    ``_FEISTEL_ROUNDS`` rounds, whose round function is splitmix64's finaliser of ``value ^ key``
    (keys drawn from ``SeedSequence([seed, epoch, _BLOCK_STREAM])``). Values that land outside
    ``[0, n)`` are walked through the network again (cycle walking), which keeps it a bijection of
    ``[0, n)``; as the domain is at most ``4 n``, a walk takes under 4 steps on average. Nothing of
    size ``n`` is ever materialised.
    """

    def __init__(self, n: int, seed: int, epoch: int):
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half = np.uint64((bits + 1) // 2)
        self.mask = np.uint64((1 << int(self.half)) - 1)
        self.keys = np.random.SeedSequence([seed, epoch, _BLOCK_STREAM]).generate_state(
            _FEISTEL_ROUNDS, dtype=np.uint64)

    def _f(self, value: np.ndarray, key: np.uint64) -> np.ndarray:
        z = value ^ key
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return (z ^ (z >> np.uint64(31))) & self.mask

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ self._f(right, key)
        return (left << self.half) | right

    def _decrypt(self, y: np.ndarray) -> np.ndarray:
        left, right = y >> self.half, y & self.mask
        for key in self.keys[::-1]:
            left, right = right ^ self._f(left, key), left
        return (left << self.half) | right

    def _walk(self, values, step) -> np.ndarray:
        x = step(np.asarray(values, dtype=np.uint64).reshape(-1))
        n = np.uint64(self.n)
        out = np.flatnonzero(x >= n)
        while out.size:
            x[out] = step(x[out])
            out = out[x[out] >= n]
        return x.astype(np.int64)

    def block(self, position) -> np.ndarray:
        """Block numbers at stream positions ``position`` (int64 array, each in ``[0, n)``)."""
        return self._walk(position, self._encrypt)

    def position(self, block) -> np.ndarray:
        """Stream positions of blocks ``block`` (the inverse of :meth:`block`)."""
        return self._walk(block, self._decrypt)


def _merge(shards: list, starts: list, stops: list) -> tuple[Span, ...]:
    """Spans from per-piece arrays, each merged into its predecessor where it continues it."""
    shard, start, stop = (np.concatenate(a).astype(np.int64) for a in (shards, starts, stops))
    if shard.size:
        new = np.ones(shard.size, dtype=bool)
        new[1:] = (shard[1:] != shard[:-1]) | (start[1:] != stop[:-1])
        heads = np.flatnonzero(new)
        tails = np.append(heads[1:], shard.size) - 1
        shard, start, stop = shard[heads], start[heads], stop[tails]
    return tuple(Span(int(a), int(b), int(c)) for a, b, c in zip(shard.tolist(), start.tolist(),
                                                                   stop.tolist()))


def _natural_spans(sizes: np.ndarray, pieces: list[tuple[int, int]]) -> tuple[Span, ...]:
    """Spans of the stream ranges ``pieces`` when shards are read in their natural order."""
    shard_start = np.concatenate(([0], np.cumsum(sizes)))
    shards, starts, stops = [], [], []
    for lo, hi in pieces:
        s0 = int(np.searchsorted(shard_start, lo, "right")) - 1
        s1 = int(np.searchsorted(shard_start, hi, "left"))
        shard = np.arange(s0, s1)[sizes[s0:s1] > 0]
        begin, end = shard_start[shard], shard_start[shard + 1]
        shards.append(shard)
        starts.append(np.maximum(begin, lo) - begin)
        stops.append(np.minimum(end, hi) - begin)
    return _merge(shards, starts, stops)


def _shuffled_spans(sizes: np.ndarray, block_size: int, perm_seed: tuple[int, int],
                    pieces: list[tuple[int, int]]) -> tuple[Span, ...]:
    """Spans of the stream ranges ``pieces`` when blocks are read in permuted order.

    Every block holds ``block_size`` samples except the short last block of a shard whose size is
    not a multiple of it. So the stream start of position ``k`` is ``k * block_size`` less the
    deficits of the short blocks placed before ``k``: the inverse permutation of the (at most one
    per shard) short blocks, sorted, with a cumulative sum of their deficits, answers "where does
    position ``k`` start" and "which position holds stream sample ``x``" by binary search.
    """
    B = block_size
    blocks_per_shard = -(-sizes // B)
    first_block = np.concatenate(([0], np.cumsum(blocks_per_shard)))
    perm = _BlockPermutation(int(first_block[-1]), *perm_seed)
    rem = sizes % B
    short = np.flatnonzero(rem)  # shards whose last block is short (never an empty shard)
    pos = perm.position(first_block[short + 1] - 1)
    by_pos = np.argsort(pos)
    short_pos = pos[by_pos]  # stream positions of the short blocks, ascending
    deficit = np.zeros(short.size + 1, dtype=np.int64)  # deficit[j]: of the first j short blocks
    np.cumsum(B - rem[short][by_pos], out=deficit[1:])
    short_end = (short_pos + 1) * B - deficit[1:]  # stream end of each short block

    def start_of(k: np.ndarray) -> np.ndarray:  # stream start of positions k
        return k * B - deficit[np.searchsorted(short_pos, k, "left")]

    def position_of(x: int) -> int:  # the position whose block holds stream sample x
        return (x + int(deficit[np.searchsorted(short_end, x, "right")])) // B

    shards, starts, stops = [], [], []
    for lo, hi in pieces:
        k = np.arange(position_of(lo), position_of(hi - 1) + 1, dtype=np.int64)
        blk = perm.block(k)
        shard = np.searchsorted(first_block, blk, "right") - 1
        begin, end = start_of(k), start_of(k + 1)  # the blocks' stream positions
        offset = (blk - first_block[shard]) * B  # where each block starts inside its shard
        shards.append(shard)
        starts.append(np.maximum(begin, lo) - begin + offset)
        stops.append(np.minimum(end, hi) - begin + offset)
    return _merge(shards, starts, stops)


def epoch_plan(shard_sizes: Sequence[int], *, seed: int, epoch: int, rank: int, world_size: int,
               worker: int, num_workers: int, shuffle: bool = True, block_size: int = 64,
               shuffle_buffer: int = 1000, remainder: str = "drop",
               batch_size: Optional[int] = None, drop_last: bool = False) -> WorkerPlan:
    """Plan of worker ``worker`` of rank ``rank`` for ``epoch`` (see the module docstring)."""
    sizes = _check_sizes(shard_sizes)
    seed = _check_int("seed", seed, 0)
    epoch = _check_int("epoch", epoch, 0)
    world_size = _check_int("world_size", world_size, 1)
    rank = _check_int("rank", rank, 0, world_size)
    num_workers = _check_int("num_workers", num_workers, 1)
    worker = _check_int("worker", worker, 0, num_workers)
    block_size = _check_int("block_size", block_size, 1)
    shuffle_buffer = _check_int("shuffle_buffer", shuffle_buffer, 1)
    if batch_size is not None:
        batch_size = _check_int("batch_size", batch_size, 1)
    total = int(sizes.sum())
    per_rank = _per_rank(total, world_size, remainder, batch_size, drop_last)

    lo, hi, batch_sizes = _worker_range(per_rank, worker, num_workers, batch_size)
    lo, hi = lo + rank * per_rank, hi + rank * per_rank
    pieces = []  # the worker's range split at every wrap-around of the stream ("pad")
    while lo < hi:
        lap = lo // total
        pieces.append((lo - lap * total, min(hi, (lap + 1) * total) - lap * total))
        lo = min(hi, (lap + 1) * total)

    if not pieces:
        spans: tuple[Span, ...] = ()
    elif shuffle:
        spans = _shuffled_spans(sizes, block_size, (seed, epoch), pieces)
    else:
        spans = _natural_spans(sizes, pieces)
    num_samples = sum(len(s) for s in spans)

    if shuffle:
        worker_rng = np.random.default_rng(np.random.SeedSequence(
            [seed, epoch, _WORKER_STREAM, rank, world_size, worker, num_workers]))
        order = shuffle_order(num_samples, shuffle_buffer, worker_rng)
    else:
        order = np.arange(num_samples, dtype=np.int64)
    order.flags.writeable = False  # the plan is a value: frozen dataclass, read-only order
    return WorkerPlan(spans=spans, num_samples=num_samples, order=order, batch_sizes=batch_sizes)
