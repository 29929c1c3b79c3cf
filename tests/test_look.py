"""Looking at a dataset (shardkit/look/, `shardkit show --grid/--stats/--html`): the contact
sheet's size and seeded choice, tensor packs drawn, the stats' numbers against the truth, the HTML
report's links and escaping, and the command line."""

from __future__ import annotations

import io
import json
import math
import re
import tarfile
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import shardkit
from shardkit import look
from shardkit.cli import main

from _helpers_read import iter_samples, pack
from conftest import jpeg_bytes, photo, png_bytes, write

SCRIPT_CLASS = "<script>alert(1)"  # a folder name: class names are data from strangers
COUNTS = {"cat": 8, "dog": 5, "eel": 3, SCRIPT_CLASS: 2}


def _folder(root: Path) -> dict[str, tuple[str, tuple[int, int]]]:
    """An ImageFolder of uneven classes and varied sizes; returns relpath -> (class, size)."""
    truth = {}
    for c, (name, count) in enumerate(COUNTS.items()):
        for i in range(count):
            size = (40 + 12 * i + c, 30 + 7 * (i % 3))
            rel = f"{name}/img_{i:03d}.jpg"
            write(root / rel, jpeg_bytes(photo(*size, seed=100 * c + i)))
            truth[rel] = (name, size)
    return truth


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("look-src") / "images"
    return root, _folder(root)


