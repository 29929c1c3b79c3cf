"""The ``torch.distributed`` side of the read path: which rank this process is, and the
collective that gathers every rank's state into the job's global state.

Nothing here is needed without a process group: :func:`dist_rank_world` falls back on the
``RANK`` and ``WORLD_SIZE`` variables (torchrun sets them), then on a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType
from typing import Callable


def initialized_dist() -> ModuleType | None:
    """``torch.distributed`` when a process group is initialized, else None."""
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    try:
        return dist if dist.is_available() and dist.is_initialized() else None
    except RuntimeError:
        return None


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


@dataclass(frozen=True)
class RankWorld:
    """A dataset's rank and world size: as given, or (None) :func:`dist_rank_world`'s at each
    look."""

    rank: int | None = None
    world_size: int | None = None

    def get(self) -> tuple[int, int]:
        """``(rank, world_size)``."""
        if self.rank is not None and self.world_size is not None:
            return self.rank, self.world_size
        return dist_rank_world()

    def fixed(self) -> RankWorld:
        """This one, with the rank and world size fixed now (for a spawned DataLoader worker:
        ``torch.distributed`` is not initialized there)."""
        return self if self.world_size is not None else RankWorld(*dist_rank_world())


def gather_states(local: dict, merge: Callable[[list], dict], *,
                  gather: bool | None = None) -> dict:
    """The job's global state from this rank's ``local`` state, or ``local`` itself.

    ``gather`` None: gather when a process group of more than one process is initialized and
    the dataset has more than one rank (``local["world_size"]``); True: always (it needs a
    process group); False: never. Gathering is a **collective** (``all_gather_object``): every
    rank must call it; each gets ``merge(states)`` of every rank's state.
    """
    if gather is False:
        return local
    dist = initialized_dist()
    if gather is None:
        gather = dist is not None and dist.get_world_size() > 1 and local["world_size"] > 1
    if not gather:
        return local
    if dist is None:
        raise ValueError("state_dict(gather=True) needs an initialized torch.distributed "
                         "process group")
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, local)
    return merge(states)
