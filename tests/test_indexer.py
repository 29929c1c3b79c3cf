"""``shardkit index``: webdataset shards that no shardkit code wrote, indexed, then read.

Shards come from ``webdataset.ShardWriter`` (keys with ``/``, ``.JPG``, ``.seg.png``, captions,
labels in ``.cls``, ``.cls2``, ``.label`` or a JSON field) and from GNU ``tar`` of a folder tree
(folder members, ``./`` names); each is indexed and then read exactly once per epoch, locally,
over the test S3 and HTTP servers and through fsspec's in-memory filesystem.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import shardkit
import shardkit.indexer
from shardkit import ManifestError, ShardError, StreamingDataset, index_shards, make_loader
from shardkit.cli import main as cli_main
from shardkit.shardformat import MANIFEST_PATH

from conftest import jpeg_bytes, photo, png_bytes, subprocess_env

wds = pytest.importorskip("webdataset")

from _helpers_remote import (  # noqa: E402, F401 - fixtures
    BUCKET,  # noqa: E402
    moto_server,
    s3,
)

LOADER_TIMEOUT = 60


# --------------------------------------------------------------------------- shards by others


def caption(i: int) -> str:
    return f"a photo, number {i} — ünïcode"


def write_wds(folder: Path, n: int = 40, per_shard: int = 12, *, classes: int = 4,
              label: str = "cls", sort: bool = False) -> dict[str, dict]:
    """ShardWriter shards ``folder/train-%06d.tar``; returns what each key holds."""
    folder.mkdir(parents=True, exist_ok=True)
    want = {}
    with wds.ShardWriter(str(folder / "train-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(n):
            c = i * classes // n if sort else i % classes
            key = f"n{c:04d}/n{c:04d}_{i:05d}"
            image = jpeg_bytes(photo(24, 16, seed=i))
            sample = {"__key__": key, "JPG" if i % 3 == 0 else "jpg": image,
                      "seg.png": png_bytes(photo(8, 8, seed=i)), "txt": caption(i),
                      "json": {"name": f"class-{c}", "i": i}}
            if label != "none" and not label.startswith("json"):
                sample[label] = c if label in ("cls", "cls2") else str(c)  # (wds's encoders)
            sink.write(sample)
            want[key] = {"label": c, "image": image, "txt": caption(i)}
    return want


def read(source, num_workers: int = 0, **kw) -> list[tuple]:
    """One epoch's items ``(image bytes, label, *fields, key)``."""
    kw.setdefault("seed", 3)
    ds = StreamingDataset(source, decode="raw", with_keys=True, **kw)
    if num_workers:
        return list(make_loader(ds, num_workers=num_workers, persistent_workers=False,
                                timeout=LOADER_TIMEOUT))
    return list(ds)


