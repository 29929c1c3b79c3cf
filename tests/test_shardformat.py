"""The shard format on its own: member headers, names, both sample parsers, the index file.

The fast parser (``parse_sample``) and the strict one (``strict_samples``, tarfile) must accept
and refuse exactly the same bytes: every test here runs both on the same sample bytes."""

from __future__ import annotations

import io
import re
import tarfile

import numpy as np
import pytest

from shardkit.errors import ManifestError, ShardError
from shardkit.reader import Replay, read_upto
from shardkit.shardformat import (
    END_OF_ARCHIVE,
    INDEX_MAGIC,
    MTIME,
    decode_index,
    encode_index,
    index_extent,
    index_name,
    iter_keys,
    member,
    parse_sample,
    split_member,
    strict_samples,
    tar_header,
)

from _helpers_read import image_folder, pack


def _header(name: str, size: int, fix=None, fmt=tarfile.USTAR_FORMAT) -> bytearray:
    info = tarfile.TarInfo(name)
    info.size = size
    h = bytearray(info.tobuf(fmt))
    if fix:
        fix(h)
    return h


def _strict(buf: bytes, url: str = "u") -> list[dict]:
    """Every sample of ``buf`` (one sample's bytes, then the end of an archive) by tarfile."""
    data = bytes(buf) + END_OF_ARCHIVE
    return list(strict_samples(io.BytesIO(data), url, [len(buf)], 0, 1, len(data)))


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    src = image_folder(tmp_path_factory.mktemp("src"), classes=3, per_class=7)
    dest = tmp_path_factory.mktemp("raw")
    return pack(src, dest, max_samples=5), dest


def _shard_samples(data: bytes, offsets: np.ndarray) -> list[bytes]:
    return [data[int(a):int(b)] for a, b in zip(offsets[:-1], offsets[1:])]


# --------------------------------------------------------------------------- writing


@pytest.mark.parametrize("name,size", [("k.jpg", 0), ("abc-1_x.cls", 1), ("k" * 90 + ".json", 511),
                                       ("k.npy", 512), ("k.jpg", 8**11 - 1)])
def test_tar_header_is_tarfiles_reproducible_header(name, size):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, MTIME, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    assert tar_header(name, size) == info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8")


def test_members_read_back_by_tarfile():
    data = member("key.cls", b"7") + member("key.jpg", b"x" * 600) + END_OF_ARCHIVE
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        got = [(i.name, tf.extractfile(i).read(), i.mtime, i.uid) for i in tf]
    assert got == [("key.cls", b"7", MTIME, 0), ("key.jpg", b"x" * 600, MTIME, 0)]
    assert len(data) == 512 + 512 + 512 + 1024 + 1024


def test_member_names_split_as_webdataset_splits_them_or_are_refused():
    assert split_member("n0001-ab12.JPG", "u") == ("n0001-ab12", "jpg")
    assert split_member("k.seg.png", "u") == ("k", "seg.png")
    assert split_member("n01/n01_0173.cls", "u") == ("n01/n01_0173", "cls")  # keys with '/'
    assert split_member("a.b/c.jpg", "u") == ("a.b/c", "jpg")  # the last component's first dot
    assert split_member("my photo.jpeg", "u") == ("my photo", "jpeg")
    for of_no_sample in ("n01/", "README", ".DS_Store", "dir/.hidden.jpg", "k."):
        assert split_member(of_no_sample, "u") is None, of_no_sample
    for bad in ("../k.jpg", "/etc/k.jpg", "a//k.jpg", "a/./k.jpg", "a\\b.jpg", "k\x01.jpg",
                "k.jp g"):
        with pytest.raises(ShardError, match="member name") as info:
            split_member(bad, "shard-000000.tar")
        assert "shard-000000.tar" in str(info.value)


# --------------------------------------------------------------------------- the two parsers


