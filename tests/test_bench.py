"""Benchmarks run end to end on tiny inputs (the numbers themselves are not checked)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("boto3")
pytest.importorskip("flask", reason="moto server mode needs moto[server] (flask, flask-cors)")

from shardkit.bench_s3 import CONFIGS, format_s3_report, run_s3
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
