"""Epoch and checkpoint state (shardkit/state.py): exact resume of an epoch from ``state_dict()``,
with and without workers and batches, in later epochs and across ranks, from a byte offset; and
through torchdata's StatefulDataLoader. Elastic resume over processes is in test_distributed.py."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import pytest
import torch

from shardkit import RandomResizedCrop, StreamingDataset, make_loader
from shardkit.storage import LocalStore

from _helpers_read import NUM, datasets, folder, keys, keys_of, offsets_of, same_items  # noqa: F401 - fixtures, used by name

# --------------------------------------------------------------------------- 5: exact resume

_FULL: dict = {}


def _full(src, num_workers, epoch=0, **kw):
    key = (str(src), num_workers, epoch, tuple(sorted((k, repr(v)) for k, v in kw.items())))
    if key not in _FULL:
        ds = StreamingDataset(src, **kw)
        ds.set_epoch(epoch)
        _FULL[key] = list(make_loader(ds, num_workers=num_workers))
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
    if k == len(full):  # a state taken once the epoch is consumed starts the next one
        assert state["epoch"] == 1 and same_items(rest, _full(src, num_workers, epoch=1, **kw))
        return
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

    whole = StatefulDataLoader(StreamingDataset(source, **kw), batch_size=None,
                               num_workers=num_workers)
    full, following = list(whole), list(whole)  # each iteration starts the next epoch
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
    assert keys_of(following, batched=batched) != keys_of(full, batched=batched)
    if k == len(full) and num_workers == 0:  # the dataset's own state of a consumed epoch:
        assert keys_of(rest, batched=batched) == keys_of(following, batched=batched)  # the next
        return
    if k == len(full):  # the workers' own states: nothing is left of the epoch (a worker cannot
        assert rest == []  # know the others are done), and the next iteration is the next epoch
        after = keys_of(list(resumed), batched=batched)
        assert sorted(after) == sorted(keys_of(following, batched=batched))
        return
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


# --------------------------------------------------------------------------- epochs by themselves


def _epochs(loader, n: int) -> list[list[str]]:
    """Keys of ``n`` iterations of ``loader``, never calling set_epoch (as Lightning does)."""
    return [keys_of(list(loader), batched=loader.dataset.batch_size is not None) for _ in range(n)]


@pytest.mark.parametrize("num_workers,persistent", [(0, False), (2, True), (2, False)])
def test_each_iteration_starts_the_next_epoch_without_set_epoch(datasets, keys, num_workers,
                                                                 persistent):
    kw = dict(with_keys=True, decode="raw", batch_size=4, seed=5)
    ds = StreamingDataset(datasets["nine"], **kw)
    loader = make_loader(ds, num_workers=num_workers, persistent_workers=persistent)
    got = _epochs(loader, 3)
    for e, epoch_keys in enumerate(got):
        assert sorted(epoch_keys) == sorted(keys)  # every sample once per epoch
        ref = StreamingDataset(datasets["nine"], **kw)
        ref.set_epoch(e)  # what set_epoch(e) gives: the same order
        assert epoch_keys == keys_of(list(make_loader(ref, num_workers=num_workers)), batched=True)
    assert len({tuple(k) for k in got}) == 3  # a different order each epoch
    ds.set_epoch(1)  # set_epoch still wins
    assert keys_of(list(loader), batched=True) == got[1]
    assert keys_of(list(loader), batched=True) == got[2]  # and the epochs go on from there


def test_a_plain_dataloader_advances_epochs_too_but_cannot_report_progress(datasets, keys):
    ds = StreamingDataset(datasets["nine"], with_keys=True, decode="raw", seed=5)
    for persistent in (True, False):
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2,
                                             persistent_workers=persistent)
        ds.set_epoch(0)
        first, second = (keys_of(list(loader), batched=False) for _ in range(2))
        assert sorted(first) == sorted(second) == sorted(keys) and first != second
        ref = StreamingDataset(datasets["nine"], with_keys=True, decode="raw", seed=5)
        ref.set_epoch(1)
        assert second == keys_of(list(torch.utils.data.DataLoader(ref, batch_size=None,
                                                                   num_workers=2)),
                                 batched=False)
        with pytest.raises(ValueError, match="plain DataLoader.*make_loader"):
            ds.state_dict()  # never a state of zeros


@runtime_checkable
class _Stateful(Protocol):
    """What PyTorch Lightning checks before it saves and restores a dataloader's state."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state_dict: dict) -> None: ...