def check_once(items, want: dict, *, labels: bool = True) -> None:
    keys = [it[-1] for it in items]
    dup = {k: n for k, n in Counter(keys).items() if n > 1}
    assert not dup and set(keys) == set(want), (dup, set(want) - set(keys))
    for it in items:
        w = want[it[-1]]
        assert bytes(it[0]) == w["image"]
        assert it[1] == (w["label"] if labels else -1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("wds") / "shards"
    return folder, write_wds(folder)


@pytest.fixture(scope="module")
def indexed(shards, tmp_path_factory) -> tuple[Path, dict]:
    folder, want = shards
    copy = tmp_path_factory.mktemp("indexed") / "shards"
    shutil.copytree(folder, copy)
    index_shards(copy, progress=False)
    return copy, want


# --------------------------------------------------------------------------- local folders


@pytest.mark.parametrize("num_workers,world", [(0, 1), (2, 1), (2, 2)])
def test_shardwriter_shards_indexed_read_exactly_once(indexed, num_workers, world):
    folder, want = indexed
    items = []
    for rank in range(world):
        got = read(folder, num_workers, rank=rank, world_size=world, remainder="pad")
        items += got
    if world == 1:
        check_once(items, want)
    else:  # padded to equal ranks: every sample at least once, repeats only from padding
        assert set(it[-1] for it in items) == set(want)
        assert len(items) - len(want) < world


def test_index_writes_a_manifest_beside_the_shards_and_nothing_other_readers_trip_on(indexed):
    folder, want = indexed
    m = shardkit.Manifest.load(folder)
    assert m.num_samples == len(want) and m.classes == ["0", "1", "2", "3"]
    assert [s.num_samples for s in m.shards] == [12, 12, 12, 4]
    assert m.labels == {"field": "cls"} and m.signature is None
    assert m.options["fields"] == {"cls": 40, "jpg": 40, "json": 40, "seg.png": 40, "txt": 40}
    for s in m.shards:  # size and BLAKE3 (the index's default hash) of the bytes as they are
        data = (folder / s.url).read_bytes()
        assert s.num_bytes == len(data)
        import blake3

        assert s.blake3 == blake3.blake3(data).hexdigest() and s.sha256 is None
        assert s.digest == ("blake3", s.blake3)
    # the folder holds the tars and the hidden .shardkit/ only: what webdataset, GNU tar and
    # Hugging Face datasets (which skips hidden files) look at is unchanged
    assert sorted(p.name for p in folder.iterdir()) == [".shardkit"] + [s.url for s in m.shards]
    assert all(p.suffix in (".idx", ".json") for p in (folder / ".shardkit").iterdir())
    got = list(wds.WebDataset(str(folder / "train-{000000..000003}.tar"), shardshuffle=False))
    assert sorted(s["__key__"] for s in got) == sorted(want)
    listing = subprocess.run(["tar", "tf", str(folder / m.shards[0].url)], check=True,
                             capture_output=True, text=True).stdout.split()
    assert len(listing) == 12 * 5


def test_fields_come_as_text_or_bytes_and_as_lists_in_batches(indexed):
    folder, want = indexed
    items = read(folder, fields=("txt", "json", "seg.png"))
    for _image, label, txt, meta, seg, key in items:
        assert txt == want[key]["txt"] and isinstance(txt, str)
        assert json.loads(meta)["name"] == f"class-{label}"
        assert isinstance(seg, bytes) and seg.startswith(b"\x89PNG")
    with pytest.raises(ValueError, match=r"no sample of .* holds nope; its samples hold cls, "
                                         r"jpg, json, seg\.png, txt"):
        read(folder, fields=("txt", "nope"))  # (None in every item, before)
    ds = StreamingDataset(folder, batch_size=8, fields=("txt",), with_keys=True, seed=1)
    seen = 0
    for images, labels, texts, keys in ds:
        assert images.shape[0] == labels.shape[0] == len(texts) == len(keys)
        assert texts == [want[k]["txt"] for k in keys]
        assert labels.tolist() == [want[k]["label"] for k in keys]
        seen += len(keys)
    assert seen == len(want)
    with pytest.raises(ValueError, match="field name"):
        StreamingDataset(folder, fields=("TXT",))
    with pytest.raises(TypeError, match="tuple"):
        StreamingDataset(folder, fields="txt")


@pytest.mark.parametrize("label", ["cls2", "label", "json:name", "none"])
def test_labels_from_other_members_a_json_field_or_none(tmp_path, label):
    field = "json" if label.startswith("json") else label
    want = write_wds(tmp_path / "s", n=20, label=field)
    m = index_shards(tmp_path / "s", progress=False, label="auto" if label != "json:name" else label)
    items = read(tmp_path / "s")
    if label == "none":
        assert m.classes is None and m.labels == {"field": None}
        check_once(items, want, labels=False)
    elif label == "json:name":  # names: class indices in sorted order
        assert m.classes == ["class-0", "class-1", "class-2", "class-3"]
        assert m.labels == {"json": "name", "names": True}
        check_once(items, want)
    else:
        assert m.labels == {"field": label} and m.classes == ["0", "1", "2", "3"]
        check_once(items, want)


def test_text_labels_become_class_indices(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    names = ["zebra", "ant", "moose"]
    with wds.TarWriter(str(folder / "a.tar")) as sink:
        for i in range(9):
            sink.write({"__key__": f"k{i}", "png": png_bytes(photo(8, 8, seed=i)),
                        "label": names[i % 3]})
    m = index_shards(folder, progress=False)
    assert m.classes == ["ant", "moose", "zebra"] and m.labels == {"field": "label", "names": True}
    labels = {key: label for _, label, key in read(folder)}
    assert labels == {f"k{i}": sorted(names).index(names[i % 3]) for i in range(9)}


def test_gnu_tar_of_a_folder_tree(tmp_path):
    """``tar cf`` of class folders: folder members, './' names, keys with '/'."""
    root = tmp_path / "tree"
    want = {}
    for c in range(3):
        for i in range(5):
            key = f"./train/c{c}/img_{i:03d}"
            image = jpeg_bytes(photo(16, 16, seed=10 * c + i))
            (root / "train" / f"c{c}").mkdir(parents=True, exist_ok=True)
            (root / f"{key}.jpeg").write_bytes(image)
            (root / f"{key}.cls").write_text(str(c))
            (root / f"{key}.txt").write_text(f"class {c}")
            want[key[2:]] = {"label": c, "image": image}  # (keys without the "./")
    (tmp_path / "shards").mkdir()
    for part, classes in enumerate([["c0", "c1"], ["c2"]]):
        subprocess.run(["tar", "--sort=name", "-cf", str(tmp_path / "shards" / f"part-{part}.tar"),
                        *[f"./train/{c}" for c in classes]], cwd=root, check=True)
    m = index_shards(tmp_path / "shards", progress=False)
    assert m.num_samples == 15 and m.ignored > 0  # the folder members
    check_once(read(tmp_path / "shards", 2), want)
    assert [t for _, _, t, _ in read(tmp_path / "shards", fields=("txt",))][:1] != [None]


def test_index_function_and_cli_agree_and_cli_reports(shards, tmp_path):
    folder, want = shards
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "shardkit", "index", str(folder / "train-{000000..000002}.tar"),
           "--out", str(out), "--quiet"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env())
    assert res.returncode == 0, res.stderr
    assert "indexed 3 shards, 36 samples" in res.stdout
    m = shardkit.Manifest.load(out)
    assert m.external and m.signature  # the shards stay where they are
    assert [s.url for s in m.shards] == [str(folder / f"train-{i:06d}.tar") for i in range(3)]
    items = read(out)
    assert len(items) == 36 and {it[-1] for it in items} <= set(want)
    assert not any(folder.joinpath(".shardkit").exists() for _ in [0])  # nothing written there
    usage = subprocess.run([sys.executable, "-m", "shardkit", "index", str(tmp_path / "none")],
                           capture_output=True, text=True, env=subprocess_env())
    assert usage.returncode == 1 and "none: cannot list: No such file" in usage.stderr


# --------------------------------------------------------------------------- what is refused


def _tar(path: Path, members: list, fmt=tarfile.GNU_FORMAT) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.SYMTYPE
                info.linkname = "elsewhere"
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


IMG = jpeg_bytes(photo(8, 8))
BAD_SHARDS = {
    "key met again": ([("a.jpg", IMG), ("b.jpg", IMG), ("a.cls", b"1")], "'a.cls'.*met again"),
    "no image": ([("a.jpg", IMG), ("b.txt", b"x")], "sample 'b' has no image"),
    "second member": ([("a.jpg", IMG), ("a.JPG", IMG)], "second 'jpg' member"),
    "unsafe key": ([("a.jpg", IMG), ("x/../../etc/passwd.jpg", IMG)], "not a safe"),
    "link": ([("a.jpg", IMG), ("b.jpg", None)], "'b.jpg' is not a regular file"),
    "bad label": ([("a.jpg", IMG), ("a.cls", b"\xff\xfe")], "'a'.*not text"),
    "no samples": ([("README", b"hello")], "holds no sample"),
}


@pytest.mark.parametrize("case", sorted(BAD_SHARDS))
def test_what_the_index_cannot_make_sense_of_is_an_error_naming_shard_and_member(tmp_path, case):
    members, message = BAD_SHARDS[case]
    good = _tar(tmp_path / "s" / "a-0.tar", [("z.jpg", IMG), ("z.cls", b"0")])
    bad = _tar(tmp_path / "s" / "a-1.tar", members)
    with pytest.raises(ShardError, match=message) as info:
        index_shards(tmp_path / "s", progress=False, label="cls" if case == "bad label" else "none")
    assert str(bad) in str(info.value) and str(good) not in str(info.value)
    assert not (tmp_path / "s" / MANIFEST_PATH).exists()


@pytest.mark.parametrize("damage", ["truncated", "gzip", "garbage"])
def test_damaged_and_compressed_shards_are_refused_at_index_time(tmp_path, damage):
    path = _tar(tmp_path / "s" / "a.tar", [(f"k{i}.jpg", IMG) for i in range(4)])
    data = path.read_bytes()
    path.write_bytes({"truncated": data[:1536], "gzip": gzip.compress(data),
                      "garbage": data[:512] + b"\x01" * 2048}[damage])
    with pytest.raises(ShardError, match=r"a\.tar.*(truncated|corrupt|checksum|end-of-archive"
                                         r"|gzip-compressed data named \.tar)"):
        index_shards(tmp_path / "s", progress=False)


def test_shards_in_several_folders_need_out(shards, tmp_path):
    folder, _ = shards
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(folder / "train-000000.tar", other / "x.tar")
    with pytest.raises(ValueError, match="--out"):
        index_shards([folder / "train-000001.tar", other / "x.tar"], progress=False)
    m = index_shards([folder / "train-000001.tar", other / "x.tar"], tmp_path / "out",
                     progress=False)
    assert m.num_samples == 24 and len({s.index_url for s in m.shards}) == 2


# --------------------------------------------------------------------------- the security rule


def test_only_this_machines_key_lets_a_manifest_point_elsewhere(shards, tmp_path, monkeypatch):
    folder, _ = shards
    index_shards([folder / "train-000003.tar"], tmp_path / "out", progress=False)
    path = tmp_path / "out" / MANIFEST_PATH
    assert shardkit.Manifest.load(tmp_path / "out").external
    from shardkit import signing

    assert oct(signing.key_path().stat().st_mode & 0o777) == "0o600"
    doc = json.loads(path.read_text())
    # edited to read another file: the signature no longer holds
    doc["shards"][0]["url"] = "/etc/hostname"
    path.write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="not signed by this machine"):
        shardkit.Manifest.load(tmp_path / "out")
    # no signature at all: plain relative names only
    del doc["signature"]
    path.write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="not a plain relative name"):
        shardkit.Manifest.load(tmp_path / "out")
    # signed elsewhere (another key): refused here
    index_shards([folder / "train-000003.tar"], tmp_path / "out2", progress=False)
    monkeypatch.setenv("SHARDKIT_INDEX_KEY", "another machine's key")
    with pytest.raises(ManifestError, match="not signed by this machine"):
        shardkit.Manifest.load(tmp_path / "out2")


