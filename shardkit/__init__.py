"""shardkit: pack image folders into reproducible tar shards and stream them into PyTorch."""

__version__ = "0.1.0"

from .errors import (DecodeError, DestinationError, ManifestError, ShardError, ShardkitError,
                     SourceError)
from .manifest import Manifest, ShardInfo
from .writer import pack_folder
from .verify import verify

__all__ = [
    "DecodeError", "DestinationError", "Manifest", "ManifestError", "ShardError", "ShardInfo",
    "ShardkitError", "SourceError", "pack_folder", "verify",
]
from .decode import CenterCrop, RandomResizedCrop
from .dataset import StreamingDataset
from .loader import GpuPrefetcher, make_loader

__all__ += ["CenterCrop", "GpuPrefetcher", "RandomResizedCrop", "StreamingDataset", "make_loader"]
