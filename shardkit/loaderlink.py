"""The contract between shardkit's loader and a dataset's :class:`~shardkit.state.EpochState`.

shardkit's loader hands out worker results round-robin and counts them (:class:`Progress`); the
items consumed per worker follow from that count, which makes ``state_dict()`` exact with worker
processes. :class:`LoaderLink` wraps the start of each iteration's workers: the epoch and recycle
spec reach the workers it starts (they copy the dataset), a resume is handed to them and then
cleared, and the state learns which :class:`Progress` counts the iteration.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Callable

from .epochs import Progress

if TYPE_CHECKING:
    from .recycle import RecycleSpec
    from .state import EpochState


class LoaderLink:
    """The contract between shardkit's loader and a dataset's state, made by
    :meth:`shardkit.StreamingDataset.link_loader`.

    Making it resolves a loaded state for ``num_workers`` (so ``len()`` is right before the first
    iteration). :meth:`iteration` wraps the start of each iteration's workers: the recycle spec
    reaches the workers it starts (they copy the dataset), a resume is handed to them and then
    cleared here, and the :class:`Progress` it yields is what the loader counts."""

    def __init__(self, state: EpochState, num_workers: int,
                 report: Callable[[set], None] | None = None) -> None:
        self._state, self.num_workers = state, num_workers
        self._report = report  # logs bad shards its workers found, once each (see Progress)
        state.resolve_resume(max(1, num_workers))

    @contextlib.contextmanager
    def iteration(self, recycle: RecycleSpec | None = None,
                  count_items: bool = False) -> Iterator[Progress | None]:
        """Around ``DataLoader.__iter__`` (which starts or reuses the workers). Yields None with
        no worker processes (the dataset counts for itself), else the :class:`Progress` to
        update with :meth:`Progress.handed_out` per item. ``recycle``: the
        :class:`~shardkit.recycle.RecycleSpec` for workers started now. ``count_items``: count
        the items handed out even without workers (a pipeline between the dataset and the loader
        reads ahead of what it hands out: webdataset's ``batched`` takes the next sample before
        it yields a batch)."""
        st = self._state
        if self.num_workers == 0:  # the dataset iterates in this process
            st.resolve_resume(1)
            st.count_own_items(None)
            if not count_items:  # ... and counts for itself
                yield None
                return
            progress = Progress(num_workers=0, epoch=-1)
            yield progress
            st.count_own_items(progress)
            return
        resume = st.start_loader_iteration(self.num_workers, recycle)
        progress = Progress(num_workers=self.num_workers, epoch=st.epoch,
                            shift=resume.get("shift", 0) if resume else 0,
                            base=dict(resume["consumed"]) if resume else {},
                            report=self._report)
        started = None
        try:
            yield progress
            started = progress
        finally:
            st.loader_workers_started(started)  # (None: starting them failed)
