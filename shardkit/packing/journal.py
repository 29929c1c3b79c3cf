"""The journal and resume: what a destination already holds, and where a pack goes on from.

After each shard, ``.shardkit-pack.json`` (the journal; a part's is
``.shardkit-pack-p0003of0008.json``) records the finished shards and how many source files they
used up. ``resume=True`` checks the finished shards against the journal (size and sha256) and
continues after the last good one. When everything succeeded the finished manifest replaces the
journal (see :meth:`~shardkit.storage.Dest.publish`): wherever a kill lands, the folder holds
either the journal (unfinished, or finished and published by ``--resume``) or the manifest.
"""

from __future__ import annotations

import json
import re
from typing import NamedTuple

from ..errors import DestinationError, ManifestError
from ..manifest import Manifest, ShardInfo
from ..shardformat import MANIFEST_NAME, MANIFEST_PATH, META_DIR
from ..storage import Dest
from .options import PackOptions
from .parts import part_manifest_name, part_tag

JOURNAL_NAME = ".shardkit-pack.json"
PART_JOURNAL = ".shardkit-pack-{tag}.json"


class Resume(NamedTuple):
    """Where an unfinished pack goes on from (all empty for a fresh start)."""

    entries: list[dict]  # the intact shards' entries: {"shard": ShardInfo fields, "consumed": n}
    consumed: int  # source files those shards used up (the position to continue from)
    skipped: list[dict]  # skipped files before that position: {"path", "reason", "pos"}
    tensor: dict | None  # the array dtype/layout seen so far (tensor mode)


FRESH = Resume([], 0, [], None)


def journal_name(part: tuple[int, int] | None) -> str:
    """The journal of a single pack, or of one part."""
    return JOURNAL_NAME if part is None else PART_JOURNAL.format(tag=part_tag(part))


def write_journal(out: Dest, name: str, fingerprint: str, entries: list[dict],
                  skipped: list[dict], tensor: dict | None) -> None:
    """Record the finished shards (``entries``) and the files skipped before the last of them."""
    consumed = entries[-1]["consumed"] if entries else 0
    journal = {"fingerprint": fingerprint, "shards": entries,
               "skipped": [s for s in skipped if s["pos"] < consumed], "tensor": tensor}
    out.write_atomic(name, json.dumps(journal).encode())


def remove_temporaries(out: Dest, part: tuple[int, int] | None, prefix: str) -> None:
    """A single pack removes every temporary file; a part only its own (others may be writing)."""
    if part is None:
        out.remove_temporaries()
    else:  # its shards' temporaries, and its index files' in .shardkit/
        tag = part_tag(part)
        out.remove_temporaries((f".{prefix}-{tag}-", f".{journal_name(part)}.tmp-",
                                f".{part_manifest_name(part)}.tmp-"))


def _ours(out: Dest, prefix: str, part: tuple[int, int] | None = None) -> list[str]:
    """Shard and index names this pack (or, for a part, this part) may have left in ``out``;
    a single pack counts every part's files, journals and part manifests as its own too."""
    meta = re.escape(META_DIR + "/")
    if part is None:
        pattern = (rf"(?:{meta})?{re.escape(prefix)}-(p\d+of\d+-)?\d{{6}}\.(tar|idx)"
                   r"|\.shardkit-(pack|part)-p\d+of\d+\.json")
    else:
        pattern = rf"(?:{meta})?{re.escape(prefix)}-{part_tag(part)}-\d{{6}}\.(tar|idx)"
    compiled = re.compile(pattern)
    return [name for name in out.names() if compiled.fullmatch(name)]


