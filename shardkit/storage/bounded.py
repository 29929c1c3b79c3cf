"""Calls that may block for good, run on helper threads and waited for at most a timeout.

A stalled NFS/FUSE mount, a FIFO with no writer or a filesystem without timeouts of its own can
block a call forever. Such calls run on a helper thread; the caller waits at most ``timeout``
seconds and then gets an error, while the stuck call goes on alone on its daemon thread.

Helper threads are reused (starting one costs ~0.1 ms, once per file opened): a thread that
finished its job waits for the next one, up to ``_MAX_IDLE`` idle threads; a thread stuck in a
stalled call is simply never idle again. A helper is named after the job it runs (``name``), so a
thread dump says what is stuck. In a forked child the pool starts empty (its threads live in the
parent).
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Any, Callable, TypeVar

T = TypeVar("T")

IDLE_NAME = "shardkit-helper-idle"
_MAX_IDLE = 8
_helpers_lock = threading.Lock()
_helpers: dict = {"jobs": None, "idle": 0}


def _reset_helpers() -> None:
    global _helpers_lock
    _helpers_lock = threading.Lock()
    _helpers.update(jobs=None, idle=0)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_helpers)


def in_helper(name: str, job: Callable[..., None], *args: Any) -> None:
    """Run ``job(*args)`` in an idle helper thread, or a new one, named ``name`` while it runs.
    ``job`` handles its own errors (what it raises is lost)."""
    with _helpers_lock:
        if _helpers["jobs"] is None:
            _helpers["jobs"] = queue.SimpleQueue()
        jobs = _helpers["jobs"]
        if _helpers["idle"]:
            _helpers["idle"] -= 1
            jobs.put((name, job, args))
            return
    threading.Thread(target=_helper, args=(jobs, job, args), name=name, daemon=True).start()


def _helper(jobs: queue.SimpleQueue, job: Callable[..., None] | None, args: tuple | None) -> None:
    me = threading.current_thread()
    while True:
        job(*args)  # type: ignore[misc]  # handles its own errors
        job = args = None
        with _helpers_lock:
            if _helpers["jobs"] is not jobs or _helpers["idle"] >= _MAX_IDLE:
                return
            _helpers["idle"] += 1
        me.name = IDLE_NAME
        name, job, args = jobs.get()
        me.name = name


def call_within(timeout: float | None, fn: Callable[[], T], *, name: str,
                late: Callable[[T], None] | None = None,
                stalled: Callable[[str], BaseException] = TimeoutError) -> T:
    """``fn()`` on a helper thread (named ``name``), waited for at most ``timeout`` seconds
    (None: run here, unbounded). Returns its result or raises what it raised.

    A call that has not answered by then raises ``stalled("no answer for <timeout> s")`` (by
    default a ``TimeoutError``, which remote stores retry); it goes on alone, and ``late(result)``
    disposes of a result that comes after the caller stopped waiting (a file object to close)."""
    if timeout is None:
        return fn()
    cond = threading.Condition(threading.Lock())
    box: list[tuple[bool, Any]] = []  # (True, result) or (False, exception)
    abandoned: list[bool] = []

    def job() -> None:
        ok: bool
        value: Any
        try:
            ok, value = True, fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            ok, value = False, exc
        with cond:
            if not abandoned:
                box.append((ok, value))
                cond.notify_all()
                return
        if ok and late is not None:
            late(value)

    in_helper(name, job)
    with cond:
        if not cond.wait_for(lambda: box, timeout):
            abandoned.append(True)
            raise stalled(f"no answer for {timeout:g} s")
    ok, value = box[0]
    if ok:
        return value
    raise value
