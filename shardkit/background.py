"""An iterator run in a thread of its own, a few items ahead of its consumer.

A worker's reads of cold shards (an HDD, a cold page cache, a download still arriving) block in
the reader; run in the worker's main thread they leave its decoder idle while the disk works,
and the disk idle while it decodes. :class:`Background` runs the reader in a helper thread, and
:func:`~shardkit.assembly.emit` asks it without blocking (:meth:`Background.poll`): when nothing
has arrived yet, the worker decodes a held sample ahead of its turn instead of waiting.

The thread blocks in reads (GIL released) or when ``depth`` items wait unconsumed; the consumer
sees the items, then the iterator's exception or its end, in order. :meth:`close` stops it: the
thread closes the iterator itself at its next item (a generator is closed by the thread that runs
it), so nothing of it runs after ``close`` returns unless a read is still blocked then.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Iterator

__all__ = ["Background"]

THREAD_NAME = "shardkit-reader"
DEPTH = 64  # items read ahead of the consumer
CLOSE_WAIT = 10.0  # seconds close() waits for a read in progress to end

_END = object()


def running() -> bool:
    """Whether the calling thread is a :class:`Background`'s (its iterator's code asks: the
    reads then have a thread of their own)."""
    return threading.current_thread().name == THREAD_NAME


class _Raised:
    __slots__ = ("error",)

    def __init__(self, error: BaseException):
        self.error = error


class Background:
    """``items`` run in a daemon thread, at most ``depth`` items ahead (see the module docstring).

    Iterating it blocks like the iterator would; :meth:`poll` returns ``None`` instead of
    waiting when no item has arrived (the items themselves are never None here: the reader's are
    ``(position, sample)`` pairs)."""

    def __init__(self, items: Iterator, depth: int = DEPTH):
        self._items = items
        self._depth = max(1, depth)
        self._queue: deque = deque()
        # Reentrant: close() may run from a finalizer (an abandoned iteration's generator is
        # closed when it is collected, in whichever thread the collector runs, this one's too)
        # while that thread is inside one of these methods with the lock held.
        self._cond = threading.Condition(threading.RLock())
        self._stopped = False
        self._done = False  # the consumer has seen the end or the error
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._current_thread = threading.current_thread  # close() may run at interpreter exit
        self._thread.start()

    def _run(self) -> None:
        items, cond, queue = self._items, self._cond, self._queue
        try:
            for item in items:
                with cond:
                    while len(queue) >= self._depth and not self._stopped:
                        cond.wait()
                    if self._stopped:
                        return
                    queue.append(item)
                    cond.notify_all()
            last: Any = _END
        except BaseException as exc:  # handed to the consumer, raised there in order
            last = _Raised(exc)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()
        with cond:
            queue.append(last)
            cond.notify_all()

    def _take(self) -> Any:
        item = self._queue.popleft()
        self._cond.notify_all()
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, _Raised):
            self._done = True
            raise item.error
        return item

    def poll(self) -> Any:
        """The next item if it has arrived, else None (StopIteration at the end; the iterator's
        error when that is next)."""
        if self._done:
            raise StopIteration
        with self._cond:
            if not self._queue:
                return None
            return self._take()

    def __iter__(self) -> "Background":
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        with self._cond:
            while not self._queue:
                self._cond.wait()
            return self._take()

    def close(self) -> None:
        """Stop the thread (the iterator is closed in it) and wait for it a while."""
        with self._cond:
            self._stopped = True
            self._queue.clear()
            self._cond.notify_all()
        if self._thread is not self._current_thread():
            self._thread.join(CLOSE_WAIT)