def test_fast_and_strict_parsers_give_the_same_samples(packed):
    m, dest = packed
    seen = 0
    for shard in m.shards:
        data = (dest / shard.url).read_bytes()
        offsets = decode_index((dest / shard.index_url).read_bytes(), shard.num_samples,
                               shard.num_bytes, shard.index_url)
        ends = (offsets[1:] - offsets[0]).tolist()
        strict = list(strict_samples(io.BytesIO(data), shard.url, ends, 0, shard.num_samples,
                                     len(data)))
        fast = [parse_sample(bytearray(b), shard.url, False)
                for b in _shard_samples(data, offsets)]
        assert fast == strict and len(fast) == shard.num_samples
        seen += len(fast)
        assert {"jpg", "cls", "json"} <= set(fast[0])
    assert seen == m.num_samples == 21


def test_fast_parser_views_are_of_the_buffer():
    buf = bytearray(member("k.cls", b"3") + member("k.jpg", b"abc"))
    sample = parse_sample(buf, "u", True)
    assert isinstance(sample["jpg"], memoryview) and bytes(sample["jpg"]) == b"abc"
    assert sample["cls"] == b"3"  # labels and text are bytes
    buf[512 * 3] = ord("x")
    assert bytes(sample["jpg"]) == b"xbc"  # no copy


def test_gnu_format_headers_parse_the_same_on_both_paths():
    info = tarfile.TarInfo("k.cls")
    info.size = 1
    gnu = bytes(_header("k.cls", 1, fmt=tarfile.GNU_FORMAT)) + b"3".ljust(512, b"\0")
    assert bytes(gnu[257:265]) == b"ustar  \0"  # GNU magic, not POSIX
    assert parse_sample(bytearray(gnu), "u", False) == _strict(gnu)[0] == {
        "__key__": "k", "__url__": "u", "cls": b"3"}


def test_odd_members_are_left_to_the_strict_parser_which_names_them():
    good = bytes(_header("k.cls", 1)) + b"3".ljust(512, b"\0")
    assert parse_sample(bytearray(good), "u", False) == _strict(good)[0]

    def flip(h):
        h[0] = ord("j")  # name changed after the checksum was computed

    cases = {
        "path": bytes(_header("../k.cls", 1)) + b"3".ljust(512, b"\0"),
        "checksum": bytes(_header("k.cls", 1, flip)) + b"3".ljust(512, b"\0"),
        "two keys": good + bytes(_header("x.jpg", 1)) + b"3".ljust(512, b"\0"),
        "duplicate": good + good,
        "short": good[:-1],
    }
    expect = {"path": "is not a safe <key>.<field>", "checksum": "bad checksum", "two keys":
              "lies inside sample", "duplicate": "duplicate member", "short": "crosses"}
    for what, buf in cases.items():
        assert parse_sample(bytearray(buf), "u", False) is None, what
        with pytest.raises(ShardError, match=expect[what]):
            _strict(buf)


def test_strict_parser_names_truncation_and_extra_members():
    one = member("a.cls", b"1")
    two = member("b.cls", b"2")
    data = one + two + END_OF_ARCHIVE
    ends = [len(one), len(one) + len(two)]
    with pytest.raises(ShardError, match=r"ended early at sample 1 of 2 \(after 'a'\)"):
        list(strict_samples(io.BytesIO(one + END_OF_ARCHIVE), "s.tar", ends, 0, 2, len(data)))
    with pytest.raises(ShardError, match="more samples than its index"):
        list(strict_samples(io.BytesIO(data), "s.tar", ends[:1], 0, 1, len(data)))
    with pytest.raises(ShardError, match="crosses a sample boundary of its index"):
        list(strict_samples(io.BytesIO(data), "s.tar", [512, len(one) + len(two)], 0, 2, len(data)))


def test_iter_keys_lists_members_until_the_archive_ends():
    data = member("a.cls", b"1") + member("a.jpg", b"x") + member("b.cls", b"2") + END_OF_ARCHIVE
    assert list(iter_keys(io.BytesIO(data), "s.tar")) == [("a", "cls"), ("a", "jpg"), ("b", "cls")]
    bad = bytearray(data)
    bad[1024 + 148] ^= 0x7F  # the second header's checksum: tarfile takes it as the end
    assert list(iter_keys(io.BytesIO(bytes(bad)), "s.tar")) == [("a", "cls")]
    with pytest.raises(ShardError, match="s.tar: not a readable tar"):
        list(iter_keys(io.BytesIO(b"\x1f\x8b" + bytes(1022)), "s.tar"))  # gzip named .tar


