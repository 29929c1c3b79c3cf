"""The test servers behave like the real thing, and the clients fail the way the retry code expects.

The exception tests double as a record of what fsspec/aiohttp/s3fs/botocore raise for each fault
(dropped body, error status, stall, refused connection): ``shardkit.storage`` classifies exactly
these, so a dependency upgrade that changes them shows up here first.
"""

from __future__ import annotations

import errno
import http.client
import threading
import time
import urllib.error
import urllib.request

import pytest

from servers import HOST, FaultyHTTPServer, MotoS3, free_port, server_down_url

aiohttp = pytest.importorskip("aiohttp")
fsspec = pytest.importorskip("fsspec")

DATA = bytes(range(256)) * 1024  # 256 KiB, every offset distinguishable mod 256


def _server_threads():
    return {t for t in threading.enumerate() if t.name.startswith("faulty-http")}


@pytest.fixture
def http_server():
    before = _server_threads()
    with FaultyHTTPServer() as srv:
        srv.put("data/a.bin", DATA)
        yield srv
    leaked = {t for t in _server_threads() - before if t.is_alive()}
    assert not leaked, f"FaultyHTTPServer left threads running: {sorted(t.name for t in leaked)}"


@pytest.fixture
def httpfs():
    """fsspec's HTTP filesystem with a 1 s read timeout, so a stalled server fails fast."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=2, sock_read=1)
    return fsspec.filesystem("http", skip_instance_cache=True, client_kwargs={"timeout": timeout})


@pytest.fixture(scope="module")
def moto_s3():
    pytest.importorskip("s3fs")
    pytest.importorskip("flask", reason="moto server mode needs moto[server] (flask, flask-cors)")
    with MotoS3() as s3:
        yield s3


@pytest.fixture
def s3(moto_s3):
    moto_s3.reset()
    return moto_s3


def _get(url, headers=None, method="GET", timeout=5):
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        exc.close()  # status and headers stay readable; the socket is released
        raise


def _s3fs(**options):
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    return fs


# --------------------------------------------------------------------------- ports


def test_free_port_is_bindable_on_loopback():
    port = free_port()
    assert 0 < port < 65536
    import socket

    with socket.socket() as s:
        s.bind((HOST, port))


def test_server_down_url_refuses_quickly(httpfs):
    with server_down_url() as url:
        assert url.startswith(f"http://{HOST}:") and url.endswith("/")
        t = time.monotonic()
        with pytest.raises(urllib.error.URLError) as info:
            _get(url + "x", timeout=5)
        assert isinstance(info.value.reason, ConnectionRefusedError)
        # aiohttp: ClientConnectorError (an OSError) wrapping ConnectionRefusedError
        with pytest.raises(aiohttp.ClientConnectorError) as info:
            httpfs.cat_file(url + "x")
        assert isinstance(info.value.os_error, ConnectionRefusedError)
        assert isinstance(info.value, OSError)
        assert time.monotonic() - t < 2


# --------------------------------------------------------------------------- moto S3


def test_moto_put_get_with_storage_options(s3):
    assert s3.endpoint_url.startswith(f"http://{HOST}:")
    s3.make_bucket("shards")
    fs = _s3fs(**s3.storage_options())
    fs.pipe_file("shards/train/a.bin", DATA)
    assert fs.cat_file("s3://shards/train/a.bin") == DATA
    assert fs.ls("shards/train") == ["shards/train/a.bin"]
    assert fs.info("shards/train/a.bin")["size"] == len(DATA)
    # the same object through plain boto3
    body = s3.client().get_object(Bucket="shards", Key="train/a.bin")["Body"].read()
    assert body == DATA


def test_moto_reset_forgets_buckets(s3):
    s3.make_bucket("gone-soon")
    s3.reset()
    assert s3.client().list_buckets()["Buckets"] == []


def test_moto_env_variables_alone_are_enough(s3, monkeypatch, tmp_path):
    """botocore (>= 1.31) reads AWS_ENDPOINT_URL itself: s3fs needs no endpoint argument."""
    s3.make_bucket("from-env")
    s3.put("from-env", "k.bin", DATA)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    assert set(s3.env()) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
                             "AWS_DEFAULT_REGION"}

    fs = _s3fs()  # skip_instance_cache: the instance cache key ignores the environment
    assert fs.cat_file("from-env/k.bin", start=3, end=7) == DATA[3:7]
    assert fs.s3._endpoint.host == s3.endpoint_url


def test_moto_range_get(s3):
    s3.make_bucket("ranges")
    fs = _s3fs(**s3.storage_options())
    fs.pipe_file("ranges/a.bin", DATA)
    # start/end must be keywords: s3fs's _cat_file(path, version_id, start, end)
    assert fs.cat_file("ranges/a.bin", start=1000, end=1010) == DATA[1000:1010]
    assert fs.cat_file("ranges/a.bin", start=len(DATA) - 5) == DATA[-5:]
    assert fs.cat_file("ranges/a.bin", start=-7) == DATA[-7:]
    assert fs.cat_file("ranges/a.bin", start=len(DATA) - 3, end=len(DATA) + 100) == DATA[-3:]
    # past the end: S3 InvalidRange becomes OSError(EINVAL), not a 4xx with a status attribute
    with pytest.raises(OSError) as info:
        fs.cat_file("ranges/a.bin", start=len(DATA) + 10, end=len(DATA) + 20)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(FileNotFoundError):
        fs.cat_file("ranges/missing.bin", start=0, end=1)


_FORK = {}  # set in the parent before the workers fork, read in the workers


def _read_in_worker(index):
    """Runs in a forked DataLoader worker."""
    import os

    import torch

    try:  # an fsspec async filesystem used in the parent refuses to run in a child
        _FORK["parent_fs"].cat_file(f"fork-test/{index}.bin", start=1, end=4)
        inherited = "worked"
    except RuntimeError as exc:
        inherited = str(exc)
    if _FORK.get("pid") != os.getpid():  # a fresh one per worker, from the same options
        _FORK["fs"], _FORK["pid"] = _s3fs(**_FORK["options"]), os.getpid()
    data = _FORK["fs"].cat_file(f"fork-test/{index}.bin", start=1, end=4)
    return index, torch.utils.data.get_worker_info().id, data, inherited


def test_moto_reachable_from_forked_dataloader_workers(s3):
    torch = pytest.importorskip("torch")
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    s3.make_bucket("fork-test")
    fs = _s3fs(**s3.storage_options())
    for i in range(4):
        fs.pipe_file(f"fork-test/{i}.bin", bytes([i]) * 8)
    assert fs.cat_file("fork-test/0.bin") == bytes(8)  # parent's loop and session are live
    _FORK.update(parent_fs=fs, options=s3.storage_options())
    try:
        loader = torch.utils.data.DataLoader(
            list(range(4)), batch_size=None, num_workers=2, multiprocessing_context="fork",
            collate_fn=_read_in_worker, timeout=20)
        got = sorted(loader, key=lambda r: r[0])
    finally:
        _FORK.clear()
    assert [(i, data) for i, _, data, _ in got] == [(i, bytes([i]) * 3) for i in range(4)]
    assert {worker for _, worker, _, _ in got} == {0, 1}
    assert {inherited for *_, inherited in got} == {"This class is not fork-safe"}
    assert fs.cat_file("fork-test/1.bin") == bytes([1]) * 8  # the parent's copy still works


# --------------------------------------------------------------------------- HTTP basics


def test_http_full_get_and_head(http_server):
    url = http_server.url_for("data/a.bin")
    assert http_server.url == f"http://{HOST}:{http_server.port}/"
    status, headers, body = _get(url)
    assert (status, body) == (200, DATA)
    assert headers["Content-Length"] == str(len(DATA))
    assert headers["Accept-Ranges"] == "bytes"
    status, headers, body = _get(url, method="HEAD")
    assert (status, body, headers["Content-Length"]) == (200, b"", str(len(DATA)))
    assert http_server.requests == [("GET", "/data/a.bin", None), ("HEAD", "/data/a.bin", None)]
    assert http_server.bytes_sent == len(DATA)


def test_http_missing_and_escaping_paths_are_404(http_server):
    for path in ("nope.bin", "../etc/passwd", "%2e%2e/%2e%2e/etc/passwd"):
        with pytest.raises(urllib.error.HTTPError) as info:
            _get(http_server.url + path)
        assert info.value.code == 404


def test_http_folder_is_an_html_listing(http_server):
    status, headers, body = _get(http_server.url + "data/")
    assert status == 200 and headers["Content-Type"] == "text/html"
    assert b'<a href="a.bin">a.bin</a>' in body


def test_http_range_headers(http_server):
    url = http_server.url_for("data/a.bin")
    n = len(DATA)
    status, headers, body = _get(url, {"Range": "bytes=10-19"})
    assert (status, body) == (206, DATA[10:20])
    assert headers["Content-Range"] == f"bytes 10-19/{n}"
    assert headers["Content-Length"] == "10"
    assert _get(url, {"Range": f"bytes={n - 4}-"})[2] == DATA[-4:]
    assert _get(url, {"Range": "bytes=-6"})[2] == DATA[-6:]
    assert _get(url, {"Range": f"bytes={n - 2}-{n + 50}"})[2] == DATA[-2:]  # end clamped
    assert _get(url, {"Range": "bytes=0-1,5-6"})[:3:2] == (200, DATA)  # multi-range: ignored
    with pytest.raises(urllib.error.HTTPError) as info:
        _get(url, {"Range": f"bytes={n}-{n + 10}"})
    assert info.value.code == 416
    assert info.value.headers["Content-Range"] == f"bytes */{n}"


def test_fsspec_cat_file_sends_range_and_gets_exact_bytes(http_server, httpfs):
    url = http_server.url_for("data/a.bin")
    assert httpfs.cat_file(url, start=100, end=356) == DATA[100:356]
    assert httpfs.cat_file(url, start=-8) == DATA[-8:]
    assert httpfs.cat_file(url, start=len(DATA) - 3) == DATA[-3:]
    assert http_server.requests == [("GET", "/data/a.bin", "bytes=100-355"),
                                    ("GET", "/data/a.bin", "bytes=-8"),
                                    ("GET", "/data/a.bin", f"bytes={len(DATA) - 3}-")]
    assert http_server.bytes_sent == 256 + 8 + 3
    with pytest.raises(aiohttp.ClientResponseError) as info:  # past the end: 416, not b""
        httpfs.cat_file(url, start=len(DATA) + 1, end=len(DATA) + 5)
    assert info.value.status == 416


def test_fsspec_cat_file_returns_whole_body_when_server_ignores_range(http_server, httpfs):
    """No fallback, no error: HTTPFileSystem.cat_file hands back the full 200 body."""
    url = http_server.url_for("data/a.bin")
    http_server.ignore_range()
    assert httpfs.cat_file(url, start=10, end=20) == DATA  # caller must check the length
    assert http_server.requests == [("GET", "/data/a.bin", "bytes=10-19")]
    # the file interface refuses instead of reading from the start
    f = httpfs.open(url, block_size=1024, size=len(DATA))
    with f, pytest.raises(ValueError, match="range requests"):
        f.seek(100)
        f.read(10)


# --------------------------------------------------------------------------- HTTP faults


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
def test_drop_after_urllib_incomplete_read(http_server, reset):
    url = http_server.url_for("data/a.bin")
    http_server.drop_after(1000, times=2, reset=reset)
    for _ in range(2):
        with urllib.request.urlopen(url, timeout=5) as r:
            assert r.headers["Content-Length"] == str(len(DATA))
            with pytest.raises((http.client.IncompleteRead, ConnectionResetError)) as info:
                r.read()
        if isinstance(info.value, http.client.IncompleteRead):
            assert info.value.partial == DATA[:1000]
    assert _get(url)[2] == DATA  # times=2 used up: healthy again
    assert http_server.bytes_sent == 2000 + len(DATA)


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
def test_drop_after_aiohttp_payload_error(http_server, httpfs, reset):
    url = http_server.url_for("data/a.bin")
    http_server.drop_after(1000, reset=reset)
    with pytest.raises(aiohttp.ClientPayloadError) as info:  # not an OSError
        httpfs.cat_file(url, start=0, end=50_000)
    assert not isinstance(info.value, OSError)
    assert "received 1000 of 50000" in str(info.value)
    assert httpfs.cat_file(url, start=0, end=50_000) == DATA[:50_000]


def test_fail_then_recover(http_server, httpfs):
    url = http_server.url_for("data/a.bin")
    http_server.fail(503, times=3)
    with pytest.raises(urllib.error.HTTPError) as info:
        _get(url)
    assert (info.value.code, info.value.headers["Retry-After"]) == (503, "0")
    with pytest.raises(urllib.error.HTTPError) as info:
        _get(url, method="HEAD")
    assert info.value.code == 503
    with pytest.raises(aiohttp.ClientResponseError) as info:
        httpfs.cat_file(url, start=0, end=10)
    assert info.value.status == 503 and not isinstance(info.value, OSError)
    assert httpfs.cat_file(url, start=0, end=10) == DATA[:10]
    http_server.fail(404, times=1)
    with pytest.raises(FileNotFoundError):  # fsspec maps 404 and only 404
        httpfs.cat_file(url)
    assert [r[0] for r in http_server.requests] == ["GET", "HEAD", "GET", "GET", "GET"]


def test_delay_slows_the_body(http_server):
    url = http_server.url_for("data/a.bin")
    t = time.monotonic()
    _get(url)
    fast = time.monotonic() - t
    http_server.delay(0.1, chunk=64 * 1024)  # 4 chunks: 3 pauses
    t = time.monotonic()
    assert _get(url)[2] == DATA
    slow = time.monotonic() - t
    assert slow >= 0.3 > fast
    http_server.delay(0)
    t = time.monotonic()
    _get(url)
    assert time.monotonic() - t < 0.3


def test_stall_times_out_clients_and_stop_cuts_it(httpfs):
    fs_timeout = pytest.importorskip("fsspec.exceptions").FSTimeoutError
    srv = FaultyHTTPServer().start()
    try:
        url = srv.put("a.bin", DATA)
        srv.stall()
        t = time.monotonic()
        with urllib.request.urlopen(url, timeout=1) as r:  # headers arrive
            assert r.status == 200
            with pytest.raises(TimeoutError):
                r.read()
        # fsspec turns aiohttp's SocketTimeoutError into FSTimeoutError (a TimeoutError/OSError)
        with pytest.raises(fs_timeout) as info:
            httpfs.cat_file(url, start=0, end=100)
        assert isinstance(info.value.__cause__, aiohttp.SocketTimeoutError)
        srv.stall(before_headers=True)
        with pytest.raises(TimeoutError):
            _get(url, timeout=1)
        assert time.monotonic() - t < 6
    finally:
        t = time.monotonic()
        srv.stop()  # three stalled connections are cut, their threads joined
        assert time.monotonic() - t < 2
    assert not {t for t in _server_threads() if t.is_alive()}


# --------------------------------------------------------------------------- s3fs faults

# FaultyHTTPServer answers GET /bucket/key with the file root/bucket/key, which is all a
# range GetObject needs; so s3fs's behaviour under faults can be observed without moto.


@pytest.fixture
def faulty_s3fs(http_server):
    pytest.importorskip("s3fs")
    fs = _s3fs(key="testing", secret="testing",
               client_kwargs={"endpoint_url": http_server.url.rstrip("/"), "region_name": "us-east-1"},
               config_kwargs={"connect_timeout": 2, "read_timeout": 1,
                              "retries": {"max_attempts": 0}})  # 0 retries = 1 attempt
    fs.retries = 1  # s3fs's own retry loop (a class attribute, not a constructor argument)
    return fs


def test_s3fs_range_read_from_plain_http(http_server, faulty_s3fs):
    assert faulty_s3fs.cat_file("data/a.bin", start=5, end=9) == DATA[5:9]
    assert http_server.requests[-1] == ("GET", "/data/a.bin", "bytes=5-8")


def test_s3fs_dropped_body_raises_aiohttp_payload_error(http_server, faulty_s3fs):
    http_server.drop_after(1000)
    with pytest.raises(aiohttp.ClientPayloadError):  # raw aiohttp, neither OSError nor botocore
        faulty_s3fs.cat_file("data/a.bin", start=0, end=50_000)
    faulty_s3fs.retries = 5  # s3fs retries ClientPayloadError itself
    http_server.drop_after(1000)
    assert faulty_s3fs.cat_file("data/a.bin", start=0, end=50_000) == DATA[:50_000]


@pytest.mark.parametrize("status, err", [(503, errno.EBUSY), (500, errno.EREMOTEIO)])
def test_s3fs_5xx_becomes_oserror(http_server, faulty_s3fs, status, err):
    from botocore.exceptions import ClientError

    http_server.fail(status, times=1)
    with pytest.raises(OSError) as info:
        faulty_s3fs.cat_file("data/a.bin", start=0, end=10)
    assert type(info.value) is OSError and info.value.errno == err
    assert isinstance(info.value.__cause__, ClientError)
    status_code = info.value.__cause__.response["ResponseMetadata"]["HTTPStatusCode"]
    assert status_code == status
    assert len(http_server.requests) == 1  # max_attempts=0: botocore did not retry


def test_s3fs_403_is_permission_error(http_server, faulty_s3fs):
    http_server.fail(403, times=1)
    with pytest.raises(PermissionError):
        faulty_s3fs.cat_file("data/a.bin", start=0, end=10)


def test_s3fs_stall_is_fs_timeout(http_server, faulty_s3fs):
    from botocore.exceptions import ReadTimeoutError
    from fsspec.exceptions import FSTimeoutError

    http_server.stall(times=1)
    t = time.monotonic()
    with pytest.raises(FSTimeoutError) as info:
        faulty_s3fs.cat_file("data/a.bin", start=0, end=10)
    assert isinstance(info.value.__cause__, ReadTimeoutError)  # aiobotocore's AioReadTimeoutError
    assert time.monotonic() - t < 4


def test_s3fs_refused_is_botocore_endpoint_error():
    pytest.importorskip("s3fs")
    from botocore.exceptions import EndpointConnectionError

    with server_down_url() as url:
        fs = _s3fs(key="testing", secret="testing",
                   client_kwargs={"endpoint_url": url.rstrip("/"), "region_name": "us-east-1"},
                   config_kwargs={"retries": {"max_attempts": 0}})
        fs.retries = 1
        t = time.monotonic()
        with pytest.raises(EndpointConnectionError) as info:  # not an OSError
            fs.cat_file("bucket/key", start=0, end=10)
        assert not isinstance(info.value, OSError)
        # raised while handling aiohttp's error: __context__, not __cause__
        assert isinstance(info.value.__context__, aiohttp.ClientConnectorError)
        assert time.monotonic() - t < 2
