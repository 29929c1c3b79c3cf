"""The text ``shardkit show SOURCE`` prints (:func:`summary`): counts, classes, shards, options,
skipped files and the first sample keys."""

from __future__ import annotations

from typing import TYPE_CHECKING, BinaryIO, cast

from ..common import format_bytes
from ..storage import redact

if TYPE_CHECKING:
    from ..manifest import Manifest


def summary(manifest: Manifest, source: str, keys: int = 5) -> str:
    """What ``shardkit show SOURCE`` prints: counts, classes, shards, options, skipped files and
    the first ``keys`` sample keys (read from the first shard)."""
    m = manifest
    sizes = [s.num_bytes for s in m.shards]
    lines = [f"dataset   {source}  ({m.created_by}, format v{m.format_version})",
             f"samples   {m.num_samples}"]
    flat = "none (flat folder)" if (m.options or {}).get("mode") else "none"
    classes = flat if m.classes is None else (
        f"{len(m.classes)}: " + ", ".join(m.classes[:10]) + (" ..." if len(m.classes) > 10 else ""))
    lines.append(f"classes   {classes}")
    if sizes:
        lines.append(f"shards    {len(m.shards)}, {format_bytes(sum(sizes))} in all, "
                     f"{format_bytes(min(sizes))} to {format_bytes(max(sizes))} each")
    else:
        lines.append("shards    0")
    opts = {k: v for k, v in m.options.items() if k != "fingerprint" and v is not None}
    lines.append("options   " + ", ".join(f"{k}={v}" for k, v in opts.items()))
    if m.tensor:
        lines.append(f"tensors   dtype {m.tensor['dtype']}, layout {m.tensor['layout']}")
    lines.append(f"skipped   {len(m.skipped)}"
                 + "".join(f"\n  {s['path']}: {s['reason']}" for s in m.skipped[:10]))
    lines.append(f"ignored   {m.ignored} non-image files")
    for s in m.shards[:10]:
        named = s.digest  # None: listed shards
        digest = "sha256 unknown" if named is None else f"{named[0]} {named[1][:16]}…"
        lines.append(f"  {redact(s.url)}  {s.num_samples} samples  {format_bytes(s.num_bytes)}  "
                     f"{digest}")
    if len(m.shards) > 10:
        lines.append(f"  ... {len(m.shards) - 10} more shards")
    if keys and m.shards:
        lines.append("keys      " + ", ".join(first_keys(m, keys)))
    return "\n".join(lines)


def first_keys(manifest: Manifest, n: int) -> list[str]:
    """The first ``n`` sample keys of the first shard, read through the manifest's store."""
    from ..shardformat import iter_keys

    shard = manifest.shards[0]
    store = manifest.shard_store()
    keys: list[str] = []
    stream = store.open_range(shard.url, 0, shard.num_bytes)
    try:
        for key, _ in iter_keys(cast(BinaryIO, stream), store.url(shard.url)):
            if key not in keys:
                keys.append(key)
                if len(keys) >= n:
                    break
    finally:
        stream.close()
    return keys
