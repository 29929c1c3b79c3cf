"""A forked DataLoader worker leaves the objects it inherited out of its garbage collections."""

from __future__ import annotations

import gc

from shardkit import StreamingDataset, make_loader

from _helpers_read import datasets, folder, keys  # noqa: F401 - fixtures, used by name

BALLAST = 200_000


def _collector_view(sample):  # transform, run in the worker: what its collector walks
    return gc.get_freeze_count(), len(gc.get_objects())


def test_a_forked_worker_keeps_inherited_objects_out_of_its_collections(datasets, keys):
    ballast = [[i] for i in range(BALLAST)]  # the parent's heap, inherited by the worker
    ds = StreamingDataset(datasets["nine"], decode="raw", transform=_collector_view)
    loader = make_loader(ds, num_workers=1, persistent_workers=True)  # one worker, two epochs
    epochs = [[item[0] for item in loader] for _ in range(2)]
    views = [v for epoch in epochs for v in epoch]
    assert len(views) == 2 * len(keys)
    frozen = [f for f, _ in views]
    # the inherited objects (the ballast among them) are frozen once: the count only falls as
    # inherited objects die; the second epoch of the same worker froze nothing more (its own
    # garbage cycles stay collectable)
    assert min(frozen) > BALLAST
    assert all(b <= a for a, b in zip(frozen, frozen[1:])), frozen
    assert all(tracked < BALLAST for _, tracked in views)  # a full collection walks only these
    assert len(ballast) == BALLAST
    # the parent's own collector is left alone
    assert gc.get_freeze_count() == 0
