"""Scale: the compact msgpack manifest, Manifest.shard_sizes, and the stateless block permutation
of the epoch plan (exactly once, equal work, at sizes the small grids of test_plan.py do not reach).
"""

from __future__ import annotations

import itertools
import json
import time

import msgpack
import numpy as np
import pytest

from shardkit import Manifest, ShardInfo, pack_folder
from shardkit.bench.scale import format_table, resume_state_sizes, run, synthetic_manifest
from shardkit.errors import ManifestError
from shardkit.layout import _BlockPermutation
from shardkit.manifest import write_manifest, write_msgpack_companion
from shardkit.plan import epoch_plan, rank_num_samples
from shardkit.shardformat import MANIFEST_PATH, MSGPACK_PATH


# --------------------------------------------------------------------------- msgpack manifest
@pytest.fixture(scope="module")
def small():
    return synthetic_manifest(50, 12_345, seed=1, classes=10)


@pytest.fixture(scope="module")
def packed(class_folder, tmp_path_factory):
    dest = tmp_path_factory.mktemp("ds")
    pack_folder(class_folder, dest, max_samples=5, progress=False, workers=1)
    return dest


def test_synthetic_manifest_is_valid():
    m = synthetic_manifest(1000, 10**6)
    assert len(m.shards) == 1000 and m.num_samples == 10**6
    assert sum(s.num_samples for s in m.shards) == 10**6
    assert Manifest.from_json(m.to_json()) == m
    assert synthetic_manifest(7, 3).num_samples == 3  # fewer samples than shards


def test_msgpack_round_trip_equals_json(small):
    data = small.to_msgpack()
    back = Manifest.from_msgpack(data)
    assert back == small == Manifest.from_json(small.to_json())
    assert back.to_json() == small.to_json()  # the same content, field for field
    cols = msgpack.unpackb(data)["shards"]
    assert set(cols["num_samples"]) == {"u64"} and set(cols["sha256"]) == {"hex32"}
    assert cols["url"] == {"pattern": {"prefix": "shard-", "start": 0, "width": 6,
                                       "suffix": ".tar"}}
    assert len(data) < len(small.to_json()) / 3


def test_msgpack_falls_back_to_plain_lists(small):
    shards = [ShardInfo(f"part/{chr(97 + i % 26)}{i}.tar", s.num_samples, s.num_bytes,
                        s.sha256.upper() if i == 3 else s.sha256, s.index_url, "x" * (i % 3))
              for i, s in enumerate(small.shards)]
    m = Manifest(classes=None, num_samples=small.num_samples, shards=shards, options={},
                 tensor={"dtype": "uint8"}, skipped=[{"path": "a", "reason": "b"}], ignored=2)
    cols = msgpack.unpackb(m.to_msgpack())["shards"]
    assert isinstance(cols["url"], list) and isinstance(cols["sha256"], list)
    assert isinstance(cols["index_sha256"], list) and "pattern" in cols["index_url"]
    assert Manifest.from_msgpack(m.to_msgpack()) == m
    empty = Manifest(classes=[], num_samples=0, shards=[], options={})
    assert Manifest.from_msgpack(empty.to_msgpack()) == empty


def test_packed_dataset_companion_and_load(packed):
    m = Manifest.load(packed)
    write_msgpack_companion(packed)
    via_msgpack = Manifest.load(packed / MSGPACK_PATH)
    assert via_msgpack == m and via_msgpack.base_url == str(packed)
    assert via_msgpack.store is not None
    assert Manifest.load(f"file://{packed}/{MSGPACK_PATH}") == m
    assert np.array_equal(via_msgpack.shard_sizes(), m.shard_sizes())


def test_load_prefers_json_and_falls_back_to_msgpack(small, tmp_path):
    write_manifest(small, tmp_path)
    other = synthetic_manifest(3, 30)
    (tmp_path / MSGPACK_PATH).write_bytes(other.to_msgpack())  # a stale companion
    assert Manifest.load(tmp_path) == small  # the canonical JSON wins
    assert Manifest.load(tmp_path / MSGPACK_PATH) == other  # unless named
    (tmp_path / MANIFEST_PATH).unlink()
    assert Manifest.load(tmp_path) == other  # a folder with only the compact one
    with pytest.raises(ManifestError, match="no manifest"):
        Manifest.load(tmp_path / MANIFEST_PATH)  # a named JSON does not fall back
    (tmp_path / MSGPACK_PATH).write_bytes(b"\xc1garbage")
    with pytest.raises(ManifestError, match="msgpack"):
        Manifest.load(tmp_path)


def _mutated(m: Manifest, change) -> bytes:
    obj = msgpack.unpackb(m.to_msgpack())
    change(obj)
    return msgpack.packb(obj, use_bin_type=True)


def _cols(obj):
    return obj["shards"]


