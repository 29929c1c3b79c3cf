"""``shardkit.wds_source``: a real webdataset pipeline on shardkit's plan (ranks x workers,
equal batches, exact resume), with the pipeline's own decode and batching stages."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import shardkit
from shardkit import index_shards, make_loader

wds = pytest.importorskip("webdataset")

from test_indexer import LOADER_TIMEOUT, write_wds  # noqa: E402

BATCH = 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wds-source") / "shards"
    want = write_wds(folder, n=40, per_shard=12)
    index_shards(folder, progress=False)
    return folder, want


def loader_of(pipe, num_workers: int, **kw):
    if num_workers:
        kw["timeout"] = LOADER_TIMEOUT
    return make_loader(pipe, num_workers=num_workers, **kw)


def pipeline(folder, **kw):
    kw.setdefault("batch_size", BATCH)
    source = shardkit.wds_source(folder, **kw)
    return wds.DataPipeline(source, wds.decode("torchrgb"),
                            wds.to_tuple("jpg", "cls", "txt", "__key__"),
                            wds.batched(BATCH, partial=True))


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b[3]]


def test_source_yields_webdataset_sample_dicts(shards):
    folder, want = shards
    samples = list(shardkit.wds_source(folder, seed=1))
    assert sorted(s["__key__"] for s in samples) == sorted(want)
    s = samples[0]
    assert s["__url__"].endswith(".tar") and isinstance(s["jpg"], bytes)
    assert set(s) == {"__key__", "__url__", "jpg", "cls", "txt", "json", "seg.png"}
    assert s["jpg"] == want[s["__key__"]]["image"]
    with pytest.raises(TypeError, match="does not decode"):
        shardkit.wds_source(folder, crop=shardkit.CenterCrop(8))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_pipeline_reads_every_sample_once_over_ranks_and_workers(shards, num_workers):
    folder, want = shards
    per_rank = []
    for rank in range(2):
        loader = loader_of(pipeline(folder, rank=rank, world_size=2, seed=5), num_workers,
                           persistent_workers=False)
        batches = list(loader)
        for images, labels, texts, keys in batches:
            assert images.dtype == torch.float32 and images.shape[1:] == (3, 16, 24)
            assert labels.tolist() == [want[k]["label"] for k in keys]
            assert list(texts) == [want[k]["txt"] for k in keys]
        per_rank.append(batches)
    assert [len(b) for b in per_rank] == [3, 3]  # 20 samples each: 8 + 8 + 4
    keys = keys_of(per_rank[0]) + keys_of(per_rank[1])
    assert Counter(keys) == Counter(set(want))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_pipeline_resumes_exactly_mid_epoch(shards, num_workers):
    folder, want = shards
    loader = loader_of(pipeline(folder, seed=2), num_workers)
    assert Counter(keys_of(loader)) == Counter(set(want))  # epoch 0; the resume is in epoch 1
    it = iter(loader)
    first = [next(it) for _ in range(3)]
    state = loader.state_dict()
    del it
    again = loader_of(pipeline(folder, seed=2), num_workers)
    again.load_state_dict(state)
    rest = list(again)
    keys = keys_of(first) + keys_of(rest)
    assert Counter(keys) == Counter(set(want)), "lost or repeated across the resume"
    assert state["epoch"] == 1
