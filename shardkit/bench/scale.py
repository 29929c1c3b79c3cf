"""Scale on paper, measured by simulation: a 100,000-shard, 1,000,000,000-sample manifest.

:func:`synthetic_manifest` builds such a manifest in memory (no shard exists; names, counts and
digests look like ``pack``'s), :func:`shardkit.manifest.write_manifest` writes it as
``manifest.json`` and its compact companion ``manifest.msgpack``, and :func:`run` measures, each
case in a fresh process that has already imported torch (as a training process has), the wall
time and the peak memory beyond that of

- loading the manifest (JSON, msgpack),
- computing the epoch plan of one DataLoader worker of ``world_size`` ranks x ``num_workers``
  workers, and of all the workers of one rank,

plus the size of a per-worker resume state. ``python tools/scale.py`` prints the table and writes
the figures as JSON; ``--companion SOURCE`` adds ``manifest.msgpack`` beside an existing
dataset's ``manifest.json`` (:func:`shardkit.manifest.write_msgpack_companion`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..columns import COMPACT_SHARDS
from ..manifest import Manifest, ShardInfo, write_manifest, write_msgpack_companion
from ..shardformat import MANIFEST_PATH, MSGPACK_PATH

__all__ = ["run", "synthetic_manifest", "resume_state_sizes", "format_table", "main"]

NUM_SHARDS = 100_000
NUM_SAMPLES = 1_000_000_000
WORLD_SIZE = 1024
NUM_WORKERS = 8
TIME_LIMIT_S = 1.0
MEMORY_LIMIT = 500 * 2**20
COMPACT_LIMIT = 200 * 2**20  # the compact manifest: load + plan one worker, over torch
RANK_LIMIT = 400 * 2**20  # a rank's forked workers together (PSS: shared pages counted once)
STATE_LIMIT = 4096


def synthetic_manifest(num_shards: int = NUM_SHARDS, num_samples: int = NUM_SAMPLES, *,
                       seed: int = 0, jitter: float = 0.1, prefix: str = "shard",
                       bytes_per_sample: int = 110_000, classes: int = 1000) -> Manifest:
    """A valid manifest of ``num_shards`` shards holding ``num_samples`` samples in all.

    Shard sizes vary by about ``jitter`` around the mean (so the plan sees uneven shards, and
    short last blocks), URLs follow ``pack``'s ``<prefix>-NNNNNN.tar`` / ``.idx`` names, digests
    are seeded random bytes.
    """
    if num_shards < 1 or num_samples < 0:
        raise ValueError("need num_shards >= 1 and num_samples >= 0")
    rng = np.random.default_rng(seed)
    mean = num_samples / num_shards
    sizes = np.floor(mean * (1 + jitter * rng.uniform(-1, 1, num_shards))).astype(np.int64)
    sizes = np.maximum(sizes, 0)
    diff = num_samples - int(sizes.sum())  # spread the rounding difference over the shards
    q, r = divmod(abs(diff), num_shards)
    step = np.full(num_shards, q, dtype=np.int64)
    step[:r] += 1
    sizes = sizes + step if diff >= 0 else sizes - step
    while sizes.min() < 0:  # only with tiny means: move negatives onto the largest shard
        neg = int(-sizes[sizes < 0].sum())
        sizes[sizes < 0] = 0
        sizes[int(np.argmax(sizes))] -= neg
    sha = rng.bytes(32 * num_shards).hex()
    index_sha = rng.bytes(32 * num_shards).hex()
    shards = [ShardInfo(f"{prefix}-{i:06d}.tar", n, n * bytes_per_sample + 1024,
                        sha[64 * i:64 * i + 64], f"{prefix}-{i:06d}.idx",
                        index_sha[64 * i:64 * i + 64])
              for i, n in enumerate(sizes.tolist())]
    return Manifest(classes=[f"class_{c:04d}" for c in range(classes)], num_samples=num_samples,
                    shards=shards, options={"mode": "raw", "size": None, "quality": 90,
                                            "seed": seed, "shuffle": True, "synthetic": True})


def resume_state_sizes(num_workers: int = NUM_WORKERS, world_size: int = WORLD_SIZE,
                       per_rank: int = NUM_SAMPLES // WORLD_SIZE) -> dict:
    """Bytes of ``json.dumps`` of resume states shaped like ``StreamingDataset.state_dict()``.

    ``worker``: the state one DataLoader worker reports (the ``StatefulDataLoader`` protocol);
    ``rank``: the merged state of a rank with every worker's count. Counts are set to their
    largest possible values, so these are upper bounds for this scale.
    """
    base = {"version": 1, "seed": 2**63 - 1, "epoch": 10**6, "rank": world_size - 1,
            "world_size": world_size}
    worker = {**base, "num_workers": num_workers, "shift": num_workers - 1,
              "consumed": {str(num_workers - 1): per_rank}}
    rank = {**base, "num_workers": num_workers, "shift": num_workers - 1,
            "consumed": {str(w): per_rank for w in range(num_workers)}}
    return {"worker": len(json.dumps(worker)), "rank": len(json.dumps(rank))}


# One measured case, run as ``python -c`` in a fresh process; it imports torch first and counts
# memory from there: /proc/self/clear_refs resets the peak (VmHWM) to the current RSS.
_CHILD = r"""
import json, sys, time
def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out
args = json.loads(sys.argv[1])
import importlib, torch, numpy as np
Manifest = importlib.import_module(args["package"]).Manifest
epoch_plan = importlib.import_module(args["package"] + ".plan").epoch_plan
base = status()["VmRSS"]
with open("/proc/self/smaps_rollup") as f:
    args["pss_base"] = next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    reset = status()["VmHWM"] <= base + (1 << 20)
