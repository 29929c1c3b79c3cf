"""Batch memory recycling (shardkit/recycle.py): a worker writes a batch into an earlier batch's
shared memory only once the main process is done with it. Data is generated in a module fixture;
every test compares the batches with those of a loader that never recycles."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from shardkit import RandomResizedCrop, StreamingDataset, make_loader
from shardkit.recycle import BatchRing

from _helpers_read import image_folder, pack

NUM, BATCH = 96, 4


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    src = image_folder(tmp_path_factory.mktemp("src"), classes=4, per_class=NUM // 4)
    dest = tmp_path_factory.mktemp("ds")
    pack(src, dest, mode="raw", max_samples=16)
    return dest


def _loader(source, recycle):
    ds = StreamingDataset(source, batch_size=BATCH, crop=RandomResizedCrop(16), seed=3)
    # not pinned: these tests look at the shared memory the workers send (pinned batches are
    # copies the pin thread makes)
    return make_loader(ds, num_workers=2, recycle_batches=recycle, prefetch_factor=2,
                       pin_memory=False)


def _shm_file(images: torch.Tensor) -> str:
    """The shared-memory file a batch received from a worker lives in."""
    fd, _ = images.untyped_storage()._share_fd_cpu_()
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.fixture(scope="module")
def reference(source):
    """Two epochs of batches from a loader that allocates every batch afresh."""
    loader = _loader(source, False)
    return [[(images.clone(), labels.clone()) for images, labels in loader] for _ in range(2)]


def _same(got, want):
    assert len(got) == len(want) == NUM // BATCH
    for (images, labels), (ref_images, ref_labels) in zip(got, want):
        assert torch.equal(images, ref_images) and torch.equal(labels, ref_labels)


def test_released_batches_are_recycled_and_stay_right(source, reference):
    loader = _loader(source, True)
    files = []
    for epoch in range(2):
        got = []
        for images, labels in loader:
            files.append(_shm_file(images))
            got.append((images.clone(), labels.clone()))
            del images, labels  # released: its memory may come back
        _same(got, reference[epoch])
    # 2 workers × (prefetch 2 + 1) buffers kept, and a few fresh ones when one was still in use;
    # without recycling every batch has its own
    assert len(set(files)) <= 2 * 4 < len(files) == 2 * NUM // BATCH


def _slow_workers(monkeypatch) -> None:
    """Workers far slower than the main process, as in a loader-bound training run (forked
    workers inherit the patch)."""
    import time

    from shardkit.assembly import SampleDecoder

    real = SampleDecoder.__call__

    def slow(self, sample, out=None):
        time.sleep(0.02)
        return real(self, sample, out)

    monkeypatch.setattr(SampleDecoder, "__call__", slow)


def test_a_fast_consumer_needs_few_buffers_even_with_a_deep_prefetch(source, reference,
                                                                      monkeypatch):
    # The main process counts the batches it hands out in shared memory: a worker reuses a
    # released buffer as soon as the batch reached the user, not prefetch + 1 batches later
    # (which would take 2 workers x 5 buffers here).
    _slow_workers(monkeypatch)
    ds = StreamingDataset(source, batch_size=BATCH, crop=RandomResizedCrop(16), seed=3)
    loader = make_loader(ds, num_workers=2, recycle_batches=True, prefetch_factor=4,
                         pin_memory=False)
    files, got = [], []
    for images, labels in loader:
        files.append(_shm_file(images))
        got.append((images.clone(), labels.clone()))
        del images, labels
    _same(got, reference[0])
    assert len(set(files)) < 2 * (4 + 1)


def test_counts_of_an_earlier_epoch_never_reach_a_later_one(source, reference):
    # Persistent workers keep the counts array they were started with. An epoch that recycles
    # nothing in the main process must not leave them the last epoch's counts: batches that
    # wait in the queue (the user is slow to start) would be taken for handed out.
    import time

    ds = StreamingDataset(source, batch_size=BATCH, crop=RandomResizedCrop(16), seed=3)
    # prefetch 4: batches j - 3 .. j - 1 can be sent and not yet received when batch j is made
    loader = make_loader(ds, num_workers=2, recycle_batches=True, prefetch_factor=4,
                         pin_memory=False)
    first = [(images.clone(), labels.clone()) for images, labels in loader]
    _same(first, reference[0])
    loader.recycle_batches = False
    held = []
    for images, labels in loader:  # a slow user who keeps every batch: the queue stays full
        held.append((images, labels))
        time.sleep(0.03)
    _same(held, reference[1])


def test_two_iterations_at_once_never_read_each_others_counts(source, reference):
    # Without persistent workers every iteration starts workers of its own: one that ran to its
    # end must not make the other's workers take their queued batches for handed out.
    import time

    ds = StreamingDataset(source, batch_size=BATCH, crop=RandomResizedCrop(16), seed=3)
    loader = make_loader(ds, num_workers=2, recycle_batches=True, prefetch_factor=4,
                         pin_memory=False, persistent_workers=False)
    slow, fast = iter(loader), iter(loader)
    held, copies = [next(slow)], []
    for _ in range(10):  # one iteration ahead of the other
        images, labels = next(fast)
        copies.append((images.clone(), labels.clone()))
    for images, labels in slow:  # the one behind keeps every batch; both go on in turn
        held.append((images, labels))
        time.sleep(0.005)
        images, labels = next(fast, (None, None))
        if images is not None:
            copies.append((images.clone(), labels.clone()))
    _same(held, reference[0])
    _same(copies, reference[1])  # the second iteration of the loader is the next epoch


def test_batches_the_user_holds_are_never_overwritten(source, reference):
    loader = _loader(source, True)
    held = list(loader)  # every batch still referenced when the next ones are made
    _same(held, reference[0])
    assert len({_shm_file(images) for images, _ in held}) == len(held)


def test_a_mix_of_held_and_released_batches(source, reference):
    loader = _loader(source, True)
    kept, copies = [], []
    for k, (images, labels) in enumerate(loader):
        copies.append((images.clone(), labels.clone()))
        if k % 3 == 0:
            kept.append((k, images))  # a view is enough to keep the memory in use
        del images, labels
    _same(copies, reference[0])
    for k, images in kept:
        assert torch.equal(images, reference[0][k][0]), f"held batch {k} was overwritten"


def test_when_batches_are_recycled_by_default(source, monkeypatch):
    ds = StreamingDataset(source, batch_size=BATCH, crop=RandomResizedCrop(16))
    # not pinned: the user holds the very batches the workers made
    assert make_loader(ds, num_workers=2, pin_memory=False)._recycles() is False
    assert make_loader(ds, num_workers=2)._recycles() is torch.cuda.is_available()
    assert make_loader(ds, num_workers=2, recycle_batches=True)._recycles() is True
    assert make_loader(ds, num_workers=0, recycle_batches=True)._recycles() is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    pinned = make_loader(ds, num_workers=2)
    assert pinned.pin_memory and pinned._recycles() is True  # the pin thread copies each batch
    assert make_loader(ds, num_workers=2, recycle_batches=False)._recycles() is False


def test_the_workers_setting_does_not_outlive_their_loader(source):
    loader = _loader(source, True)
    it = iter(loader)
    next(it)
    assert loader.dataset._state.recycle is None  # a plain DataLoader over it later recycles nothing
    plain = torch.utils.data.DataLoader(loader.dataset, batch_size=None, num_workers=2)
    assert sum(len(labels) for _, labels in plain) == NUM


def test_ring_reuses_only_old_released_buffers_of_full_batches():
    ring = BatchRing(prefetch=1, consumer=os.getppid())  # nothing there maps our buffers
    ring.begin(limit=7)
    p0 = ring.take(1000).data_ptr()  # batch 0, released at once
    b1 = ring.take(1000)  # batch 1, held
    b2 = ring.take(1000)  # batch 2: batch 0's buffer is old enough (<= 2 - prefetch - 1), free
    assert b2.data_ptr() == p0 and ring.reused == 1
    b3 = ring.take(1000)  # batch 3: batch 1's buffer is old enough but still held: fresh
    assert b3.data_ptr() not in (p0, b1.data_ptr()) and ring.fresh == 3
    small = ring.take(600)  # batch 4: a last, partial batch: fresh, and not kept
    assert ring.fresh == 4 and {s[1] for s in ring.slots} == {1000}
    assert len(ring.slots) <= 1 + 1  # prefetch + 1 kept at most
    b5 = ring.take(1000)  # batch 5: the old enough ones are all held: fresh
    assert b5.data_ptr() not in (b1.data_ptr(), b2.data_ptr(), b3.data_ptr()) and ring.fresh == 5
    del b1, b2, b3, b5, small
    ring.take(1000)  # batch 6: an old enough one is free again
    assert ring.reused == 2
    ring.begin(limit=7)  # a new iteration: the last one's batches were all delivered
    ring.take(1000)
    assert ring.reused == 3
    ring.take(4000)  # larger batches from now on: the smaller buffers are let go
    assert {s[1] for s in ring.slots} == {4000}


def test_ring_past_the_limit_reuses_only_what_arrived_before_it():
    # Past the smallest worker's count (limit) requests no longer prove arrivals: only batches
    # older than limit - prefetch count as arrived.
    ring = BatchRing(prefetch=1, consumer=os.getppid())
    ring.begin(limit=3)
    first = ring.take(1000).data_ptr()  # batch 0
    second = ring.take(1000).data_ptr()  # batch 1
    assert ring.take(1000).data_ptr() == first  # batch 2 takes batch 0's (2 - 1 - 1 >= 0)
    assert ring.take(1000).data_ptr() == second  # batch 3 >= limit: batch 1 < 3 - 1 arrived
    ring.take(1000)  # batch 4: its slots hold batches 2 and 3, not known to have arrived
    assert ring.fresh == 3 and ring.reused == 2


def test_ring_reuses_what_the_main_process_says_it_handed_out():
    received = torch.zeros(2, dtype=torch.int64)
    ring = BatchRing(prefetch=2, consumer=os.getppid(), received=received, worker=1)
    ring.begin(limit=10)
    first = ring.take(1000).data_ptr()  # batch 0
    received[0] = 5  # another worker's count says nothing about ours
    ring.take(1000)  # batch 1: batch 0 neither old enough (1 - 2 - 1 < 0) nor handed out
    assert ring.fresh == 2
    received[1] = 1  # our batch 0 has been handed out (and nothing maps it): reused at once,
    # where the age rule alone would wait until batch 3
    assert ring.take(1000).data_ptr() == first and ring.reused == 1


def test_ring_never_reuses_what_its_consumer_maps():
    # This process plays the main process: it maps every buffer the ring made, so even a buffer
    # nothing else refers to is not reused.
    ring = BatchRing(prefetch=0, consumer=os.getpid())
    ring.begin(limit=10)
    ring.take(4096)
    ring.take(4096)
    ring.take(4096)
    assert ring.reused == 0 and ring.fresh == 3


def test_ring_reuses_nothing_once_its_consumer_is_another_process():
    # A pid names one process only together with its start time: a consumer that ended (its pid
    # free for reuse) or a start time that does not match means no reuse at all.
    from shardkit.recycle import process_start

    parent = os.getppid()
    ring = BatchRing(prefetch=0, consumer=parent, consumer_start=process_start(parent) + 1)
    ring.begin(limit=10)
    for _ in range(3):
        ring.take(4096)
    assert ring.reused == 0 and ring.fresh == 3
    assert process_start(2**22 + 7) is None  # no such process


@pytest.mark.parametrize("context", ["spawn", "forkserver"])
def test_workers_not_forked_from_the_main_process_recycle_too(source, reference, context):
    # Python 3.14 starts DataLoader workers with a forkserver by default: their parent is not
    # the main process, which must not switch recycling off (nor make it unsafe).
    ds = StreamingDataset(source, batch_size=BATCH, crop=RandomResizedCrop(16), seed=3)
    loader = make_loader(ds, num_workers=2, recycle_batches=True, prefetch_factor=2,
                         pin_memory=False, multiprocessing_context=context)
    files, got, kept = [], [], []
    for k, (images, labels) in enumerate(loader):
        files.append(_shm_file(images))
        got.append((images.clone(), labels.clone()))
        if k % 3 == 0:
            kept.append((k, images))  # held: never overwritten
        del images, labels
    _same(got, reference[0])
    for k, images in kept:
        assert torch.equal(images, reference[0][k][0]), f"held batch {k} was overwritten"
    assert len(set(files)) < len(files)  # buffers were reused


@pytest.fixture(scope="module")
def tensor_source(tmp_path_factory) -> Path:
    src = image_folder(tmp_path_factory.mktemp("tsrc"), classes=2, per_class=12)
    dest = tmp_path_factory.mktemp("tds")
    pack(src, dest, mode="tensor", size=16, max_samples=8)
    return dest


@pytest.mark.parametrize("crop", [None, RandomResizedCrop(12)])
def test_each_batch_takes_the_ring_once(tensor_source, monkeypatch, crop):
    # The ring's proof counts takes as batches: a batch made slot by slot (uncropped: the buffer
    # is taken with the first image's shape) must not take a second buffer when it is stacked.
    takes = torch.zeros(2, dtype=torch.int64).share_memory_()
    real = BatchRing.take

    def counted(self, nbytes):
        takes[self.worker] += 1
        return real(self, nbytes)

    monkeypatch.setattr(BatchRing, "take", counted)  # the forked workers inherit it
    ds = StreamingDataset(tensor_source, batch_size=5, crop=crop, seed=1)
    loader = make_loader(ds, num_workers=2, recycle_batches=True, pin_memory=False)
    batches = [len(labels) for _, labels in loader]
    assert sum(batches) == 24 and int(takes.sum()) == len(batches)
