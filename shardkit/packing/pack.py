"""``pack_folder``: scan, encode in parallel, write shards atomically, write the manifest last.

Reproducibility: the sample order is a pure function of the scanned file list and ``seed``; the
encoded bytes are a pure function of each file and the options; shard boundaries are decided in
order from the exact tar sizes. So any number of workers gives byte-identical shards.

The steps live in their own modules: :mod:`.options` (the checked settings), :mod:`.folder`
(scan), :mod:`.encode` (one sample's bytes), :mod:`.pool` (encoding ahead, in order),
:mod:`.shards` (tar files), :mod:`.journal` (what the destination holds; resume) and
:mod:`.parts` (``part=(i, n)`` and the merge).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import OnError, ShardkitError, SourceError, WriteError
from ..manifest import Manifest
from ..shardformat import MANIFEST_PATH, MAX_PIXELS
from ..storage import Dest, make_dest
from .encode import EncodeOptions
from .folder import Item, Scan, scan_folder
from .journal import journal_name, prepare_dest, remove_temporaries
from .options import PackOptions
from .parts import finalize_stats, part_manifest_name, part_slice, part_tag
from .pool import encode_all
from .shards import ShardWriter


def pack_folder(src: str | os.PathLike[str], dest: str | os.PathLike[str], *, mode: str = "raw",
                size: int | None = None, quality: int = 90,
                max_bytes: int | str = "256MB", max_samples: int | None = None,
                workers: int | None = None, seed: int = 0, shuffle: bool = True,
                on_error: str = "raise", resume: bool = False, overwrite: bool = False,
                storage_options: dict | None = None, progress: bool = True, prefix: str = "shard",
                max_pixels: int = MAX_PIXELS, durable: bool = True,
                part: tuple[int, int] | None = None, finalize: bool = True) -> Manifest:
    """Pack an image folder (ImageFolder layout or flat) into tar shards plus ``manifest.json``.

    Returns the manifest; ``manifest.stats`` holds timing and counts. Longer explanations:
    ``docs/packing.md``.

    ``src``: an ImageFolder tree (one sub-folder per class; indices follow the sorted names) or a
    flat folder (no labels); ``.npy`` / ``.pt`` trees become tensor shards. ``dest``: a local
    folder or ``s3://bucket/prefix`` (``storage_options`` for fsspec). ``mode``: ``"raw"`` (each
    file's bytes, checked cheaply), ``"resize"`` (shorter side down to ``size``, EXIF-oriented,
    JPEG at ``quality``) or ``"tensor"`` (shorter side to ``size``, centre ``size×size`` crop,
    uint8 H×W×C ``.npy``). ``max_bytes`` (``"256MB"``, ``"1GiB"`` or a count) and
    ``max_samples`` bound each shard. ``workers``: encoding processes (default: the CPUs); the
    bytes are the same for any number. ``seed`` / ``shuffle``: the pack-time shuffle.
    ``on_error``: ``"raise"`` (the first bad file stops the pack, naming it) or ``"skip"`` (left
    out, listed in the manifest's ``skipped``). ``resume``: reuse the shards a killed pack
    finished (checked by sha256); ``overwrite``: replace a dataset already at ``dest``.
    ``progress``: a progress bar. ``prefix``: shard file names (``shard-000000.tar``).
    ``max_pixels``: larger images are refused from their header (decompression bombs).
    ``durable=False`` skips the fsync of each shard before its rename: still safe against a killed
    process (the page cache survives it), not against a power loss.

    ``part=(i, n)`` (0-based ``i``) packs only part ``i`` of ``n`` (see :mod:`.parts`) and
    returns that part's manifest (``options["part"] == [i, n]``; or the whole dataset's, when it was
    already complete); ``stats["finalized"]`` says whether ``manifest.json`` exists now and
    ``stats["waiting_for"]`` lists the parts not finished yet. With ``finalize=False`` the part
    never writes ``manifest.json``; call :func:`merge_parts` once every part is done (what the
    torchrun path does on rank 0). ``part=(0, 1)`` is an ordinary pack.
    """
    started = time.perf_counter()
    opts = PackOptions(mode=mode, size=size, quality=quality, max_bytes=max_bytes,
                       max_samples=max_samples, workers=workers, seed=seed, shuffle=shuffle,
                       on_error=OnError.of(on_error), resume=resume, overwrite=overwrite,
                       progress=progress, prefix=prefix, max_pixels=max_pixels,
                       durable=durable, part=part, finalize=finalize)
    plan = _plan(src, opts)
    out = make_dest(dest, storage_options)
    try:
        return _pack(out, plan, opts, started)
    except OSError as exc:
        if isinstance(exc, ShardkitError):
            raise
        # Disk full, read-only or vanished destination: name it, keep the cause for debugging.
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        raise WriteError(out.url(""), f"cannot write the dataset: "
                                      f"{exc.strerror or exc}{where}") from exc
    finally:
        out.close()


@dataclass
class _Plan:
    """What the scan decided: the samples of this pack (or part) in order, and how to encode."""

    scan: Scan
    order: list[Item]  # this pack's (or part's) samples, in order
    encode: EncodeOptions  # with the mode applied (arrays: "tensor")
    options: dict  # the manifest's record of the options, with the whole pack's fingerprint
    skipped: list[dict]  # problems of the scan ({"path", "reason", "pos": -1}), on_error="skip"


def _plan(src: str | os.PathLike[str], opts: PackOptions) -> _Plan:
    scan = scan_folder(src)
    skipped: list[dict] = []
    for relpath, reason in scan.problems:
        if opts.on_error.raises:
            raise SourceError(Path(scan.root, relpath), reason)
        if opts.part is None or opts.part[0] == 0:  # listed once, first, as in a single pack
            skipped.append({"path": relpath, "reason": reason, "pos": -1})
    kind = scan.kind
    if kind == "mixed":
        raise SourceError(scan.root, "holds both images and arrays (.npy/.pt); pack them "
                                     "separately")
    mode = opts.mode
    if kind == "array":
        if mode == "resize":
            raise ValueError("mode='resize' cannot apply to .npy/.pt arrays; use mode='tensor'")
        mode = "tensor"
    order = list(scan.items)
    if opts.shuffle:
        random.Random(opts.seed).shuffle(order)
    encode = EncodeOptions(mode=mode, size=opts.size, quality=opts.quality,
                           max_pixels=opts.max_pixels)
    options = {"mode": mode, "size": opts.size,
               "quality": opts.quality if mode == "resize" else None, "seed": opts.seed,
               "shuffle": opts.shuffle, "max_bytes": opts.limit, "max_samples": opts.max_samples,
               "prefix": opts.prefix, "max_pixels": opts.max_pixels, "source_kind": kind}
    options["fingerprint"] = _fingerprint(options, order)  # of the whole pack, in every part
    return _Plan(scan, part_slice(order, opts.part), encode, options, skipped)


def _pack(out: Dest, plan: _Plan, opts: PackOptions, started: float) -> Manifest:
    part, fingerprint = opts.part, plan.options["fingerprint"]
    done = prepare_dest(out, opts, fingerprint)
    if isinstance(done, Manifest):
        if part is not None:
            finalize_stats(out, done, part, fingerprint, opts.finalize)
        return done
    skipped = plan.skipped + [s for s in done.skipped if s["pos"] >= 0]
    writer = ShardWriter(out, opts, fingerprint, done, skipped)
    order = plan.order
    desc = "pack" if part is None else f"pack {part_tag(part)}"
    bar = tqdm(total=len(order), initial=done.consumed, unit="img", desc=desc, dynamic_ncols=True,
               disable=not opts.progress or not sys.stderr.isatty(), file=sys.stderr)
    try:
        for pos, item, result in encode_all(order, done.consumed, plan.encode, opts.num_workers,
                                            plan.scan.kind):
            if isinstance(result, SourceError):
                if opts.on_error.raises:
                    raise result
                writer.skip(pos, item, result.reason)
            else:
                blob, info = result
                try:
                    writer.add(pos, item, blob, info)
                except SourceError as exc:  # an array unlike the others: bad input like any other
                    if opts.on_error.raises:
                        raise
                    writer.skip(pos, item, exc.reason)
            bar.update(1)
            if bar.n % 64 == 0:
                rate = writer.bytes_written / 1e6 / max(bar.format_dict["elapsed"], 1e-9)
                bar.set_postfix_str(f"{rate:.1f} MB/s")
        writer.finish(len(order))
    finally:
        bar.close()
        writer.abort()
    tensor = None
    if plan.encode.mode == "tensor":
        tensor = writer.tensor_info or {"dtype": "|u1", "layout": "HWC", "ndim": 3}
        if part is not None:  # a part without samples does not know the dtype; the merge decides
            tensor = writer.tensor_info
    options = plan.options if part is None else {**plan.options, "part": list(part)}
    scan = plan.scan
    manifest = Manifest(classes=scan.classes, num_samples=sum(s.num_samples for s in writer.shards),
                        shards=writer.shards, options=options, skipped=writer.skipped,
                        ignored=scan.ignored, tensor=tensor)
    # The journal becomes the manifest: wherever a kill lands, the folder holds either the
    # journal (unfinished, or finished and published by --resume) or the manifest, never both.
    # (a part's manifest stays one JSON file: the merge reads the parts' lists)
    files = manifest.files(compact=False if part is not None else None)
    for name, data in files[:-1]:  # the shard list of a large dataset, before the manifest
        out.write_atomic(name, data)
    out.publish(journal_name(part), MANIFEST_PATH if part is None else part_manifest_name(part),
                files[-1][1])
    remove_temporaries(out, part, opts.prefix)
    manifest.base_url = out.url("").rstrip("/")
    manifest.stats = {"seconds": time.perf_counter() - started, "bytes": manifest.num_bytes,
                      "samples": manifest.num_samples, "shards": len(manifest.shards),
                      "skipped": len(manifest.skipped), "ignored": scan.ignored,
                      "resumed_shards": len(done.entries)}
    if part is not None:
        finalize_stats(out, manifest, part, fingerprint, opts.finalize)
    return manifest


def _fingerprint(options: dict, order: list[Item]) -> str:
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for item in order:
        h.update(f"{item.relpath}\0{item.size}\0".encode("utf-8", "surrogateescape"))
    return h.hexdigest()
