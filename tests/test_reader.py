"""The shard reader (shardkit/reader.py): in-memory datasets, and bad shards and samples under
``on_error="raise"`` and ``"skip"``."""

from __future__ import annotations

import builtins
import gc
import io
import logging
import os
import pickle
import shutil
from pathlib import Path

import pytest

import shardkit
from shardkit import CenterCrop, StreamingDataset, make_loader
from shardkit.errors import DecodeError, ShardError
from shardkit.shardformat import END_OF_ARCHIVE, encode_index, index_name, member
from shardkit.storage import LocalStore

from _helpers_read import (  # noqa: F401 - fixtures, used by name
    all_keys,
    datasets,
    folder,
    image_folder,
    keys_of,
    members_of,
    offsets_of,
    pack,
    same_items,
    shard_samples,
    write_shard,
)

# --------------------------------------------------------------------------- 9: in memory


def _forbid_file_access(monkeypatch, folder: Path):
    """Any read of ``folder`` raises (also inside forked workers, where a raise reaches us)."""
    def refuse(*a, **k):
        raise AssertionError("in-memory dataset touched its files")

    real_open = builtins.open

    def guarded_open(file, *a, **k):
        if isinstance(file, (str, os.PathLike)) and str(folder) in os.fspath(file):
            refuse()
        return real_open(file, *a, **k)

    real_read_bytes = LocalStore.read_bytes

    def guarded_read_bytes(self, name):
        if not name.endswith(".json"):  # shards and index files; a new dataset reads its manifest
            refuse()
        return real_read_bytes(self, name)

    monkeypatch.setattr(LocalStore, "open_range", refuse)
    monkeypatch.setattr(LocalStore, "read_bytes", guarded_read_bytes)
    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_open)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_in_memory_opens_no_files_after_preload(datasets, monkeypatch, num_workers):
    src = datasets["nine"]
    kw = dict(crop=CenterCrop(12), with_keys=True, seed=1)
    on_disk = []
    for epoch in (0, 1):
        ds = StreamingDataset(src, **kw)
        ds.set_epoch(epoch)
        on_disk.append(list(make_loader(ds, num_workers=num_workers)))

    mem = StreamingDataset(src, in_memory=True, **kw)
    loader = make_loader(mem, num_workers=num_workers)  # preloads
    with monkeypatch.context() as m:
        _forbid_file_access(m, Path(src))
        with pytest.raises(Exception, match="touched its files"):  # the spy works
            list(StreamingDataset(src, **kw))
        got = []
        for epoch in (0, 1):
            mem.set_epoch(epoch)
            got.append(list(loader))
    assert same_items(got, on_disk)


def test_in_memory_over_the_limit_is_a_memory_error_before_loading(datasets, monkeypatch):
    src = datasets["nine"]
    calls = []
    real = LocalStore.read_bytes
    monkeypatch.setattr(LocalStore, "read_bytes",
                        lambda self, name: calls.append(name) or real(self, name))
    ds = StreamingDataset(src, in_memory=True, memory_limit=4096)
    with pytest.raises(MemoryError, match="memory_limit"):
        make_loader(ds, num_workers=0)
    with pytest.raises(MemoryError, match="memory_limit"):
        next(iter(ds))
    assert not [c for c in calls if c.endswith((".tar", ".idx"))]


# --------------------------------------------------------------------------- 10: bad shards

BAD_SHARD = 1  # the middle of 4 shards of 5 samples
BAD_SAMPLE = 2  # the middle sample of that shard


@pytest.fixture(scope="module")
def good_small(tmp_path_factory) -> Path:
    src = image_folder(tmp_path_factory.mktemp("small_src"), classes=4, per_class=5)
    dest = tmp_path_factory.mktemp("small") / "ds"
    pack(src, dest, mode="raw", max_samples=5)
    assert len(shardkit.Manifest.load(dest).shards) == 4
    return dest


