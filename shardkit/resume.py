"""Resume, as pure computations over state dicts and :mod:`shardkit.plan` (no shared memory, no
``torch.distributed``): functions that take numbers and dicts and return new ones.

The state format. A rank's state is ``{"version", "seed", "epoch", "rank", "world_size",
"num_workers", "shift", "consumed", "shuffle_start"}``: how many samples each plan worker ("role")
of the rank emitted, and which DataLoader worker plays which role (``shift``: worker ``j`` plays
role ``(j + shift) % num_workers``); ``shuffle_start`` is the plan's (states saved before it
existed lack it: their shuffle buffers filled whole, ``shuffle_start = shuffle_buffer``). A
global state (:func:`merge_states`) holds every rank's ``{"shift", "consumed"}`` under
``"ranks"`` and the plan settings under ``"plan"``. A state taken
during an elastically resumed epoch records the global state that epoch resumed from under
``"base"``.

What resumes how: a global state resumes exactly (same keys, same order) with the same world
size, number of workers and plan settings (:func:`resolve`); with any other it resumes
*elastically*: the samples of the epoch not yet emitted follow from the old plan and the counts
(:func:`rest_stream_of`, built on :func:`shardkit.plan.rest_stream`) and are dealt afresh to the
new ranks and workers (:class:`RestPlan`, for :func:`shardkit.plan.rest_plan`).

The loader's count: shardkit's loader hands out worker results round-robin and counts them;
:func:`loader_consumed` turns that count into samples consumed per role.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from . import plan as planlib
from .config import PlanConfig
from .layout import Layout

STATE_VERSION = 1
STATE_FIELDS = ("version", "seed", "epoch", "world_size", "num_workers")  # shared by all ranks
Sizes = Union[Sequence[int], np.ndarray]  # samples per shard


# ----------------------------------------------------------------- encoding
def rank_state(*, seed: int, epoch: int, rank: int, world_size: int, num_workers: int,
               shift: int, consumed: Mapping[str, int], shuffle_start: int) -> dict:
    """A rank's (or one DataLoader worker's) state dict."""
    return {"version": STATE_VERSION, "seed": seed, "epoch": epoch, "rank": rank,
            "world_size": world_size, "num_workers": num_workers, "shift": shift,
            "consumed": dict(consumed), "shuffle_start": shuffle_start}


def recorded_start(state: dict, settings: Mapping[str, Any]) -> int:
    """The ``shuffle_start`` a state's orders were made with: recorded, or for a state saved
    before it existed the whole buffer (``settings``: this dataset's plan settings)."""
    plan = state.get("plan")
    if isinstance(plan, dict) and "shuffle_buffer" in plan:  # a global state's plan: both there
        return int(plan["shuffle_start"] if "shuffle_start" in plan else plan["shuffle_buffer"])
    return int(state["shuffle_start"] if "shuffle_start" in state else settings["shuffle_buffer"])


def merge_states(states: Iterable[dict], *, num_samples: int, settings: Mapping[str, Any]) -> dict:
    """The global state of a job from its ranks' own states, recording the plan ``settings``
    (``PLAN_SETTINGS``) and ``num_samples`` of the dataset under ``"plan"`` (see
    :meth:`shardkit.StreamingDataset.merge_states`)."""
    states = list(states)
    if not states:
        raise ValueError("merge_states needs at least one state")
    first = states[0]
    ranks: dict[str, dict] = {}
    for state in states:
        if "ranks" in state:
            raise ValueError("merge_states takes per-rank states; this one is already global")
        for name in (*STATE_FIELDS, "base", "mixture", "shuffle_start"):
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
    out = {name: first[name] for name in STATE_FIELDS}
    # the order the states' positions are in: a state from before shuffle_start filled whole
    out["plan"] = {"num_samples": int(num_samples), **settings,
                   "shuffle_start": recorded_start(first, settings)}
    out["ranks"] = {r: ranks[r] for r in sorted(ranks, key=int)}
    if first.get("base") is not None:
        out["base"] = first["base"]
    return out


# ----------------------------------------------------------------- checks
def check_loadable(state: dict, seed: int, mixture: Mapping[str, Any] | None = None) -> None:
    """A state of the right version, taken with this ``seed`` and these sources and shares
    (``mixture``, as settings record it; None: one dataset read whole)."""
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"unsupported state version {state.get('version')!r}")
    if state["seed"] != seed:
        raise ValueError(f"state is from seed={state['seed']}; this dataset has seed={seed}")
    plan = state.get("plan")
    recorded = state.get("mixture", plan.get("mixture") if isinstance(plan, dict) else None)
    if recorded != mixture:
        def said(m: Any) -> str:
            return "one dataset read whole" if m is None else f"sources and shares {m!r}"
        raise ValueError(f"the state was taken with {said(recorded)}; this dataset has "
                         f"{said(mixture)}: they decide the epoch's samples, so resume with the "
                         "same sources, shares and epoch_size")


