"""Remote stores (``storage.remote``) end to end: reading from s3:// and http(s)://, streaming,
faults, safety.

Real servers on 127.0.0.1 only (tests/servers.py, through ``_helpers_remote``). Every read is
compared with the local read of the same dataset: exactly the same keys, bytes and order, nothing
lost or duplicated. Every wait is bounded: DataLoader ``timeout=``, subprocess ``timeout=``, small
``timeout``/``retries`` on the dataset where a server misbehaves on purpose.
"""

from __future__ import annotations

import json
import logging
import time
import traceback

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("aiohttp")
pytest.importorskip("flask", reason="moto server mode needs moto[server] (flask, flask-cors)")

import shardkit  # noqa: E402
from shardkit import (  # noqa: E402
    StreamingDataset,
    make_loader,
    reader,  # noqa: E402
)
from shardkit.errors import ManifestError, ShardError  # noqa: E402
from shardkit.shardformat import MANIFEST_PATH  # noqa: E402

from _helpers_read import pack, shard_samples  # noqa: E402
from _helpers_remote import (  # noqa: E402  # noqa: E402, F401 - fixtures
    BUCKET,
    FAST,
    LOADER_TIMEOUT,
    PROTOS,
    aws_env,
    big,
    bucket_objects,
    check_same,
    clean_aws_env,
    moto_server,
    read_all,
    reference,
    s3,
    served,
    served_big,
    small,
    upload,
)
from servers import server_down_url  # noqa: E402

# --------------------------------------------------------------------------- 2: reading


@pytest.mark.parametrize("num_workers", [0, 2])
def test_s3_http_and_local_reads_agree(small, aws_env, served, reference, num_workers):
    want = reference(small, num_workers=num_workers)  # the local read with as many workers
    assert sorted(k for k, _, _ in want) == sorted(
        k for k, _, _ in read_all(small.local, shuffle=False))  # every sample once
    sources = [upload(aws_env, small, "ds"),                       # endpoint + keys from env only
               served.source("http")[0],                          # folder URL
               served.source("http")[0] + MANIFEST_PATH]          # manifest URL
    for source in sources:
        check_same(read_all(source, num_workers), want)
    # the same seed gives the same order on every backend; another seed another order
    other = read_all(sources[0], num_workers, seed=8)
    assert sorted(other) == sorted(want) and other != want
    if num_workers:  # workers forked after the parent has used the store itself
        ds = StreamingDataset(sources[0], decode="raw", with_keys=True, seed=7)
        assert len(list(ds)) == len(want)
        ds.set_epoch(0)  # the same epoch again
        items = list(make_loader(ds, num_workers=num_workers, persistent_workers=False,
                                 timeout=LOADER_TIMEOUT))
        check_same([(k, bytes(x), int(y)) for x, y, k in items], want)


def test_storage_options_override_the_environment(small, s3, monkeypatch, tmp_path, reference):
    source = upload(s3, small, "ds")
    clean_aws_env(monkeypatch, tmp_path)
    with server_down_url() as down:  # the environment points at nothing
        monkeypatch.setenv("AWS_ENDPOINT_URL", down.rstrip("/"))
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-env")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "from-env")
        with pytest.raises(ManifestError, match=f"s3://{BUCKET}/ds/.shardkit/manifest.json"):
            read_all(source, **FAST)
        check_same(read_all(source, storage_options=s3.storage_options()), reference(small))


# --------------------------------------------------------------------------- 3: streaming


@pytest.mark.parametrize("cache", [False, True], ids=["direct", "cache"])
def test_first_sample_arrives_before_the_shard_has_been_sent(big, served_big, reference, tmp_path,
                                                              cache):
    srv = served_big.srv
    source, _ = served_big.source("http")
    ds = StreamingDataset(source, decode="raw", with_keys=True, shuffle=False,
                          cache_dir=tmp_path / "cache" if cache else None)
    ds.manifest  # noqa: B018 - loaded before the delay
    size = big.manifest.shards[0].num_bytes
    srv.delay(0.05, chunk=64 << 10)  # ~1.3 MB/s: the shard takes ~2.4 s to send
    it = iter(ds)
    first = next(it)
    sent = srv.bytes_sent
    srv.delay(0)
    rest = list(it)
    # with a cache, the next span's shard downloads alongside (as slowly): count both
    assert sent < (1.2 if cache else 0.6) * size, f"{sent} of {size} bytes sent before a sample"
    got = [(k, bytes(x), int(y)) for x, y, k in [first] + rest]
    check_same(got, reference(big, shuffle=False))


