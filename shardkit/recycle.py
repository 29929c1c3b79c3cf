"""Batch memory a DataLoader worker writes again once the main process is done with it.

A worker sends each batch to the main process in shared memory. A fresh shared-memory buffer costs
a page fault per 4 KiB on first write (the kernel zeroes every page; tmpfs gets no huge pages by
default): for a 38 MB batch of 256 uint8 224×224 images that is ~19 ms, four times the copy
itself. ``BatchRing`` keeps a worker's last few batch buffers and writes a new batch into one of
them when, and only when, all of these hold:

1. the loader is shardkit's (``make_loader``), iterating in order, and told the worker its
   ``prefetch_factor`` P and the main process's pid (``ShardkitLoader`` does, for this iteration);
2. the batch it held has arrived in the main process, not in flight (in the queue, a buffer is
   mapped nowhere, and check 4 would see nothing). Either the main process says so: the loader
   counts, in shared memory, the batches of each worker it has handed out (``received``, written
   before the user gets the batch, so a batch handed out and dropped is reused at once); or it
   follows from the batch's age: it was this worker's batch j - P - 1 or older (j: the batch
   being made), and the main process sends a worker its request for batch j only after it has
   taken batch j - P out of the queue (one new request per batch received, P per worker ahead,
   round-robin). Both need every worker to have batches left (batch numbers below the smallest
   worker's count): once one runs out, requests and batches no longer alternate;
3. nothing in this worker refers to the buffer any more (its storage's use count is the ring's
   own), and the main process is still the one that started the workers (same pid and start
   time: workers started by fork, spawn or a forkserver alike);
4. the main process maps the buffer no more (``/proc/<pid>/maps``, ~0.2 ms per batch): no tensor
   there, the user's or the pin-memory thread's, still uses it.

Anything else gets a fresh buffer, as without the ring. What the checks cannot see is a batch the
main process hands on to a third process and drops: so the ring is used when the loader pins
memory (the pin thread copies each batch; the user never holds the shared one) or when the user
asks for it (``make_loader(recycle_batches=True)``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


def _shm_name(storage: torch.UntypedStorage) -> str | None:
    """The path of the file behind a shared storage, as ``/proc/PID/maps`` shows it."""
    try:
        fd, _ = storage._share_fd_cpu_()
        path = os.readlink(f"/proc/self/fd/{fd}")
    except (OSError, RuntimeError, AttributeError):
        return None
    path = path.removesuffix(" (deleted)")
    return path if path.startswith("/") else None


def proc_stat(pid: int | str) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` from field 3 (state) on, or None when there is no such
    process (the command name before them may hold spaces and parentheses)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot), or None when there is none: with
    the pid, it names one process for good (pids are reused, start times with them)."""
    fields = proc_stat(pid)
    return None if fields is None else int(fields[19])  # field 22


def flat_tensor(storage: torch.UntypedStorage) -> torch.Tensor:
    """A flat uint8 tensor over ``storage`` (its own reference: what the use count counts)."""
    return torch.empty(0, dtype=torch.uint8).set_(storage)


@dataclass(frozen=True)
class RecycleSpec:
    """What shardkit's loader tells the workers it starts for one iteration: its
    ``prefetch_factor``, the main process (pid and start time) and the shared ``received``
    counts (one int64 per worker; see check 2 of the module docstring)."""

    prefetch: int
    consumer: int
    consumer_start: int | None
    received: torch.Tensor | None = None

    def ring(self, worker: int) -> "BatchRing":
        """The :class:`BatchRing` of DataLoader worker ``worker``."""
        return BatchRing(self.prefetch, self.consumer, self.received, worker, self.consumer_start)


class BatchRing:
    """A worker's recent shared batch buffers (see the module docstring for when one is reused)."""

    def __init__(self, prefetch: int, consumer: int, received=None, worker: int = 0,
                 consumer_start: int | None = None):
        self.prefetch, self.consumer = int(prefetch), int(consumer)
        # the consumer's start time (/proc/PID/stat): the pid is that process, not a reused one
        self.consumer_start = (process_start(self.consumer) if consumer_start is None
                               else int(consumer_start))
        # received[worker]: how many of this iteration's batches of this worker the main process
        # has handed out (a shared int64 array the loader writes; None: rely on the age rule)
        self.received, self.worker = received, int(worker)
        self.slots: list[list] = []  # [storage, nbytes, maps name, iteration, batch number]: one size
        self.iteration = self.batch = self.limit = 0
        self.reused = self.fresh = 0

    def begin(self, limit: int) -> None:
        """A new iteration whose every worker yields at least ``limit`` batches."""
        self.iteration += 1
        self.batch, self.limit = 0, limit

    def take(self, nbytes: int) -> torch.Tensor:
        """Shared memory for this iteration's next batch, as a flat uint8 tensor (whose life the
        use count of its storage follows)."""
        j = self.batch
        self.batch += 1
        slot = self._free(nbytes, j)
        if slot is not None:
            slot[3], slot[4] = self.iteration, j
            self.reused += 1
            return flat_tensor(slot[0])
        storage = torch.UntypedStorage._new_shared(nbytes)
        self.fresh += 1
        # Kept: full batches only (the largest size seen). A worker's last, partial batch would
        # push out a buffer the next full batch needs.
        if self.slots and nbytes > self.slots[-1][1]:
            self.slots.clear()
        name = _shm_name(storage)
        if name is not None and (not self.slots or nbytes == self.slots[-1][1]):
            self.slots.append([storage, nbytes, name, self.iteration, j])
            if len(self.slots) > self.prefetch + 1:  # enough: batch j takes batch j - P - 1's
                del self.slots[0]  # the oldest; whoever still uses it keeps it alive
        return flat_tensor(storage)

    def _free(self, nbytes: int, j: int) -> list | None:
        if self.consumer_start is None or process_start(self.consumer) != self.consumer_start:
            return None
        # arrived: handed out by the main process, or old enough while all workers are active
        arrived = min(j, self.limit) - self.prefetch
        if self.received is not None:
            arrived = max(arrived, min(int(self.received[self.worker]), self.limit))
        ready = [s for s in self.slots
                 if s[1] == nbytes and (s[3] < self.iteration or s[4] < arrived)
                 and torch._C._storage_Use_Count(s[0]._cdata) == 1]
        if not ready:
            return None
        try:
            with open(f"/proc/{self.consumer}/maps") as f:
                maps = f.read()
        except OSError:
            return None
        for s in ready:
            if s[2] + " " not in maps and s[2] + "\n" not in maps:
                self.slots.remove(s)
                self.slots.append(s)  # most recently used last
                return s
        return None