# --------------------------------------------------------------------------- resume


def _count_indexed(monkeypatch) -> list:
    """The shard URLs ``index_shard`` is called with from now on."""
    from shardkit import indexer

    calls: list = []
    real = indexer.index_shard
    monkeypatch.setattr(indexer, "index_shard", lambda url, *a, **k: (calls.append(url),
                                                                      real(url, *a, **k))[1])
    return calls


def test_resume_keeps_the_shards_a_failed_run_finished(shards, tmp_path, monkeypatch):
    folder, want = shards
    work = tmp_path / "s"
    shutil.copytree(folder, work)
    good = (work / "train-000002.tar").read_bytes()
    (work / "train-000002.tar").write_bytes(good[:3000])  # cut: the run fails there
    with pytest.raises(ShardError, match="train-000002.tar"):
        index_shards(work, progress=False, workers=1)
    assert not (work / MANIFEST_PATH).exists()
    (work / "train-000002.tar").write_bytes(good)
    calls = _count_indexed(monkeypatch)
    m = index_shards(work, progress=False, resume=True)
    assert sorted(Path(c).name for c in calls) == ["train-000002.tar", "train-000003.tar"] \
        or sorted(Path(c).name for c in calls) == ["train-000002.tar"]
    assert not [p for p in (work / ".shardkit").iterdir() if p.name.endswith(".idx.json")]
    fresh = index_shards(folder, tmp_path / "fresh", progress=False)
    assert [(s.num_samples, s.sha256, s.index_sha256) for s in m.shards] == \
        [(s.num_samples, s.sha256, s.index_sha256) for s in fresh.shards]
    check_once(read(work), want)


