"""``manifest.cols``: a manifest's shard list column by column, for datasets of many shards.

A manifest of 10⁶ shards as JSON is 281 MiB and 1.3 GB of Python objects in every process that
loads it. Above :data:`COMPACT_SHARDS` shards, ``pack``, ``index`` and ``merge-parts`` (and
``shardkit compact`` for an existing dataset) write the shard list into ``.shardkit/manifest.cols``
instead, and ``manifest.json`` keeps everything else with ``"shards": {"columns":
"manifest.cols", "count": N, "sha256": ...}``. The file is read-only data that every process of
a machine maps (``mmap``): its pages are shared, nothing is parsed per shard, and a shard's
:class:`~shardkit.manifest.ShardInfo` is made only when a reader asks for it.

Layout (all little-endian): the 8-byte magic ``SKCOLS\\x00\\x01``, the header's length (uint64),
the header (UTF-8 JSON: ``{"count": N, "columns": {name: {"offset", "size"} | {"pattern":
...}}}``), then each column at a 64-byte-aligned offset from the start of the file:
``num_samples`` and ``num_bytes`` (uint64 × N), ``sha256`` — or ``blake3``, for shards that
name their BLAKE3 (``shardkit index``): one of the two, the same for every shard of the file —
and ``index_sha256`` (32 raw bytes × N), ``url`` and ``index_url`` either as a pattern
(``prefix`` + zero-padded counter from ``start`` + ``suffix``, what ``pack`` names) or as UTF-8
bytes with ``<name>_ends`` (uint64 × N+1 offsets). The schema (names, types) is fixed here,
never taken from the file; every offset and size is checked against the file before it is used.

The older msgpack manifest keeps its shard list column-wise too (one msgpack value per field:
:func:`encode_list_column` / :func:`decode_list_column`), with the same URL patterns.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .errors import ManifestError

__all__ = ["COMPACT_SHARDS", "MAGIC", "ShardTable", "encode", "pattern_ok", "pattern_values",
           "url_pattern"]

COMPACT_SHARDS = 100_000  # shard lists at least this long are written column-wise
MAGIC = b"SKCOLS\x00\x01"
ALIGN = 64
_INTS = ("num_samples", "num_bytes")
_SHARD_DIGESTS = ("sha256", "blake3")
_TEXTS = ("url", "index_url")
_URL_PATTERN = re.compile(r"^(.*?)(\d+)(\D*)$", re.S)


class ColumnsError(ValueError):
    """A columns file that is not what this module writes (the manifest names the file)."""


def url_pattern(values: Sequence[str]) -> dict | None:
    """``{"prefix", "start", "width", "suffix"}`` when every value is ``prefix`` + a counter
    from ``start`` zero-padded to ``width`` + ``suffix`` (what ``pack`` names), else None."""
    if not values:
        return None
    match = _URL_PATTERN.match(values[0])
    if not match:
        return None
    prefix, digits, suffix = match.groups()
    p = {"prefix": prefix, "start": int(digits), "width": len(digits), "suffix": suffix}
    if not pattern_ok(p) or pattern_values(p, len(values)) != list(values):
        return None
    return p


def pattern_ok(p: object) -> bool:
    """Whether ``p`` is a pattern :func:`url_pattern` could have made (from a file: checked)."""
    return (isinstance(p, dict) and set(p) == {"prefix", "start", "width", "suffix"}
            and isinstance(p["prefix"], str) and isinstance(p["suffix"], str)
            and all(type(p[k]) is int and 0 <= p[k] < 2**63 for k in ("start", "width"))
            and p["width"] <= 32)


def pattern_values(p: dict, count: int, first: int = 0) -> list[str]:
    """Values ``first .. first+count-1`` of pattern ``p``."""
    fmt = f"{p['prefix'].replace('%', '%%')}%0{p['width']}d{p['suffix'].replace('%', '%%')}"
    start = p["start"] + first
    return [fmt % i for i in range(start, start + count)]


def shard_digest(shards: Sequence[Any]) -> str | None:
    """The hash every shard of ``shards`` names (``"sha256"`` or ``"blake3"``), or None when
    they differ or some name none: such a list cannot be written column-wise."""
    if isinstance(shards, ShardTable):
        return shards.digest_name
    found = {"blake3" if s.blake3 is not None else "sha256" if s.sha256 is not None else None
             for s in shards}
    return found.pop() if len(found) == 1 else None


def encode(shards: Sequence[Any]) -> bytes:
    """The columns file of ``shards`` (objects with ShardInfo's fields; digests must be
    64-character lower-case hex strings, all shards naming the same hash)."""
    n = len(shards)
    data: list[tuple[str, bytes]] = []
    header: dict[str, Any] = {"count": n, "columns": {}}
    for name in _INTS:
        data.append((name, np.fromiter((getattr(s, name) for s in shards), dtype="<u8",
                                       count=n).tobytes()))
    algorithm = shard_digest(shards) if n else "sha256"
    if algorithm is None:
        raise ValueError("the shards name different hashes (sha256, blake3) or none: a shard list "
                         "in columns needs one hash for every shard")
    for name in (algorithm, "index_sha256"):
        text = "".join(getattr(s, name) for s in shards)
        if len(text) != 64 * n:
            raise ValueError(f"{name}: every shard needs a 64-character hex digest")
        data.append((name, bytes.fromhex(text)))
    for name in _TEXTS:
        values = [getattr(s, name) for s in shards]
        pattern = url_pattern(values)
        if pattern is not None:
            header["columns"][name] = {"pattern": pattern}
            continue
        encoded = [v.encode("utf-8", "surrogateescape") for v in values]
        ends = np.zeros(n + 1, dtype="<u8")
        np.cumsum([len(e) for e in encoded], out=ends[1:])
        data.append((name, b"".join(encoded)))
        data.append((name + "_ends", ends.tobytes()))
    # where each column goes after the header (whose length depends on those offsets)
    rel: dict[str, tuple[int, int]] = {}
    offset = 0
    for name, blob in data:
        rel[name] = (offset, len(blob))
        offset += -(-len(blob) // ALIGN) * ALIGN
    start = ALIGN
    while True:
        cols = dict(header["columns"])
        cols.update({k: {"offset": start + o, "size": s} for k, (o, s) in rel.items()})
        head = json.dumps({"count": n, "columns": cols}, sort_keys=True).encode("utf-8")
        if len(MAGIC) + 8 + len(head) <= start:
            break
        start += ALIGN
    out = bytearray(start + offset)
    out[:len(MAGIC)] = MAGIC
    out[len(MAGIC):len(MAGIC) + 8] = len(head).to_bytes(8, "little")
    out[len(MAGIC) + 8:len(MAGIC) + 8 + len(head)] = head
    for name, blob in data:
        at = cols[name]["offset"]
        out[at:at + len(blob)] = blob
    return bytes(out)


class ShardTable(Sequence):
    """The shard list of a columns file (``buffer``: its bytes, or a read-only ``mmap``), as a
    sequence of ``make(url, num_samples, num_bytes, sha256, index_url, index_sha256, blake3)``
    rows made on demand (one of sha256 and blake3 None, by the file's digest column). ``where``
    names the file in errors."""

    def __init__(self, buffer: Any, make: Callable[..., Any], where: str = "manifest.cols"):
        self._buffer, self._make, self.where = buffer, make, where
        view = memoryview(buffer)
        if len(view) < len(MAGIC) + 8 or bytes(view[:len(MAGIC)]) != MAGIC:
            raise ColumnsError(f"{where}: not a shardkit columns file")
        size = int.from_bytes(view[len(MAGIC):len(MAGIC) + 8], "little")
        if size > len(view) - len(MAGIC) - 8:
            raise ColumnsError(f"{where}: truncated header")
        try:
            header = json.loads(bytes(view[len(MAGIC) + 8:len(MAGIC) + 8 + size]))
            count, columns = header["count"], header["columns"]
        except (ValueError, KeyError, TypeError):
            raise ColumnsError(f"{where}: malformed header") from None
        if type(count) is not int or count < 0 or not isinstance(columns, dict):
            raise ColumnsError(f"{where}: malformed header")
        self._n = count
        self._cols: dict[str, np.ndarray] = {}
        self._patterns: dict[str, dict] = {}

        def column(name: str, dtype: str, items: int, width: int = 1) -> np.ndarray:
            spec = columns.get(name)
            if not isinstance(spec, dict) or set(spec) != {"offset", "size"} \
                    or not all(type(v) is int and v >= 0 for v in spec.values()):
                raise ColumnsError(f"{where}: column {name!r} missing or malformed")
            nbytes = np.dtype(dtype).itemsize * items * width
            if spec["size"] != nbytes or spec["offset"] + nbytes > len(view) \
                    or spec["offset"] < len(MAGIC) + 8 + size:
                raise ColumnsError(f"{where}: column {name!r} does not fit the file")
            arr = np.frombuffer(buffer, dtype=dtype, count=items * width, offset=spec["offset"])
            return arr.reshape(items, width) if width > 1 else arr

        for name in _INTS:
            self._cols[name] = column(name, "<u8", count)
        named = [d for d in _SHARD_DIGESTS if d in columns]
        if len(named) != 1:
            raise ColumnsError(f"{where}: needs one shard digest column (sha256 or blake3), "
                               f"found {named or 'none'}")
        self.digest_name: str = named[0]  # the hash every shard of the file names
        self._cols["digest"] = column(self.digest_name, "u1", count, 32)
        self._cols["index_sha256"] = column("index_sha256", "u1", count, 32)
        for name in _TEXTS:
            spec = columns.get(name)
            if isinstance(spec, dict) and "pattern" in spec:
                p = spec["pattern"]
                if not pattern_ok(p):
                    raise ColumnsError(f"{where}: column {name!r}: malformed pattern")
                self._patterns[name] = p
                continue
            ends = column(name + "_ends", "<u8", count + 1)
            spec = columns.get(name)  # (column() checks it; its size is the text's length)
            size_of = spec.get("size") if isinstance(spec, dict) else None
            text = column(name, "u1", size_of if type(size_of) is int else 0)
            if count and (ends[0] != 0 or ends[-1] != text.size
                          or np.any(np.diff(ends.astype(np.int64)) < 0)):
                raise ColumnsError(f"{where}: column {name!r}: offsets out of order")
            self._cols[name] = text
            self._cols[name + "_ends"] = ends
        sizes = self._cols["num_samples"]
        if count and (int(sizes.max()) >= 2**63 or int(self._cols["num_bytes"].max()) >= 2**63):
            raise ColumnsError(f"{where}: counts must be below 2**63")

    # ----------------------------------------------------------------- columns
    def sizes(self) -> np.ndarray:
        """Samples per shard: a read-only int64 view of the file (no copy)."""
        out = self._cols["num_samples"].view("<i8")
        out.flags.writeable = False
        return out

    def num_bytes(self) -> np.ndarray:
        return self._cols["num_bytes"].view("<i8")

    def text(self, name: str, i: int) -> str:
        """Shard ``i``'s ``url`` or ``index_url``."""
        p = self._patterns.get(name)
        if p is not None:
            return pattern_values(p, 1, i)[0]
        ends = self._cols[name + "_ends"]
        raw = self._cols[name][int(ends[i]):int(ends[i + 1])].tobytes()
        return raw.decode("utf-8", "surrogateescape")

    def texts(self, name: str) -> Iterator[str]:
        return (self.text(name, i) for i in range(self._n))

    def text_bytes(self, name: str) -> bytes | None:
        """All values of a text column as bytes joined by NUL (None: a pattern)."""
        if name in self._patterns:
            return None
        ends = self._cols[name + "_ends"].astype(np.int64)
        raw = self._cols[name].tobytes()
        return b"\0".join(raw[a:b] for a, b in zip(ends[:-1].tolist(), ends[1:].tolist()))

    def pattern(self, name: str) -> dict | None:
        return self._patterns.get(name)

    def external(self) -> bool:
        """Whether some shard URL is a full URL or an absolute path (a signed manifest's)."""
        p = self._patterns.get("url")
        if p is not None:
            return "://" in p["prefix"] or p["prefix"].startswith("/")
        text, ends = self._cols["url"], self._cols["url_ends"]
        if not self._n:
            return False
        firsts = text[ends[:-1].astype(np.int64)[np.diff(ends.astype(np.int64)) > 0]]
        return bool(np.any(firsts == ord("/"))) or b"://" in text.tobytes()

    # ----------------------------------------------------------------- the sequence
    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"shard indices must be integers, got {type(i).__name__}")
        i = int(i)
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError("shard index out of range")
        c = self._cols
        digest = c["digest"][i].tobytes().hex()
        sha256, blake3 = (None, digest) if self.digest_name == "blake3" else (digest, None)
        return self._make(self.text("url", i), int(c["num_samples"][i]), int(c["num_bytes"][i]),
                          sha256, self.text("index_url", i), c["index_sha256"][i].tobytes().hex(),
                          blake3)

    def __iter__(self) -> Iterator:
        return (self[i] for i in range(self._n))

    def __reduce__(self):
        # a DataLoader worker started with "spawn" gets the bytes (fork shares the mapping)
        return (ShardTable, (bytes(memoryview(self._buffer)), self._make, self.where))


