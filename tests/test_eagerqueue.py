"""The DataLoader's queues in shardkit's loader (shardkit/eagerqueue.py): small items are written by
the caller at once, large ones by the feeder thread, and every item arrives, whole and in order."""

from __future__ import annotations

import multiprocessing
import time
from queue import Empty

import pytest
import torch

from shardkit.eagerqueue import EAGER_MAX, EagerQueue, eager_context
from shardkit.loader import ShardkitLoader


def _items(n: int) -> list:
    # small and large (pickled by value, through the feeder thread) in turns, so that a small
    # one often follows a large one still waiting for the feeder
    return [(i, b"x" * (3 * EAGER_MAX if i % 3 == 0 else 10) + bytes([i % 251]))
            for i in range(n)]


def _produce(queue: EagerQueue, n: int) -> None:
    for item in _items(n):
        queue.put(item)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_items_arrive_whole_and_in_order_across_processes(method):
    ctx = eager_context(method)
    queue = ctx.Queue()
    assert isinstance(queue, EagerQueue)
    child = ctx.Process(target=_produce, args=(queue, 200))
    child.start()
    got = [queue.get(timeout=30) for _ in range(200)]
    child.join(30)
    assert got == _items(200)


def test_items_arrive_in_order_within_a_process():
    queue = eager_context().Queue()
    for item in _items(50):
        queue.put(item)
    assert [queue.get(timeout=10) for _ in range(50)] == _items(50)
    with pytest.raises(Empty):
        queue.get(timeout=0.05)


def test_the_context_keeps_the_start_method():
    assert eager_context("spawn").get_start_method() == "spawn"
    assert eager_context(None).get_start_method() == multiprocessing.get_start_method()
    ctx = eager_context("forkserver")
    assert eager_context(ctx) is ctx
    loader = ShardkitLoader(range(4), num_workers=1, multiprocessing_context="spawn")
    assert sorted(int(x) for x in loader) == [0, 1, 2, 3]
    assert isinstance(loader.multiprocessing_context.Queue(), EagerQueue)
    assert loader.multiprocessing_context.get_start_method() == "spawn"


def test_a_loader_leaves_the_default_start_method_open_until_it_iterates():
    # a plain DataLoader resolves the default context when it iterates, not when it is made:
    # multiprocessing.set_start_method() after making one must still work
    loader = ShardkitLoader(range(4), num_workers=1)
    assert loader.multiprocessing_context is None


def _fill(queue: EagerQueue) -> None:  # a worker whose results nobody reads any more
    for i in range(40):
        queue.put((i, b"x" * 4000))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_put_never_blocks_even_when_the_pipe_is_full(method):
    # The DataLoader's shutdown puts (None, None) into the result queue to wake its pin thread;
    # workers may have filled the pipe (64 KiB) and wait in a write, holding the write lock.
    import threading
    import time

    ctx = eager_context(method)
    queue = ctx.Queue()
    child = ctx.Process(target=_fill, args=(queue,), daemon=True)
    child.start()
    deadline = time.monotonic() + 30
    while child.is_alive() and time.monotonic() < deadline and queue.qsize() < 17:
        time.sleep(0.05)  # 17 items of 4 KB: the pipe is full, the child blocks
    time.sleep(0.2)
    done = threading.Event()
    threading.Thread(target=lambda: (queue.put((None, None)), done.set()), daemon=True).start()
    try:
        assert done.wait(5), "put() blocked on a full pipe"
    finally:
        child.kill()
        child.join()
        queue.cancel_join_thread()  # as the DataLoader does: its feeder may wait on the pipe


def test_a_dropped_queue_closes_its_pipe_without_the_cycle_collector():
    """Dropping the last reference frees the queue and both ends of its pipe (a Connection
    closes its fd when freed) with the cycle collector off: nothing refers back to it. Asked
    of the queue's own objects: counting the process's pipes also counted those other tests'
    threads were opening meanwhile (failed once under load: 6 new pipes after 20 queues)."""
    import gc
    import weakref

    gc.disable()
    try:
        for _ in range(20):
            queue = eager_context().Queue()
            queue.put(1)
            assert queue.get(timeout=5) == 1
            fds = (queue._reader.fileno(), queue._writer.fileno())
            alive = [weakref.ref(queue), weakref.ref(queue._reader), weakref.ref(queue._writer)]
            del queue
            # the feeder thread (started by a first put) holds the pipe's close methods until
            # the queue's finalizer, run as the queue is freed, has it exit: a moment later
            deadline = time.monotonic() + 30
            while any(ref() is not None for ref in alive) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert [ref() for ref in alive] == [None, None, None], fds
    finally:
        gc.enable()


class _Unpicklable(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield 1
        yield lambda: None  # a result that cannot cross to the main process


def test_a_worker_result_that_cannot_be_pickled_is_raised_not_waited_for():
    # multiprocessing's feeder thread prints such an error and drops the item: the loader would
    # wait for it forever (here: until its timeout)
    loader = ShardkitLoader(_Unpicklable(), batch_size=None, num_workers=1, timeout=60)
    it = iter(loader)
    assert next(it) == 1
    with pytest.raises(Exception, match="pickling its result") as info:
        next(it)
    assert "lambda" in str(info.value)


def test_a_put_after_the_exit_finalizer_closed_the_pipe_is_quiet():
    # At interpreter exit multiprocessing's finalizer stops the feeder thread, which closes the
    # pipe; a DataLoader iterator collected after that still puts None for each worker. The
    # stock queue drops it quietly; so must this one (an exception there, inside a garbage
    # collection, even broke CPython's AST compiler in a test run).
    queue = eager_context().Queue()
    queue.put(1)
    assert queue.get(timeout=5) == 1
    queue._close()  # what the exit handler runs (Finalize, exitpriority 10)
    queue._thread.join(5)
    assert queue._writer.closed
    queue.put(None)  # no OSError
    queue.cancel_join_thread()