# --------------------------------------------------------------------------- shuffle quality


def _mean_distinct(source, batch: int = 32, **kw) -> float:
    out = []
    for epoch in range(3):
        ds = StreamingDataset(source, decode="raw", batch_size=batch, seed=epoch, **kw)
        for _, labels in make_loader(ds, num_workers=2, persistent_workers=False,
                                     timeout=LOADER_TIMEOUT):
            out.append(len(set(labels.tolist())))
    return float(np.mean(out))


def test_class_sorted_shards_are_shuffled_well_by_default(tmp_path):
    write_wds(tmp_path / "sorted", n=720, per_shard=60, classes=12, sort=True)
    m = index_shards(tmp_path / "sorted", progress=False)
    assert m.shuffled is False and m.options["order"]["same_label_neighbours"] > 0.9
    iid = 12 * (1 - (11 / 12) ** 32)
    default = _mean_distinct(tmp_path / "sorted")
    assert default >= 0.8 * iid, default
    assert _mean_distinct(tmp_path / "sorted", block_size=64) < 0.8 * iid  # what it was
    mixed = tmp_path / "mixed"
    write_wds(mixed, n=40, per_shard=12)
    assert index_shards(mixed, progress=False).shuffled is True


# --------------------------------------------------------------------------- remote stores


