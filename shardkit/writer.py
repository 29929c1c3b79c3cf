"""``pack_folder``: scan, encode in parallel, write shards atomically, write the manifest last.

Reproducibility: the sample order is a pure function of the scanned file list and ``seed``; the
encoded bytes are a pure function of each file and the options; shard boundaries are decided in
order from the exact tar sizes. So any number of workers gives byte-identical shards.

Atomicity and resume: a shard is written under a temporary name, flushed, fsynced and renamed.
After each shard, ``.shardkit-pack.json`` (the journal) records the finished shards and how many
source files they used up. ``resume=True`` checks the finished shards against the journal
(size and sha256) and continues after the last good one. ``manifest.json`` is written only when
everything succeeded; the journal is removed after it.

Parts (``part=(i, n)``, ``--part I/N``, torchrun): part ``i`` packs the contiguous slice
``order[i*len//n : (i+1)*len//n]`` of the same shuffled order, so the parts in part order hold
exactly the samples, bytes and order of a single-process pack (only shard boundaries differ at part
edges). Every name a part writes carries its tag ``p0003of0008``: shards ``shard-p0003of0008-
000000.tar``, journal ``.shardkit-pack-p0003of0008.json``, and when the part is done its part
manifest ``.shardkit-part-p0003of0008.json`` (the manifest schema, its shards only; kept after
the merge, so re-running a finished part is a no-op). ``manifest.json`` is written from the part
manifests, in part order, only when all ``n`` exist with this pack's fingerprint: by the part that
finishes last (``finalize=True``; two finishing together write identical bytes), by
:func:`merge_parts`, or under torchrun by rank 0 after every rank reported. So a ``manifest.json``
always means every part completed.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import multiprocessing
import os
import queue
import random
import re
import sys
import threading
import time
import uuid
import warnings
from collections import deque
from pathlib import Path
from typing import Iterator

from tqdm.auto import tqdm

from .common import available_cpus, parse_bytes
from .encode import EncodeOptions, encode_parts
from .errors import DestinationError, ManifestError, ShardkitError, SourceError, WriteError
from .folder import Item, scan_folder
from .manifest import Manifest, ShardInfo
from .shardformat import (END_OF_ARCHIVE, MANIFEST_NAME, MANIFEST_PATH, MAX_PIXELS, META_DIR,
                          encode_index, index_name)
from .storage import make_dest

JOURNAL_NAME = ".shardkit-pack.json"
PART_JOURNAL = ".shardkit-pack-{tag}.json"
PART_MANIFEST = ".shardkit-part-{tag}.json"
MODES = ("raw", "resize", "tensor")
ON_ERROR = ("raise", "skip")


def pack_folder(src, dest, *, mode: str = "raw", size: int | None = None, quality: int = 90,
                max_bytes: int | str = "256MB", max_samples: int | None = None,
                workers: int | None = None, seed: int = 0, shuffle: bool = True,
                on_error: str = "raise", resume: bool = False, overwrite: bool = False,
                storage_options: dict | None = None, progress: bool = True, prefix: str = "shard",
                max_pixels: int = MAX_PIXELS, durable: bool = True,
                part: tuple[int, int] | None = None, finalize: bool = True) -> Manifest:
    """Pack an image folder (ImageFolder layout or flat) into tar shards plus ``manifest.json``.

    See the README for the modes. Returns the manifest; ``manifest.stats`` holds timing and counts.
    ``durable=False`` skips the fsync of each shard before its rename: still safe against a killed
    process (the page cache survives it), not against a power loss.

    ``part=(i, n)`` (0-based ``i``) packs only part ``i`` of ``n`` (see the module docstring) and
    returns that part's manifest (``options["part"] == [i, n]``; or the whole dataset's, when it was
    already complete); ``stats["finalized"]`` says whether ``manifest.json`` exists now and
    ``stats["waiting_for"]`` lists the parts not finished yet. With ``finalize=False`` the part
    never writes ``manifest.json``; call :func:`merge_parts` once every part is done (what the
    torchrun path does on rank 0). ``part=(0, 1)`` is an ordinary pack.
    """
    started = time.perf_counter()
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if mode in ("resize", "tensor") and (size is None or int(size) < 1):
        raise ValueError(f"size is required (a positive number of pixels) for mode={mode!r}")
    if mode == "raw" and size is not None:
        raise ValueError(f"size={size!r} does nothing in mode='raw', which stores the original "
                         "bytes; use mode='resize' (JPEG, shorter side to size) or 'tensor'")
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"quality must be between 1 and 100, got {quality!r}")
    if mode != "resize" and int(quality) != 90:
        raise ValueError(f"quality={quality!r} does nothing in mode={mode!r}: only mode='resize' "
                         "encodes JPEGs")
    if max_samples is not None and int(max_samples) < 1:
        raise ValueError(f"max_samples must be at least 1, got {max_samples!r}")
    if not re.fullmatch(r"[A-Za-z0-9_]+", prefix):
        raise ValueError(f"prefix must be letters, digits or _, got {prefix!r}")
    limit = parse_bytes(max_bytes)
    workers = available_cpus() if workers is None else max(1, int(workers))
    part = _check_part(part)

    scan = scan_folder(src)
    skipped: list[dict] = []
    for relpath, reason in scan.problems:
        if on_error == "raise":
            raise SourceError(Path(scan.root, relpath), reason)
        if part is None or part[0] == 0:  # listed once, first, as in a single-process pack
            skipped.append({"path": relpath, "reason": reason, "pos": -1})
    kind = scan.kind
    if kind == "mixed":
        raise SourceError(scan.root, "holds both images and arrays (.npy/.pt); pack them separately")
    if kind == "array":
        if mode == "resize":
            raise ValueError("mode='resize' cannot apply to .npy/.pt arrays; use mode='tensor'")
        mode = "tensor"
    order = list(scan.items)
    if shuffle:
        random.Random(seed).shuffle(order)
    opts = EncodeOptions(mode=mode, size=None if size is None else int(size), quality=int(quality),
                         max_pixels=int(max_pixels))
    options = {"mode": mode, "size": opts.size, "quality": opts.quality if mode == "resize" else None,
               "seed": seed, "shuffle": bool(shuffle), "max_bytes": limit,
               "max_samples": max_samples, "prefix": prefix, "max_pixels": opts.max_pixels,
               "source_kind": kind}
    options["fingerprint"] = _fingerprint(options, order)  # of the whole pack, in every part
    if part is not None:
        i, n = part
        order = order[i * len(order) // n:(i + 1) * len(order) // n]

    out = make_dest(dest, storage_options)
    try:
        return _pack(out, scan, order, opts, options, skipped, workers, limit, max_samples, prefix,
                     on_error, resume, overwrite, progress, kind, mode, started, durable, part,
                     finalize)
    except OSError as exc:
        if isinstance(exc, ShardkitError):
            raise
        # Disk full, read-only or vanished destination: name it, keep the cause for debugging.
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        raise WriteError(out.url(""), f"cannot write the dataset: "
                                      f"{exc.strerror or exc}{where}") from exc
    finally:
        out.close()


def _pack(out, scan, order, opts, options, skipped, workers, limit, max_samples, prefix, on_error,
          resume, overwrite, progress, kind, mode, started, durable, part=None,
          finalize=True) -> Manifest:
    done = _prepare_dest(out, prefix, options["fingerprint"], resume, overwrite, part)
    if isinstance(done, Manifest):
        if part is not None:
            _finalize_stats(out, done, part, options["fingerprint"], finalize)
        return done
    journal, consumed, skipped_done, tensor_info = done
    skipped += [s for s in skipped_done if s["pos"] >= 0]
    stem = prefix if part is None else f"{prefix}-{part_tag(part)}"
    writer = _ShardWriter(out, stem, limit, max_samples, journal, skipped, options["fingerprint"],
                          tensor_info, durable, _journal_name(part))
    desc = "pack" if part is None else f"pack {part_tag(part)}"
    bar = tqdm(total=len(order), initial=consumed, unit="img", desc=desc, dynamic_ncols=True,
               disable=not progress or not sys.stderr.isatty(), file=sys.stderr)
    try:
        for pos, item, result in _encode_all(order, consumed, opts, workers, kind):
            if isinstance(result, SourceError):
                if on_error == "raise":
                    raise result
                writer.skip(pos, item, result.reason)
            else:
                blob, info = result
                try:
                    writer.add(pos, item, blob, info)
                except SourceError as exc:  # an array unlike the others: bad input like any other
                    if on_error == "raise":
                        raise
                    writer.skip(pos, item, exc.reason)
            bar.update(1)
            if bar.n % 64 == 0:
                bar.set_postfix_str(f"{writer.bytes_written / 1e6 / max(bar.format_dict['elapsed'], 1e-9):.1f} MB/s")
        writer.finish(len(order))
    finally:
        bar.close()
        writer.abort()
    tensor = None
    if mode == "tensor":
        tensor = writer.tensor_info or {"dtype": "|u1", "layout": "HWC", "ndim": 3}
        if part is not None:  # a part without samples does not know the dtype; the merge decides
            tensor = writer.tensor_info
    if part is not None:
        options = {**options, "part": list(part)}
    manifest = Manifest(classes=scan.classes, num_samples=sum(s.num_samples for s in writer.shards),
                        shards=writer.shards, options=options, skipped=writer.skipped,
                        ignored=scan.ignored, tensor=tensor)
    # The journal becomes the manifest: wherever a kill lands, the folder holds either the
    # journal (unfinished, or finished and published by --resume) or the manifest, never both.
    out.publish(_journal_name(part), MANIFEST_PATH if part is None else part_manifest_name(part),
                manifest.to_json().encode("utf-8"))
    _remove_temporaries(out, part, prefix)
    manifest.base_url = out.url("").rstrip("/")
    manifest.stats = {"seconds": time.perf_counter() - started, "bytes": manifest.num_bytes,
                      "samples": manifest.num_samples, "shards": len(manifest.shards),
                      "skipped": len(manifest.skipped), "ignored": scan.ignored,
                      "resumed_shards": len(journal)}
    if part is not None:
        _finalize_stats(out, manifest, part, options["fingerprint"], finalize)
    return manifest


def _fingerprint(options: dict, order: list[Item]) -> str:
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for item in order:
        h.update(f"{item.relpath}\0{item.size}\0".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


# --------------------------------------------------------------------------- parts


def _check_part(part) -> tuple[int, int] | None:
    if part is None:
        return None
    try:
        i, n = (int(v) for v in part)
    except (TypeError, ValueError):
        raise ValueError(f"part must be (index, count), e.g. (0, 4), got {part!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"part index must be in 0..count-1 (0-based), got {i} of {n}")
    return None if n == 1 else (i, n)


def part_tag(part: tuple[int, int]) -> str:
    """``p0003of0008``: in every name part 3 of 8 writes (sorts in part order; no dots)."""
    i, n = part
    width = max(4, len(str(n)))
    return f"p{i:0{width}d}of{n:0{width}d}"


def part_manifest_name(part: tuple[int, int]) -> str:
    return PART_MANIFEST.format(tag=part_tag(part))


def _journal_name(part) -> str:
    return JOURNAL_NAME if part is None else PART_JOURNAL.format(tag=part_tag(part))


def _remove_temporaries(out, part, prefix: str) -> None:
    """A single pack removes every temporary file; a part only its own (others may be writing)."""
    if part is None:
        out.remove_temporaries()
    elif not out.remote:
        tag = part_tag(part)
        own = (f".{prefix}-{tag}-", f".{_journal_name(part)}.tmp-", f".{part_manifest_name(part)}.tmp-")
        for name in out.names():  # its shards' temporaries, and its index files' in .shardkit/
            base = name.rpartition("/")[2]
            if base.startswith(own) and ".tmp-" in base:
                (out.folder / name).unlink(missing_ok=True)


def merge_parts(dest, parts: int, *, storage_options: dict | None = None,
                fingerprint: str | None = None) -> Manifest:
    """Write ``manifest.json`` of a pack made in ``parts`` parts, from their part manifests.

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


