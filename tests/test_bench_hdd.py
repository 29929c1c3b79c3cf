"""``shardkit bench --hdd``: what it says where it cannot throttle, and the disk it throttles."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shardkit.bench import hdd
from shardkit.cli import main


def test_bench_hdd_without_blkio_says_it_cannot_throttle(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(hdd, "CGROUP_ROOT", tmp_path / "cgroup")  # no blkio, no cgroup v2
    (tmp_path / "cgroup").mkdir()
    out = tmp_path / "out"
    code = main(["bench", "--hdd", "--out", str(out), "--classes", "2", "--per-class", "2"])
    assert code == 1
    err = capsys.readouterr().err
    if os.geteuid() == 0:
        assert "cannot throttle: no cgroup v1 blkio hierarchy" in err, err
    else:
        assert "cannot throttle: not root" in err, err
    assert not out.exists()  # said before any work


def test_bench_hdd_not_root_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    code = main(["bench", "--hdd", "--out", str(tmp_path / "out")])
    assert code == 1
    assert "cannot throttle: not root" in capsys.readouterr().err


def test_cgroup_v2_without_the_io_controller_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    with pytest.raises(hdd.CannotThrottle, match="has no io controller"):
        hdd.throttle_method(tmp_path)
    (tmp_path / "cgroup.controllers").write_text("cpu io memory pids\n")
    assert hdd.throttle_method(tmp_path) == ("v2", tmp_path)


def test_whole_disk_of_the_root_filesystem():
    dev = os.stat("/").st_dev
    if os.major(dev) == 0:  # overlay, tmpfs, btrfs: no block device to throttle
        with pytest.raises(hdd.CannotThrottle, match="without a block device"):
            hdd.whole_disk("/")
        return
    major, minor = hdd.whole_disk("/")
    disk = Path(f"/sys/dev/block/{major}:{minor}")
    assert disk.exists() and not (disk / "partition").exists()  # a whole disk
    own = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve()
    assert own in (disk.resolve(), disk.resolve() / own.name)  # the disk or its partition


def test_a_partition_is_throttled_on_its_disk(tmp_path):
    disk = tmp_path / "devices" / "pci0" / "block" / "sda"
    (disk / "sda1").mkdir(parents=True)
    (disk / "dev").write_text("8:0\n")
    (disk / "sda1" / "dev").write_text("8:1\n")
    (disk / "sda1" / "partition").write_text("1\n")
    links = tmp_path / "dev" / "block"
    links.mkdir(parents=True)
    (links / "8:0").symlink_to(disk)
    (links / "8:1").symlink_to(disk / "sda1")
    assert hdd.disk_of(8, 1, tmp_path) == (8, 0)
    assert hdd.disk_of(8, 0, tmp_path) == (8, 0)
    with pytest.raises(hdd.CannotThrottle, match="9:9"):
        hdd.disk_of(9, 9, tmp_path)


def test_bench_hdd_block_size_reaches_the_run(tmp_path, monkeypatch, capsys):
    seen = {}

    def run(folder, out, **kw):
        seen.update(kw)
        raise hdd.CannotThrottle("stubbed")

    monkeypatch.setattr(hdd, "run_hdd", run)
    assert main(["bench", "--hdd", "--out", str(tmp_path / "o"), "--block-size", "shard"]) == 1
    assert seen["block_size"] == "shard"
    assert main(["bench", "--hdd", "--out", str(tmp_path / "o"), "--block-size", "300"]) == 1
    assert seen["block_size"] == 300
    for bad in ("0", "-3", "shards", "1.5"):
        with pytest.raises(SystemExit) as exc:
            main(["bench", "--hdd", "--block-size", bad])
        assert exc.value.code == 2
        assert "block_size must be an integer" in capsys.readouterr().err


def test_the_ratio_to_what_binds_takes_the_lower_of_disk_and_cpu():
    """A throttled loader is held by the disk (throttled ``cat``) or by its own unthrottled
    rate, whichever is lower; the plain throttled/unthrottled ratio cannot tell them apart."""
    raw_t, raw_f = f"{hdd.RAW}, {hdd.THROTTLED}", f"{hdd.RAW}, {hdd.FREE}"
    cat_t = f"{hdd.CAT}, {hdd.THROTTLED}"
    name = "raw throttled / what binds it, min(throttled cat, raw unthrottled) in MB/s"
    disk_binds = {raw_t: {"mb_per_s": 120.0, "samples_per_s": 1200.0},
                  raw_f: {"mb_per_s": 176.0, "samples_per_s": 1760.0}, cat_t: {"mb_per_s": 150.0}}
    ratios = hdd._ratios(disk_binds)
    assert ratios[name] == pytest.approx(0.8)
    assert ratios["raw throttled / raw unthrottled cold (target >= 0.9)"] == pytest.approx(1200 / 1760)
    cpu_binds = dict(disk_binds, **{raw_f: {"mb_per_s": 125.0}})
    assert hdd._ratios(cpu_binds)[name] == pytest.approx(0.96)
    no_cat = {raw_t: {"mb_per_s": 120.0}, raw_f: {"mb_per_s": 160.0}}
    assert hdd._ratios(no_cat)[name] == pytest.approx(0.75)
    assert not any("tensor256 throttled / what binds" in k for k in ratios)  # no tensor rows
