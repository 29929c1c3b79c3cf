"""The epoch's global stream: which samples an epoch holds, and in which order, as a pure
function of numbers (numpy only). :mod:`shardkit.plan` deals this stream to ranks and workers.

One dataset read whole each epoch (the common case): the stream is its shards cut into blocks of
``block_size`` samples (a shard's last block may be shorter), the blocks in a keyed pseudo-random
order seeded from ``(seed, epoch)`` (:class:`_BlockPermutation`, evaluated only where a worker
reads), or in natural order without ``shuffle``.

Shares. A *mixture* of sources, or one dataset with an ``epoch_size``, takes a share of each
source per epoch (:func:`epoch_shares`): ``k_s`` samples of source ``s``. Each source is walked
pass after pass (:func:`source_segments`): pass ``p`` is the source's shards in a seeded order
(natural when every epoch takes whole passes, so one dataset read whole keeps the order it always
had), and epoch ``e`` takes positions ``[e k_s, (e+1) k_s)`` of that endless walk. No sample
repeats before its source was read through and each pass has a new order; a pass that an epoch
runs into puts last the shards that epoch took from the end of the pass before
(:func:`_pass_order`), so an epoch holds no sample twice while its share is at most the source's
size, and each ``⌊k_s/n_s⌋`` or ``⌈k_s/n_s⌉`` times above (``repeat=2``: twice). An epoch's
samples are *segments* (shard, first sample, stop) of the sources' shards: O(shards) of them,
plus a source's shards once more for each whole pass of it inside the epoch.

Mix. ``"random"``: all segments make one stream, their blocks permuted together (every source's
blocks interleaved at random). ``"stratified"`` / ``"per_source"``: each source's segments make a
block-permuted *strand* of its own (seeded from ``(seed, epoch, source + 1)``), and the stream
interleaves the strands smoothly in proportion to their shares, one sample (``unit=1``) or one
whole batch (``unit=batch_size``) at a time: unit ``j`` of strand ``s`` (of ``c_s`` units) has
the key ``(2j + 1) / 2c_s`` and units follow in (key, s) order, so the strands are spread evenly
through the stream (every prefix holds each strand's share of it to within a unit; the batches
of ``"stratified"`` are balanced by the plan, see :func:`shardkit.plan._batch_strands`). Where a
unit falls is computed exactly, with
integers, for any range of the stream (O(strands² log) per boundary); nothing of the epoch's size
is built.

A worker reads its share of the stream as *rows* (shard, start, stop). For an interleaved stream
the rows of each strand are read in chunks of ``block_size`` consecutive strand samples, chunks
in the order of their first sample in the stream, so a worker issues block-sized reads however
finely the strands interleave; :meth:`Layout.worker_input` returns the stream offset of each
sample read (``glob``), from which :mod:`shardkit.plan` builds the emission order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

__all__ = ["MIXES", "Layout", "Span", "Strand", "epoch_shares", "source_segments"]

MIXES = ("random", "stratified", "per_source")
_BLOCK_STREAM = 0  # SeedSequence tags keep the generators of a plan independent (see plan.py)
_PASS_TAG = 0x5EED_9A55_0003  # pass orders' SeedSequence word (block orders': the epoch)
_FEISTEL_ROUNDS = 8
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)  # splitmix64's finaliser constants
_MIX2 = np.uint64(0x94D049BB133111EB)

# (shard, start, stop, piece): rows of samples, and the piece of the request each row serves
_Rows = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Span:
    """Samples ``[start, stop)`` of shard number ``shard`` (indices inside that shard)."""

    shard: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


# --------------------------------------------------------------------------- shares
def _largest_remainder(targets: Sequence[float], total: int) -> list[int]:
    """Integers summing to ``total``, each the floor or ceiling of its target (targets summing
    to ``total``): the floors, plus one for the largest fractional parts (ties: first)."""
    floors = [int(math.floor(t)) for t in targets]
    left = max(0, min(len(targets), total - sum(floors)))
    by_part = sorted(range(len(targets)), key=lambda i: (-(targets[i] - floors[i]), i))
    for i in by_part[:left]:
        floors[i] += 1
    return floors


def epoch_shares(sizes: Sequence[int], specs: Sequence[tuple], *,
                 epoch_size: Optional[int] = None, unit: int = 1,
                 names: Optional[Sequence[str]] = None) -> list[int]:
    """Samples of each source per epoch.

    ``sizes``: samples of each source; ``specs``: ``(weight, repeat, choose)`` of each (at most
    one not None). Weights are given to every source or to none: with weights, source ``s`` gets
    ``epoch_size * w_s / sum(w)`` (``epoch_size`` defaults to the sources' total); without, its
    own size times ``repeat``, ``choose``, or its own size, and ``epoch_size`` (if given) scales
    these to its total. Rounded by largest remainder to whole ``unit``s (a batch for
    ``mix="per_source"``), so the shares sum to ``epoch_size`` (rounded down to whole units).
    ValueError for a share that rounds to nothing.
    """
    names = list(names) if names is not None else [f"#{i}" for i in range(len(sizes))]
    if len(specs) != len(sizes) or not sizes:
        raise ValueError("epoch_shares: one spec per source, at least one source")
    weighted = [w is not None for w, _, _ in specs]
    if any(weighted):
        if not all(weighted):
            raise ValueError("weight: give a weight to every source or to none (the others' "
                             "shares would be undefined; use repeat= or choose= instead)")
        total_w = float(sum(w for w, _, _ in specs))
        size = int(sum(sizes)) if epoch_size is None else int(epoch_size)
        targets = [size * w / total_w for w, _, _ in specs]
    else:
        targets = [float(n * r) if r is not None else float(c) if c is not None else float(n)
                   for n, (_, r, c) in zip(sizes, specs)]
        natural = sum(targets)
        size = int(round(natural)) if epoch_size is None else int(epoch_size)
        if epoch_size is not None and natural > 0:
            targets = [t * size / natural for t in targets]
    units = _largest_remainder([t / unit for t in targets], size // unit)
    for name, k in zip(names, units):
        if k <= 0:
            what = "samples" if unit == 1 else f"batches of {unit}"
            raise ValueError(f"source {name}: its share of an epoch of {size} samples rounds "
                             f"to 0 {what}; give it a larger share or a larger epoch_size")
    return [k * unit for k in units]


def _shuffled(count: int, seed: int, source: int, p: int) -> np.ndarray:
    """Pass ``p``'s own seeded shard order of a source of ``count`` shards."""
    # (the second word, where block orders have the epoch, is out of any epoch's reach)
    rng = np.random.default_rng(np.random.SeedSequence([seed, _PASS_TAG, source, p]))
    return rng.permutation(count).astype(np.int64)


def _after(prev: np.ndarray, order: np.ndarray, sizes: np.ndarray, tail: int) -> np.ndarray:
    """``order`` (a pass's own shard order) rearranged so that the shards an epoch took from the
    last ``tail`` samples of an earlier pass of order ``prev`` come last, the one split between
    two epochs first among them (its first samples were in an earlier epoch): the same epoch
    reads this pass from its start, so it reads none of them again before it must."""
    n = int(sizes.sum())
    cum = np.concatenate(([0], np.cumsum(sizes[prev])))
    i0 = int(np.searchsorted(cum, n - tail, "right")) - 1  # the tail's first shard
    late = np.zeros(len(sizes), dtype=bool)
    late[prev[i0:]] = True
    if cum[i0] == n - tail:  # the tail starts with a whole shard
        return np.concatenate((order[~late[order]], order[late[order]]))
    split = prev[i0]
    late[split] = False
    first = order[~late[order] & (order != split)]
    return np.concatenate((first, [split], order[late[order]])).astype(np.int64)


def _tail_before(r: int, n: int, share: int) -> tuple[int, int] | None:
    """``(pass, samples)``: the end of an earlier pass that the epoch running into pass ``r``
    starts with (None: no epoch runs into pass ``r``, or it starts at a pass's start)."""
    if r == 0 or (r * n) % share == 0:
        return None
    start = (r * n) // share * share  # the first sample of the epoch that runs into pass r
    if start % n == 0:
        return None
    p = start // n
    return p, (p + 1) * n - start


_PASSES: dict = {}  # (seed, source, sizes, share) -> {pass: order}: a walk's recent passes


def _pass_order(sizes: np.ndarray, share: int, r: int, seed: int, source: int) -> np.ndarray:
    """The shard order of pass ``r`` of a source walked with ``share`` samples per epoch.

    Each pass has its own seeded order (:func:`_shuffled`), except that a pass an epoch runs
    into puts last the shards that epoch took from the end of its previous pass
    (:func:`_after`): so an epoch holds no sample twice while its share is at most the source's
    size, and each sample ⌊share/size⌋ or ⌈share/size⌉ times above. A pass's order thus
    follows from an earlier one's: this process keeps the recent ones, and computes a chain of
    at most one pass per epoch since (O(shards) each)."""
    n = int(sizes.sum())
    key = (seed, source, len(sizes), n, hash(sizes.tobytes()), share)
    known = _PASSES.setdefault(key, {})
    if len(_PASSES) > 64:
        _PASSES.pop(next(iter(_PASSES)))
    chain = [r]  # r, the pass it follows from, the one that follows from, ...
    while chain[-1] not in known:
        before = _tail_before(chain[-1], n, share)
        if before is None:
            break
        chain.append(before[0])
    order = None
    for q in reversed(chain):
        if q in known:
            order = known[q]
            continue
        own = _shuffled(len(sizes), seed, source, q)
        before = _tail_before(q, n, share)
        order = own if before is None else _after(known[before[0]], own, sizes, before[1])
        known[q] = order
    while len(known) > 16:
        known.pop(min(known))
    assert order is not None
    return order


def source_segments(sizes: np.ndarray, share: int, *, epoch: int, seed: int, source: int,
                    shuffle: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The segments ``(shard, start, size)`` that epoch ``epoch`` takes from one source of shard
    sizes ``sizes``: positions ``[epoch * share, (epoch + 1) * share)`` of its pass-after-pass
    walk (see the module docstring), in walk order. Passes wholly inside the epoch are read in
    natural order (the epoch's blocks are permuted anyway)."""
    n = int(sizes.sum())
    lo, hi = epoch * share, (epoch + 1) * share
    natural = not shuffle or share % n == 0
    count = len(sizes)
    every = np.arange(count, dtype=np.int64)
    shard, start, size = [], [], []
    first_pass, last_pass = lo // n, (hi - 1) // n
    for p in sorted({first_pass, last_pass}):
        if p == last_pass and last_pass - first_pass > 1:  # the whole passes between
            full = last_pass - first_pass - 1
            shard.append(np.tile(every, full))
            start.append(np.zeros(count * full, dtype=np.int64))
            size.append(np.tile(sizes, full))
        order = every if natural else _pass_order(sizes, share, p, seed, source)
        cum = np.concatenate(([0], np.cumsum(sizes[order])))
        a, b = max(lo, p * n) - p * n, min(hi, (p + 1) * n) - p * n
        i0 = int(np.searchsorted(cum, a, "right")) - 1
        i1 = int(np.searchsorted(cum, b, "left"))
        first = np.maximum(cum[i0:i1], a) - cum[i0:i1]
        last = np.minimum(cum[i0 + 1:i1 + 1], b) - cum[i0:i1]
        keep = last > first
        shard.append(order[i0:i1][keep])
        start.append(first[keep])
        size.append((last - first)[keep])
    out = tuple(np.concatenate(x).astype(np.int64) for x in (shard, start, size))
    keep = out[2] > 0
    return out[0][keep], out[1][keep], out[2][keep]


# --------------------------------------------------------------------------- strands
@dataclass(frozen=True, eq=False)
class Strand:
    """A block-permuted stream of segments: segment ``i`` is samples ``[start[i], start[i] +
    size[i])`` of shard ``shard[i]`` (global shard numbers); ``tag`` seeds its permutation apart
    from other strands' (None: the plain ``(seed, epoch)`` of one dataset)."""

    shard: np.ndarray
    start: np.ndarray
    size: np.ndarray
    tag: Optional[int] = None
    whole: bool = False  # segment i is all of shard i: no mapping needed

    @classmethod
    def of_shards(cls, sizes: np.ndarray) -> Strand:
        count = len(sizes)
        return cls(np.arange(count, dtype=np.int64), np.zeros(count, dtype=np.int64),
                   np.asarray(sizes, dtype=np.int64), None, whole=True)

    @property
    def total(self) -> int:
        return int(self.size.sum())

    def rows(self, pieces: list[tuple[int, int]], *, shuffle: bool, block_size: int,
             seed: int, epoch: int) -> _Rows:
        """Rows (global shard, start, stop, piece) of the strand positions ``pieces``."""
        if not pieces:
            return _rows([], [], [], [])
        if shuffle:
            perm_seed = (seed, epoch) if self.tag is None else (seed, epoch, self.tag)
            seg, a, b, which = _shuffled_rows(self.size, block_size, perm_seed, pieces)
        else:
            seg, a, b, which = _natural_rows(self.size, pieces)
        if self.whole:
            return seg, a, b, which
        offset = self.start[seg]
        return self.shard[seg], a + offset, b + offset, which


# --------------------------------------------------------------------------- the interleave
def _units_before(c: Sequence[int], s: int, j: int) -> int:
    """How many units of the interleave of strands of ``c`` units precede unit ``j`` of ``s``."""
    cs, total = c[s], 0
    for t, ct in enumerate(c):
        if t == s:
            total += j
            continue
        a = (2 * j + 1) * ct  # unit j' of t precedes iff (2j'+1) cs < a (<= a when t < s)
        m = a // cs if t < s else (a - 1) // cs
        total += min(ct, (m + 1) // 2)
    return total


def _strand_counts(c: Sequence[int], u: int) -> list[int]:
    """For each strand: its units among the first ``u`` units of the interleave."""
    out = []
    for s, cs in enumerate(c):
        lo, hi = 0, cs  # the first j with units_before(s, j) >= u (cs when none)
        while lo < hi:
            mid = (lo + hi) // 2
            if _units_before(c, s, mid) >= u:
                hi = mid
            else:
                lo = mid + 1
        out.append(lo)
    return out


@dataclass(frozen=True, eq=False)
class Layout:
    """One epoch's global stream (see the module docstring): ``strands`` (one, or one per source
    when interleaved), each strand's samples in the epoch (``shares``), the interleave ``unit``,
    each source's first global shard number (``first_shard``, one more entry at the end), the
    samples of the sources (``num_samples``: not the epoch's), and the ``seed`` and ``epoch``
    that seed the strands' block orders."""

    strands: tuple[Strand, ...]
    shares: tuple[int, ...]
    unit: int
    first_shard: np.ndarray
    num_samples: int
    seed: int
    epoch: int

    @classmethod
    def whole(cls, sizes: np.ndarray, seed: int, epoch: int) -> Layout:
        """One dataset, every sample once per epoch (what ``shard_sizes`` alone means)."""
        total = int(sizes.sum())
        return cls((Strand.of_shards(sizes),), (total,), 1,
                   np.array([0, len(sizes)], dtype=np.int64), total, seed, epoch)

    @classmethod
    def of_sources(cls, sources: Sequence[np.ndarray], shares: Sequence[int], *, seed: int,
                   epoch: int, shuffle: bool, mix: str = "random", unit: int = 1) -> Layout:
        """The layout of epoch ``epoch`` taking ``shares[s]`` samples of source ``s`` (shard
        sizes ``sources[s]``), mixed as ``mix``."""
        if mix not in MIXES:
            raise ValueError(f"mix must be one of {MIXES}, got {mix!r}")
        sources = [np.asarray(s, dtype=np.int64) for s in sources]
        first = np.concatenate(([0], np.cumsum([len(s) for s in sources]))).astype(np.int64)
        num_samples = int(sum(int(s.sum()) for s in sources))
        if len(sources) == 1 and shares[0] == num_samples:
            return cls((Strand.of_shards(sources[0]),), (num_samples,), 1, first, num_samples,
                       seed, epoch)
        segments = [source_segments(sizes, int(k), epoch=epoch, seed=seed, source=s,
                                    shuffle=shuffle)
                    for s, (sizes, k) in enumerate(zip(sources, shares))]
        if mix == "random" or len(sources) == 1:
            shard, start, size = (np.concatenate([seg[i] + (first[s] if i == 0 else 0)
                                                  for s, seg in enumerate(segments)])
                                  for i in range(3))
            return cls((Strand(shard, start, size),), (int(sum(shares)),), 1, first,
                       num_samples, seed, epoch)
        strands = tuple(Strand(seg[0] + first[s], seg[1], seg[2], tag=s + 1)
                        for s, seg in enumerate(segments))
        return cls(strands, tuple(int(k) for k in shares), unit if mix == "per_source" else 1,
                   first, num_samples, seed, epoch)

    @property
    def total(self) -> int:
        """Samples in the epoch's stream."""
        return int(sum(self.shares))

    @property
    def interleaved(self) -> bool:
        return len(self.strands) > 1

    def source_of(self, shards: np.ndarray) -> np.ndarray:
        """The source of each of the global shard numbers ``shards``."""
        return np.searchsorted(self.first_shard, shards, "right") - 1

    # ----------------------------------------------------------------- reading
    def worker_input(self, pieces: list[tuple[int, int]], *, shuffle: bool, block_size: int
                     ) -> tuple[tuple[Span, ...], Optional[np.ndarray], Optional[np.ndarray]]:
        """What a worker that reads the stream ranges ``pieces`` (in that order) reads.

        Returns its spans in read order and, for an interleaved stream, for each sample read its
        offset among the worker's samples in stream order (``glob``) and its strand (``strand``);
        both are None when samples are read in stream order (one strand)."""
        def rows_of(strand: Strand, pieces: list[tuple[int, int]]) -> _Rows:
            return strand.rows(pieces, shuffle=shuffle, block_size=block_size, seed=self.seed,
                               epoch=self.epoch)

        if not self.interleaved:
            shard, a, b, _ = rows_of(self.strands[0], pieces)
            return _merge(shard, a, b), None, None
        parts = [self._elements(lo, hi) for lo, hi in pieces]
        strand = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
        pos = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
        rows, firsts, glob_parts, strand_parts = [], [], [], []
        for s, st in enumerate(self.strands):
            idx = np.flatnonzero(strand == s)  # offsets of its samples, ascending
            if not idx.size:
                continue
            p = pos[idx]
            # chunks: runs of consecutive strand positions, cut every block_size samples
            run = np.concatenate(([0], np.flatnonzero(np.diff(p) != 1) + 1, [p.size]))
            heads = np.concatenate([np.arange(run[i], run[i + 1], block_size)
                                    for i in range(run.size - 1)])
            ends = np.append(heads[1:], p.size)
            chunk_pieces = list(zip(p[heads].tolist(), (p[ends - 1] + 1).tolist()))
            shard, a, b, which = rows_of(st, chunk_pieces)
            rows.append((idx[heads][which], shard, a, b))
            for h, e in zip(heads.tolist(), ends.tolist()):
                firsts.append(int(idx[h]))
                glob_parts.append(idx[h:e])
                strand_parts.append(np.full(e - h, s, dtype=np.int64))
        if not rows:  # a worker with nothing to read (more workers than batches)
            empty = np.zeros(0, dtype=np.int64)
            return (), empty, empty
        key = np.concatenate([r[0] for r in rows])
        by = np.argsort(key, kind="stable")  # rows of each chunk stay in read order
        shard, a, b = (np.concatenate([r[i] for r in rows])[by] for i in (1, 2, 3))
        chunk_order = np.argsort(np.asarray(firsts, dtype=np.int64), kind="stable")
        glob = np.concatenate([glob_parts[i] for i in chunk_order.tolist()])
        strands = np.concatenate([strand_parts[i] for i in chunk_order.tolist()])
        return _merge(shard, a, b), glob, strands

    def _elements(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Strand and strand position of each sample of stream range ``[lo, hi)``, in order."""
        unit = self.unit
        c = [k // unit for k in self.shares]
        u0, u1 = lo // unit, -(-hi // unit)
        before, after = _strand_counts(c, u0), _strand_counts(c, u1)
        lcm = math.lcm(*c)
        units = sorted(((2 * j + 1) * (lcm // c[s]), s, j)
                       for s in range(len(c)) for j in range(before[s], after[s]))
        s_of = np.fromiter((s for _, s, _ in units), dtype=np.int64, count=len(units))
        j_of = np.fromiter((j for _, _, j in units), dtype=np.int64, count=len(units))
        if unit == 1:
            return s_of, j_of
        strand = np.repeat(s_of, unit)
        pos = (j_of[:, None] * unit + np.arange(unit)).reshape(-1)
        cut = slice(lo - u0 * unit, lo - u0 * unit + (hi - lo))
        return strand[cut], pos[cut]


# --------------------------------------------------------------------------- block order
class _BlockPermutation:
    """A seeded bijection of ``[0, n)`` (stream position -> block number), evaluated on demand.

    A balanced Feistel network on ``2 * half`` bits (the smallest even width covering ``n``) with
    ``_FEISTEL_ROUNDS`` rounds, whose round function is splitmix64's finaliser of ``value ^ key``
    (keys drawn from ``SeedSequence([seed, epoch, _BLOCK_STREAM(, tag)])``). Values that land outside
    ``[0, n)`` are walked through the network again (cycle walking), which keeps it a bijection of
    ``[0, n)``; as the domain is at most ``4 n``, a walk takes under 4 steps on average. Nothing of
    size ``n`` is ever materialised.
    """

    def __init__(self, n: int, seed: int, epoch: int, tag: Optional[int] = None):
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half = np.uint64((bits + 1) // 2)
        self.mask = np.uint64((1 << int(self.half)) - 1)
        entropy = [seed, epoch, _BLOCK_STREAM] + ([] if tag is None else [tag])
        self.keys = np.random.SeedSequence(entropy).generate_state(_FEISTEL_ROUNDS,
                                                                   dtype=np.uint64)

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


def _rows(shards: list, starts: list, stops: list, which: list) -> _Rows:
    """Per-piece arrays of rows, concatenated (empty arrays for no piece)."""
    if not shards:
        return tuple(np.zeros(0, dtype=np.int64) for _ in range(4))  # type: ignore[return-value]
    return tuple(np.concatenate(a).astype(np.int64)  # type: ignore[return-value]
                 for a in (shards, starts, stops, which))


def _merge(shard: np.ndarray, start: np.ndarray, stop: np.ndarray) -> tuple[Span, ...]:
    """Spans from rows in read order, each merged into its predecessor where it continues it."""
    if shard.size:
        new = np.ones(shard.size, dtype=bool)
        new[1:] = (shard[1:] != shard[:-1]) | (start[1:] != stop[:-1])
        heads = np.flatnonzero(new)
        tails = np.append(heads[1:], shard.size) - 1
        shard, start, stop = shard[heads], start[heads], stop[tails]
    return tuple(Span(int(a), int(b), int(c)) for a, b, c in zip(shard.tolist(), start.tolist(),
                                                                   stop.tolist()))


def _natural_rows(sizes: np.ndarray, pieces: list[tuple[int, int]]) -> _Rows:
    """Rows of the stream ranges ``pieces`` when shards are read in their natural order."""
    shard_start = np.concatenate(([0], np.cumsum(sizes)))
    shards, starts, stops, which = [], [], [], []
    for i, (lo, hi) in enumerate(pieces):
        s0 = int(np.searchsorted(shard_start, lo, "right")) - 1
        s1 = int(np.searchsorted(shard_start, hi, "left"))
        shard = np.arange(s0, s1)[sizes[s0:s1] > 0]
        begin, end = shard_start[shard], shard_start[shard + 1]
        shards.append(shard)
        starts.append(np.maximum(begin, lo) - begin)
        stops.append(np.minimum(end, hi) - begin)
        which.append(np.full(shard.size, i, dtype=np.int64))
    return _rows(shards, starts, stops, which)


def _shuffled_rows(sizes: np.ndarray, block_size: int, perm_seed: tuple,
                   pieces: list[tuple[int, int]]) -> _Rows:
    """Rows of the stream ranges ``pieces`` when blocks are read in permuted order.

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

    shards, starts, stops, which = [], [], [], []
    for i, (lo, hi) in enumerate(pieces):
        k = np.arange(position_of(lo), position_of(hi - 1) + 1, dtype=np.int64)
        blk = perm.block(k)
        shard = np.searchsorted(first_block, blk, "right") - 1
        begin, end = start_of(k), start_of(k + 1)  # the blocks' stream positions
        offset = (blk - first_block[shard]) * B  # where each block starts inside its shard
        shards.append(shard)
        starts.append(np.maximum(begin, lo) - begin + offset)
        stops.append(np.minimum(end, hi) - begin + offset)
        which.append(np.full(k.size, i, dtype=np.int64))
    return _rows(shards, starts, stops, which)