@pytest.mark.parametrize("change,needle", [
    (lambda o: o.update(format="other"), "not a shardkit manifest"),
    (lambda o: o.update(format_version=3), "format_version"),
    (lambda o: o.update(num_samples=o["num_samples"] + 1), "add up"),
    (lambda o: o.pop("shards"), "malformed"),
    (lambda o: o.update(shards=[]), "malformed"),
    (lambda o: _cols(o).pop("sha256"), "malformed"),
    (lambda o: _cols(o).update(extra=[]), "malformed"),
    (lambda o: _cols(o).update(encoding="columns/9"), "malformed"),
    (lambda o: _cols(o).update(count=-1), "malformed"),
    (lambda o: _cols(o).update(count=49), "malformed"),
    (lambda o: _cols(o).update(count=True), "malformed"),
    (lambda o: _cols(o).update(num_bytes={"u64": b"\0" * 7}), "malformed"),
    (lambda o: _cols(o).update(sha256={"hex32": "ab" * 32}), "malformed"),
    (lambda o: _cols(o).update(sha256={"rot13": b""}), "unknown column kind"),
    (lambda o: _cols(o).update(sha256={"hex32": b"", "u64": b""}), "malformed"),
    (lambda o: _cols(o).update(url=["a.tar"] * 3), "malformed"),
    (lambda o: _cols(o).update(url=7), "malformed"),
    (lambda o: _cols(o)["url"]["pattern"].update(width="6"), "malformed"),
    (lambda o: _cols(o)["url"]["pattern"].update(width=10**6), "malformed"),
    (lambda o: _cols(o)["url"]["pattern"].pop("suffix"), "malformed"),
    (lambda o: _cols(o)["url"]["pattern"].update(prefix="../"), "relative"),
    (lambda o: _cols(o)["url"]["pattern"].update(prefix="/abs-"), "relative"),
    (lambda o: _cols(o)["url"]["pattern"].update(prefix="s3://b/"), "relative"),
    (lambda o: _cols(o).update(index_url=["x\\y"] * 50), "relative"),
    (lambda o: _cols(o).update(index_url=[""] * 50), "relative"),
    (lambda o: _cols(o).update(num_bytes=[-1] * 50), "non-negative"),
    (lambda o: _cols(o).update(num_samples=[1.5] * 50), "non-negative"),
    (lambda o: o.update(unknown_field=1), "malformed"),
])
def test_bad_msgpack_is_refused(small, change, needle):
    with pytest.raises(ManifestError, match=needle):
        Manifest.from_msgpack(_mutated(small, change))


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x93\x01\x02", msgpack.packb([1, 2]),
                                  msgpack.packb({"format": "shardkit"}) + b"\x00",
                                  msgpack.packb({b"format": b"shardkit"}, use_bin_type=True),
                                  b"\xdd\xff\xff\xff\xff", b"\x91" * 100_000])
def test_garbage_msgpack_is_refused(data):
    with pytest.raises(ManifestError):
        Manifest.from_msgpack(data, "m.msgpack")


def test_json_check_still_names_bad_urls(small):
    data = json.loads(small.to_json())
    data["shards"][7]["url"] = "ok/../../etc"
    with pytest.raises(ManifestError, match="etc"):
        Manifest.from_json(json.dumps(data))
    data["shards"][7]["url"] = "a..b/c...tar"  # dots are fine when not a '..' segment
    assert Manifest.from_json(json.dumps(data)).shards[7].url == "a..b/c...tar"


def test_shard_sizes_is_cached_and_follows_the_list(small):
    m = Manifest.from_json(small.to_json())
    sizes = m.shard_sizes()
    assert sizes.dtype == np.int64 and not sizes.flags.writeable
    assert sizes.tolist() == [s.num_samples for s in m.shards]
    assert m.shard_sizes() is sizes
    m.shards.append(ShardInfo("x.tar", 5, 1024, "0" * 64, "x.idx", "0" * 64))
    assert m.shard_sizes()[-1] == 5
    m.shards = m.shards[:2]
    assert m.shard_sizes().tolist() == [s.num_samples for s in m.shards]
    assert Manifest.from_msgpack(small.to_msgpack()).shard_sizes().tolist() == sizes.tolist()


# --------------------------------------------------------------------------- the plan at scale
def test_block_permutation_is_a_seeded_bijection():
    for n in itertools.chain(range(1, 300), [1023, 1024, 1025, 4097, 65536, 100_003]):
        p = _BlockPermutation(n, 7, 2)
        blocks = p.block(np.arange(n))
        assert np.array_equal(np.sort(blocks), np.arange(n))
        assert np.array_equal(p.position(blocks), np.arange(n))
    n = 10_000
    base = _BlockPermutation(n, 0, 0).block(np.arange(n))
    assert np.array_equal(_BlockPermutation(n, 0, 0).block(np.arange(n)), base)
    for other in (_BlockPermutation(n, 0, 1), _BlockPermutation(n, 1, 0)):
        assert (other.block(np.arange(n)) == base).mean() < 0.01
    assert abs(np.corrcoef(np.arange(n), base)[0, 1]) < 0.05  # no trace of the natural order