def recorded_block_size(state: dict) -> int | None:
    """The block size a global state's plan records, if any."""
    plan = state.get("plan")
    if isinstance(plan, dict) and isinstance(plan.get("block_size"), int):
        return plan["block_size"]
    return None


def check_rank_state(state: dict, rank: int, world_size: int) -> None:
    """One rank's state resumes only that rank, with the same world size."""
    if state["world_size"] != world_size or state.get("rank", rank) != rank:
        raise ValueError(
            f"this state holds only rank {state.get('rank')}'s progress (of world_size="
            f"{state['world_size']}); this dataset is rank {rank} of {world_size}. Resuming "
            "with another world size needs every rank's state: call state_dict() on every "
            "rank with the process group initialized (it gathers them), or combine the "
            "ranks' states with merge_states()")


def check_plan(state: dict, *, num_samples: int, settings: Mapping[str, Any]) -> None:
    """A global state's plan must be over this dataset's samples and global stream."""
    plan, total = state.get("plan", {}), int(num_samples)
    if plan.get("num_samples") != total:
        raise ValueError(f"the state is of a dataset of {plan.get('num_samples')} samples; "
                         f"this one has {total}: a changed dataset cannot resume mid-epoch")
    if plan.get("mixture") != settings.get("mixture"):
        raise ValueError(f"the state was taken with sources and shares {plan.get('mixture')!r}; "
                         f"this dataset has {settings.get('mixture')!r}: they decide the "
                         "epoch's samples, so resume with the same sources, shares and epoch_size")
    for name in ("shuffle", "block_size"):
        if plan.get(name) != settings[name]:
            raise ValueError(f"the state was taken with {name}={plan.get(name)!r}; it decides "
                             f"the epoch's order, so resume with the same (got "
                             f"{settings[name]!r})")


# ----------------------------------------------------------------- exact resume
def rank_resume(state: dict) -> dict:
    """The pending resume of a rank's own state: applied to the next iteration of its epoch."""
    return {"epoch": state["epoch"], "num_workers": state["num_workers"],
            "shift": state.get("shift", 0), "consumed": dict(state["consumed"])}


def worker_start(resume: dict, worker: int, num_workers: int) -> tuple[int, int]:
    """``(role, consumed)`` of DataLoader worker ``worker`` of ``num_workers`` resuming
    ``resume`` (:func:`rank_resume`): the plan worker it plays, and how many samples of that
    plan were consumed before."""
    if resume["num_workers"] != num_workers and any(resume["consumed"].values()):
        raise ValueError(f"the state of rank {resume.get('rank')} was saved with "
                         f"{resume['num_workers']} loader workers; resume it with the same "
                         f"number (got {num_workers}), or resume from the global state "
                         "(state_dict() under torch.distributed, or merge_states()), which "
                         "takes any number")
    shift = resume.get("shift", 0)
    role = (worker + shift) % num_workers
    return role, resume["consumed"].get(str(role), 0)


@dataclass(frozen=True)
class Resolution:
    """What a global state resumes as on one rank: this rank's exact ``resume``
    (:func:`rank_resume`'s form, or None) and the global state whose rest plan is in force for
    the epoch (``rest_from``, or None)."""

    resume: dict | None
    rest_from: dict | None