def _merge(out, n: int, fingerprint: str | None):
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
    data = manifest.to_json().encode("utf-8")
    if out.read_bytes(MANIFEST_PATH) != data:  # a part finishing at the same time: same bytes
        out.write_atomic(MANIFEST_PATH, data)
    manifest.base_url = out.url("").rstrip("/")
    return manifest, [], []


def _finalize_stats(out, manifest: Manifest, part, fingerprint: str, finalize: bool) -> None:
    """After a part: merge when it was the last one (``finalize``); record the outcome in stats."""
    n = part[1]
    missing = foreign = []
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


# --------------------------------------------------------------------------- destination


def _ours(out, prefix: str, part=None) -> list[str]:
    """Shard and index names this pack (or, for a part, this part) may have left in ``out``;
    a single pack counts every part's files, journals and part manifests as its own too."""
    meta = re.escape(META_DIR + "/")
    if part is None:
        pattern = (rf"(?:{meta})?{re.escape(prefix)}-(p\d+of\d+-)?\d{{6}}\.(tar|idx)"
                   r"|\.shardkit-(pack|part)-p\d+of\d+\.json")
    else:
        pattern = rf"(?:{meta})?{re.escape(prefix)}-{part_tag(part)}-\d{{6}}\.(tar|idx)"
    pattern = re.compile(pattern)
    return [name for name in out.names() if pattern.fullmatch(name)]


