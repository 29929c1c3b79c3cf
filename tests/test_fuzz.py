"""Fuzzing the read path (tar bytes, tar headers, index files, manifests in JSON and msgpack) and the
write path (folders of odd names and odd bytes) with hypothesis.

Every input must end in samples or a shardkit error naming the dataset file at fault: never a hang
(each example runs under a SIGALRM time limit), never another exception type, never a large
allocation (tracemalloc peak per example). Data is generated from a small packed dataset.

Budget: ``SHARDKIT_FUZZ_EXAMPLES`` examples per fuzz test (default 120, derandomized so CI is
reproducible; set it to fuzz longer with fresh random inputs, e.g. ``SHARDKIT_FUZZ_EXAMPLES=20000``).
Each test prints how many inputs it tried (``pytest -s``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import tarfile
import tracemalloc
import uuid
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shardkit
from shardkit import StreamingDataset
from shardkit.errors import ManifestError, ShardkitError, SourceError
from shardkit.manifest import Manifest
from shardkit.shardformat import INDEX_MAGIC, MANIFEST_PATH, MSGPACK_NAME
from shardkit.verify import verify

from _helpers_read import image_folder, pack

_ENV = os.environ.get("SHARDKIT_FUZZ_EXAMPLES")
EXAMPLES = int(_ENV) if _ENV else 120
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=_ENV is None, database=None,
                suppress_health_check=list(HealthCheck))
TIME_LIMIT = 10.0  # seconds per example (a tiny dataset reads in milliseconds)
PEAK_LIMIT = 32 << 20  # bytes traced by tracemalloc per example; the whole dataset is ~20 KB
TRIED: dict[str, int] = {}


class Hang(BaseException):
    """Raised by SIGALRM: not an Exception, so no ``except`` in shardkit can swallow it."""


@contextlib.contextmanager
def time_limit(seconds: float = TIME_LIMIT):
    def on_alarm(signum, frame):
        raise Hang(f"no result after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module", autouse=True)
def _traced():
    tracemalloc.start()
    yield
    tracemalloc.stop()
    for name, n in TRIED.items():
        print(f"\n{name}: {n} inputs tried")


def _count(name: str) -> None:
    TRIED[name] = TRIED.get(name, 0) + 1


# --------------------------------------------------------------------------- a small dataset


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    src = image_folder(tmp_path_factory.mktemp("fuzz_src"), classes=2, per_class=3, size=(16, 12))
    dest = tmp_path_factory.mktemp("fuzz") / "good"
    pack(src, dest, mode="raw", max_samples=3)
    assert len(Manifest.load(dest).shards) == 2
    return dest


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz_cases")


def _copy(good: Path, scratch: Path) -> Path:
    dest = scratch / uuid.uuid4().hex[:12]
    shutil.copytree(good, dest)
    return dest


def _members(tar_bytes: bytes) -> list[int]:
    """Header offsets of every member of a (good) shard."""
    import io

    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tf:
        return [m.offset for m in tf.getmembers()]


def _set_shard(dest: Path, shard_no: int, data: bytes, *, fix_manifest: bool) -> None:
    doc = json.loads((dest / MANIFEST_PATH).read_text())
    entry = doc["shards"][shard_no]
    (dest / entry["url"]).write_bytes(data)
    if fix_manifest:  # so the reader gets as far as the tar parser
        entry.update(num_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        (dest / MANIFEST_PATH).write_text(json.dumps(doc))


def consume(dest: Path, *, on_error: str = "raise", decode: str = "uint8", workers: int = 0):
    """Read one epoch; returns the keys or the ShardkitError. Anything else fails the test."""
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    try:
        with time_limit():
            # "batch": the batch fast path (direct header parsing, libjpeg-turbo + OpenCV crops)
            kw = dict(decode=decode) if decode != "batch" else \
                dict(batch_size=2, crop=shardkit.RandomResizedCrop(16))
            ds = StreamingDataset(dest, on_error=on_error, with_keys=True, shuffle=False, **kw)
            if workers:
                loader = shardkit.make_loader(ds, num_workers=workers, persistent_workers=False)
                keys = [item[2] for item in loader]
            else:
                keys = [item[2] for item in ds]
            if decode == "batch":
                keys = [k for batch in keys for k in batch]
            result = keys
    except ShardkitError as exc:
        text = str(exc)
        assert str(dest) in text, f"error does not name the dataset file: {text}"
        result = exc
    peak = tracemalloc.get_traced_memory()[1] - before
    assert peak < PEAK_LIMIT, f"{peak} bytes allocated while reading {dest}"
    return result


# --------------------------------------------------------------------------- tar bytes

FIELDS = {"name": (0, 100), "mode": (100, 8), "uid": (108, 8), "gid": (116, 8),
          "size": (124, 12), "mtime": (136, 12), "chksum": (148, 8), "type": (156, 1),
          "linkname": (157, 100), "magic": (257, 8), "uname": (265, 32), "devmajor": (329, 8),
          "prefix": (345, 155), "realsize": (483, 12), "sparse": (386, 96)}
NAMES = [b"../x.jpg", b"/etc/passwd.jpg", b"a/b.jpg", b"..", b"", b"k.jpg\0junk", b"\0",
         b"k" * 100, b"key.JPG", b"key.cls", b"key.json", b"key", b".jpg", b"\xff\xfe.jpg",
         b"key.pickle", b"key.npy", b"key.jpg/", b"a b.jpg", b"key.jpg\n"]


def _octal(n: int, width: int) -> bytes:
    return (b"%0*o" % (width - 1, n))[-(width - 1):] + b"\0"


def _base256(n: int, width: int) -> bytes:
    """GNU base-256 (what tarfile reads for numbers that do not fit in octal), clamped."""
    limit = 256 ** (width - 1)
    n = max(-limit, min(limit - 1, n))
    if n >= 0:
        return b"\x80" + n.to_bytes(width - 1, "big")
    return b"\xff" + (256 ** width + n).to_bytes(width, "big")[1:]


values = st.one_of(
    st.integers(0, 8**11 - 1).map(lambda n: ("octal", n)),
    st.sampled_from([8**11 - 1, 100 * 10**9, 2**63, 2**80]).map(lambda n: ("base256", n)),
    st.integers(-2**80, 2**80).map(lambda n: ("base256", n)),
    st.binary(max_size=160).map(lambda b: ("raw", b)),
    st.sampled_from(NAMES).map(lambda b: ("raw", b)),
    st.sampled_from(list(b"0125LKxgS7\0AZ")).map(lambda c: ("raw", bytes([c]))),
)

ops = st.one_of(
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=1100)),
    st.tuples(st.just("header"), st.integers(0, 40), st.sampled_from(sorted(FIELDS)), values,
              st.booleans()),
)


def _encode_value(value, width: int) -> bytes:
    kind, v = value
    if kind == "octal":
        return _octal(v, width)
    if kind == "base256":
        return _base256(v, width)
    return v[:width].ljust(width, b"\0")


def mutate_tar(data: bytes, operations) -> bytes:
    headers = _members(data)
    out = bytearray(data)
    for op in operations:
        if op[0] == "flip":
            pos = min(int(op[1] * len(out)), len(out) - 1)
            out[pos] ^= op[2]
        elif op[0] == "truncate":
            del out[int(op[1] * len(out)):]
        elif op[0] == "insert":
            pos = int(op[1] * len(out))
            out[pos:pos] = op[2]
        else:
            _, member_no, field, value, fix_sum = op
            base = headers[member_no % len(headers)]
            if base + 512 > len(out):
                continue
            start, width = FIELDS[field]
            out[base + start:base + start + width] = _encode_value(value, width)
            if fix_sum:  # a header that passes tarfile's checksum test
                out[base + 148:base + 156] = b" " * 8
                out[base + 148:base + 156] = b"%06o\0 " % sum(out[base:base + 512])
        if not out:
            break
    return bytes(out)


@FUZZ
@given(shard_no=st.integers(0, 1), operations=st.lists(ops, min_size=1, max_size=4),
       fix_manifest=st.booleans(), on_error=st.sampled_from(["raise", "skip"]),
       decode=st.sampled_from(["uint8", "raw", "batch"]))
def test_fuzz_tar_bytes(good, scratch, shard_no, operations, fix_manifest, on_error, decode):
    _count("tar bytes and headers")
    dest = _copy(good, scratch)
    url = Manifest.load(dest).shards[shard_no].url
    _set_shard(dest, shard_no, mutate_tar((dest / url).read_bytes(), operations),
               fix_manifest=fix_manifest)
    result = consume(dest, on_error=on_error, decode=decode)
    if isinstance(result, list):
        assert len(result) <= 6
    shutil.rmtree(dest)


# ----------------------------------------------------------------- headers claiming huge sizes


def _huge_member_cases(data: bytes) -> dict[str, bytes]:
    jpg = _members(data)[1]  # the first sample's image member (after its .cls)

    def patched(**fields) -> bytes:
        out = bytearray(data)
        for field, raw in fields.items():
            start, width = FIELDS[field]
            out[jpg + start:jpg + start + width] = raw.ljust(width, b"\0")[:width]
        out[jpg + 148:jpg + 156] = b" " * 8
        out[jpg + 148:jpg + 156] = b"%06o\0 " % sum(out[jpg:jpg + 512])
        return bytes(out)

    hundred_gb = 100 * 10**9
    sparse_map = _octal(0, 12) + _octal(10, 12)
    return {
        "octal_max": patched(size=_octal(8**11 - 1, 12)),
        "base256_100GB": patched(size=_base256(hundred_gb, 12)),
        "base256_2**80": patched(size=_base256(2**80, 12)),
        "negative": patched(size=_base256(-1, 12)),
        # GNU sparse: 10 stored bytes that tarfile would expand into 100 GB of zeros
        "sparse_100GB": patched(type=b"S", realsize=_base256(hundred_gb, 12), sparse=sparse_map),
        # overlapping sparse map: tarfile used to allocate ~17 GB and spin
        "sparse_overlap": patched(type=b"S", realsize=_octal(8**11 - 1, 12),
                                  sparse=sparse_map + _octal(5, 12) + _octal(1, 12)),
        "pax_header_100GB": patched(type=b"x", size=_base256(hundred_gb, 12)),
        "gnu_longname_100GB": patched(type=b"L", size=_base256(hundred_gb, 12)),
    }


@pytest.mark.parametrize("case", ["octal_max", "base256_100GB", "base256_2**80", "negative",
                                  "sparse_100GB", "sparse_overlap", "pax_header_100GB",
                                  "gnu_longname_100GB"])
@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_member_claiming_a_huge_size_allocates_nothing(good, scratch, case, on_error):
    dest = _copy(good, scratch)
    url = Manifest.load(dest).shards[0].url
    data = _huge_member_cases((dest / url).read_bytes())[case]
    _set_shard(dest, 0, data, fix_manifest=True)
    result = consume(dest, on_error=on_error)  # time and tracemalloc peak are checked there
    if on_error == "raise":
        assert isinstance(result, ShardkitError) and str(dest / url) in str(result), result
    else:
        assert isinstance(result, list) and len(result) == 6


def test_worker_process_survives_bad_shards(good, scratch):
    """The same inputs through a DataLoader worker: an error naming the shard, no dead worker."""
    dest = _copy(good, scratch)
    url = Manifest.load(dest).shards[0].url
    data = _huge_member_cases((dest / url).read_bytes())["sparse_100GB"]
    _set_shard(dest, 0, data, fix_manifest=True)
    try:
        with time_limit(60):
            result = consume(dest, workers=2)
    except RuntimeError as exc:  # torch re-raises what it cannot rebuild as a RuntimeError
        result = exc
    text = str(result)
    assert isinstance(result, (ShardkitError, RuntimeError)), result
    assert "ShardError" in text or isinstance(result, ShardkitError), text
    assert str(dest / url) in text, text
    assert "killed" not in text and "exited unexpectedly" not in text
    assert len(consume(dest, workers=2, on_error="skip")) == 6


# --------------------------------------------------------------------------- index files


@FUZZ
@given(shard_no=st.integers(0, 1), data=st.data(), fix_sha=st.booleans())
def test_fuzz_index_files(good, scratch, shard_no, data, fix_sha):
    _count("index files")
    dest = _copy(good, scratch)
    doc = json.loads((dest / MANIFEST_PATH).read_text())
    entry = doc["shards"][shard_no]
    raw = bytearray((dest / entry["index_url"]).read_bytes())
    how = data.draw(st.sampled_from(["offset", "bytes", "truncate", "append"]))
    if how == "offset":
        slot = data.draw(st.integers(0, (len(raw) - len(INDEX_MAGIC)) // 8 - 1))
        value = data.draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 20000),
                                    st.sampled_from([2**63, 2**63 - 1, 2**64 - 1, 1023, 1024])))
        pos = len(INDEX_MAGIC) + 8 * slot
        raw[pos:pos + 8] = value.to_bytes(8, "little")
    elif how == "bytes":
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] ^= data.draw(st.integers(1, 255))
    elif how == "truncate":
        del raw[data.draw(st.integers(0, len(raw) - 1)):]
    else:
        raw += data.draw(st.binary(min_size=1, max_size=64))
    (dest / entry["index_url"]).write_bytes(bytes(raw))
    if fix_sha:
        entry["index_sha256"] = hashlib.sha256(bytes(raw)).hexdigest()
        (dest / MANIFEST_PATH).write_text(json.dumps(doc))
    consume(dest, on_error=data.draw(st.sampled_from(["raise", "skip"])))
    shutil.rmtree(dest)


# --------------------------------------------------------------------------- manifests

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(-2**70, 2**70)
    | st.floats(allow_nan=True) | st.text(max_size=20)
    | st.sampled_from(["../x.tar", "/etc/passwd", "http://evil.example/x.tar", "s3://b/x",
                       "a\\b.tar", ".", "", "shard-000000.tar\0", "shard-000001.idx"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8),
                                                                     children, max_size=3),
    max_leaves=6)


def _paths(obj, prefix=()):
    """Every (path) into a nested dict/list, the root excluded."""
    out = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        out.append(prefix + (k,))
        out += _paths(v, prefix + (k,))
    return out


def _mutate_doc(doc, data):
    paths = _paths(doc)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        parent = doc
        try:
            for k in path[:-1]:
                parent = parent[k]
            how = data.draw(st.sampled_from(["replace", "delete", "add"]))
            if how == "replace":
                parent[path[-1]] = data.draw(json_values)
            elif how == "delete":
                del parent[path[-1]]
            elif isinstance(parent, dict):
                parent[data.draw(st.text(max_size=10))] = data.draw(json_values)
            else:
                parent.append(data.draw(json_values))
        except (KeyError, IndexError, TypeError):
            continue  # an earlier change removed or replaced this path
    return doc


def _flip_write_consume(dest: Path, name: str, blob: bytearray, raw_flips, parse) -> None:
    """Flip the drawn bytes of a manifest ``blob``, write it as ``name``: either it parses and the
    dataset reads, or both name the file in a ManifestError."""
    for frac, x in raw_flips:
        blob[min(int(frac * len(blob)), len(blob) - 1)] ^= x
    (dest / name).write_bytes(bytes(blob))
    if _check_parse(parse, bytes(blob), dest, name) is not None:
        consume(dest)
    else:
        assert isinstance(consume(dest), ManifestError)
    shutil.rmtree(dest)


def _check_parse(parse, blob, dest: Path, name: str):
    try:
        with time_limit():
            manifest = parse(blob, str(dest / name))
    except ManifestError as exc:
        assert str(dest / name) in str(exc)
        return None
    assert isinstance(manifest, Manifest)
    return manifest


@FUZZ
@given(data=st.data(), raw_flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)),
                                          max_size=2))
def test_fuzz_json_manifest(good, scratch, data, raw_flips):
    _count("JSON manifests")
    dest = _copy(good, scratch)
    doc = _mutate_doc(json.loads((dest / MANIFEST_PATH).read_text()), data)
    blob = bytearray(json.dumps(doc).encode("utf-8", "surrogatepass"))
    _flip_write_consume(dest, MANIFEST_PATH, blob, raw_flips, Manifest.from_json)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=80) | st.sampled_from(["../x.tar", "/etc/passwd", "s3://b/x"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8),
                                                                     children, max_size=3),
    max_leaves=6)


@FUZZ
@given(data=st.data(), raw_flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)),
                                          max_size=2))
def test_fuzz_msgpack_manifest(good, scratch, data, raw_flips):
    _count("msgpack manifests")
    dest = _copy(good, scratch)
    doc = msgpack.unpackb(Manifest.load(dest).to_msgpack(), raw=False)
    for _ in range(data.draw(st.integers(0, 3))):
        paths = _paths(doc)
        path = data.draw(st.sampled_from(paths))
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        if data.draw(st.booleans()):
            parent[path[-1]] = data.draw(msgpack_values)
        elif isinstance(parent, dict):
            del parent[path[-1]]
    blob = bytearray(msgpack.packb(doc, use_bin_type=True))
    (dest / MANIFEST_PATH).unlink()
    _flip_write_consume(dest, MSGPACK_NAME, blob, raw_flips, Manifest.from_msgpack)


@pytest.mark.parametrize("url", ["../other/shard-000000.tar", "/etc/passwd", "a/../../x.tar",
                                 "http://evil.example/shard.tar", "s3://bucket/shard.tar",
                                 "file:///etc/passwd", "a\\..\\x.tar", "x.tar\0"])
@pytest.mark.parametrize("field", ["url", "index_url"])
def test_manifest_pointing_outside_the_dataset_is_refused(good, scratch, url, field):
    dest = _copy(good, scratch)
    doc = json.loads((dest / MANIFEST_PATH).read_text())
    doc["shards"][0][field] = url
    (dest / MANIFEST_PATH).write_text(json.dumps(doc))
    result = consume(dest)
    assert isinstance(result, ManifestError) and "not a plain relative name" in str(result)
    m = Manifest.load(good)
    m.shards[0].__dict__[field] = url
    (dest / MANIFEST_PATH).unlink()
    (dest / MSGPACK_NAME).write_bytes(m.to_msgpack())
    result = consume(dest)
    assert isinstance(result, ManifestError) and "not a plain relative name" in str(result)


# --------------------------------------------------------------------------- write path

EXTS = [".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".JPG"]


def _png_bomb() -> bytes:
    from conftest import photo, png_bytes, png_with_size

    return png_with_size(png_bytes(photo(8, 8)), 100_000, 100_000)


def _contents():
    from conftest import jpeg_bytes, photo, png_bytes

    good_jpeg = jpeg_bytes(photo(16, 12, 1))
    return st.one_of(
        st.just(("good_jpeg", good_jpeg)),
        st.just(("good_png", png_bytes(photo(12, 9, 2)))),
        st.binary(max_size=300).map(lambda b: ("random", b)),
        st.integers(3, len(good_jpeg) - 1).map(lambda n: ("truncated", good_jpeg[:n])),
        st.just(("bomb", _png_bomb())),
        st.tuples(st.integers(0, len(good_jpeg) - 1), st.integers(1, 255)).map(
            lambda t: ("flipped", good_jpeg[:t[0]] + bytes([good_jpeg[t[0]] ^ t[1]])
                       + good_jpeg[t[0] + 1:])),
    )


name_stems = st.one_of(
    st.sampled_from([b"CON", b"-rf", b".", b"..x", b"a\nb", b"\xff\xfe", b"nul", b" ",
                     b"$(touch pwned)", b"`id`", b"a;rm -rf x", b"\x01\x7f", b"x" * 250,
                     "é🙂".encode(), b"-", b"--resume"]),
    st.binary(min_size=1, max_size=40).map(lambda b: b.replace(b"/", b"_").replace(b"\0", b"_")),
)


def _write_tree(root: Path, files) -> dict[bytes, str]:
    """Write files under root/<class>/...; returns {relative path bytes: kind}."""
    written = {}
    for cls_no, nest, stem, ext, (kind, content) in files:
        folder = os.fsencode(root) + b"/c%d" % cls_no + b"".join(b"/d%d" % i for i in range(nest))
        os.makedirs(folder, exist_ok=True)
        name = (stem + ext.encode())[-255:]
        path = folder + b"/" + name
        if name in (b".", b"..") or os.path.isdir(path):
            continue
        with open(path, "wb") as f:
            f.write(content)
        written[os.path.relpath(path, os.fsencode(root))] = kind
    return written


@FUZZ
@given(files=st.lists(st.tuples(st.integers(0, 1), st.integers(0, 3), name_stems,
                                st.sampled_from(EXTS), _contents()), min_size=1, max_size=6),
       on_error=st.sampled_from(["raise", "skip"]), mode=st.sampled_from(["raw", "resize"]))
def test_fuzz_pack_folder(scratch, files, on_error, mode):
    _count("image folders")
    case = scratch / uuid.uuid4().hex[:12]
    src, dest = case / "src", case / "out"
    written = _write_tree(src, files)
    try:
        with time_limit(60):
            m = shardkit.pack_folder(src, dest, mode=mode, size=8 if mode == "resize" else None,
                                     workers=1, progress=False,
                                     on_error=on_error, max_samples=2, max_pixels=10**6)
    except SourceError as exc:  # the bad file (or the empty source) is named
        assert not (dest / MANIFEST_PATH).exists()
        assert str(src) in str(exc) or any(os.fsdecode(p) in str(exc) for p in written)
        if on_error == "skip":
            assert "no images found" in str(exc) or "empty class" in str(exc)
        assert not list(dest.glob("shard-*")) or (dest / ".shardkit-pack.json").exists()
    else:
        assert (dest / MANIFEST_PATH).exists()
        names = {os.fsencode(s["path"]) for s in m.skipped}
        assert m.num_samples + len([s for s in m.skipped]) >= len(written)
        if on_error == "raise":
            assert not m.skipped and m.num_samples == len(written)
        report = verify(dest)
        assert report.ok, report.problems
        assert Manifest.load(dest).skipped == m.skipped
        assert all(p in written for p in names if not p.endswith(b"c0") and not p.endswith(b"c1"))
    shutil.rmtree(case)


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_odd_names_deep_trees_and_bad_bytes_pack_or_fail_cleanly(tmp_path, on_error):
    from conftest import jpeg_bytes, photo

    src = tmp_path / "src"
    good_names = [b"CON.jpg", b"-rf.jpg", b"..jpg", b"a\nb.jpg", b"\xff\xfe.jpg", b"x" * 251 + b".jpg",
                  b"$(touch pwned).jpg", "é🙂.jpg".encode()]
    deep = os.fsencode(src) + b"/cls" + b"".join(b"/%02d" % i for i in range(100))
    os.makedirs(deep)
    for i, name in enumerate(good_names):
        with open(os.fsencode(src) + b"/cls/" + name, "wb") as f:
            f.write(jpeg_bytes(photo(16, 12, i)))
    with open(deep + b"/deep.jpg", "wb") as f:
        f.write(jpeg_bytes(photo(16, 12, 99)))
    with open(os.fsencode(src) + b"/cls/\xffbad.jpg", "wb") as f:
        f.write(b"not an image at all")
    dest = tmp_path / "out"
    kw = dict(workers=1, progress=False, max_samples=3, on_error=on_error)
    if on_error == "raise":
        with pytest.raises(SourceError, match="bad.jpg"):
            shardkit.pack_folder(src, dest, **kw)
        assert not (dest / MANIFEST_PATH).exists()
        return
    m = shardkit.pack_folder(src, dest, **kw)
    assert m.num_samples == len(good_names) + 1
    assert [s["path"] for s in m.skipped] == [os.fsdecode(b"cls/\xffbad.jpg")]
    assert verify(dest).ok
    again = Manifest.load(dest)  # the manifest is valid UTF-8 JSON and round-trips the names
    assert again.skipped == m.skipped
    metas = [json.loads(s["json"]) for s in _read_json_members(dest)]
    assert {os.fsencode(meta["path"]) for meta in metas} >= {b"cls/" + n for n in good_names}
    assert not any(tmp_path.rglob("pwned")) and not Path("pwned").exists()


def _read_json_members(dest: Path):
    from _helpers_read import iter_samples

    return [fields for _, fields in iter_samples(dest)]


# --------------------------------------------------------------------------- README "Security"


class _Forbidden(BaseException):
    pass


def _forbid(name):
    def refuse(*args, **kwargs):
        raise _Forbidden(f"{name} was called")
    return refuse


def _evil_dataset(good: Path, scratch: Path, members) -> Path:
    from _helpers_read import members_of, shard_samples, write_shard

    dest = _copy(good, scratch)
    m = Manifest.load(dest)
    samples = [members_of(s) for s in shard_samples(dest / m.shards[0].url)]
    key = samples[1][0][0].split(".", 1)[0]
    samples[1] += [(name.replace("KEY", key), data) for name, data in members]
    write_shard(dest, 0, samples)
    return dest


def test_reading_never_runs_a_shell_unpickles_or_torch_loads(good, scratch, monkeypatch, tmp_path):
    import pickle
    import pty
    import subprocess

    import numpy as np
    import torch

    marker = tmp_path / "marker"
    payload = pickle.dumps(_Marker(str(marker)))
    buf = __import__("io").BytesIO()
    np.save(buf, np.array([_Marker(str(marker))], dtype=object), allow_pickle=True)
    dest = _evil_dataset(good, scratch, [("KEY.pickle", payload), ("KEY.pth", payload),
                                         ("KEY.pyd", payload), ("KEY.pt", payload),
                                         ("KEY.npy", buf.getvalue())])
    for module, names in ((subprocess, ["Popen", "run", "call", "check_output"]),
                          (os, ["system", "popen", "posix_spawn", "posix_spawnp", "execv", "execve",
                                "execvp", "fork"]),
                          (pty, ["spawn"]), (pickle, ["loads", "load", "Unpickler"]),
                          (torch, ["load"]), (np, ["load"])):
        for name in names:
            monkeypatch.setattr(module, name, _forbid(f"{module.__name__}.{name}"))
    for decode in ("uint8", "pil", "raw"):
        result = consume(dest, decode=decode)
        assert isinstance(result, list) and len(result) == 6, result
    assert not marker.exists()


class _Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_packing_runs_no_shell(tmp_path, monkeypatch):
    import subprocess

    from conftest import jpeg_bytes, photo

    src = tmp_path / "src" / "c"
    src.mkdir(parents=True)
    for name in ["$(touch pwned).jpg", "`touch pwned`.jpg", "a;touch pwned.jpg", "-rf.jpg"]:
        (src / name).write_bytes(jpeg_bytes(photo(16, 12, len(name))))
    monkeypatch.chdir(tmp_path)
    for name in ["Popen", "run", "call", "check_output"]:
        monkeypatch.setattr(subprocess, name, _forbid(f"subprocess.{name}"))
    for name in ["system", "popen"]:
        monkeypatch.setattr(os, name, _forbid(f"os.{name}"))
    for workers in (1, 2):  # 2: raw mode's thread pool
        m = shardkit.pack_folder(tmp_path / "src", tmp_path / f"out{workers}", workers=workers,
                                 progress=False)
        assert m.num_samples == 4
    assert not list(tmp_path.rglob("pwned"))


def test_pack_loads_pt_files_only_with_weights_only(tmp_path, monkeypatch):
    import torch

    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        torch.save(torch.zeros(3, 4, 4, dtype=torch.uint8) + i, src / f"t{i}.pt")
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    shardkit.pack_folder(src, tmp_path / "out", workers=1, progress=False)
    assert calls == [True, True]


@pytest.mark.parametrize("decode", ["uint8", "raw"])
def test_member_names_are_never_paths_to_write(good, scratch, tmp_path, monkeypatch, decode):
    target = tmp_path / "abs_target.jpg"
    names = ["../KEY.jpg", "../../escape.jpg", str(target), "/KEY.jpg", "sub/KEY.jpg",
             "KEY.jpg/../../x.jpg"]
    dest = _evil_dataset(good, scratch, [(n, b"payload") for n in names])
    monkeypatch.chdir(tmp_path)

    def snapshot():
        return {p for root in (tmp_path, scratch.parent, Path("/KEY.jpg").parent)
                for p in (root.rglob("*") if root != Path("/") else root.glob("*"))}

    opened = []
    real_open = os.open

    def spy_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            opened.append(os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    before = snapshot()
    monkeypatch.setattr(os, "open", spy_open)
    for on_error in ("raise", "skip"):
        result = consume(dest, on_error=on_error, decode=decode)
        if on_error == "raise":
            assert isinstance(result, ShardkitError) and "not a safe <key>.<field>" in str(result)
        else:
            assert isinstance(result, list) and len(result) == 6
    monkeypatch.setattr(os, "open", real_open)
    assert snapshot() == before
    assert not target.exists()
    assert not [p for p in opened if "escape" in p or "KEY" in p or p == str(target)], opened


def test_pixel_limit_is_checked_from_the_header_when_reading(good, monkeypatch):
    from PIL import Image, ImageFile

    from shardkit.errors import DecodeError

    def no_load(self, *a, **k):
        raise AssertionError("pixels decoded before the limit was checked")

    monkeypatch.setattr(Image.Image, "load", no_load)
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    ds = StreamingDataset(good, max_pixels=100, with_keys=True, shuffle=False)  # images are 16x12
    with pytest.raises(DecodeError, match="over the limit of 100") as info:
        next(iter(ds))
    assert str(good) in str(info.value) and info.value.key