def test_read_upto_handles_short_reads_and_replay_gives_read_bytes_again():
    class Dribble(io.RawIOBase):
        def __init__(self, data):
            self.data = data

        def readable(self):
            return True

        def readinto(self, b):
            n = min(3, len(b), len(self.data))
            b[:n], self.data = self.data[:n], self.data[n:]
            return n

    assert read_upto(Dribble(b"abcdefghij"), 10) == b"abcdefghij"
    assert read_upto(Dribble(b"abc"), 10) == b"abc"
    stream = Dribble(b"abcdefghij")
    head = read_upto(stream, 4)
    assert Replay([head[:1], b"", head[1:]], stream).read() == b"abcdefghij"


# --------------------------------------------------------------------------- index files


def test_index_round_trip_and_extent():
    offsets = [0, 1024, 3072, 5120]
    data = encode_index(offsets)
    assert data.startswith(INDEX_MAGIC) and len(data) == 8 + 8 * 4
    assert decode_index(data, 3, 5120 + 1024, "x.idx").tolist() == offsets
    assert index_extent(data, "x.idx") == (3, 5120 + 1024)
    assert index_name("a/shard-000001.tar") == "a/.shardkit/shard-000001.idx"
    assert index_name("a/shard-000001.tar", legacy=True) == "a/shard-000001.idx"


@pytest.mark.parametrize("offsets,num,size,match", [
    ([0, 1024, 2048], 3, 4096, "expected"),  # count differs from the manifest's
    ([0, 1024, 2048], 2, 2048, "inconsistent"),  # the end lies past the shard
    ([0, 100, 2048], 2, 4096, "inconsistent"),  # a sample smaller than two blocks
    ([5, 1024, 2048], 2, 4096, "inconsistent"),  # not starting at 0
])
def test_index_inconsistent_with_the_manifest_is_refused(offsets, num, size, match):
    with pytest.raises(ManifestError, match=match):
        decode_index(encode_index(offsets), num, size, "x.idx")


def test_not_an_index_file_is_refused_by_name():
    with pytest.raises(ShardError, match="x.idx: not a shardkit index file"):
        index_extent(b"1 2 3\n", "x.idx")  # e.g. DALI's text index
    with pytest.raises(ManifestError, match="malformed"):
        decode_index(b"SKIDX\x01\0\0" + b"\0" * 5, 0, 1024, "x.idx")


