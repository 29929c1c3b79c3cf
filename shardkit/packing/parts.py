"""Packing in parts (``part=(i, n)``, ``--part I/N``, torchrun) and merging them.

Part ``i`` packs the contiguous slice ``order[i*len//n : (i+1)*len//n]`` of the same shuffled
order, so the parts in part order hold exactly the samples, bytes and order of a single-process
pack (only shard boundaries differ at part edges). Every name a part writes carries its tag
``p0003of0008``: shards ``shard-p0003of0008-000000.tar``, journal
``.shardkit-pack-p0003of0008.json``, and when the part is done its part manifest
``.shardkit-part-p0003of0008.json`` (the manifest schema, its shards only; kept after the merge,
so re-running a finished part is a no-op). ``manifest.json`` is written from the part manifests,
in part order, only when all ``n`` exist with this pack's fingerprint: by the part that finishes
last (``finalize=True``; two finishing together write identical bytes), by :func:`merge_parts`,
or under torchrun by rank 0 after every rank reported. So a ``manifest.json`` always means every
part completed.
"""

from __future__ import annotations

import os

from ..errors import DestinationError, ManifestError, SourceError
from ..manifest import Manifest
from ..shardformat import MANIFEST_PATH
from ..storage import Dest, make_dest

PART_MANIFEST = ".shardkit-part-{tag}.json"


def part_tag(part: tuple[int, int]) -> str:
    """``p0003of0008``: in every name part 3 of 8 writes (sorts in part order; no dots)."""
    i, n = part
    width = max(4, len(str(n)))
    return f"p{i:0{width}d}of{n:0{width}d}"


def part_manifest_name(part: tuple[int, int]) -> str:
    """The name of a finished part's manifest: ``.shardkit-part-p0003of0008.json``."""
    return PART_MANIFEST.format(tag=part_tag(part))


def part_slice(order: list, part: tuple[int, int] | None) -> list:
    """The samples of ``part`` (all of ``order`` for a single pack)."""
    if part is None:
        return order
    i, n = part
    return order[i * len(order) // n:(i + 1) * len(order) // n]


def merge_parts(dest: str | os.PathLike[str], parts: int, *, storage_options: dict | None = None,
                fingerprint: str | None = None) -> Manifest:
    """Write ``manifest.json`` of a pack made in ``parts`` parts, from their part manifests in
    ``dest`` (a folder or ``s3://`` prefix; ``storage_options`` for fsspec).

    Raises :class:`DestinationError` naming the parts that are not finished (or that belong to
    another pack: other files or options). ``fingerprint`` (a part manifest's
    ``options["fingerprint"]``) pins the pack; by default part 0's is used.
    """
    parts = int(parts)
    if parts < 2:
        raise ValueError(f"parts must be at least 2, got {parts!r}")
    out = make_dest(dest, storage_options)
    try:
        manifest, missing, foreign = _merge(out, parts, fingerprint)
        if manifest is None:
            what = []
            if missing:
                what.append(f"part(s) {_ranges(missing)} of 0..{parts - 1} not finished")
            if foreign:
                what.append(f"part(s) {_ranges(foreign)} belong to another pack (other files or "
                            "options); re-run them with --overwrite")
            raise DestinationError(f"{out.url('')}: cannot write the manifest: " + "; ".join(what))
        return manifest
    finally:
        out.close()


def _merge(out: Dest, n: int,
           fingerprint: str | None) -> tuple[Manifest | None, list[int], list[int]]:
    """``(manifest, missing, foreign)``: the merged manifest written, or None and why not."""
    names = set(out.names())
    missing = [i for i in range(n) if part_manifest_name((i, n)) not in names]
    if missing:
        return None, missing, []
    parts: list[Manifest] = []
    for i in range(n):
        name = part_manifest_name((i, n))
        raw = out.read_bytes(name)
        if raw is None:
            missing.append(i)
            continue
        try:
            parts.append(Manifest.from_json(raw, out.url(name)))
        except ManifestError:  # damaged: that part has to be packed again
            missing.append(i)
    if missing:
        return None, missing, []
    fingerprint = fingerprint or parts[0].options.get("fingerprint")
    foreign = [i for i, m in enumerate(parts)
               if m.options.get("fingerprint") != fingerprint or m.options.get("part") != [i, n]]
    if foreign:
        return None, [], foreign
    options = {k: v for k, v in parts[0].options.items() if k != "part"}
    options["parts"] = n
    tensor = None
    if options["mode"] == "tensor":
        infos = [(i, m.tensor) for i, m in enumerate(parts) if m.tensor]
        tensor = infos[0][1] if infos else {"dtype": "|u1", "layout": "HWC", "ndim": 3}
        for i, info in infos:
            if (info["dtype"], info["layout"], info["ndim"]) != (
                    tensor["dtype"], tensor["layout"], tensor["ndim"]):
                raise SourceError(out.url(part_manifest_name((i, n))),
                                  f"part {i} holds {info['dtype']} {info['layout']} arrays, but "
                                  f"earlier parts {tensor['dtype']} {tensor['layout']}")
    shards = [s for m in parts for s in m.shards]
    manifest = Manifest(classes=parts[0].classes, num_samples=sum(s.num_samples for s in shards),
                        shards=shards, options=options,
                        skipped=[s for m in parts for s in m.skipped], ignored=parts[0].ignored,
                        tensor=tensor)
    files = manifest.files()  # a large shard list goes to manifest.cols first (columns.py)
    data = files[-1][1]
    if out.read_bytes(MANIFEST_PATH) != data:  # a part finishing at the same time: same bytes
        for name, blob in files:
            out.write_atomic(name, blob)
    manifest.base_url = out.url("").rstrip("/")
    return manifest, [], []


def finalize_stats(out: Dest, manifest: Manifest, part: tuple[int, int], fingerprint: str,
                   finalize: bool) -> None:
    """After a part: merge when it was the last one (``finalize``); record the outcome in stats."""
    n = part[1]
    missing: list[int] = []
    foreign: list[int] = []
    if "part" not in manifest.options:  # the whole dataset was already there
        finalized = True
    elif finalize:
        merged, missing, foreign = _merge(out, n, fingerprint)
        finalized = merged is not None
    else:
        finalized = False
    manifest.stats = dict(manifest.stats or {}, part=list(part), finalized=finalized,
                          waiting_for=sorted(missing + foreign))


def _ranges(numbers: list[int]) -> str:
    """``0-3, 7, 9-10``."""
    out, start = [], None
    for k, v in enumerate(numbers):
        if start is None:
            start = v
        if k + 1 == len(numbers) or numbers[k + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(out)
