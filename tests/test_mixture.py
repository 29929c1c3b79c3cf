"""Mixtures of datasets and epochs of any size (``shardkit.Source``, ``epoch_size``, ``mix``).

Three generated sources of very different sizes: ``tiny`` (12 samples, read more than once per
epoch), ``mid`` (30) and ``big`` (160, read a fraction of per epoch). Items are identified as
(source, key): keys of different sources may be equal. Ranks are simulated one after the other
with ``rank=``/``world_size=`` (the real torchrun path is the same dataset code; see
test_distributed.py).
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import shardkit
from shardkit import Source, StreamingDataset, make_loader
from shardkit.layout import Layout, epoch_shares
from shardkit.plan import epoch_plan

from _helpers_read import all_keys, image_folder, pack
from conftest import damage_shard

SIZES = {"tiny": 12, "mid": 30, "big": 160}
KW = dict(decode="raw", with_keys=True, with_source=True, block_size=4, shuffle_buffer=10,
          seed=5)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for (name, n), (classes, shard) in zip(SIZES.items(), ((3, 5), (2, 7), (4, 16))):
        src = image_folder(tmp_path_factory.mktemp(f"src_{name}"), classes=classes,
                           per_class=n // classes, size=(8, 8))
        dest = tmp_path_factory.mktemp(f"ds_{name}")
        pack(src, dest, mode="raw", max_samples=shard)
        assert shardkit.Manifest.load(dest).num_samples == n
        out[name] = dest
    return out


def _items(batches, batched: bool) -> list[tuple[int, str]]:
    """(source, key) of every item, from items (image, label, source, key) or batches."""
    if batched:
        return [(int(s), k) for b in batches for s, k in zip(b[2].tolist(), b[3])]
    return [(int(it[2]), it[3]) for it in batches]


def _epoch(source, world: int, workers: int, epoch: int = 0, **kw):
    """Items of one epoch per rank, and the loaders' lengths."""
    opts = {**KW, **kw}
    per_rank, lens = [], []
    for rank in range(world):
        ds = StreamingDataset(source, rank=rank, world_size=world, **opts)
        ds.set_epoch(epoch)
        loader = make_loader(ds, num_workers=workers)
        lens.append(len(loader))
        per_rank.append(list(loader))
    return per_rank, lens


def _srcs(d, names, **shares):
    return [Source(str(d[n]), **shares.get(n, {})) for n in names]


# --------------------------------------------------------------------------- shares


