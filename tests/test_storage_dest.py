"""Packing into an object store (``storage.dest``): uploads in order, the manifest last, resume
against the bucket, byte-identical to a local pack. moto's S3 in server mode on 127.0.0.1."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("aiohttp")
pytest.importorskip("flask", reason="moto server mode needs moto[server] (flask, flask-cors)")

from shardkit.errors import DestinationError  # noqa: E402
from shardkit.packing.journal import JOURNAL_NAME  # noqa: E402
from shardkit.packing.shards import ShardWriter  # noqa: E402
from shardkit.shardformat import MANIFEST_PATH  # noqa: E402
from shardkit.storage import RemoteDest  # noqa: E402

from _helpers_read import pack  # noqa: E402
from _helpers_remote import BUCKET, Data, bucket_objects, moto_server, s3, small  # noqa: E402  # noqa: E402, F401 - fixtures
from conftest import REPO, subprocess_env  # noqa: E402
from servers import MotoS3  # noqa: E402

# --------------------------------------------------------------------------- 1: writing


def _record_uploads(monkeypatch, s3, prefix):
    """Record every upload in order, with the objects present when it started."""
    log: list[tuple[str, set[str]]] = []
    real_commit, real_write = RemoteDest.commit, RemoteDest.write_atomic

    def present():
        return set(bucket_objects(s3, prefix))

    def commit(self, tmp, name):
        log.append((name, present()))
        return real_commit(self, tmp, name)

    def write_atomic(self, name, data):
        log.append((name, present()))
        return real_write(self, name, data)

    monkeypatch.setattr(RemoteDest, "commit", commit)
    monkeypatch.setattr(RemoteDest, "write_atomic", write_atomic)
    return log


def test_pack_into_s3_uploads_shards_then_the_manifest_byte_identical(small, s3, monkeypatch):
    log = _record_uploads(monkeypatch, s3, "train")
    m = pack(small.src, f"s3://{BUCKET}/train", storage_options=s3.storage_options(),
             **small.options)
    names = [name for name, _ in log]
    shards = small.shard_urls()
    assert [n for n in names if n.endswith(".tar")] == shards
    assert names[-1] == MANIFEST_PATH and names.count(MANIFEST_PATH) == 1
    for name, before in log:
        assert MANIFEST_PATH not in before, f"manifest visible before uploading {name}"
        if name.endswith(".tar"):  # every earlier shard (and its journal entry) is already up
            done = shards[:shards.index(name)]
            assert set(done) <= before and (not done or JOURNAL_NAME in before)
    assert bucket_objects(s3, "train") == small.files  # shards, indexes, manifest; no journal
    assert m.num_samples == small.manifest.num_samples and m.base_url == f"s3://{BUCKET}/train"


def _cli_env(s3: MotoS3, tmp_path) -> dict:
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("AWS_")}
    env.update(s3.env(), AWS_CONFIG_FILE=str(tmp_path / "missing-config"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "missing-credentials"))
    return env


def _pack_cli(data: Data, dest: str, env: dict, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, str(REPO / "tools" / "pack.py"), str(data.src), dest, "--workers", "1"]
    if "max_samples" in data.options:
        args += ["--max-samples", str(data.options["max_samples"])]
    return subprocess.run(args + list(extra), capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=120)


def test_pack_cli_into_s3_with_aws_variables_only(small, s3, tmp_path):
    proc = _pack_cli(small, f"s3://{BUCKET}/cli", _cli_env(s3, tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert bucket_objects(s3, "cli") == small.files


class Interrupted(RuntimeError):
    pass


def _interrupt_after(monkeypatch, n_shards: int) -> None:
    real = ShardWriter._close_shard

    def close_shard(self, consumed):
        if len(self.shards) == n_shards:
            raise Interrupted(f"killed while finishing shard {n_shards}")
        return real(self, consumed)

    monkeypatch.setattr(ShardWriter, "_close_shard", close_shard)


@pytest.mark.parametrize("how", ["library", "cli"])
def test_resume_against_the_bucket_gives_the_same_bytes(small, s3, monkeypatch, tmp_path, how):
    dest = f"s3://{BUCKET}/resumed"
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 2)
        with pytest.raises(Interrupted):
            pack(small.src, dest, storage_options=s3.storage_options(), **small.options)
    left = bucket_objects(s3, "resumed")
    assert MANIFEST_PATH not in left and JOURNAL_NAME in left
    assert {n for n in left if n.endswith(".tar")} == set(small.shard_urls()[:2])
    with pytest.raises(DestinationError, match="unfinished"):  # not without --resume
        pack(small.src, dest, storage_options=s3.storage_options(), **small.options)

    if how == "library":
        log = _record_uploads(monkeypatch, s3, "resumed")
        m = pack(small.src, dest, storage_options=s3.storage_options(), resume=True,
                 **small.options)
        assert m.stats["resumed_shards"] == 2
        uploaded = [name for name, _ in log if name.endswith(".tar")]
        assert uploaded == small.shard_urls()[2:]  # the first two were not uploaded again
    else:
        proc = _pack_cli(small, dest, _cli_env(s3, tmp_path), "--resume")
        assert proc.returncode == 0, proc.stderr
        assert "2 shards reused" in proc.stdout
    assert bucket_objects(s3, "resumed") == small.files


def test_packing_into_a_prefix_holding_another_dataset_is_refused(small, s3):
    dest = f"s3://{BUCKET}/taken"
    pack(small.src, dest, storage_options=s3.storage_options(), **small.options)
    before = bucket_objects(s3, "taken")
    for kw in (dict(max_samples=4), dict(max_samples=4, resume=True), dict(seed=1)):
        with pytest.raises(DestinationError, match="different dataset|different files"):
            pack(small.src, dest, storage_options=s3.storage_options(), **kw)
    assert bucket_objects(s3, "taken") == before
