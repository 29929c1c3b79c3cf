"""Command line: ``shardkit pack|show|verify|demo`` (also ``python tools/<verb>.py``).

Each verb parses its arguments, makes one library call, prints a summary and returns an exit code:
0 success, 1 failure of the data (bad input, verification mismatch), 2 usage errors.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from .errors import ShardkitError


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def pack_main(argv=None) -> int:
    from .writer import pack_folder

    p = argparse.ArgumentParser(prog="shardkit pack", description="Pack an image folder into tar shards.")
    p.add_argument("src", help="image folder (one sub-folder per class, or a flat folder)")
    p.add_argument("dest", help="output folder for the shards and manifest.json")
    p.add_argument("--mode", choices=("raw", "resize", "tensor"), default="raw",
                   help="raw: original bytes; resize: shorter side to --size, JPEG; "
                        "tensor: size x size uint8 .npy (default: raw)")
    p.add_argument("--size", type=int, help="target shorter side in pixels (resize, tensor)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality in resize mode (default 90)")
    p.add_argument("--max-bytes", default="256MB", help="largest shard, e.g. 256MB, 1GiB (default 256MB)")
    p.add_argument("--max-samples", type=int, help="most samples per shard")
    p.add_argument("--workers", type=int, help="encoding processes (default: all CPUs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pack-time shuffle (default 0)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the sorted folder order")
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                   help="raise: stop at the first bad file; skip: leave it out and list it in the manifest")
    p.add_argument("--resume", action="store_true", help="continue an interrupted pack into DEST")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in DEST")
    p.add_argument("--no-fsync", action="store_true",
                   help="do not fsync shards before renaming them (faster; a power loss may then "
                        "lose finished shards, a killed process does not)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    args = p.parse_args(argv)
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m = pack_folder(args.src, args.dest, mode=args.mode, size=args.size, quality=args.quality,
                            max_bytes=args.max_bytes, max_samples=args.max_samples,
                            workers=args.workers, seed=args.seed, shuffle=not args.no_shuffle,
                            on_error=args.on_error, resume=args.resume, overwrite=args.overwrite,
                            progress=not args.quiet, durable=not args.no_fsync)
    except ValueError as exc:
        if isinstance(exc, ShardkitError):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ShardkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:  # also when packing failed: a warning may explain the failure
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
    if not args.quiet:
        s = m.stats
        resumed = f", {s['resumed_shards']} shards reused" if s["resumed_shards"] else ""
        print(f"packed {s['samples']} samples into {s['shards']} shards ({_fmt_bytes(s['bytes'])}), "
              f"skipped {s['skipped']}, ignored {s['ignored']} non-image files{resumed}, "
              f"in {s['seconds']:.1f} s -> {args.dest}")
        for entry in m.skipped[:20]:
            print(f"  skipped {entry['path']}: {entry['reason']}", file=sys.stderr)
        if len(m.skipped) > 20:
            print(f"  ... and {len(m.skipped) - 20} more (listed in manifest.json)", file=sys.stderr)
    return 0


def show_main(argv=None) -> int:
    from .manifest import Manifest

    p = argparse.ArgumentParser(prog="shardkit show", description="Summarise a packed dataset.")
    p.add_argument("source", help="dataset folder or manifest.json")
    p.add_argument("--keys", type=int, default=5, help="how many sample keys to print (default 5)")
    args = p.parse_args(argv)
    try:
        m = Manifest.load(args.source)
    except (ShardkitError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    sizes = [s.num_bytes for s in m.shards]
    print(f"dataset   {args.source}  ({m.created_by}, format v{m.format_version})")
    print(f"samples   {m.num_samples}")
    classes = "none (flat folder)" if m.classes is None else f"{len(m.classes)}: " + ", ".join(m.classes[:10]) + (" ..." if len(m.classes) > 10 else "")
    print(f"classes   {classes}")
    print(f"shards    {len(m.shards)}, {_fmt_bytes(sum(sizes))} in all, "
          f"{_fmt_bytes(min(sizes))} to {_fmt_bytes(max(sizes))} each")
    opts = {k: v for k, v in m.options.items() if k != "fingerprint" and v is not None}
    print("options   " + ", ".join(f"{k}={v}" for k, v in opts.items()))
    if m.tensor:
        print(f"tensors   dtype {m.tensor['dtype']}, layout {m.tensor['layout']}")
    print(f"skipped   {len(m.skipped)}" + "".join(f"\n  {s['path']}: {s['reason']}" for s in m.skipped[:10]))
    print(f"ignored   {m.ignored} non-image files")
    for s in m.shards[:10]:
        print(f"  {s.url}  {s.num_samples} samples  {_fmt_bytes(s.num_bytes)}  sha256 {s.sha256[:16]}…")
    if len(m.shards) > 10:
        print(f"  ... {len(m.shards) - 10} more shards")
    if args.keys and m.shards:
        print("keys      " + ", ".join(_first_keys(m, args.keys)))
    return 0


def _first_keys(m, n: int) -> list[str]:
    import tarfile
    from pathlib import Path

    keys: list[str] = []
    with tarfile.open(Path(m.base_url) / m.shards[0].url, mode="r:") as tf:
        for info in tf:
            key = info.name.split(".", 1)[0]
            if key not in keys:
                keys.append(key)
                if len(keys) >= n:
                    break
    return keys


def verify_main(argv=None) -> int:
    from .verify import verify

    p = argparse.ArgumentParser(prog="shardkit verify",
                                description="Re-read every shard; check counts and sha256.")
    p.add_argument("source", help="dataset folder or manifest.json")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        report = verify(args.source, progress=not args.quiet)
    except (ShardkitError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for url, what in report.problems:
        print(f"MISMATCH {url}: {what}", file=sys.stderr)
    status = "OK" if report.ok else f"FAILED ({len(report.problems)} problems)"
    print(f"verify {status}: {report.shards} shards, {report.samples} samples, "
          f"{_fmt_bytes(report.bytes)} read")
    return 0 if report.ok else 1


def demo_main(argv=None) -> int:
    from .demo import run_demo

    p = argparse.ArgumentParser(prog="shardkit demo", description="Make, pack and read a small dataset.")
    p.add_argument("--dir", default="demo-data", help="working folder (default ./demo-data)")
    args = p.parse_args(argv)
    return run_demo(args.dir)


def bench_main(argv=None) -> int:
    from pathlib import Path

    from .bench import format_report, run

    p = argparse.ArgumentParser(prog="shardkit bench",
                                description="Compare loaders on the same images in one run.")
    p.add_argument("source", nargs="?", help="image folder (default: make a synthetic one)")
    p.add_argument("--out", default="bench-out", help="working folder (default ./bench-out)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pack", action="store_true", help="measure packing speed instead of loading")
    args = p.parse_args(argv)
    if args.pack:
        from .bench import run_pack

        report = run_pack(Path(args.source) if args.source else None, Path(args.out),
                          classes=args.classes, per_class=args.per_class, workers=args.workers,
                          repeats=args.repeats)
        for name, sec in report["seconds"].items():
            print(f"{name:32s} {sec:7.2f} s  {report['files'] / sec:7.0f} files/s")
        for name, ratio in report["ratios"].items():
            print(f"{name:40s} {ratio:5.2f}x")
        return 0
    report = run(Path(args.source) if args.source else None, Path(args.out), classes=args.classes,
                 per_class=args.per_class, batch_size=args.batch_size, workers=args.workers,
                 repeats=args.repeats)
    print(format_report(report))
    print(f"(JSON: {Path(args.out) / 'bench.json'})")
    return 0


VERBS = {"pack": pack_main, "show": show_main, "verify": verify_main, "demo": demo_main,
         "bench": bench_main}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in VERBS:
        print("usage: shardkit {" + ",".join(VERBS) + "} ...", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return VERBS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