@pytest.fixture
def http_shards(shards, tmp_path):
    from servers import FaultyHTTPServer

    folder, want = shards
    shutil.copytree(folder, tmp_path / "www" / "wds")
    with FaultyHTTPServer(tmp_path / "www") as srv:
        yield srv, want


def test_http_folder_brace_pattern_and_presigned_urls(http_shards, tmp_path):
    srv, want = http_shards
    base = f"{srv.url}wds"
    # a folder listed by the server, indexed into --out (http:// cannot be written)
    with pytest.raises(ValueError, match="--out"):
        index_shards(base, progress=False)
    m = index_shards(base, tmp_path / "a", progress=False)
    assert m.num_samples == 40 and m.shards[0].url == f"{base}/train-000000.tar"
    check_once(read(tmp_path / "a", 2), want)
    # the webdataset brace convention
    m = index_shards(f"{base}/train-{{000000..000003}}.tar", tmp_path / "b", progress=False)
    check_once(read(tmp_path / "b"), want)
    # pre-signed URLs: their query strings are kept, used on every request, never shown
    urls = [f"{base}/train-{i:06d}.tar?X-Signature=s3cr3t{i}" for i in range(4)]
    srv.clear_counters()
    m = index_shards(urls, tmp_path / "c", progress=False)
    check_once(read(tmp_path / "c"), want)
    asked = [path for method, path, _ in srv.requests if method == "GET"]
    assert asked and all("X-Signature=s3cr3t" in p for p in asked)
    ds = StreamingDataset(tmp_path / "c")
    assert "s3cr3t" not in repr([ds.manifest.shard_store().url(s.url) for s in m.shards])
    with pytest.raises(ValueError, match="query string"):
        _ = StreamingDataset(urls).manifest  # a list derives index URLs: it needs an index
    shown = subprocess.run([sys.executable, "-m", "shardkit", "show", str(tmp_path / "c")],
                           capture_output=True, text=True, env=subprocess_env())
    assert shown.returncode == 0 and "train-000000.tar" in shown.stdout
    assert "s3cr3t" not in shown.stdout + shown.stderr


def index_on_s3(folder: Path, s3, prefix: str) -> tuple[shardkit.Manifest, dict]:
    """The ``.tar`` shards of ``folder`` put under ``s3://BUCKET/prefix`` and indexed there;
    returns the manifest and the storage options that reach the test server."""
    for p in folder.glob("*.tar"):
        s3.put(BUCKET, f"{prefix}/{p.name}", p.read_bytes())
    options = s3.storage_options()
    return index_shards(f"s3://{BUCKET}/{prefix}", storage_options=options, progress=False), options


