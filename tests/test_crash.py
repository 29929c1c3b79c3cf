"""Crash safety: a killed DataLoader worker, a killed packer (20 moments, then --resume), a full disk.

The full-disk case mounts a 2 MiB tmpfs when it can (root with CAP_SYS_ADMIN, as on the dev box);
otherwise it runs the packer under RLIMIT_FSIZE (SIGXFSZ ignored, so writes fail with EFBIG,
"File too large") and says which in the test id.
"""

from __future__ import annotations

import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import shardkit
from shardkit import StreamingDataset
from shardkit.shardformat import MANIFEST_PATH

from _helpers_read import image_folder, pack
from conftest import JOURNAL, REPO, TEMPORARY, all_files, check_interrupted, make_class_folder, subprocess_env

# --------------------------------------------------------------------------- a killed worker


def _slow(image):  # transform: keep the workers busy so the kill lands mid-epoch
    time.sleep(0.02)
    return image


def test_sigkill_of_a_worker_is_a_clear_error_not_a_hang(tmp_path):
    src = image_folder(tmp_path / "src", classes=2, per_class=20, size=(16, 12))
    pack(src, tmp_path / "ds", mode="raw", max_samples=5)
    ds = StreamingDataset(tmp_path / "ds", batch_size=2, decode="uint8", transform=_slow)
    loader = shardkit.make_loader(ds, num_workers=2, persistent_workers=True)
    it = iter(loader)
    next(it)
    victim = loader._iterator._workers[0].pid
    os.kill(victim, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=rf"DataLoader worker \(pid\(?s?\)? ?{victim}\)?"):
        for _ in it:
            assert time.monotonic() - started < 30, "still iterating after the kill"
    assert time.monotonic() - started < 30
    del it, loader


# --------------------------------------------------------------------------- a killed packer

ARGS = ["--mode", "resize", "--size", "24", "--workers", "2", "--max-samples", "3", "--quiet"]


@pytest.fixture(scope="module")
def kill_src(tmp_path_factory) -> Path:
    return make_class_folder(tmp_path_factory.mktemp("crash") / "src", classes=("a", "b", "c"),
                             per_class=20, size=(96, 72))


def _start(src, dest, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "tools" / "pack.py"), str(src), str(dest),
                             *ARGS, *extra], env=subprocess_env(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _files(dest: Path) -> dict[str, bytes]:
    return all_files(dest)


@pytest.mark.slow
def test_sigkill_of_the_packer_at_20_moments_then_resume_is_byte_identical(kill_src, tmp_path):
    from shardkit.cli import pack_main

    t0 = time.monotonic()
    ref_dest = tmp_path / "ref"
    proc = _start(kill_src, ref_dest)
    started = None  # when the packer starts writing (after interpreter start and the scan)
    while proc.poll() is None and time.monotonic() - t0 < 120:
        if started is None and ref_dest.exists() and any(ref_dest.iterdir()):
            started = time.monotonic() - t0
        time.sleep(0.002)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    duration = time.monotonic() - t0
    started = started if started is not None else 0.1
    ref = _files(ref_dest)
    assert len(ref) == 2 * 20 + 1  # 60 images, 3 per shard
    rng = random.Random(20240601)
    plans = [("shards", k) for k in (1, 5, 10, 15, 19, 20)]
    # random moments while it writes (a few land before it starts or after it ends: fine too)
    plans += [("delay", rng.uniform(0.8 * started, duration)) for _ in range(14)]
    killed_mid_pack = 0
    for n, (how, arg) in enumerate(plans):
        dest = tmp_path / f"run{n}"
        proc = _start(kill_src, dest)
        deadline = time.monotonic() + (arg if how == "delay" else 120)
        while proc.poll() is None and time.monotonic() < deadline:
            if how == "shards" and dest.exists() and \
                    len([p for p in dest.glob("shard-*.tar")]) >= arg:
                break
            time.sleep(0.002)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        if proc.returncode == -signal.SIGKILL and (dest / MANIFEST_PATH).exists():
            assert _files(dest) == ref  # killed after the manifest: the pack was complete
        elif proc.returncode == -signal.SIGKILL:
            if 0 < check_interrupted(dest) < 20 or (dest / JOURNAL).exists():
                killed_mid_pack += 1
        else:
            assert proc.returncode == 0, proc.stderr.read()
        # --resume through the same command-line entry point, without a second interpreter start
        assert pack_main([str(kill_src), str(dest), *ARGS, "--resume"]) == 0
        assert _files(dest) == ref, f"plan {how} {arg}"
    # The kills on seeing 1, 5, 10, 15 and 19 shards land mid-pack whatever the machine's load;
    # the timed ones add moments in between when they land there (under load many land before
    # the first shard or after the manifest, which is checked above as well).
    assert killed_mid_pack >= 5, killed_mid_pack


# --------------------------------------------------------------------------- a full disk


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or os.environ.get("SHARDKIT_TEST_NO_MOUNT"):  # the latter forces the fallback
        return False
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def _fsize_limit(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death by signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.fixture
def full_disk(tmp_path):
    """(destination folder, preexec_fn, expected message). A 2 MiB tmpfs, else RLIMIT_FSIZE."""
    mnt = tmp_path / "small"
    if _mount_tmpfs(mnt, "2m"):
        try:
            yield mnt / "out", None, "No space left"
        finally:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)
    else:  # fallback, see the module docstring
        yield mnt / "out", _fsize_limit(300_000), "File too large"


def _pack_onto_a_full_disk(full_disk, tmp_path, max_samples: str):
    dest, preexec, message = full_disk
    if preexec is not None and max_samples != "1000":
        pytest.skip("RLIMIT_FSIZE limits each file, not the disk: only one big shard can hit it")
    src = make_class_folder(tmp_path / "src", classes=("a", "b"), per_class=100, size=(160, 120))
    size = sum(p.stat().st_size for p in src.rglob("*.jpg"))
    assert size > 2_200_000  # more than the disk (or the file size limit) holds
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "pack.py"), str(src), str(dest),
                           "--workers", "1", "--max-samples", max_samples, "--quiet"],
                          env=subprocess_env(), capture_output=True, text=True, timeout=120,
                          preexec_fn=preexec)
    return dest, message, proc


@pytest.mark.parametrize("max_samples", ["4", "1000"])  # many shards / one shard that cannot fit
def test_full_disk_fails_and_leaves_no_incomplete_shard(full_disk, tmp_path, max_samples):
    dest, message, proc = _pack_onto_a_full_disk(full_disk, tmp_path, max_samples)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    check_interrupted(dest)  # no manifest; every final shard complete and as the journal says
    leftovers = [p.name for p in dest.iterdir() if TEMPORARY.fullmatch(p.name)]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    # and the resume after freeing space is not needed here: test_writer covers --resume


def test_full_disk_error_names_the_destination_without_a_traceback(full_disk, tmp_path):
    dest, message, proc = _pack_onto_a_full_disk(full_disk, tmp_path, "1000")
    assert proc.returncode == 1
    assert message in proc.stderr and str(dest) in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
