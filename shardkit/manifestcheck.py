"""What a loaded manifest must be to be used: counts that add up and fit the shards' bytes, one
hash per shard, shard and index URLs that stay inside the dataset (unless the manifest is signed),
fields of the right types; each rule broken is a :class:`~shardkit.errors.ManifestError` naming
the file. A shard list in columns (``manifest.cols``) is checked column by column, without making
a ``ShardInfo`` per shard."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import digests
from .columns import ShardTable
from .errors import ManifestError
from .gzipped import is_compressed

# (a Manifest and its ShardInfo: typed Any here, as the manifest module imports this one)
Manifest = Any
ShardInfo = Any
MAX_DEFLATE_RATIO = 1032  # uncompressed bytes per byte of deflate data, at most


def is_external(url: object) -> bool:
    """Whether a shard URL names a place outside the dataset (a full URL or a rooted path)."""
    return isinstance(url, str) and ("://" in url or url.startswith("/"))


def _check_table(m: Manifest, table: ShardTable, where: str, external: bool = False) -> None:
    """:func:`check` of a shard list in columns: the same rules, column by column
    (``external``: signed, its shards may be full URLs or absolute paths)."""
    sizes, nbytes = table.sizes(), table.num_bytes()
    if int(sizes.sum()) != m.num_samples:
        raise ManifestError(f"{where}: shard sample counts do not add up to num_samples")
    small = np.flatnonzero(nbytes < 1024 * (sizes + 1))
    p = table.pattern("url")
    if small.size and p is not None and is_compressed(p["suffix"]):  # all compressed
        small = np.flatnonzero(nbytes * MAX_DEFLATE_RATIO < 1024 * (sizes + 1))
    elif small.size:  # compressed ones among them may hold that many
        small = np.asarray([i for i in small.tolist() if not _fits_compressed(table[i])], int)
    if small.size:
        s = table[int(small[0])]
        raise ManifestError(f"{where}: shard {str(s.url)[:80]!r} claims {s.num_samples} samples "
                            f"in {s.num_bytes} bytes (each sample takes at least 1024)")
    for name in ("index_url",) if external else ("url", "index_url"):
        p = table.pattern(name)
        if p is not None:
            samples = [table.text(name, 0), table.text(name, len(table) - 1)] if len(table) else []
            text = "\0".join(samples)
            bad = "/" in p["suffix"] or "\\" in p["prefix"] + p["suffix"] \
                or "://" in p["prefix"] or any(".." in u.split("/") for u in samples) \
                or p["prefix"].startswith("/") or "\0" in p["prefix"] + p["suffix"]
        else:
            raw = table.text_bytes(name) or b""
            text = raw.decode("utf-8", "surrogateescape")
            bad = not (text and not text.startswith(("/", "\0")) and not text.endswith("\0")
                       and not any(b in text for b in ("\0\0", "\0/", "\\", "://", ".."))
                       and text.count("\0") == len(table) - 1)
        if bad:
            for url in table.texts(name):  # the slow path finds the offender for the message
                if not url or url.startswith("/") or "\\" in url or ".." in url.split("/") \
                        or "://" in url or "\0" in url:
                    raise ManifestError(f"{where}: shard URL {url!r} is not a plain relative "
                                        "name inside the dataset")


def check(m: Manifest, where: str, external: bool = False) -> None:
    """What a manifest must be to be used; ``external``: it is signed, its shards (never its
    index files) may be full URLs or absolute paths."""
    if isinstance(m.shards, ShardTable):
        _check_table(m, m.shards, where, external)
        _check_fields(m, where)
        return
    ints = [m.num_samples] + [s.num_samples for s in m.shards] + [s.num_bytes for s in m.shards]
    if not (set(map(type, ints)) == {int} and min(ints) >= 0 and max(ints) < 2**63) \
            and any(not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**63
                    for v in ints):
        raise ManifestError(f"{where}: counts must be non-negative integers below 2**63")
    if sum(s.num_samples for s in m.shards) != m.num_samples:
        raise ManifestError(f"{where}: shard sample counts do not add up to num_samples")
    # Every sample takes at least 1024 bytes and the archive ends with 1024 zero bytes (what
    # decode_index checks later): a count no shard could hold must not size the epoch plan.
    for s in m.shards:
        if s.num_bytes < 1024 * (s.num_samples + 1) and not _fits_compressed(s):
            raise ManifestError(f"{where}: shard {str(s.url)[:80]!r} claims {s.num_samples} samples "
                                f"in {s.num_bytes} bytes (each sample takes at least 1024)")
    _check_fields(m, where)
    # a shard names its sha256 or its blake3 (one of the two), and its index file's sha256
    if not all(type(s.index_sha256) is str and type(s.sha256 if s.blake3 is None else s.blake3)
               is str and (s.sha256 is None or s.blake3 is None) for s in m.shards):
        raise ManifestError(f"{where}: malformed manifest (each shard needs a sha256 or a blake3 "
                            "string, not both, and an index_sha256 string)")
    named = [s.blake3 for s in m.shards if s.blake3 is not None]  # (a new field: checked whole)
    if named and not digests.all_hex(named):
        raise ManifestError(f"{where}: malformed manifest (a blake3 value is not 64 hex digits)")
    _check_urls(m, where, external)


def _check_fields(m: Manifest, where: str) -> None:
    if type(m.num_samples) is not int or not 0 <= m.num_samples < 2**63:
        raise ManifestError(f"{where}: counts must be non-negative integers below 2**63")
    if not (m.classes is None or (isinstance(m.classes, list)
                                  and all(type(c) is str for c in m.classes))) \
            or not isinstance(m.options, dict) or not isinstance(m.skipped, list) \
            or not all(isinstance(e, dict) for e in m.skipped) \
            or type(m.ignored) is not int or not (m.tensor is None or isinstance(m.tensor, dict)) \
            or not isinstance(m.created_by, str) \
            or not (m.labels is None or isinstance(m.labels, dict)):
        raise ManifestError(f"{where}: malformed manifest (classes, options, skipped, ignored, "
                            "tensor, labels or created_by has the wrong type)")


def _fits_compressed(s: ShardInfo) -> bool:
    """Whether a compressed shard (``.tar.gz``) could hold its samples in its bytes as stored:
    1024 uncompressed bytes a sample and the archive's end, at deflate's largest ratio."""
    return is_compressed(s.url) and s.num_bytes * MAX_DEFLATE_RATIO >= 1024 * (s.num_samples + 1)


def _check_urls(m: Manifest, where: str, external: bool) -> None:
    urls = [u for s in m.shards for u in (s.url, s.index_url)
            if not (external and u is s.url and is_external(u))]
    if all(type(u) is str for u in urls):
        # Fast path over all URLs joined by NUL: nothing that could be empty, rooted, hold a
        # backslash, a scheme or a '..' segment (or a NUL). Otherwise look at each one below.
        text = "\0".join(urls)
        if text and not text.startswith(("/", "\0")) and not text.endswith("\0") \
                and not any(bad in text for bad in ("\0\0", "\0/", "\\", "://", "..")) \
                and text.count("\0") == len(urls) - 1:
            return
    for url in urls:  # the slow path finds the offender for the message
        if not isinstance(url, str) or not url or url.startswith("/") or "\\" in url \
                or ".." in url.split("/") or "://" in url or "\0" in url:
            raise ManifestError(f"{where}: shard URL {url!r} is not a plain relative name "
                                "inside the dataset")
