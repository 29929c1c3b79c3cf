"""shardkit: pack image folders into reproducible tar shards and stream them into PyTorch.

Module map, by what each part serves. Imports only go down this list's groups (tests/test_layout.py
checks it: no circle, no upward import; packing and reading never import each other).

Shared by packing and reading (the format and where bytes live):
    errors · common (byte sizes, CPU counts) · _version · digests (a shard's sha256 or BLAKE3) ·
    gzipped (.tar.gz / .tgz shards: names,
    their uncompressed stream) · shardformat (tar members, samples, the .idx index file) ·
    jpegheader (JPEG frame headers) · jpegregion (a JPEG's crop box decoded
    alone) · signing · columns (manifest.cols, a large shard list
    mapped column-wise) · locations (where a dataset is, as a user names it; the first
    mistakes) · manifestcheck (what a loaded manifest must be) · manifest (manifest.json, the
    one path that loads a dataset) · cache (the shared
    on-disk shard cache) · verify ·
    storage/ — base (the Store and Dest protocols), urls (the one protocol dispatch), local,
    readahead (a worker's next local spans into the page cache), remote (s3, http), generic
    (any fsspec filesystem), listed (a caller's URLs), dest (where packing writes), bounded
    (calls with a timeout).

Packing (packing/, never imports torch):
    options (PackOptions) · folder (scan, keys, labels) · encode (raw / resize / tensor, per
    sample) · pool (encoding in parallel) · shards (tar files within the limits) · journal
    (resume) · parts (packing in parts, merge_parts) · pack (pack_folder).

Reading (the read path, bottom to top):
    layout (an epoch's global stream: sources' shares, passes, mixing; pure) · plan (who reads
    what: pure) · config (PlanConfig, StorageConfig, Source, MixConfig) · epochs (the epoch shared
    with workers) · resume (exact and elastic resume, pure) · distributed (rank, world,
    gathering states) · state (EpochState: the epoch, the plan in force, state dicts) ·
    skiplog · diagnosis (a failing shard) · fetching (a shard's bytes from its store or the
    shard cache; what the next spans need, started ahead) · reader (spans -> raw samples) ·
    background (a worker's reads in a thread, once they wait) · decode (images,
    fused crops) · gpudecode (decode="gpu") · recycle (batch buffers) · batching (batches in
    the workers) · modes (one strategy per decode=) · assembly (samples in the plan's order) ·
    dataset (StreamingDataset) · access (MapDataset: one sample by index or key) · wds
    (wds_source) · eagerqueue · loaderlink · loader (make_loader, GpuPrefetcher).

Adopting shards others wrote: indexer (shardkit index).

Front: this file · cli · __main__ · look/ — shardkit show, bottom to top: drawing (chart primitives),
choosing (the seeded choice of samples), pictures (a sample as an image, thumbnails, image sizes),
overview (the summary text), sheet (the contact sheet), stats (a dataset's numbers), statspicture
(them drawn), report (the HTML report) · bench/ (benchmarks: loaders, dali (DALI's CPU pipeline, when
installed), mix, randomaccess, s3, scale, gpu, indexspeed, indexscale, hdd, synth, demo).
"""

from ._version import __version__ as __version__
from .errors import (
    DecodeError,
    DestinationError,
    ManifestError,
    ShardError,
    ShardkitError,
    SourceError,
    WriteError,
)
from .indexer import index_shards
from .manifest import Manifest, ShardInfo
from .packing import merge_parts, pack_folder
from .verify import verify

__all__ = [
    "DecodeError", "DestinationError", "Manifest", "ManifestError", "ShardError", "ShardInfo",
    "ShardkitError", "SourceError", "WriteError", "index_shards", "merge_parts", "pack_folder",
    "verify",
]

# The read path imports torch; packing workers (spawned processes) must not pay for that, so these
# names are imported on first use.
_LAZY = {"Source": "config", "CenterCrop": "decode", "RandomResizedCrop": "decode",
         "StreamingDataset": "dataset", "MapDataset": "access", "GpuPrefetcher": "loader",
         "make_loader": "loader",
         "WdsSource": "wds", "wds_source": "wds"}
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