def test_a_cold_start_asks_for_its_own_shard_before_the_next_ones(small, served, reference,
                                                                  tmp_path):
    """The first span's index and bytes are asked for first: the next spans' downloads start
    once its first sample is in (started before, they shared the bandwidth with it)."""
    srv = served.srv
    source, _ = served.source("http")
    ds = StreamingDataset(source, decode="raw", with_keys=True, shuffle=False,
                          cache_dir=tmp_path / "cache")
    ds.manifest  # noqa: B018
    shards = [s.url for s in small.manifest.shards]
    got = [(k, bytes(x), int(y)) for x, y, k in ds]
    check_same(got, reference(small, shuffle=False))
    gets = [path.rsplit("/", 1)[-1] for method, path, _ in srv.requests if method == "GET"]
    tars = [g for g in gets if g.endswith(".tar")]
    assert tars[0] == shards[0] and set(tars) == set(shards)
    own_index = shards[0].replace(".tar", ".idx")
    first_other = gets.index(next(t for t in tars if t != shards[0]))
    assert gets.index(own_index) < gets.index(shards[0]) < first_other


@pytest.mark.parametrize("proto", PROTOS)
def test_resume_mid_shard_is_a_range_request_at_the_sample_offset(big, served_big, reference,
                                                                   proto):
    source, options = served_big.source(proto)
    k = 45
    kw = dict(decode="raw", with_keys=True, shuffle=False, storage_options=options)
    ds = StreamingDataset(source, **kw)
    it = iter(ds)
    head = [next(it) for _ in range(k)]
    state = ds.state_dict()
    del it
    served_big.srv.clear_counters()
    resumed = StreamingDataset(source, **kw)
    resumed.load_state_dict(state)
    rest = list(resumed)
    got = [(key, bytes(x), int(y)) for x, y, key in head + rest]
    check_same(got, reference(big, shuffle=False))
    shard0 = big.manifest.shards[0]
    offset = int(big.offsets(0)[k])
    gets = served_big.gets(shard0.url)
    assert gets and gets[0].startswith(f"bytes={offset}-"), gets
    assert served_big.bytes_asked(shard0.url) == shard0.num_bytes - offset  # nothing before it


# --------------------------------------------------------------------------- 4: faults


def _after_first_index(monkeypatch, action) -> None:
    """Run ``action()`` once, when the first index file has been read (next GET: shard bytes)."""
    real = reader.load_index
    pending = [action]

    def index(store, shard, read=None):
        offsets = real(store, shard, read)
        while pending:
            pending.pop()()
        return offsets

    monkeypatch.setattr(reader, "load_index", index)


@pytest.mark.parametrize("proto", PROTOS)
def test_connections_dropped_mid_shard(big, served_big, reference, proto):
    source, options = served_big.source(proto)
    srv = served_big.srv
    srv.drop_after(200_000, times=5)
    got = read_all(source, storage_options=options)
    check_same(got, reference(big))
    # one streamed GET per shard without faults; each drop costs one more, from the right byte
    tar_gets = sum(len(served_big.gets(url)) for url in big.shard_urls())
    assert tar_gets >= len(big.shard_urls()) + 3, "the drops did not hit the shards"


def test_connections_reset_mid_shard_with_workers(small, served, reference):
    source, _ = served.source("http")
    served.srv.drop_after(3000, times=5, reset=True)
    check_same(read_all(source, 2), reference(small, num_workers=2))


@pytest.mark.parametrize("proto", PROTOS)
def test_bursts_of_server_errors(small, served, reference, proto, monkeypatch):
    source, options = served.source(proto)
    srv = served.srv
    read_all(source, storage_options=options)
    clean = len(srv.requests)  # requests of a read without faults (s3fs adds HEADs)
    srv.clear_counters()
    srv.fail(503, times=3)  # the manifest's requests
    _after_first_index(monkeypatch, lambda: srv.fail(500, times=3))  # then the first shard's
    check_same(read_all(source, storage_options=options), reference(small))
    assert len(srv.requests) == clean + 6  # each failed request was retried once
    assert sum(len(served.gets(url)) for url in small.shard_urls()) == len(small.shard_urls()) + 3


@pytest.mark.parametrize("proto", PROTOS)
def test_slow_server_still_completes(small, served, reference, proto):
    source, options = served.source(proto)
    served.srv.delay(0.005, chunk=4096)
    check_same(read_all(source, storage_options=options), reference(small))


