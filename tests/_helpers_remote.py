"""Shared by the storage and cache tests: packed datasets, the real servers on 127.0.0.1 and the
local reference read.

moto's S3 in server mode, and ``FaultyHTTPServer`` serving a dataset folder, both over plain HTTP
and as an S3 endpoint (it answers ``GET /bucket/key`` with ``root/bucket/key``, which is all a
range GetObject needs), so every fault is tried through aiohttp (http://) and through
s3fs/botocore (s3://). Every remote read is compared with the local read of the same dataset.
Test modules import the fixtures they use by name.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("aiohttp")
pytest.importorskip("flask", reason="moto server mode needs moto[server] (flask, flask-cors)")

import shardkit  # noqa: E402
from shardkit import StreamingDataset, make_loader  # noqa: E402
from shardkit.shardformat import decode_index  # noqa: E402

from _helpers_read import image_folder, pack  # noqa: E402
from servers import FaultyHTTPServer, MotoS3  # noqa: E402

BUCKET = "shards"
LOADER_TIMEOUT = 60  # seconds a DataLoader may wait for one item before the test fails
FAST = dict(timeout=2.0, retries=2)  # for servers that misbehave on purpose


# --------------------------------------------------------------------------- data


class Data:
    """A packed dataset: its source folder, pack options, local copy and reference read."""

    def __init__(self, src: Path, local: Path, options: dict):
        self.src, self.local, self.options = src, local, options
        self.manifest = shardkit.Manifest.load(local)
        self.files = {p.relative_to(local).as_posix(): p.read_bytes()
                      for p in sorted(local.rglob("*")) if p.is_file()}

    def offsets(self, shard_no: int):
        s = self.manifest.shards[shard_no]
        return decode_index(self.files[s.index_url], s.num_samples, s.num_bytes, s.index_url)

    def shard_urls(self) -> list[str]:
        return [s.url for s in self.manifest.shards]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Data:
    """24 small JPEGs in 5 shards (max_samples=5)."""
    root = tmp_path_factory.mktemp("small")
    src = image_folder(root / "src", classes=3, per_class=8, size=(48, 40))
    options = dict(max_samples=5)
    pack(src, root / "local", **options)
    return Data(src, root / "local", options)


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Data:
    """120 tensor-mode samples (128x128x3 uint8, ~50 KB each) in 2 shards of ~3 MB."""
    root = tmp_path_factory.mktemp("big")
    src = image_folder(root / "src", classes=2, per_class=60, size=(48, 40))
    options = dict(mode="tensor", size=128, max_samples=60)
    pack(src, root / "local", **options)
    data = Data(src, root / "local", options)
    assert all(s.num_bytes > 2_500_000 for s in data.manifest.shards)
    return data


def read_all(source, num_workers: int = 0, **kw) -> list[tuple[str, bytes, int]]:
    """``(key, raw image bytes, label)`` of one epoch, through make_loader when num_workers > 0."""
    kw.setdefault("seed", 7)
    ds = StreamingDataset(source, decode="raw", with_keys=True, **kw)
    if num_workers == 0:
        items = list(ds)
    else:
        items = list(make_loader(ds, num_workers=num_workers, persistent_workers=False,
                                 timeout=LOADER_TIMEOUT))
    return [(key, bytes(image), int(label)) for image, label, key in items]


def check_same(got, want) -> None:
    """Exactly the same samples in the same order; on failure, say what was lost or duplicated."""
    keys = [k for k, _, _ in got]
    dup = {k: n for k, n in Counter(keys).items() if n > 1}
    lost = {k for k, _, _ in want} - set(keys)
    assert not dup and not lost, f"duplicated {dup}, lost {sorted(lost)}"
    assert keys == [k for k, _, _ in want], "same samples, different order"
    assert got == want, "same keys, different bytes or labels"


@pytest.fixture(scope="module")
def reference(small, big):
    """The local read of a dataset with the same arguments: what every remote read must give."""
    cache: dict = {}

    def ref(data: Data, **kw):
        key = (id(data), tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = read_all(data.local, **kw)
        return cache[key]

    return ref


# --------------------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def moto_server():
    with MotoS3() as s3:
        yield s3


@pytest.fixture
def s3(moto_server) -> MotoS3:
    moto_server.reset()
    moto_server.make_bucket(BUCKET)
    return moto_server


def clean_aws_env(monkeypatch, tmp_path) -> None:
    """No AWS configuration from this machine: no profile, no files, no endpoint."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "missing-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "missing-aws-credentials"))


@pytest.fixture
def aws_env(s3, monkeypatch, tmp_path) -> MotoS3:
    """moto reachable through the standard AWS variables only."""
    clean_aws_env(monkeypatch, tmp_path)
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    return s3


def upload(s3: MotoS3, data: Data, prefix: str) -> str:
    for name, blob in data.files.items():
        s3.put(BUCKET, f"{prefix}/{name}", blob)
    return f"s3://{BUCKET}/{prefix}"


def bucket_objects(s3: MotoS3, prefix: str) -> dict[str, bytes]:
    client = s3.client()
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/").get("Contents", [])
    return {o["Key"][len(prefix) + 1:]:
            client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read() for o in listing}


class Served:
    """A FaultyHTTPServer over a copy of a dataset at ``/<BUCKET>/ds/``: as http:// and as s3://."""

    def __init__(self, srv: FaultyHTTPServer, data: Data):
        self.srv, self.data = srv, data
        self.folder = srv.root / BUCKET / "ds"

    def source(self, proto: str) -> tuple[str, dict | None]:
        if proto == "http":
            return f"{self.srv.url}{BUCKET}/ds/", None
        return f"s3://{BUCKET}/ds", {
            "key": "testing", "secret": "testing",
            "client_kwargs": {"endpoint_url": self.srv.url.rstrip("/"), "region_name": "us-east-1"}}

    def path(self, name: str) -> str:
        return f"/{BUCKET}/ds/{name}"

    def gets(self, name: str) -> list[str | None]:
        """Range headers of the GETs of one file, in order."""
        return [rng for method, path, rng in self.srv.requests
                if method == "GET" and urlsplit(path).path == self.path(name)]

    def bytes_asked(self, name: str) -> int:
        total = 0
        for rng in self.gets(name):
            if rng is None:
                total += len(self.data.files[name])
            else:
                a, b = rng.split("=")[1].split("-")
                total += min(int(b) + 1, len(self.data.files[name])) - int(a)
        return total


def serve(tmp_path, data: Data):
    root = tmp_path / "www"
    shutil.copytree(data.local, root / BUCKET / "ds")
    return FaultyHTTPServer(root)


@pytest.fixture
def served(tmp_path, small):
    with serve(tmp_path, small) as srv:
        yield Served(srv, small)


@pytest.fixture
def served_big(tmp_path, big):
    with serve(tmp_path, big) as srv:
        yield Served(srv, big)


PROTOS = ["http", "s3"]
