"""Encoding ahead, in parallel, handing results back in order.

Raw images are I/O-bound: a thread pool reads them (no copy of every file's bytes between
processes). Resizing and arrays are CPU-bound: a pool of spawned processes. Either way a bounded
window of chunks is in flight, and results come back in the order of the input, so the shards do
not depend on the number of workers.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
from collections import deque
from collections.abc import Iterator
from typing import Union

from ..errors import SourceError
from .encode import EncodeOptions, encode_parts
from .folder import Item

# What encoding one item gives: its tar bytes as buffers and a small info dict, or the reason it
# is bad input (a SourceError as a value, so that on_error decides).
Encoded = Union[tuple[list[bytes], dict], SourceError]


def _encode_chunk(items: list[Item], opts: EncodeOptions) -> list[Encoded]:
    """Runs in a worker: encode each item; bad input comes back as a SourceError value."""
    results: list[Encoded] = []
    for item in items:
        try:
            results.append(encode_parts(item, opts))
        except SourceError as exc:
            results.append(SourceError(exc.path, exc.reason))
    return results


def encode_all(order: list[Item], start: int, opts: EncodeOptions, workers: int,
               kind: str) -> Iterator[tuple[int, Item, Encoded]]:
    """Yield ``(position, item, result)`` for ``order[start:]`` in order, encoding ahead with a
    bounded window (``kind``: the scan's, ``"image"`` or ``"array"``)."""
    todo = order[start:]
    if workers <= 1 or len(todo) < 2:
        for i, item in enumerate(todo):
            yield start + i, item, _encode_chunk([item], opts)[0]
        return
    if opts.mode == "raw" and kind == "image":
        # I/O-bound: threads avoid copying every file's bytes between processes.
        executor: cf.Executor = cf.ThreadPoolExecutor(max_workers=min(workers, 8))
        chunk = 16
    else:
        executor = cf.ProcessPoolExecutor(max_workers=workers,
                                          mp_context=multiprocessing.get_context("spawn"))
        chunk = 4
    window: deque[tuple[list[Item], cf.Future]] = deque()
    chunks = (todo[i:i + chunk] for i in range(0, len(todo), chunk))
    pos = start
    try:
        for piece in chunks:
            window.append((piece, executor.submit(_encode_chunk, piece, opts)))
            if len(window) >= 4 * workers:
                piece0, fut = window.popleft()
                for item, result in zip(piece0, fut.result()):
                    yield pos, item, result
                    pos += 1
        while window:
            piece0, fut = window.popleft()
            for item, result in zip(piece0, fut.result()):
                yield pos, item, result
                pos += 1
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