def prepare_dest(out: Dest, opts: PackOptions, fingerprint: str) -> Manifest | Resume:
    """Check the destination. Returns a finished Manifest, or where to go on from."""
    out.prepare()
    prefix, part, resume = opts.prefix, opts.part, opts.resume
    name = journal_name(part)
    if opts.overwrite:
        extra = [] if part is None else [part_manifest_name(part)]
        for old in _ours(out, prefix, part) + extra + [MANIFEST_PATH, MANIFEST_NAME, name]:
            out.remove(old)
        remove_temporaries(out, part, prefix)
        return FRESH
    present = next((n for n in (MANIFEST_PATH, MANIFEST_NAME) if out.exists(n)), None)
    if present is not None:  # (or a dataset of format version 1)
        try:
            data = out.read_bytes(present)
            if data is None:  # gone since exists()
                raise FileNotFoundError("it went away while being read")
            existing = Manifest.from_json(data, out.url(present))
        except Exception as exc:
            raise DestinationError(f"{out.url('')}: holds a manifest that cannot be read ({exc}); "
                                   "use an empty folder or overwrite=True") from exc
        if resume and existing.options.get("fingerprint") == fingerprint:
            out.remove(name)  # left by a kill between a remote manifest and its removal
            remove_temporaries(out, part, prefix)
            return _as_resumed(out, existing)
        if existing.options.get("fingerprint") == fingerprint:
            raise DestinationError(f"{out.url('')}: already holds this dataset (same files and "
                                   "options); pass resume=True (--resume) to keep it or "
                                   "overwrite=True (--overwrite) to pack again")
        raise DestinationError(f"{out.url('')}: already holds a different dataset "
                               f"({existing.num_samples} samples); use an empty folder or "
                               "overwrite=True (--overwrite)")
    if part is not None:
        done = _part_done(out, part, fingerprint, resume)
        if done is not None:
            return done
        if out.exists(JOURNAL_NAME):
            raise DestinationError(f"{out.url('')}: holds an unfinished single-process pack; "
                                   "resume it without --part, or start over with --overwrite")
    journal = None
    raw = out.read_bytes(name)
    if raw is not None:
        try:
            journal = json.loads(raw)
        except ValueError:
            journal = None
    if not resume:
        if journal is not None or _ours(out, prefix, part):
            what = "an unfinished pack" if part is None else f"an unfinished part {part_tag(part)}"
            raise DestinationError(f"{out.url('')}: holds {what}; pass resume=True "
                                   "(--resume) to continue it, or overwrite=True (--overwrite) "
                                   "to start over")
        return FRESH
    remove_temporaries(out, part, prefix)
    if journal is None:
        return FRESH
    if journal.get("format") is not None:  # the finished manifest, killed before it was published
        assert raw is not None
        finished = _finished_journal(out, name, raw, fingerprint, part)
        if finished is not None:
            return finished
        journal = {}
    if journal.get("fingerprint") != fingerprint:
        raise DestinationError(f"{out.url('')}: holds an unfinished pack of different files or "
                               "options; use an empty folder or overwrite=True (--overwrite)")
    entries: list[dict] = []
    consumed = 0
    for entry in journal["shards"]:
        info = ShardInfo(**entry["shard"])
        if not (out.intact(info.url, info.num_bytes, info.sha256)
                and out.intact(info.index_url, None, info.index_sha256)):
            break
        entries.append(entry)
        consumed = entry["consumed"]
    skipped = [s for s in journal["skipped"] if s["pos"] < consumed]
    return Resume(entries, consumed, skipped, journal.get("tensor") if entries else None)


def _as_resumed(out: Dest, done: Manifest) -> Manifest:
    """A finished manifest as the result of a pack that had nothing left to do."""
    done.base_url = out.url("").rstrip("/")
    done.stats = {"seconds": 0.0, "samples": done.num_samples, "shards": len(done.shards),
                  "bytes": done.num_bytes, "skipped": len(done.skipped), "ignored": done.ignored,
                  "resumed_shards": len(done.shards)}
    return done


def _finished_journal(out: Dest, name: str, raw: bytes, fingerprint: str,
                      part: tuple[int, int] | None) -> Manifest | None:
    """A journal that holds this pack's finished manifest (the packer was killed between writing
    it and renaming it to the manifest's name): published now and returned; None if it is not
    this pack's."""
    try:
        done = Manifest.from_json(raw, out.url(name))
    except ManifestError:
        return None
    if done.options.get("fingerprint") != fingerprint:
        return None
    out.publish(name, MANIFEST_PATH if part is None else part_manifest_name(part), raw)
    return _as_resumed(out, done)


def _part_done(out: Dest, part: tuple[int, int], fingerprint: str,
               resume: bool) -> Manifest | None:
    """This part's manifest when the part is already finished (``resume``), else None."""
    name = part_manifest_name(part)
    raw = out.read_bytes(name)
    if raw is None:
        return None
    try:
        done = Manifest.from_json(raw, out.url(name))
    except ManifestError:  # damaged: pack the part again
        return None
    if done.options.get("fingerprint") != fingerprint:
        raise DestinationError(f"{out.url('')}: part {part_tag(part)} was packed from other files "
                               "or options; use an empty folder or overwrite=True (--overwrite)")
    if not resume:
        raise DestinationError(f"{out.url('')}: already holds part {part_tag(part)} of this "
                               "dataset; pass resume=True (--resume) to keep it or "
                               "overwrite=True (--overwrite) to pack it again")
    return _as_resumed(out, done)
