"""``shardkit index``: adopt webdataset shards that already exist, wherever they are.

Each shard is read once, sequentially (one streamed GET per remote shard), by
:func:`shardkit.shardformat.walk_members`: its digest (BLAKE3 by default, ``hash="sha256"``
for sha256: see :mod:`shardkit.digests`), size, and where each sample's first member starts.
Samples are grouped as webdataset groups them (adjacent members with one key; folders and
names of no sample passed over). What a reader could not make sense of later is an
error now, naming the shard and the member: a key met again after other samples, a sample
without an image, two members of one field, an unsafe name, a link or device member, a
compressed or damaged file.

The index files (``.shardkit/<name>.idx``) and ``.shardkit/manifest.json`` are written beside
the shards when that folder or prefix can be written, else into ``out``. Shards that live
elsewhere than the manifest are listed by their full URLs, and such a manifest is signed
(:mod:`shardkit.signing`) with this machine's key: only what the user passed to ``index`` can
make a manifest point outside its folder, never a manifest that arrived with the data.

``resume=True`` keeps the shards a killed run finished: each shard's index file is written when
it is done, then a small record beside it (``<name>.idx.json``: size, digest, labels), and a
shard whose record and index file agree is not read again. The records go once the manifest
is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence, cast

import numpy as np
from tqdm.auto import tqdm

from .common import available_cpus
from .digests import INDEX_DEFAULT, check_algorithm
from .errors import ManifestError, ShardError, ShardkitError
from .gzipped import (
    SAMPLE_LIMIT,
    SHARD_KINDS,
    CountedStream,
    GunzipRange,
    WalkedUncompressed,
    is_compressed,
    is_shard_name,
)
from .manifest import Manifest, ShardInfo
from .shardformat import (
    IMAGE_FIELDS,
    MANIFEST_PATH,
    META_DIR,
    Walk,
    encode_index,
    index_extent,
    index_name,
    member_key,
    walk_members,
)
from .signing import sign
from .storage import RemoteStore, make_dest, open_store, redact, split_file_url, split_source

LABEL_FIELDS = ("cls", "cls2", "label")  # looked for in this order when label is "auto"
TEXT_LIMIT = 1 << 16  # label and metadata members kept while walking (bytes)
KEPT_LIMIT = 64 << 20  # a compressed shard's label or metadata member, at most (bytes)


@dataclass
class IndexedShard:
    """What one pass over a shard found (its offsets live in its index file)."""

    url: str  # as the manifest will name it
    num_bytes: int
    sha256: str | None  # None when the shard was hashed with BLAKE3 (``blake3``)
    num_samples: int
    label_source: list | None = None  # [field or "json", JSON key or None]
    labels: list[str] | None = None  # per sample: the label member's text or JSON value
    fields: dict[str, int] = field(default_factory=dict)  # field -> samples holding it
    ignored: int = 0  # members of no sample (folders, names without an extension)
    stamp: str | None = None  # the store's mtime or ETag when read (--resume checks it)
    spec: list | None = None  # the label spec it was indexed with (--resume checks it)
    blake3: str | None = None  # its BLAKE3 (the default hash), instead of sha256


def index_shards(source: str | os.PathLike | Sequence[str],
                 out: str | os.PathLike | None = None, *, workers: int | None = None, resume: bool = False,
                 label: str = "auto", storage_options: dict | None = None,
                 progress: bool = True, timeout: float = 60.0, retries: int = 6,
                 part: tuple[int, int] | None = None, hash: str = INDEX_DEFAULT) -> Manifest:
    """Index existing webdataset shards and write their manifest; returns it.

    ``source``: a folder or prefix of ``.tar`` shards (and ``.tar.gz`` / ``.tgz`` ones: their
    offsets count the uncompressed stream, see :mod:`shardkit.gzipped`), a brace pattern
    (``s3://bucket/train/shard-{000000..000999}.tar``), or a list of shard paths and URLs.
    ``out``: where to write the index files and the manifest (default: ``.shardkit/`` beside
    the shards, which must then all be in one folder or prefix that can be written).
    ``label``: ``"auto"`` (the first of ``cls``, ``cls2``, ``label`` that a sample holds, which
    every sample must then hold; none when no sample holds one), a field (``"cls"``),
    ``"json:KEY"`` (a key of each sample's ``.json``), or ``"none"``. Labels that are numbers are
    used as they are; text labels become class indices (``classes``: the sorted names).
    ``workers``: shards indexed at once (default: the CPUs). ``resume``: keep the index files a
    killed run finished (shards changed since are indexed again). ``storage_options``: fsspec
    options of the shards' protocol. ``progress``: a progress bar with MB/s. ``timeout`` /
    ``retries``: of every remote read. ``hash``: what the manifest records of each shard's bytes,
    ``"blake3"`` (the default: ~2.5× faster than sha256 a core, so a cold local index runs at
    the disk's speed) or ``"sha256"`` (readers before 2026-12 know only that one).

    ``part=(i, n)``: index only part ``i`` of ``n`` (a contiguous slice of the sorted shard list,
    for ``n`` machines at once; ``--part I/N``): its index files, then its part manifest
    ``.shardkit/index-part-pIIIIofNNNN.json``. The part that finds all ``n`` there writes the
    manifest from them (:func:`merge_index_parts` does it by hand); until then the one
    returned is the part's."""
    if part is not None:
        i, n = part
        if not (isinstance(i, int) and isinstance(n, int) and 0 <= i < n and n >= 1):
            raise ValueError(f"part must be (i, n) with 0 <= i < n, got {part!r}")
    hash = check_algorithm(hash)
    urls = shard_urls(source, storage_options)
    if not urls:
        raise ShardError(str(source), f"no {SHARD_KINDS} shards found")
    spec = _label_spec(label)
    homes = {split_file_url(u, query=True)[:2] for u in urls}
    dest_text = None if out is None else os.fspath(out)
    if dest_text is None:
        if len(homes) != 1:
            raise ValueError("the shards live in several folders or prefixes: pass out= (--out "
                             "DIR) for the manifest and index files")
        protocol, base = next(iter(homes))
        dest_text = base if protocol == "file" else f"{protocol}://{base}"
        # not "file": open_store made a RemoteStore (its tuned class, or FsspecStore)
        if protocol != "file" and not cast(RemoteStore, open_store(protocol, base)).writable:
            raise ValueError(f"{redact(dest_text)}: cannot write beside shards read over "
                             f"{protocol}://: pass out= (--out DIR) for the manifest and index files")
    out_dest = make_dest(dest_text, storage_options)
    try:
        out_dest.prepare()
        out_home = split_source(dest_text)[:2]
        if out_home[0] == "file":  # as split_file_url spells shard paths: absolute
            out_home = ("file", os.path.abspath(out_home[1]))
        names = [_manifest_url(u, out_home) for u in urls]
        listing = hashlib.sha256("\n".join(names).encode("utf-8", "surrogateescape")).hexdigest()
        if part is not None:  # this part's slice only; the manifest comes from all the parts
            i, n = part
            lo, hi = i * len(urls) // n, (i + 1) * len(urls) // n
            urls, names = urls[lo:hi], names[lo:hi]
        done = _finished(out_dest, names, urls, spec, hash, storage_options) if resume else {}
        shards, offsets = _index_all(urls, names, out_dest, done, spec, workers,
                                     storage_options, progress, timeout, retries, hash)
        manifest = _manifest(shards, offsets, names) if shards else None
        if part is not None:
            out_dest.sync([index_name(_local_name(n)) for n in names])
            text = None if manifest is None else manifest.to_json().encode("utf-8")
            if text is not None and any("://" in n or n.startswith("/") for n in names):
                text = sign(text)  # shards elsewhere: the merge takes only what this machine signed
            record = {"part": list(part), "listing": listing, "spec": list(spec),
                      "manifest": None if text is None else json.loads(text)}
            out_dest.write_atomic(index_part_name(part), json.dumps(record).encode("utf-8"))
            out_dest.remove_all([_record_name(n) for n in names])
            merged = _merge_parts(out_dest, part[1], listing)
            if merged is None:  # other parts still running: this part's own manifest
                if manifest is None:
                    manifest = Manifest(classes=None, num_samples=0, shards=[], options={})
                manifest.base_url = out_dest.url("").rstrip("/")
                return manifest
            return Manifest.load(dest_text, storage_options, timeout=timeout, retries=retries)
        assert manifest is not None
        files = manifest.files()  # a large shard list goes to manifest.cols (columns.py)
        if any("://" in n or n.startswith("/") for n in names):  # the JSON binds the list
            files[-1] = (MANIFEST_PATH, sign(files[-1][1]))
        out_dest.sync([index_name(_local_name(n)) for n in names])
        for name, blob in files[:-1]:
            out_dest.write_atomic(name, blob)
        data = files[-1][1]
        out_dest.write_atomic(MANIFEST_PATH, data)
        out_dest.remove_all([_record_name(n) for n in names])
    except OSError as exc:
        if isinstance(exc, ShardkitError):
            raise
        raise ShardError(out_dest.url(""), f"cannot write the index: {exc.strerror or exc}") \
            from exc
    finally:
        out_dest.close()
    return Manifest.load(dest_text, storage_options, timeout=timeout, retries=retries)


def shard_urls(source, storage_options: dict | None = None) -> list[str]:
    """The shard URLs of a source: a list as it is, a brace pattern expanded, a folder or
    prefix listed (its ``*.tar``, ``*.tar.gz`` and ``*.tgz`` files, sorted)."""
    if isinstance(source, (list, tuple)):
        return [os.fspath(u) for u in source]
    text = os.fspath(source)
    if "{" in text and "}" in text:
        import braceexpand

        return list(braceexpand.braceexpand(text))
    if is_shard_name(text) and not text.endswith("/"):
        return [text]
    protocol, base, _ = split_source(text)
    store = open_store(protocol, base, storage_options)
    return [store.url(name) if protocol == "file" else f"{protocol}://{base}/{name}"
            for name in sorted(store.list("")) if is_shard_name(name)]


def _manifest_url(url: str, home: tuple[str, str]) -> str:
    """How the manifest names a shard: relative when it lies in the manifest's folder or
    prefix (or below it), else its full URL."""
    protocol, base, name = split_file_url(url, query=True)
    if (protocol, base) == home:
        return name
    if protocol == home[0] and base.startswith(home[1].rstrip("/") + "/"):
        return f"{base[len(home[1].rstrip('/')) + 1:]}/{name}"
    return os.path.join(base, name) if protocol == "file" else url


def _index_all(urls, names, out_dest, done: dict, spec, workers, storage_options, progress,
               timeout, retries, algorithm: str = INDEX_DEFAULT
               ) -> tuple[list[IndexedShard], list[list[int]]]:
    """Index every shard not already done (in parallel, threads: reads and hashing release the
    GIL), writing each index file and record as it is finished."""
    todo = [i for i, n in enumerate(names) if n not in done]
    results = {i: done[n] for i, n in enumerate(names) if n in done}
    workers = min(len(todo), workers or available_cpus()) or 1
    bar = tqdm(total=len(urls), initial=len(results), unit="shard", desc="index",
               dynamic_ncols=True, disable=not progress or not sys.stderr.isatty(),
               file=sys.stderr)
    started, nbytes = time.perf_counter(), 0

    stores: dict = {}  # one per folder or prefix: an s3 client costs ~0.1 s to make

    def one(i: int):
        return i, *index_shard(urls[i], names[i], spec, storage_options, timeout=timeout,
                               retries=retries, stores=stores, algorithm=algorithm)

    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for i, shard, offsets in pool.map(one, todo):
                # not synced one by one (an fsync each cost more than indexing a small shard):
                # a record torn by a crash is found out by --resume, and the index files are
                # synced together before the manifest names them
                out_dest.write_atomic(index_name(_local_name(names[i])), encode_index(offsets),
                                      sync=False)
                out_dest.write_atomic(_record_name(names[i]), json.dumps(shard.__dict__).encode(),
                                      sync=False)
                results[i] = (shard, offsets)
                nbytes += shard.num_bytes
                bar.update(1)
                rate = nbytes / 1e6 / max(time.perf_counter() - started, 1e-9)
                bar.set_postfix_str(f"{rate:.0f} MB/s")
    finally:
        bar.close()
    ordered = [results[i] for i in range(len(urls))]
    return [r[0] for r in ordered], [r[1] for r in ordered]


def index_shard(url: str, name: str, spec: tuple[str, str | None], storage_options=None, *,
                timeout: float = 60.0, retries: int = 6, stores: dict | None = None,
                algorithm: str = INDEX_DEFAULT) -> tuple[IndexedShard, list[int]]:
    """One pass over the shard at ``url`` (see the module docstring); ``name`` is how the
    manifest will call it. Returns what it found and the sample offsets. ``stores``: stores
    already open, by folder or prefix (a run of many shards opens each one once).
    ``algorithm``: the hash of its bytes (``"blake3"`` or ``"sha256"``)."""
    protocol, base, file_name = split_file_url(url, query=True)
    store = _store(stores, protocol, base, storage_options, timeout, retries)
    where = store.url(file_name)
    stamp = store.stamp(file_name)  # before reading: a change while indexing shows next time
    size = store.size(file_name)
    if size is None:
        raise ShardError(where, "not found")
    kind, label_key = spec
    keep_fields = {kind} if kind in LABEL_FIELDS or kind not in ("json", "none") else set()
    if kind == "auto":
        keep_fields = set(LABEL_FIELDS)
    elif kind == "json":
        keep_fields = {"json"}

    def keep(member_name: str) -> bool:
        dot = member_name.find(".", member_name.rfind("/") + 1)
        return dot > 0 and member_name[dot + 1:].lower() in keep_fields

    if size < 0:
        raise ShardError(where, "its size is not known (the server does not say it)")
    walk = Walk()
    stored: CountedStream | None = None
    if is_compressed(file_name):  # the file as stored is hashed; its uncompressed stream walked
        stored = CountedStream(store.open_range(file_name, 0, size), algorithm)
        stream = WalkedUncompressed(GunzipRange(stored, where), walk, where)
    else:
        stream = _open_whole(store, file_name, size)
    offsets: list[int] = []
    keys: list[str] = []
    values: list[dict] = []
    seen: set[str] = set()
    fields: dict[str, int] = {}
    ignored = 0
    current: dict | None = None
    try:
        for m in walk_members(getattr(stream, "mapped", stream), where, keep, walk,
                              digest=algorithm if stored is None else None,
                              keep_limit=None if stored is None else KEPT_LIMIT):
            named = None
            if not m.folder:
                try:
                    named = member_key(m.name)
                except ValueError as exc:
                    raise ShardError(where, str(exc), key=m.name.rpartition(".")[0][:64]) from None
            if named is None:
                ignored += 1
                continue
            key, fld = named
            if not m.regular:
                raise ShardError(where, f"member {m.name!r} is not a regular file (a link, a "
                                        "device or a sparse file)", key=key)
            if current is None or key != current["__key__"]:
                if key in seen:
                    raise ShardError(where, f"member {m.name!r}: its sample {key!r} met again "
                                            "after other samples (a sample's members must be "
                                            "adjacent)", key=key)
                _close(current, where, fields)
                seen.add(key)
                current = {"__key__": key}
                offsets.append(0 if not offsets else m.start)
                keys.append(key)
                values.append(current)
            if fld in current:
                raise ShardError(where, f"member {m.name!r}: a second {fld!r} member of sample "
                                        f"{key!r}", key=key)
            current[fld] = m.data
        num_bytes, digest = (walk.size, walk.digest) if stored is None else stored.result()
    finally:
        stream.close()
    _close(current, where, fields)
    if not keys:
        raise ShardError(where, "holds no sample")
    if num_bytes != size:
        raise ShardError(where, f"read {num_bytes:,} bytes, the store says {size:,} (changed "
                                "while indexing?)")
    offsets.append(walk.end)
    if walk.end + 1024 > walk.size:
        raise ShardError(where, "does not end with the two zero blocks of a tar (truncated?)")
    if stored is not None:  # a sample is read whole: a compressed one's size is bounded
        gaps = np.diff(offsets)
        if int(gaps.max()) > SAMPLE_LIMIT:
            big = int(gaps.argmax())
            raise ShardError(where, f"sample {keys[big]!r} holds {int(gaps[big]):,} bytes "
                                    f"uncompressed, over the limit of {SAMPLE_LIMIT:,} for a "
                                    "compressed shard (a gzip bomb?)", key=keys[big])
    source, labels = _labels(values, keys, spec, where)
    return IndexedShard(url=name, num_bytes=num_bytes,
                        sha256=digest if algorithm == "sha256" else None,
                        num_samples=len(keys), label_source=source, labels=labels,
                        fields=fields, ignored=ignored, stamp=stamp, spec=list(spec),
                        blake3=digest if algorithm == "blake3" else None), offsets


def _open_whole(store, name: str, size: int):
    """The whole file ``name``: a local one mapped (only its headers are touched while walking,
    the hash reads it alongside in a helper thread), a remote one as one streamed GET."""
    if size > 0 and store.is_local(name):
        try:
            return _Mapped(store.url(name))
        except (OSError, ValueError):
            pass  # not mappable (a FIFO, a special file system): read it as a stream
    return store.open_range(name, 0, size)


class _Mapped:
    """A local file mapped into memory (``mapped``): walked without copying its bytes."""

    def __init__(self, path: str):
        import mmap

        with open(path, "rb") as f:
            self.mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.mapped.madvise(mmap.MADV_SEQUENTIAL)

    def close(self) -> None:
        try:
            self.mapped.close()
        except BufferError:  # a view still held by an error's traceback: the GC unmaps it
            pass


def _close(sample: dict | None, where: str, fields: dict) -> None:
    """A finished sample: it must hold an image (or an array)."""
    if sample is None:
        return
    present = [f for f in sample if f != "__key__"]
    if not any(f in IMAGE_FIELDS or f == "npy" for f in present):
        raise ShardError(where, f"sample {sample['__key__']!r} has no image (members: "
                                f"{', '.join(sorted(present))}; images are "
                                f"{', '.join(IMAGE_FIELDS)} or npy)", key=sample["__key__"])
    for f in present:
        fields[f] = fields.get(f, 0) + 1


def _label_spec(label: str) -> tuple[str, str | None]:
    if label in ("auto", "none") or label in LABEL_FIELDS:
        return label, None
    if label.startswith("json:") and len(label) > 5:
        return "json", label[5:]
    if member_key(f"x.{label}") is not None and "/" not in label:
        return label, None
    raise ValueError(f"label must be 'auto', 'none', a field such as 'cls', or 'json:KEY'; "
                     f"got {label!r}")


def _labels(samples: list[dict], keys: list[str], spec, where: str) -> tuple:
    """``(where labels come from, each sample's label text or JSON value)``, by the spec;
    ``(None, None)`` when labels are not used."""
    kind, json_key = spec
    if kind == "none":
        return None, None
    if kind == "auto":  # the first label field any sample holds; then every sample needs it
        kind = next((f for f in LABEL_FIELDS if any(f in s for s in samples)), None)
        if kind is None:
            return None, None
    out = []
    for key, s in zip(keys, samples):
        if kind == "json":
            raw = s.get("json")
            try:
                value = json.loads(raw)[json_key] if raw is not None else None
            except (ValueError, KeyError, TypeError):
                value = None
            if value is None or isinstance(value, (dict, list, bool, float)):
                raise ShardError(where, f"sample {key!r}: its .json has no usable {json_key!r} "
                                        "label (a number or a name)", key=key)
            out.append(str(value))
        else:
            raw = s.get(kind)
            if raw is None:
                raise ShardError(where, f"sample {key!r} has no .{kind} member (labels are read "
                                        f"from .{kind}; --label none to index without)", key=key)
            try:
                out.append(raw.strip().decode("utf-8"))  # bytes.strip, as the reader
            except UnicodeDecodeError:
                raise ShardError(where, f"sample {key!r}: its .{kind} is not text",
                                 key=key) from None
    return [kind, json_key], out


def _manifest(shards: list[IndexedShard], offsets: list[list[int]], names: list[str]) -> Manifest:
    """The manifest of the indexed shards: counts, sizes, digests, labels and classes."""
    sources = {tuple(s.label_source) if s.label_source else None for s in shards}
    if len(sources) > 1:
        raise ManifestError(f"the shards disagree on their labels: {sorted(map(str, sources))} "
                            "(pass label= / --label)")
    source = next(iter(sources))
    values = [v for s in shards for v in (s.labels or ())]
    labels: dict[str, str | bool | None]
    classes, labels = None, {"field": None}
    if source is not None:
        kind, json_key = source
        labels = {"field": kind} if kind != "json" else {"json": json_key}
        if all(v.isascii() and v.isdigit() and len(v) <= 10 for v in values):  # as the reader
            # class indices: ``classes`` names every index up to the largest, so that
            # len(classes) is the number of classes (a head's size) even where some are absent
            top = max(map(int, values)) if values else -1
            classes = [str(i) for i in range(top + 1)] if top < 100_000 else \
                [str(v) for v in sorted({int(v) for v in values})]
        else:
            classes = sorted(set(values))
            labels["names"] = True
    fields: dict[str, int] = {}
    for s in shards:
        for f, n in s.fields.items():
            fields[f] = fields.get(f, 0) + n
    infos = []
    for s, offs, name in zip(shards, offsets, names):
        index = encode_index(offs)
        infos.append(ShardInfo(url=name, num_samples=s.num_samples, num_bytes=s.num_bytes,
                               sha256=s.sha256, index_url=index_name(_local_name(name)),
                               index_sha256=hashlib.sha256(index).hexdigest(), blake3=s.blake3))
    options = {"indexed_by": "shardkit index", "order": _order(shards, source),
               "fields": dict(sorted(fields.items()))}
    return Manifest(classes=classes, num_samples=sum(s.num_samples for s in shards),
                    shards=infos, options=options, ignored=sum(s.ignored for s in shards),
                    labels=labels)


def _order(shards: list[IndexedShard], source) -> dict:
    """What the index saw of the samples' order: how often a sample has its predecessor's
    label, against what a shuffled order would give (the reader's default block size follows)."""
    if source is None:
        return {"labels": False}
    same = total = 0
    counts: dict = {}
    for s in shards:
        labels = s.labels or []
        same += sum(a == b for a, b in zip(labels, labels[1:]))
        total += max(0, len(labels) - 1)
        for v in labels:
            counts[v] = counts.get(v, 0) + 1
    n = sum(counts.values())
    expected = sum((c / n) ** 2 for c in counts.values()) if n else 0.0
    return {"labels": True, "same_label_neighbours": round(same / total, 4) if total else 0.0,
            "if_shuffled": round(expected, 4)}


def _local_name(name: str) -> str:
    """Where a shard's index file goes below the manifest's folder: its relative name, or for a
    shard elsewhere its file name (an index of the same name from another folder gets a
    number)."""
    if "://" not in name and not name.startswith("/"):
        return name
    base = name.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]
    return f"{base[:-4] if base.endswith('.tar') else base}-{digest}.tar"


# --------------------------------------------------------------------------- resume


def _record_name(name: str) -> str:
    return index_name(_local_name(name)) + ".json"


def _finished(out_dest, names: list[str], urls: list[str], spec,
              algorithm: str = INDEX_DEFAULT, storage_options=None) -> dict:
    """The shards a killed run finished: ``name -> (IndexedShard, offsets)`` for those whose
    record and index file are there and agree, indexed with the same label spec and hash, and
    not changed since (the store's mtime or ETag, else size, as recorded)."""
    done: dict = {}
    stores: dict = {}
    for name, url in zip(names, urls):
        raw, index = out_dest.read_bytes(_record_name(name)), None
        if raw is not None:
            index = out_dest.read_bytes(index_name(_local_name(name)))
        if raw is None or index is None:
            continue
        try:
            shard = IndexedShard(**json.loads(raw))
            n, _ = index_extent(index, name)
        except (ValueError, TypeError, ShardError):
            continue  # torn or foreign: index it again
        offsets = np.frombuffer(index, dtype="<u8", offset=8).astype(int).tolist()
        if shard.url != name or n != shard.num_samples or shard.spec != list(spec) \
                or not isinstance(getattr(shard, algorithm), str) \
                or offsets[-1] + 1024 > shard.num_bytes and not is_compressed(name):
            continue
        protocol, base, own = split_file_url(url, query=True)
        store = _store(stores, protocol, base, storage_options)
        if shard.stamp is not None and store.stamp(own) == shard.stamp \
                or shard.stamp is None and store.size(own) == shard.num_bytes:
            done[name] = (shard, offsets)  # (a shard rewritten since is indexed again)
    return done


_STORES_LOCK = threading.Lock()


def _store(stores: dict | None, protocol: str, base: str, storage_options, timeout: float = 60.0,
           retries: int = 6):
    """The store of ``(protocol, base)``: from ``stores`` when it has it (added when not)."""
    if stores is None:
        return open_store(protocol, base, storage_options, timeout=timeout, retries=retries)
    with _STORES_LOCK:
        store = stores.get((protocol, base))
        if store is None:
            store = stores[(protocol, base)] = open_store(protocol, base, storage_options,
                                                          timeout=timeout, retries=retries)
    return store


INDEX_PART = f"{META_DIR}/index-part-{{tag}}.json"


def index_part_name(part: tuple[int, int]) -> str:
    """Where part ``i`` of ``n`` of an index in parts records what it indexed (the tag as
    ``pack --part`` spells it: ``p0003of0008``)."""
    i, n = part
    width = max(4, len(str(n)))
    return INDEX_PART.format(tag=f"p{i:0{width}d}of{n:0{width}d}")


def merge_index_parts(out: str | os.PathLike, parts: int, *,
                      storage_options: dict | None = None) -> Manifest:
    """Write the manifest of an index made in ``parts`` parts (``index_shards(part=...)``) from
    their part records in ``out`` (the folder or prefix holding ``.shardkit/``). A ShardError
    names the parts not finished, or of another listing of shards."""
    dest_text = os.fspath(out)
    out_dest = make_dest(dest_text, storage_options)
    try:
        merged = _merge_parts(out_dest, int(parts), None, strict=True)
    finally:
        out_dest.close()
    assert merged is not None
    return Manifest.load(dest_text, storage_options)


def _merge_parts(out_dest, n: int, listing: str | None, strict: bool = False) -> Manifest | None:
    """The manifest of all ``n`` parts, written (the JSON last); None when some part is not
    there yet (``strict``: a ShardError saying which)."""
    records = {}
    for i in range(n):
        raw = out_dest.read_bytes(index_part_name((i, n)))
        if raw is None:
            continue
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("part") == [i, n]:
            records[i] = rec
    listings = {rec.get("listing") for rec in records.values()}
    listing = listing or (next(iter(listings)) if len(listings) == 1 else None)
    missing = [i for i in range(n) if i not in records or records[i].get("listing") != listing]
    if missing:
        if strict:
            raise ShardError(out_dest.url(""), f"cannot write the manifest: part(s) {missing} of "
                                               f"0..{n - 1} not finished (or of another listing)")
        return None
    parts = [Manifest.from_json(json.dumps(records[i]["manifest"]), out_dest.url("part"))
             for i in range(n) if records[i]["manifest"] is not None]
    if not parts:
        raise ShardError(out_dest.url(""), f"no {SHARD_KINDS} shards found")
    manifest = _merge_manifests(parts, out_dest.url(""))
    files = manifest.files()
    if any("://" in s.url or s.url.startswith("/") for s in manifest.shards):
        files[-1] = (MANIFEST_PATH, sign(files[-1][1]))
    for name, blob in files:
        out_dest.write_atomic(name, blob)
    return manifest


def _merge_manifests(parts: list[Manifest], where: str) -> Manifest:
    """One manifest of the parts' shards, in part order: labels must agree; class names are
    united (sorted), class indices cover the largest; what the parts saw of the order weighs by
    their samples."""
    kinds = {json.dumps(m.labels or {}, sort_keys=True) for m in parts}
    bare = {json.dumps({k: v for k, v in (m.labels or {}).items() if k != "names"},
                       sort_keys=True) for m in parts}
    if len(bare) > 1:
        raise ManifestError(f"{where}: the parts disagree on their labels: {sorted(kinds)} "
                            "(pass label= / --label)")
    named = [m for m in parts if (m.labels or {}).get("names")]
    labels = dict(parts[0].labels or {})
    if named and len(named) != len(parts):  # numbers in some parts, names in others: names
        raise ManifestError(f"{where}: some parts' labels are numbers and others' class names "
                            "(pass label= / --label)")
    classes: list[str] | None = None
    if any(m.classes is not None for m in parts):
        if named:
            classes = sorted({c for m in parts for c in (m.classes or [])})
        else:
            top = max(len(m.classes or []) for m in parts)
            classes = [str(i) for i in range(top)]
    fields: dict[str, int] = {}
    for m in parts:
        for f, k in (m.options.get("fields") or {}).items():
            fields[f] = fields.get(f, 0) + k
    total = sum(m.num_samples for m in parts) or 1
    order: dict = {"labels": bool(parts[0].options.get("order", {}).get("labels"))}
    for key in ("same_label_neighbours", "if_shuffled"):
        values = [(m.options.get("order") or {}).get(key) for m in parts]
        numbers = [float(v) for v in values if isinstance(v, (int, float))]
        if len(numbers) == len(parts):
            order[key] = round(sum(v * m.num_samples for v, m in zip(numbers, parts)) / total, 4)
    options = {"indexed_by": "shardkit index", "order": order,
               "fields": dict(sorted(fields.items())), "parts": len(parts)}
    shards = [s for m in parts for s in m.shards]
    return Manifest(classes=classes, num_samples=sum(s.num_samples for s in shards),
                    shards=shards, options=options, ignored=sum(m.ignored for m in parts),
                    labels=labels or {"field": None})


__all__ = ["IndexedShard", "index_shard", "index_shards", "merge_index_parts", "shard_urls"]
