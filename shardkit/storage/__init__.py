"""Where a dataset lives and how its bytes move, one module per job:

- :mod:`~shardkit.storage.base` — the contracts: ``Store`` (reading), ``Dest`` (writing);
- :mod:`~shardkit.storage.urls` — sources and URLs to stores; the one place protocols are
  dispatched (local folders, the tuned protocols of ``remote.STORES``, any other fsspec knows);
- :mod:`~shardkit.storage.bounded` — calls that may block, on helper threads, with a timeout;
- :mod:`~shardkit.storage.local` — local files, every read bounded by a timeout;
- :mod:`~shardkit.storage.readahead` — a worker's next local spans read into the page cache while
  it decodes (cold disks);
- :mod:`~shardkit.storage.remote` — ``s3://`` and ``http(s)://`` through fsspec: streamed range
  GETs, retries with backoff that resume at the right byte;
- :mod:`~shardkit.storage.generic` — any other fsspec filesystem (``gs://``, ``az://``,
  ``hf://``, …): one generic range read with the same retries;
- :mod:`~shardkit.storage.listed` — a caller's own list of shard URLs on any hosts and prefixes;
- :mod:`~shardkit.storage.dest` — where packing writes (local folder or S3 prefix).

Nothing here knows the manifest: :mod:`shardkit.manifest` loads it through a store.
"""

from .base import BaseStore, Dest, Store, redact
from .dest import BaseDest, LocalDest, RemoteDest, fsync_dir, make_dest, sha256_file
from .generic import FsspecStore
from .listed import ListedStore, MixedStore
from .local import LocalStore, RangeReader
from .remote import RemoteStore
from .urls import make_store, open_store, remote_protocols, split_file_url, split_source

__all__ = ["REMOTE_PROTOCOLS", "BaseDest", "BaseStore", "Dest", "FsspecStore", "ListedStore",
           "LocalDest", "LocalStore", "MixedStore", "RangeReader", "RemoteDest", "RemoteStore",
           "Store", "fsync_dir", "make_dest",
           "make_store", "open_store", "redact", "remote_protocols", "sha256_file",
           "split_file_url", "split_source"]


def __getattr__(name: str):
    if name == "REMOTE_PROTOCOLS":  # computed when asked for: importing fsspec takes a while
        from . import urls

        return urls.REMOTE_PROTOCOLS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
