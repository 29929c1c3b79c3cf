"""verify (shardkit/verify.py) and ``shardkit show``: every shard re-read through the dataset's own
store, so local folders, s3:// and http(s):// datasets are checked alike. The remote servers are
the real ones on 127.0.0.1 (_helpers_remote.py)."""

from __future__ import annotations

import pytest

from shardkit import verify
from shardkit.cli import main

from _helpers_remote import BUCKET, aws_env, moto_server, s3, served, small, upload  # noqa: E402  # noqa: E402, F401 - fixtures
from conftest import damage_shard

DAMAGES = ["flip_byte", "truncate", "missing", "flip_index"]


def test_verify_a_good_dataset(small):
    report = verify(small.local)
    assert report.ok and report.problems == []
    assert (report.shards, report.samples) == (len(small.manifest.shards), small.manifest.num_samples)
    assert report.bytes == small.manifest.num_bytes


@pytest.mark.parametrize("damage", DAMAGES)
def test_verify_names_the_damaged_shard_only(small, tmp_path, damage):
    import shutil

    dest = tmp_path / "ds"
    shutil.copytree(small.local, dest)
    damage_shard(dest, damage)
    report = verify(dest)
    assert not report.ok
    assert {url.rsplit("/", 1)[-1].rsplit(".", 1)[0] for url, _ in report.problems} == {
        "shard-000001"}
    text = " ".join(what for _, what in report.problems)
    expect = {"flip_byte": "sha256 differs", "truncate": "bytes, manifest says",
              "missing": "cannot read", "flip_index": "sha256 of the index differs"}[damage]
    assert expect in text


@pytest.mark.parametrize("proto", ["http", "s3"])
def test_verify_reads_remote_datasets(small, served, proto):
    source, options = served.source(proto)
    report = verify(source, storage_options=options)
    assert report.ok, report.problems
    assert report.samples == small.manifest.num_samples
    damage_shard(served.folder, "flip_byte", "shard-000002")
    damage_shard(served.folder, "missing", "shard-000003")
    report = verify(source, storage_options=options)
    assert sorted(url for url, _ in report.problems) == ["shard-000002.tar", "shard-000003.tar"]
    assert any("cannot read" in what for _, what in report.problems)


def test_show_and_verify_verbs_on_s3_and_http(small, aws_env, served, capfd):
    s3_source = upload(aws_env, small, "verbs")  # AWS_ENDPOINT_URL & co. in the environment
    http_source, _ = served.source("http")
    first = small.manifest.shards[0]
    for source in (s3_source, http_source):
        assert main(["verify", source, "--quiet"]) == 0
        out = capfd.readouterr().out
        assert out.startswith(f"verify OK: {len(small.manifest.shards)} shards, "
                              f"{small.manifest.num_samples} samples"), out
        assert main(["show", source, "--keys", "2"]) == 0
        out = capfd.readouterr().out
        assert f"samples   {small.manifest.num_samples}" in out and first.url in out
        keys = [line for line in out.splitlines() if line.startswith("keys")]
        assert len(keys) == 1 and len(keys[0].split(",")) == 2
    aws_env.client().delete_object(Bucket=BUCKET, Key="verbs/shard-000001.tar")
    assert main(["verify", s3_source, "--quiet"]) == 1
    err = capfd.readouterr().err
    assert "MISMATCH shard-000001.tar" in err and "shard-000000" not in err