except OSError:
    reset = False
t0 = time.perf_counter()
each = []
for _ in range(args.get("sources", 1)):
    if args["source"]:
        m = Manifest.load(args["source"])
        each.append(m.shard_sizes() if hasattr(m, "shard_sizes")
                    else [s.num_samples for s in m.shards])
    else:
        each.append(np.load(args["sizes"]))
sizes = each[0]
t1 = time.perf_counter()
if len(each) > 1:  # a mixture: weights 5 : 3 : 2 ..., an epoch as large as one source
    layout = importlib.import_module(args["package"] + ".layout")
    totals = [int(np.sum(s)) for s in each]
    weights = [(float(len(each) - i), None, None) for i in range(len(each))]
    shares = layout.epoch_shares(totals, weights, epoch_size=totals[0])
    sizes = layout.Layout.of_sources(each, shares, seed=0, epoch=args["epoch"], shuffle=True)
def pss(pid="self"):
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0
def plan(w):
    return epoch_plan(sizes, seed=0, epoch=args["epoch"], rank=args["rank"],
                      world_size=args["world_size"], worker=w, num_workers=args["num_workers"],
                      block_size=64, shuffle_buffer=1000)
spans = samples = 0
rank_pss = None
if args.get("fork"):  # a rank's DataLoader workers: forked after the load, each plans its own
    import os
    kids = []
    for w in args["workers"]:
        ready, go = os.pipe(), os.pipe()
        pid = os.fork()
        if pid == 0:
            p = plan(w)
            os.write(ready[1], b"%d %d" % (len(p.spans), p.num_samples))
            os.read(go[0], 1)  # held until the parent has measured every worker
            os._exit(0)
        kids.append((pid, ready, go))
    for pid, ready, go in kids:
        n_spans, n_samples = map(int, os.read(ready[0], 64).split())
        spans += n_spans
        samples += n_samples
    rank_pss = pss() + sum(pss(pid) for pid, _, _ in kids) - args["pss_base"]
    for pid, ready, go in kids:
        os.write(go[1], b"x")
        os.waitpid(pid, 0)