def test_s3_prefix_indexed_in_place(shards, s3, tmp_path):
    folder, want = shards
    m, options = index_on_s3(folder, s3, "wds")
    assert m.num_samples == 40 and not m.external and m.base_url == f"s3://{BUCKET}/wds"
    listing = s3.client().list_objects_v2(Bucket=BUCKET, Prefix="wds/.shardkit/")["Contents"]
    assert sorted(o["Key"] for o in listing) == [f"wds/.shardkit/{n}" for n in [
        "manifest.json", *(f"train-{i:06d}.idx" for i in range(4))]]
    check_once(read(f"s3://{BUCKET}/wds", 2, storage_options=options), want)


def test_fsspec_memory_filesystem(shards, tmp_path):
    fsspec = pytest.importorskip("fsspec")
    folder, want = shards
    fs = fsspec.filesystem("memory")
    for p in folder.glob("*.tar"):
        fs.pipe_file(f"/wds-index/{p.name}", p.read_bytes())
    try:
        m = index_shards("memory://wds-index", tmp_path / "out", progress=False)
        assert m.num_samples == 40
        check_once(read(tmp_path / "out"), want)  # (memory:// lives in this process only)
    finally:
        fs.rm("/wds-index", recursive=True)


# --------------------------------------------------------------------------- other readers


def test_hugging_face_datasets_reads_a_shardkit_folder_by_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    datasets = pytest.importorskip("datasets")
    from _helpers_read import image_folder, pack

    m = pack(image_folder(tmp_path / "src", classes=2, per_class=6), tmp_path / "ds",
             max_samples=5)
    ds = datasets.load_dataset("webdataset", data_dir=str(tmp_path / "ds"), split="train",
                               cache_dir=str(tmp_path / "hf-cache"))
    assert len(ds) == m.num_samples == 12



# --------------------------------------------------------------------------- found in review


def test_relative_out_beside_the_shards_names_them_relatively(shards, tmp_path, monkeypatch):
    folder, want = shards
    shutil.copytree(folder, tmp_path / "s")
    monkeypatch.chdir(tmp_path / "s")
    m = index_shards(".", ".", progress=False)
    assert not m.external and m.signature is None
    assert [s.url for s in m.shards] == [f"train-{i:06d}.tar" for i in range(4)]
    monkeypatch.chdir(tmp_path)
    shutil.move(tmp_path / "s", tmp_path / "moved")  # a dataset that moves still reads
    check_once(read(tmp_path / "moved"), want)


def test_a_global_pax_header_between_samples(tmp_path):
    a, b = io.BytesIO(), io.BytesIO()
    for buf, names, pax in ((a, ["a0", "a1"], None), (b, ["b0", "b1"], {"comment": "hi"})):
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                          pax_headers=pax) as tf:
            for n in names:
                data = jpeg_bytes(photo(8, 8, seed=len(n)))
                info = tarfile.TarInfo(f"{n}.jpg")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    first = a.getvalue()
    first = first[:len(first.rstrip(b"\0")) + (-len(first.rstrip(b"\0"))) % 512]  # no end blocks
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "x.tar").write_bytes(first + b.getvalue())
    index_shards(tmp_path / "s", progress=False)
    keys = [it[-1] for it in read(tmp_path / "s")]
    assert sorted(keys) == ["a0", "a1", "b0", "b1"]


