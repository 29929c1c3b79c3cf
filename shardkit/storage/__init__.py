"""Where a dataset lives and how its bytes move, one module per job:

- :mod:`~shardkit.storage.urls` — sources and URLs to stores; the one place protocols are
  dispatched (local folders, and the remote protocols of ``remote.STORES``);
- :mod:`~shardkit.storage.local` — local files, every read bounded by a timeout;
- :mod:`~shardkit.storage.remote` — ``s3://`` and ``http(s)://`` through fsspec: streamed range
  GETs, retries with backoff that resume at the right byte;
- :mod:`~shardkit.storage.listed` — a caller's own list of shard URLs on any hosts and prefixes;
- :mod:`~shardkit.storage.dest` — where packing writes (local folder or S3 prefix).

Nothing here knows the manifest: :mod:`shardkit.manifest` loads it through a store.
"""

from .base import Store, redact
from .dest import LocalDest, RemoteDest, fsync_dir, make_dest, sha256_file
from .listed import ListedStore
from .local import LocalStore, RangeReader
from .remote import RemoteStore
from .urls import REMOTE_PROTOCOLS, make_store, open_store, split_file_url, split_source

__all__ = ["REMOTE_PROTOCOLS", "ListedStore", "LocalDest", "LocalStore", "RangeReader",
           "RemoteDest", "RemoteStore", "Store", "fsync_dir", "make_dest", "make_store",
           "open_store", "redact", "sha256_file", "split_file_url", "split_source"]