def _stream(sizes, block_size, seed, epoch):
    """The global stream materialised the slow way: (shard, index) of every sample, in order."""
    first = np.concatenate(([0], np.cumsum(-(-np.asarray(sizes) // block_size))))
    perm = _BlockPermutation(int(first[-1]), seed, epoch)
    out = []
    for b in perm.block(np.arange(first[-1])).tolist():
        shard = int(np.searchsorted(first, b, "right")) - 1
        lo = (b - first[shard]) * block_size
        out += [(shard, i) for i in range(lo, min(lo + block_size, sizes[shard]))]
    return out


@pytest.mark.parametrize("block_size", [1, 5, 64])
def test_plan_follows_the_permuted_stream(block_size):
    rng = np.random.default_rng(block_size)
    sizes = rng.integers(0, 90, 60).tolist()
    stream = _stream(sizes, block_size, 3, 1)
    for ws, nw in [(1, 1), (3, 2), (7, 3)]:
        got = []
        for r, w in itertools.product(range(ws), range(nw)):
            p = epoch_plan(sizes, seed=3, epoch=1, rank=r, world_size=ws, worker=w,
                           num_workers=nw, block_size=block_size)
            got += [(s.shard, i) for s in p.spans for i in range(s.start, s.stop)]
        assert got == stream[:len(got)] and len(got) == ws * (len(stream) // ws)


@pytest.mark.parametrize("remainder", ["drop", "pad"])
@pytest.mark.parametrize("batch_size", [None, 32])
def test_exactly_once_on_a_medium_grid(remainder, batch_size):
    rng = np.random.default_rng(0)
    sizes = rng.integers(0, 700, 2_000)
    sizes[rng.integers(0, 2_000, 50)] = 0
    total = int(sizes.sum())
    offsets = np.concatenate(([0], np.cumsum(sizes)))
    for ws, nw, block_size in [(16, 4, 64), (5, 3, 7), (1, 2, 1000)]:
        kw = dict(remainder=remainder, batch_size=batch_size)
        per_rank = rank_num_samples(sizes, ws, **kw)
        counts = np.zeros(total, dtype=np.int64)
        for r in range(ws):
            work, samples = [], 0
            for w in range(nw):
                p = epoch_plan(sizes, seed=11, epoch=4, rank=r, world_size=ws, worker=w,
                               num_workers=nw, block_size=block_size, shuffle_buffer=64, **kw)
                for s in p.spans:
                    assert 0 <= s.start < s.stop <= sizes[s.shard]
                    counts[offsets[s.shard] + s.start:offsets[s.shard] + s.stop] += 1
                work.append(len(p.batch_sizes) if batch_size else p.num_samples)
                samples += p.num_samples
            assert samples == per_rank
            assert max(work) - min(work) <= 1
        if remainder == "drop":
            assert counts.max() <= 1 and counts.sum() == per_rank * ws
        else:
            assert counts.min() >= 1 and counts.sum() == per_rank * ws


def test_medium_manifest_plans_fast():
    m = synthetic_manifest(10_000, 10**7)
    sizes = m.shard_sizes()
    t = time.perf_counter()
    p = epoch_plan(sizes, seed=0, epoch=0, rank=1023, world_size=1024, worker=7, num_workers=8)
    assert time.perf_counter() - t < 1.0
    per_rank = rank_num_samples(sizes, 1024)
    assert p.num_samples == per_rank // 8 and len(p.spans) >= p.num_samples // 64


def test_full_scale_plan_in_process():
    """100,000 shards / 1e9 samples / 1024 x 8: well under a second and a few MB per worker."""
    m = synthetic_manifest()
    sizes = m.shard_sizes()
    per_rank = rank_num_samples(sizes, 1024)
    t = time.perf_counter()
    plans = [epoch_plan(sizes, seed=0, epoch=1, rank=1023, world_size=1024, worker=w,
                        num_workers=8) for w in range(8)]
    assert time.perf_counter() - t < 8 * 1.0
    assert sum(p.num_samples for p in plans) == per_rank
    for p in plans:
        assert all(0 <= s.start < s.stop <= sizes[s.shard] for s in p.spans)
        assert len(p.spans) > p.num_samples // 64 // 2  # made of many blocks, not a few shards


def test_resume_state_is_small():
    sizes = resume_state_sizes()
    assert sizes["worker"] < 4096 and sizes["rank"] < 4096
    from shardkit.dataset import StreamingDataset

    ds = StreamingDataset(synthetic_manifest(100, 10**5), rank=1023, world_size=1024)
    ds.set_epoch(12345)
    assert len(json.dumps(ds.state_dict())) < 4096


@pytest.mark.slow
def test_scale_benchmark_runs(tmp_path):
    result = run(tmp_path, num_shards=500, num_samples=10**6, world_size=16, num_workers=2,
                 repeat=1, formats=("msgpack",), log=lambda msg: None)
    assert result["ok"], format_table(result)
    assert {c["case"] for c in result["cases"]} >= {"load msgpack + plan 1 worker"}
    assert all(c["hwm_reset"] for c in result["cases"])
    assert "resume state" in format_table(result)
