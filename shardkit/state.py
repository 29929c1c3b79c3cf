"""Epoch and checkpoint state: which epoch, which plan is in force, and exact mid-epoch resume.

:class:`EpochState` holds the epoch in shared memory (DataLoader workers, persistent ones
included, hold a copy of the dataset made when they start and must still see ``set_epoch``), the
resume waiting for its epoch, and the rest plan of an elastic resume. It computes each worker's
plan for the epoch, and the state dicts.

Resume: a state says how many samples each plan worker ("role") of a rank emitted and which
DataLoader worker plays which role (``shift``). A global state (every rank's progress, from
:meth:`EpochState.merge_states`) resumes exactly (same keys, same order) with the same world
size, number of workers and plan settings; with any other it resumes *elastically*: the samples
of the epoch not yet emitted follow from the old plan and the counts
(:func:`shardkit.plan.rest_stream`) and are dealt afresh to the new ranks and workers
(:func:`shardkit.plan.rest_plan`). A state taken during such a resumed epoch records the state it
came from (``"base"``), so it can be resumed again, exactly or elastically.

The loader's side (:class:`LoaderLink`, :class:`Progress`): shardkit's loader hands out worker
results round-robin and counts them; the items consumed per worker follow from that count, which
makes ``state_dict()`` exact with worker processes.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from . import plan as planlib

STATE_VERSION = 1
PLAIN_WORKERS = 64  # a plain DataLoader's workers advance epochs by themselves up to this many
REPORT_EVERY = 1.0  # seconds between the main process's looks for bad shards its workers found
# Settings that decide a plan besides (seed, epoch, world size, workers); recorded in global states.
PLAN_SETTINGS = ("shuffle", "block_size", "shuffle_buffer", "remainder", "batch_size", "drop_last")


def dist_rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of ``torch.distributed`` when initialized, else of the ``RANK`` and
    ``WORLD_SIZE`` variables (torchrun sets them), else ``(0, 1)``."""
    dist = initialized_dist()
    if dist is not None:
        return dist.get_rank(), dist.get_world_size()
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    if rank is not None and world is not None:
        return int(rank), int(world)
    return 0, 1


def initialized_dist():
    """``torch.distributed`` when a process group is initialized, else None."""
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    try:
        return dist if dist.is_available() and dist.is_initialized() else None
    except RuntimeError:
        return None


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

    def finish(self, _finalizing=sys.is_finalizing) -> None:
        """The iteration is over: log the bad shards found since the last look (not while the
        interpreter shuts down: an iterator left open at exit is closed then, when module globals
        are already gone; hence the function kept as a default argument)."""
        if self.report is not None and not _finalizing():
            self.report(self.logged)


