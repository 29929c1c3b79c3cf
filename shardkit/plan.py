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
5. A worker shuffles its input with :func:`shuffle_order`, seeded from the full tuple; its buffer
   starts emitting at a tenth of its size and grows to it (``shuffle_start``).

Every sample is read exactly once per epoch over all ranks and workers (up to the remainder policy),
every rank reads the same number of samples and batches, and none of it needs more shards than
ranks x workers.

A mixture of datasets, or an ``epoch_size``, changes only step 1: the global stream is then the
epoch's :class:`~shardkit.layout.Layout` (each source's share of the epoch, as segments of its
shards, in blocks), given to these functions in place of the shard sizes. An *interleaved*
layout (``mix="stratified"`` / ``"per_source"``) has a worker read its samples in chunks of
each source rather than in stream order; its emission order (:func:`_interleaved_order`) fills
each batch with each source's share of it from one shuffle buffer per source. ``"per_source"``
deals the stream in whole batches (the layout's ``unit``), so each batch is one source's.

Elastic resume (another world size or number of workers in the middle of an epoch) is built on the
same pieces. A *stream* is a sorted list of disjoint ranges of the epoch's global stream
(:func:`rest_stream` returns one; the whole epoch is ``[(0, N)]``). Given how many samples each
(rank, worker) of a plan had emitted, the samples it has not emitted are known exactly: worker
``(r, w)`` read the stream positions ``lo + p`` (``lo`` its range's start, modulo the stream's
length for ``"pad"``) and emitted ``order[:c]``, so its remaining positions are those from
:func:`resume_position` on, less the at most ``shuffle_buffer`` emitted ones above it. The union
over workers, less every emitted sample (which removes ``"pad"``'s repeats too), is the *rest
stream*, in global stream order. :func:`rest_plan` deals it to the new ranks and workers exactly as
steps 2-5 deal the global stream (the remainder policy applies to the rest's count), with its own
worker shuffle (seeded from ``seed, epoch``, a resume tag and the level of the resume). Only the
emitted prefix of each old worker's shuffle is simulated, so finding the rest costs O(samples
emitted) once, and a new worker's spans O(own blocks + holes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

from .layout import Layout, Span, _merge

Sizes = Union[Sequence[int], np.ndarray]  # samples per shard: a list or an array
Stream = Union[Sizes, Layout]  # an epoch's stream: one dataset's shard sizes, or its layout

__all__ = [
    "Span",
    "check_settings",
    "WorkerPlan",
    "epoch_plan",
    "rank_num_batches",
    "rank_num_samples",
    "remaining_spans",
    "rest_plan",
    "rest_stream",
    "resume_position",
    "shuffle_order",
    "shuffle_start_of",
]

REMAINDER_POLICIES = ("drop", "pad")
# Default block sizes (StreamingDataset(block_size=None) picks one from the manifest): large reads
# for samples shuffled at pack time; small blocks where shards may hold runs of one class, so that
# a batch mixes many blocks (each block is one read: 8 samples of ~110 KB JPEGs is ~1 MB).
BLOCK_SIZE = 64
SMALL_BLOCK_SIZE = 8
# SeedSequence tags keep the generators of a plan independent (layout.py: 0 blocks, 3 passes).
_WORKER_STREAM = 1
_RESUME_STREAM = 2
_SHUFFLE_PIECE = 1 << 16  # samples of a worker's shuffle simulated at a time


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
        allowed = f"in [{low}, {high})" if high is not None else f"an integer >= {low}"
        raise ValueError(f"{name} must be {allowed}, got {value}")
    return value


def check_settings(*, seed: int, block_size: Optional[int], shuffle_buffer: int, remainder: str,
                   batch_size: Optional[int]) -> tuple[int, Optional[int], int, Optional[int]]:
    """The plan settings checked, ``(seed, block_size, shuffle_buffer, batch_size)`` as ints: the
    one home of their rules, for the plan functions and for a dataset's
    :class:`~shardkit.config.PlanConfig` (``block_size`` None: left to the caller)."""
    seed = _check_int("seed", seed, 0)
    if block_size is not None:
        block_size = _check_int("block_size", block_size, 1)
    shuffle_buffer = _check_int("shuffle_buffer", shuffle_buffer, 1)
    if remainder not in REMAINDER_POLICIES:
        raise ValueError(f"remainder must be one of {REMAINDER_POLICIES}, got {remainder!r}")
    if batch_size is not None:
        batch_size = _check_int("batch_size", batch_size, 1)
    return seed, block_size, shuffle_buffer, batch_size


def _layout(stream: Stream, seed: int, epoch: int) -> Layout:
    """``stream`` as a :class:`~shardkit.layout.Layout` of ``(seed, epoch)``: shard sizes are one
    dataset read whole."""
    if isinstance(stream, Layout):
        if (stream.seed, stream.epoch) != (seed, epoch):
            raise ValueError(f"the layout is of seed {stream.seed}, epoch {stream.epoch}; the plan "
                             f"asks for seed {seed}, epoch {epoch}")
        return stream
    return Layout.whole(_check_sizes(stream), seed, epoch)


def _check_sizes(shard_sizes: Sizes) -> np.ndarray:
    sizes = np.asarray(shard_sizes, dtype=np.int64).reshape(-1)
    if sizes.size and sizes.min() < 0:
        raise ValueError("shard_sizes must be non-negative")
    if int(sizes.sum()) == 0:
        raise ValueError("shard_sizes must hold at least one sample (total is 0)")
    return sizes


def _per_rank(total: int, world_size: int, remainder: str, batch_size: Optional[int],
              drop_last: bool, unit: int = 1) -> int:
    """Samples per rank for ``total`` samples, dealt in whole ``unit``s (a stream of whole
    batches: ``mix="per_source"``); arguments must already be checked."""
    if remainder not in REMAINDER_POLICIES:
        raise ValueError(f"remainder must be one of {REMAINDER_POLICIES}, got {remainder!r}")
    units = total // unit
    per_rank = unit * (units // world_size if remainder == "drop" else -(-units // world_size))
    if batch_size is not None and drop_last:
        per_rank -= per_rank % batch_size
    return per_rank


def rank_num_samples(shard_sizes: Stream, world_size: int, *, remainder: str = "drop",
                     batch_size: Optional[int] = None, drop_last: bool = False) -> int:
    """Number of samples every rank reads per epoch (the same on all ranks)."""
    if isinstance(shard_sizes, Layout):
        total, unit = shard_sizes.total, shard_sizes.unit
    else:
        total, unit = int(_check_sizes(shard_sizes).sum()), 1
    world_size = _check_int("world_size", world_size, 1)
    if batch_size is not None:
        batch_size = _check_int("batch_size", batch_size, 1)
    return _per_rank(total, world_size, remainder, batch_size, drop_last, unit)


def rank_num_batches(shard_sizes: Stream, world_size: int, *, remainder: str = "drop",
                     batch_size: Optional[int] = None, drop_last: bool = False) -> int:
    """Batches every rank yields per epoch: ceil (floor with ``drop_last``) of samples / batch."""
    if batch_size is None:
        raise ValueError("batch_size must be an integer >= 1 to count batches, got None")
    n = rank_num_samples(shard_sizes, world_size, remainder=remainder, batch_size=batch_size,
                         drop_last=drop_last)
    return n // batch_size if drop_last else -(-n // batch_size)


SHUFFLE_START = 10  # a shuffle buffer starts emitting at 1/SHUFFLE_START of its size (see below)


def shuffle_start_of(buffer_size: int, start: Optional[int] = None) -> int:
    """How many inputs a shuffle buffer of ``buffer_size`` holds when it emits its first sample:
    ``start`` checked (1 .. ``buffer_size``), or by default a tenth of the buffer (webdataset's
    ``shuffle(1000, initial=100)``)."""
    buffer_size = _check_int("buffer_size", buffer_size, 1)
    if start is None:
        return -(-buffer_size // SHUFFLE_START)
    return _check_int("shuffle_start", start, 1, buffer_size + 1)


def shuffle_order(n: int, buffer_size: int, rng: np.random.Generator, *,
                  count: Optional[int] = None, start: Optional[int] = None) -> np.ndarray:
    """Emission order of a streaming shuffle buffer fed inputs ``0 .. n-1``.

    The buffer emits its first sample once it holds ``start`` inputs (:func:`shuffle_start_of`; its
    size: the whole buffer fills first) and then grows by one per emission, reading two inputs for
    each sample it emits, until it holds ``buffer_size`` (as webdataset's ``shuffle(bufsize,
    initial)``). From then on each input is appended and a uniformly random sample is removed
    (swap with the last) and emitted. At the end the rest is emitted in random order. The ``k``-th
    emitted index is always ``< k + buffer_size``, so a reader never holds more than
    ``buffer_size`` samples. ``buffer_size=1`` gives the identity. With ``count``, only the
    first ``count`` emitted indices are returned (the same as ``shuffle_order(...)[:count]``, at a
    cost of O(count) instead of O(n)).

    Why it grows: a full buffer has to be read before anything is emitted, which leaves the
    decoder idle while it fills: a worker whose epoch share is near the buffer's size then reads
    everything before decoding anything (on a slow disk the reads and the decoding add up
    instead of overlapping), and every epoch's first batch waits for ``workers × buffer_size``
    reads. The price: a worker's first emissions come from fewer inputs (the ``k``-th of the
    first ``buffer_size - start - 1`` from ``start + k + 1``).
    """
    n = _check_int("n", n, 0)
    buffer_size = _check_int("buffer_size", buffer_size, 1)
    start = buffer_size if start is None else _check_int("start", start, 1, buffer_size + 1)
    count = n if count is None else min(n, _check_int("count", count, 0))
    order = np.empty(count, dtype=np.int64)
    done = 0
    # Growing: before step t the buffer holds start - 1 + t inputs; it takes two (while below the
    # buffer's size) and emits one from start + t + 1.
    steps = max(0, min(buffer_size - start - 1, (n - start) // 2, count))
    buf = list(range(min(n, start - 1 + 2 * steps)))
    if steps:
        grown: list[int] = []
        sizes = np.arange(start + 1, start + 1 + steps)
        pool = list(range(start - 1))
        for t, j in enumerate(rng.integers(0, sizes).tolist()):
            pool.append(start - 1 + 2 * t)
            pool.append(start + 2 * t)
            grown.append(pool[j])
            pool[j] = pool[-1]
            pool.pop()
        order[:steps] = grown
        done = steps
        buf = pool
    fill = len(buf) + done  # inputs read so far
    if len(buf) < buffer_size - 1 and fill < n:  # not grown full: a short stream's rest
        buf.extend(range(fill, min(n, fill + buffer_size - 1 - len(buf))))
        fill = len(buf) + done
    last = buffer_size - 1
    draws = rng.integers(0, buffer_size, size=max(0, n - fill))
    stop = min(n, fill + count - done)  # every step of the loop emits one index
    # in pieces, so that the Python ints of a large worker's order never exist all at once
    for lo in range(fill, stop, _SHUFFLE_PIECE):
        hi = min(stop, lo + _SHUFFLE_PIECE)
        out: list[int] = []
        emit = out.append
        for i, j in zip(range(lo, hi), draws[lo - fill:hi - fill].tolist()):
            # The buffer is full with i appended at slot `last`; remove slot j, swapping in the last.
            if j == last:
                emit(i)
            else:
                emit(buf[j])
                buf[j] = i
        order[done:done + len(out)] = out
        done += len(out)
    if done < count:
        rest = rng.permutation(np.asarray(buf, dtype=np.int64))
        order[done:] = rest[:count - done]
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


def _deal(total: int, per_rank: int, rank: int, worker: int, num_workers: int,
          batch_size: Optional[int]) -> tuple[int, list[tuple[int, int]], tuple[int, ...]]:
    """One worker's share of a stream of ``total`` samples, ``per_rank`` per rank.

    Returns the share's start (a position of the stream repeated for ever, so ``"pad"``'s
    wrap-around is past ``total``), the share as ranges of ``[0, total)`` split at every
    wrap-around, in read order, and the worker's batch sizes. Input position ``p`` of the worker
    is stream position ``(start + p) % total``.
    """
    lo, hi, batch_sizes = _worker_range(per_rank, worker, num_workers, batch_size)
    lo, hi = lo + rank * per_rank, hi + rank * per_rank
    start, pieces = lo, []
    while lo < hi:
        lap = lo // total
        pieces.append((lo - lap * total, min(hi, (lap + 1) * total) - lap * total))
        lo = min(hi, (lap + 1) * total)
    return start, pieces, batch_sizes


def _worker_order(n: int, shuffle: bool, shuffle_buffer: int, key: list,
                  count: Optional[int] = None, start: Optional[int] = None) -> np.ndarray:
    """A worker's emission order (its first ``count`` entries), seeded from ``key``; its shuffle
    buffer emits from ``start`` inputs on (None: full)."""
    if not shuffle:
        return np.arange(n if count is None else min(n, count), dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence(key))
    return shuffle_order(n, shuffle_buffer, rng, count=count, start=start)


def _batch_strands(counts: np.ndarray, batch_sizes: Sequence[int],
                   shares: Optional[Sequence[int]] = None) -> np.ndarray:
    """The strand of each emitted sample of a worker whose share holds ``counts[s]`` samples of
    strand ``s``, cut into batches of ``batch_sizes``: every batch holds each strand's share of it
    rounded down or up (the extras go to the strands furthest behind their share), the last one
    whatever is left (``shares``: the strands' shares of the epoch, when the batches should hold
    those proportions rather than the worker's); inside a batch the strands alternate smoothly."""
    weights = np.asarray(counts if shares is None else shares, dtype=np.float64)
    share = weights / weights.sum()
    left = counts.astype(np.int64).copy()
    debt = np.zeros(counts.size)
    out = []
    for k, size in enumerate(batch_sizes):
        if k == len(batch_sizes) - 1:
            take = left.copy()
        else:
            want = size * share
            take = np.minimum(np.floor(want).astype(np.int64), left)
            extra = size - int(take.sum())
            room = (take < np.ceil(want)) & (take < left)
            behind = debt + want - take  # how far each strand would be behind without an extra
            for s in sorted(np.flatnonzero(room).tolist(), key=lambda s: (-behind[s], s)):
                if extra <= 0:
                    break
                take[s] += 1
                extra -= 1
            for s in np.argsort(-(left - take), kind="stable").tolist():  # (only if short)
                if extra <= 0:
                    break
                more = min(extra, int(left[s] - take[s]))
                take[s] += more
                extra -= more
            debt += want - take
        left -= take
        keys = np.concatenate([(np.arange(c) + 0.5) / c for c in take.tolist() if c])
        strand = np.repeat(np.flatnonzero(take), take[take > 0])
        out.append(strand[np.argsort(keys, kind="stable")])
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def _interleaved_order(glob: np.ndarray, strand: np.ndarray, shuffle: bool, shuffle_buffer: int,
                       key: list, batch_sizes: Sequence[int] = (),
                       shares: Optional[Sequence[int]] = None, unit: int = 1,
                       start: Optional[int] = None) -> np.ndarray:
    """The emission order of a worker of an interleaved stream (one that reads its samples in
    chunks, not in stream order): input sample ``i`` is the worker's ``glob[i]``-th in stream
    order, of strand ``strand[i]``. Which strand the ``t``-th emitted sample is of: with
    ``batch_sizes`` each batch holds the strands in proportion (:func:`_batch_strands`), else
    the strand of the worker's ``t``-th sample in stream order. Each strand's samples come from a
    shuffle buffer of its own (its share of ``shuffle_buffer`` and of ``start``, seeded from
    ``key`` and the strand), so the samples of every strand are held about as long.

    A stream of whole units (``unit`` > 1: ``mix="per_source"``, one batch per unit) is shuffled
    within each unit only: a buffer running on across a strand's units would hold everything read
    up to that strand's next unit, which for a small share is many batches ahead.
    """
    n = glob.size
    if unit > 1:
        of_offset = np.empty(n, dtype=np.int64)  # the input index of each stream offset
        of_offset[glob] = np.arange(n, dtype=np.int64)
        offsets = np.arange(n, dtype=np.int64)
        if shuffle:
            rng = np.random.default_rng(np.random.SeedSequence(key))
            offsets = offsets[np.lexsort((rng.random(n), offsets // unit))]
        return of_offset[offsets]
    if batch_sizes:
        counts = np.bincount(strand, minlength=0 if shares is None else len(shares))
        slots_of = _batch_strands(counts, batch_sizes, shares)
    else:
        slots_of = np.empty(n, dtype=np.int64)
        slots_of[glob] = strand
    order = np.empty(n, dtype=np.int64)
    for s in np.unique(strand).tolist():
        inputs = np.flatnonzero(strand == s)  # its inputs in read (= its stream) order
        slots = np.flatnonzero(slots_of == s)
        if shuffle:
            buffer = max(1, round(shuffle_buffer * inputs.size / n))
            first = None if start is None else min(buffer, max(1, round(start * inputs.size / n)))
            rng = np.random.default_rng(np.random.SeedSequence([*key, s]))
            order[slots] = inputs[shuffle_order(inputs.size, buffer, rng, start=first)]
        else:
            order[slots] = inputs
    return order


def epoch_plan(shard_sizes: Stream, *, seed: int, epoch: int, rank: int, world_size: int,
               worker: int, num_workers: int, shuffle: bool = True, block_size: int = 64,
               shuffle_buffer: int = 1000, remainder: str = "drop",
               batch_size: Optional[int] = None, drop_last: bool = False,
               shuffle_start: Optional[int] = None) -> WorkerPlan:
    """Plan of worker ``worker`` of rank ``rank`` for ``epoch`` (see the module docstring).
    ``shard_sizes``: one dataset's samples per shard, or the epoch's
    :class:`~shardkit.layout.Layout` (a mixture, an epoch size). ``shuffle_start``: see
    :func:`shuffle_start_of` (None: its default)."""
    seed, block, shuffle_buffer, batch_size = check_settings(
        seed=seed, block_size=block_size, shuffle_buffer=shuffle_buffer, remainder=remainder,
        batch_size=batch_size)
    start = shuffle_start_of(shuffle_buffer, shuffle_start)
    block_size = _check_int("block_size", block, 1)  # None is not a block size here
    epoch = _check_int("epoch", epoch, 0)
    world_size = _check_int("world_size", world_size, 1)
    rank = _check_int("rank", rank, 0, world_size)
    num_workers = _check_int("num_workers", num_workers, 1)
    worker = _check_int("worker", worker, 0, num_workers)
    layout = _layout(shard_sizes, seed, epoch)
    total = layout.total
    per_rank = _per_rank(total, world_size, remainder, batch_size, drop_last, layout.unit)

    _, pieces, batch_sizes = _deal(total, per_rank, rank, worker, num_workers, batch_size)
    return _worker_plan(layout, pieces, batch_sizes, shuffle, block_size, shuffle_buffer,
                        _worker_key(seed, epoch, 0, rank, world_size, worker, num_workers),
                        start=start)


def _worker_plan(layout: Layout, ranges, batch_sizes, shuffle: bool, block_size: int,
                 shuffle_buffer: int, key: list[int], count: Optional[int] = None,
                 start: Optional[int] = None) -> WorkerPlan:
    """The plan of a worker that reads positions ``ranges`` of the epoch's global stream
    (``count``: only the first ``count`` entries of its order)."""
    spans, glob, strand = layout.worker_input(ranges, shuffle=shuffle, block_size=block_size)
    num_samples = sum(len(s) for s in spans)
    if glob is None or strand is None:
        order = _worker_order(num_samples, shuffle, shuffle_buffer, key, count, start)
    else:
        order = _interleaved_order(glob, strand, shuffle, shuffle_buffer, key,
                                   batch_sizes if layout.unit == 1 else (),
                                   layout.shares, layout.unit, start)[:count]
    order.flags.writeable = False  # the plan is a value: frozen dataclass, read-only order
    return WorkerPlan(spans=spans, num_samples=num_samples, order=order, batch_sizes=batch_sizes)


# --------------------------------------------------------------------------- elastic resume
# Ranges are int64 arrays of shape (k, 2), rows [start, stop); "normalized" means sorted, disjoint,
# non-empty and not touching (adjacent rows are merged).


def _ranges(value) -> np.ndarray:
    return np.asarray(value, dtype=np.int64).reshape(-1, 2)


def _normalize(r: np.ndarray) -> np.ndarray:
    r = r[r[:, 1] > r[:, 0]]
    if not r.size:
        return r.reshape(0, 2)
    r = r[np.argsort(r[:, 0], kind="stable")]
    ends = np.maximum.accumulate(r[:, 1])
    new = np.ones(len(r), dtype=bool)
    new[1:] = r[1:, 0] > ends[:-1]
    heads = np.flatnonzero(new)
    tails = np.append(heads[1:], len(r)) - 1
    return np.stack([r[heads, 0], ends[tails]], axis=1)


def _covers(r: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Which of the points ``x`` lie in the normalized ranges ``r``."""
    i = np.searchsorted(r[:, 0], x, "right") - 1
    out = np.zeros(x.shape, dtype=bool)
    ok = i >= 0
    out[ok] = x[ok] < r[i[ok], 1]
    return out


def _subtract(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Normalized ranges ``a`` less normalized ranges ``b``."""
    if not a.size or not b.size:
        return a
    points = np.unique(np.concatenate((a.ravel(), b.ravel())))
    lo, hi = points[:-1], points[1:]
    keep = _covers(a, lo) & ~_covers(b, lo)
    return _normalize(np.stack([lo[keep], hi[keep]], axis=1))


def _wrap(r: np.ndarray, total: int) -> np.ndarray:
    """Ranges of positions of a stream repeated for ever, as ranges of ``[0, total)``."""
    if not r.size:
        return r.reshape(0, 2)
    lap_lo, lap_hi = r[:, 0] // total, (r[:, 1] - 1) // total
    same = lap_lo == lap_hi
    out = [r[same] - (lap_lo[same] * total)[:, None]]
    for a, b in r[~same].tolist():
        while a < b:
            lap = a // total
            end = min(b, (lap + 1) * total)
            out.append(np.array([[a - lap * total, end - lap * total]], dtype=np.int64))
            a = end
    return np.concatenate(out)


def _cut(cum: np.ndarray, sub: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalized ranges ``sub`` of a concatenation of pieces (piece ``i`` starts at ``cum[i]``)
    cut at the pieces' boundaries: (piece, start, stop), starts and stops inside the piece."""
    inner = cum[(cum > sub[0, 0]) & (cum < sub[-1, 1])]
    points = np.unique(np.concatenate((sub.ravel(), inner)))
    lo, hi = points[:-1], points[1:]
    keep = _covers(sub, lo)
    lo, hi = lo[keep], hi[keep]
    piece = np.searchsorted(cum, lo, "right") - 1
    return piece, lo - cum[piece], hi - cum[piece]


def _compose(stream: np.ndarray, sub: np.ndarray) -> np.ndarray:
    """The epoch-stream ranges of ``sub``: normalized ranges of the positions of ``stream``."""
    if not sub.size:
        return sub.reshape(0, 2)
    cum = np.concatenate(([0], np.cumsum(stream[:, 1] - stream[:, 0])))
    if sub[-1, 1] > cum[-1]:
        raise ValueError(f"range {sub[-1].tolist()} lies beyond the stream's {cum[-1]} samples")
    piece, lo, hi = _cut(cum, sub)
    base = stream[piece, 0]
    return _normalize(np.stack([base + lo, base + hi], axis=1))


def _split_emitted(n: int, head: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(remaining, emitted) input positions of a worker of ``n`` that emitted ``head``.

    ``head`` is the first ``c`` entries of the worker's order (distinct positions). Everything
    below :func:`resume_position` (the smallest position not in ``head``) was emitted; above it,
    only the entries of ``head`` that lie there (at most ``shuffle_buffer`` of them) were.
    """
    emitted = np.sort(np.asarray(head, dtype=np.int64))
    gaps = np.flatnonzero(emitted != np.arange(emitted.size))
    start = int(gaps[0]) if gaps.size else int(emitted.size)
    holes = emitted[start:]
    rem = np.stack([np.concatenate(([start], holes + 1)), np.concatenate((holes, [n]))], axis=1)
    done = np.concatenate(([[0, start]], np.stack([holes, holes + 1], axis=1)))
    return _normalize(rem), _normalize(done)


def remaining_spans(plan: WorkerPlan, consumed: int) -> tuple[Span, ...]:
    """The input spans of ``plan`` that it has not emitted after its first ``consumed`` samples.

    In input order: the spans from :func:`resume_position` on, less the emitted samples there.
    """
    consumed = _check_int("consumed", consumed, 0, plan.num_samples + 1)
    rem, _ = _split_emitted(plan.num_samples, plan.order[:consumed])
    if not rem.size:
        return ()
    cum = np.concatenate(([0], np.cumsum([len(s) for s in plan.spans])))
    piece, lo, hi = _cut(cum, rem)
    shard = np.array([s.shard for s in plan.spans], dtype=np.int64)[piece]
    first = np.array([s.start for s in plan.spans], dtype=np.int64)[piece]
    return _merge(shard, first + lo, first + hi)


def _worker_key(seed: int, epoch: int, level: int, rank: int, world_size: int, worker: int,
                num_workers: int) -> list[int]:
    if level == 0:
        return [seed, epoch, _WORKER_STREAM, rank, world_size, worker, num_workers]
    return [seed, epoch, _RESUME_STREAM, level, rank, world_size, worker, num_workers]


def _check_stream(stream, total: int) -> np.ndarray:
    r = _ranges(stream)
    if r.size and (r.min() < 0 or (r[:, 1] < r[:, 0]).any() or r.max() > total):
        raise ValueError(f"stream must hold ranges [start, stop) of [0, {total}), got {r[:3].tolist()}...")
    return _normalize(r)


def rest_stream(shard_sizes: Stream, consumed: Sequence[Sequence[int]], *, seed: int,
                epoch: int, world_size: int, num_workers: int, stream=None, level: int = 0,
                shuffle: bool = True, shuffle_buffer: int = 1000, remainder: str = "drop",
                batch_size: Optional[int] = None, drop_last: bool = False,
                block_size: int = 64, shuffle_start: Optional[int] = None) -> np.ndarray:
    """The samples of an epoch that a plan has not emitted yet, as epoch-stream ranges.

    The plan is the epoch plan of ``world_size`` x ``num_workers`` (``stream=None``, ``level=0``)
    or a :func:`rest_plan` of level ``level`` over ``stream``; ``consumed[r][w]`` is how many
    samples worker ``w`` of rank ``r`` emitted (missing entries count as 0). Returns normalized
    int64 ranges of shape (k, 2) of the epoch's global stream: every sample the plan reads and did
    not emit, each once (``"pad"``'s repeats and samples emitted by another worker are left out).
    ``block_size`` matters only for an interleaved layout (whose workers read in chunks of it).
    ``shuffle_start``: the plan's (:func:`shuffle_start_of`; a state from before it existed
    filled its buffers whole: pass ``shuffle_buffer``).
    """
    seed, block, shuffle_buffer, batch_size = check_settings(
        seed=seed, block_size=block_size, shuffle_buffer=shuffle_buffer, remainder=remainder,
        batch_size=batch_size)
    start = shuffle_start_of(shuffle_buffer, shuffle_start)
    epoch = _check_int("epoch", epoch, 0)
    layout = _layout(shard_sizes, seed, epoch)
    world_size = _check_int("world_size", world_size, 1)
    num_workers = _check_int("num_workers", num_workers, 1)
    level = _check_int("level", level, 0)
    total = layout.total
    if (stream is None) != (level == 0):
        raise ValueError("level must be 0 for the epoch plan (stream=None) and >= 1 for a rest plan")
    base = np.array([[0, total]], dtype=np.int64) if stream is None else _check_stream(stream, total)
    length = int((base[:, 1] - base[:, 0]).sum())
    unit = layout.unit if stream is None else 1
    per_rank = _per_rank(length, world_size, remainder, batch_size, drop_last, unit)
    if length == 0:
        return base[:0]
    rem_all, done_all = [], []
    for r in range(world_size):
        row = consumed[r] if r < len(consumed) else ()
        for w in range(num_workers):
            c = int(row[w]) if w < len(row) else 0
            lo, pieces, batches = _deal(length, per_rank, r, w, num_workers, batch_size)
            n = sum(b - a for a, b in pieces)
            if not 0 <= c <= n:
                raise ValueError(f"consumed[{r}][{w}] = {c}, but that worker reads {n} samples")
            key = _worker_key(seed, epoch, level, r, world_size, w, num_workers)
            if layout.interleaved:  # emitted samples as offsets in the worker's stream order
                ranges = [tuple(x) for a, b in pieces for x in
                          _compose(base, np.array([[a, b]], dtype=np.int64)).tolist()]
                _, glob, strand = layout.worker_input(ranges, shuffle=shuffle,
                                                      block_size=int(block or 1))
                assert glob is not None and strand is not None
                sizes = batches if layout.unit == 1 else ()
                head = glob[_interleaved_order(glob, strand, shuffle, shuffle_buffer, key,
                                               sizes, layout.shares, unit, start)[:c]]
            else:
                head = _worker_order(n, shuffle, shuffle_buffer, key, c, start)
            rem, done = _split_emitted(n, head)
            rem_all.append(rem + lo)
            done_all.append(done + lo)
    rem = _normalize(_wrap(np.concatenate(rem_all), length))
    done = _normalize(_wrap(np.concatenate(done_all), length))
    rest = _subtract(rem, done)
    return rest if stream is None else _compose(base, rest)


def rest_plan(shard_sizes: Stream, stream, *, seed: int, epoch: int, rank: int,
              world_size: int, worker: int, num_workers: int, level: int = 1,
              shuffle: bool = True, block_size: int = 64, shuffle_buffer: int = 1000,
              remainder: str = "drop", batch_size: Optional[int] = None,
              drop_last: bool = False, shuffle_start: Optional[int] = None) -> WorkerPlan:
    """Plan of worker ``worker`` of rank ``rank`` over the rest stream ``stream`` of an epoch.

    ``stream`` comes from :func:`rest_stream` (``level`` is 1 for an epoch's first elastic
    resume, 2 for its second, ...). It is dealt like the epoch's global stream in
    :func:`epoch_plan`: ranks get contiguous equal shares (``remainder`` and ``drop_last`` apply to
    the rest's length), workers contiguous whole batches, and each worker shuffles its input with
    :func:`shuffle_order`, seeded from ``(seed, epoch, resume tag, level, rank, world_size,
    worker, num_workers)``. ``shuffle`` and ``block_size`` must be those of the epoch plan (they
    define the global stream); the other settings may differ from it.
    """
    seed, block, shuffle_buffer, batch_size = check_settings(
        seed=seed, block_size=block_size, shuffle_buffer=shuffle_buffer, remainder=remainder,
        batch_size=batch_size)
    start = shuffle_start_of(shuffle_buffer, shuffle_start)
    block_size = _check_int("block_size", block, 1)  # None is not a block size here
    epoch = _check_int("epoch", epoch, 0)
    world_size = _check_int("world_size", world_size, 1)
    rank = _check_int("rank", rank, 0, world_size)
    num_workers = _check_int("num_workers", num_workers, 1)
    worker = _check_int("worker", worker, 0, num_workers)
    level = _check_int("level", level, 1)
    layout = _layout(shard_sizes, seed, epoch)
    base = _check_stream(stream, layout.total)
    length = int((base[:, 1] - base[:, 0]).sum())
    per_rank = _per_rank(length, world_size, remainder, batch_size, drop_last)
    _, pieces, batch_sizes = _deal(length, per_rank, rank, worker, num_workers, batch_size)
    ranges = [tuple(x) for a, b in pieces
              for x in _compose(base, np.array([[a, b]], dtype=np.int64)).tolist()]
    return _worker_plan(layout, ranges, batch_sizes, shuffle, block_size, shuffle_buffer,
                        _worker_key(seed, epoch, level, rank, world_size, worker, num_workers),
                        start=start)
