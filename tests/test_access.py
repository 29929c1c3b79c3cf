"""MapDataset: one sample by index or key, the same item the streaming path gives for it."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

import shardkit
from shardkit import MapDataset, StreamingDataset
from shardkit.errors import DecodeError, ManifestError

from _helpers_read import all_keys, image_folder, iter_samples, pack, same_items, write_shard
from conftest import jpeg_bytes, photo

wds = pytest.importorskip("webdataset")


@pytest.fixture(scope="module")
def packs(tmp_path_factory) -> dict[str, Path]:
    """One small class folder packed raw (5 shards), resized, and as tensors."""
    src = image_folder(tmp_path_factory.mktemp("src"), classes=3, per_class=9, size=(40, 30))
    out = {}
    for mode, kw in {"raw": {}, "resize": {"size": 24}, "tensor": {"size": 16}}.items():
        dest = tmp_path_factory.mktemp(mode) / "ds"
        pack(src, dest, mode=mode, max_samples=6, **kw)
        out[mode] = dest
    return out


def _stream(source, **kw) -> dict[str, tuple]:
    ds = StreamingDataset(source, with_keys=True, seed=5, **kw)
    return {item[-1]: item for item in ds}


@pytest.mark.parametrize("mode", ["raw", "resize", "tensor"])
def test_every_index_gives_the_streaming_item_of_its_sample(packs, mode):
    kw = dict(decode="uint8", fields=("json",))
    m = MapDataset(packs[mode], with_keys=True, **kw)
    want = _stream(packs[mode], **kw)
    assert len(m) == len(want) == 27
    got = [m[i] for i in range(len(m))]
    assert [g[-1] for g in got] == all_keys(packs[mode])  # manifest order
    for item in got:
        assert same_items(item, want[item[-1]])
    assert same_items(m[-1], got[-1]) and same_items(m[-27], got[0])


def test_raw_bytes_labels_and_fields_are_the_stored_ones(packs):
    m = MapDataset(packs["raw"], decode="raw", with_keys=True, fields=("json", "cls"))
    stored = list(iter_samples(packs["raw"]))
    for i, (key, fields) in enumerate(stored):
        image, label, meta, cls, got_key = m[i]
        assert got_key == key and bytes(image) == fields["jpg"]
        assert label == int(fields["cls"]) and cls == fields["cls"].decode()
        assert meta == fields["json"].decode()
        assert m.sample(i)["jpg"] == fields["jpg"]
        assert m.where(i)["key"] == key and m.key(i) == key
    where = m.where(7)
    assert where["shard"] == 1 and where["sample"] == 1 and where["url"].endswith(".tar")


def test_a_random_crop_is_the_streaming_one_for_the_same_seed_and_epoch(packs):
    crop = shardkit.RandomResizedCrop(12, scale=(0.2, 1.0))
    m = MapDataset(packs["resize"], crop=crop, with_keys=True, seed=5)
    m.set_epoch(3)
    ds = StreamingDataset(packs["resize"], crop=crop, with_keys=True, seed=5)
    ds.set_epoch(3)
    want = {item[-1]: item for item in ds}
    for i in range(len(m)):
        item = m[i]
        assert same_items(item, want[item[-1]])
    m.set_epoch(4)
    assert sum(not torch.equal(m[i][0], want[m[i][-1]][0]) for i in range(len(m))) > len(m) // 2


def test_a_dataloader_with_workers_and_a_distributed_sampler_reads_each_sample_once(packs):
    m = MapDataset(packs["raw"], decode="raw", with_keys=True)
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(m, num_replicas=2, rank=rank, shuffle=True, seed=1,
                                     drop_last=True)
        loader = DataLoader(m, sampler=sampler, num_workers=2, batch_size=None, timeout=60)
        seen += [item[-1] for item in loader]
    assert len(seen) == 26 and len(set(seen)) == 26  # 27 samples, drop_last over 2 ranks
    assert set(seen) <= set(all_keys(packs["raw"]))


def test_index_of_finds_every_key_and_keeps_a_small_table(packs, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(packs["raw"], ds)
    m = MapDataset(ds)
    keys = all_keys(ds)
    assert [m.index_of(k) for k in keys] == list(range(len(keys)))
    tables = list((ds / ".shardkit").glob("keys-*.bin"))
    assert len(tables) == 1 and tables[0].stat().st_size == 48 + 16 * len(keys)
    with pytest.raises(KeyError, match="'no-such-key'"):
        m.index_of("no-such-key")
    with pytest.raises(KeyError, match=keys[0][:-1]):
        m.index_of(keys[0][:-1])  # a prefix of a key is not a key
    # a new MapDataset (another process) uses the kept table: no shard is read for it
    again = MapDataset(ds)
    again._shard_keys = None  # type: ignore[assignment]  # would fail if called
    assert again.index_of(keys[-1]) == len(keys) - 1


def test_a_repacked_dataset_never_meets_an_old_key_table(packs, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(packs["raw"], ds)
    keys = all_keys(ds)
    assert MapDataset(ds).index_of(keys[3]) == 3
    # shard 0 rewritten with its samples in another order (and one fewer)
    samples = [s for s in iter_samples(ds)][:6]
    members = [[(f"{k}.{f}", v) for f, v in sorted(fields.items())] for k, fields in samples]
    write_shard(ds, 0, members[::-1][:5])
    m = MapDataset(ds)
    assert m.index_of(samples[5][0]) == 0 and m.index_of(samples[1][0]) == 4
    with pytest.raises(KeyError):
        m.index_of(samples[0][0])
    assert len(list((ds / ".shardkit").glob("keys-*.bin"))) == 2


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_a_read_only_dataset_keeps_its_key_table_in_memory(packs, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(packs["raw"], ds)
    (ds / ".shardkit").chmod(0o555)
    try:
        m = MapDataset(ds)
        assert m.index_of(all_keys(ds)[5]) == 5
        assert not list((ds / ".shardkit").glob("keys-*"))
    finally:
        (ds / ".shardkit").chmod(0o755)


def test_a_key_table_in_a_folder_it_cannot_write_stays_in_memory(packs, tmp_path, monkeypatch):
    ds = tmp_path / "ds"
    shutil.copytree(packs["raw"], ds)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if mode == os.W_OK else real(p, mode))
    m = MapDataset(ds)
    assert m.index_of(all_keys(ds)[5]) == 5
    assert not list((ds / ".shardkit").glob("keys-*"))


def test_indexed_webdataset_shards_with_long_names_and_folders(tmp_path):
    """``tar cf`` of a tree (folder members, './' names) and keys over 100 bytes (GNU long
    names): keys come from the samples where a header does not hold them."""
    root = tmp_path / "tree"
    want = {}
    deep = "d" * 60 + "/" + "e" * 50
    for c in range(2):
        for i in range(4):
            key = f"train/c{c}/{deep if i % 2 else 'x'}/img_{i:03d}"
            image = jpeg_bytes(photo(16, 16, seed=10 * c + i))
            (root / key).parent.mkdir(parents=True, exist_ok=True)
            (root / f"{key}.jpg").write_bytes(image)
            (root / f"{key}.cls").write_text(str(c))
            want[key] = (image, c)
    (tmp_path / "shards").mkdir()
    subprocess.run(["tar", "--sort=name", "--format=gnu", "-cf",
                    str(tmp_path / "shards" / "part-0.tar"), "./train"], cwd=root, check=True)
    shardkit.index_shards(tmp_path / "shards", progress=False)
    m = MapDataset(tmp_path / "shards", decode="raw", with_keys=True)
    assert len(m) == 8
    got = {m[i][-1]: (bytes(m[i][0]), m[i][1]) for i in range(8)}
    assert got == want
    for key in want:
        assert m[m.index_of(key)][-1] == key


def test_remote_shards_by_range_request_or_through_the_cache(packs, tmp_path):
    remote = pytest.importorskip("_helpers_remote")
    from servers import MotoS3

    local = MapDataset(packs["raw"], decode="raw", with_keys=True)
    with MotoS3() as s3:
        s3.make_bucket(remote.BUCKET)
        url = remote.upload(s3, remote.Data(packs["raw"], packs["raw"], {}), "ds")
        for cache in (None, tmp_path / "cache"):
            m = MapDataset(url, decode="raw", with_keys=True, cache_dir=cache,
                           storage_options=s3.storage_options())
            order = np.random.default_rng(0).permutation(len(m))
            for i in order[:10]:
                a, b = m[int(i)], local[int(i)]
                assert a[-1] == b[-1] and bytes(a[0]) == bytes(b[0]) and a[1] == b[1]
            key = local[20][-1]
            assert m.index_of(key) == 20
        assert list((tmp_path / "cache" / "keys").glob("keys-*.bin"))  # kept in the cache


def test_wrong_indices_and_arguments_say_what_is_wrong(packs, tmp_path):
    m = MapDataset(packs["raw"])
    with pytest.raises(IndexError, match="27 samples"):
        m[27]
    with pytest.raises(IndexError):
        m[-28]
    with pytest.raises(TypeError, match="int"):
        m["3"]  # type: ignore[index]
    with pytest.raises(ValueError, match=r"holds caption; its samples hold cls, json, an image "
                                         r"\(bmp/gif/jpg/png/tiff/webp\)"):
        MapDataset(packs["raw"], fields=("caption",))
    with pytest.raises(ManifestError, match="no such file or directory"):
        MapDataset(tmp_path / "pakced")
    with pytest.raises(TypeError, match="ConcatDataset"):
        MapDataset([shardkit.Source(packs["raw"])])
    with pytest.raises(ValueError, match="gpu"):
        MapDataset(packs["raw"], decode="gpu")


def test_a_corrupt_image_is_an_error_naming_shard_and_key(packs, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(packs["raw"], ds)
    samples = list(iter_samples(ds))[:6]
    members = [[(f"{k}.{f}", v) for f, v in sorted(fields.items())] for k, fields in samples]
    members[2] = [(n, b"\xff\xd8 not a jpeg" if n.endswith(".jpg") else v) for n, v in members[2]]
    write_shard(ds, 0, members)
    m = MapDataset(ds)
    with pytest.raises(DecodeError, match=rf"shard-000000\.tar.*{samples[2][0]}"):
        m[2]
    assert m[3][0].shape[0] == 3  # the others read as before


def test_fields_no_sample_holds_are_refused_by_the_streaming_dataset_too(packs, tmp_path):
    from test_indexer import write_wds

    with pytest.raises(ValueError, match="holds caption"):
        len(StreamingDataset(packs["tensor"], fields=("caption",)))
    folder = tmp_path / "wds"
    write_wds(folder, n=12, per_shard=6)
    shardkit.index_shards(folder, progress=False)
    with pytest.raises(ValueError, match=r"holds caption; its samples hold cls, jpg, json, "
                                         r"seg\.png, txt"):
        len(StreamingDataset(folder, fields=("caption",)))
    assert Counter(type(it[2]) for it in StreamingDataset(folder, fields=("txt",))) == {str: 12}


def test_a_typo_in_a_path_fails_where_the_dataset_is_made(tmp_path):
    images = image_folder(tmp_path / "images", classes=2, per_class=2)
    with pytest.raises(ManifestError, match=r"pakced: no such file or directory"):
        StreamingDataset(tmp_path / "pakced")
    with pytest.raises(ManifestError, match="is a folder of images: pack it first"):
        StreamingDataset(images)


def test_threads_sharing_one_map_dataset_get_the_right_samples(packs, monkeypatch):
    """Reads from many threads while the LRU of open shards evicts all the time: no read of a
    closed or reused descriptor (another shard's bytes), no descriptor left open."""
    import threading

    from shardkit import access

    monkeypatch.setattr(access, "OPEN_SHARDS", 2)  # 5 shards: eviction at nearly every read
    m = MapDataset(packs["raw"], decode="raw", with_keys=True)
    want = [m[i] for i in range(len(m))]
    fds_before = len(os.listdir("/proc/self/fd"))
    errors, wrong = [], []

    def work(seed):
        rng = np.random.default_rng(seed)
        try:
            for i in rng.integers(0, len(m), 400):
                got = m[int(i)]
                if got[-1] != want[i][-1] or bytes(got[0]) != bytes(want[i][0]):
                    wrong.append(int(i))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and not wrong
    m.close()
    assert len(os.listdir("/proc/self/fd")) <= fds_before


def test_a_damaged_key_table_is_built_again_and_never_pickled(packs, tmp_path):
    import pickle

    ds = tmp_path / "ds"
    shutil.copytree(packs["raw"], ds)
    keys = all_keys(ds)
    m = MapDataset(ds)
    small = len(pickle.dumps(m))
    assert m.index_of(keys[4]) == 4
    assert len(pickle.dumps(m)) < small + 100  # the table stays out of a worker's pickle
    table = next((ds / ".shardkit").glob("keys-*.bin"))
    data = bytearray(table.read_bytes())
    data[-8:] = (2**62).to_bytes(8, "little")  # a position past the end
    table.write_bytes(bytes(data))
    assert MapDataset(ds).index_of(keys[7]) == 7
    assert MapDataset(ds).index_of(keys[-1]) == len(keys) - 1


def test_indices_as_numpy_ints_and_tensors(packs):
    m = MapDataset(packs["raw"], decode="raw", with_keys=True)
    assert m[np.int64(3)][-1] == m[torch.tensor(3)][-1] == m[3][-1]
    with pytest.raises(TypeError, match="bool"):
        m[True]


def test_a_home_relative_path_reads_as_before(packs, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(packs["raw"], tmp_path / "ds")
    assert len(StreamingDataset("~/ds")) == len(MapDataset("~/ds")) == 27


def test_fields_are_refused_where_the_dataset_is_made_and_every_time(packs):
    for _ in range(2):
        with pytest.raises(ValueError, match="holds caption"):
            StreamingDataset(packs["raw"], fields=("caption",))


def test_a_damaged_header_never_gives_a_wrong_key(packs, tmp_path):
    """A key comes from a sample's first header only when its checksum holds; else the sample
    is read, which names the damage."""
    from shardkit.errors import ShardError

    ds = tmp_path / "ds"
    shutil.copytree(packs["raw"], ds)
    m = MapDataset(ds)
    shard, j = m.locate(2)
    at = int(m.reader.offsets(shard)[j])
    path = ds / m.manifest.shards[shard].url
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01  # the key's first letter: the header's checksum no longer holds
    path.write_bytes(bytes(data))
    m = MapDataset(ds)
    assert m.key(1) == all_keys(packs["raw"])[1]
    with pytest.raises(ShardError, match="shard-000000.tar"):
        m.key(2)
