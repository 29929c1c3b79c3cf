"""Re-read every shard of a dataset and check it against the manifest (local or remote)."""

from __future__ import annotations

import hashlib
import io
import sys
from dataclasses import dataclass, field

from . import digests
from .errors import ManifestError, ShardError
from .gzipped import is_compressed
from .manifest import Location, Manifest
from .shardformat import decode_index, iter_keys


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    bytes: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)  # (shard url, what differs)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(source: Location, storage_options: dict | None = None,
           progress: bool = False) -> VerifyReport:
    """Check sizes, digests (sha256, or BLAKE3 for indexed shards), index files and per-shard
    sample counts against the manifest.

    ``source`` is anything :meth:`Manifest.load` takes (a folder, ``s3://``, ``http(s)://``);
    every file is read through the store the manifest was loaded with (``storage_options``: its
    fsspec options). ``progress``: a progress bar over the shards."""
    from tqdm.auto import tqdm

    manifest = Manifest.load(source, storage_options=storage_options)
    store = manifest.shard_store()
    report = VerifyReport()
    for shard in tqdm(manifest.shards, unit="shard", desc="verify",
                      disable=not progress or not sys.stderr.isatty(), file=sys.stderr):
        report.shards += 1
        try:
            data = store.read_bytes(shard.url)
        except ShardError as exc:
            reason = exc.reason if exc.reason.startswith("cannot") else f"cannot read: {exc.reason}"
            report.problems.append((shard.url, reason))
            continue
        report.bytes += len(data)
        if len(data) != shard.num_bytes:
            report.problems.append((shard.url, f"{len(data)} bytes, manifest says {shard.num_bytes}"))
        named = shard.digest
        if named is not None and digests.hexdigest(data, named[0]) != named[1].lower():
            report.problems.append((shard.url, f"{named[0]} differs from the manifest"))
        try:
            index = store.read_bytes(shard.index_url)
            if hashlib.sha256(index).hexdigest() != shard.index_sha256:
                raise ValueError("sha256 of the index differs from the manifest")
            decode_index(index, shard.num_samples, shard.num_bytes, shard.index_url,
                         compressed=is_compressed(shard.url))
        except ShardError as exc:
            report.problems.append((shard.index_url, exc.reason))
        except (ManifestError, ValueError) as exc:
            report.problems.append((shard.index_url, str(exc)))
        keys = _count_samples(data, shard.url, report)
        report.samples += keys
        if keys != shard.num_samples:
            report.problems.append((shard.url, f"{keys} samples, manifest says {shard.num_samples}"))
    return report


def _count_samples(data: bytes, url: str, report: VerifyReport) -> int:
    keys = set()
    last = None
    try:
        for key, _ in iter_keys(io.BytesIO(data), url):  # (a .tar.gz's: decompressed)
            if key != last:
                if key in keys:
                    report.problems.append((url, f"sample {key!r} is not contiguous"))
                keys.add(key)
                last = key
    except ShardError as exc:
        report.problems.append((url, exc.reason))
    return len(keys)
