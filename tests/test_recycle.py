"""Batch memory recycling (shardkit/recycle.py): a worker writes a batch into an earlier batch's
shared memory only once the main process is done with it. Data is generated in a module fixture;
every test compares the batches with those of a loader that never recycles."""

from __future__ import annotations

import gc
import os
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import pytest
import torch

from shardkit import RandomResizedCrop, StreamingDataset, make_loader
from shardkit.loader import RING_SPARE
from shardkit.recycle import BatchRing, MainRings

from _helpers_read import image_folder, pack, packed_raw

NUM, BATCH = 96, 4


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return packed_raw(tmp_path_factory, classes=4, per_class=NUM // 4, max_samples=16)


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
    # 2 workers × (prefetch 2 + spare) buffers at most; without recycling every batch has its own
    assert len(set(files)) <= 2 * (2 + RING_SPARE) < len(files) == 2 * NUM // BATCH


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
    # The main process releases a buffer as soon as the user dropped its batch: a worker reuses
    # it then, not prefetch + 1 batches later (which would take 2 workers x 5 buffers here).
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


def test_an_epoch_that_recycles_nothing_overwrites_nothing(source, reference):
    # Persistent workers keep the ring they were started with. An epoch in which the main process
    # recycles nothing releases nothing: batches waiting in the queue (the user is slow to start)
    # or held by the user are never written again.
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


def test_two_iterations_at_once_never_read_each_others_releases(source, reference):
    # Without persistent workers every iteration starts workers of its own, with rings of their
    # own: one that ran to its end must not make the other's workers reuse buffers it holds.
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


def _ring(slots: int = 3):
    """A worker's ring and the main process's side of it, both in this process."""
    rings = MainRings(workers=1, slots=slots)
    return rings, rings.spec().ring(0)


def _send(ring: BatchRing, flat: torch.Tensor, shape=(10, 100)) -> bytes:
    """A batch made in ``flat`` as a worker sends it."""
    return bytes(ForkingPickler.dumps(ring.seal(flat.view(shape))))


def test_a_buffer_is_written_again_only_once_the_main_process_released_it():
    rings, ring = _ring()
    flat = ring.take(1000)
    flat.fill_(7)
    got = ForkingPickler.loads(_send(ring, flat))
    assert got.shape == (10, 100) and int(got.sum()) == 7000
    first = flat.data_ptr()
    del flat
    assert ring.take(1000).data_ptr() != first  # not released: the main process holds it
    assert ring.fresh == 2
    rings.release()
    assert int(rings.released[0, 0]) == 0  # `got` still uses it: not released
    view = got[3]  # a view is enough to keep it in use
    del got
    rings.release()
    assert int(rings.released[0, 0]) == 0
    del view
    rings.release()
    assert int(rings.released[0, 0]) == 1  # batch 1 released
    again = ring.take(1000)
    assert again.data_ptr() == first and ring.reused == 1


def test_a_buffer_crosses_once_then_only_its_numbers_do():
    rings, ring = _ring()
    flat = ring.take(1000)
    first = _send(ring, flat)
    ForkingPickler.loads(first)  # received and dropped at once
    del flat
    rings.release()
    flat = ring.take(1000)
    flat.fill_(3)
    second = _send(ring, flat, (1000,))
    assert b"DupFd" in first and b"DupFd" not in second and len(second) < 600
    got = ForkingPickler.loads(second)
    assert got.shape == (1000,) and int(got[-1]) == 3
    assert got.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()


def test_a_batch_not_made_in_the_buffer_leaves_it_free():
    rings, ring = _ring()
    flat = ring.take(1000)
    other = torch.zeros(10, 100, dtype=torch.uint8)
    assert type(ring.seal(other)) is torch.Tensor  # the batch went elsewhere: a plain tensor
    ptr = flat.data_ptr()
    del flat
    assert ring.take(1000).data_ptr() == ptr and ring.reused == 1


def test_the_ring_keeps_full_batches_only_and_at_most_its_capacity():
    rings, ring = _ring(slots=2)
    held = [ring.take(1000) for _ in range(3)]  # the third finds no free slot and no room
    assert len(ring.slots) == 2 and ring.fresh == 3
    small = ring.take(600)  # a last, partial batch: fresh, not kept
    assert {s.nbytes for s in ring.slots} == {1000}
    big = ring.take(4000)  # larger batches from now on: the smaller buffers are let go
    assert [s.nbytes for s in ring.slots] == [4000]
    del held, small, big


def test_a_recycled_batch_unpickled_without_its_loader_is_a_clear_error():
    rings, ring = _ring()
    flat = ring.take(1000)
    ForkingPickler.loads(_send(ring, flat))
    del flat
    rings.release()
    flat = ring.take(1000)
    later = _send(ring, flat)
    del rings  # the loader and its rings are gone
    gc.collect()
    with pytest.raises(RuntimeError, match="only be unpickled by the loader"):
        ForkingPickler.loads(later)


def test_each_buffer_reaches_the_main_process_once_per_worker_life(source, monkeypatch):
    # The main process keeps the workers' ring buffers mapped: a batch in one of them crosses as
    # a few numbers, without a file descriptor fetched from the worker (a round trip that waits
    # for the worker's GIL) nor an mmap. Without recycling, every batch is a new buffer.
    from multiprocessing.resource_sharer import DupFd

    fetched = []
    real = DupFd.detach
    monkeypatch.setattr(DupFd, "detach", lambda self: fetched.append(1) or real(self))
    counts = {}
    for recycle in (True, False):
        fetched.clear()
        loader = _loader(source, recycle)
        batches = 0
        for _ in range(2):
            for images, labels in loader:
                batches += 1
                del images, labels
        counts[recycle] = len(fetched)
    assert batches == 2 * NUM // BATCH
    assert counts[False] == batches
    assert counts[True] <= 2 * (2 + RING_SPARE)  # workers x (prefetch + spare) buffers


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


def _to_float(batch):
    """A collate_fn (it runs in the worker, on the batch made in a ring buffer)."""
    images, labels = batch
    return images.float().div_(255), labels[:2], images[:2]


def test_a_collate_fn_computing_on_a_recycled_batch_gets_plain_tensors(source, reference):
    # A tensor made from the ring's batch in the worker (a new one, or a view that shares its
    # buffer) crosses the ordinary way; a buffer a view shares is never written again.
    ds = StreamingDataset(source, batch_size=BATCH, crop=RandomResizedCrop(16), seed=3)
    loader = make_loader(ds, num_workers=2, recycle_batches=True, pin_memory=False,
                         collate_fn=_to_float)
    got = list(loader)
    assert len(got) == NUM // BATCH
    for (floats, labels, views), (ref_images, ref_labels) in zip(got, reference[0]):
        assert type(floats) is torch.Tensor and type(views) is torch.Tensor
        assert torch.equal(floats, ref_images.float() / 255)
        assert torch.equal(views, ref_images[:2]) and torch.equal(labels, ref_labels[:2])


def test_the_buffers_kept_fit_the_file_descriptor_limit(monkeypatch):
    import resource

    from shardkit.recycle import ring_slots

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert ring_slots(2, 5) == 5
    assert ring_slots(0, 5) == 0
    calls = []
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, 1024))
    monkeypatch.setattr(resource, "setrlimit", lambda *a: calls.append(a))
    assert ring_slots(16, 5) == 5  # 4 x 16 x 5 + 256 = 576 fits a quarter of 1,024
    assert ring_slots(192, 5) == 0  # 192 workers: not even 2 buffers each
    assert ring_slots(64, 5) == 3  # (1024 - 256) // (4 x 64)
    assert not calls  # the hard limit is 1,024: nothing to raise
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, 65536))
    assert ring_slots(192, 5) == 5 and calls[-1] == (resource.RLIMIT_NOFILE, (4096, 65536))