def _prepare_dest(out, prefix: str, fingerprint: str, resume: bool, overwrite: bool, part=None):
    """Check the destination. Returns a finished Manifest, or (journal, consumed, skipped, tensor)."""
    out.prepare()
    journal_name = _journal_name(part)
    if overwrite:
        extra = [] if part is None else [part_manifest_name(part)]
        for name in _ours(out, prefix, part) + extra + [MANIFEST_PATH, MANIFEST_NAME, journal_name]:
            out.remove(name)
        _remove_temporaries(out, part, prefix)
        return [], 0, [], None
    present = next((n for n in (MANIFEST_PATH, MANIFEST_NAME) if out.exists(n)), None)
    if present is not None:  # (or a dataset of format version 1)
        try:
            existing = Manifest.from_json(out.read_bytes(present), out.url(present))
        except Exception as exc:
            raise DestinationError(f"{out.url('')}: holds a manifest that cannot be read ({exc}); "
                                   "use an empty folder or overwrite=True") from exc
        if resume and existing.options.get("fingerprint") == fingerprint:
            out.remove(journal_name)  # left by a kill between a remote manifest and its removal
            _remove_temporaries(out, part, prefix)
            existing.base_url = out.url("").rstrip("/")
            existing.stats = {"seconds": 0.0, "samples": existing.num_samples,
                              "shards": len(existing.shards), "bytes": existing.num_bytes,
                              "skipped": len(existing.skipped), "ignored": existing.ignored,
                              "resumed_shards": len(existing.shards)}
            return existing
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
    raw = out.read_bytes(journal_name)
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
        return [], 0, [], None
    _remove_temporaries(out, part, prefix)
    if journal is None:
        return [], 0, [], None
    if journal.get("format") is not None:  # the finished manifest, killed before it was published
        finished = _finished_journal(out, journal_name, raw, fingerprint, part)
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
    return entries, consumed, skipped, journal.get("tensor") if entries else None