@pytest.mark.parametrize("proto", PROTOS)
def test_stalled_server_is_an_error_naming_the_url(small, served, proto, monkeypatch):
    source, options = served.source(proto)
    ds = StreamingDataset(source, decode="raw", shuffle=False, storage_options=options, timeout=1,
                          retries=1)
    _after_first_index(monkeypatch, served.srv.stall)  # every GET: headers, then silence
    t = time.monotonic()
    with pytest.raises(ShardError) as info:
        list(ds)
    elapsed = time.monotonic() - t
    assert elapsed < 15, f"took {elapsed:.1f} s"
    assert "after 2 tries" in str(info.value)
    assert str(info.value).startswith(f"{source.rstrip('/')}/{small.shard_urls()[0]}: "), info.value


def test_stalled_manifest_read_is_bounded_too(small, served):
    source, _ = served.source("http")
    served.srv.stall(before_headers=True)
    t = time.monotonic()
    with pytest.raises(ManifestError, match=f"{source}{MANIFEST_PATH}"):
        StreamingDataset(source, timeout=1, retries=1).manifest  # noqa: B018
    assert time.monotonic() - t < 15


@pytest.mark.parametrize("proto", PROTOS)
def test_server_that_stops_answering_gives_up_after_the_retries(small, served, proto,
                                                                 monkeypatch):
    source, options = served.source(proto)
    ds = StreamingDataset(source, decode="raw", shuffle=False, storage_options=options, **FAST)

    def stop():
        served.srv.fail(503, times=1000)
        served.srv.clear_counters()

    _after_first_index(monkeypatch, stop)
    with pytest.raises(ShardError) as info:
        list(ds)
    first = small.shard_urls()[0]
    assert str(info.value).startswith(f"{source.rstrip('/')}/{first}: ")
    assert "after 3 tries" in str(info.value)
    assert len(served.gets(first)) == 3  # retries=2: three GETs, then the error


def test_a_store_tries_once_even_with_no_retries_left(small, served):
    from shardkit.storage import open_store, split_source

    served.srv.fail(503, times=1000)
    source, _ = served.source("http")
    protocol, base, _ = split_source(source)
    store = open_store(protocol, base, None, timeout=2.0, retries=-1)
    with pytest.raises(ShardError, match="503"):
        store.read_bytes("missing-anyway.bin")
    assert len(served.srv.requests) == 1


@pytest.mark.parametrize("proto", PROTOS)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_shard_failing_past_its_retries_costs_only_its_samples_in_skip_mode(
        small, served, reference, proto, num_workers, caplog):
    source, options = served.source(proto)
    bad = small.shard_urls()[1]
    served.srv.fail(503, times=-1, path=bad)  # every GET of that shard, for good
    ds = StreamingDataset(source, decode="raw", with_keys=True, seed=7, on_error="skip",
                          storage_options=options, **FAST)
    with caplog.at_level(logging.WARNING, logger="shardkit"):
        got = read_all_of(ds, num_workers)
    lost = {k for k, _ in shard_samples(small.local / bad)}
    want = [k for k, _, _ in reference(small, seed=7)]
    assert {k for k, _, _ in got} == set(want) - lost and len(got) == len(want)
    assert ds.skipped == len(lost)
    (entry,) = ds.bad_shards
    assert entry["url"].endswith(bad) and "failed after 3 tries" in entry["reason"]
    assert entry["samples_lost"] == len(lost)
    assert caplog.text.count(f"bad shard {entry['url']}") == 1


def read_all_of(ds, num_workers: int) -> list[tuple[str, bytes, int]]:
    items = list(ds) if num_workers == 0 else list(make_loader(
        ds, num_workers=num_workers, persistent_workers=False, timeout=LOADER_TIMEOUT))
    return [(key, bytes(image), int(label)) for image, label, key in items]


@pytest.mark.parametrize("proto", PROTOS)
def test_server_ignoring_range_requests_is_a_clear_error_not_wrong_bytes(big, served_big, proto,
                                                                         monkeypatch):
    source, options = served_big.source(proto)
    ds = StreamingDataset(source, decode="raw", shuffle=False, storage_options=options)
    _after_first_index(monkeypatch, served_big.srv.ignore_range)  # 3 MB back for a 1 MB range
    with pytest.raises(ShardError, match="Range") as info:
        list(ds)
    assert str(info.value).startswith(f"{source.rstrip('/')}/{big.shard_urls()[0]}: ")
    assert len(served_big.gets(big.shard_urls()[0])) == 1  # not retried: it would not help