def test_labels_that_are_not_ascii_numbers_are_names_and_numbers_size_the_classes(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    with wds.TarWriter(str(folder / "a.tar")) as sink:
        for i, label in enumerate(["0", "3", "7", "3"]):
            sink.write({"__key__": f"k{i}", "png": png_bytes(photo(8, 8, seed=i)), "cls": label})
    m = index_shards(folder, progress=False)
    assert m.classes == [str(i) for i in range(8)] and "names" not in m.labels
    assert sorted(label for _, label, _ in read(folder)) == [0, 3, 3, 7]
    with wds.TarWriter(str(folder / "a.tar")) as sink:
        for i, label in enumerate(["-1", "\u0661", "2"]):  # a minus, an Arabic-Indic digit
            sink.write({"__key__": f"k{i}", "png": png_bytes(photo(8, 8, seed=i)),
                        "label": label})
    m = index_shards(folder, progress=False)
    assert m.labels == {"field": "label", "names": True} and m.classes == ["-1", "2", "\u0661"]
    assert sorted(label for _, label, _ in read(folder)) == [0, 1, 2]


def test_auto_labels_need_every_sample_to_hold_the_label(tmp_path):
    _tar(tmp_path / "s" / "a.tar", [("a.jpg", IMG), ("a.cls", b"1"), ("b.jpg", IMG)])
    with pytest.raises(ShardError, match="sample 'b' has no .cls member"):
        index_shards(tmp_path / "s", progress=False)
    assert index_shards(tmp_path / "s", progress=False, label="none").num_samples == 2


def test_resume_indexes_a_shard_rewritten_since_again(tmp_path):
    folder = tmp_path / "s"
    _tar(folder / "a.tar", [("k0.jpg", IMG), ("k1.jpg", IMG)])
    _tar(folder / "b.tar", [("z.jpg", IMG)])
    size = (folder / "a.tar").stat().st_size
    good_b = (folder / "b.tar").read_bytes()
    (folder / "b.tar").write_bytes(good_b[:700])
    with pytest.raises(ShardError, match="b.tar"):
        index_shards(folder, progress=False, workers=1)
    _tar(folder / "a.tar", [(f"n{i}.jpg", IMG) for i in range(3)])  # same size, other samples
    assert (folder / "a.tar").stat().st_size == size
    (folder / "b.tar").write_bytes(good_b)
    m = index_shards(folder, progress=False, resume=True)
    assert [s.num_samples for s in m.shards] == [3, 1]
    assert sorted(it[-1] for it in read(folder)) == ["n0", "n1", "n2", "z"]


def test_a_malformed_signature_is_a_manifest_error(shards, tmp_path):
    folder, _ = shards
    index_shards([folder / "train-000003.tar"], tmp_path / "out", progress=False)
    path = tmp_path / "out" / MANIFEST_PATH
    doc = json.loads(path.read_text())
    doc["signature"] = "é" * 64
    path.write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="not signed"):
        shardkit.Manifest.load(tmp_path / "out")


