"""A ``multiprocessing`` queue that writes small items to its pipe in the calling thread.

A ``multiprocessing.Queue`` hands every ``put`` to a feeder thread, which pickles the item and
writes it to the pipe when it next gets the GIL. The DataLoader sends each worker its next request
through such a queue, from the main process, right before the training step runs. A step that
holds the GIL (a CUDA launch blocking on a full queue, a C extension, a long Python stretch) keeps
the feeder thread from running until it ends, so the worker gets its request one step late and
the prefetch depth shrinks by one; the same holds in the worker, whose feeder thread waits for the
GIL while the worker decodes. :class:`EagerQueue` writes an item of up to 4 KB itself, at once,
when that cannot block (nothing waits for the feeder thread, so order is kept; no other process
holds the write lock; the pipe has room); everything else still goes through the feeder thread,
so no ``put`` ever blocks (the DataLoader's shutdown relies on that: it puts into a result queue
that workers may have filled).

``eager_context(ctx)`` is the multiprocessing context (fork, spawn or forkserver, as given) whose
``Queue()`` is an :class:`EagerQueue`; ``make_loader`` gives it to the DataLoader.
"""

from __future__ import annotations

import multiprocessing
import select
import threading
from multiprocessing import queues
from multiprocessing.context import BaseContext
from queue import Full
from typing import TYPE_CHECKING, Callable, cast

if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from multiprocessing.synchronize import BoundedSemaphore, Lock

_ForkingPickler = queues._ForkingPickler  # type: ignore[attr-defined]  # private name, not in typeshed

# bytes: with send_bytes' 4-byte header, one write of at most PIPE_BUF (4096), which a pipe that
# polls writable takes whole at once: written directly, an item never blocks the caller
EAGER_MAX = 4092


class _Pickled(bytes):
    """An item pickled already, on its way through the feeder thread."""


class EagerQueue(queues.Queue):
    """``multiprocessing.Queue`` whose small items skip the feeder thread (module docstring)."""

    # multiprocessing.queues.Queue's internals used here (typeshed does not declare them)
    _closed: bool
    _thread: threading.Thread | None
    _notempty: threading.Condition
    _sem: BoundedSemaphore
    _wlock: Lock | None
    _writer: Connection
    _start_thread: Callable[[], None]
    _send_bytes: Callable[[bytes], None]
    _counts: list[int]

    def _reset(self, after_fork: bool = False) -> None:
        super()._reset(after_fork)  # type: ignore[misc]  # Queue._reset: internal, not in typeshed
        counts = self._counts = [0, 0]  # items handed to the feeder thread / written by it
        send = self._send_bytes

        def counted(data) -> None:  # no reference to self: the queue is freed by refcount
            try:
                send(data)
            finally:
                counts[1] += 1

        self._send_bytes = counted

    def put(self, obj, block: bool = True, timeout: float | None = None) -> None:
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")
        data = _dumps(obj)
        if self._thread is None:  # started by the first put, as in multiprocessing's queue: a
            with self._notempty:  # process's threads do not change later, when an item first
                if self._thread is None:  # has to take the feeder's way
                    self._start_thread()
        counts = self._counts
        if len(data) <= EAGER_MAX and counts[0] == counts[1] and self._eager(data, block,
                                                                               timeout):
            return
        counts[0] += 1  # behind others, too large, or the pipe is busy: the feeder thread
        try:
            super().put(_Pickled(data), block, timeout)
        except BaseException:
            counts[0] -= 1
            raise

    def _eager(self, data: bytes, block, timeout) -> bool:
        """Write ``data`` now if that cannot block (the lock is free, the pipe has room)."""
        if not self._sem.acquire(block, timeout):
            raise Full
        if self._wlock is not None and not self._wlock.acquire(False):
            self._sem.release()
            return False
        try:
            if self._writer.closed or not select.select([], [self._writer], [], 0)[1]:
                self._sem.release()  # full (a PIPE_BUF write fits when it polls writable)
                return False
            self._writer.send_bytes(data)
            return True
        except OSError:  # the pipe is closed (the feeder's exit finalizer ran) or broken: the
            self._sem.release()  # feeder's way, which handles it as multiprocessing does
            return False
        finally:
            if self._wlock is not None:
                self._wlock.release()

    def get(self, block: bool = True, timeout: float | None = None):
        item = super().get(block, timeout)
        return _ForkingPickler.loads(item) if isinstance(item, _Pickled) else item


def _dumps(obj) -> bytes:
    """``obj`` pickled. A DataLoader worker's ``(task, result)`` that cannot be pickled becomes
    ``(task, the error)``, which the main process raises with the worker's traceback (the
    feeder thread would print it and drop the result: a loader waiting for it forever)."""
    try:
        return _ForkingPickler.dumps(obj)
    except Exception:
        if not (isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], int)):
            raise
        from torch._utils import ExceptionWrapper

        return _ForkingPickler.dumps((obj[0], ExceptionWrapper(
            where="in a DataLoader worker, pickling its result for the main process")))


_CONTEXTS: dict[type, type[BaseContext]] = {}


class _EagerContext:
    get_context: Callable[[], BaseContext]  # from the context class it is mixed into

    def Queue(self, maxsize: int = 0) -> EagerQueue:  # noqa: N802 (multiprocessing's name)
        return EagerQueue(maxsize, ctx=self.get_context())


def eager_context(ctx: BaseContext | str | None = None) -> BaseContext:
    """The multiprocessing context ``ctx`` (a context, a start method's name, or None for the
    default) with :class:`EagerQueue` queues."""
    base = ctx if isinstance(ctx, BaseContext) else multiprocessing.get_context(ctx)
    if isinstance(base, _EagerContext):
        return base
    cls = _CONTEXTS.get(type(base))
    if cls is None:
        cls = _CONTEXTS[type(base)] = cast("type[BaseContext]", type(
            f"Eager{type(base).__name__}", (_EagerContext, type(base)), {}))
    eager = cls.__new__(cls)
    eager.__dict__.update(base.__dict__)
    return eager