# --------------------------------------------------------------------------- msgpack columns

_HEX = re.compile(r"[0-9a-f]*")


def encode_list_column(values: list) -> Any:
    """One shard field of the msgpack manifest (``manifest.msgpack``), compactly: ``{"u64":
    bytes}``, ``{"hex32": bytes}``, ``{"pattern": ...}``, or the plain list when no compact form
    reproduces it exactly."""
    if values and all(type(v) is int and 0 <= v < 2**64 for v in values):
        return {"u64": np.asarray(values, dtype=np.uint64).astype("<u8").tobytes()}
    if values and all(type(v) is str for v in values):
        if all(len(v) == 64 for v in values) and _HEX.fullmatch("".join(values)):
            return {"hex32": bytes.fromhex("".join(values))}
        pattern = url_pattern(values)
        if pattern is not None:
            return {"pattern": pattern}
    return list(values)


def decode_list_column(column: object, count: int, where: str) -> list:
    """A shard field of the msgpack manifest as a list (:func:`encode_list_column`'s forms)."""
    def bad(why: str) -> ManifestError:
        return ManifestError(f"{where}: malformed manifest ({why})")

    if isinstance(column, list):
        if len(column) != count:
            raise bad(f"{len(column)} values for {count} shards")
        return column
    if not isinstance(column, dict) or len(column) != 1:
        raise bad("expected a list or one of u64, hex32, pattern")
    (kind, value), = column.items()
    if kind == "u64":
        if not isinstance(value, bytes) or len(value) != 8 * count:
            raise bad(f"u64 column must be {8 * count} bytes")
        return np.frombuffer(value, dtype="<u8").tolist()
    if kind == "hex32":
        if not isinstance(value, bytes) or len(value) != 32 * count:
            raise bad(f"hex32 column must be {32 * count} bytes")
        text = value.hex()
        return [text[i:i + 64] for i in range(0, len(text), 64)]
    if kind == "pattern":
        if not isinstance(value, dict) or set(value) != {"prefix", "start", "width", "suffix"}:
            raise bad("pattern needs prefix, start, width, suffix")
        if not pattern_ok(value):
            raise bad("pattern fields have the wrong types or ranges")
        return pattern_values(value, count)
    raise bad(f"unknown column kind {kind!r}")