@pytest.fixture
def bad(good_small, tmp_path):
    """A writable copy of the small dataset and facts about its bad shard."""
    dest = tmp_path / "ds"
    shutil.copytree(good_small, dest)
    m = shardkit.Manifest.load(dest)
    shard = dest / m.shards[BAD_SHARD].url
    samples = shard_samples(shard)

    class Bad:
        path = dest
        url = str(shard)
        keys = all_keys(dest)
        shard_samples = samples
        bad_key = samples[BAD_SAMPLE][0]
        offsets = offsets_of(dest, BAD_SHARD)
    return Bad


def _epoch_keys(src, world=1, num_workers=0, **kw):
    """Keys per rank of one epoch (and the datasets), with on_error as given."""
    per_rank, sets = [], []
    for rank in range(world):
        ds = StreamingDataset(src, decode="uint8", with_keys=True, rank=rank, world_size=world, **kw)
        n = len(ds)
        items = list(make_loader(ds, num_workers=num_workers))
        assert len(items) == n  # same count on every rank, bad samples or not
        per_rank.append(keys_of(items, batched=False))
        sets.append(ds)
    return per_rank, sets


def _check_raise(src, *, url, key=None, match=None, error=ShardError):
    for num_workers in (0, 2):
        # From a worker process torch re-raises what it cannot rebuild (ShardError takes url and
        # reason) as a RuntimeError carrying the original type name and message.
        with pytest.raises(error if num_workers == 0 else (error, RuntimeError)) as info:
            _epoch_keys(src, num_workers=num_workers, on_error="raise")
        text = str(info.value)
        del info
        gc.collect()  # shut the failed loader's workers down now, not at interpreter exit
        if num_workers:
            assert error.__name__ in text, text
        assert url in text, text
        if key is not None:
            assert key in text, text
        if match is not None:
            assert match in text, text


def _check_skip(src, all_keys_, missing: set, caplog, *, skipped=None):
    skipped = len(missing) if skipped is None else skipped
    with caplog.at_level(logging.WARNING, logger="shardkit"):
        (keys,), (ds,) = _epoch_keys(src, on_error="skip")
    assert ds.skipped == skipped
    assert f"{skipped} bad samples skipped" in caplog.text
    assert set(keys) == set(all_keys_) - missing  # every other key is there
    assert len(keys) == len(all_keys_)  # the epoch is not shorter: bad ones are replaced
    for world, workers in ((2, 0), (2, 2), (3, 2)):
        per_rank, _ = _epoch_keys(src, world, workers, on_error="skip")
        assert len({len(k) for k in per_rank}) == 1
        union = set().union(*map(set, per_rank))
        expected = set(all_keys_) - missing
        assert union <= expected
        assert len(expected - union) <= len(all_keys_) % world  # only the remainder dropped


# ------------------------------------------------------------------- faults of a whole shard


def _gzip(path: Path) -> None:
    import gzip

    path.write_bytes(gzip.compress(path.read_bytes()))


def _regrow(bad) -> None:
    """The shard rewritten with sample 2's image 700 bytes longer; the index stays as it was."""
    samples = [members_of(s) for s in bad.shard_samples]
    samples[BAD_SAMPLE] = [(n, d + b"\0" * 700 if n.endswith(".jpg") else d)
                           for n, d in samples[BAD_SAMPLE]]
    blob = b"".join(member(n, d) for sample in samples for n, d in sample) + END_OF_ARCHIVE
    Path(bad.url).write_bytes(blob)


def _index_of(bad) -> Path:
    return Path(bad.url).parent / index_name(Path(bad.url).name)


