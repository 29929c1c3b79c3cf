"""Epoch and checkpoint state (shardkit/state.py): exact resume of an epoch from ``state_dict()``,
with and without workers and batches, in later epochs and across ranks, from a byte offset; and
through torchdata's StatefulDataLoader. Elastic resume over processes is in test_distributed.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from shardkit import RandomResizedCrop, StreamingDataset, make_loader
from shardkit.storage import LocalStore

from _helpers_read import (keys_of)
from _helpers_read import NUM, offsets_of, same_items
from _helpers_read import datasets, folder, keys  # noqa: F401 - fixtures, used by name


# --------------------------------------------------------------------------- 5: exact resume

_FULL: dict = {}


def _full(src, num_workers, **kw):
    key = (str(src), num_workers, tuple(sorted((k, repr(v)) for k, v in kw.items())))
    if key not in _FULL:
        _FULL[key] = list(make_loader(StreamingDataset(src, **kw), num_workers=num_workers))
    return _FULL[key]


def _resume_case(src, num_workers, k, **kw):
    full = _full(src, num_workers, **kw)
    ds = StreamingDataset(src, **kw)
    it = iter(make_loader(ds, num_workers=num_workers))
    head = [next(it) for _ in range(k)]
    state = ds.state_dict()
    del it
    text = json.dumps(state)  # json-serialisable, holds no sample data
    assert len(text) < 400, text
    resumed = StreamingDataset(src, **kw)
    resumed.load_state_dict(json.loads(text))
    rest = list(make_loader(resumed, num_workers=num_workers))
    assert same_items(head, full[:k])
    assert len(head) + len(rest) == len(full)
    assert same_items(rest, full[k:])


RESUME_KW = dict(with_keys=True, crop=RandomResizedCrop(12), block_size=4, shuffle_buffer=6)


@pytest.mark.parametrize("num_workers,ks", [(0, (0, 1, 7, 65)), (1, (0, 5, 65)),
                                            (2, (0, 3, 10, 65)),
                                            pytest.param(3, (1, 4, 20, 65), marks=pytest.mark.slow)])
def test_resume_yields_exactly_the_rest_of_the_epoch(datasets, num_workers, ks):
    for k in ks:
        _resume_case(datasets["nine"], num_workers, k, **RESUME_KW)


@pytest.mark.parametrize("num_workers,ks", [(0, (0, 2, 9)), (2, (0, 3, 9)),
                                            pytest.param(3, (1, 5, 9), marks=pytest.mark.slow)])
def test_resume_with_batches(datasets, num_workers, ks):
    kw = dict(RESUME_KW, batch_size=7)
    for k in ks:
        _resume_case(datasets["many"], num_workers, k, **kw)


def test_resume_in_a_later_epoch_and_across_ranks(datasets):
    src = datasets["many"]
    kw = dict(RESUME_KW, rank=1, world_size=2, batch_size=3)
    full_ds = StreamingDataset(src, **kw)
    full_ds.set_epoch(2)
    full = list(make_loader(full_ds, num_workers=2))
    ds = StreamingDataset(src, **kw)
    ds.set_epoch(2)
    it = iter(make_loader(ds, num_workers=2))
    head = [next(it) for _ in range(5)]
    state = ds.state_dict()
    assert state["epoch"] == 2
    resumed = StreamingDataset(src, **kw)
    resumed.load_state_dict(state)
    rest = list(make_loader(resumed, num_workers=2))
    assert same_items(head + rest, full)


def test_state_after_set_epoch_starts_the_new_epoch(datasets):
    src = datasets["nine"]
    ds = StreamingDataset(src, decode="raw", with_keys=True)
    loader = make_loader(ds, num_workers=2)
    list(loader)
    ds.set_epoch(1)
    state = ds.state_dict()  # nothing of epoch 1 consumed yet
    resumed = StreamingDataset(src, decode="raw", with_keys=True)
    resumed.load_state_dict(state)
    ref = StreamingDataset(src, decode="raw", with_keys=True)
    ref.set_epoch(1)
    assert (keys_of(list(make_loader(resumed, num_workers=2)), batched=False)
            == keys_of(list(make_loader(ref, num_workers=2)), batched=False))


def _spy_open_range(monkeypatch, log_path: Path):
    real = LocalStore.open_range

    def spy(self, name, start, stop):
        with open(log_path, "a") as f:  # a file: worker processes write here too
            f.write(f"{name} {start} {os.getpid()}\n")
        return real(self, name, start, stop)

    monkeypatch.setattr(LocalStore, "open_range", spy)

    def reads():
        if not log_path.exists():
            return []
        return [(n, int(s)) for n, s, _ in (line.split() for line in log_path.read_text().splitlines())]
    return reads


@pytest.mark.parametrize("num_workers,k,first_samples", [(0, 10, {10}), (2, 10, {5, 33 + 5})])
def test_resume_reads_from_a_byte_offset(datasets, tmp_path, monkeypatch, num_workers, k,
                                         first_samples):
    src = datasets["one"]  # one shard, no shuffle: the plan is easy to state
    kw = dict(decode="raw", with_keys=True, shuffle=False)
    ds = StreamingDataset(src, **kw)
    it = iter(make_loader(ds, num_workers=num_workers))
    head = [next(it) for _ in range(k)]
    state = ds.state_dict()
    del it
    reads = _spy_open_range(monkeypatch, tmp_path / "reads.log")
    resumed = StreamingDataset(src, **kw)
    resumed.load_state_dict(state)
    rest = list(make_loader(resumed, num_workers=num_workers))
    assert len(head) + len(rest) == NUM
    offsets = offsets_of(src)
    starts = {start for _, start in reads()}
    assert starts == {int(offsets[i]) for i in first_samples}
    assert all(s > 0 for s in starts)


# --------------------------------------------------------------------------- 5: StatefulDataLoader


def _stateful_case(source, num_workers, k, **kw):
    from torchdata.stateful_dataloader import StatefulDataLoader

    full = list(StatefulDataLoader(StreamingDataset(source, **kw), batch_size=None,
                                   num_workers=num_workers))
    loader = StatefulDataLoader(StreamingDataset(source, **kw), batch_size=None,
                                num_workers=num_workers)
    it = iter(loader)
    head = [next(it) for _ in range(k)]
    state = loader.state_dict()
    del it
    resumed = StatefulDataLoader(StreamingDataset(source, **kw), batch_size=None,
                                 num_workers=num_workers)
    resumed.load_state_dict(state)
    rest = list(resumed)
    batched = kw.get("batch_size") is not None
    assert keys_of(head, batched=batched) == keys_of(full[:k], batched=batched)
    assert keys_of(rest, batched=batched) == keys_of(full[k:], batched=batched), (num_workers, k)
    for a, b in zip(rest, full[k:]):
        assert torch.equal(a[0], b[0]) if isinstance(a[0], torch.Tensor) else a[0] == b[0]


@pytest.mark.parametrize("num_workers,ks", [(0, (0, 7, NUM)), (1, (4, NUM)), (2, (0, 5, 30)),
                                            pytest.param(3, (1, 8, NUM), marks=pytest.mark.slow)])
def test_stateful_dataloader_resume(datasets, num_workers, ks):
    pytest.importorskip("torchdata.stateful_dataloader")
    kw = dict(with_keys=True, crop=RandomResizedCrop(12), block_size=4, shuffle_buffer=6)
    for k in ks:
        _stateful_case(datasets["nine"], num_workers, k, **kw)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stateful_dataloader_resume_with_batches(datasets, num_workers):
    pytest.importorskip("torchdata.stateful_dataloader")
    kw = dict(with_keys=True, decode="raw", batch_size=4, block_size=4, shuffle_buffer=6)
    for k in (3, 7):
        _stateful_case(datasets["nine"], num_workers, k, **kw)