def _latin1_shard(folder: Path) -> dict[str, int]:
    """A tar whose member names are Latin-1 bytes (not UTF-8), as old tools write them."""
    folder.mkdir()
    want = {}
    with tarfile.open(folder / "old-000000.tar", "w", format=tarfile.USTAR_FORMAT,
                      encoding="latin-1") as tar:
        for i, key in enumerate(["caf\xe9", "plain", "na\xefve", "\xfcber"]):
            for name, data in ((f"{key}.jpg", jpeg_bytes(photo(24, 16, seed=i))),
                               (f"{key}.cls", str(i).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            want[key.encode("latin-1").decode("utf-8", "surrogateescape")] = i
    return want


@pytest.mark.parametrize("on_error", ["raise", "skip"])
@pytest.mark.parametrize("num_workers,batch_size", [(0, None), (2, None), (2, 2)])
def test_member_names_that_are_not_utf8_read_with_a_crop(tmp_path, on_error, num_workers,
                                                          batch_size):
    want = _latin1_shard(tmp_path / "old")
    index_shards(tmp_path / "old", progress=False)
    ds = StreamingDataset(tmp_path / "old", crop=shardkit.RandomResizedCrop(8), with_keys=True,
                          on_error=on_error, batch_size=batch_size, seed=1)
    items = list(make_loader(ds, num_workers=num_workers, persistent_workers=False,
                             timeout=LOADER_TIMEOUT) if num_workers else ds)
    if batch_size:
        items = [(im, int(y), k) for images, labels, keys in items
                 for im, y, k in zip(images, labels, keys)]
    # the key is the name's bytes as a str with surrogate escapes (as tarfile and webdataset give)
    assert {k: int(y) for _, y, k in items} == want
    assert all(tuple(im.shape) == (3, 8, 8) for im, _, _ in items)
    assert ds.skipped == 0


# --------------------------------------------------------------------------- in parts


def test_index_in_parts_writes_the_manifest_of_a_single_run(shards, tmp_path):
    folder, want = shards
    whole, parted = tmp_path / "whole", tmp_path / "parted"
    shutil.copytree(folder, whole)
    shutil.copytree(folder, parted)
    single = index_shards(whole, progress=False)
    for i in (2, 0):  # parts finish in any order; no manifest until all three are there
        part = index_shards(parted, progress=False, part=(i, 3))
        assert 0 < len(part.shards) < len(single.shards)
        assert not (parted / ".shardkit" / "manifest.json").exists()
    merged = index_shards(parted, progress=False, part=(1, 3))  # the last one writes it
    assert merged.options["parts"] == 3
    assert [s.url for s in merged.shards] == [s.url for s in single.shards]
    assert merged.shards == single.shards and merged.classes == single.classes
    assert merged.labels == single.labels and merged.num_samples == single.num_samples
    assert merged.options["fields"] == single.options["fields"]
    check_once(read(parted), want)
    # by hand: the manifest again from the part records; a missing part is named
    (parted / ".shardkit" / "manifest.json").unlink()
    assert shardkit.indexer.merge_index_parts(parted, 3).shards == single.shards
    (parted / ".shardkit" / "index-part-p0001of0003.json").unlink()
    with pytest.raises(shardkit.ShardError, match=r"part\(s\) \[1\] of 0..2 not finished"):
        shardkit.indexer.merge_index_parts(parted, 3)


def test_class_names_seen_by_different_parts_make_one_list(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    names = {0: ["zebra", "ant"], 1: ["ant", "moose"]}  # each shard its own names
    for shard, pool in names.items():
        with wds.TarWriter(str(folder / f"s{shard}.tar")) as sink:
            for i in range(6):
                sink.write({"__key__": f"k{shard}_{i}", "png": png_bytes(photo(8, 8, seed=i)),
                            "label": pool[i % 2]})
    for i in range(2):
        m = index_shards(folder, progress=False, part=(i, 2))
    assert m.classes == ["ant", "moose", "zebra"] and m.labels == {"field": "label", "names": True}
    labels = {key: label for _, label, key in read(folder)}
    assert labels == {f"k{s}_{i}": m.classes.index(names[s][i % 2])
                      for s in names for i in range(6)}


def test_index_parts_from_the_command_line(shards, tmp_path, capsys):
    folder, want = shards
    copy = tmp_path / "shards"
    shutil.copytree(folder, copy)
    assert cli_main(["index", str(copy), "--part", "0/2", "--quiet"]) == 0
    assert "the manifest comes when every part is done" in capsys.readouterr().out
    assert cli_main(["index", str(copy), "--part", "1/2", "--quiet"]) == 0
    assert "indexed 4 shards" in capsys.readouterr().out
    (copy / ".shardkit" / "manifest.json").unlink()
    assert cli_main(["index", str(copy), "--merge-parts", "2"]) == 0
    check_once(read(copy), want)


def test_a_killed_part_resumes_with_what_it_finished(shards, tmp_path, monkeypatch):
    folder, want = shards
    work = tmp_path / "s"
    shutil.copytree(folder, work)
    good = (work / "train-000003.tar").read_bytes()  # part 1 of 2 holds shards 2 and 3
    (work / "train-000003.tar").write_bytes(good[:3000])
    index_shards(work, progress=False, part=(0, 2))
    with pytest.raises(ShardError, match="train-000003.tar"):
        index_shards(work, progress=False, workers=1, part=(1, 2))
    assert not (work / MANIFEST_PATH).exists()
    (work / "train-000003.tar").write_bytes(good)
    calls = _count_indexed(monkeypatch)
    m = index_shards(work, progress=False, resume=True, part=(1, 2))
    assert [Path(c).name for c in calls] == ["train-000003.tar"]  # shard 2 was done
    assert m.options["parts"] == 2 and len(m.shards) == 4
    check_once(read(work), want)