def _finished_journal(out, journal_name: str, raw: bytes, fingerprint: str, part):
    """A journal that holds this pack's finished manifest (the packer was killed between writing
    it and renaming it to the manifest's name): published now and returned; None if it is not
    this pack's."""
    try:
        done = Manifest.from_json(raw, out.url(journal_name))
    except ManifestError:
        return None
    if done.options.get("fingerprint") != fingerprint:
        return None
    out.publish(journal_name, MANIFEST_PATH if part is None else part_manifest_name(part), raw)
    done.base_url = out.url("").rstrip("/")
    done.stats = {"seconds": 0.0, "samples": done.num_samples, "shards": len(done.shards),
                  "bytes": done.num_bytes, "skipped": len(done.skipped), "ignored": done.ignored,
                  "resumed_shards": len(done.shards)}
    return done


def _part_done(out, part, fingerprint: str, resume: bool) -> Manifest | None:
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
    done.base_url = out.url("").rstrip("/")
    done.stats = {"seconds": 0.0, "samples": done.num_samples, "shards": len(done.shards),
                  "bytes": done.num_bytes, "skipped": len(done.skipped), "ignored": done.ignored,
                  "resumed_shards": len(done.shards)}
    return done


# --------------------------------------------------------------------------- encoding


def _encode_chunk(items: list[Item], opts: EncodeOptions) -> list:
    """Runs in a worker: encode each item; bad input comes back as a SourceError value."""
    results = []
    for item in items:
        try:
            results.append(encode_parts(item, opts))
        except SourceError as exc:
            results.append(SourceError(exc.path, exc.reason))
    return results


