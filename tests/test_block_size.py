"""``block_size="shard"``: whole shards, one read each (for HDDs); exactness unchanged."""

from __future__ import annotations

import pytest

from shardkit import StreamingDataset

from _helpers_read import all_keys, packed_raw


def _spans_read(monkeypatch) -> list:
    """The spans every iteration of a StreamingDataset reads, from now on."""
    spans_read: list = []
    real = StreamingDataset._read

    def spy(self, spans, start, *args, **kw):
        spans_read.extend(spans or ())
        return real(self, spans, start, *args, **kw)

    monkeypatch.setattr(StreamingDataset, "_read", spy)
    return spans_read


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    # 5 classes x 9 = 45 samples in shards of at most 13: 13, 13, 13, 6
    return packed_raw(tmp_path_factory, classes=5, per_class=9, max_samples=13)


def test_whole_shard_blocks_read_each_shard_in_one_span(raw, monkeypatch):
    spans_read = _spans_read(monkeypatch)
    ds = StreamingDataset(raw, decode="raw", with_keys=True, block_size="shard", seed=5)
    keys = [key for *_, key in ds]
    assert sorted(keys) == sorted(all_keys(raw))
    sizes = [int(n) for n in ds.manifest.shard_sizes()]
    assert sorted(sizes) == [6, 13, 13, 13]
    # one span per shard, each from its first sample to its last
    assert sorted((s.shard, s.start, s.stop) for s in spans_read) == \
        [(i, 0, n) for i, n in enumerate(sizes)]


def test_whole_shard_blocks_split_exactly_across_ranks(raw):
    want = sorted(all_keys(raw))
    got = []
    for rank in range(3):
        ds = StreamingDataset(raw, decode="raw", with_keys=True, block_size="shard", seed=5,
                              rank=rank, world_size=3)
        got += [key for *_, key in ds]
    assert sorted(got) == want  # 45 samples, 15 per rank, each once


def test_default_blocks_are_smaller_than_a_shard_read(raw, monkeypatch):
    """The control: with block_size=4 the same shards are read in several spans each."""
    spans_read = _spans_read(monkeypatch)
    list(StreamingDataset(raw, decode="raw", block_size=4, seed=5))
    assert len(spans_read) > 4


@pytest.mark.parametrize("bad", ["shards", "whole", ""])
def test_other_strings_are_refused(raw, bad):
    with pytest.raises(ValueError, match="block_size must be an integer >= 1, None or 'shard'"):
        StreamingDataset(raw, block_size=bad)
