"""``shardkit bench --hdd``: the loaders on an emulated hard disk.

A cgroup caps the reads of the disk that holds the data at ``READ_BPS`` bytes/s and
``READ_IOPS`` requests/s (a 7,200 rpm disk: ~150 MB/s sequential, ~120 random reads/s), and each
measured loader runs in a child process placed in it before it reads a byte (its DataLoader
workers, forked, stay in it). cgroup v1: ``blkio.throttle.read_bps_device`` and
``read_iops_device``; cgroup v2: ``io.max`` (``rbps``, ``riops``). Needs root and one of the two;
otherwise it says why and measures nothing. The limits sit on the whole disk (``/sys/dev/block``),
not a partition: the throttle works at the disk's queue.

Every row is cold: the files are dropped from the page cache before each epoch
(``posix_fadvise(DONTNEED)``, and ``echo 1 > /proc/sys/vm/drop_caches`` before each row where it
is allowed). A loader row is :func:`~shardkit.bench.loaders._time_loader` with one timed epoch: a
warm-up epoch (workers start, time to first batch), then one timed cold epoch. Rows: ``cat`` of
the shards; shardkit raw JPEG train (``RandomResizedCrop(224)``, default settings); plain
webdataset on the same raw shards; a naive ``ImageFolder`` on the image files; shardkit
tensor-256 shards, each throttled; and ``cat``, shardkit raw and tensor-256 on the disk as it is
(cold), in a second cgroup without limits that only counts. Each row reports the reads the disk
saw (from the cgroup's counters): their number and mean size, which is what an HDD charges for.

The cgroups (``shardkit-hdd-<pid>`` and ``shardkit-hdd-<pid>-free``) are removed at the end,
also on Ctrl-C, SIGTERM or an error.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["CannotThrottle", "Throttle", "disk_of", "format_hdd_report", "run_hdd", "throttle_method",
           "whole_disk"]

CGROUP_ROOT = Path("/sys/fs/cgroup")
SYS_ROOT = Path("/sys")
READ_BPS = 150_000_000  # bytes/s
READ_IOPS = 120  # read requests/s

THROTTLED, FREE = "throttled", "unthrottled"
CAT, RAW, WDS, FOLDER, TENSOR = ("cat", "shardkit raw, train", "plain webdataset",
                                 "naive ImageFolder", "shardkit tensor256, train")
ROWS = [f"{CAT}, {THROTTLED}", f"{RAW}, {THROTTLED}", f"{WDS}, {THROTTLED}",
        f"{FOLDER}, {THROTTLED}", f"{TENSOR}, {THROTTLED}",
        f"{CAT}, {FREE}", f"{RAW}, {FREE}", f"{TENSOR}, {FREE}"]


class CannotThrottle(RuntimeError):
    """This machine (or user) cannot emulate the HDD; the message says why."""

    def __str__(self) -> str:
        return f"cannot throttle: {super().__str__()}"


# --------------------------------------------------------------------------- the disk


def whole_disk(path: str | os.PathLike, sys_root: Path = SYS_ROOT) -> tuple[int, int]:
    """``(major, minor)`` of the whole disk holding ``path``: its filesystem's device from
    ``os.stat(path).st_dev``, and the disk above it when that is a partition
    (``/sys/dev/block/MAJ:MIN/partition``)."""
    dev = os.stat(path).st_dev
    major, minor = os.major(dev), os.minor(dev)
    if major == 0:
        raise CannotThrottle(f"{path} is on a filesystem without a block device (device "
                             f"{major}:{minor}: tmpfs, overlay, NFS, btrfs, …)")
    return disk_of(major, minor, sys_root)


def disk_of(major: int, minor: int, sys_root: Path = SYS_ROOT) -> tuple[int, int]:
    """The whole disk of block device ``major:minor`` (itself unless it is a partition)."""
    node = sys_root / "dev" / "block" / f"{major}:{minor}"
    if not node.exists():
        raise CannotThrottle(f"block device {major}:{minor} is not in {node.parent}")
    real = node.resolve()
    if (real / "partition").exists():  # .../block/sda/sda1: the disk is the folder above
        real = real.parent
    text = (real / "dev").read_text().strip()
    disk_major, disk_minor = text.split(":")
    return int(disk_major), int(disk_minor)


def throttle_method(root: Path | None = None) -> tuple[str, Path]:
    """``("v1", blkio hierarchy)`` or ``("v2", cgroup2 mount with the io controller)``; a
    :class:`CannotThrottle` saying why not (not root, no blkio, io controller missing)."""
    root = root or CGROUP_ROOT
    if os.geteuid() != 0:
        raise CannotThrottle("not root (a cgroup with blkio/io limits needs root; run "
                             "`sudo shardkit bench --hdd`)")
    v1 = root / "blkio"
    if (v1 / "blkio.throttle.read_bps_device").exists():
        return "v1", v1
    seen = []
    for v2 in (root, root / "unified"):
        controllers = v2 / "cgroup.controllers"
        if controllers.exists():
            if "io" in controllers.read_text().split():
                return "v2", v2
            seen.append(str(v2))
    if seen:
        raise CannotThrottle(f"no cgroup v1 blkio hierarchy ({v1}), and the cgroup v2 "
                             f"hierarchy at {', '.join(seen)} has no io controller (bound to "
                             "v1, or not enabled)")
    raise CannotThrottle(f"no cgroup v1 blkio hierarchy ({v1}) and no cgroup v2 hierarchy "
                         f"under {root}")


class Throttle:
    """A cgroup reading ``device`` at most ``bps`` bytes/s and ``iops`` requests/s (None: no
    limit, only counted); ``procs`` is the file a process writes its pid to, to join it.
    A context manager: made on entry, removed on exit."""

    def __init__(self, method: str, hierarchy: Path, name: str, device: tuple[int, int],
                 bps: int | None = READ_BPS, iops: int | None = READ_IOPS):
        self.method, self.hierarchy, self.device = method, hierarchy, device
        self.path = hierarchy / name
        self.bps, self.iops = bps, iops
        self._enabled_io = False

    @property
    def procs(self) -> Path:
        return self.path / "cgroup.procs"

    def __enter__(self) -> "Throttle":
        dev = "%d:%d" % self.device
        if self.method == "v2":
            control = self.hierarchy / "cgroup.subtree_control"
            if "io" not in control.read_text().split():
                control.write_text("+io")
                self._enabled_io = True
        self.path.mkdir()
        try:
            if self.method == "v1":
                if self.bps is not None:
                    (self.path / "blkio.throttle.read_bps_device").write_text(f"{dev} {self.bps}")
                if self.iops is not None:
                    (self.path / "blkio.throttle.read_iops_device").write_text(
                        f"{dev} {self.iops}")
            elif self.bps is not None or self.iops is not None:
                limits = " ".join(f"{k}={v}" for k, v in (("rbps", self.bps),
                                                         ("riops", self.iops)) if v is not None)
                (self.path / "io.max").write_text(f"{dev} {limits}")
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """rmdir the cgroup, first moving any process still in it to the hierarchy's root."""
        for _ in range(50):
            if not self.path.exists():
                break
            try:
                self.path.rmdir()
                break
            except OSError:
                try:
                    for pid in self.procs.read_text().split():
                        try:
                            (self.hierarchy / "cgroup.procs").write_text(pid)
                        except OSError:
                            pass
                except OSError:
                    pass
                time.sleep(0.1)
        if self._enabled_io:
            try:
                (self.hierarchy / "cgroup.subtree_control").write_text("-io")
            except OSError:
                pass
            self._enabled_io = False

    def reads(self) -> tuple[int, int]:
        """``(requests, bytes)`` read from the device by the cgroup's processes so far."""
        dev = "%d:%d" % self.device
        try:
            if self.method == "v1":
                ios = _v1_count(self.path / "blkio.throttle.io_serviced", dev)
                nbytes = _v1_count(self.path / "blkio.throttle.io_service_bytes", dev)
                return ios, nbytes
            for line in (self.path / "io.stat").read_text().splitlines():
                parts = line.split()
                if parts and parts[0] == dev:
                    fields = dict(p.split("=", 1) for p in parts[1:])
                    return int(fields.get("rios", 0)), int(fields.get("rbytes", 0))
        except OSError:
            pass
        return 0, 0