@pytest.fixture(scope="module")
def raw(source, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("look-raw")
    pack(source[0], dest, mode="raw", max_samples=5)  # several shards, one short
    return dest


@pytest.fixture(scope="module")
def resized(source, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("look-resize")
    pack(source[0], dest, mode="resize", size=16)
    return dest


@pytest.fixture(scope="module")
def tensor(source, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("look-tensor")
    pack(source[0], dest, mode="tensor", size=24)
    return dest


@pytest.fixture(scope="module")
def unlabeled(tmp_path_factory) -> tuple[Path, list[tuple[int, int]]]:
    """Webdataset shards someone else wrote (keys with '/', no labels, no .json), indexed."""
    folder = tmp_path_factory.mktemp("look-wds")
    sizes = []
    for s in range(2):
        with tarfile.open(folder / f"part-{s:04d}.tar", "w") as tf:
            for i in range(15):
                size = (30 + 5 * i, 20 + 3 * s)
                sizes.append(size)
                image = photo(*size, seed=1000 + 100 * s + i)
                ext, data = ("png", png_bytes(image)) if i % 4 == 0 else ("jpg", jpeg_bytes(image))
                for name, blob in ((f"d{s}/x{i:02d}.{ext}", data), (f"d{s}/x{i:02d}.txt", b"hi")):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tf.addfile(info, io.BytesIO(blob))
    shardkit.index_shards(folder, progress=False)
    return folder, sizes


def _classes_by_key(dest: Path) -> dict[str, str]:
    return {key: json.loads(fields["json"])["class"] for key, fields in iter_samples(dest)}


# --------------------------------------------------------------------------- contact sheet


def test_sheet_has_the_promised_size_and_one_row_of_the_right_class_per_class(raw, tmp_path):
    out = tmp_path / "sheet.png"
    r = look.contact_sheet(raw, out, per_class=2, seed=0, progress=False)
    im = Image.open(out)
    assert im.format == "PNG"
    # 4 classes x 2: width PAD + 2 (THUMB + PAD), height HEADER + 4 (THUMB + CAPTION + PAD)
    assert im.size == look.sheet_size(4, 2) == r["size"] == (8 + 2 * 136, 44 + 4 * 166)
    assert (r["rows"], r["columns"]) == (4, 2)
    truth = _classes_by_key(raw)
    assert [name for name, _ in r["groups"]] == sorted(COUNTS)  # the manifest's class order
    for name, picks in r["groups"]:
        assert len(picks) == 2 and len({k for _, k in picks}) == 2
        assert all(truth[key] == name for _, key in picks), (name, picks)
    assert r["errors"] == []


def test_a_class_smaller_than_per_class_shows_what_it_has(raw):
    r = look.contact_sheet(raw, per_class=4, progress=False)
    got = {name: len(picks) for name, picks in r["groups"]}
    assert got == {name: min(4, n) for name, n in COUNTS.items()}
    assert r["looked_at"] == sum(COUNTS.values())  # read through: the small classes never fill
    assert r["image"].size == look.sheet_size(4, 4)


def test_choice_is_seeded(raw):
    a = look.contact_sheet(raw, per_class=2, seed=3, progress=False)
    b = look.contact_sheet(raw, per_class=2, seed=3, progress=False)
    assert a["groups"] == b["groups"]
    assert a["image"].tobytes() == b["image"].tobytes()
    others = [look.contact_sheet(raw, per_class=2, seed=s, progress=False)["groups"]
              for s in (4, 5)]
    assert any(g != a["groups"] for g in others)


def test_classes_and_max_classes_choose_rows(raw):
    r = look.contact_sheet(raw, per_class=1, classes=["eel", "cat"], progress=False)
    assert [n for n, _ in r["groups"]] == ["eel", "cat"]
    r = look.contact_sheet(raw, per_class=1, max_classes=2, seed=1, progress=False)
    names = [n for n, _ in r["groups"]]
    assert len(names) == 2 and set(names) <= set(COUNTS)
    with pytest.raises(ValueError, match="not classes of this dataset"):
        look.contact_sheet(raw, classes=["wolf"], progress=False)
    with pytest.raises(ValueError, match="per_class must be an integer >= 1"):
        look.contact_sheet(raw, per_class=0, progress=False)


def test_tensor_pack_is_drawn(tensor):
    r = look.contact_sheet(tensor, per_class=2, progress=False)
    assert r["errors"] == [] and r["rows"] == 4
    im = np.asarray(r["image"])
    cell = im[look.HEADER:look.HEADER + look.THUMB, look.PAD:look.PAD + look.THUMB]
    assert cell.std() > 10  # a picture, not an empty cell
    # the cell holds the stored array, scaled up to the thumbnail
    index, _ = r["groups"][0][1][0]
    sample = shardkit.MapDataset(tensor, decode="raw").sample(index)
    arr = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
    expected = np.asarray(Image.fromarray(arr).resize((look.THUMB, look.THUMB), Image.BICUBIC))
    assert np.abs(cell.astype(int) - expected.astype(int)).mean() < 2


def test_pictures_of_arrays_in_any_layout_and_type(tmp_path):
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)

    def npy(a) -> bytes:
        out = io.BytesIO()
        np.save(out, a, allow_pickle=False)
        return out.getvalue()

    assert np.array_equal(np.asarray(look.picture({"npy": npy(hwc)})), hwc)
    chw = np.ascontiguousarray(hwc.transpose(2, 0, 1))
    assert np.array_equal(np.asarray(look.picture({"npy": npy(chw)})), hwc)
    gray = look.picture({"npy": npy(np.linspace(-1, 1, 35, dtype=np.float32).reshape(5, 7))})
    assert gray.size == (7, 5) and np.asarray(gray)[0, 0, 0] == 0 and np.asarray(gray)[-1, -1, 0] == 255
    with pytest.raises(ValueError, match="pickle"):
        look.picture({"npy": _object_npy()})
    with pytest.raises(ValueError, match="not an image"):
        look.picture({"npy": npy(np.zeros((2, 5, 6, 7), np.uint8))})


def _object_npy() -> bytes:
    """The header of an object array (np.save would pickle): refused before any payload."""
    header = "{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
    header += " " * (63 - len(header) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + b"\x80junk"


def test_thumbnails_keep_aspect_and_fit_the_box():
    assert look.thumbnail(Image.new("RGB", (400, 100))).size == (128, 32)
    assert look.thumbnail(Image.new("RGB", (10, 20))).size == (64, 128)
    assert look.thumbnail(Image.new("RGB", (3000, 1))).size == (128, 1)


def test_without_labels_a_seeded_sample_in_rows(unlabeled):
    folder, sizes = unlabeled
    r = look.contact_sheet(folder, samples=10, seed=0, progress=False)
    (name, picks), = r["groups"]
    assert name is None and len(picks) == 10 and len({i for i, _ in picks}) == 10
    rows = math.ceil(10 / look.COLUMNS)
    assert r["image"].size == look.sheet_size(rows, look.COLUMNS) and r["rows"] == rows
    again = look.contact_sheet(folder, samples=10, seed=0, progress=False)
    other = look.contact_sheet(folder, samples=10, seed=1, progress=False)
    assert again["groups"] == r["groups"] != other["groups"]


def test_a_sample_that_does_not_decode_is_crossed_out_and_named(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    with tarfile.open(folder / "a.tar", "w") as tf:
        for key, data in (("good", jpeg_bytes(photo(20, 20))), ("broken", b"\xff\xd8\xffnot")):
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    shardkit.index_shards(folder, progress=False)
    r = look.contact_sheet(folder, samples=2, progress=False)
    assert [e["key"] for e in r["errors"]] == ["broken"]


# --------------------------------------------------------------------------- statistics


def test_stats_count_every_class_and_shard(raw, tmp_path):
    out = tmp_path / "stats.png"
    s = look.stats_picture(raw, out, progress=False)
    assert Image.open(out).size == s["size"]
    m = shardkit.Manifest.load(raw)
    assert s["per_class"] == {name: COUNTS[name] for name in m.classes}
    assert s["unlabeled"] == 0 and s["looked_at"] == s["num_samples"] == m.num_samples == 18
    assert s["shard_samples"].tolist() == [sh.num_samples for sh in m.shards]
    assert s["shard_bytes"].tolist() == [sh.num_bytes for sh in m.shards]
    assert len(m.shards) == 4 and not s["subset"]


def test_stats_sizes_are_the_originals(source, raw, resized):
    truth = Counter(size for _, size in source[1].values())
    for dest in (raw, resized):  # resize mode stores 16-px JPEGs; the .json keeps the original
        s = look.dataset_stats(dest, progress=False)
        assert Counter(zip(s["widths"].tolist(), s["heights"].tolist())) == truth
        assert s["sizes_from_metadata"] == 18


def test_stats_without_metadata_read_image_headers(unlabeled):
    folder, sizes = unlabeled
    s = look.dataset_stats(folder, progress=False)
    assert Counter(zip(s["widths"].tolist(), s["heights"].tolist())) == Counter(sizes)
    assert s["sizes_from_metadata"] == 0
    assert s["per_class"] is None and s["unlabeled"] == 30
    assert look.draw_stats(s).size[0] > 0


def test_stats_of_a_seeded_subset(raw):
    a = look.dataset_stats(raw, max_samples=7, seed=2, progress=False)
    assert a["subset"] and a["looked_at"] == 7 == sum(a["per_class"].values())
    b = look.dataset_stats(raw, max_samples=7, seed=2, progress=False)
    assert a["per_class"] == b["per_class"] and a["widths"].tolist() == b["widths"].tolist()
    full = look.dataset_stats(raw, max_samples=100, progress=False)
    assert not full["subset"] and full["looked_at"] == 18


def test_stats_picture_of_many_classes_and_shards_draws():
    """200 classes (top and bottom shown), 300 shards (histograms), 10^5 sizes: no error."""
    rng = np.random.default_rng(0)
    n = 100_000
    stats = {"location": "s3://bucket/x", "mode": "raw pack", "num_samples": n, "num_shards": 300,
             "num_bytes": 10**11, "classes": [f"c{i}" for i in range(200)], "looked_at": n,
             "subset": False, "seed": 0, "unlabeled": 5, "seconds": 1.0,
             "per_class": {f"c{i}": int(v) for i, v in enumerate(rng.integers(1, 900, 200))},
             "shard_samples": rng.integers(300, 340, 300), "shard_bytes": rng.integers(1e8, 3e8, 300),
             "widths": rng.integers(100, 2000, n), "heights": rng.integers(100, 1500, n),
             "sizes_from_metadata": n}
    im = look.draw_stats(stats, top=10)
    assert im.size == (2 * look.PANEL_W + 3 * look.MARGIN,
                       look.TITLE_H + max(look.PANEL_H, 64 + 21 * 16) + look.PANEL_H + 2 * look.MARGIN)


def test_nice_ticks():
    assert look.nice_ticks(96) == [0, 20, 40, 60, 80, 100]
    assert look.nice_ticks(3) == [0, 1, 2, 3]
    assert look.nice_ticks(0) == [0.0, 1.0]


# --------------------------------------------------------------------------- HTML report


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.text: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_data(self, data):
        self.text.append(data)


def test_html_report_links_what_it_wrote_and_escapes_the_data(raw, tmp_path):
    out = tmp_path / "report"
    (out / "thumbs").mkdir(parents=True)
    (out / "thumbs" / "999999.jpg").write_bytes(b"stale")  # an earlier report's
    r = look.html_report(raw, out, per_class=2, progress=False)
    page = _Page()
    text = (out / "index.html").read_text(encoding="utf-8")
    page.feed(text)
    assert "script" not in page.tags
    assert page.images and "stats.png" in page.images
    for src in page.images:
        assert not src.startswith("/") and ".." not in src and ":" not in src, src
        assert (out / src).is_file(), src
    thumbs = sorted(p.name for p in (out / "thumbs").iterdir())
    assert thumbs == [f"{i:06d}.jpg" for i in range(r["thumbs"])] and r["thumbs"] == 8
    assert sum(src.startswith("thumbs/") for src in page.images) == 8
    shown = "".join(page.text)
    for name in COUNTS:
        assert name in shown
    for _, picks in r["groups"]:
        for _, key in picks:
            assert key in shown
    assert SCRIPT_CLASS not in text and "&lt;script&gt;alert(1)" in text
    assert "samples   18" in shown  # the summary `shardkit show` prints


def test_html_report_of_a_dataset_without_labels(unlabeled, tmp_path):
    folder, _ = unlabeled
    r = look.html_report(folder, tmp_path / "r", samples=5, progress=False)
    assert r["thumbs"] == 5 and r["groups"][0][0] is None
    text = (tmp_path / "r" / "index.html").read_text()
    assert all(key in text for _, key in r["groups"][0][1])


# --------------------------------------------------------------------------- command line


def _run(argv) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as exc:
        return exc.code


def test_cli_grid_stats_html(raw, tmp_path, capfd):
    grid, stats, report = tmp_path / "g.png", tmp_path / "sub" / "s.png", tmp_path / "h"
    assert _run(["show", raw, "--grid", grid, "--stats", stats, "--html", report,
                 "--per-class", "1", "--seed", "1"]) == 0
    out = capfd.readouterr().out
    assert grid.is_file() and stats.is_file() and (report / "index.html").is_file()
    assert Image.open(grid).size == look.sheet_size(4, 1)
    assert re.search(r"stats: 18 samples read", out) and "grid: 4 samples, 4 rows" in out


def test_cli_max_samples(raw, tmp_path, capfd):
    assert _run(["show", raw, "--stats", tmp_path / "s.png", "--max-samples", "5"]) == 0
    assert "stats: 5 samples read" in capfd.readouterr().out


def test_cli_show_without_flags_prints_the_summary(raw, tmp_path, capfd):
    assert _run(["show", raw]) == 0
    out = capfd.readouterr().out
    assert out.startswith("dataset   ") and "samples   18" in out
    assert not list(tmp_path.iterdir())


def test_cli_bad_source_and_bad_counts(tmp_path, capfd):
    assert _run(["show", tmp_path / "nowhere", "--grid", tmp_path / "g.png"]) == 1
    err = capfd.readouterr().err
    assert err.startswith("error: ") and "nowhere" in err and "Traceback" not in err
    assert not (tmp_path / "g.png").exists()
    assert _run(["show", tmp_path, "--grid", tmp_path / "g.png", "--per-class", "0"]) == 2
    assert "must be at least 1" in capfd.readouterr().err


def test_keys_that_are_not_utf8_and_listed_shards_are_shown_too(tmp_path, capfd):
    """A member named in Latin-1 (a key with surrogate escapes) and one .tar given by path: the
    report is written and the summary says what it cannot know (no sha256 for listed shards)."""
    folder = tmp_path / "shards"
    folder.mkdir()
    with tarfile.open(folder / "a-000000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in ((b"caf\xe9.jpg", jpeg_bytes(photo(16, 16, seed=1))),
                           (b"caf\xe9.cls", b"0"), (b"plain.jpg", jpeg_bytes(photo(16, 16, seed=2))),
                           (b"plain.cls", b"1")):
            info = tarfile.TarInfo(name.decode("utf-8", "surrogateescape"))
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    shardkit.index_shards(folder, progress=False)
    out = tmp_path / "report"
    r = look.html_report(folder, out)
    assert r["thumbs"] == 2
    page = (out / "index.html").read_text("utf-8")
    assert "caf\\udce9" in page
    shard = str(folder / "a-000000.tar")
    assert main(["show", shard]) == 0
    assert "sha256 unknown" in capfd.readouterr().out
    assert main(["show", shard, "--html", str(tmp_path / "r2")]) == 0
    assert (tmp_path / "r2" / "index.html").exists()
