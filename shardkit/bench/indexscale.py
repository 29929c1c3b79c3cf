"""``shardkit index`` at scale, simulated: many tiny webdataset shards on a local S3 server
(moto, its own process), listed, indexed in parts, merged, loaded.

Each shard holds one small sample (``.png``, ``.cls``), so the figures are those of the
per-shard work a large index does (listing, one GET, one index file and record each, the part
records, the merge), not of reading bytes. ``python tools/scale.py --index-sim 100000``.
"""

from __future__ import annotations

import io
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

__all__ = ["run_index_scale", "format_index_scale"]

BUCKET = "wds"


def _tiny_shard(i: int) -> bytes:
    """A one-sample webdataset shard (about 3 KB)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in ((f"s{i:07d}.png", b"\x89PNG\r\n\x1a\n" + bytes(64)),
                           (f"s{i:07d}.cls", str(i % 10).encode())):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 946684800
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def run_index_scale(num_shards: int = 100_000, parts: int = 4, *, threads: int = 16,
                    log=print) -> dict[str, Any]:
    """Upload ``num_shards`` tiny shards, then time the listing, each part's index (into a
    local ``--out``), the merge and loading + planning the result."""
    import shardkit
    from shardkit.indexer import shard_urls
    from shardkit.plan import epoch_plan

    from .s3 import MotoServer

    out: dict[str, Any] = {"shards": num_shards, "parts": parts}
    with tempfile.TemporaryDirectory(prefix="shardkit-indexsim-") as tmp, \
            MotoServer(Path(tmp) / "moto.log") as server:
        client = server.client()
        client.create_bucket(Bucket=BUCKET)
        t = time.perf_counter()

        def put(i: int) -> None:
            client.put_object(Bucket=BUCKET, Key=f"ds/shard-{i:07d}.tar", Body=_tiny_shard(i))

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(put, range(num_shards)))
        out["upload_s"] = time.perf_counter() - t
        log(f"uploaded {num_shards:,} shards in {out['upload_s']:.1f} s")
        source, options = f"s3://{BUCKET}/ds", server.storage_options()
        t = time.perf_counter()
        urls = shard_urls(source, options)
        out["list_s"] = time.perf_counter() - t
        assert len(urls) == num_shards, (len(urls), num_shards)
        log(f"listed {len(urls):,} keys in {out['list_s']:.1f} s")
        dest = Path(tmp) / "index"
        out["part_s"] = []
        for i in range(parts):  # one after the other here; one machine each in real use
            t = time.perf_counter()
            m = shardkit.index_shards(source, dest, part=(i, parts), storage_options=options,
                                      progress=False, workers=threads)
            out["part_s"].append(time.perf_counter() - t)
            log(f"part {i}/{parts}: {out['part_s'][-1]:.1f} s")
        t = time.perf_counter()
        merged = shardkit.indexer.merge_index_parts(dest, parts)  # (the last part did it too)
        out["merge_s"] = time.perf_counter() - t
        assert len(merged.shards) == num_shards and m.num_samples == num_shards
        t = time.perf_counter()
        loaded = shardkit.Manifest.load(dest, options)
        plan = epoch_plan(loaded.shard_sizes(), seed=0, epoch=0, rank=0, world_size=8, worker=0,
                          num_workers=2)
        out["load_plan_s"] = time.perf_counter() - t
        out["compact"] = (dest / ".shardkit" / "manifest.cols").exists()
        out["plan_samples"] = plan.num_samples
        out["get_requests"] = server.get_requests()
    return out


def format_index_scale(r: dict) -> str:
    parts = ", ".join(f"{s:.1f}" for s in r["part_s"])
    return "\n".join([
        f"index simulation: {r['shards']:,} one-sample shards on a local S3 server (moto)",
        f"  upload (setup)       {r['upload_s']:8.1f} s",
        f"  list the prefix      {r['list_s']:8.1f} s  (1,000 keys per request)",
        f"  index, {r['parts']} parts        {sum(r['part_s']):8.1f} s  (each: {parts} s; "
        "one machine each in real use)",
        f"  merge the parts      {r['merge_s']:8.1f} s",
        f"  load + plan          {r['load_plan_s']:8.3f} s  (manifest.cols: "
        f"{'yes' if r['compact'] else 'no'})",
    ])