# --------------------------------------------------------------------------- walking a whole tar


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("as_buffer", [False, True])
def test_walk_members_agrees_with_tarfile(fmt, as_buffer):
    import hashlib

    from shardkit.shardformat import Walk, walk_members

    buf = io.BytesIO()
    long_dir = "d" * 120 if fmt != tarfile.USTAR_FORMAT else "d" * 90
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        folder = tarfile.TarInfo("train")
        folder.type = tarfile.DIRTYPE
        tf.addfile(folder)
        for i, name in enumerate(["train/a.jpg", "train/a.cls", f"{long_dir}/b_ü.seg.png",
                                  "README", "train/c.jpg"]):
            data = bytes([i]) * (700 * i + 1)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("train/d.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "a.jpg"
        tf.addfile(link)
    data = buf.getvalue() + bytes(3000)  # padding past the end blocks, as some writers leave
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        want = [(m.offset, m.name, m.size if m.isreg() else 0) for m in tf.getmembers()]
    walk = Walk()
    source = memoryview(data) if as_buffer else io.BytesIO(data)
    got = list(walk_members(source, "x.tar", lambda n: n.endswith(".cls"), walk, chunk=1000))
    assert [(m.start, m.name.rstrip("/"), m.size) for m in got] == want  # (tarfile drops a "/")
    assert [m.data for m in got if m.data is not None] == [bytes([1]) * 701]
    assert [m.folder for m in got] == [True] + [False] * 6
    assert [m.regular for m in got] == [False] + [True] * 5 + [False]
    assert walk.size == len(data) and walk.digest == hashlib.sha256(data).hexdigest()
    assert walk.end == len(buf.getvalue()) - 1024 or data[walk.end:walk.end + 1024] == bytes(1024)
    cut = data[:want[3][0] + 700]  # truncated inside a member
    with pytest.raises(ShardError, match="runs past the end|without the end-of-archive|cut"):
        list(walk_members(memoryview(cut) if as_buffer else io.BytesIO(cut), "x.tar",
                          lambda n: False, Walk()))


def test_walk_of_a_mapped_tar_reads_only_what_the_hash_has_read(monkeypatch):
    """Cold, the hash's sequential reads are the file's one read: the walk never touches a header
    the hash has not passed (on a disk that seeks, a walk running ahead reads out of order)."""
    import hashlib

    import shardkit.shardformat as sf

    members = b"".join(sf.member(f"s{i:04d}.jpg", bytes([i % 251]) * 3000) for i in range(300))
    data = members + sf.END_OF_ARCHIVE
    monkeypatch.setattr(sf, "HASH_PIECE", 4096)  # many pieces, so the walk could run ahead
    hashed = []  # bytes the hash had taken when the walk asked for a header
    real = sf._MappedBytes.need

    def need(self, n):
        ok = real(self, n)
        hashed.append((self.cur + n, self._hashed))
        return ok

    monkeypatch.setattr(sf._MappedBytes, "need", need)
    walk = sf.Walk()
    got = list(sf.walk_members(memoryview(data), "x.tar", lambda n: False, walk))
    assert len(got) == 300 and walk.digest == hashlib.sha256(data).hexdigest()
    assert len(hashed) >= 300 and all(end <= done for end, done in hashed)


def test_a_failing_hash_fails_the_walk_not_silently(monkeypatch):
    import shardkit.shardformat as sf

    class Broken:
        def update(self, data):
            raise OSError("Input/output error")

        def hexdigest(self):
            return "0" * 64

    monkeypatch.setattr("hashlib.sha256", lambda: Broken())
    data = sf.member("a.jpg", b"x" * 100) + sf.END_OF_ARCHIVE
    with pytest.raises(OSError, match="Input/output"):
        list(sf.walk_members(memoryview(data), "x.tar", lambda n: False, sf.Walk()))
    truncated = sf.member("a.jpg", b"x" * 100)  # a walk asking past the end does not hang
    monkeypatch.undo()
    with pytest.raises(ShardError, match="without the end-of-archive"):
        list(sf.walk_members(memoryview(truncated), "x.tar", lambda n: False, sf.Walk()))


@pytest.mark.parametrize("records, error", [
    (b"30 size=12x\n", "corrupt pax header at byte 0 (size)"),
    (b"xx mtime=1\n", "corrupt pax header at byte 0"),
    (b"0 path=a.jpg\n", "corrupt pax header at byte 0"),
])
def test_a_corrupt_pax_header_is_an_error_naming_the_shard(records, error):
    """Not a bare ValueError: the indexer's error names the shard and the byte."""
    import shardkit.shardformat as sf

    def block(name: str, size: int, flag: bytes) -> bytes:
        info = tarfile.TarInfo(name)
        info.size, info.type = size, flag
        return info.tobuf(tarfile.USTAR_FORMAT)

    pad = bytes(-len(records) % 512)
    data = (block("././@PaxHeader", len(records), tarfile.XHDTYPE) + records + pad
            + sf.member("a.jpg", b"x" * 12) + sf.END_OF_ARCHIVE)
    with pytest.raises(ShardError, match=re.escape(error)) as caught:
        list(sf.walk_members(memoryview(data), "x.tar", lambda n: False, sf.Walk()))
    assert "x.tar" in str(caught.value)


def test_pax_path_and_size_records_name_and_size_the_member():
    import shardkit.shardformat as sf

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("k" * 150 + ".jpg")  # too long for ustar: a pax path record
        info.size, info.mtime = 5, 1.5  # a float mtime: an mtime record too (as ShardWriter)
        tf.addfile(info, io.BytesIO(b"hello"))
    got = list(sf.walk_members(memoryview(buf.getvalue()), "x.tar", lambda n: True, sf.Walk()))
    assert [(m.name, m.size, m.data) for m in got] == [("k" * 150 + ".jpg", 5, b"hello")]