def _fit(make_loader_, epochs: int, stop_at: int | None = None, checkpoint: dict | None = None):
    """A Lightning-style fit loop: ``iter(loader)`` every epoch, never ``set_epoch``; it can stop
    after ``stop_at`` steps with a checkpoint (JSON, as a file would hold it), or resume one."""
    loader = make_loader_()
    assert isinstance(loader, _Stateful)
    start_epoch, skip = 0, 0
    if checkpoint is not None:
        loader.load_state_dict(json.loads(checkpoint["loader"]))
        start_epoch, skip = checkpoint["epoch"], checkpoint["batch"]
        if skip == len(loader):  # that epoch was over: the loop goes on with the next
            start_epoch, skip = start_epoch + 1, 0
    seen, step = [], 0
    for epoch in range(start_epoch, epochs):
        for batch, (_, _, batch_keys) in enumerate(loader, start=skip if epoch == start_epoch else 0):
            seen.append((epoch, batch, tuple(batch_keys)))
            step += 1
            if step == stop_at:
                return seen, {"epoch": epoch, "batch": batch + 1,
                              "loader": json.dumps(loader.state_dict())}
    return seen, None


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("stop_at", [7, 17, 34])  # mid-epoch, mid-epoch 2, at an epoch's end
def test_a_lightning_style_loop_resumes_mid_epoch_exactly(datasets, num_workers, stop_at):
    def make():
        ds = StreamingDataset(datasets["nine"], with_keys=True, batch_size=4, seed=2,
                              crop=RandomResizedCrop(8))
        return make_loader(ds, num_workers=num_workers)

    whole, _ = _fit(make, epochs=3)
    assert len(whole) == 3 * 17 and len({k for *_, k in whole}) == 3 * 17
    head, checkpoint = _fit(make, epochs=3, stop_at=stop_at)
    tail, _ = _fit(make, epochs=3, checkpoint=checkpoint)
    assert head + tail == whole  # the same batches, in the same epochs and order


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_an_abandoned_iteration_keeps_a_plain_dataloaders_workers_together(datasets, keys,
                                                                            context):
    ds = StreamingDataset(datasets["nine"], with_keys=True, decode="raw", seed=5)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=4,
                                         multiprocessing_context=context)
    next(iter(loader))  # a peek: some workers may never produce anything in that iteration
    epochs = [keys_of(list(loader), batched=False) for _ in range(2)]
    for got in epochs:
        assert sorted(got) == sorted(keys)  # every worker on the same epoch: exactly once
    assert epochs[0] != epochs[1]


def test_a_state_near_the_end_of_an_epoch_resumes_exactly_under_stateful_dataloader(datasets):
    pytest.importorskip("torchdata.stateful_dataloader")
    kw = dict(with_keys=True, decode="raw", block_size=4, shuffle_buffer=6)
    for k in (NUM - 2, NUM - 1):  # one worker is done, the other is not
        _stateful_case(datasets["nine"], 2, k, **kw)


@pytest.mark.parametrize("num_workers,rank,world_size", [(0, 0, 1), (2, 0, 1), (0, 1, 2),
                                                         (2, 1, 2)])
def test_a_state_from_before_shuffle_buffers_grew_resumes_exactly(datasets, monkeypatch,
                                                                  num_workers, rank, world_size):
    """States saved before ``shuffle_start`` existed hold positions of orders whose buffers filled
    whole; they lack the setting. The plans of their epoch are made with whole buffers, so the
    rest of the epoch is exactly what the old order had left; the next epoch uses the default."""
    from shardkit import plan as planlib

    kw = dict(RESUME_KW, shuffle_buffer=20, rank=rank, world_size=world_size)
    monkeypatch.setattr(planlib, "SHUFFLE_START", 1)  # the default start = the whole buffer
    full_old = list(make_loader(StreamingDataset(datasets["many"], **kw), num_workers=num_workers))
    old = StreamingDataset(datasets["many"], **kw)
    it = iter(make_loader(old, num_workers=num_workers))
    head = [next(it) for _ in range(11)]
    state = old.state_dict()
    del it
    monkeypatch.undo()
    assert state.pop("shuffle_start") == 20  # what such a state looks like
    resumed = StreamingDataset(datasets["many"], **kw)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    loader = make_loader(resumed, num_workers=num_workers)
    rest = list(loader)
    assert same_items(head, full_old[:11]) and same_items(rest, full_old[11:])
    taken = resumed.state_dict()
    assert taken["epoch"] == 1  # the epoch was consumed: the next one starts afresh
    new = StreamingDataset(datasets["many"], **kw)
    new.set_epoch(1)
    assert same_items(list(loader), list(make_loader(new, num_workers=num_workers)))
