"""Behaviour of the pure epoch plan, checked over grids of shards x ranks x workers x epochs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from shardkit.plan import (
    Span,
    WorkerPlan,
    epoch_plan,
    rank_num_batches,
    rank_num_samples,
    resume_position,
    shuffle_order,
    shuffle_start_of,
)

LAYOUTS = {
    "one": [37],
    "even": [10] * 6,
    "uneven": [5, 9, 1, 13, 7, 2, 11, 3, 8, 4, 6, 12],
    "many": [3] * 17 + [0, 5, 1],  # more shards than ranks x workers, with an empty shard
    "few": [100, 250],  # fewer shards than ranks x workers
    "tiny": [1, 0, 2],  # fewer samples than ranks x workers
}
WORLD_SIZES = (1, 2, 3)
NUM_WORKERS = (1, 2, 3, 4)


def plan(sizes, **kw) -> WorkerPlan:
    args = dict(seed=7, epoch=0, rank=0, world_size=1, worker=0, num_workers=1, shuffle_buffer=8)
    args.update(kw)
    return epoch_plan(sizes, **args)


def rank_plans(sizes, world_size, num_workers, **kw) -> list[list[WorkerPlan]]:
    return [[plan(sizes, rank=r, world_size=world_size, worker=w, num_workers=num_workers, **kw)
             for w in range(num_workers)] for r in range(world_size)]


def sample_ids(sizes, spans) -> np.ndarray:
    """Global sample ids (offset of the shard + index inside it) of spans, in read order."""
    offsets = np.concatenate(([0], np.cumsum(sizes)))
    parts = [offsets[s.shard] + np.arange(s.start, s.stop) for s in spans]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def check_spans(sizes, p: WorkerPlan) -> None:
    for s in p.spans:
        assert 0 <= s.start < s.stop <= sizes[s.shard]
    for a, b in zip(p.spans, p.spans[1:]):
        assert not (a.shard == b.shard and a.stop == b.start), "adjacent spans not merged"
    assert p.num_samples == sum(s.stop - s.start for s in p.spans)
    assert p.order.dtype == np.int64
    assert np.array_equal(np.sort(p.order), np.arange(p.num_samples))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("block_size", [4, 64])
@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("remainder", ["drop", "pad"])
def test_exactly_once(layout, block_size, shuffle, remainder):
    sizes = LAYOUTS[layout]
    total = sum(sizes)
    for ws, nw in itertools.product(WORLD_SIZES, NUM_WORKERS):
        per_rank = rank_num_samples(sizes, ws, remainder=remainder)
        assert per_rank == (total // ws if remainder == "drop" else -(-total // ws))
        plans = rank_plans(sizes, ws, nw, block_size=block_size, shuffle=shuffle,
                           remainder=remainder, epoch=3)
        ids = []
        for row in plans:
            for p in row:
                check_spans(sizes, p)
                ids.append(sample_ids(sizes, p.spans))
            assert sum(p.num_samples for p in row) == per_rank
        counts = np.bincount(np.concatenate(ids), minlength=total)
        if remainder == "drop":
            assert counts.max(initial=0) <= 1
            assert (counts == 0).sum() == total - per_rank * ws
        else:
            assert counts.min() >= 1
            assert (counts - 1).sum() == per_rank * ws - total


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("remainder", ["drop", "pad"])
@pytest.mark.parametrize("drop_last", [False, True])
def test_equal_work(layout, remainder, drop_last):
    sizes = LAYOUTS[layout]
    for ws, nw, bs in itertools.product(WORLD_SIZES, NUM_WORKERS, [None, 1, 4, 7]):
        kw = dict(remainder=remainder, batch_size=bs, drop_last=drop_last)
        per_rank = rank_num_samples(sizes, ws, **kw)
        plans = rank_plans(sizes, ws, nw, block_size=4, **kw)
        ids = np.concatenate([sample_ids(sizes, p.spans) for row in plans for p in row])
        if remainder == "drop":
            assert len(np.unique(ids)) == len(ids)
        for row in plans:
            assert sum(p.num_samples for p in row) == per_rank
            if bs is None:
                assert all(p.batch_sizes == () for p in row)
                counts = [p.num_samples for p in row]
                assert max(counts) - min(counts) <= 1
                continue
            num_batches = rank_num_batches(sizes, ws, **kw)
            assert sum(len(p.batch_sizes) for p in row) == num_batches
            assert num_batches == (per_rank // bs if drop_last else -(-per_rank // bs))
            for p in row:
                assert sum(p.batch_sizes) == p.num_samples
                assert all(b == bs for b in p.batch_sizes[:-1])
                assert all(0 < b <= bs for b in p.batch_sizes)
            counts = [len(p.batch_sizes) for p in row]
            assert max(counts) - min(counts) <= 1
            partial = [w for w, p in enumerate(row) if p.batch_sizes and p.batch_sizes[-1] < bs]
            if per_rank % bs:
                assert not drop_last
                assert partial == [min(num_batches, nw) - 1]  # documented holder
            else:
                assert partial == []


def test_rank_counts():
    assert rank_num_samples([10, 3], 4) == 3
    assert rank_num_samples([10, 3], 4, remainder="pad") == 4
    assert rank_num_samples([10, 2], 4, remainder="pad") == 3
    assert rank_num_samples([10, 3], 1, batch_size=4, drop_last=True) == 12
    assert rank_num_batches([10, 3], 1, batch_size=4) == 4
    assert rank_num_batches([10, 3], 1, batch_size=4, drop_last=True) == 3
    assert rank_num_batches([1], 3, remainder="pad", batch_size=4) == 1
    assert rank_num_batches([1], 3, batch_size=4) == 0


def shard_sets(sizes, epoch, seed=7):
    return [[frozenset(s.shard for s in p.spans) for p in row]
            for row in rank_plans(sizes, 2, 2, block_size=4, epoch=epoch, seed=seed)]


def test_same_seed_and_epoch_gives_same_plan():
    sizes = LAYOUTS["uneven"]
    for r, w in itertools.product(range(2), range(3)):
        a = plan(sizes, rank=r, world_size=2, worker=w, num_workers=3, epoch=5, block_size=4)
        b = plan(sizes, rank=r, world_size=2, worker=w, num_workers=3, epoch=5, block_size=4)
        assert a.spans == b.spans and a.batch_sizes == b.batch_sizes
        assert np.array_equal(a.order, b.order)


def test_epoch_and_seed_change_the_order():
    sizes = LAYOUTS["uneven"]
    base = plan(sizes, block_size=4, epoch=0)
    assert plan(sizes, block_size=4, epoch=1).spans != base.spans
    assert plan(sizes, block_size=4, seed=8).spans != base.spans
    assert not np.array_equal(plan(sizes, block_size=4, epoch=1).order, base.order)
    assert shard_sets(sizes, 0) != shard_sets(sizes, 1)
    assert shard_sets(sizes, 0, seed=1) != shard_sets(sizes, 0, seed=2)
    # the dropped remainder moves with the epoch
    dropped = []
    for epoch in range(4):
        ids = sample_ids(sizes, plan(sizes, world_size=1, block_size=4, epoch=epoch,
                                     batch_size=32, drop_last=True).spans)
        dropped.append(frozenset(set(range(sum(sizes))) - set(ids.tolist())))
    assert len(set(dropped)) > 1


def test_no_shuffle_is_natural_order():
    sizes = [5, 0, 9, 1]
    p = plan(sizes, shuffle=False, block_size=2)
    assert p.spans == (Span(0, 0, 5), Span(2, 0, 9), Span(3, 0, 1))
    assert np.array_equal(p.order, np.arange(15))
    first = plan(sizes, shuffle=False, block_size=2, world_size=2, num_workers=2)
    assert first.spans == (Span(0, 0, 4),)  # rank 0 worker 0: the first 7 // 2 + 1 samples


def test_pad_wraps_to_the_stream_start():
    sizes = [5]
    plans = rank_plans(sizes, 3, 1, shuffle=False, remainder="pad")
    assert [row[0].spans for row in plans] == [
        (Span(0, 0, 2),), (Span(0, 2, 4),), (Span(0, 4, 5), Span(0, 0, 1))]


def test_shuffle_order_is_bounded_permutation():
    for n, buf, seed in itertools.product([0, 1, 5, 100, 1000], [1, 2, 7, 64, 5000], range(2)):
        order = shuffle_order(n, buf, np.random.default_rng(seed))
        assert order.dtype == np.int64
        assert np.array_equal(np.sort(order), np.arange(n))
        assert (order < np.arange(n) + buf).all()
        if buf == 1:
            assert np.array_equal(order, np.arange(n))
    assert not np.array_equal(shuffle_order(100, 16, np.random.default_rng(0)), np.arange(100))


def test_a_growing_shuffle_buffer_emits_early_and_stays_a_bounded_permutation():
    for n, buf, start, seed in itertools.product([0, 1, 5, 99, 100, 101, 1000, 3000],
                                                 [1, 2, 7, 64, 1000], [1, 2, 10, 100, 1000],
                                                 range(2)):
        if start > buf:
            continue
        order = shuffle_order(n, buf, np.random.default_rng(seed), start=start)
        assert np.array_equal(np.sort(order), np.arange(n))
        assert (order < np.arange(n) + buf).all()  # never holds more than the buffer
        # while it grows, the k-th emission needs only start + 2k + 1 inputs read
        k = np.arange(min(n, max(0, buf - start)))
        assert (order[:k.size] < start + 2 * k + 1).all()
        for count in (0, 1, n // 3, n):  # a prefix costs what it emits
            head = shuffle_order(n, buf, np.random.default_rng(seed), start=start, count=count)
            assert np.array_equal(head, order[:count])
    # start = the buffer's size is the buffer that fills whole first (states before it grew)
    for n, buf in [(500, 32), (3000, 1000), (10, 64)]:
        assert np.array_equal(shuffle_order(n, buf, np.random.default_rng(3), start=buf),
                              shuffle_order(n, buf, np.random.default_rng(3)))


def test_shuffle_start_defaults_to_a_tenth_of_the_buffer_and_is_checked():
    assert [shuffle_start_of(b) for b in (1, 9, 10, 11, 1000)] == [1, 1, 1, 2, 100]
    assert shuffle_start_of(1000, 1000) == 1000
    for bad in (0, 1001, 2.5):
        with pytest.raises(ValueError, match="shuffle_start"):
            shuffle_start_of(1000, bad)
    # the plan's first batch: with 1000 inputs per worker and a 1000-sample buffer, a batch of
    # 256 needs ~60% of them read instead of all
    p = plan([1000], block_size=64, shuffle_buffer=1000)
    full = plan([1000], block_size=64, shuffle_buffer=1000, shuffle_start=1000)
    assert p.order[:256].max() < 0.7 * 1000 < full.order[:256].max()


@pytest.mark.parametrize("per_class", [100, 1000])
def test_shuffle_quality_on_class_sorted_input(per_class):
    classes, bs = 10, 32
    p = plan([per_class] * classes, block_size=16, shuffle_buffer=1000)
    labels = np.concatenate([np.full(s.stop - s.start, s.shard) for s in p.spans])[p.order]
    distinct = [len(set(labels[i:i + bs])) for i in range(0, len(labels) - bs + 1, bs)]
    expected = classes * (1 - (1 - 1 / classes) ** bs)
    assert np.mean(distinct) >= 0.8 * expected


def test_resume_position():
    rng = np.random.default_rng(0)
    order = shuffle_order(500, 32, np.random.default_rng(1))
    for k in [0, 1, 499, 500, *rng.integers(0, 500, 20).tolist()]:
        start = resume_position(order, k)
        assert start == (order[k:].min() if k < 500 else 500)
        emitted = set(order[:k].tolist())
        reread = [i for i in range(start, 500) if i not in emitted]
        assert sorted(reread) == sorted(order[k:].tolist())


BAD_ARGS = [
    ("remainder", dict(remainder="wrap")),
    ("rank", dict(rank=2, world_size=2)),
    ("rank", dict(rank=-1)),
    ("worker", dict(worker=3, num_workers=3)),
    ("block_size", dict(block_size=0)),
    ("batch_size", dict(batch_size=0)),
    ("shuffle_buffer", dict(shuffle_buffer=0)),
    ("num_workers", dict(num_workers=0)),
    ("world_size", dict(world_size=0)),
    ("seed", dict(seed=-1)),
]


@pytest.mark.parametrize("name, kw", BAD_ARGS, ids=[f"{n}{i}" for i, (n, _) in enumerate(BAD_ARGS)])
def test_bad_args_name_the_argument(name, kw):
    with pytest.raises(ValueError, match=name):
        plan([10, 10], **kw)


def test_bad_shard_sizes_and_counts():
    with pytest.raises(ValueError, match="shard_sizes"):
        plan([])
    with pytest.raises(ValueError, match="shard_sizes"):
        plan([0, 0])
    with pytest.raises(ValueError, match="shard_sizes"):
        plan([3, -1])
    with pytest.raises(ValueError, match="remainder"):
        rank_num_samples([3], 1, remainder="nope")
    with pytest.raises(ValueError, match="batch_size"):
        rank_num_batches([3], 1)
    with pytest.raises(ValueError, match="buffer_size"):
        shuffle_order(3, 0, np.random.default_rng(0))