def resolve(state: dict, *, rank: int, world_size: int, num_workers: int | None,
            settings: Mapping[str, Any]) -> Resolution | None:
    """Exact or elastic resume of global state ``state`` on ``rank`` of ``world_size`` with
    ``num_workers`` loader workers (None: not known yet; then only a change of world size or
    plan settings can be decided). None: not decided yet."""
    same_plan = (state["world_size"] == world_size and
                 all(state["plan"].get(k) == v for k, v in settings.items()))
    if same_plan and num_workers is None:
        return None
    epoch, base = state["epoch"], state.get("base")
    if same_plan and state["num_workers"] == num_workers:
        own = state["ranks"][str(rank)]
        return Resolution({"epoch": epoch, "num_workers": num_workers, "rank": rank,
                           "shift": own["shift"], "consumed": dict(own["consumed"])}, base)
    started = any(any(r["consumed"].values()) for r in state["ranks"].values())
    return Resolution(None, state if started or base is not None else None)


# ----------------------------------------------------------------- elastic resume
def rest_stream_of(state: dict, *, layout: Layout,
                   settings: Mapping[str, Any]) -> tuple[np.ndarray, int]:
    """The rest stream left by global state ``state`` (and the states it resumed from, under
    ``"base"``) and the level of its rest plan; each state's plan is checked against this
    dataset's (the epoch's ``layout`` and plan ``settings``)."""
    base = state.get("base")
    stream, level = (None, 0) if base is None else rest_stream_of(
        base, layout=layout, settings=settings)
    check_plan(state, num_samples=layout.num_samples, settings=settings)
    plan = state["plan"]
    if layout.unit > 1:
        raise ValueError("mix='per_source' resumes mid-epoch only exactly (the same world size, "
                         "loader workers and plan settings as the state): its batches are "
                         "whole batches of one source, which the rest of an epoch cannot be "
                         "dealt into afresh. Resume with the state's settings, or at the next "
                         "epoch (set_epoch)")
    world, workers = state["world_size"], state["num_workers"]
    consumed = [[int(state["ranks"][str(r)]["consumed"].get(str(w), 0)) for w in range(workers)]
                for r in range(world)]
    out = planlib.rest_stream(layout, consumed, seed=state["seed"], epoch=state["epoch"],
                              world_size=world, num_workers=workers, stream=stream, level=level,
                              shuffle=plan["shuffle"], shuffle_buffer=plan["shuffle_buffer"],
                              remainder=plan["remainder"], batch_size=plan["batch_size"],
                              drop_last=plan["drop_last"], block_size=plan["block_size"],
                              # a state from before shuffle buffers grew: they filled whole
                              shuffle_start=plan.get("shuffle_start", plan["shuffle_buffer"]))
    return out, level + 1


@dataclass(frozen=True)
class RestPlan:
    """An elastic resume's rest plan, in force for ``epoch``: the global state it resumes
    (``state``, recorded as the ``"base"`` of states taken meanwhile), the rest stream and the
    plan's level (see :func:`shardkit.plan.rest_plan`)."""

    epoch: int
    state: dict
    stream: np.ndarray
    level: int

    @classmethod
    def of(cls, epoch: int, state: dict, *, layout: Layout,
           settings: Mapping[str, Any]) -> RestPlan:
        """Computed once, when the resume is decided (before workers copy the dataset)."""
        stream, level = rest_stream_of(state, layout=layout, settings=settings)
        return cls(epoch, state, stream, level)

    @property
    def num_samples(self) -> int:
        """Samples of the epoch left to deal."""
        return int((self.stream[:, 1] - self.stream[:, 0]).sum())


