"""Benchmarks run end to end on tiny inputs (the numbers themselves are not checked)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("boto3")
pytest.importorskip("flask", reason="moto server mode needs moto[server] (flask, flask-cors)")

from shardkit.bench.s3 import CONFIGS, format_s3_report, run_s3
from shardkit.cli import main


@pytest.mark.slow
def test_run_s3_tiny(tmp_path):
    report = run_s3(None, tmp_path, classes=2, per_class=8, repeats=1, batch_size=4)
    assert report["samples"] == 16
    assert set(report["results"]) == set(CONFIGS)
    for name, r in report["results"].items():
        assert r["samples"] == 16, name
        assert r["samples_per_s"] > 0 and r["first_batch_s"] > 0, name
        assert r["moto_cores"] >= 0, name
    assert report["results"]["local disk"]["get_requests"] == 0
    assert report["results"]["s3, no cache"]["get_requests"] > 0
    assert report["results"]["s3, warm cache"]["get_requests"] >= 0
    assert set(report["ratios"]) >= {"s3_cold/local", "s3_nocache/local"}
    assert all(v > 0 for v in report["ratios"].values())
    assert report["limits"]["s3 sequential read MB/s (1 reader)"] > 0
    assert json.loads((tmp_path / "bench-s3.json").read_text())["samples"] == 16
    assert not (tmp_path / "s3-cache").exists()  # the caches are removed
    text = format_s3_report(report)
    assert "s3, cold cache" in text and "s3_cold/local" in text


@pytest.mark.slow
def test_bench_cli_s3(tmp_path, capsys):
    code = main(["bench", "--s3", "--out", str(tmp_path), "--classes", "2", "--per-class", "4",
                 "--repeats", "1", "--batch-size", "4", "--workers", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "s3_nocache/local" in printed and "bench-s3.json" in printed


@pytest.mark.slow
def test_loader_bench_tiny_counts_every_sample_and_writes_its_report(tmp_path):
    from PIL import Image

    from shardkit.bench import loaders as bench

    report = bench.run(None, tmp_path, classes=2, per_class=8, batch_size=4, repeats=1,
                       cold=False)
    assert report["samples"] == 16
    # every configuration yielded exactly the 16 samples (_time_loader raises otherwise)
    assert {r["samples"] for r in report["results"].values()} == {16}
    assert all(r["samples_per_s"] > 0 and r["total_pss_mb"] > 0 and r["peak_mb"] >= 0
               for r in report["results"].values())
    # the memory target: each worker's shuffle buffer (here all 8 samples a worker reads)
    memory = report["memory"]
    assert memory["naive peak MB"] == report["results"]["naive ImageFolder (warm)"]["peak_mb"]
    raw_mb = sum(p.stat().st_size for p in (tmp_path / "raw").glob("*.tar")) / 2**20
    row = memory["shardkit raw, train"]
    assert row["shuffle buffer MB"] == pytest.approx(raw_mb, rel=0.02)
    assert row["ok"] == (row["over naive MB"] <= row["shuffle buffer MB"])
    assert "shuffle buffer" in bench.format_report(report)
    assert set(report["ratios"]) >= {"raw train / naive (warm)", "raw train / plain webdataset",
                                     "tensor224 eval / copy limit"}
    # 16 shards or more, so plain webdataset gets a shard per worker
    assert len(list((tmp_path / "raw").glob("*.tar"))) >= 2
    assert Image.open(tmp_path / "bench.png").size[0] > 0
    text = bench.format_report(report)
    assert "shardkit raw, train" in text and "naive ImageFolder (warm)" in text


@pytest.mark.slow
def test_pack_bench_and_auto_tiny(tmp_path):
    from shardkit.bench import loaders as bench

    report = bench.run_pack(None, tmp_path, classes=2, per_class=6, workers=2, repeats=1)
    assert report["files"] == 12 and all(v > 0 for v in report["seconds"].values())
    dataset = tmp_path / "pack-raw"
    result = bench.auto(dataset, batch_size=4, max_workers=2, prefetches=(2,))
    assert set(result["sweep"]) == {"1x2", "2x2"}
    assert result["best"]["num_workers"] in (1, 2)
    assert result["bottleneck"] in ("read", "decode") or result["bottleneck"].startswith("transform")


def test_peak_memory_sees_a_short_lived_allocation_in_another_process():
    # A child process holds 200 MB for a moment and frees it: only a sampler sees that, and
    # the peak counts it once (the child's pages, not the parent's shared ones).
    import multiprocessing

    from shardkit.bench.loaders import PeakMemory

    ctx = multiprocessing.get_context("fork")
    with PeakMemory() as peak:
        child = ctx.Process(target=_hold, args=(200 << 20, 0.2))
        child.start()
        child.join()
    assert child.exitcode == 0
    assert 100 <= peak.peak < 1000  # machine-wide: other processes may free memory meanwhile


def _hold(nbytes: int, seconds: float) -> None:
    import time

    block = b"\x01" * nbytes  # every page written
    time.sleep(seconds)
    del block


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu_in_smoke_mode(tmp_path):
    """tools/gpu_check.py's code path (every measurement, the checks, one JSON document), tiny
    and on the CPU, so that it runs when a GPU machine is lent."""
    import json
    import subprocess
    import sys

    from conftest import REPO, subprocess_env

    res = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--device", "cpu",
                          "--smoke", "--workers", "1", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout)
    assert report == json.loads((tmp_path / "gpu.json").read_text())
    assert set(report["results"]) == {"resnet18, raw", "resnet18, tensor256", "resnet50, raw"}
    raw = report["results"]["resnet18, raw"]
    assert raw["gpu decode: combined"] > 0 and raw["gpu decode limit"] > 0
    assert report["checks"]["prefetcher max abs diff vs cpu"] < 1e-4
    assert report["checks"]["gpu decode mean abs diff (levels)"] < 4
    index = report["index speed"]  # shardkit index against cat, on the raw shards
    assert 0 < index["samples"] <= report["images"], index
    assert index["ratios"]["index / cat, warm"] > 0, index


def test_index_bench_tiny_times_cat_and_index_on_the_same_shards(tmp_path, capsys):
    code = main(["bench", "--index", "--out", str(tmp_path), "--classes", "2", "--per-class",
                 "6", "--repeats", "1", "--workers", "1"])
    assert code == 0
    report = json.loads((tmp_path / "bench-index.json").read_text())
    assert report["samples"] == 12 and report["shards"] >= 1
    assert set(report["seconds"]) == {"cat warm", "index warm", "cat cold", "index cold"}
    assert all(v > 0 for v in report["ratios"].values())
    shards = sorted(p.name for p in (tmp_path / "index-shards").iterdir())
    assert shards and all(name.endswith(".tar") for name in shards)  # plain shards, no index
    assert "index / cat, warm" in capsys.readouterr().out
