"""Packing in parts (``part=(i, n)``, ``--part I/N``, torchrun ``--distributed``): one dataset.

Every case compares with a single-process pack of the same folder and seed: the same samples with
the same bytes in the same order, one ``manifest.json`` (written only once every part finished,
with the single pack's options plus ``parts``), valid tars, ``verify`` passing.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

import shardkit
from shardkit import Manifest, pack_folder, verify
from shardkit.errors import DestinationError
from shardkit.packing.folder import scan_folder
from shardkit.packing.parts import merge_parts, part_manifest_name, part_tag
from shardkit.shardformat import MANIFEST_PATH

from conftest import (
    REPO,
    all_files,
    make_class_folder,
    samples_of,
    subprocess_env,
    write,
)

PACK = [sys.executable, str(REPO / "tools" / "pack.py")]
OPTS = {"max_samples": 3, "seed": 5}
CLI_OPTS = ["--max-samples", "3", "--seed", "5", "--workers", "1", "--quiet"]
TIMEOUT = 120  # seconds for any subprocess


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """3 classes x 7 JPEGs, one unreadable 'image' (skipped with on_error='skip') and a text file."""
    root = make_class_folder(tmp_path_factory.mktemp("parts") / "src", per_class=7)
    write(root / "dog" / "broken.jpg", b"not a jpeg at all")
    write(root / "eel" / "notes.txt", b"ignored")
    return root


@pytest.fixture(scope="module")
def single(folder, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("single") / "out"
    pack_folder(folder, dest, progress=False, workers=1, on_error="skip", **OPTS)
    return dest


def samples(dest) -> list[tuple[str, dict]]:
    """``(key, {field: bytes})`` of every sample, in manifest order."""
    m = Manifest.load(dest)
    out = []
    for shard in m.shards:
        out += [(s.pop("__key__"), s) for s in samples_of(Path(dest) / shard.url)]
    return out


def check_same_dataset(dest, single_dest, n: int) -> Manifest:
    m, ref = Manifest.load(dest), Manifest.load(single_dest)
    assert samples(dest) == samples(single_dest)  # keys, member bytes and order
    assert m.num_samples == ref.num_samples and m.classes == ref.classes
    assert m.skipped == ref.skipped and m.ignored == ref.ignored and m.tensor == ref.tensor
    options = dict(m.options)
    assert options.pop("parts", 1) == n and options == ref.options
    assert verify(dest).ok
    listed = {s.url for s in m.shards} | {s.index_url for s in m.shards}
    assert listed == {p.relative_to(dest).as_posix() for p in Path(dest).rglob("*")
                      if p.suffix in (".tar", ".idx")}
    return m


def part_slice(folder: Path, i: int, n: int, seed: int = OPTS["seed"]) -> list[str]:
    """The files part ``i`` of ``n`` packs, in order: the same scan and shuffle as pack_folder."""
    order = [item.relpath for item in scan_folder(folder).items]
    random.Random(seed).shuffle(order)
    return order[i * len(order) // n:(i + 1) * len(order) // n]


def run_pack(*args, env=None, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*PACK, *map(str, args)], capture_output=True, text=True,
                          timeout=TIMEOUT, env=env or subprocess_env(), check=False)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


# --------------------------------------------------------------------------- in process


@pytest.mark.parametrize("n", [1, 2, 3])
def test_parts_in_process_make_the_single_pack(folder, single, tmp_path, n):
    dest = tmp_path / "out"
    for i in random.Random(n).sample(range(n), n):  # any order of completion
        assert not (dest / MANIFEST_PATH).exists()  # only once every part is done
        m = pack_folder(folder, dest, progress=False, workers=1, on_error="skip", part=(i, n), **OPTS)
    assert m.stats.get("finalized", True) and not m.stats.get("waiting_for")
    merged = check_same_dataset(dest, single, n)
    if n > 1:
        assert [s.url for s in merged.shards] == sorted(s.url for s in merged.shards)
        assert merged.shards[0].url == f"shard-{part_tag((0, n))}-000000.tar"
        assert all("." not in s.url[:-4] for s in merged.shards)  # webdataset keys split at dots
        # Re-running a finished part is refused without --resume, a no-op with it.
        with pytest.raises(DestinationError, match="resume"):
            pack_folder(folder, dest, progress=False, on_error="skip", part=(0, n), **OPTS)
        before = all_files(dest)
        again = pack_folder(folder, dest, progress=False, on_error="skip", part=(0, n), resume=True,
                            **OPTS)
        assert again.stats["finalized"] and all_files(dest) == before


def test_streaming_dataset_reads_every_sample_of_a_merged_pack(folder, single, tmp_path):
    dest = tmp_path / "out"
    for i in range(3):
        pack_folder(folder, dest, progress=False, workers=1, on_error="skip", part=(i, 3), **OPTS)
    ds = shardkit.StreamingDataset(dest, shuffle=False, decode="raw", with_keys=True)
    got = sorted((key, bytes(img)) for img, _, key in ds)
    want = sorted((key, s["jpg"]) for key, s in samples(single))
    assert got == want and len(got) == 21


def test_merge_waits_for_every_part_and_names_the_missing_ones(folder, tmp_path):
    dest = tmp_path / "out"
    m = pack_folder(folder, dest, progress=False, on_error="skip", part=(2, 4), **OPTS)
    assert not m.stats["finalized"] and m.stats["waiting_for"] == [0, 1, 3]
    assert m.options["part"] == [2, 4] and (dest / part_manifest_name((2, 4))).exists()
    with pytest.raises(DestinationError, match=r"part\(s\) 0-1, 3 of 0..3 not finished"):
        merge_parts(dest, 4)
    # Parts of another pack (other seed) never complete this one.
    for i in (0, 1):
        pack_folder(folder, dest, progress=False, on_error="skip", part=(i, 4), **OPTS)
    pack_folder(folder, tmp_path / "other", progress=False, on_error="skip", part=(3, 4),
                max_samples=3, seed=6)
    (tmp_path / "other" / part_manifest_name((3, 4))).rename(dest / part_manifest_name((3, 4)))
    with pytest.raises(DestinationError, match=r"part\(s\) 3 belong to another pack"):
        merge_parts(dest, 4)
    with pytest.raises(DestinationError, match="other files or options"):
        pack_folder(folder, dest, progress=False, on_error="skip", part=(3, 4), resume=True, **OPTS)
    m = pack_folder(folder, dest, progress=False, on_error="skip", part=(3, 4), overwrite=True,
                    **OPTS)
    assert m.stats["finalized"] and Manifest.load(dest).options["parts"] == 4


def test_part_arguments_are_checked(folder, tmp_path):
    for bad in [(2, 2), (-1, 2), (0, 0), "1/2"]:
        with pytest.raises(ValueError, match="part"):
            pack_folder(folder, tmp_path / "x", progress=False, part=bad)
    assert part_tag((3, 8)) == "p0003of0008" and part_tag((3, 12345)) == "p00003of12345"


# --------------------------------------------------------------------------- SLURM-style processes


def test_cli_parts_in_random_order_manifest_after_the_last(folder, single, tmp_path):
    dest, n = tmp_path / "out", 3
    order = [2, 0, 1]
    for k, i in enumerate(order):
        proc = run_pack(folder, dest, "--part", f"{i}/{n}", "--on-error", "skip", *CLI_OPTS[:-1])
        last = k == n - 1
        assert (dest / MANIFEST_PATH).exists() == last
        assert ("manifest.json written" in proc.stdout) == last, proc.stdout
        if not last:
            assert "waiting for part(s)" in proc.stdout
    check_same_dataset(dest, single, n)
    proc = run_pack(folder, dest, "--merge-parts", n)  # explicit merge: same bytes again
    assert "merged 3 parts" in proc.stdout
    check_same_dataset(dest, single, n)


@pytest.mark.slow
def test_cli_parts_running_at_the_same_time(folder, single, tmp_path):
    dest, n = tmp_path / "out", 3
    procs = [subprocess.Popen([*PACK, str(folder), str(dest), "--part", f"{i}/{n}", "--on-error",
                               "skip", *CLI_OPTS], env=subprocess_env(), stderr=subprocess.PIPE,
                              text=True) for i in range(n)]
    for p in procs:
        _, err = p.communicate(timeout=TIMEOUT)
        assert p.returncode == 0, err
    check_same_dataset(dest, single, n)
    assert not [p.name for p in dest.iterdir() if ".tmp-" in p.name]


def test_cli_part_slurm_and_usage_errors(folder, single, tmp_path):
    dest = tmp_path / "out"
    for task in (8, 7):  # --array=7-8: SLURM_ARRAY_TASK_ID 7 and 8 are parts 0 and 1 of 2
        env = dict(subprocess_env(), SLURM_ARRAY_TASK_ID=str(task), SLURM_ARRAY_TASK_MIN="7",
                   SLURM_ARRAY_TASK_MAX="8", SLURM_ARRAY_TASK_COUNT="2")
        run_pack(folder, dest, "--part", "slurm", "--on-error", "skip", *CLI_OPTS, env=env)
    assert sorted(p.name for p in dest.glob(".shardkit-part-*")) == \
        [".shardkit-part-p0000of0002.json", ".shardkit-part-p0001of0002.json"]
    check_same_dataset(dest, single, 2)
    for args in (["--part", "2/2"], ["--part", "1"], ["--part", "slurm"]):
        proc = run_pack(folder, tmp_path / "x", *args, check=False,
                        env={k: v for k, v in subprocess_env().items() if not k.startswith("SLURM")})
        assert proc.returncode == 2 and "--part" in proc.stderr, proc.stderr
    proc = run_pack(folder, tmp_path / "x", env=dict(subprocess_env(), WORLD_SIZE="2"), check=False)
    assert proc.returncode == 2 and "--distributed" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_a_failed_part_is_reported_and_rerun_alone_with_resume(folder, tmp_path):
    src = tmp_path / "src"
    make_class_folder(src, per_class=7)
    n, bad = 3, 1
    victim = part_slice(src, bad, n)[4]  # after its first shard (3 samples) is finished
    clean = tmp_path / "clean"
    for i in range(n):
        run_pack(src, clean, "--part", f"{i}/{n}", *CLI_OPTS)
    good_bytes = (src / victim).read_bytes()
    (src / victim).write_bytes(b"\0" * len(good_bytes))  # damaged in place: same size
    dest = tmp_path / "out"
    for i in range(n):
        proc = run_pack(src, dest, "--part", f"{i}/{n}", *CLI_OPTS, check=False)
        if i == bad:
            assert proc.returncode == 1
            assert f"part {bad}/{n}" in proc.stderr and victim in proc.stderr, proc.stderr
        else:
            assert proc.returncode == 0, proc.stderr
    assert not (dest / MANIFEST_PATH).exists()
    journal = json.loads((dest / f".shardkit-pack-{part_tag((bad, n))}.json").read_bytes())
    assert len(journal["shards"]) == 1  # its finished shard is kept
    with pytest.raises(DestinationError, match="not finished"):
        merge_parts(dest, n)
    (src / victim).write_bytes(good_bytes)
    proc = run_pack(src, dest, "--part", f"{bad}/{n}", "--resume", *CLI_OPTS[:-1])
    assert "manifest.json written" in proc.stdout and "1 shards reused" in proc.stdout
    assert all_files(dest) == all_files(clean)  # byte for byte, manifest included


# --------------------------------------------------------------------------- torchrun


def torchrun(*args, nproc: int = 2) -> subprocess.CompletedProcess:
    env = subprocess_env()
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(nproc), str(REPO / "tools" / "pack.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env,
                          check=False)


@pytest.mark.slow
def test_torchrun_distributed_pack_then_a_failed_rank_and_resume(folder, single, tmp_path):
    dest = tmp_path / "out"
    proc = torchrun(folder, dest, "--distributed", "--on-error", "skip", *CLI_OPTS[:-1])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "manifest.json written" in proc.stdout
    check_same_dataset(dest, single, 2)
    # A bad file in rank 1's part: rank 1 fails, rank 0 finishes its part, no manifest.
    src = tmp_path / "src"
    make_class_folder(src, per_class=5)
    victim = part_slice(src, 1, 2)[-1]
    good_bytes = (src / victim).read_bytes()
    (src / victim).write_bytes(b"\xff" * len(good_bytes))
    dest = tmp_path / "failing"
    proc = torchrun(src, dest, "--distributed", *CLI_OPTS)
    assert proc.returncode != 0
    assert "part 1/2" in proc.stderr and victim in proc.stderr, proc.stderr
    assert "manifest.json not written: part(s) 1 of 2 failed" in proc.stderr
    assert (dest / part_manifest_name((0, 2))).exists() and not (dest / MANIFEST_PATH).exists()
    (src / victim).write_bytes(good_bytes)
    proc = run_pack(src, dest, "--part", "1/2", "--resume", *CLI_OPTS[:-1])  # that part alone
    assert "manifest.json written" in proc.stdout
    clean = tmp_path / "clean"
    pack_folder(src, clean, progress=False, workers=1, **OPTS)
    check_same_dataset(dest, clean, 2)


# --------------------------------------------------------------------------- S3


@pytest.fixture(scope="module")
def s3():
    pytest.importorskip("s3fs")
    pytest.importorskip("flask", reason="moto server mode needs moto[server]")
    sys.path.insert(0, str(Path(__file__).parent))
    from servers import MotoS3

    with MotoS3() as server:
        server.make_bucket("parts")
        yield server


def test_parts_into_s3(folder, single, s3, tmp_path):
    dest, opts = "s3://parts/ds", s3.storage_options()
    for i in (1, 0):
        client = s3.client()
        keys = [o["Key"] for o in client.list_objects_v2(Bucket="parts").get("Contents", [])]
        assert "ds/.shardkit/manifest.json" not in keys
        m = pack_folder(folder, dest, progress=False, workers=1, on_error="skip", part=(i, 2),
                        storage_options=opts, **OPTS)
    assert m.stats["finalized"]
    ds = shardkit.StreamingDataset(dest, shuffle=False, decode="raw", with_keys=True,
                                   storage_options=opts)
    got = [(key, bytes(img)) for img, _, key in ds]
    assert got == [(key, s["jpg"]) for key, s in samples(single)]
    remote = Manifest.load(dest, storage_options=opts)
    assert remote.options["parts"] == 2 and remote.skipped == Manifest.load(single).skipped
    assert merge_parts(dest, 2, storage_options=opts).to_json() == remote.to_json()