def plan_in_force(shard_sizes: Sizes | Layout, config: PlanConfig, rest: RestPlan | None, *,
                  epoch: int, rank: int, world_size: int, worker: int,
                  num_workers: int) -> planlib.WorkerPlan:
    """What plan worker ``worker`` of ``num_workers`` of ``rank`` reads in ``epoch``: of the
    epoch plan of ``config`` (``block_size`` resolved), or of the ``rest`` plan in force."""
    assert config.block_size is not None, "resolve the plan's block size first"
    if rest is not None:
        return planlib.rest_plan(shard_sizes, rest.stream, seed=config.seed, epoch=epoch,
                                 rank=rank, world_size=world_size, worker=worker,
                                 num_workers=num_workers, level=rest.level,
                                 shuffle=config.shuffle, block_size=config.block_size,
                                 shuffle_buffer=config.shuffle_buffer,
                                 remainder=config.remainder, batch_size=config.batch_size,
                                 drop_last=config.drop_last, shuffle_start=config.shuffle_start)
    return planlib.epoch_plan(shard_sizes, seed=config.seed, epoch=epoch, rank=rank,
                              world_size=world_size, worker=worker, num_workers=num_workers,
                              shuffle=config.shuffle, block_size=config.block_size,
                              shuffle_buffer=config.shuffle_buffer, remainder=config.remainder,
                              batch_size=config.batch_size, drop_last=config.drop_last,
                              shuffle_start=config.shuffle_start)


def items_in_force(shard_sizes: Sizes | Layout, config: PlanConfig, rest: RestPlan | None,
                   world_size: int) -> int:
    """Samples (or, with a batch size, batches) each rank yields in the epoch plan of
    ``config``, or in the ``rest`` plan in force."""
    if rest is not None:
        if rest.num_samples == 0:
            return 0
        shard_sizes = [rest.num_samples]
    count = planlib.rank_num_samples if config.batch_size is None else planlib.rank_num_batches
    return count(shard_sizes, world_size, remainder=config.remainder,
                 batch_size=config.batch_size, drop_last=config.drop_last)


# ----------------------------------------------------------------- the loader's count
def item_sizes(plan: planlib.WorkerPlan, batched: bool) -> list[int]:
    """The samples in each item of ``plan``: its batches (``batched``), else its samples."""
    return list(plan.batch_sizes) if batched else [1] * plan.num_samples


def own_consumed(item_sizes: Sequence[int], begin_consumed: int, items: int) -> dict[str, Any]:
    """``{"num_workers", "shift", "consumed"}`` of an iteration in this process that started at
    ``begin_consumed`` samples of its plan (of items ``item_sizes``) and handed out ``items``."""
    done, k = begin_consumed, 0
    while k < len(item_sizes) and done > 0:
        done -= item_sizes[k]
        k += 1
    return {"num_workers": 1, "shift": 0,
            "consumed": {"0": begin_consumed + sum(item_sizes[k:k + items])}}


def loader_consumed(role_items: Sequence[Sequence[int]], *, shift: int,
                    base: Mapping[str, int], items: int) -> dict[str, Any]:
    """``{"num_workers", "shift", "consumed"}`` after a loader whose workers play roles shifted
    by ``shift`` (each role's items ``role_items[role]``, of which ``base`` samples per role were
    consumed before the iteration) handed out ``items`` round-robin."""
    W = len(role_items)
    counts = []  # per DataLoader worker: remaining item sizes in order
    for j in range(W):
        role = (j + shift) % W
        item_sizes = role_items[role]
        done = base.get(str(role), 0)
        k = 0
        while k < len(item_sizes) and done > 0:
            done -= item_sizes[k]
            k += 1
        counts.append(item_sizes[k:])
    taken = [0] * W
    consumed = {str((j + shift) % W): base.get(str((j + shift) % W), 0) for j in range(W)}
    k, next_j = items, 0
    while k > 0:  # the DataLoader's round-robin over the workers that still have items
        if not any(taken[w] < len(counts[w]) for w in range(W)):
            break
        for w in range(W):
            if k == 0:
                break
            if taken[w] < len(counts[w]):
                consumed[str((w + shift) % W)] += counts[w][taken[w]]
                taken[w] += 1
                k -= 1
                next_j = (w + 1) % W
    return {"num_workers": W, "shift": (next_j + shift) % W if items else shift,
            "consumed": consumed}


def finished(consumed: Mapping[str, int], role_samples: Iterable[int]) -> bool:
    """Whether a rank's ``consumed`` covers every sample of its roles' plans (``role_samples``,
    per role in order; read lazily, only when something was consumed)."""
    if not consumed or not any(consumed.values()):
        return False
    return all(int(consumed.get(str(r), 0)) >= n for r, n in enumerate(role_samples))
