"""Command line: pack/show/verify verbs, exit codes, output, tools/ scripts, python -m shardkit."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from importlib import import_module

import numpy as np
import pytest
import tomllib
from PIL import Image

from shardkit import Manifest
from shardkit.cli import main

from conftest import (
    REPO,
    damage_shard,
    jpeg_bytes,
    make_class_folder,
    photo,
    png_bytes,
    subprocess_env,
    write,
)

SUMMARY = re.compile(r"^packed (\d+) samples into (\d+) shards \(([\d.]+ [KMG]?B)\), skipped (\d+), "
                     r"ignored (\d+) non-image files.* in ([\d.]+) s -> .+$")


def run_main(argv) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as exc:  # argparse exits for usage errors
        return exc.code


def run_script(*args, **kw):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                          env=subprocess_env(), cwd=kw.pop("cwd", REPO), timeout=120, **kw)


@pytest.fixture
def dataset(class_folder, tmp_path):
    dest = tmp_path / "ds"
    assert run_main(["pack", class_folder, dest, "--max-samples", "10", "--workers", "1", "--quiet"]) == 0
    return dest


# --------------------------------------------------------------------------- pack


def test_pack_prints_one_summary_line_and_no_progress_when_not_a_terminal(class_folder, tmp_path, capfd):
    assert run_main(["pack", class_folder, tmp_path / "out", "--max-samples", "10", "--workers", "1"]) == 0
    out, err = capfd.readouterr()
    lines = out.splitlines()
    assert len(lines) == 1 and err == ""
    samples, shards, _, skipped, ignored, seconds = SUMMARY.match(lines[0]).groups()
    assert (int(samples), int(shards), int(skipped), int(ignored)) == (24, 3, 0, 0)
    assert 0 <= float(seconds) < 60
    m = Manifest.load(tmp_path / "out")
    assert m.num_samples == 24 and len(m.shards) == 3


def test_quiet_prints_nothing(class_folder, tmp_path, capfd):
    assert run_main(["pack", class_folder, tmp_path / "out", "--quiet", "--workers", "1"]) == 0
    assert capfd.readouterr() == ("", "")


def test_progress_bar_only_on_a_terminal(class_folder, tmp_path):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 0 columns: no bar
    try:
        proc = subprocess.run([sys.executable, str(REPO / "tools" / "pack.py"), str(class_folder),
                               str(tmp_path / "out"), "--workers", "1"], stdout=subprocess.PIPE,
                              stderr=slave, env=subprocess_env(), timeout=120)
        os.close(slave)
        shown = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(master)
    assert proc.returncode == 0
    assert b"pack" in shown and b"24/24" in shown  # a tqdm bar went to the terminal
    assert len(proc.stdout.decode().splitlines()) == 1  # the summary stays on stdout


def test_skip_exits_zero_with_summary_and_lists_the_file(class_folder, tmp_path, capfd):
    src = tmp_path / "src"
    make_class_folder(src, per_class=2)
    write(src / "dog" / "bad.jpg", b"")
    write(src / "dog" / "notes.txt", b"x")
    assert run_main(["pack", src, tmp_path / "out", "--on-error", "skip", "--workers", "1"]) == 0
    out, err = capfd.readouterr()
    groups = SUMMARY.match(out.strip()).groups()
    assert (groups[0], groups[3], groups[4]) == ("6", "1", "1")
    assert "dog/bad.jpg" in err and "empty" in err
    assert Manifest.load(tmp_path / "out").skipped == [
        {"path": "dog/bad.jpg", "reason": "empty file (0 bytes)"}]


@pytest.mark.parametrize("case", ["bad_file", "missing_src", "empty_src", "other_dataset"])
def test_data_errors_exit_1_naming_the_problem(class_folder, tmp_path, capfd, case):
    src, dest = tmp_path / "src", tmp_path / "out"
    needle = "src"
    if case == "bad_file":
        make_class_folder(src, per_class=2)
        write(src / "cat" / "broken.jpg", jpeg_bytes(photo())[:300])
        needle = "cat/broken.jpg: truncated"
    elif case == "empty_src":
        src.mkdir()
        needle = "no images"
    elif case == "other_dataset":
        src = class_folder
        assert run_main(["pack", src, dest, "--seed", "1", "--quiet", "--workers", "1"]) == 0
        needle = "different dataset"
    capfd.readouterr()
    assert run_main(["pack", src, dest, "--workers", "1"]) == 1
    out, err = capfd.readouterr()
    assert needle in err and err.startswith("error: ") and out == ""
    if case != "other_dataset":
        assert not (dest / ".shardkit" / "manifest.json").exists()
    else:
        assert run_main(["pack", src, dest, "--workers", "1", "--overwrite", "--quiet"]) == 0
        assert Manifest.load(dest).options["seed"] == 0


@pytest.mark.parametrize("argv", [
    [], ["nope"], ["pack"], ["pack", "SRC"], ["pack", "SRC", "DEST", "--mode", "zip"],
    ["pack", "SRC", "DEST", "--mode", "resize"], ["pack", "SRC", "DEST", "--max-bytes", "lots"],
    ["pack", "SRC", "DEST", "--max-samples", "0"], ["pack", "SRC", "DEST", "--quality", "101"],
    ["pack", "SRC", "DEST", "--workers", "two"], ["show"], ["verify"],
    ["pack", "SRC", "DEST", "--size", "64"], ["pack", "SRC", "DEST", "--quality", "80"],
    ["pack", "SRC", "DEST", "--mode", "tensor", "--size", "8", "--quality", "80"],
])
def test_usage_errors_exit_2(class_folder, tmp_path, capfd, argv):
    argv = [{"SRC": class_folder, "DEST": tmp_path / "out"}.get(a, a) for a in argv]
    assert run_main(argv) == 2
    assert capfd.readouterr().err
    assert not (tmp_path / "out" / ".shardkit" / "manifest.json").exists()


def test_oversized_sample_warning_reaches_stderr(tmp_path, capfd):
    src = make_class_folder(tmp_path / "src", per_class=2)
    noise = np.random.default_rng(0).integers(0, 256, (100, 100, 3), np.uint8)
    write(src / "cat" / "huge.png", png_bytes(Image.fromarray(noise)))
    assert run_main(["pack", src, tmp_path / "out", "--max-bytes", "8KB", "--workers", "1"]) == 0
    err = capfd.readouterr().err
    assert re.search(r"warning: cat/huge\.png: one sample takes \d+ bytes, more than max_bytes=8000", err)


def test_resume_flag(class_folder, tmp_path, capfd):
    dest = tmp_path / "out"
    assert run_main(["pack", class_folder, dest, "--quiet", "--workers", "1"]) == 0
    assert run_main(["pack", class_folder, dest, "--resume", "--workers", "1"]) == 0
    assert "24 samples" in capfd.readouterr().out


# --------------------------------------------------------------------------- show / verify


def test_show_prints_counts_classes_shards_options_skipped_keys(tmp_path, capfd):
    src = make_class_folder(tmp_path / "src", per_class=4)
    write(src / "eel" / "bad.jpg", b"")
    dest = tmp_path / "ds"
    assert run_main(["pack", src, dest, "--mode", "resize", "--size", "32", "--max-samples", "5",
                     "--on-error", "skip", "--workers", "1", "--quiet"]) == 0
    assert run_main(["show", dest]) == 0
    out = capfd.readouterr().out
    m = Manifest.load(dest)
    assert re.search(r"^samples\s+12$", out, re.M)
    assert re.search(r"^classes\s+3: cat, dog, eel$", out, re.M)
    assert re.search(r"^shards\s+3, [\d.]+ KB in all", out, re.M)
    assert "mode=resize" in out and "size=32" in out and "quality=90" in out and "seed=0" in out
    assert re.search(r"^skipped\s+1\n\s+eel/bad.jpg: empty", out, re.M)
    for s in m.shards:
        assert s.url in out
    first_keys = re.search(r"^keys\s+(.+)$", out, re.M).group(1).split(", ")
    from conftest import samples_of
    assert first_keys == [x["__key__"] for x in samples_of(dest / m.shards[0].url)]


def test_show_on_a_folder_without_manifest_exits_1(tmp_path, capfd):
    assert run_main(["show", tmp_path]) == 1
    assert "no manifest" in capfd.readouterr().err


def test_verify_ok(dataset, capfd):
    assert run_main(["verify", dataset, "--quiet"]) == 0
    assert capfd.readouterr().out.startswith("verify OK: 3 shards, 24 samples")


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "missing", "flip_index"])
def test_verify_fails_naming_the_shard(dataset, capfd, damage):
    damage_shard(dataset, damage)
    assert run_main(["verify", dataset, "--quiet"]) == 1
    out, err = capfd.readouterr()
    assert "FAILED" in out
    assert "shard-000001" in err and "shard-000000" not in err and "shard-000002" not in err


# --------------------------------------------------------------------------- entry points


def test_tools_scripts_and_python_m_shardkit(class_folder, tmp_path):
    dest = tmp_path / "ds"
    p = run_script(REPO / "tools" / "pack.py", class_folder, dest, "--max-samples", "10", "--workers", "2",
                   cwd=tmp_path)
    assert p.returncode == 0 and SUMMARY.match(p.stdout.strip()) and p.stderr == ""
    p = run_script(REPO / "tools" / "show.py", dest, cwd=tmp_path)
    assert p.returncode == 0 and "samples   24" in p.stdout
    p = run_script(REPO / "tools" / "verify.py", dest, cwd=tmp_path)
    assert p.returncode == 0 and "verify OK" in p.stdout
    (dest / "shard-000002.tar").write_bytes(b"")
    p = run_script(REPO / "tools" / "verify.py", dest, cwd=tmp_path)
    assert p.returncode == 1 and "shard-000002.tar" in p.stderr
    p = run_script("-m", "shardkit", "pack", class_folder, tmp_path / "m", "--workers", "1", cwd=tmp_path)
    assert p.returncode == 0 and SUMMARY.match(p.stdout.strip())
    p = run_script("-m", "shardkit", "pack", tmp_path / "missing", tmp_path / "n", cwd=tmp_path)
    assert p.returncode == 1 and "does not exist" in p.stderr
    p = run_script("-m", "shardkit", "frobnicate", cwd=tmp_path)
    assert p.returncode == 2 and "usage" in p.stderr


def test_console_entry_point_is_the_cli(class_folder, tmp_path, capfd):
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts["shardkit"].split(":")
    entry = getattr(import_module(module), func)
    assert entry is main
    assert entry(["pack", str(class_folder), str(tmp_path / "out"), "--workers", "1"]) == 0
    assert SUMMARY.match(capfd.readouterr().out.strip())


# --------------------------------------------------------------------------- help and version


def test_help_lists_every_verb_with_what_it_does(capfd):
    from shardkit.cli import VERBS

    assert run_main(["--help"]) == 0
    out = capfd.readouterr().out
    for verb, (what, _, _) in VERBS.items():
        assert re.search(rf"^\s+{verb}\s+{re.escape(what[:30])}", out, re.M), (verb, out)


def test_unknown_or_missing_verb_is_a_usage_error_naming_the_choices(capfd):
    assert run_main(["foo"]) == 2
    err = capfd.readouterr().err
    assert "invalid choice: 'foo'" in err and "pack" in err and "verify" in err
    assert run_main([]) == 2
    assert "required: VERB" in capfd.readouterr().err


def test_version(capfd):
    import shardkit

    assert run_main(["--version"]) == 0
    assert capfd.readouterr().out.strip() == f"shardkit {shardkit.__version__}"


def test_every_option_of_every_verb_has_help():
    import argparse

    from shardkit.cli import VERBS

    for verb, (_, add, _) in VERBS.items():
        p = argparse.ArgumentParser(prog=verb)
        add(p)
        for action in p._actions:
            assert action.help, (verb, action.dest)


def test_options_a_mode_ignores_are_refused_by_name(class_folder, tmp_path, capfd):
    assert run_main(["pack", class_folder, tmp_path / "o", "--size", "64", "--quiet"]) == 2
    assert "size=64 does nothing in mode='raw'" in capfd.readouterr().err
    assert run_main(["pack", class_folder, tmp_path / "o", "--quality", "80", "--quiet"]) == 2
    assert "quality=80 does nothing in mode='raw'" in capfd.readouterr().err
    assert not (tmp_path / "o").exists()