# fault -> (how, samples lost, words of the error in raise mode, names the index, shard-level)
SHARD_FAULTS = {
    "missing": (lambda b: Path(b.url).unlink(), range(5), "missing or empty", False, True),
    "empty": (lambda b: Path(b.url).write_bytes(b""), range(5), "missing or empty", False, True),
    "truncated mid-member": (
        lambda b: Path(b.url).write_bytes(Path(b.url).read_bytes()[:int(b.offsets[2]) + 1636]),
        range(2, 5), "truncated: the index expects", False, True),
    "truncated at a sample boundary": (
        lambda b: Path(b.url).write_bytes(Path(b.url).read_bytes()[:int(b.offsets[2])]),
        range(2, 5), "truncated: the index expects", False, True),
    "gzip named .tar": (lambda b: _gzip(Path(b.url)), range(5), "not a tar archive (gzip", False,
                        True),
    "index missing": (lambda b: _index_of(b).unlink(), range(5),
                      "cannot be read", True, True),
    "index not the manifest's": (
        lambda b: _index_of(b).write_bytes(
            encode_index([0, 1024, *(int(v) for v in b.offsets[2:])])),
        range(5), "is not the one the manifest lists", True, True),
    "index inconsistent with the bytes": (_regrow, range(2, 5), "sample boundary of its index",
                                          True, False),
}


@pytest.mark.parametrize("fault", list(SHARD_FAULTS))
def test_shard_faults_raise_naming_the_shard_once(bad, fault):
    how, lost, words, names_index, _ = SHARD_FAULTS[fault]
    how(bad)
    # (through workers for two of them: a failed loader's workers take 5 s each to shut down)
    for num_workers in (0, 2) if fault in ("missing", "truncated mid-member") else (0,):
        with pytest.raises((ShardError, RuntimeError)) as info:
            _epoch_keys(bad.path, num_workers=num_workers, on_error="raise")
        text = str(info.value)
        del info
        gc.collect()
        assert "ShardError" in text or num_workers == 0, text
        assert words in text, text
        assert text.count(bad.url) == 1, text  # the .tar, and no path twice
        idx = str(_index_of(bad))
        assert text.count(idx) == (1 if names_index else 0), text
        if fault.startswith("truncated"):
            size = Path(bad.url).stat().st_size
            assert f"the file has {size:,}" in text and "2 of 5 samples intact" in text, text


@pytest.mark.parametrize("fault", list(SHARD_FAULTS))
def test_shard_faults_in_skip_mode_cost_only_what_they_make_unreadable(bad, fault, caplog):
    how, lost, words, _, shard_level = SHARD_FAULTS[fault]
    how(bad)
    missing = {bad.shard_samples[i][0] for i in lost}
    expected = set(bad.keys) - missing
    for num_workers in (0, 2):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="shardkit"):
            (keys,), (ds,) = _epoch_keys(bad.path, num_workers=num_workers, on_error="skip")
        assert set(keys) == expected  # every intact sample, the others replaced
        assert len(keys) == len(bad.keys)  # the epoch is as long as ever
        assert ds.skipped == len(missing)  # seen in the main process, workers or not
        listed = ds.bad_shards
        if shard_level:
            assert [(b["url"], b["samples_lost"]) for b in listed] == [(bad.url, len(missing))]
            assert words in listed[0]["reason"] and listed[0]["first_lost"] == min(lost)
            assert caplog.text.count(f"bad shard {bad.url}") == 1, caplog.text  # logged once
        else:
            assert listed == []
    for world, workers in ((2, 0), (3, 2)):
        per_rank, sets = _epoch_keys(bad.path, world, workers, on_error="skip")
        assert len({len(k) for k in per_rank}) == 1  # equal batches on every rank
        union = set().union(*map(set, per_rank))
        assert union <= expected and len(expected - union) <= len(bad.keys) % world
        assert sum(ds.skipped for ds in sets) == len(missing)


def test_bad_shards_are_logged_once_per_epoch_and_found_again_next_epoch(bad, caplog):
    Path(bad.url).unlink()
    ds = StreamingDataset(bad.path, with_keys=True, on_error="skip", batch_size=4,
                          crop=CenterCrop(8))
    loader = make_loader(ds, num_workers=2)
    for _epoch in range(2):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="shardkit"):
            got = keys_of(list(loader), batched=True)
        assert len(got) == len(bad.keys) and ds.skipped == 5
        assert caplog.text.count(f"bad shard {bad.url}") == 1, caplog.text
        assert ds.bad_shards[0]["reason"].startswith("missing or empty")


