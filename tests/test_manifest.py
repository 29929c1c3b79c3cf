"""manifest.json and index files: contents, round trip, and refusal of bad manifests."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from shardkit import Manifest, pack_folder
from shardkit.errors import ManifestError
from shardkit.shardformat import decode_index

from conftest import samples_of


@pytest.fixture(scope="module")
def dataset(class_folder, tmp_path_factory):
    dest = tmp_path_factory.mktemp("ds")
    m = pack_folder(class_folder, dest, max_samples=5, progress=False, workers=1)
    return m, dest


def test_manifest_fields(dataset):
    m, dest = dataset
    data = json.loads((dest / ".shardkit" / "manifest.json").read_text())
    assert data["format"] == "shardkit" and data["format_version"] == 2
    assert data["created_by"].startswith("shardkit ")
    assert data["classes"] == ["cat", "dog", "eel"] and data["num_samples"] == 24
    assert {"mode", "size", "quality", "seed", "shuffle"} <= set(data["options"])
    assert data["skipped"] == [] and data["ignored"] == 0
    for s in data["shards"]:
        assert set(s) == {"url", "num_samples", "num_bytes", "sha256", "index_url", "index_sha256"}
        blob = (dest / s["url"]).read_bytes()
        assert len(blob) == s["num_bytes"] and hashlib.sha256(blob).hexdigest() == s["sha256"]
        assert hashlib.sha256((dest / s["index_url"]).read_bytes()).hexdigest() == s["index_sha256"]
        assert len(samples_of(dest / s["url"])) == s["num_samples"]
    assert sum(s["num_samples"] for s in data["shards"]) == 24


def test_load_round_trip(dataset):
    m, dest = dataset
    loaded = Manifest.load(dest)
    assert loaded == m and loaded.base_url == str(dest)
    assert Manifest.load(dest / ".shardkit" / "manifest.json") == m
    assert loaded.num_bytes == sum(s.num_bytes for s in loaded.shards)
    assert Manifest.from_json(loaded.to_json()) == m


def test_index_offsets_point_at_each_sample(dataset):
    m, dest = dataset
    for s in m.shards:
        offsets = decode_index((dest / s.index_url).read_bytes(), s.num_samples, s.num_bytes, s.index_url)
        blob = (dest / s.url).read_bytes()
        keys = [x["__key__"] for x in samples_of(dest / s.url)]
        for off, key in zip(offsets[:-1], keys):
            header_name = blob[off:off + 100].rstrip(b"\0").decode()
            assert header_name.split(".", 1)[0] == key
        assert offsets[-1] + 1024 == s.num_bytes


def test_decode_index_rejects_mismatch(dataset):
    m, dest = dataset
    s = m.shards[0]
    raw = (dest / s.index_url).read_bytes()
    with pytest.raises(ManifestError):
        decode_index(raw, s.num_samples + 1, s.num_bytes, "x")
    with pytest.raises(ManifestError):
        decode_index(b"XXXXXXXX" + raw[8:], s.num_samples, s.num_bytes, "x")
    bad = raw[:8] + np.asarray([0, 10] + [20] * s.num_samples, "<u8")[: s.num_samples + 1].tobytes()
    with pytest.raises(ManifestError):
        decode_index(bad, s.num_samples, s.num_bytes, "x")


def _mutated(dest, change):
    data = json.loads((dest / ".shardkit" / "manifest.json").read_text())
    change(data)
    return json.dumps(data)


@pytest.mark.parametrize("change,needle", [
    (lambda d: d.update(format="other"), "not a shardkit manifest"),
    (lambda d: d.update(format_version=3), "format_version"),
    (lambda d: d.update(num_samples=25), "add up"),
    (lambda d: d["shards"][0].update(url="../etc/passwd"), "relative"),
    (lambda d: d["shards"][0].update(url="/abs.tar"), "relative"),
    (lambda d: d["shards"][0].update(index_url="s3://x/y.idx"), "relative"),
    (lambda d: d["shards"][0].update(num_bytes=-1), "non-negative"),
    (lambda d: d["shards"][0].pop("sha256"), "malformed"),
])
def test_bad_manifests_are_refused(dataset, change, needle):
    _, dest = dataset
    with pytest.raises(ManifestError, match=needle):
        Manifest.from_json(_mutated(dest, change))


def test_missing_manifest_hints_at_resume(tmp_path):
    with pytest.raises(ManifestError, match="no manifest"):
        Manifest.load(tmp_path)
    (tmp_path / "shard-000000.tar").write_bytes(b"\0" * 1024)
    with pytest.raises(ManifestError, match=f"shardkit index {tmp_path}"):  # foreign shards?
        Manifest.load(tmp_path)
    (tmp_path / ".shardkit-pack.json").write_text("{}")
    with pytest.raises(ManifestError, match="resume"):  # an unfinished pack
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="JSON"):
        Manifest.load(tmp_path)


def test_the_first_mistakes_get_a_message_that_points_the_way(tmp_path):
    from conftest import make_class_folder

    (tmp_path / "packed").mkdir()
    with pytest.raises(ManifestError, match=r"pakced: no such file or directory \(.* holds: packed"):
        Manifest.load(tmp_path / "pakced")  # a typo
    images = make_class_folder(tmp_path / "images")
    with pytest.raises(ManifestError, match=r"is a folder of images: pack it first, e\.g\. "
                                            r"shardkit pack"):
        Manifest.load(images)
    (tmp_path / "one.zip").write_bytes(b"\0" * 1024)
    with pytest.raises(ManifestError, match="a file, not a dataset folder"):
        Manifest.load(tmp_path / "one.zip")


def test_the_command_line_shows_shardkits_info_lines_only(monkeypatch):
    import logging

    from shardkit import cli

    monkeypatch.setattr(cli, "VERBS", {**cli.VERBS, "show": (
        "x", cli.VERBS["show"][1], lambda args: 0)})
    assert cli.main(["show", "anything"]) == 0
    assert logging.getLogger("shardkit").getEffectiveLevel() == logging.INFO
    assert logging.getLogger("botocore").getEffectiveLevel() >= logging.WARNING


def test_one_shard_or_a_brace_pattern_reads_as_a_list_of_shards(tmp_path):
    from shardkit import StreamingDataset

    from _helpers_read import image_folder, pack

    src = image_folder(tmp_path / "src", classes=2, per_class=5, size=(8, 8))
    pack(src, tmp_path / "ds", mode="raw", max_samples=4)
    one = StreamingDataset(str(tmp_path / "ds" / "shard-000001.tar"), decode="raw")
    assert len(one) == 4
    braces = StreamingDataset(str(tmp_path / "ds" / "shard-{000000..000002}.tar"), decode="raw")
    assert len(braces) == 10 and len(braces.manifest.shards) == 3
