"""A source for webdataset pipelines: shardkit's plan, webdataset's sample dicts.

``wds.DataPipeline(shardkit.wds_source(src, batch_size=64), wds.decode("torchrgb"),
wds.to_tuple("jpg", "cls"), wds.batched(64))`` keeps a pipeline's own decode and augmentation
stages and takes from shardkit what webdataset's shard lists lack: every sample exactly once per
epoch over ranks and DataLoader workers (not whole shards per worker), a reproducible shuffle,
the same number of batches on every rank, skip mode, and exact mid-epoch resume
(:class:`shardkit.loader.ShardkitLoader` finds the source at the head of the pipeline).

The source yields the dicts webdataset's ``tarfile_to_samples`` yields: ``__key__``,
``__url__`` (the shard's URL) and one ``bytes`` value per member, under its lower-cased
extension (``jpg``, ``cls``, ``txt``, ``seg.png``, …).
"""

from __future__ import annotations

from typing import Any, Sequence

from .config import Source
from .dataset import StreamingDataset
from .manifest import Location
from .modes import SAMPLE_DICTS

_DECODING = ("decode", "crop", "transform", "with_keys", "fields", "max_pixels", "with_source",
             "label_space")


class WdsSource(StreamingDataset):
    """A :class:`~shardkit.StreamingDataset` that yields webdataset sample dicts (see the
    module docstring). ``batch_size``: the batch size of the pipeline's ``batched()`` stage;
    the plan then gives every rank the same number of whole batches (the last one of a rank
    may be partial unless ``drop_last``) and ``state_dict()`` counts the pipeline's batches.
    Without it the pipeline's items must be single samples for exact resume."""

    def __init__(self, source: Location | Source | Sequence[Source], **kwargs: Any) -> None:
        given = sorted(k for k in _DECODING if k in kwargs)
        if given:
            raise TypeError(f"wds_source() does not decode: {', '.join(given)} belong to the "
                            "pipeline's own stages (wds.decode, wds.map, ...)")
        super().__init__(source, decode=SAMPLE_DICTS, **kwargs)


def wds_source(source: Location | Source | Sequence[Source], **kwargs: Any) -> WdsSource:
    """A webdataset pipeline's source over a shardkit dataset or indexed webdataset shards, or
    a mixture of them (a list of :class:`~shardkit.Source`; each sample dict then says its
    source under ``"__source__"``): :class:`WdsSource`. ``kwargs`` are
    :class:`~shardkit.StreamingDataset`'s plan, storage and error options (``shuffle``,
    ``seed``, ``batch_size``, ``drop_last``, ``rank``, ``world_size``, ``on_error``,
    ``cache_dir``, ``storage_options``, ``epoch_size``, ``mix``, …)."""
    return WdsSource(source, **kwargs)


__all__ = ["WdsSource", "wds_source"]