def _encode_all(order: list[Item], start: int, opts: EncodeOptions, workers: int,
                kind: str) -> Iterator[tuple[int, Item, object]]:
    """Yield ``(position, item, result)`` in order, encoding ahead with a bounded window."""
    todo = order[start:]
    if workers <= 1 or len(todo) < 2:
        for i, item in enumerate(todo):
            yield start + i, item, _encode_chunk([item], opts)[0]
        return
    if opts.mode == "raw" and kind == "image":
        # I/O-bound: threads avoid copying every file's bytes between processes.
        executor: cf.Executor = cf.ThreadPoolExecutor(max_workers=min(workers, 8))
        chunk = 16
    else:
        executor = cf.ProcessPoolExecutor(max_workers=workers,
                                          mp_context=multiprocessing.get_context("spawn"))
        chunk = 4
    window: deque = deque()
    chunks = (todo[i:i + chunk] for i in range(0, len(todo), chunk))
    pos = start
    try:
        for piece in chunks:
            window.append((piece, executor.submit(_encode_chunk, piece, opts)))
            if len(window) >= 4 * workers:
                piece0, fut = window.popleft()
                for item, result in zip(piece0, fut.result()):
                    yield pos, item, result
                    pos += 1
        while window:
            piece0, fut = window.popleft()
            for item, result in zip(piece0, fut.result()):
                yield pos, item, result
                pos += 1
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- shard writing