@pytest.mark.parametrize("world,workers", [(1, 0), (1, 2), (2, 1), (3, 2)])
def test_each_epoch_holds_each_source_exactly_its_share(sources, world, workers):
    # tiny: 24 of 12 samples (each twice), big: 48 of 160 (none twice); 72 = 3 x 24
    mix = _srcs(sources, ["tiny", "big"], tiny={"weight": 1}, big={"weight": 2.0})
    for epoch in (0, 1):
        per_rank, lens = _epoch(mix, world, workers, epoch, epoch_size=72, batch_size=5)
        counts = [sum(len(b[1]) for b in r) for r in per_rank]
        assert counts == [72 // world] * world  # every rank as many samples ...
        assert len({len(r) for r in per_rank}) == 1 and lens == [len(r) for r in per_rank]
        items = [it for r in per_rank for it in _items(r, batched=True)]
        by_source = Counter(s for s, _ in items)
        assert by_source == {0: 24, 1: 48}
        reps = Counter(items)
        assert {n for (s, _), n in reps.items() if s == 0} == {2}  # tiny: every key twice
        assert len({k for s, k in items if s == 0}) == SIZES["tiny"]
        assert set(n for (s, _), n in reps.items() if s == 1) == {1}  # big: none twice


def test_repeat_choose_and_own_size_without_epoch_size(sources):
    mix = _srcs(sources, ["tiny", "mid", "big"], tiny={"repeat": 2.5}, big={"choose": 50})
    ds = StreamingDataset(mix, **KW)
    assert ds.shares() == [30, 30, 50] and len(ds) == 110
    items = _items(list(make_loader(ds, num_workers=2)), batched=False)
    assert Counter(s for s, _ in items) == {0: 30, 1: 30, 2: 50}
    tiny = Counter(k for s, k in items if s == 0)
    assert sorted(tiny.values()) == [2] * 6 + [3] * 6  # 2.5 times: half of it a third time
    assert Counter(k for s, k in items if s == 1) == Counter({k: 1 for _, k in items if _ == 1})
    assert len({k for s, k in items if s == 1}) == SIZES["mid"]  # its own size: all, once


def test_epoch_size_scales_the_natural_shares(sources):
    mix = _srcs(sources, ["mid", "big"], mid={"repeat": 2})  # natural 60 : 160
    ds = StreamingDataset(mix, epoch_size=55, **KW)
    assert ds.shares() == [15, 40]


def test_len_is_per_rank_and_drop_or_pad_the_remainder(sources):
    mix = _srcs(sources, ["tiny", "big"], big={"choose": 20})  # 32 samples
    per_rank, lens = _epoch(mix, 3, 0, remainder="drop")
    assert lens == [10] * 3 and sum(len(r) for r in per_rank) == 30
    per_rank, lens = _epoch(mix, 3, 0, remainder="pad")
    items = [it for r in per_rank for it in _items(r, batched=False)]
    assert lens == [11] * 3 and len(items) == 33 and len(set(items)) == 32  # one repeated


# --------------------------------------------------------------------------- coverage


def test_a_source_smaller_than_its_share_walks_through_everything_before_repeating(sources):
    mix = _srcs(sources, ["tiny", "big"], big={"choose": 48})
    seen = []
    for epoch in range(4):
        per_rank, _ = _epoch(mix, 1, 2, epoch)
        big = [k for s, k in _items(per_rank[0], batched=False) if s == 1]
        assert len(big) == 48 == len(set(big))
        seen.append(big)
    first3 = seen[0] + seen[1] + seen[2]
    assert len(set(first3)) == 144  # three epochs: 144 different samples of 160
    left = set(all_keys(sources["big"])) - set(first3)
    assert len(left) == 16 and left <= set(seen[3])  # the 16 left come in the fourth epoch
    assert seen[0] != seen[1] and sorted(seen[0]) != sorted(seen[1])


def test_one_dataset_in_epochs_of_a_third_reads_everything_once(sources):
    keys = []
    for epoch in range(3):
        ds = StreamingDataset(sources["mid"], epoch_size=10, **{**KW, "with_source": False})
        ds.set_epoch(epoch)
        assert len(ds) == 10
        keys += [it[2] for it in make_loader(ds, num_workers=2)]
    assert len(keys) == 30 == len(set(keys))
    # the fourth epoch starts the next pass, in another order
    ds = StreamingDataset(sources["mid"], epoch_size=10, **{**KW, "with_source": False})
    ds.set_epoch(3)
    assert len({it[2] for it in make_loader(ds, num_workers=0)}) == 10


def test_order_is_seeded_reproducible_and_new_each_epoch(sources):
    mix = _srcs(sources, ["tiny", "big"], tiny={"weight": 1}, big={"weight": 3})
    a = _epoch(mix, 1, 2, 0, epoch_size=40)[0][0]
    b = _epoch(mix, 1, 2, 0, epoch_size=40)[0][0]
    c = _epoch(mix, 1, 2, 1, epoch_size=40)[0][0]
    assert _items(a, batched=False) == _items(b, batched=False)
    assert _items(a, batched=False) != _items(c, batched=False)


def test_random_mix_interleaves_the_sources(sources):
    # 50/50 by weight over 120 samples: every quarter of the epoch holds both sources
    mix = _srcs(sources, ["mid", "big"], mid={"weight": 1}, big={"weight": 1})
    items = _items(_epoch(mix, 1, 0, epoch_size=120)[0][0], batched=False)
    for q in range(4):
        part = Counter(s for s, _ in items[q * 30:(q + 1) * 30])
        assert 5 <= part[0] <= 25, part


# --------------------------------------------------------------------------- batches


@pytest.mark.parametrize("world,workers", [(1, 0), (1, 2), (2, 1), (3, 2)])
def test_stratified_batches_hold_each_source_in_proportion(sources, world, workers):
    # 13 : 29 : 84 in batches of 7: a batch should hold 0.72 : 1.61 : 4.67 of them. (Taking
    # the batches as windows of the stream would put up to 1.33 too many in one.)
    mix = _srcs(sources, ["tiny", "mid", "big"], tiny={"weight": 13}, mid={"weight": 29},
                big={"weight": 84})
    size, batch = 126, 7
    share = np.array([13, 29, 84]) / size
    per_rank, _ = _epoch(mix, world, workers, mix="stratified", epoch_size=size,
                         batch_size=batch)
    total = Counter()
    for batches in per_rank:
        counts = [np.bincount(b[2].numpy(), minlength=3) for b in batches]
        for got in counts:
            total.update(dict(enumerate(got.tolist())))
        # every batch but each worker's last (which takes what its share has left)
        for got in counts[:len(counts) - max(1, workers)]:
            assert np.all(np.abs(got - batch * share) < 1), got
    assert total == Counter({0: 13, 1: 29, 2: 84})  # (126 is a multiple of every world size)


def test_per_source_batches_are_each_from_one_source(sources):
    mix = _srcs(sources, ["tiny", "mid", "big"], tiny={"weight": 1}, mid={"weight": 1},
                big={"weight": 2})
    for world, workers in ((1, 2), (2, 1)):
        per_rank, lens = _epoch(mix, world, workers, mix="per_source", epoch_size=96,
                                batch_size=6)
        assert len({len(r) for r in per_rank}) == 1
        per_source = Counter()
        for batches in per_rank:
            for b in batches:
                assert len(set(b[2].tolist())) == 1 and len(b[2]) == 6
                per_source[int(b[2][0])] += 1
        assert per_source == {0: 4, 1: 4, 2: 8}  # the batches in proportion (24 : 24 : 48)


def test_per_source_needs_a_batch_size(sources):
    with pytest.raises(ValueError, match="per_source.*batch_size"):
        StreamingDataset(_srcs(sources, ["tiny", "big"]), mix="per_source")


# --------------------------------------------------------------------------- items and labels


def test_with_source_comes_right_after_the_label(sources):
    mix = _srcs(sources, ["tiny", "mid"])
    ds = StreamingDataset(mix, decode="raw", with_source=True, fields=("json",), with_keys=True)
    item = next(iter(make_loader(ds, num_workers=0)))
    assert len(item) == 5 and item[2] in (0, 1) and isinstance(item[3], str)
    assert isinstance(item[4], str) and isinstance(item[1], int)
    ds = StreamingDataset(mix, decode="uint8", with_source=True, batch_size=4,
                          crop=shardkit.CenterCrop(8))
    images, labels, src = next(iter(make_loader(ds, num_workers=0)))
    assert src.dtype == torch.int64 and src.shape == (4,) and labels.shape == (4,)


def test_labels_keep_each_sources_space_or_share_one_by_name(sources):
    mix = _srcs(sources, ["tiny", "mid", "big"])
    ds = StreamingDataset(mix, **KW)
    assert ds.classes == [[f"class_{i:03d}" for i in range(n)] for n in (3, 2, 4)]
    assert {(s, label) for _, label, s, _ in make_loader(ds, num_workers=0)} == \
        {(s, c) for s, n in enumerate((3, 2, 4)) for c in range(n)}
    by_name = StreamingDataset(mix, label_space="by_name", **KW)
    assert by_name.classes == [f"class_{i:03d}" for i in range(4)]
    own = {(s, k): label for _, label, s, k in make_loader(ds, num_workers=0)}
    shared = {(s, k): label for _, label, s, k in make_loader(by_name, num_workers=0)}
    names = ds.classes
    assert all(by_name.classes[shared[sk]] == names[sk[0]][own[sk]] for sk in own)


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("workers,steps", [(0, 3), (2, 5)])
def test_a_mixture_resumes_exactly_mid_epoch(sources, workers, steps):
    mix = _srcs(sources, ["tiny", "big"], tiny={"repeat": 1.5}, big={"choose": 40})
    kw = dict(KW, batch_size=4)
    full = list(make_loader(StreamingDataset(mix, **kw), num_workers=workers))
    ds = StreamingDataset(mix, **kw)
    it = iter(make_loader(ds, num_workers=workers))
    head = [next(it) for _ in range(steps)]
    state = json.loads(json.dumps(ds.state_dict()))
    assert len(json.dumps(state)) < 600
    del it
    again = StreamingDataset(mix, **kw)
    again.load_state_dict(state)
    rest = list(make_loader(again, num_workers=workers))
    assert _items(head + rest, batched=True) == _items(full, batched=True)


@pytest.mark.parametrize("mix", ["random", "stratified"])
def test_a_mixture_resumes_elastically_on_another_world_size(sources, mix):
    srcs = _srcs(sources, ["tiny", "mid", "big"], tiny={"weight": 1}, mid={"weight": 1},
                 big={"weight": 2})
    kw = dict(KW, batch_size=4, epoch_size=96, mix=mix)
    epoch = [it for r in _epoch(srcs, 2, 0, **kw)[0] for it in _items(r, batched=True)]
    head, states = [], []
    for rank in range(2):
        ds = StreamingDataset(srcs, rank=rank, world_size=2, **kw)
        it = iter(make_loader(ds, num_workers=2))
        head += _items(list(itertools.islice(it, 3)), batched=True)
        states.append(ds.state_dict())
        del it
    state = json.loads(json.dumps(ds.merge_states(states)))
    rest, counts = [], []
    for rank in range(3):
        ds = StreamingDataset(srcs, rank=rank, world_size=3, **kw)
        ds.load_state_dict(state)
        got = list(make_loader(ds, num_workers=1))
        counts.append(len(got))
        rest += _items(got, batched=True)
    assert len(set(counts)) == 1
    left = Counter(epoch) - Counter(head)
    assert not Counter(rest) - left  # nothing twice, nothing from outside the epoch
    assert sum(left.values()) - len(rest) < 3  # all but the new world's remainder


def test_a_state_of_another_mixture_is_refused(sources):
    mix = _srcs(sources, ["tiny", "big"], big={"choose": 40})
    ds = StreamingDataset(mix, rank=0, world_size=1, **KW)
    it = iter(make_loader(ds, num_workers=0))
    next(it)
    state = ds.state_dict()
    other = StreamingDataset(_srcs(sources, ["tiny", "big"], big={"choose": 41}), rank=0,
                             world_size=2, **KW)
    with pytest.raises(ValueError, match="sources and shares"):
        other.load_state_dict(state)


def test_per_source_refuses_an_elastic_resume_and_says_why(sources):
    mix = _srcs(sources, ["tiny", "big"])
    kw = dict(KW, batch_size=4, mix="per_source")
    ds = StreamingDataset(mix, **kw)
    it = iter(make_loader(ds, num_workers=0))
    next(it)
    state = ds.state_dict()
    del it
    other = StreamingDataset(mix, rank=0, world_size=2, **kw)
    with pytest.raises(ValueError, match="per_source.*exactly"):
        other.load_state_dict(state)
        len(other)


# --------------------------------------------------------------------------- faults, stores


def test_a_bad_shard_in_one_source_is_skipped_in_skip_mode(sources, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(sources["mid"], bad)
    damage_shard(bad, "truncate", shard="shard-000001")
    mix = [Source(str(sources["tiny"])), Source(str(bad))]
    with pytest.raises(shardkit.ShardError, match="shard-000001"):
        list(make_loader(StreamingDataset(mix, **KW), num_workers=0))
    ds = StreamingDataset(mix, on_error="skip", batch_size=6, **KW)
    batches = list(make_loader(ds, num_workers=2))
    assert sum(len(b[2]) for b in batches) == 42 and len(batches) == len(ds)
    assert ds.skipped > 0
    assert [(b["source"], b["url"].endswith("shard-000001.tar")) for b in ds.bad_shards] == \
        [(1, True)]


def test_errors_name_what_is_wrong():
    with pytest.raises(ValueError, match="at most one of weight, repeat and choose"):
        Source("a", weight=1, repeat=2)
    with pytest.raises(ValueError, match="repeat must be a positive number"):
        Source("a", repeat=0)
    with pytest.raises(ValueError, match="choose must be an integer"):
        Source("a", choose=2.5)
    with pytest.raises(TypeError, match="not both"):
        StreamingDataset([Source("a"), "b"])
    with pytest.raises(ValueError, match="epoch_size"):
        StreamingDataset("a", epoch_size=0)
    with pytest.raises(ValueError, match="mix must be one of"):
        StreamingDataset([Source("a")], mix="zip")
    with pytest.raises(ValueError, match="weight to every source or to none"):
        epoch_shares([10, 10], [(1.0, None, None), (None, None, None)])
    with pytest.raises(ValueError, match="rounds to 0"):
        epoch_shares([10, 10_000], [(1.0, None, None), (10_000.0, None, None)],
                     epoch_size=100)


# --------------------------------------------------------------------------- the pure plan


def test_one_dataset_read_whole_keeps_the_plan_it_always_had():
    sizes = np.array([7, 0, 12, 5, 9])
    whole = Layout.of_sources([sizes], [33], seed=4, epoch=2, shuffle=True)
    for w in range(3):
        a = epoch_plan(sizes, seed=4, epoch=2, rank=1, world_size=2, worker=w, num_workers=3,
                       block_size=4, shuffle_buffer=5)
        b = epoch_plan(whole, seed=4, epoch=2, rank=1, world_size=2, worker=w, num_workers=3,
                       block_size=4, shuffle_buffer=5)
        assert a.spans == b.spans and list(a.order) == list(b.order)


@pytest.mark.parametrize("mix", ["random", "stratified", "per_source"])
def test_plans_of_a_mixture_read_each_share_once_over_ranks_and_workers(mix):
    rng = np.random.default_rng(1)
    srcs = [rng.integers(1, 30, size=n) for n in (2, 6, 4)]
    shares = epoch_shares([int(s.sum()) for s in srcs], [(None, 3.0, None), (None, 0.3, None),
                                                         (None, None, None)],
                          unit=4 if mix == "per_source" else 1)
    for epoch in range(3):
        layout = Layout.of_sources(srcs, shares, seed=2, epoch=epoch, shuffle=True, mix=mix,
                                   unit=4)
        read = Counter()
        for rank, worker in itertools.product(range(2), range(3)):
            p = epoch_plan(layout, seed=2, epoch=epoch, rank=rank, world_size=2, worker=worker,
                           num_workers=3, block_size=3, shuffle_buffer=7, batch_size=4)
            assert sorted(p.order.tolist()) == list(range(p.num_samples))
            for sp in p.spans:
                read.update((sp.shard, i) for i in range(sp.start, sp.stop))
        by_source = Counter()
        for (shard, _), n in read.items():
            by_source[int(layout.source_of(np.array([shard]))[0])] += n
        total = layout.total - layout.total % (2 * (4 if mix == "per_source" else 1))
        assert sum(by_source.values()) == total
        assert by_source[1] <= shares[1] and max(read.values()) <= 4


def test_a_mixture_of_three_billion_samples_plans_one_worker():
    # (its time and memory are measured by tools/scale.py; this checks it works at that size)
    from shardkit.bench.scale import synthetic_manifest

    sizes = [synthetic_manifest(100_000, 1_000_000_000, seed=s).shard_sizes() for s in range(3)]
    shares = epoch_shares([10**9] * 3, [(0.5, None, None), (0.3, None, None),
                                        (0.2, None, None)], epoch_size=10**9)
    layout = Layout.of_sources(sizes, shares, seed=0, epoch=7, shuffle=True)
    plan = epoch_plan(layout, seed=0, epoch=7, rank=1000, world_size=1024, worker=5,
                      num_workers=8, block_size=64, shuffle_buffer=1000, batch_size=256)
    assert plan.num_samples == 10**9 // 1024 // 8 // 256 * 256 or plan.num_samples > 100_000
    starts = np.cumsum([0] + [len(s) for s in sizes])
    sources = np.searchsorted(starts, [s.shard for s in plan.spans], "right") - 1
    assert set(sources.tolist()) == {0, 1, 2}  # the worker reads blocks of every source


def test_one_source_on_s3_and_one_local(sources, tmp_path):
    remote = pytest.importorskip("_helpers_remote")
    from servers import MotoS3

    with MotoS3() as s3:
        s3.make_bucket(remote.BUCKET)
        url = remote.upload(s3, remote.Data(sources["mid"], sources["mid"], {}), "mid")
        mix = [Source(url, weight=1, storage_options=s3.storage_options()),
               Source(str(sources["big"]), weight=1)]
        kw = dict(KW, epoch_size=60, batch_size=6, cache_dir=str(tmp_path / "cache"))
        for workers in (0, 2):
            ds = StreamingDataset(mix, **kw)
            items = _items(list(make_loader(ds, num_workers=workers)), batched=True)
            assert Counter(s for s, _ in items) == {0: 30, 1: 30}
            assert {k for s, k in items if s == 0} == set(all_keys(sources["mid"]))
        # the same samples as the same sources read locally
        local = [Source(str(sources["mid"]), weight=1), Source(str(sources["big"]), weight=1)]
        want = _items(list(make_loader(StreamingDataset(local, **kw), num_workers=2)),
                      batched=True)
        assert items == want


def test_a_webdataset_pipeline_reads_a_mixture_with_each_samples_source(sources):
    wds = pytest.importorskip("webdataset")
    src = shardkit.wds_source(_srcs(sources, ["tiny", "big"], big={"choose": 20}), seed=1)
    pipeline = wds.DataPipeline(src, wds.decode("pil"), wds.to_tuple("__source__", "__key__"))
    got = Counter(s for s, _ in pipeline)
    assert got == {0: 12, 1: 20}
    with pytest.raises(TypeError, match="with_source"):
        shardkit.wds_source(_srcs(sources, ["tiny", "big"]), with_source=True)


@pytest.mark.parametrize("mix", ["random", "stratified", "per_source"])
def test_more_workers_than_batches(mix):
    srcs = [np.array([5, 3]), np.array([7])]
    shares = epoch_shares([8, 7], [(None, None, None)] * 2, unit=4 if mix == "per_source" else 1)
    layout = Layout.of_sources(srcs, shares, seed=0, epoch=0, shuffle=True, mix=mix, unit=4)
    plans = [epoch_plan(layout, seed=0, epoch=0, rank=0, world_size=1, worker=w,
                        num_workers=8, block_size=2, batch_size=4) for w in range(8)]
    assert sum(p.num_samples for p in plans) == layout.total
    assert [p.num_samples for p in plans][-1] == 0


def test_a_source_is_anything_one_dataset_takes(sources):
    from shardkit.shardformat import MANIFEST_PATH

    manifest = shardkit.Manifest.load(sources["tiny"])
    mix = [Source(manifest, weight=1),                               # a Manifest object
           Source(str(sources["mid"] / MANIFEST_PATH), weight=1),     # a manifest's path
           Source(sources["big"], weight=2)]                          # a folder (a Path)
    ds = StreamingDataset(mix, epoch_size=40, **KW)
    items = _items(list(make_loader(ds, num_workers=0)), batched=False)
    assert Counter(s for s, _ in items) == {0: 10, 1: 10, 2: 20}
    assert ds.manifests[0] is manifest
    with pytest.raises(AttributeError, match="ds.manifests"):
        ds.manifest  # noqa: B018


def test_an_epoch_across_two_passes_holds_no_sample_twice():
    # a share of at most the source's size: never twice in an epoch; above: floor or ceil times;
    # and every pass of the walk is all of the source, once
    rng = np.random.default_rng(3)
    from shardkit.layout import source_segments

    for trial in range(150):
        sizes = rng.integers(0, 15, size=int(rng.integers(1, 12)))
        n = int(sizes.sum())
        if n == 0:
            continue
        k = int(rng.integers(1, 2 * n + 2))
        walk = []
        for epoch in range(6):
            shard, start, size = source_segments(sizes, k, epoch=epoch, seed=trial, source=1,
                                                 shuffle=True)
            items = [(int(a), int(b) + i) for a, b, c in zip(shard, start, size)
                     for i in range(c)]
            counts = Counter(items)
            every = [counts.get((s, i), 0) for s in range(len(sizes)) for i in range(sizes[s])]
            assert len(items) == k and k // n <= min(every) and max(every) <= -(-k // n)
            walk += items
        for p in range(len(walk) // n):
            assert len(set(walk[p * n:(p + 1) * n])) == n


@pytest.mark.parametrize("mix", ["random", "stratified", "per_source"])
def test_a_small_share_does_not_make_a_worker_hold_many_samples(mix):
    srcs = [np.full(4, 300), np.full(200, 300)]
    layout = Layout.of_sources(srcs, [512, 51_200], seed=0, epoch=0, shuffle=True, mix=mix,
                               unit=256)
    plan = epoch_plan(layout, seed=0, epoch=0, rank=0, world_size=1, worker=0, num_workers=1,
                      block_size=64, shuffle_buffer=1000, batch_size=256)
    read = np.maximum.accumulate(plan.order) + 1  # inputs read to emit each sample
    held = read - np.arange(1, plan.num_samples + 1)
    assert held.max() < 1000 + 2 * 64 + 256


def test_a_mixture_in_memory_reads_from_both_sources(sources):
    mix = _srcs(sources, ["tiny", "mid"], tiny={"repeat": 2})
    ds = StreamingDataset(mix, in_memory=True, **KW)
    items = _items(list(make_loader(ds, num_workers=2)), batched=False)
    assert Counter(s for s, _ in items) == {0: 24, 1: 30}
    assert ds.reader.memory is not None and len(ds.reader.memory) == ds.reader.num_shards()