else:
    for w in args["workers"]:
        p = plan(w)
        spans += len(p.spans)
        samples += p.num_samples
t2 = time.perf_counter()
end = status()
print(json.dumps({"load_s": t1 - t0, "plan_s": t2 - t1, "total_s": t2 - t0,
                  "peak_beyond_torch": end["VmHWM"] - base, "hwm_reset": reset,
                  "rss_after_torch": base, "spans": spans, "samples": samples,
                  "rank_pss": rank_pss}))
"""


def _child(args: dict, baseline: str | None = None) -> dict:
    env = dict(os.environ)
    args = {**args, "package": "shardkit"}
    if baseline:  # a copy of another shardkit package, importable under another name
        env["PYTHONPATH"] = str(Path(baseline).parent) + os.pathsep + env.get("PYTHONPATH", "")
        args["package"] = Path(baseline).name
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"measurement failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(folder=None, *, num_shards: int = NUM_SHARDS, num_samples: int = NUM_SAMPLES,
        world_size: int = WORLD_SIZE, num_workers: int = NUM_WORKERS, repeat: int = 3,
        formats=("json", "msgpack", "compact"), baseline: str | None = None,
        log=print) -> dict:
    """Build, write and measure (see the module docstring); returns the figures as a dict.

    Each case runs ``repeat`` times in a fresh process; times are the median (and min), memory
    the largest peak seen. ``baseline`` measures another copy of the ``shardkit`` package
    folder instead (copied under another name, as the installed one shadows it).
    """
    tmp = None
    if folder is None:
        tmp = tempfile.TemporaryDirectory(prefix="shardkit-scale-")
        folder = tmp.name
    folder = Path(folder)
    try:
        log(f"building a synthetic manifest: {num_shards:,} shards, {num_samples:,} samples")
        manifest = synthetic_manifest(num_shards, num_samples)
        write_manifest(manifest, folder, compact=False)  # one manifest.json, and msgpack
        write_manifest(manifest, folder / "compact", compact=True)  # + manifest.cols
        np.save(folder / "sizes.npy", manifest.shard_sizes())
        files = {"json": folder / MANIFEST_PATH, "msgpack": folder / MSGPACK_PATH,
                 "compact": folder / "compact"}
        sizes_of = {"json": files["json"].stat().st_size,
                    "msgpack": files["msgpack"].stat().st_size,
                    "compact": sum(p.stat().st_size for p in (folder / "compact").rglob("*")
                                   if p.is_file())}
        result: dict[str, Any] = {
            "num_shards": num_shards, "num_samples": num_samples, "world_size": world_size,
            "num_workers": num_workers, "block_size": 64, "shuffle_buffer": 1000,
            "python": sys.version.split()[0], "cpus": os.cpu_count(),
            "file_bytes": {k: sizes_of[k] for k in formats},
            "limits": {"time_s": TIME_LIMIT_S, "memory_bytes": MEMORY_LIMIT,
                       "state_bytes": STATE_LIMIT, "compact_memory_bytes": COMPACT_LIMIT,
                       "rank_memory_bytes": RANK_LIMIT},
            "cases": [],
        }
        last = world_size - 1
        one = {"rank": last, "workers": [num_workers - 1]}
        every = {"rank": last, "workers": list(range(num_workers))}
        cases = [("plan only, 1 worker", None, one)]
        for fmt in formats:
            cases += [(f"load {fmt}", fmt, {"rank": 0, "workers": []}),
                      (f"load {fmt} + plan 1 worker", fmt, one),
                      (f"load {fmt} + plan {num_workers} workers of a rank", fmt, every)]
            if fmt == "compact":  # DataLoader workers forked after the load: memory, shared once
                cases += [(f"load {fmt} + {num_workers} forked workers (PSS)", fmt,
                           {**every, "fork": True})]
        if not baseline:  # a mixture of three such datasets (layout.py): weights 3 : 2 : 1
            mixed = {**one, "sources": 3}
            cases += [("mixture of 3: plan only, 1 worker", None, mixed)]
            cases += [(f"mixture of 3: load {fmt} + plan 1 worker", fmt, mixed)
                      for fmt in formats if fmt == "compact"]
        for name, fmt, which in cases:
            runs = []
            for _ in range(repeat):
                args = {"source": str(files[fmt]) if fmt else None,
                        "sizes": str(folder / "sizes.npy"), "epoch": 3,
                        "world_size": world_size, "num_workers": num_workers, **which}
                runs.append(_child(args, baseline))
            case = {"case": name, "format": fmt, "rank": which["rank"],
                    "workers": which["workers"], "repeat": repeat,
                    "hwm_reset": all(r["hwm_reset"] for r in runs),
                    "rss_after_torch": max(r["rss_after_torch"] for r in runs),
                    "peak_beyond_torch": max(r["peak_beyond_torch"] for r in runs),
                    "spans": runs[0]["spans"], "samples": runs[0]["samples"],
                    "rank_pss": max((r.get("rank_pss") or 0) for r in runs) or None}
            for key in ("load_s", "plan_s", "total_s"):
                case[key] = statistics.median(r[key] for r in runs)
                case[key + "_min"] = min(r[key] for r in runs)
            # a mixture's manifests load one by one, each as above (their cost is the scale
            # issue's); what the mixture adds is the plan's (layout + worker plan)
            sources = int(which.get("sources", 1))  # type: ignore[call-overload]
            timed = case["plan_s"] if sources > 1 else case["total_s"]
            memory = COMPACT_LIMIT if fmt == "compact" and sources == 1 else MEMORY_LIMIT
            case["ok"] = timed < TIME_LIMIT_S and case["peak_beyond_torch"] < memory
            if case["rank_pss"] is not None:  # the forked workers: time is not the point
                case["ok"] = case["rank_pss"] < RANK_LIMIT
            # the one-file forms are references above COMPACT_SHARDS (pack writes the compact one)
            # and a rank's workers are processes of their own: the forked row judges them
            in_one = len(list(which["workers"])) > 1 and not which.get("fork")  # type: ignore[call-overload]
            case["judged"] = (fmt not in ("json", "msgpack") or num_shards < COMPACT_SHARDS) \
                and not (fmt == "compact" and in_one)
            result["cases"].append(case)
            log(f"  {name}: {case['total_s']:.3f} s, "
                f"+{case['peak_beyond_torch'] / 2**20:.0f} MiB")
        result["resume_state_bytes"] = resume_state_sizes(num_workers, world_size,
                                                          num_samples // world_size)
        result["ok"] = all(c["ok"] for c in result["cases"] if c["judged"]) \
            and result["resume_state_bytes"]["worker"] < STATE_LIMIT
        return result
    finally:
        if tmp is not None:
            tmp.cleanup()


def format_table(result: dict) -> str:
    mib = 2**20
    lines = [f"{result['num_shards']:,} shards, {result['num_samples']:,} samples; plan for "
             f"{result['world_size']} ranks x {result['num_workers']} workers "
             f"(block 64, buffer 1000), last rank; median of {result['cases'][0]['repeat']} fresh "
             "processes",
             "files: " + ", ".join(f"{k} {v / mib:.1f} MiB"
                                   for k, v in result["file_bytes"].items()),
             "",
             f"{'case':48s} {'load s':>7s} {'plan s':>7s} {'total s':>8s} {'peak MiB':>9s} "
             f"{'rank MiB':>9s}  ok",
             "-" * 96]
    for c in result["cases"]:
        rank = "" if c.get("rank_pss") is None else f"{c['rank_pss'] / mib:9.0f}"
        ok = ("yes" if c["ok"] else "NO") if c.get("judged", True) else \
            ("(yes)" if c["ok"] else "(no)")
        lines.append(f"{c['case']:48s} {c['load_s']:7.3f} {c['plan_s']:7.3f} {c['total_s']:8.3f} "
                     f"{c['peak_beyond_torch'] / mib:9.0f} {rank:>9s}  {ok}")
    s = result["resume_state_bytes"]
    limits = result["limits"]
    lines += ["", f"resume state (json): {s['worker']} bytes per worker, {s['rank']} bytes for a "
                  f"rank of {result['num_workers']} workers (limit {STATE_LIMIT})",
              f"peak = VmHWM beyond the RSS after `import torch` "
              f"({result['cases'][0]['rss_after_torch'] / mib:.0f} MiB here); rank MiB = the "
              "PSS the forked workers and their parent add together (shared pages counted once)",
              f"limits: < {TIME_LIMIT_S:g} s; < {limits['compact_memory_bytes'] // mib} MiB for "
              f"the compact manifest, < {MEMORY_LIMIT // mib} MiB otherwise; a rank's workers "
              f"< {limits['rank_memory_bytes'] // mib} MiB; a mixture: its plan s (layout "
              "included; its manifests load one by one); (in parentheses): for reference, the "
              f"one-file forms above {COMPACT_SHARDS:,} shards (where pack and index write the "
              "compact one) and a rank's workers planned in one process",
              "all within limits" if result["ok"] else "SOME FIGURES ARE OVER THE LIMITS"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tools/scale.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=NUM_SHARDS)
    p.add_argument("--samples", type=float, default=NUM_SAMPLES)
    p.add_argument("--world-size", type=int, default=WORLD_SIZE)
    p.add_argument("--workers", type=int, default=NUM_WORKERS)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--keep", help="write the synthetic manifests into this folder and keep them")
    p.add_argument("--out", default="scale-results.json", help="where to write the figures")
    p.add_argument("--baseline", metavar="PACKAGE_DIR",
                   help="also measure another shardkit package folder (e.g. from `git archive "
                        "HEAD shardkit`), JSON only")
    p.add_argument("--index-sim", type=int, metavar="SHARDS",
                   help="instead: time `shardkit index` of SHARDS tiny shards on a local S3 "
                        "server (moto): listing, --part indexing, merge, load")
    p.add_argument("--parts", type=int, default=4, help="parts of --index-sim (default 4)")
    p.add_argument("--companion", metavar="SOURCE",
                   help="instead: write manifest.msgpack beside SOURCE's manifest.json")
    args = p.parse_args(argv)
    if args.index_sim:
        from .indexscale import format_index_scale, run_index_scale

        report = run_index_scale(args.index_sim, args.parts,
                                 log=lambda msg: print(msg, file=sys.stderr))
        print(format_index_scale(report))
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"\nfigures written to {args.out}")
        return 0
    if args.companion:
        m = write_msgpack_companion(args.companion)
        print(f"wrote {m.base_url}/{MSGPACK_PATH} ({len(m.shards)} shards)")
        return 0
    kw = dict(num_shards=args.shards, num_samples=int(args.samples), world_size=args.world_size,
              num_workers=args.workers, repeat=args.repeat)
    result = run(args.keep, **kw, log=lambda msg: print(msg, file=sys.stderr))
    if args.baseline:
        import shutil

        with tempfile.TemporaryDirectory(prefix="shardkit-baseline-") as tmp:
            copy = Path(tmp) / "shardkit_baseline"
            shutil.copytree(args.baseline, copy)
            result["baseline"] = run(None, **kw, formats=("json",), baseline=str(copy),
                                     log=lambda msg: print(msg, file=sys.stderr))
        result["baseline"]["package"] = args.baseline
    print(format_table(result))
    if args.baseline:
        print(f"\nbaseline ({args.baseline}):\n" + format_table(result["baseline"]))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nfigures written to {args.out}")
    return 0 if result["ok"] else 1