@pytest.mark.parametrize("proto", PROTOS)
def test_server_down_at_start_is_a_manifest_error(proto):
    with server_down_url() as url:
        if proto == "http":
            source, options, where = url + "ds/", None, url + "ds/" + MANIFEST_PATH
        else:
            source = f"s3://{BUCKET}/ds"
            options = {"key": "k", "secret": "s",
                       "client_kwargs": {"endpoint_url": url.rstrip("/")}}
            where = f"{source}/{MANIFEST_PATH}"
        t = time.monotonic()
        with pytest.raises(ManifestError) as info:
            list(StreamingDataset(source, storage_options=options, **FAST))
        assert time.monotonic() - t < 10
    assert str(info.value).startswith(where + ": cannot read the manifest")



# --------------------------------------------------------------------------- 6: safety


@pytest.mark.parametrize("bad_url", ["../other/shard-000000.tar", "/etc/passwd",
                                     "http://evil/x.tar"])
@pytest.mark.parametrize("proto", ["http", "s3"])
def test_manifest_pointing_outside_the_dataset_is_refused(small, s3, served, bad_url, proto):
    doc = json.loads(small.files[MANIFEST_PATH])
    doc["shards"][1]["url"] = bad_url
    text = json.dumps(doc).encode()
    if proto == "http":
        (served.folder / MANIFEST_PATH).write_bytes(text)
        source, options = served.source("http")
    else:
        upload(s3, small, "evil")
        s3.put(BUCKET, f"evil/{MANIFEST_PATH}", text)
        source, options = f"s3://{BUCKET}/evil", s3.storage_options()
    with pytest.raises(ManifestError, match="not a plain relative name"):
        shardkit.Manifest.load(source, storage_options=options)
    served.srv.clear_counters()
    with pytest.raises(ManifestError):
        list(StreamingDataset(source, storage_options=options))
    assert not [r for r in served.srv.requests if "etc" in r[1] or "other" in r[1]]


KEY, SECRET = "AKIDSECRET123", "SECRETSECRET456"


def _no_secrets(exc: BaseException, *texts: str) -> None:
    shown = [str(exc), repr(exc), "".join(traceback.format_exception(exc)), *texts]
    for text in shown:
        assert KEY not in text and SECRET not in text, text


def test_credentials_never_appear_in_errors_logs_or_the_manifest(small, s3, caplog, tmp_path):
    caplog.set_level(logging.DEBUG, logger="shardkit")
    caplog.set_level(logging.INFO)
    options = {"key": KEY, "secret": SECRET,
               "client_kwargs": {"endpoint_url": s3.endpoint_url, "region_name": "us-east-1"}}
    pack(small.src, f"s3://{BUCKET}/secret", storage_options=options, **small.options)
    for name, blob in bucket_objects(s3, "secret").items():
        assert KEY.encode() not in blob and SECRET.encode() not in blob, name

    # a bucket that does not exist
    with pytest.raises(ManifestError) as info:
        list(StreamingDataset("s3://no-such-bucket/ds", storage_options=options, **FAST))
    _no_secrets(info.value, caplog.text)
    # a shard read that fails: the object went away after the manifest was read
    ds = StreamingDataset(f"s3://{BUCKET}/secret", storage_options=options, shuffle=False, **FAST)
    ds.manifest  # noqa: B018
    s3.client().delete_object(Bucket=BUCKET, Key=f"secret/{small.shard_urls()[0]}")
    with pytest.raises(ShardError) as info:
        list(ds)
    _no_secrets(info.value, caplog.text)
    # a server that went away
    with server_down_url() as down:
        options["client_kwargs"]["endpoint_url"] = down.rstrip("/")
        with pytest.raises(ManifestError) as info:
            list(StreamingDataset(f"s3://{BUCKET}/secret", storage_options=options, **FAST))
    _no_secrets(info.value, caplog.text)
    assert "s3://shards/secret/.shardkit/manifest.json" in str(info.value)


def test_http_user_and_password_are_redacted(small, served, caplog):
    caplog.set_level(logging.DEBUG, logger="shardkit")
    url = served.srv.url.replace("http://", "http://alice:pa55word@") + f"{BUCKET}/ds/"
    check_same(read_all(url, shuffle=False), read_all(small.local, shuffle=False))
    ds = StreamingDataset(url, decode="raw", shuffle=False, **FAST)
    assert "pa55word" not in ds.manifest.base_url and "alice" not in ds.manifest.base_url
    served.srv.fail(503, times=1000)
    with pytest.raises(ShardError) as info:
        list(ds)
    with pytest.raises(ManifestError) as info2:
        StreamingDataset(url, **FAST).manifest  # noqa: B018
    for exc in (info.value, info2.value):
        shown = [str(exc), repr(exc), "".join(traceback.format_exception(exc)), caplog.text]
        assert not any("pa55word" in t or "alice" in t for t in shown), shown
        assert f"{served.srv.url}{BUCKET}/ds/" in str(exc)