class EpochState:
    """The epoch, the plan in force and the resume state of one dataset (see the module doc)."""

    def __init__(self, *, seed: int, settings: dict, rank: int | None, world_size: int | None,
                 sizes: Callable[[], np.ndarray], block_default: Callable[[], int] | None = None):
        self.seed, self._settings = seed, dict(settings)  # PLAN_SETTINGS -> values
        # block_size None: the manifest decides, when first needed (see StreamingDataset)
        self._block_default = block_default
        self._sizes = sizes  # the manifest's samples per shard (loaded on first use)
        self._rank_arg, self._world_arg = rank, world_size
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
        self.managed: int | None = None
        self._pid = None  # the process whose iterations this copy counts (see _worker_epoch)
        self._iter_epoch: int | None = None  # in a worker: the epoch of its running iteration
        self._loaded_epoch: int | None = None  # in a worker: of a state loaded there
        self.resume: dict | None = None  # applied to the next iteration of its epoch
        self.rest: dict | None = None  # an elastic resume's rest plan, in force for its epoch
        self.emitted = 0  # samples this process's iterator has emitted (worker state)
        self.begin_consumed = 0  # of them, consumed before its iteration began (a resume)
        self.role = 0
        self.progress: Progress | None = None  # shardkit's loader: items handed to the user
        self.recycle = None  # shardkit's loader, for the workers it starts: a recycle.RecycleSpec

    @property
    def settings(self) -> dict:
        """The plan settings (``PLAN_SETTINGS``), a default block size resolved."""
        s = self._settings
        if s["block_size"] is None:
            s["block_size"] = self._block_default()
        return s

    def __getstate__(self) -> dict:
        # Pickled for a spawned DataLoader worker: torch.distributed is not initialized there, so
        # the rank and world size are fixed now, in the process that knows them.
        state = self.__dict__.copy()
        if state["_world_arg"] is None:
            state["_rank_arg"], state["_world_arg"] = self.rank_world()
        return state

    def rank_world(self) -> tuple[int, int]:
        if self._world_arg is not None:
            return self._rank_arg, self._world_arg
        return dist_rank_world()

    @property
    def epoch(self) -> int:
        """The epoch: of the running iteration in a DataLoader worker, else the dataset's."""
        return int(self._cell[0]) if self._iter_epoch is None else self._iter_epoch

    @property
    def tag(self) -> int:
        """Names the running (or last) iteration: its generation and epoch (see skiplog.py)."""
        return (int(self._cell[1]) << 32) + self.epoch

    def _set(self, epoch: int) -> None:
        self._cell[0] = epoch
        self._cell[1] += 1
        self._advance = False

    def set_epoch(self, epoch: int) -> None:
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        if self.resume is not None and self.resume["epoch"] != epoch:
            self.resume = None
        if self.rest is not None and self.rest["epoch"] != epoch:
            self.rest = None
        if epoch != self.epoch:  # progress counts belong to the previous epoch
            self.emitted = self.begin_consumed = 0
            if self.progress is not None and self.progress.num_workers == 0:
                self.progress.items = 0  # counts this process's next iteration (count_items)
            else:
                self.progress = None
        self._set(epoch)

    def start_iteration(self) -> None:
        """In the main process, before an iteration (its own, or a loader's workers'): the epoch
        advances by one unless ``set_epoch`` or ``load_state_dict`` came since the last one."""
        if self._advance:
            self.set_epoch(self.epoch + 1)
        self._advance = True

    def _worker_epoch(self, worker: int, num_workers: int) -> int:
        """In a DataLoader worker: the epoch of the iteration it starts. Under shardkit's loader
        the main process has advanced it already; under a plain DataLoader each worker advances
        its own slot, which all workers of that loader do alike."""
        gen = int(self._cell[1])
        first, self._pid = self._pid != os.getpid(), os.getpid()
        if self.managed is not None and self._loaded_epoch is None:
            # A new worker takes the epoch it was started for: the main process may start another
            # iteration (and advance the cell) before this one reads it.
            return self.managed if first else int(self._cell[0])
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

    # ----------------------------------------------------------------- plans
    def num_items(self) -> int:
        """Samples (or, with a batch size, batches) each rank yields in the plan in force."""
        _, world = self.rank_world()
        s = self.settings
        kw = dict(remainder=s["remainder"], batch_size=s["batch_size"], drop_last=s["drop_last"])
        sizes = self._sizes()
        rest = self._rest_in_force()
        if rest is not None:
            stream = self._rest_stream(rest)
            sizes = [int((stream[:, 1] - stream[:, 0]).sum())]
            if sizes[0] == 0:
                return 0
        if s["batch_size"] is None:
            return planlib.rank_num_samples(sizes, world, **kw)
        return planlib.rank_num_batches(sizes, world, **kw)

    def plan(self, role: int, num_workers: int) -> planlib.WorkerPlan:
        """What plan worker ``role`` of ``num_workers`` of this rank reads this epoch."""
        rank, world = self.rank_world()
        sizes = self._sizes()
        rest = self._rest_in_force()
        if rest is not None:
            return planlib.rest_plan(sizes, self._rest_stream(rest), seed=self.seed,
                                     epoch=self.epoch, rank=rank, world_size=world, worker=role,
                                     num_workers=num_workers, level=rest["level"], **self.settings)
        return planlib.epoch_plan(sizes, seed=self.seed, epoch=self.epoch, rank=rank,
                                  world_size=world, worker=role, num_workers=num_workers,
                                  **self.settings)

    def _rest_in_force(self) -> dict | None:
        rest = self.rest
        return rest if rest is not None and rest["epoch"] == self.epoch else None

    def begin(self, worker: int, num_workers: int, in_worker: bool) -> int:
        """An iteration of DataLoader worker ``worker`` starts (``in_worker``: in a worker
        process, else in the main process): fix its epoch, apply a resume of that epoch; returns
        how many samples of its role's plan were consumed before (``self.role``)."""
        if in_worker:
            self._iter_epoch = self._worker_epoch(worker, num_workers)
        else:
            self.start_iteration()
        self.resolve_resume(num_workers)
        consumed, shift = 0, 0
        if self.resume is not None and self.resume["epoch"] == self.epoch:
            state, self.resume = self.resume, None
            if state["num_workers"] != num_workers and any(state["consumed"].values()):
                raise ValueError(f"the state of rank {state.get('rank')} was saved with "
                                 f"{state['num_workers']} loader workers; resume it with the same "
                                 f"number (got {num_workers}), or resume from the global state "
                                 "(state_dict() under torch.distributed, or merge_states()), which "
                                 "takes any number")
            shift = state.get("shift", 0)
            consumed = state["consumed"].get(str((worker + shift) % num_workers), 0)
        self.role, self.emitted = (worker + shift) % num_workers, consumed
        self.begin_consumed = consumed
        return consumed

    # ----------------------------------------------------------------- state dicts
    def local_state(self, worker_info) -> dict:
        """This rank's state (inside a DataLoader worker: that worker's own). Once every sample
        of the epoch was consumed it is the next epoch's start: resuming from it starts there.
        (Not a worker's own state: the others may not be done; all of them move on together at
        the next iteration.)"""
        rank, world = self.rank_world()
        base = {"version": STATE_VERSION, "seed": self.seed, "epoch": self.epoch, "rank": rank,
                "world_size": world}
        if worker_info is not None:
            state = {**base, "num_workers": worker_info.num_workers, "shift": 0,
                     "consumed": {str(self.role): self.emitted}}
        elif self.progress is not None:
            state = {**base, **self._progress_state()}
        elif int(self._cell[2]) == int(self._cell[1]) + 1:
            raise ValueError(
                "state_dict(): this epoch is read by the workers of a plain DataLoader, which "
                "does not tell the dataset what it handed to the user, so the state would be "
                "wrong; use shardkit.make_loader(ds) (then loader.state_dict() or "
                "ds.state_dict()), or torchdata's StatefulDataLoader (its state_dict())")
        else:
            state = {**base, "num_workers": 1, "shift": 0, "consumed": {"0": self.emitted}}
        if worker_info is None and self._finished(state):
            return {**base, "epoch": self.epoch + 1, "num_workers": state["num_workers"],
                    "shift": 0, "consumed": {}}
        rest = self._rest_in_force()
        if rest is not None:
            state["base"] = rest["state"]
        return state

    def _finished(self, state: dict) -> bool:
        """Whether ``state`` (a rank's) has consumed every sample of its plans this epoch."""
        workers = state["num_workers"]
        roles = range(workers)
        consumed = state["consumed"]
        if not consumed or not any(consumed.values()):
            return False
        return all(int(consumed.get(str(r), 0)) >= self.plan(r, workers).num_samples
                   for r in roles)

    def merge_states(self, states) -> dict:
        """The global state of a job from its ranks' own states (see
        :meth:`shardkit.StreamingDataset.merge_states`)."""
        states = list(states)
        if not states:
            raise ValueError("merge_states needs at least one state")
        first = states[0]
        fields = ("version", "seed", "epoch", "world_size", "num_workers")
        ranks: dict[str, dict] = {}
        for state in states:
            if "ranks" in state:
                raise ValueError("merge_states takes per-rank states; this one is already global")
            for name in (*fields, "base"):
                if state.get(name) != first.get(name):
                    raise ValueError(f"the states disagree on {name!r}: {first.get(name)!r} and "
                                     f"{state.get(name)!r} (every rank must use the same "
                                     "settings and number of loader workers)")
            entry = {"shift": state.get("shift", 0), "consumed": dict(state["consumed"])}
            rank = str(state["rank"])
            if ranks.setdefault(rank, entry) != entry:
                raise ValueError(f"two different states for rank {rank}")
        world = first["world_size"]
        missing = sorted(set(range(world)) - {int(r) for r in ranks})
        if missing:
            raise ValueError(f"no state for ranks {missing} of world_size {world}")
        out = {name: first[name] for name in fields}
        out["plan"] = {"num_samples": int(sum(self._sizes())), **self.settings}
        out["ranks"] = {r: ranks[r] for r in sorted(ranks, key=int)}
        if first.get("base") is not None:
            out["base"] = first["base"]
        return out

    def load_state_dict(self, state: dict, worker_info) -> None:
        """See :meth:`shardkit.StreamingDataset.load_state_dict`."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported state version {state.get('version')!r}")
        rank, world = self.rank_world()
        if state["seed"] != self.seed:
            raise ValueError(f"state is from seed={state['seed']}; this dataset has seed={self.seed}")
        plan = state.get("plan")
        if self._settings["block_size"] is None and isinstance(plan, dict) \
                and isinstance(plan.get("block_size"), int):
            self._settings["block_size"] = plan["block_size"]  # a default: the state's own
        if worker_info is None:
            self._set(state["epoch"])  # the next iteration resumes this epoch
        else:  # a state loaded in a worker (StatefulDataLoader): its next iteration resumes it
            self._iter_epoch = self._loaded_epoch = state["epoch"]
        if "ranks" not in state:  # one rank's state
            if worker_info is not None and self.resume is not None:  # merge per-worker states
                self.resume["consumed"].update(state["consumed"])
                return
            if worker_info is None and state["world_size"] == 1 and "rank" in state:
                state = self.merge_states([state])  # a whole job's state: resumes with anything
            elif state["world_size"] != world or state.get("rank", rank) != rank:
                raise ValueError(
                    f"this state holds only rank {state.get('rank')}'s progress (of world_size="
                    f"{state['world_size']}); this dataset is rank {rank} of {world}. Resuming "
                    "with another world size needs every rank's state: call state_dict() on every "
                    "rank with the process group initialized (it gathers them), or combine the "
                    "ranks' states with merge_states()")
            else:
                self.rest = None
                if state.get("base") is not None:
                    self.rest = self._new_rest(state["epoch"], state["base"])
                self.resume = {"epoch": state["epoch"], "num_workers": state["num_workers"],
                               "shift": state.get("shift", 0), "consumed": dict(state["consumed"])}
                return
        self._check_plan(state)
        self.rest, self.resume = None, dict(state)
        self.resolve_resume(None)

    def resolve_resume(self, num_workers: int | None) -> None:
        """Turn a pending global state into this rank's exact resume or an elastic rest plan.

        ``num_workers`` is the loader's (None: not known yet; then only a world size change can
        be decided).
        """
        state = self.resume
        if state is None or "ranks" not in state or state["epoch"] != self.epoch:
            return
        rank, world = self.rank_world()
        same_plan = (state["world_size"] == world and
                     all(state["plan"].get(k) == v for k, v in self.settings.items()))
        if same_plan and num_workers is None:
            return
        epoch, base = state["epoch"], state.get("base")
        if same_plan and state["num_workers"] == num_workers:
            own = state["ranks"][str(rank)]
            self.rest = None if base is None else self._new_rest(epoch, base)
            self.resume = {"epoch": epoch, "num_workers": num_workers, "rank": rank,
                           "shift": own["shift"], "consumed": dict(own["consumed"])}
            return
        self.resume = None
        started = any(any(r["consumed"].values()) for r in state["ranks"].values())
        self.rest = self._new_rest(epoch, state) if started or base is not None else None

    def _new_rest(self, epoch: int, state: dict) -> dict:
        rest = {"epoch": epoch, "state": state, "stream": None, "level": None}
        self._rest_stream(rest)  # computed once here, before workers copy the dataset
        return rest

    def _rest_stream(self, rest: dict):
        if rest["stream"] is None:
            rest["stream"], rest["level"] = self._stream_of(rest["state"])
        return rest["stream"]

    def _stream_of(self, state: dict):
        """The rest stream left by global state ``state`` and the level of its rest plan."""
        base = state.get("base")
        stream, level = (None, 0) if base is None else self._stream_of(base)
        self._check_plan(state)
        plan = state["plan"]
        world, workers = state["world_size"], state["num_workers"]
        consumed = [[int(state["ranks"][str(r)]["consumed"].get(str(w), 0)) for w in range(workers)]
                    for r in range(world)]
        out = planlib.rest_stream(self._sizes(), consumed, seed=state["seed"],
                                  epoch=state["epoch"], world_size=world, num_workers=workers,
                                  stream=stream, level=level, shuffle=plan["shuffle"],
                                  shuffle_buffer=plan["shuffle_buffer"],
                                  remainder=plan["remainder"], batch_size=plan["batch_size"],
                                  drop_last=plan["drop_last"])
        return out, level + 1

    def _check_plan(self, state: dict) -> None:
        """A global state's plan must be over this dataset's samples and global stream."""
        plan, total = state.get("plan", {}), int(sum(self._sizes()))
        if plan.get("num_samples") != total:
            raise ValueError(f"the state is of a dataset of {plan.get('num_samples')} samples; "
                             f"this one has {total}: a changed dataset cannot resume mid-epoch")
        for name in ("shuffle", "block_size"):
            if plan.get(name) != self.settings[name]:
                raise ValueError(f"the state was taken with {name}={plan.get(name)!r}; it decides "
                                 f"the epoch's order, so resume with the same (got "
                                 f"{self.settings[name]!r})")

    def _progress_state(self) -> dict:
        """Per-role samples consumed, from the number of items the loader handed to the user."""
        p = self.progress
        W = p.num_workers
        if W == 0:  # items of this process's own iteration, which started at begin_consumed
            sizes, done, k = self._item_sizes(0, 1), self.begin_consumed, 0
            while k < len(sizes) and done > 0:
                done -= sizes[k]
                k += 1
            return {"num_workers": 1, "shift": 0,
                    "consumed": {"0": self.begin_consumed + sum(sizes[k:k + p.items])}}
        counts = []  # per DataLoader worker: remaining item sizes in order
        for j in range(W):
            role = (j + p.shift) % W
            item_sizes = self._item_sizes(role, W)
            done = p.base.get(str(role), 0)
            k = 0
            while k < len(item_sizes) and done > 0:
                done -= item_sizes[k]
                k += 1
            counts.append(item_sizes[k:])
        taken = [0] * W
        consumed = {str((j + p.shift) % W): p.base.get(str((j + p.shift) % W), 0)
                    for j in range(W)}
        k, next_j = p.items, 0
        while k > 0:  # the DataLoader's round-robin over the workers that still have items
            if not any(taken[w] < len(counts[w]) for w in range(W)):
                break
            for w in range(W):
                if k == 0:
                    break
                if taken[w] < len(counts[w]):
                    consumed[str((w + p.shift) % W)] += counts[w][taken[w]]
                    taken[w] += 1
                    k -= 1
                    next_j = (w + 1) % W
        return {"num_workers": W, "shift": (next_j + p.shift) % W if p.items else p.shift,
                "consumed": consumed}

    def _item_sizes(self, role: int, num_workers: int) -> list[int]:
        plan = self.plan(role, num_workers)
        return list(plan.batch_sizes) if self.settings["batch_size"] else [1] * plan.num_samples


class LoaderLink:
    """The contract between shardkit's loader and a dataset's state, made by
    :meth:`shardkit.StreamingDataset.link_loader`.

    Making it resolves a loaded state for ``num_workers`` (so ``len()`` is right before the first
    iteration). :meth:`iteration` wraps the start of each iteration's workers: the recycle spec
    reaches the workers it starts (they copy the dataset), a resume is handed to them and then
    cleared here, and the :class:`Progress` it yields is what the loader counts."""

    def __init__(self, state: EpochState, num_workers: int,
                 report: Callable[[set], None] | None = None):
        self._state, self.num_workers = state, num_workers
        self._report = report  # logs bad shards its workers found, once each (see Progress)
        state.resolve_resume(max(1, num_workers))

    @contextlib.contextmanager
    def iteration(self, recycle=None, count_items: bool = False) -> Iterator[Progress | None]:
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
            st.progress = None
            if not count_items:  # ... and counts for itself
                yield None
                return
            progress = Progress(num_workers=0, epoch=-1)
            yield progress
            st.progress = progress
            return
        st.start_iteration()  # the next epoch, unless set_epoch or a loaded state came first
        st.resolve_resume(self.num_workers)
        resume = st.resume if st.resume is not None and st.resume["epoch"] == st.epoch else None
        progress = Progress(num_workers=self.num_workers, epoch=st.epoch,
                            shift=resume.get("shift", 0) if resume else 0,
                            base=dict(resume["consumed"]) if resume else {},
                            report=self._report)
        st.recycle, st.managed = recycle, st.epoch
        try:
            yield progress
        finally:
            st.recycle, st.managed = None, None  # for this loader's workers only
        st.resume = None
        st.progress = progress