class _Hasher:
    """sha256 of a shard in a background thread, overlapping the reads and writes of the main one
    (hashlib releases the GIL on large buffers). One queue item per sample."""

    def __init__(self):
        self._hash = hashlib.sha256()
        self._queue: queue.Queue = queue.Queue(maxsize=64)
        self._thread = threading.Thread(target=self._run, name="shardkit-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        update = self._hash.update
        while (parts := self._queue.get()) is not None:
            for part in parts:
                update(part)

    def update(self, parts: list) -> None:
        self._queue.put(parts)

    def hexdigest(self) -> str:
        self.close()
        return self._hash.hexdigest()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


class _ShardWriter:
    """Cuts the ordered stream of encoded samples into shards no larger than the limits."""

    def __init__(self, out: Path, prefix: str, max_bytes: int, max_samples: int | None,
                 journal: list[dict], skipped: list[dict], fingerprint: str,
                 tensor_info: dict | None, durable: bool = True,
                 journal_name: str = JOURNAL_NAME):
        self.out, self.prefix, self.durable = out, prefix, durable
        self.journal_name = journal_name
        self.max_bytes, self.max_samples = max_bytes, max_samples
        self.journal = list(journal)  # [{"shard": ShardInfo fields, "consumed": int}]
        self.shards = [ShardInfo(**entry["shard"]) for entry in journal]
        self.skipped = list(skipped)
        self.fingerprint = fingerprint
        self.tensor_info = tensor_info
        self.bytes_written = 0
        self._file = None
        self._tmp: Path | None = None

    def skip(self, pos: int, item: Item, reason: str) -> None:
        self.skipped.append({"path": item.relpath, "reason": reason, "pos": pos})

    def add(self, pos: int, item: Item, blob, info: dict) -> None:
        """Append one sample: its tar bytes, as ``bytes`` or a list of buffers."""
        parts = [blob] if isinstance(blob, (bytes, bytearray, memoryview)) else blob
        nbytes = sum(len(p) for p in parts)
        if info:
            if self.tensor_info is None:
                self.tensor_info = info
            elif (info["dtype"], info["layout"], info["ndim"]) != (
                    self.tensor_info["dtype"], self.tensor_info["layout"], self.tensor_info["ndim"]):
                raise SourceError(item.relpath, f"array is {info['dtype']} {info['layout']}, but earlier "
                                  f"ones are {self.tensor_info['dtype']} {self.tensor_info['layout']}")
        if self._file is not None:
            full = self._n >= (self.max_samples or float("inf"))
            if full or self._size + nbytes + len(END_OF_ARCHIVE) > self.max_bytes:
                self._close_shard(consumed=pos)
        if self._file is None:
            self._open_shard()
        if nbytes + len(END_OF_ARCHIVE) > self.max_bytes:
            warnings.warn(f"{item.relpath}: one sample takes {nbytes} bytes, more than max_bytes="
                          f"{self.max_bytes}; it gets a shard of its own", stacklevel=2)
        self._offsets.append(self._size)
        self._file.writelines(parts)
        self._hash.update(parts)
        self._size += nbytes
        self._n += 1
        self.bytes_written += nbytes
        if nbytes + len(END_OF_ARCHIVE) > self.max_bytes:
            self._close_shard(consumed=pos + 1)

    def finish(self, total: int) -> None:
        if self._file is not None:
            self._close_shard(consumed=total)
        self.skipped = [{"path": s["path"], "reason": s["reason"]} for s in self.skipped]

    def abort(self) -> None:
        """Drop an unfinished shard (its temporary file), e.g. after an error."""
        if self._file is not None:
            self._hash.close()
            self._file.close()
            self._file = None
            if self._tmp is not None:
                self._tmp.unlink(missing_ok=True)

    def _name(self, ext: str) -> str:
        return f"{self.prefix}-{len(self.shards):06d}.{ext}"

    def _open_shard(self) -> None:
        self._tmp = self.out.staging / f".{self._name('tar')}.tmp-{uuid.uuid4().hex}"
        self._file = open(self._tmp, "wb")
        self._hash = _Hasher()
        self._size = 0
        self._n = 0
        self._offsets: list[int] = []

    def _close_shard(self, consumed: int) -> None:
        f = self._file
        f.write(END_OF_ARCHIVE)
        self._hash.update([END_OF_ARCHIVE])
        f.flush()
        if self.durable:
            os.fsync(f.fileno())
        f.close()
        self._file = None
        tar_name = self._name("tar")
        idx_name = index_name(tar_name)
        index = encode_index(self._offsets + [self._size])
        self.out.write_atomic(idx_name, index)
        self.out.commit(self._tmp, tar_name)
        info = ShardInfo(url=tar_name, num_samples=self._n, num_bytes=self._size + len(END_OF_ARCHIVE),
                         sha256=self._hash.hexdigest(), index_url=idx_name,
                         index_sha256=hashlib.sha256(index).hexdigest())
        self.shards.append(info)
        self.journal.append({"shard": vars(info).copy(), "consumed": consumed})
        journal = {"fingerprint": self.fingerprint, "shards": self.journal,
                   "skipped": [s for s in self.skipped if s["pos"] < consumed],
                   "tensor": self.tensor_info}
        self.out.write_atomic(self.journal_name, json.dumps(journal).encode())