def test_a_dataset_with_no_readable_shard_raises(bad):
    m = shardkit.Manifest.load(bad.path)
    for s in m.shards:
        (bad.path / s.url).unlink()
    for num_workers in (0, 2):
        with pytest.raises((ShardError, RuntimeError), match="no sample of the dataset can be "
                                                              "read") as info:
            _epoch_keys(bad.path, num_workers=num_workers, on_error="skip")
        assert "missing or empty" in str(info.value)
        del info
        gc.collect()


def test_corrupt_header_mid_shard(bad, caplog):
    data = bytearray(Path(bad.url).read_bytes())
    start = int(bad.offsets[BAD_SAMPLE])
    data[start + 100:start + 160] = b"\xff" * 60  # mode, uid, gid, size, mtime, checksum
    Path(bad.url).write_bytes(bytes(data))
    prev = bad.shard_samples[BAD_SAMPLE - 1][0]
    _check_raise(bad.path, url=bad.url, key=prev, match=f"sample {BAD_SAMPLE}")
    # only the sample whose header is broken is lost: reading restarts at the next offset
    _check_skip(bad.path, bad.keys, {bad.bad_key}, caplog)


def test_corrupt_image_bytes(bad, caplog):
    samples = [members_of(s) for s in bad.shard_samples]
    samples[BAD_SAMPLE] = [(n, b"\xff\xd8 definitely not a jpeg" * 10 if n.endswith(".jpg") else d)
                           for n, d in samples[BAD_SAMPLE]]
    write_shard(bad.path, BAD_SHARD, samples)
    _check_raise(bad.path, url=bad.url, key=bad.bad_key, error=DecodeError)
    _check_skip(bad.path, bad.keys, {bad.bad_key}, caplog)


def test_sample_without_its_image(bad, caplog):
    samples = [members_of(s) for s in bad.shard_samples]
    samples[BAD_SAMPLE] = [(n, d) for n, d in samples[BAD_SAMPLE] if not n.endswith(".jpg")]
    write_shard(bad.path, BAD_SHARD, samples)
    _check_raise(bad.path, url=bad.url, key=bad.bad_key, match="no image", error=DecodeError)
    _check_skip(bad.path, bad.keys, {bad.bad_key}, caplog)


