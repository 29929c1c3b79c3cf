"""shardkit: pack image folders into reproducible tar shards and stream them into PyTorch."""

__version__ = "0.1.0"

from .errors import (DecodeError, DestinationError, ManifestError, ShardError, ShardkitError,
                     SourceError, WriteError)
from .manifest import Manifest, ShardInfo
from .writer import merge_parts, pack_folder
from .verify import verify
from .indexer import index_shards

__all__ = [
    "DecodeError", "DestinationError", "Manifest", "ManifestError", "ShardError", "ShardInfo",
    "ShardkitError", "SourceError", "WriteError", "index_shards", "merge_parts", "pack_folder",
    "verify",
]

# The read path imports torch; packing workers (spawned processes) must not pay for that, so these
# names are imported on first use.
_LAZY = {"CenterCrop": "decode", "RandomResizedCrop": "decode", "StreamingDataset": "dataset",
         "GpuPrefetcher": "loader", "make_loader": "loader", "WdsSource": "wds",
         "wds_source": "wds"}
__all__ += sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'shardkit' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
