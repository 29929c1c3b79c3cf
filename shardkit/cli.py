"""Command line: ``shardkit pack|show|verify|index|demo|bench`` (also ``python tools/<verb>.py``).

Each verb parses its arguments, makes one library call, prints a summary and returns an exit code:
0 success, 1 failure of the data (bad input, verification mismatch), 2 usage errors.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import TYPE_CHECKING, Callable, NamedTuple

from .common import available_cpus, format_bytes
from .errors import ShardkitError

if TYPE_CHECKING:
    from .manifest import Manifest


def _parse_part(text: str) -> tuple[int, int]:
    """``I/N`` (0-based I) or ``slurm`` (from the SLURM_ARRAY_TASK_* variables)."""
    if text == "slurm":
        env = os.environ
        try:
            task, low = int(env["SLURM_ARRAY_TASK_ID"]), int(env["SLURM_ARRAY_TASK_MIN"])
            count, high = int(env["SLURM_ARRAY_TASK_COUNT"]), int(env["SLURM_ARRAY_TASK_MAX"])
        except (KeyError, ValueError):
            raise argparse.ArgumentTypeError(
                "--part slurm needs SLURM_ARRAY_TASK_ID/_MIN/_MAX/_COUNT (run it in an sbatch "
                "--array job)") from None
        if int(env.get("SLURM_ARRAY_TASK_STEP", "1")) != 1 or high - low + 1 != count:
            raise argparse.ArgumentTypeError(
                f"--part slurm needs a contiguous array such as --array=0-{count - 1} (got "
                f"{low}-{high}, {count} tasks); pass --part I/N yourself")
        return task - low, count
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected I/N such as 0/8, or 'slurm'; got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(
            f"part {text}: I is 0-based, from 0 to N-1 (with --array=1-N use "
            "$((SLURM_ARRAY_TASK_ID-1)), or --part slurm)")
    return i, n


def _pack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="image folder (one sub-folder per class, or a flat folder)")
    p.add_argument("dest", help="output folder for the shards and manifest.json")
    p.add_argument("--mode", choices=("raw", "resize", "tensor"), default="raw",
                   help="raw: original bytes; resize: shorter side to --size, JPEG; "
                        "tensor: size x size uint8 .npy (default: raw)")
    p.add_argument("--size", type=int,
                   help="target shorter side in pixels (resize and tensor modes only)")
    p.add_argument("--quality", type=int, default=90,
                   help="JPEG quality (resize mode only; default 90)")
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
    many = p.add_mutually_exclusive_group()
    many.add_argument("--part", type=_parse_part, metavar="I/N",
                      help="pack only part I of N (I is 0-based: 0..N-1) of the shuffled file list; "
                           "the part that completes the set writes manifest.json. 'slurm': take I "
                           "and N from the SLURM array variables")
    many.add_argument("--distributed", action="store_true",
                      help="under torchrun: each process packs part RANK of WORLD_SIZE; rank 0 "
                           "writes manifest.json once every part is done (gloo; imports torch)")
    many.add_argument("--merge-parts", type=int, metavar="N",
                      help="only write manifest.json from the N finished parts in DEST (SRC is "
                           "not read)")


def _pack(args) -> int:
    if args.merge_parts is not None:
        return _merge_main(args)
    world = os.environ.get("WORLD_SIZE", "1")
    if not args.part and not args.distributed and world.isdigit() and int(world) > 1:
        print(f"error: WORLD_SIZE={world}: under torchrun pass --distributed (one part per "
              "process) or --part I/N; otherwise every process would pack everything",
              file=sys.stderr)
        return 2
    kwargs = {"mode": args.mode, "size": args.size, "quality": args.quality,
              "max_bytes": args.max_bytes, "max_samples": args.max_samples,
              "workers": args.workers, "seed": args.seed, "shuffle": not args.no_shuffle,
              "on_error": args.on_error, "resume": args.resume, "overwrite": args.overwrite,
              "progress": not args.quiet, "durable": not args.no_fsync}
    if args.distributed:
        return _pack_distributed(args, kwargs)
    if args.part:
        kwargs["part"] = args.part
    code, m = _run_pack(args, kwargs)
    if code == 0 and not args.quiet:
        _print_pack_summary(args, m)
    return code


def _run_pack(args: argparse.Namespace, kwargs: dict) -> tuple[int, Manifest | None]:
    """``(exit code, manifest or None)``: one pack_folder call; errors and warnings printed."""
    from .packing import pack_folder

    part = kwargs.get("part")
    where = f"part {part[0]}/{part[1]}: " if part and part[1] > 1 else ""
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            return 0, pack_folder(args.src, args.dest, **kwargs)
    except ValueError as exc:
        print(f"error: {where}{exc}", file=sys.stderr)
        return (1 if isinstance(exc, ShardkitError) else 2), None
    except ShardkitError as exc:
        print(f"error: {where}{exc}", file=sys.stderr)
        return 1, None
    finally:  # also when packing failed: a warning may explain the failure
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)


def _merge_main(args) -> int:
    from .packing import merge_parts

    try:
        m = merge_parts(args.dest, args.merge_parts)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, ShardkitError) else 2
    except ShardkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"merged {args.merge_parts} parts: {m.num_samples} samples in {len(m.shards)} shards "
              f"({format_bytes(m.num_bytes)}) -> {args.dest}")
    return 0


def _pack_distributed(args, kwargs) -> int:
    """One part per torchrun process; rank 0 writes the manifest after every rank reported.

    Every rank reports success or failure (an int; nothing is pickled) before any exits, so a
    failed part neither blocks the others nor gets them killed half-way: they finish their parts.
    """
    import datetime

    import torch
    import torch.distributed as dist

    from .packing import merge_parts

    own = not dist.is_initialized()
    if own:  # a part may take hours longer than another: the collectives wait for the slowest
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.workers is None and "LOCAL_WORLD_SIZE" in os.environ:  # share this machine's CPUs
        kwargs["workers"] = max(1, available_cpus() // max(1, int(os.environ["LOCAL_WORLD_SIZE"])))
    kwargs.update(part=(rank, world), finalize=False)
    code, m, bug = 1, None, None
    try:
        code, m = _run_pack(args, kwargs)
    except BaseException as exc:  # noqa: BLE001 -- a bug or an interrupt: tell the other ranks, then raise it
        bug = exc
    codes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(codes, torch.tensor([code], dtype=torch.int64))
    failed = [r for r, c in enumerate(codes) if int(c) != 0]
    result = code
    if rank == 0 and failed:
        print(f"error: manifest.json not written: part(s) {', '.join(map(str, failed))} of "
              f"{world} failed (see their errors above); fix the cause, then run the same command "
              f"with --resume, or only the failed part(s) with --part {failed[0]}/{world} --resume "
              "(finished parts and shards are kept)", file=sys.stderr)
        result = 1
    elif rank == 0 and world > 1:
        assert m is not None  # this rank's code is 0: _run_pack returned pack_folder's manifest
        try:
            merge_parts(args.dest, world, fingerprint=m.options["fingerprint"])
        except (ShardkitError, OSError, ValueError) as exc:
            print(f"error: manifest.json not written: {exc}", file=sys.stderr)
            result = 1
    if code == 0 and not args.quiet:
        _print_pack_summary(args, m, merged=rank == 0 and result == 0)
    dist.barrier()  # no rank exits (which makes torchrun stop the others) before rank 0 is done
    if own:
        dist.destroy_process_group()
    if bug is not None:
        raise bug
    return result


def _print_pack_summary(args, m, merged: bool | None = None) -> None:
    s = m.stats
    resumed = f", {s['resumed_shards']} shards reused" if s["resumed_shards"] else ""
    what = end = ""
    if "part" in s:
        i, n = s["part"]
        what = f"part {i}/{n}: "
        if merged is not None:  # torchrun: rank 0 merges
            end = "; all parts done, manifest.json written" if merged else ""
        elif s["finalized"]:
            end = f"; all {n} parts done, manifest.json written"
        else:
            end = (f"; waiting for part(s) {', '.join(map(str, s['waiting_for']))} (the last part "
                   f"to finish writes manifest.json; or run with --merge-parts {n})")
    print(f"{what}packed {s['samples']} samples into {s['shards']} shards ({format_bytes(s['bytes'])}), "
          f"skipped {s['skipped']}, ignored {s['ignored']} non-image files{resumed}, "
          f"in {s['seconds']:.1f} s -> {args.dest}{end}")
    for entry in m.skipped[:20]:
        print(f"  skipped {entry['path']}: {entry['reason']}", file=sys.stderr)
    if len(m.skipped) > 20:
        print(f"  ... and {len(m.skipped) - 20} more (listed in manifest.json)", file=sys.stderr)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _show_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="dataset folder, manifest.json, or a URL of either (s3://, "
                                  "http(s)://, or any protocol fsspec knows: gs://, az://, …)")
    p.add_argument("--keys", type=int, default=5, help="how many sample keys to print (default 5)")
    look = p.add_argument_group("pictures (without these, show prints a summary)")
    look.add_argument("--grid", metavar="PNG",
                      help="write a contact sheet: --per-class samples of each class, with class "
                           "names and keys (without labels: --samples samples)")
    look.add_argument("--stats", metavar="PNG",
                      help="write one picture of the numbers: samples per class, samples and bytes "
                           "per shard, image sizes (reads every sample once, decodes none)")
    look.add_argument("--html", metavar="DIR",
                      help="write a report into DIR: index.html (the summary, the stats picture, "
                           "thumbnails per class with keys and labels), stats.png, thumbs/")
    look.add_argument("--per-class", type=_positive, default=4, metavar="N",
                      help="samples per class on the sheet and in the report (default 4)")
    look.add_argument("--samples", type=_positive, default=32, metavar="N",
                      help="samples shown of a dataset without labels (default 32)")
    look.add_argument("--seed", type=int, default=0,
                      help="seed of the choice of samples (and of --max-samples's subset; default 0)")
    look.add_argument("--max-samples", type=_positive, metavar="N",
                      help="read at most N samples: --stats looks at a seeded subset of N, --grid "
                           "stops choosing after N (default: --stats reads all, --grid up to "
                           "10,000 or 100 per sample shown)")


def _show(args) -> int:
    if args.grid or args.stats or args.html:
        return _show_pictures(args)
    from .look import summary
    from .manifest import load_manifest

    try:
        m = load_manifest(args.source)  # a dataset, or shards: one .tar, a brace pattern
    except (ShardkitError, OSError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summary(m, args.source, keys=args.keys))
    return 0


def _show_pictures(args) -> int:
    from . import look
    from .access import MapDataset

    choice = {"per_class": args.per_class, "samples": args.samples, "seed": args.seed,
              "max_samples": args.max_samples}
    try:
        m = MapDataset(args.source, decode="raw")
        if args.stats:
            s = look.stats_picture(m, args.stats, seed=args.seed, max_samples=args.max_samples)
            print(f"stats: {s['looked_at']} samples read in {s['seconds']:.1f} s -> {args.stats}")
        if args.grid:
            g = look.contact_sheet(m, args.grid, **choice)
            print(f"grid: {sum(len(picks) for _, picks in g['groups'])} samples, {g['rows']} rows "
                  f"({g['size'][0]}x{g['size'][1]} px) -> {args.grid}")
            for e in g["errors"][:10]:
                print(f"  cannot decode sample {e['index']} ({e['key']!r}): {e['error']}",
                      file=sys.stderr)
        if args.html:
            r = look.html_report(m, args.html, keys=args.keys, **choice)
            print(f"html: {r['thumbs']} thumbnails -> {os.path.join(args.html, 'index.html')}")
    except (ShardkitError, OSError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="dataset folder, manifest.json, or a URL of either (s3://, "
                                  "http(s)://, or any protocol fsspec knows: gs://, az://, …)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _verify(args) -> int:
    from .storage import redact
    from .verify import verify

    try:
        report = verify(args.source, progress=not args.quiet)
    except (ShardkitError, OSError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for url, what in report.problems:
        print(f"MISMATCH {redact(url)}: {what}", file=sys.stderr)
    status = "OK" if report.ok else f"FAILED ({len(report.problems)} problems)"
    print(f"verify {status}: {report.shards} shards, {report.samples} samples, "
          f"{format_bytes(report.bytes)} read")
    return 0 if report.ok else 1


def _index_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", nargs="+",
                   help="webdataset shards: a folder or prefix of .tar (.tar.gz, .tgz) files, "
                        "a brace pattern "
                        "('s3://bucket/train/shard-{000000..000999}.tar', quoted), or shard "
                        "paths and URLs (local, s3://, http(s)://, gs://, hf://, …)")
    p.add_argument("--out", help="where to write .shardkit/ (the manifest and index files); "
                                 "default: beside the shards (they must then be in one "
                                 "writable folder or s3:// prefix); needed for shards in several "
                                 "places, read-only stores and URLs with query strings")
    p.add_argument("--workers", type=int, help="shards indexed at once (default: all CPUs)")
    p.add_argument("--resume", action="store_true",
                   help="keep the shards an interrupted run finished")
    p.add_argument("--label", default="auto",
                   help="where labels come from: auto (the first of .cls, .cls2, .label the "
                        "samples have, else none), a field such as cls, json:KEY (a key of each "
                        "sample's .json), or none (default auto)")
    p.add_argument("--hash", default="blake3", choices=("blake3", "sha256"),
                   help="what the manifest records of each shard's bytes: blake3 (default; "
                        "~2.5x faster than sha256 a core, so a local index runs at disk speed) "
                        "or sha256 (what shardkit releases before this one can read)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    parts = p.add_mutually_exclusive_group()
    parts.add_argument("--part", type=_parse_part, metavar="I/N",
                       help="index part I of N (0-based; or 'slurm' in an array job): a slice of "
                            "the sorted shards, one machine each; the last part to finish writes "
                            "the manifest")
    parts.add_argument("--merge-parts", type=int, metavar="N",
                       help="write the manifest of an index made in N parts (SOURCE: where "
                            ".shardkit/ is)")


def _index(args) -> int:
    from .indexer import index_shards, merge_index_parts

    if args.workers is not None and args.workers < 1:
        print(f"error: --workers must be at least 1, got {args.workers}", file=sys.stderr)
        return 2
    source = args.source[0] if len(args.source) == 1 else args.source
    try:
        if args.merge_parts is not None:
            m = merge_index_parts(args.out or args.source[0], args.merge_parts)
        else:
            m = index_shards(source, args.out, workers=args.workers, resume=args.resume,
                             label=args.label, progress=not args.quiet, part=args.part,
                             hash=args.hash)
    except (ShardkitError, OSError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.part is not None and not m.options.get("parts"):
        print(f"indexed part {args.part[0]}/{args.part[1]}: {len(m.shards)} shards, "
              f"{m.num_samples} samples; the manifest comes when every part is done")
        return 0
    classes = "no labels" if m.classes is None else f"{len(m.classes)} classes"
    print(f"indexed {len(m.shards)} shards, {m.num_samples} samples, "
          f"{format_bytes(m.num_bytes)}, {classes} -> {m.base_url}")
    print(f"read it with StreamingDataset({m.base_url!r})")
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default="demo-data", help="working folder (default ./demo-data)")


def _demo(args) -> int:
    from .bench.demo import run_demo

    return run_demo(args.dir)


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", nargs="?",
                   help="image folder (default: make a synthetic one); with --auto: a dataset")
    p.add_argument("--out", default="bench-out", help="working folder (default ./bench-out)")
    p.add_argument("--classes", type=int, default=10,
                   help="classes of the synthetic image folder (default 10)")
    p.add_argument("--per-class", type=int, default=200,
                   help="images per class of the synthetic folder (default 200)")
    p.add_argument("--batch-size", type=int, default=256, help="batch size (default 256)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of each configuration, interleaved; the median counts (default 3)")
    p.add_argument("--no-cold", action="store_true", help="skip the cold-cache runs")
    p.add_argument("--pack", action="store_true", help="measure packing speed instead of loading")
    p.add_argument("--auto", action="store_true",
                   help="sweep num_workers and prefetch on SOURCE (a dataset) and name the bottleneck")
    p.add_argument("--s3", action="store_true",
                   help="local disk against a local S3 server (moto, own process): cold, no, warm cache")
    p.add_argument("--mix", action="store_true",
                   help="the raw shards as one dataset against a 50/50 mixture of their halves, "
                        "alternated")
    p.add_argument("--random", action="store_true",
                   help="1,000 random reads through MapDataset against a naive ImageFolder "
                        "doing the same reads (bytes and uint8, warm and cold)")
    p.add_argument("--index", action="store_true",
                   help="time `shardkit index` on SOURCE (a folder of .tar shards; default: the "
                        "synthetic folder packed raw) against `cat` of the same files, warm and cold")
    p.add_argument("--hdd", action="store_true",
                   help="the loaders on an emulated HDD (cgroup: 150 MB/s, 120 reads/s; root), "
                        "cold, against the disk unthrottled and `cat`")
    p.add_argument("--block-size", type=_block_size, default=None,
                   help="with --hdd: block_size of the shardkit rows, samples or 'shard' (whole "
                        "shards; default: the dataset's)")


def _block_size(text: str) -> int | str:
    """``--block-size``: what ``StreamingDataset(block_size=)`` takes (checked by its rule)."""
    from .config import PlanConfig

    value: int | str = int(text) if text.lstrip("-").isdigit() else text
    try:
        PlanConfig.of(block_size=value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


class _BenchRun(NamedTuple):
    """``bench --FLAG``: a run of one benchmark module, its report printed and its JSON left in
    --out. ``options``: the run's keyword arguments beyond the image folder, --out, --classes and
    --per-class (``cold`` is ``not --no-cold``)."""

    run: Callable[..., dict]
    format: Callable[[dict], str]
    json_name: str
    options: tuple[str, ...]
    writes_json: bool = False  # the run writes the JSON itself
    unavailable: tuple[type[Exception], ...] = ()  # "cannot run here": its message, exit code 1


def _bench_runs() -> dict[str, _BenchRun]:
    """The ``bench`` flags that each run one benchmark module, in the order they are tried."""
    from .bench import hdd, indexspeed, mix, randomaccess, s3

    return {
        "s3": _BenchRun(s3.run_s3, s3.format_s3_report, "bench-s3.json",
                        ("batch_size", "workers", "repeats"), writes_json=True),
        "mix": _BenchRun(mix.run_mix, mix.format_mix_report, "bench-mix.json",
                         ("batch_size", "workers", "repeats")),
        "random": _BenchRun(randomaccess.run_random, randomaccess.format_random_report,
                            "bench-random.json", ("repeats", "cold")),
        "index": _BenchRun(indexspeed.run_index, indexspeed.format_index_report,
                           "bench-index.json", ("workers", "repeats")),
        "hdd": _BenchRun(hdd.run_hdd, hdd.format_hdd_report, "bench-hdd.json",
                         ("batch_size", "workers", "repeats", "block_size"), writes_json=True,
                         unavailable=(hdd.CannotThrottle,)),
    }


def _bench_run(args, bench: _BenchRun) -> int:
    """Run ``bench``, print its report, leave its JSON in --out and say where."""
    import json
    from pathlib import Path

    values = {**vars(args), "cold": not args.no_cold}
    out = Path(args.out)
    try:
        report = bench.run(Path(args.source) if args.source else None, out, classes=args.classes,
                           per_class=args.per_class,
                           **{name: values[name] for name in bench.options})
    except bench.unavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(bench.format(report))
    if not bench.writes_json:
        (out / bench.json_name).write_text(json.dumps(report, indent=1))
    print(f"(JSON: {out / bench.json_name})")
    return 0


def _bench(args) -> int:
    import json
    from pathlib import Path

    from .bench.loaders import auto, format_report, run, run_pack

    for flag, bench in _bench_runs().items():
        if getattr(args, flag):
            return _bench_run(args, bench)
    if args.auto:
        if not args.source:
            print("error: --auto needs SOURCE, a packed dataset", file=sys.stderr)
            return 2
        result = auto(Path(args.source), batch_size=args.batch_size)
        print(json.dumps(result, indent=1))
        best = result["best"]
        print(f"use make_loader(ds, num_workers={best['num_workers']}, prefetch_factor="
              f"{best['prefetch_factor']}): {best['samples_per_s']:.0f} samples/s; "
              f"bottleneck: {result['bottleneck']}")
        return 0
    if args.pack:
        report = run_pack(Path(args.source) if args.source else None, Path(args.out),
                          classes=args.classes, per_class=args.per_class, workers=args.workers,
                          repeats=args.repeats)
        for name, sec in report["seconds"].items():
            print(f"{name:34s} {sec:7.2f} s  {report['files'] / sec:7.0f} files/s")
        for name, ratio in report["ratios"].items():
            print(f"{name:40s} {ratio:5.2f}x")
        return 0
    report = run(Path(args.source) if args.source else None, Path(args.out), classes=args.classes,
                 per_class=args.per_class, batch_size=args.batch_size, workers=args.workers,
                 repeats=args.repeats, cold=not args.no_cold)
    print(format_report(report))
    print(f"(JSON: {Path(args.out) / 'bench.json'}, chart: {Path(args.out) / 'bench.png'})")
    return 0


def _compact_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="dataset folder or URL (s3://, http(s)://, …)")
    p.add_argument("--expand", action="store_true",
                   help="write the shard list back into one manifest.json")


def _compact(args) -> int:
    from .manifest import compact

    try:
        m = compact(args.source, expand=args.expand)
    except (ShardkitError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    form = "one manifest.json" if args.expand else ".shardkit/manifest.cols + manifest.json"
    print(f"{m.base_url}: {len(m.shards)} shards, {m.num_samples} samples; shard list in {form}")
    return 0


# verb -> (what it does, in one line; its arguments; what it runs)
VERBS = {
    "pack": ("pack an image folder into tar shards and manifest.json", _pack_args, _pack),
    "show": ("summarise a dataset: counts, classes, shards, options, a few keys; or draw it "
             "(--grid, --stats, --html)", _show_args, _show),
    "verify": ("re-read every shard: sizes, hashes, index files, sample counts", _verify_args,
               _verify),
    "index": ("index existing webdataset shards so that shardkit can read them where they are",
              _index_args, _index),
    "demo": ("make a small image folder, pack it, stream it, compare with ImageFolder",
             _demo_args, _demo),
    "bench": ("compare loaders (or packing) on the same images in one run", _bench_args, _bench),
    "compact": ("write a dataset's shard list column-wise (manifest.cols), mapped by every "
                "process instead of parsed", _compact_args, _compact),
}


def _verb_main(verb: str):
    what, add, run = VERBS[verb]

    def verb_main(argv=None) -> int:
        p = argparse.ArgumentParser(prog=f"shardkit {verb}", description=what[0].upper() + what[1:] + ".")
        add(p)
        return run(p.parse_args(argv))

    verb_main.__name__ = f"{verb}_main"
    verb_main.__doc__ = f"``shardkit {verb}``: {what} (``tools/{verb}.py``)."
    return verb_main


pack_main, show_main, verify_main, index_main, demo_main, bench_main, compact_main = map(
    _verb_main, VERBS)


def main(argv=None) -> int:
    from ._version import __version__

    p = argparse.ArgumentParser(
        prog="shardkit", description="Pack image folders into tar shards and stream them into "
        "PyTorch training.", epilog="Each verb has its own options: shardkit VERB --help.")
    p.add_argument("--version", action="version", version=f"shardkit {__version__}")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", title="verbs", required=True)
    for verb, (what, add, _) in VERBS.items():
        add(verbs.add_parser(verb, help=what, description=what[0].upper() + what[1:] + "."))
    args = p.parse_args(sys.argv[1:] if argv is None else list(argv))
    # shardkit's own lines at INFO; other libraries' (an S3 client's "Found credentials", ...)
    # only from WARNING on
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("shardkit").setLevel(logging.INFO)
    return VERBS[args.verb][2](args)


if __name__ == "__main__":
    sys.exit(main())
