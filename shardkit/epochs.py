"""The epoch counter a dataset shares with its DataLoader workers, and what a loader counted of
one iteration.

DataLoader workers, persistent ones included, hold a copy of the dataset made when they start and
must still see ``set_epoch``; so the epoch lives in shared memory (:class:`EpochCounter`). Each
``set_epoch``, loaded state and advance bumps a *generation*, which with the epoch names an
iteration (:attr:`EpochCounter.tag`, used by the skip log).

Who advances the epoch between iterations: the main process, before each iteration, unless
``set_epoch`` or a loaded state came since the last one (:meth:`EpochCounter.start_iteration`).
Under shardkit's loader the workers take the epoch the main process fixed (``managed``); a plain
DataLoader's workers cannot be told, so the workers of one loader advance their own slots alike,
without the main process (:meth:`EpochCounter.start_worker_iteration`).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

PLAIN_WORKERS = 64  # a plain DataLoader's workers advance epochs by themselves up to this many
REPORT_EVERY = 1.0  # seconds between the main process's looks for bad shards its workers found


class EpochCounter:
    """The epoch of one dataset, shared with every DataLoader worker (see the module doc)."""

    def __init__(self) -> None:
        # Shared with every DataLoader worker: [epoch, generation (bumped by every set_epoch,
        # loaded state and advance), generation + 1 when a plain DataLoader's workers iterated].
        self._cell = torch.zeros(3, dtype=torch.int64).share_memory_()
        # A plain DataLoader's worker w of W keeps [generation + 1, epoch of its last iteration]
        # in slot [W, w]: the workers of one loader advance together without the main process.
        self._slots = torch.zeros(PLAIN_WORKERS + 1, PLAIN_WORKERS, 2,
                                  dtype=torch.int64).share_memory_()
        self._advance = False  # main process: the next iteration starts the next epoch
        # shardkit's loader, for the workers it starts: the epoch of that iteration (the main
        # process advances epochs; later iterations of persistent workers read the cell)
        self._managed: int | None = None
        self._pid: int | None = None  # the process whose iterations this copy counts
        self._iter_epoch: int | None = None  # in a worker: the epoch of its running iteration
        self._loaded_epoch: int | None = None  # in a worker: of a state loaded there

    @property
    def epoch(self) -> int:
        """The epoch: of the running iteration in a DataLoader worker, else the dataset's."""
        return int(self._cell[0]) if self._iter_epoch is None else self._iter_epoch

    @property
    def tag(self) -> int:
        """Names the running (or last) iteration: its generation and epoch (see skiplog.py)."""
        return (int(self._cell[1]) << 32) + self.epoch

    @property
    def managed(self) -> int | None:
        """While shardkit's loader starts its workers: the epoch of that iteration, else None."""
        return self._managed

    @property
    def plain_loader_iterating(self) -> bool:
        """Whether a plain DataLoader's workers iterated since the last ``set_epoch``, loaded
        state or advance (the main process cannot know what such a loader handed out)."""
        return int(self._cell[2]) == int(self._cell[1]) + 1

    def set_epoch(self, epoch: int) -> bool:
        """Set the epoch of the next iteration; returns whether it differs from the current one."""
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        changed = epoch != self.epoch
        self._set(epoch)
        return changed

    def _set(self, epoch: int) -> None:
        self._cell[0] = epoch
        self._cell[1] += 1
        self._advance = False

    def resume_at(self, epoch: int, in_worker: bool) -> None:
        """A state of ``epoch`` was loaded: the next iteration resumes that epoch (``in_worker``:
        loaded in a DataLoader worker, as torchdata's StatefulDataLoader does: only that
        worker's next iteration)."""
        if in_worker:
            self._iter_epoch = self._loaded_epoch = epoch
        else:
            self._set(epoch)

    def start_iteration(self) -> bool:
        """In the main process, before an iteration (its own, or a loader's workers'): the epoch
        advances by one unless ``set_epoch`` or ``resume_at`` came since the last one. Returns
        whether it advanced."""
        advanced = self._advance
        if advanced:
            self.set_epoch(self.epoch + 1)
        self._advance = True
        return advanced

    def start_worker_iteration(self, worker: int, num_workers: int) -> int:
        """In DataLoader worker ``worker`` of ``num_workers``: fix the epoch of the iteration it
        starts (:attr:`epoch` from now on) and return it."""
        self._iter_epoch = self._worker_epoch(worker, num_workers)
        return self._iter_epoch

    def _worker_epoch(self, worker: int, num_workers: int) -> int:
        """Under shardkit's loader the main process has advanced the epoch already; under a
        plain DataLoader each worker advances its own slot, which all workers of that loader do
        alike."""
        gen = int(self._cell[1])
        first, self._pid = self._pid != os.getpid(), os.getpid()
        if self._managed is not None and self._loaded_epoch is None:
            # A new worker takes the epoch it was started for: the main process may start another
            # iteration (and advance the cell) before this one reads it.
            return self._managed if first else int(self._cell[0])
        self._cell[2] = gen + 1  # the main process cannot count what a plain DataLoader hands out
        slot = self._slots[num_workers, worker] if num_workers <= PLAIN_WORKERS else None
        if self._loaded_epoch is not None:  # a state loaded in this worker (StatefulDataLoader)
            epoch, self._loaded_epoch = self._loaded_epoch, None
        elif slot is not None and int(slot[0]) == gen + 1:
            epoch = int(slot[1]) + 1
        else:
            epoch = int(self._cell[0])
        if slot is not None:
            slot[0], slot[1] = gen + 1, epoch
        return epoch

    def manage(self, epoch: int | None) -> None:
        """shardkit's loader starts workers for an iteration of ``epoch`` (None: it has)."""
        self._managed = epoch


@dataclass
class Progress:
    """What shardkit's loader counted in the main process during one iteration: the items (samples
    or batches) it handed to the user."""

    num_workers: int
    epoch: int
    shift: int = 0
    base: dict[str, int] = field(default_factory=dict)  # per role, consumed before this iteration
    items: int = 0
    report: Callable[[set], None] | None = None  # logs bad shards not logged yet
    logged: set = field(default_factory=set)
    _next_report: float = 0.0

    def handed_out(self) -> None:
        """One more item goes to the user (call it before yielding: the batch is still mapped)."""
        self.items += 1
        if self.report is not None and time.monotonic() >= self._next_report:
            self._next_report = time.monotonic() + REPORT_EVERY
            self.report(self.logged)

    def restart(self) -> None:
        """Count from zero again: the next iteration of this process (another epoch)."""
        self.items = 0

    def finish(self, _finalizing: Callable[[], bool] = sys.is_finalizing) -> None:
        """The iteration is over: log the bad shards found since the last look (not while the
        interpreter shuts down: an iterator left open at exit is closed then, when module globals
        are already gone; hence the function kept as a default argument)."""
        if self.report is not None and not _finalizing():
            self.report(self.logged)
