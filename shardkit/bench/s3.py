"""Object-storage benchmark: the same raw shards read from local disk and from a local S3 server.

moto's S3 runs as a separate process on 127.0.0.1 (``python -m moto.server``), so its CPU is not the
benchmark's and can be measured on its own (``/proc/PID/stat``). The shards are packed locally
(``mode="raw"``, reused when present), then uploaded (shards and index files, manifest last).

One run, repeats interleaved, the same train recipe everywhere (``RandomResizedCrop(224)`` + flip,
``batch_size`` batches made in ``workers`` DataLoader workers, ``persistent_workers=False``, one
full epoch each):

- ``local disk``: the local folder (page cache warm: the files were just written);
- ``s3, cold cache``: ``cache_dir`` a new empty folder each repeat (every shard downloaded once);
- ``s3, no cache``: range requests only;
- ``s3, warm cache``: a cache filled by one untimed epoch before the first repeat.

Reported per configuration (medians): samples/s, time to the first batch, CPU cores used by the
benchmark process and its workers, CPU cores used by the moto server, and the number of GET
requests moto answered (from its request log). Every epoch must yield exactly the manifest's
number of samples. Also: the S3 read limit (one sequential ``RemoteStore.iter_bytes`` pass over
every shard in this process) in MB/s, with moto's CPU during it.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ..shardformat import MANIFEST_PATH
from .loaders import _cpu_seconds, _rss_mb, proc_cpu_seconds, read_limit

BUCKET = "shardkit-bench"
PREFIX = "raw"
KEY = SECRET = "testing"
REGION = "us-east-1"
CONFIGS = ("local disk", "s3, cold cache", "s3, no cache", "s3, warm cache")


# --------------------------------------------------------------------------- the S3 server


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """``python -m moto.server`` on 127.0.0.1 at a free port, its request log in ``log_path``."""

    def __init__(self, log_path: Path):
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None
        self.endpoint_url = ""

    def start(self, timeout: float = 60.0) -> MotoServer:
        port = _free_port()
        self.endpoint_url = f"http://127.0.0.1:{port}"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, MOTO_PORT=str(port))
        with open(self.log_path, "wb") as log:  # the child keeps its own copy of the fd
            self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                          "-p", str(port)], stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}: "
                                   f"{self.log_path.read_text(errors='replace')[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=2) as r:
                    r.read()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server did not answer on {self.endpoint_url} "
                                       f"within {timeout:.0f} s") from None
                time.sleep(0.2)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)

    def get_requests(self) -> int:
        """GET requests answered so far (werkzeug logs one line per request)."""
        try:
            with open(self.log_path, "rb") as f:
                return sum(1 for line in f if b'"GET /' in line)
        except OSError:
            return 0

    def storage_options(self) -> dict:
        return {"key": KEY, "secret": SECRET,
                "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": REGION}}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=REGION,
                            aws_access_key_id=KEY, aws_secret_access_key=SECRET)

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def upload_dataset(server: MotoServer, local: Path, bucket: str = BUCKET,
                   prefix: str = PREFIX) -> str:
    """Upload a packed dataset folder (the manifest last); returns its ``s3://`` URL."""
    client = server.client()
    client.create_bucket(Bucket=bucket)
    local = Path(local)
    manifest = local / MANIFEST_PATH
    files = sorted(p for p in local.rglob("*") if p.is_file() and p != manifest
                   and not p.name.startswith("."))
    for p in files + [manifest]:
        client.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(local).as_posix()}")
    return f"s3://{bucket}/{prefix}"


# --------------------------------------------------------------------------- timing


def _loader(source, batch_size: int, workers: int, **kwargs):
    import shardkit

    ds = shardkit.StreamingDataset(source, batch_size=batch_size,
                                   crop=shardkit.RandomResizedCrop(224), **kwargs)
    return shardkit.make_loader(ds, num_workers=workers, persistent_workers=False)


def time_epoch(make, expected: int, server: MotoServer) -> dict:
    """One full epoch of ``make()``'s loader: samples/s, first batch, CPU of us and of moto."""
    gc.collect()
    cpu0, moto0, req0 = _cpu_seconds(), server.cpu_seconds(), server.get_requests()
    start = time.perf_counter()
    loader = make()
    first, n, batch = None, 0, None
    for batch in loader:
        if first is None:
            first = time.perf_counter() - start
        n += len(batch[0])
    seconds = time.perf_counter() - start
    del loader, batch  # workers are joined when the epoch ends (persistent_workers=False)
    gc.collect()
    if n != expected:
        raise RuntimeError(f"loader yielded {n} samples in an epoch, the manifest has {expected}")
    return {"samples_per_s": n / seconds, "first_batch_s": first, "seconds": seconds,
            "cpu_cores": (_cpu_seconds() - cpu0) / seconds,
            "moto_cores": (server.cpu_seconds() - moto0) / seconds,
            "get_requests": server.get_requests() - req0, "samples": n}


def s3_read_limit(source: str, storage_options: dict, server: MotoServer) -> dict:
    """One sequential pass over every shard with ``RemoteStore.iter_bytes`` (as the cache's
    download does), in this process: what the server delivers to one reader."""
    import shardkit

    m = shardkit.Manifest.load(source, storage_options=storage_options)
    store = m.store
    moto0, req0 = server.cpu_seconds(), server.get_requests()
    start, total = time.perf_counter(), 0
    for shard in m.shards:
        for chunk in store.iter_bytes(shard.url, 0, shard.num_bytes):
            total += len(chunk)
    seconds = time.perf_counter() - start
    if total != m.num_bytes:
        raise RuntimeError(f"read {total} bytes, the manifest says {m.num_bytes}")
    return {"mb_per_s": total / 1e6 / seconds, "moto_cores": (server.cpu_seconds() - moto0) / seconds,
            "get_requests": server.get_requests() - req0}