def test_member_with_dotdot_is_refused_and_never_written(bad, caplog, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    samples = [members_of(s) for s in bad.shard_samples]
    evil = f"../{bad.bad_key}.jpg"
    samples[BAD_SAMPLE] = [(evil if n.endswith(".jpg") else n, d) for n, d in samples[BAD_SAMPLE]]
    write_shard(bad.path, BAD_SHARD, samples)
    _check_raise(bad.path, url=bad.url, match=repr(evil))
    _check_skip(bad.path, bad.keys, {bad.bad_key}, caplog)
    for where in (tmp_path, tmp_path.parent, bad.path.parent, Path(bad.url).parent.parent):
        assert not (where / f"{bad.bad_key}.jpg").exists()


class _Marker:
    """Unpickling this creates a file: proof that something unpickled it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


def test_pickle_members_are_never_unpickled(bad, tmp_path):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Marker(control)))  # the payload really does create its file
    assert control.exists()
    marker = tmp_path / "marker"
    payload = pickle.dumps(_Marker(marker))
    samples = [members_of(s) for s in bad.shard_samples]
    key = bad.bad_key
    samples[BAD_SAMPLE] += [(f"{key}.pyd", payload), (f"{key}.pickle", payload),
                            (f"{key}.pth", payload)]
    write_shard(bad.path, BAD_SHARD, samples)
    for decode in ("uint8", "pil", "raw"):
        for workers in (0, 2):
            ds = StreamingDataset(bad.path, decode=decode, with_keys=True)
            got = keys_of(list(make_loader(ds, num_workers=workers)), batched=False)
            assert sorted(got) == sorted(bad.keys)
    assert not marker.exists()


def test_shard_holding_more_than_the_manifest_says(bad, caplog):
    samples = [members_of(s) for s in bad.shard_samples]
    extra = [(n.replace(bad.shard_samples[0][0], "stowaway"), d) for n, d in samples[0]]
    write_shard(bad.path, BAD_SHARD, samples + [extra], index_samples=len(samples))
    _check_raise(bad.path, url=bad.url, key="stowaway", match="more samples")
    (keys,), (ds,) = _epoch_keys(bad.path, on_error="skip")
    assert sorted(keys) == sorted(bad.keys) and ds.skipped == 1


def test_skip_never_hides_code_bugs(datasets):
    def buggy(image):
        raise TypeError("a bug in user code")

    ds = StreamingDataset(datasets["nine"], transform=buggy, on_error="skip")
    with pytest.raises(TypeError, match="a bug"):
        next(iter(ds))


def test_one_damaged_first_header_costs_one_sample_not_the_shard(bad, caplog):
    data = bytearray(Path(bad.url).read_bytes())
    data[0] ^= 0x01  # the first member's name: its checksum fails
    Path(bad.url).write_bytes(bytes(data))
    _check_skip(bad.path, bad.keys, {bad.shard_samples[0][0]}, caplog)
    (keys,), (ds,) = _epoch_keys(bad.path, on_error="skip")
    assert ds.bad_shards == []  # a bad sample, not a bad shard


def test_a_store_that_gives_up_is_not_asked_again_for_each_sample(bad, monkeypatch):
    opened = []
    real = LocalStore.open_range

    def give_up(self, name, start, stop):
        if name.endswith("shard-000001.tar"):
            opened.append((start, stop))
            error = ShardError(self.url(name), "download failed after 3 tries: it broke")
            error.gave_up = True
            raise error
        return real(self, name, start, stop)

    monkeypatch.setattr(LocalStore, "open_range", give_up)
    ds = StreamingDataset(bad.path, with_keys=True, on_error="skip", block_size=2, seed=3)
    keys = [k for _, _, k in ds]
    assert len(keys) == len(bad.keys) and ds.skipped == 5
    assert len(opened) <= 2, opened  # blocks of 2: the first read, at most one more
    (entry,) = ds.bad_shards
    assert "unreadable from sample" in entry["reason"] and "failed after 3 tries" in entry["reason"]


def test_more_bad_shards_than_the_shared_table_lists_are_still_logged_and_counted(tmp_path,
                                                                                  caplog):
    from shardkit.skiplog import ENTRIES

    src = image_folder(tmp_path / "src", classes=1, per_class=ENTRIES + 8, size=(16, 12))
    pack(src, tmp_path / "ds", max_samples=1)
    m = shardkit.Manifest.load(tmp_path / "ds")
    for s in m.shards[1:]:
        (tmp_path / "ds" / s.url).unlink()
    with caplog.at_level(logging.WARNING, logger="shardkit"):
        ds = StreamingDataset(tmp_path / "ds", on_error="skip", decode="raw")
        assert len(list(ds)) == len(m.shards)
    assert ds.skipped == len(m.shards) - 1
    assert caplog.text.count("bad shard") == len(m.shards) - 1  # every one, listed or not
    assert len(ds.bad_shards) == ENTRIES
    (tmp_path / "ds" / m.shards[0].url).unlink()
    with pytest.raises(ShardError, match=rf"{len(m.shards)} bad shards: .* \(and "
                                         rf"{len(m.shards) - 5} more\)"):
        list(StreamingDataset(tmp_path / "ds", on_error="skip", decode="raw"))
