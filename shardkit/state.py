"""Epoch and checkpoint state of one dataset: which epoch, which plan is in force, and exact or
elastic mid-epoch resume.

:class:`EpochState` composes the parts, one idea each:

- :mod:`shardkit.epochs` — the epoch, shared with DataLoader workers (:class:`EpochCounter`);
- :mod:`shardkit.resume` — the state format, merging ranks' states, and deciding and computing
  exact and elastic resume (pure);
- :mod:`shardkit.distributed` — the rank and world size (``torch.distributed`` or torchrun's
  variables);
- :mod:`shardkit.loaderlink` — shardkit's loader's side (:class:`~shardkit.loaderlink.LoaderLink`,
  :class:`~shardkit.epochs.Progress`), which tells this state what the loader handed out.

It holds what a dataset's iterations leave behind (the resume waiting for its epoch, the rest plan
of an elastic resume, the samples emitted), computes each worker's plan for the epoch, and the
state dicts.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable

from . import plan as planlib
from . import resume as resumelib
from .config import PlanConfig
from .distributed import RankWorld
from .epochs import EpochCounter, Progress
from .layout import Layout
from .resume import STATE_VERSION, RestPlan

if TYPE_CHECKING:
    from torch.utils.data._utils.worker import WorkerInfo

    from .recycle import RecycleSpec

__all__ = ["STATE_VERSION", "EpochState"]

PLAIN_LOADER_STATE = (
    "state_dict(): this epoch is read by the workers of a plain DataLoader, which "
    "does not tell the dataset what it handed to the user, so the state would be "
    "wrong; use shardkit.make_loader(ds) (then loader.state_dict() or "
    "ds.state_dict()), or torchdata's StatefulDataLoader (its state_dict())")


class EpochState:
    """The epoch, the plan in force and the resume state of one dataset (see the module doc).

    ``plan``: the plan settings and seed (``block_size`` None: ``block_default()`` decides, when
    first needed, unless a loaded global state recorded one); ``layout(epoch)``: the epoch's
    global stream (:class:`~shardkit.layout.Layout`; the manifests load on first use);
    ``num_samples()``: the samples of the dataset (of all its sources); ``mixture()``: what a
    state records of its sources and shares (None: one dataset read whole);
    ``rank``/``world_size`` None: see :class:`RankWorld`.
    """

    def __init__(self, *, plan: PlanConfig, rank: int | None, world_size: int | None,
                 layout: Callable[[int], Layout], num_samples: Callable[[], int],
                 mixture: Callable[[], dict | None] = lambda: None,
                 block_default: Callable[[], int] | None = None) -> None:
        self._plan = plan  # block_size None until resolved (see _config)
        self._block_default = block_default
        self._layout = layout
        self._num_samples = num_samples
        self._mixture = mixture
        self._ranks = RankWorld(rank, world_size)
        self._epochs = EpochCounter()
        self._resume: dict | None = None  # applied to the next iteration of its epoch
        self._rest: RestPlan | None = None  # an elastic resume's rest plan, in force for its epoch
        self._emitted = 0  # samples this process's iterator has emitted (worker state)
        self._begin_consumed = 0  # of them, consumed before its iteration began (a resume)
        self._role = 0
        self._progress: Progress | None = None  # shardkit's loader: items handed to the user
        self._recycle: RecycleSpec | None = None  # shardkit's loader, for the workers it starts
        # (epoch, shuffle_start) of a loaded state whose orders started otherwise (a state
        # from before shuffle_start existed: whole buffers): in force for that epoch only
        self._start_for: tuple[int, int] | None = None

    def __getstate__(self) -> dict:
        # for a spawned DataLoader worker, where torch.distributed is not initialized
        return {**self.__dict__, "_ranks": self._ranks.fixed()}

    # ----------------------------------------------------------------- what others read
    @property
    def _config(self) -> PlanConfig:
        """The plan settings, a default block size resolved (and kept)."""
        if self._plan.block_size is None:
            if self._block_default is None:
                raise TypeError("EpochState: plan.block_size is None and no block_default given")
            self._plan = self._plan.resolved(self._block_default())
        start = self._start_for
        if start is not None and start[0] == self.epoch and start[1] != self._plan.shuffle_start:
            return replace(self._plan, shuffle_start=start[1])  # a loaded state's epoch
        return self._plan

    @property
    def shuffle_buffer(self) -> int:
        """The plan's shuffle buffer size (samples a worker holds)."""
        return self._plan.shuffle_buffer

    @property
    def seed(self) -> int:
        """The plan's seed."""
        return self._plan.seed

    @property
    def settings(self) -> dict[str, Any]:
        """The plan settings (``PLAN_SETTINGS``), a default block size resolved, and for a
        mixture or an epoch size what the epochs take of each source (``"mixture"``)."""
        settings = self._config.settings()
        mixture = self._mixture()
        if mixture is not None:
            settings["mixture"] = mixture
        return settings

    @property
    def epoch(self) -> int:
        """The epoch: of the running iteration in a DataLoader worker, else the dataset's."""
        return self._epochs.epoch

    @property
    def tag(self) -> int:
        """Names the running (or last) iteration: its generation and epoch (see skiplog.py)."""
        return self._epochs.tag

    @property
    def role(self) -> int:
        """The plan worker this process's running (or last) iteration plays."""
        return self._role

    @property
    def managed(self) -> int | None:
        """While shardkit's loader starts its workers: the epoch of that iteration, else None."""
        return self._epochs.managed

    @property
    def recycle(self) -> RecycleSpec | None:
        """While shardkit's loader starts its workers: their recycle spec, if any."""
        return self._recycle

    def rank_world(self) -> tuple[int, int]:
        """``(rank, world_size)`` of this dataset."""
        return self._ranks.get()

    # ----------------------------------------------------------------- epochs
    def set_epoch(self, epoch: int) -> None:
        changed = self._epochs.set_epoch(epoch)
        self._entered(epoch, changed)

    def start_iteration(self) -> None:
        """In the main process, before an iteration (its own, or a loader's workers'): the epoch
        advances by one unless ``set_epoch`` or ``load_state_dict`` came since the last one."""
        if self._epochs.start_iteration():
            self._entered(self.epoch, changed=True)

    def _entered(self, epoch: int, changed: bool) -> None:
        """The epoch was set to ``epoch`` (``changed``: another one): forget what belongs to
        others."""
        if self._resume is not None and self._resume["epoch"] != epoch:
            self._resume = None
        if self._rest is not None and self._rest.epoch != epoch:
            self._rest = None
        if self._start_for is not None and self._start_for[0] != epoch:
            self._start_for = None
        if changed:  # progress counts belong to the previous epoch
            self._emitted = self._begin_consumed = 0
            if self._progress is not None and self._progress.num_workers == 0:
                self._progress.restart()  # counts this process's next iteration (count_items)
            else:
                self._progress = None

    # ----------------------------------------------------------------- plans
    def num_items(self) -> int:
        """Samples (or, with a batch size, batches) each rank yields in the plan in force."""
        _, world = self.rank_world()
        config = self._config  # (resolved before the sizes are needed, as ever)
        return resumelib.items_in_force(self._layout(self.epoch), config, self._rest_in_force(),
                                        world)

    def plan(self, role: int, num_workers: int) -> planlib.WorkerPlan:
        """What plan worker ``role`` of ``num_workers`` of this rank reads this epoch."""
        rank, world = self.rank_world()
        config = self._config  # (resolved first: the layout's blocks need it)
        layout, rest = self._layout(self.epoch), self._rest_in_force()
        return resumelib.plan_in_force(layout, config, rest, epoch=self.epoch, rank=rank,
                                       world_size=world, worker=role, num_workers=num_workers)

    def _rest_in_force(self) -> RestPlan | None:
        rest = self._rest
        return rest if rest is not None and rest.epoch == self.epoch else None

    def _rest_plan(self, epoch: int, state: dict | None) -> RestPlan | None:
        """The rest plan of global state ``state`` for ``epoch`` (None: none), computed once
        here, before workers copy the dataset."""
        if state is None:
            return None
        return RestPlan.of(epoch, state, layout=self._layout(epoch), settings=self.settings)

    # ----------------------------------------------------------------- iterations
    def begin(self, worker: int, num_workers: int, in_worker: bool) -> int:
        """An iteration of DataLoader worker ``worker`` starts (``in_worker``: in a worker
        process, else in the main process): fix its epoch, apply a resume of that epoch; returns
        how many samples of its role's plan were consumed before (``self.role``)."""
        if in_worker:
            self._epochs.start_worker_iteration(worker, num_workers)
        else:
            self.start_iteration()
        self.resolve_resume(num_workers)
        role, consumed = worker % num_workers, 0
        if self._resume is not None and self._resume["epoch"] == self.epoch:
            resume, self._resume = self._resume, None
            role, consumed = resumelib.worker_start(resume, worker, num_workers)
        self._role, self._emitted = role, consumed
        self._begin_consumed = consumed
        return consumed

    def count(self, n: int) -> None:
        """The running iteration emitted ``n`` more samples."""
        self._emitted += n

    def start_loader_iteration(self, num_workers: int,
                               recycle: RecycleSpec | None) -> dict | None:
        """shardkit's loader starts (or reuses) ``num_workers`` workers for its next iteration:
        the epoch advances (:meth:`start_iteration`), a pending global state is resolved, and
        until :meth:`loader_workers_started` the workers it starts take this epoch and
        ``recycle`` spec. Returns the resume they apply (None: none; the loader counts from it)."""
        self.start_iteration()  # the next epoch, unless set_epoch or a loaded state came first
        self.resolve_resume(num_workers)
        resume = self._resume
        self._recycle = recycle
        self._epochs.manage(self.epoch)
        return resume if resume is not None and resume["epoch"] == self.epoch else None

    def loader_workers_started(self, progress: Progress | None) -> None:
        """The loader's workers have their copies (``progress`` None: starting them failed): the
        epoch and recycle spec were for them only. They took the resume, and from now on
        ``progress`` counts what the loader hands to the user."""
        self._recycle = None
        self._epochs.manage(None)
        if progress is not None:
            self._resume, self._progress = None, progress

    def count_own_items(self, progress: Progress | None) -> None:
        """Without worker processes: ``progress`` counts the items of this process's iteration
        that the loader handed out (None: the dataset counts what it emits)."""
        self._progress = progress

    # ----------------------------------------------------------------- state dicts
    def local_state(self, worker_info: WorkerInfo | None) -> dict:
        """This rank's state (inside a DataLoader worker: that worker's own). Once every sample
        of the epoch was consumed it is the next epoch's start: resuming from it starts there.
        (Not a worker's own state: the others may not be done; all of them move on together at
        the next iteration.)"""
        rank, world = self.rank_world()
        if worker_info is not None:
            progress: dict[str, Any] = {"num_workers": worker_info.num_workers, "shift": 0,
                        "consumed": {str(self._role): self._emitted}}
        elif self._progress is not None:
            progress = self._progress_state(self._progress)
        elif self._epochs.plain_loader_iterating:
            raise ValueError(PLAIN_LOADER_STATE)
        else:
            progress = {"num_workers": 1, "shift": 0, "consumed": {"0": self._emitted}}
        start = self._config.shuffle_start
        assert start is not None, "PlanConfig resolves shuffle_start"
        state = resumelib.rank_state(seed=self.seed, epoch=self.epoch, rank=rank, world_size=world,
                                     shuffle_start=start, **progress)
        if worker_info is None and self._finished(state):
            return self._marked(resumelib.rank_state(
                seed=self.seed, epoch=self.epoch + 1, rank=rank, world_size=world,
                num_workers=state["num_workers"], shift=0, consumed={}, shuffle_start=start))
        rest = self._rest_in_force()
        if rest is not None:
            state["base"] = rest.state
        return self._marked(state)

    def _marked(self, state: dict) -> dict:
        """A rank's state with what it was taken over, for a mixture or an epoch size."""
        mixture = self._mixture()
        if mixture is not None:
            state["mixture"] = mixture
        return state

    def _finished(self, state: dict) -> bool:
        """Whether ``state`` (a rank's) has consumed every sample of its plans this epoch."""
        workers = state["num_workers"]
        return resumelib.finished(state["consumed"],
                                  (self.plan(r, workers).num_samples for r in range(workers)))

    def _progress_state(self, p: Progress) -> dict[str, Any]:
        """Per-role samples consumed, from the number of items the loader handed to the user."""
        batched = self._config.batch_size is not None
        workers = max(1, p.num_workers)  # 0: items of this process's own iteration
        role_items = [resumelib.item_sizes(self.plan(role, workers), batched)
                      for role in range(workers)]
        if p.num_workers == 0:
            return resumelib.own_consumed(role_items[0], self._begin_consumed, p.items)
        return resumelib.loader_consumed(role_items, shift=p.shift, base=p.base, items=p.items)

    def merge_states(self, states: Iterable[dict]) -> dict:
        """The global state of a job from its ranks' own states (see
        :meth:`shardkit.StreamingDataset.merge_states`)."""
        return resumelib.merge_states(states, num_samples=self._num_samples(),
                                      settings=self.settings)

    def load_state_dict(self, state: dict, worker_info: WorkerInfo | None) -> None:
        """See :meth:`shardkit.StreamingDataset.load_state_dict`."""
        resumelib.check_loadable(state, self.seed, self._mixture())
        # The shuffle start its counts are positions under (a state from before it was recorded:
        # whole buffers): the plans of its epoch are made with it, so it resumes exactly.
        recorded = resumelib.recorded_start(state, self._plan.settings())
        self._start_for = (state["epoch"], recorded)
        if "plan" in state and "shuffle_start" not in state["plan"]:
            state = {**state, "plan": {**state["plan"], "shuffle_start": recorded}}
        rank, world = self.rank_world()
        block_size = resumelib.recorded_block_size(state)
        if self._plan.block_size is None and block_size is not None:
            self._plan = self._plan.resolved(block_size)  # a default: the state's own
        self._epochs.resume_at(state["epoch"], in_worker=worker_info is not None)
        if "ranks" not in state:  # one rank's state
            if worker_info is not None and self._resume is not None:  # merge per-worker states
                self._resume["consumed"].update(state["consumed"])
                return
            if worker_info is None and state["world_size"] == 1 and "rank" in state:
                state = self.merge_states([state])  # a whole job's state: resumes with anything
            else:
                resumelib.check_rank_state(state, rank, world)
                self._rest = None
                self._rest = self._rest_plan(state["epoch"], state.get("base"))
                self._resume = resumelib.rank_resume(state)
                return
        resumelib.check_plan(state, num_samples=self._num_samples(), settings=self.settings)
        self._rest, self._resume = None, dict(state)
        self.resolve_resume(None)

    def resolve_resume(self, num_workers: int | None) -> None:
        """Turn a pending global state into this rank's exact resume or an elastic rest plan.

        ``num_workers`` is the loader's (None: not known yet; then only a world size change can
        be decided).
        """
        state = self._resume
        if state is None or "ranks" not in state or state["epoch"] != self.epoch:
            return
        rank, world = self.rank_world()
        decided = resumelib.resolve(state, rank=rank, world_size=world, num_workers=num_workers,
                                    settings=self.settings)
        if decided is None:
            return
        if decided.resume is None:
            self._resume = None  # (also when the rest plan below cannot be made)
        self._rest = self._rest_plan(state["epoch"], decided.rest_from)
        self._resume = decided.resume