def test_a_remote_stream_closed_by_the_garbage_collector_never_deadlocks():
    """An unclosed remote stream is closed when the GC collects it, which may happen inside
    another thread pool's ``submit`` (a 3 a.m. hang the suite once met: the finalizer's close
    waited for ``concurrent.futures``' global lock, held by the ``submit`` it interrupted).
    Closing must take no lock another thread can hold, and must still drop the GET."""
    import concurrent.futures.thread as cft
    import gc
    import threading

    from shardkit.storage.remote import ChunkedReader

    closed = threading.Event()

    class Pieces:
        def iter_bytes(self, name, start, stop, chunk):
            try:
                for pos in range(start, stop, chunk):
                    yield bytes(min(chunk, stop - pos))
            finally:
                closed.set()

    reader = ChunkedReader(Pieces(), "x", 0, 10 << 20, piece=1 << 16, ahead=4)
    assert len(reader.read(100)) == 100
    with cft._global_shutdown_lock:  # as inside any executor's submit
        t = threading.Thread(target=reader.close, daemon=True)
        t.start()
        t.join(10)
        assert not t.is_alive(), "close() waited for a lock its caller may hold"
    assert closed.wait(10)  # the generator (the GET) was closed by the helper thread
    # and a reader nobody closed goes away with the GC, its helper thread with it
    before = threading.active_count()
    reader = ChunkedReader(Pieces(), "x", 0, 1 << 20, piece=1 << 16)
    reader.read(10)
    del reader
    gc.collect()
    for _ in range(100):
        if threading.active_count() < before + 1:
            break
        threading.Event().wait(0.05)
    assert threading.active_count() <= before


def test_a_forked_worker_leaves_the_parents_s3_session_alone(small, aws_env):
    """A worker forked after the parent read the manifest makes its own filesystem. The parent's,
    inherited, is never collected there: s3fs's finalizer would close its session on the
    parent's event loop, which has no thread in the child (each waited ~1 s: a DataLoader worker
    stalled 2 s in its first span)."""
    import gc
    import multiprocessing

    source = upload(aws_env, small, "forked")
    ds = StreamingDataset(source)
    store = ds.manifest.store  # read: the parent's filesystem has a session (and a finalizer)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()

    def child() -> None:
        import s3fs.core

        closing = []  # what s3fs's finalizer asks of the (parent's) event loop
        s3fs.core.sync = lambda *a, **k: closing.append(a)
        assert store.fs is not None  # this process's own filesystem; the parent's is let go
        gc.collect()
        out.put(len(closing))

    proc = ctx.Process(target=child)
    proc.start()
    try:
        assert out.get(timeout=60) == 0
    finally:
        proc.join(60)


def test_workers_get_the_manifest_from_the_loader_not_each_its_own(small, served, reference):
    """make_loader reads the manifest once, before the workers fork: a worker would otherwise
    GET it (and import its storage library) before its first batch, every epoch."""
    srv = served.srv
    source, _ = served.source("http")
    loader = make_loader(StreamingDataset(source, decode="raw", with_keys=True, shuffle=False,
                                          batch_size=None),
                         num_workers=2, persistent_workers=False, timeout=LOADER_TIMEOUT)
    got = [(k, bytes(x), int(y)) for x, y, k in loader]
    assert sorted(got) == sorted(reference(small, shuffle=False))  # (workers interleave)
    manifest_gets = [p for m, p, _ in srv.requests if m == "GET" and p.endswith(MANIFEST_PATH)]
    assert len(manifest_gets) == 1


def test_s3_clients_share_botocore_s_parsed_data_but_not_their_sessions():
    from shardkit.storage import remote

    a, b = remote._botocore_session(), remote._botocore_session()
    assert a is not b and a.get_component("data_loader") is b.get_component("data_loader")
    assert remote._session_options({"key": "k", "secret": "s", "client_kwargs": {},
                                    "skip_instance_cache": True, "anon": False}) == {}
    assert remote._session_options({"profile": "p"}) == {"profile": "p"}  # s3fs makes its own