# --------------------------------------------------------------------------- the run


def run_s3(folder: Path | None = None, out: Path = Path("bench-out"), *, classes: int = 10,
           per_class: int = 200, batch_size: int = 256, workers: int = 2,
           repeats: int = 3) -> dict:
    """Pack (or reuse) raw shards of an image folder, serve them from moto's S3 in a separate
    process, and time local disk against S3 (cold cache, no cache, warm cache), ``repeats``
    times interleaved. Writes ``out/bench-s3.json`` and returns the report."""
    import shardkit

    from .synth import make_image_folder

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = Path(folder or make_image_folder(out / "images", classes=classes, per_class=per_class))
    local = out / "raw"
    files = sum(1 for p in Path(images).rglob("*") if p.is_file())
    # 16 shards or more, as in the loader benchmark (and as a real dataset has): with a single
    # shard, every worker but the one downloading it waits for the whole download.
    m = shardkit.pack_folder(images, local, mode="raw", resume=True, progress=False,
                             max_samples=max(1, files // 16))
    n = m.num_samples
    shard_files = [local / s.url for s in m.shards]
    caches = out / "s3-cache"
    shutil.rmtree(caches, ignore_errors=True)
    B, W = batch_size, workers
    with MotoServer(out / "moto.log") as server:
        opts = server.storage_options()
        t0 = time.perf_counter()
        source = upload_dataset(server, local)
        upload_s = time.perf_counter() - t0
        warm = caches / "warm"
        time_epoch(lambda: _loader(source, B, W, storage_options=opts, cache_dir=warm), n, server)
        cold_dirs = iter(caches / f"cold-{i}" for i in range(repeats))
        makers = {
            "local disk": lambda: _loader(local, B, W),
            "s3, cold cache": lambda: _loader(source, B, W, storage_options=opts,
                                              cache_dir=next(cold_dirs)),
            "s3, no cache": lambda: _loader(source, B, W, storage_options=opts),
            "s3, warm cache": lambda: _loader(source, B, W, storage_options=opts, cache_dir=warm),
        }
        runs: dict[str, list[dict]] = {name: [] for name in makers}
        limit_runs: dict[str, list[dict]] = {"s3": [], "local": []}
        for i in range(repeats):
            for name, make in makers.items():
                runs[name].append(time_epoch(make, n, server))
            shutil.rmtree(caches / f"cold-{i}", ignore_errors=True)
            limit_runs["s3"].append(s3_read_limit(source, opts, server))
            limit_runs["local"].append({"mb_per_s": read_limit(shard_files, cold=False)})
        moto_rss_mb = _rss_mb(server.pid)
    shutil.rmtree(caches, ignore_errors=True)
    results = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
               for name, rs in runs.items()}
    rate = {name: r["samples_per_s"] for name, r in results.items()}
    limits = {
        "s3 sequential read MB/s (1 reader)": statistics.median(r["mb_per_s"] for r in limit_runs["s3"]),
        "moto cores during it": statistics.median(r["moto_cores"] for r in limit_runs["s3"]),
        "GET requests for it": statistics.median(r["get_requests"] for r in limit_runs["s3"]),
        "local sequential read MB/s (warm)": statistics.median(r["mb_per_s"] for r in limit_runs["local"]),
    }
    report = {
        "samples": n, "shards": len(m.shards), "shard_bytes": m.num_bytes, "batch_size": B,
        "workers": W, "repeats": repeats, "cpus": len(os.sched_getaffinity(0)),
        "upload_s": upload_s, "moto_rss_mb": moto_rss_mb, "results": results, "limits": limits,
        "ratios": {"s3_cold/local": rate["s3, cold cache"] / rate["local disk"],
                   "s3_nocache/local": rate["s3, no cache"] / rate["local disk"],
                   "s3_warm/local": rate["s3, warm cache"] / rate["local disk"]},
        "runs": runs,
    }
    (out / "bench-s3.json").write_text(json.dumps(report, indent=1))
    return report


def format_s3_report(report: dict) -> str:
    lines = [f"{report['samples']} images in {report['shards']} raw shards "
             f"({report['shard_bytes'] / 1e6:.0f} MB), batch {report['batch_size']}, "
             f"{report['workers']} workers, {report['cpus']} CPUs, median of {report['repeats']}; "
             f"moto S3 server in its own process (peak RSS {report['moto_rss_mb']:.0f} MB)",
             f"{'configuration':16s} {'samples/s':>9s} {'1st batch':>9s} {'epoch':>7s} "
             f"{'cores':>5s} {'moto cores':>10s} {'GETs':>5s} {'vs local':>8s}"]
    local = report["results"]["local disk"]["samples_per_s"]
    for name, r in report["results"].items():
        lines.append(f"{name:16s} {r['samples_per_s']:9.0f} {r['first_batch_s']:8.2f}s "
                     f"{r['seconds']:6.2f}s {r['cpu_cores']:5.2f} {r['moto_cores']:10.2f} "
                     f"{r['get_requests']:5.0f} {r['samples_per_s'] / local:7.2f}x")
    lines.append("limits:")
    for name, v in report["limits"].items():
        lines.append(f"  {name:38s} {v:9.2f}")
    lines.append("ratios:")
    for name, v in report["ratios"].items():
        lines.append(f"  {name:38s} {v:6.2f}")
    return "\n".join(lines)


__all__ = ["MotoServer", "format_s3_report", "run_s3", "upload_dataset"]