def _v1_count(path: Path, dev: str) -> int:
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == dev and parts[1] == "Read":
            return int(parts[2])
    return 0


def drop_caches() -> bool:
    """``echo 1 > /proc/sys/vm/drop_caches`` (the whole page cache; root only); False when not
    allowed."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- one row, in a child


def _child(spec: dict) -> dict:
    """Run one row in this process: import everything first (unthrottled), then join the
    cgroup, then read."""
    # imported before joining the cgroup: the libraries load unthrottled
    import PIL.Image  # noqa: F401
    import torch  # noqa: F401

    import shardkit.dataset  # noqa: F401
    import shardkit.loader  # noqa: F401
    import shardkit.reader  # noqa: F401

    from . import loaders

    kind = spec["kind"]
    files = [Path(p) for p in spec["files"]]
    if kind != CAT:
        B, W, block = spec["batch_size"], spec["workers"], spec["block_size"]
        make = {
            RAW: lambda: loaders.shardkit_loader(Path(spec["data"]), B, W, block_size=block),
            TENSOR: lambda: loaders.shardkit_loader(Path(spec["data"]), B, W, block_size=block),
            WDS: lambda: loaders.plain_webdataset(Path(spec["data"]), B, W),
            FOLDER: lambda: loaders.naive_imagefolder(Path(spec["data"]), B, W),
        }[kind]
        import webdataset  # noqa: F401 - the same: imported before the cgroup
        from torchvision import datasets  # noqa: F401
    cgroup = Throttle(spec["method"], Path(spec["hierarchy"]), spec["cgroup"],
                      (spec["device"][0], spec["device"][1]))
    Path(cgroup.procs).write_text(str(os.getpid()))
    marks: list[tuple[int, int]] = []  # the cgroup's reads before each epoch and after the last
    if kind == CAT:
        loaders.evict(files)
        marks.append(cgroup.reads())
        start = time.perf_counter()
        subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
        seconds = time.perf_counter() - start
        marks.append(cgroup.reads())
        result = {"mb_per_s": spec["bytes"] / 1e6 / seconds, "seconds": seconds}
    else:
        result = loaders._time_loader(make, spec["bytes"], spec["samples"], cold_files=files,
                                      epochs=1, before_epoch=lambda: marks.append(cgroup.reads()))
    reads, nbytes = (b - a for a, b in zip(*marks[-2:]))  # the timed epoch's
    result.update(reads=reads, read_mb=nbytes / 1e6,
                  kb_per_read=nbytes / 1e3 / reads if reads else float("nan"))
    return result


def _child_main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "--child":
        print("usage: python -m shardkit.bench.hdd --child SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[1]).read_text())
    result = _child(spec)
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


def _run_child(spec: dict, cgroup: Throttle, out: Path) -> dict:
    spec_file, result_file = out / "hdd-child.json", out / "hdd-result.json"
    result_file.unlink(missing_ok=True)
    spec_file.write_text(json.dumps({**spec, "method": cgroup.method,
                                     "hierarchy": str(cgroup.hierarchy),
                                     "cgroup": cgroup.path.name, "device": cgroup.device,
                                     "result": str(result_file)}))
    ios0, bytes0 = cgroup.reads()
    proc = subprocess.Popen([sys.executable, "-m", "shardkit.bench.hdd", "--child",
                             str(spec_file)])
    try:
        code = proc.wait()
    finally:
        if proc.poll() is None:  # Ctrl-C or an error here: the child goes too
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if code != 0:
        raise RuntimeError(f"bench --hdd: the {spec['kind']!r} row failed (exit code {code})")
    result = json.loads(result_file.read_text())
    ios1, bytes1 = cgroup.reads()
    result.update(all_reads=ios1 - ios0, all_read_mb=(bytes1 - bytes0) / 1e6)  # the whole child
    return result


# --------------------------------------------------------------------------- the run


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def run_hdd(folder: Path | None = None, out: Path = Path("bench-out"), *, classes: int = 10,
            per_class: int = 200, batch_size: int = 256, workers: int = 2, repeats: int = 1,
            block_size: int | str | None = None, rows: list[str] | None = None,
            cgroup_root: Path | None = None, bps: int = READ_BPS, iops: int = READ_IOPS,
            drop: bool = True) -> dict:
    """Every row of ``rows`` (default :data:`ROWS`) ``repeats`` times, interleaved; medians.

    ``block_size`` goes to the shardkit rows (None: their default; ``"shard"``: whole shards).
    ``drop``: also drop the machine's whole page cache before each row
    (``/proc/sys/vm/drop_caches``), not only the row's files. Raises
    :class:`CannotThrottle` before any work when the HDD cannot be emulated here.
    """
    import shardkit

    from .synth import make_image_folder

    rows = list(rows or ROWS)
    unknown = set(rows) - set(ROWS)
    if unknown:
        raise ValueError(f"unknown rows {sorted(unknown)}; rows are {ROWS}")
    method, hierarchy = throttle_method(cgroup_root or CGROUP_ROOT)
    out.mkdir(parents=True, exist_ok=True)
    device = whole_disk(out)
    images = Path(folder or make_image_folder(out / "images", classes=classes, per_class=per_class))
    if whole_disk(images) != device:
        raise CannotThrottle(f"the images ({images}) and --out ({out}) are on different disks")
    files = sorted(p for p in images.rglob("*") if p.is_file())
    # as the loader benchmark packs them (the same folders: reused by both)
    opts: dict[str, Any] = dict(resume=True, progress=False, max_samples=max(1, len(files) // 16))
    packs = {"raw": shardkit.pack_folder(images, out / "raw", mode="raw", **opts),
             "tensor256": shardkit.pack_folder(images, out / "tensor256", mode="tensor", size=256,
                                               **opts)}
    shard_files = {k: [str(Path(m.base_url or "") / s.url) for s in m.shards]
                   for k, m in packs.items()}
    n = packs["raw"].num_samples
    common: dict[str, Any] = dict(batch_size=batch_size, workers=workers, block_size=block_size, samples=n)
    raw = dict(common, data=str(out / "raw"), files=shard_files["raw"],
               bytes=packs["raw"].num_bytes)
    specs: dict[str, dict[str, Any]] = {
        CAT: dict(raw, kind=CAT),
        RAW: dict(raw, kind=RAW),
        WDS: dict(raw, kind=WDS),
        FOLDER: dict(common, kind=FOLDER, data=str(images), files=[str(p) for p in files],
                     bytes=sum(p.stat().st_size for p in files)),
        TENSOR: dict(common, kind=TENSOR, data=str(out / "tensor256"),
                     files=shard_files["tensor256"], bytes=packs["tensor256"].num_bytes),
    }
    runs: dict[str, list[dict]] = {row: [] for row in rows}
    dropped = []
    name = f"shardkit-hdd-{os.getpid()}"
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _sigterm)
    except ValueError:  # not the main thread
        pass
    started = time.perf_counter()
    try:
        with Throttle(method, hierarchy, name, device, bps, iops) as slow, \
                Throttle(method, hierarchy, f"{name}-free", device, None, None) as free:
            for _ in range(repeats):
                for row in rows:
                    kind, temp = row.rsplit(", ", 1)
                    dropped.append(drop and drop_caches())
                    runs[row].append(_run_child(specs[kind], slow if temp == THROTTLED else free,
                                                out))
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        for f in ("hdd-child.json", "hdd-result.json"):
            (out / f).unlink(missing_ok=True)
    results = {row: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
               for row, rs in runs.items()}
    for row, r in results.items():
        if "samples_per_s" in r:  # a loader row: stored MB/s of its data
            r["mb_per_s"] = r["samples_per_s"] * specs[row.rsplit(", ", 1)[0]]["bytes"] / n / 1e6
    report = {
        "images": len(files), "samples": n,
        "shards": {k: len(m.shards) for k, m in packs.items()},
        "mb": {"raw shards": specs[RAW]["bytes"] / 1e6, "images": specs[FOLDER]["bytes"] / 1e6,
               "tensor256 shards": specs[TENSOR]["bytes"] / 1e6},
        "device": "%d:%d" % device, "cgroup": f"{method} ({hierarchy})",
        "limits": {"read_bps": bps, "read_iops": iops},
        "drop_caches": all(dropped) if dropped else False,
        "batch_size": batch_size, "workers": workers, "block_size": block_size,
        "repeats": repeats, "seconds": time.perf_counter() - started,
        "results": results, "runs": runs, "ratios": _ratios(results),
    }
    (out / "bench-hdd.json").write_text(json.dumps(report, indent=1))
    return report


def _ratios(results: dict) -> dict:
    def get(row, key):
        return results.get(row, {}).get(key)

    pairs = {
        "raw throttled / raw unthrottled cold (target >= 0.9)":
            (f"{RAW}, {THROTTLED}", f"{RAW}, {FREE}", "samples_per_s"),
        "tensor256 throttled MB/s / cat throttled MB/s":
            (f"{TENSOR}, {THROTTLED}", f"{CAT}, {THROTTLED}", "mb_per_s"),
        "tensor256 throttled / tensor256 unthrottled cold":
            (f"{TENSOR}, {THROTTLED}", f"{TENSOR}, {FREE}", "samples_per_s"),
        "raw throttled MB/s / cat throttled MB/s":
            (f"{RAW}, {THROTTLED}", f"{CAT}, {THROTTLED}", "mb_per_s"),
        "shardkit raw / plain webdataset, throttled":
            (f"{RAW}, {THROTTLED}", f"{WDS}, {THROTTLED}", "samples_per_s"),
        "shardkit raw / naive ImageFolder, throttled":
            (f"{RAW}, {THROTTLED}", f"{FOLDER}, {THROTTLED}", "samples_per_s"),
    }
    ratios = {}
    for name, (a, b, key) in pairs.items():
        x, y = get(a, key), get(b, key)
        if x is not None and y:
            ratios[name] = x / y
    # What binds a throttled loader: the disk (throttled `cat`'s MB/s) or its own unthrottled
    # rate (the CPU's), whichever is lower. Where the unthrottled loader reads faster than the
    # throttled disk can serve, "throttled / unthrottled" cannot reach 0.9 for any loader.
    disk = get(f"{CAT}, {THROTTLED}", "mb_per_s")
    for kind, label in ((RAW, "raw"), (TENSOR, "tensor256")):
        x, own = get(f"{kind}, {THROTTLED}", "mb_per_s"), get(f"{kind}, {FREE}", "mb_per_s")
        bounds = [b for b in (disk, own) if b]
        if x is not None and bounds:
            ratios[f"{label} throttled / what binds it, min(throttled cat, {label} unthrottled) "
                   "in MB/s"] = x / min(bounds)
    return ratios


def format_hdd_report(report: dict) -> str:
    lim = report["limits"]
    lines = [f"Emulated HDD: reads of {report['device']} capped at {lim['read_bps'] / 1e6:.0f} "
             f"MB/s and {lim['read_iops']} reads/s (cgroup {report['cgroup']}); "
             f"{report['samples']} samples, shards {report['shards']}, batch "
             f"{report['batch_size']}, {report['workers']} workers, block_size "
             f"{report['block_size'] or 'default'}; every row cold (page cache dropped"
             f"{', drop_caches too' if report['drop_caches'] else ''}), one timed epoch after a "
             f"warm-up epoch; median of {report['repeats']}; {report['seconds']:.0f} s",
             "  (reads, MB read, KB/read: what the disk served in the timed epoch, from the "
             "cgroup's counters)",
             f"  {'row':42s} {'samples/s':>9s} {'MB/s':>7s} {'1st batch':>9s} {'reads':>7s} "
             f"{'MB read':>8s} {'KB/read':>8s}"]
    for row, r in report["results"].items():
        rate = f"{r['samples_per_s']:9.0f}" if "samples_per_s" in r else f"{'':9s}"
        first = f"{r['first_batch_s']:8.2f}s" if "first_batch_s" in r else f"{'':9s}"
        lines.append(f"  {row:42s} {rate} {r['mb_per_s']:7.1f} {first} {r['reads']:7.0f} "
                     f"{r['read_mb']:8.1f} {r['kb_per_read']:8.0f}")
    for name, ratio in report["ratios"].items():
        lines.append(f"{name}: {ratio:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
