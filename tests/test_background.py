"""Reads in a helper thread, and samples decoded ahead of their turn while reads wait.

:class:`shardkit.background.Background` runs a worker's read stream in a thread;
:func:`shardkit.assembly.emit` moves the reads there once one waited, and decodes held samples
early meanwhile. What is emitted must not change: the same samples, the same order, the same
pixels, the same errors at the same turn.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from shardkit import RandomResizedCrop, StreamingDataset
from shardkit.assembly import SampleDecoder, emit
from shardkit.background import THREAD_NAME, Background
from shardkit.errors import DecodeError, OnError
from shardkit.plan import Span, WorkerPlan, shuffle_order
from shardkit.reader import BadSample

from _helpers_read import packed_raw


def _readers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME]


# --------------------------------------------------------------------------- Background


def test_items_come_in_order_then_the_end():
    bg = Background(iter(range(100)), depth=8)
    assert list(bg) == list(range(100))
    with pytest.raises(StopIteration):
        next(bg)
    with pytest.raises(StopIteration):
        bg.poll()


def test_poll_does_not_wait_for_an_item_that_has_not_arrived():
    go = threading.Event()

    def slow():
        yield 1
        go.wait(10)
        yield 2

    bg = Background(slow())
    assert next(bg) == 1
    began = time.perf_counter()
    assert bg.poll() is None  # 2 is not read yet
    assert time.perf_counter() - began < 1.0
    go.set()
    assert next(bg) == 2
    bg.close()


def test_the_iterators_error_comes_after_the_items_before_it():
    def failing():
        yield from range(5)
        raise ValueError("bad shard")

    bg = Background(failing())
    got = [next(bg) for _ in range(5)]
    assert got == list(range(5))
    with pytest.raises(ValueError, match="bad shard"):
        next(bg)
    with pytest.raises(StopIteration):  # once raised, the stream is over
        next(bg)


def test_the_thread_reads_at_most_depth_items_ahead():
    produced = []

    def counting():
        for i in range(1000):
            produced.append(i)
            yield i

    bg = Background(counting(), depth=5)
    time.sleep(0.2)
    assert len(produced) <= 5 + 1  # `depth` queued, one more made and waiting to be queued
    bg.close()


def test_close_stops_the_thread_and_closes_the_iterator_in_it():
    closed = []

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.append(threading.current_thread().name)

    before = len(_readers())
    bg = Background(endless(), depth=4)
    assert next(bg) == 0
    bg.close()
    assert closed == [THREAD_NAME]  # closed by the thread that ran it
    assert len(_readers()) == before


def test_close_from_a_finalizer_that_interrupts_a_method_holding_the_lock(monkeypatch):
    # The collector may close an abandoned iteration in any thread, while that thread is inside
    # poll() or the reader's queueing with the lock held: close() must not deadlock there.
    import shardkit.background as background

    monkeypatch.setattr(background, "CLOSE_WAIT", 0.2)
    bg = Background(iter(range(10**6)), depth=2)
    done = threading.Event()

    def finalizer_inside_a_method():
        with bg._cond:  # as if interrupted inside poll()
            bg.close()
        done.set()

    closer = threading.Thread(target=finalizer_inside_a_method, daemon=True)
    closer.start()
    assert done.wait(5), "close() deadlocked on the lock its own thread held"
    closer.join(5)
    deadline = time.monotonic() + 5
    while _readers() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _readers() == []


# --------------------------------------------------------------------------- emit, ahead


def _plan(n: int, buffer: int, seed: int = 0) -> WorkerPlan:
    order = shuffle_order(n, buffer, np.random.default_rng(seed), start=max(1, buffer // 10))
    return WorkerPlan((Span(0, 0, n),), n, order, ())


def _slow_read(n: int, wait_every: int = 10, wait: float = 0.02, bad=()):
    """``read(spans, start)`` of samples ``{"i": i}``; every ``wait_every``-th read waits (a cold
    disk); positions in ``bad`` are BadSamples."""
    def read(spans, start):
        for i in range(start, n):
            if i % wait_every == wait_every - 1:
                time.sleep(wait)
            yield i, (BadSample(OSError("unreadable"), 0) if i in bad else {"i": i})
    return read


class _Skips:
    """Stands in for a skip log's region: counts the samples replaced."""

    def __init__(self):
        self.samples = 0

    def sample(self, shard=None):
        self.samples += 1


class _Decoder:
    """``process(sample, out)`` -> ``("decoded", i)``, recording each call; samples in
    ``fails`` raise a DecodeError."""

    def __init__(self, fails=()):
        self.calls: list[int] = []
        self.fails = set(fails)

    def __call__(self, sample, out=None):
        i = sample["i"]
        self.calls.append(i)
        if i in self.fails:
            raise DecodeError("x.tar", "bad jpeg", key=str(i))
        return ("decoded", i)


def _emit(n, buffer, ahead, on_error=OnError.RAISE, fails=(), bad=(), consumed=0):
    plan = _plan(n, buffer)
    dec = _Decoder(fails)
    out = list(emit(plan, consumed, _slow_read(n, bad=bad), dec, on_error, _Skips(), ahead=ahead))
    return plan, dec, out


def test_samples_decoded_ahead_come_out_the_same_in_the_same_order(monkeypatch):
    n, buffer = 300, 50
    _, plain, want = _emit(n, buffer, ahead=0)
    plan, dec, got = _emit(n, buffer, ahead=buffer)
    assert got == want == [("decoded", int(i)) for i in plan.order]
    assert sorted(dec.calls) == list(range(n))  # each decoded once
    # some were decoded before their turn: the call order is not the emission order
    assert dec.calls != [int(i) for i in plan.order]
    assert plain.calls == [int(i) for i in plan.order]


def test_reads_that_never_wait_stay_in_this_thread(monkeypatch):
    n = 200
    plan = _plan(n, 40)
    dec = _Decoder()
    read = _slow_read(n, wait_every=10**9)  # never waits
    stream = emit(plan, 0, read, dec, OnError.RAISE, _Skips(), ahead=40)
    first = next(stream)
    assert first == ("decoded", int(plan.order[0]))
    assert _readers() == []
    assert list(stream) == [("decoded", int(i)) for i in plan.order[1:]]
    assert dec.calls == [int(i) for i in plan.order]  # nothing ahead of its turn


def test_at_most_ahead_samples_wait_decoded():
    n, buffer, ahead = 400, 100, 7
    plan = _plan(n, buffer)
    dec = _Decoder()
    emitted = []
    for item in emit(plan, 0, _slow_read(n, wait_every=3, wait=0.01), dec, OnError.RAISE,
                     _Skips(), ahead=ahead):
        emitted.append(item[1])
        early = set(dec.calls) - set(emitted)
        assert len(early) <= ahead


def test_a_sample_that_fails_early_raises_at_its_turn_not_before():
    n, buffer = 300, 60
    plan = _plan(n, buffer)
    bad_turn = 150
    fails = {int(plan.order[bad_turn])}
    dec = _Decoder(fails)
    got = []
    with pytest.raises(DecodeError):
        for item in emit(plan, 0, _slow_read(n), dec, OnError.RAISE, _Skips(), ahead=buffer):
            got.append(item)
    assert len(got) == bad_turn  # every sample before it came out


def test_skip_mode_replaces_the_same_samples_with_or_without_ahead():
    n, buffer = 300, 60
    plan = _plan(n, buffer)
    fails = {int(plan.order[k]) for k in (0, 40, 41, 170)}
    bad = {int(plan.order[k]) for k in (90, 250)}
    _, _, want = _emit(n, buffer, 0, OnError.SKIP, fails, bad)
    _, _, got = _emit(n, buffer, buffer, OnError.SKIP, fails, bad)
    assert got == want
    assert len(got) == n


def test_a_resumed_iteration_with_ahead_emits_the_rest():
    n, buffer = 300, 60
    plan, _, whole = _emit(n, buffer, 0)
    _, _, rest = _emit(n, buffer, buffer, consumed=123)
    assert rest == whole[123:]


def test_an_abandoned_iteration_leaves_no_reader_thread():
    n = 500
    plan = _plan(n, 50)
    stream = emit(plan, 0, _slow_read(n, wait_every=2), _Decoder(), OnError.RAISE, _Skips(),
                  ahead=50)
    for _ in range(30):
        next(stream)
    assert len(_readers()) == 1  # the reads moved to the helper thread
    stream.close()
    assert _readers() == []


# --------------------------------------------------------------------------- a real dataset


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    return packed_raw(tmp_path_factory, classes=3, per_class=40, max_samples=16, size=(64, 48))


def _epoch(source: Path) -> list:
    ds = StreamingDataset(source, batch_size=16, crop=RandomResizedCrop(24), seed=3,
                          shuffle_buffer=40)
    return [(images.clone(), labels.clone()) for images, labels in ds]


def test_a_dataset_whose_reads_wait_gives_the_same_batches(raw, monkeypatch):
    want = _epoch(raw)
    calls = []
    real = SampleDecoder.__call__

    def decode(self, sample, out=None):
        calls.append(out is None)
        return real(self, sample, out)

    real_read = StreamingDataset._read

    def slow_read(self, *args, **kw):  # a cold disk: every 8th sample waits for it
        for k, item in enumerate(real_read(self, *args, **kw)):
            if k % 8 == 7:
                time.sleep(0.02)
            yield item

    monkeypatch.setattr(SampleDecoder, "__call__", decode)
    monkeypatch.setattr(StreamingDataset, "_read", slow_read)
    got = _epoch(raw)
    assert len(got) == len(want) > 1
    for (gi, gl), (wi, wl) in zip(got, want):
        assert torch.equal(gl, wl)
        assert torch.equal(gi, wi)
    assert any(calls)  # some images were decoded ahead (on their own, not into the batch)
