"""Scanning a source folder: labels, keys, ignored files, and what counts as a problem."""

from __future__ import annotations

import os
import shutil

import pytest

from shardkit.errors import SourceError
from shardkit.packing.folder import make_key, scan_folder

from conftest import jpeg_bytes, make_class_folder, photo, png_bytes, write

TRICKY_NAMES = ["a.jpg", "a.png", "a.b.c.jpg", "my photo.jpg", "café.jpg", "日本語.jpg",
                "..jpg", "-.jpg", "x" * 120 + ".jpg"]


def tricky_folder(root):
    for i, name in enumerate(TRICKY_NAMES):
        data = png_bytes(photo(seed=i)) if name.endswith(".png") else jpeg_bytes(photo(seed=i))
        write(root / "cls.with.dots" / name, data)
        write(root / "other class" / name, data)
    return root


def test_labels_follow_sorted_class_folder_names(tmp_path):
    root = tmp_path / "src"
    for name in ["zebra", "Apple", "mango", "10", "9"]:
        write(root / name / "i.jpg", jpeg_bytes(photo()))
    scan = scan_folder(root)
    assert scan.classes == sorted(["zebra", "Apple", "mango", "10", "9"])
    for item in scan.items:
        assert scan.classes[item.label] == item.class_name == item.relpath.split("/")[0]


def test_nested_folders_inside_a_class_are_walked(tmp_path):
    root = tmp_path / "src"
    write(root / "a" / "x" / "y" / "deep.jpg", jpeg_bytes(photo()))
    write(root / "a" / "top.jpg", jpeg_bytes(photo()))
    write(root / "b" / "b.jpg", jpeg_bytes(photo()))
    scan = scan_folder(root)
    assert sorted(i.relpath for i in scan.items) == ["a/top.jpg", "a/x/y/deep.jpg", "b/b.jpg"]
    assert {i.relpath: i.label for i in scan.items}["a/x/y/deep.jpg"] == 0


def test_flat_folder_has_no_labels(tmp_path):
    for i in range(3):
        write(tmp_path / f"{i}.jpg", jpeg_bytes(photo(seed=i)))
    scan = scan_folder(tmp_path)
    assert scan.classes is None and len(scan.items) == 3
    assert all(i.label is None and i.class_name is None for i in scan.items)


def test_keys_unique_dot_free_and_safe_for_tricky_names(tmp_path):
    scan = scan_folder(tricky_folder(tmp_path / "src"))
    keys = [i.key for i in scan.items]
    assert len(keys) == 2 * len(TRICKY_NAMES)
    assert len(set(keys)) == len(keys)
    for key in keys:
        assert "." not in key and "/" not in key and " " not in key
        assert key.isascii() and key and len(key) <= 64
    same_stem = [i.key for i in scan.items if i.relpath in ("other class/a.jpg", "other class/a.png")]
    assert len(same_stem) == 2 and same_stem[0] != same_stem[1]


def test_keys_are_stable_and_independent_of_location(tmp_path):
    a = tricky_folder(tmp_path / "one")
    b = tmp_path / "elsewhere" / "two"
    shutil.copytree(a, b)
    keys_a = {i.relpath: i.key for i in scan_folder(a).items}
    assert keys_a == {i.relpath: i.key for i in scan_folder(a).items}
    assert keys_a == {i.relpath: i.key for i in scan_folder(b).items}
    # a pure function of the relative path, pinned so that a change of the scheme is noticed
    assert make_key("cat/a.b.jpg") == make_key("cat/a.b.jpg")
    assert make_key("cat/a.jpg") != make_key("cat/a.png") != make_key("dog/a.jpg")


def test_non_image_files_are_ignored_and_counted(tmp_path):
    root = make_class_folder(tmp_path / "src", per_class=2)
    write(root / "cat" / "notes.txt", b"hello")
    write(root / "dog" / "labels.csv", b"a,b")
    write(root / "README.md", b"# readme")
    scan = scan_folder(root)
    assert scan.ignored == 3
    assert len(scan.items) == 6 and not scan.problems


@pytest.mark.parametrize("kind", ["missing", "empty", "not_a_folder", "only_text"])
def test_source_folder_errors(tmp_path, kind):
    src = tmp_path / "src"
    if kind == "empty":
        src.mkdir()
    elif kind == "not_a_folder":
        src.write_bytes(b"x")
    elif kind == "only_text":
        write(src / "a" / "notes.txt", b"x")
    with pytest.raises(SourceError) as info:
        scan_folder(src)
    assert str(src.name) in str(info.value)


def test_problems_are_reported_not_raised(tmp_path):
    root = make_class_folder(tmp_path / "src", per_class=2)
    (root / "cat" / "dangling.jpg").symlink_to(root / "cat" / "no-such-file.jpg")
    (root / "cat" / "self.jpg").symlink_to("self.jpg")  # ln -s self.jpg self.jpg: ELOOP
    (root / "cat" / "dir.jpg").mkdir()  # an empty sub-folder, whatever its name: nothing
    (root / "dog" / "loop").symlink_to("..")  # a folder link to its parent
    (root / "empty").mkdir()
    write(root / "stray.jpg", jpeg_bytes(photo()))  # beside the class folders
    scan = scan_folder(root)
    problems = dict(scan.problems)
    assert "symlink" in problems["dog/loop"] and "loop" in problems["dog/loop"]
    assert "cat/dir.jpg" not in problems
    assert "empty" in problems["empty"]
    assert "class" in problems["stray.jpg"]
    assert "symbolic links" in problems["cat/self.jpg"]  # ELOOP, found while walking
    # a dangling link is an item: reading it fails with the reason (see test_writer)
    rel = {i.relpath for i in scan.items}
    assert "cat/dangling.jpg" in rel and "cat/self.jpg" not in rel
    assert "dir.jpg" not in " ".join(rel)
    assert scan.classes == ["cat", "dog", "eel", "empty"]


def test_self_referencing_link_in_flat_folder_does_not_crash(tmp_path):
    write(tmp_path / "a.jpg", jpeg_bytes(photo()))
    os.symlink("x.jpg", tmp_path / "x.jpg")
    os.symlink("y", tmp_path / "y")
    scan = scan_folder(tmp_path)
    assert scan.classes is None  # the looping links did not turn the folder into classes
    assert sorted(i.relpath for i in scan.items) == ["a.jpg", "x.jpg"]


def test_folders_named_like_images_are_walked_into(tmp_path):
    # as torchvision's ImageFolder: a folder is a folder, whatever its name
    root = tmp_path / "src"
    write(root / "cats" / "directory.jpg" / "inner.jpg", jpeg_bytes(photo()))
    write(root / "cats" / "top.jpg", jpeg_bytes(photo()))
    write(root / "dogs.png" / "d.jpg", jpeg_bytes(photo()))
    scan = scan_folder(root)
    assert scan.problems == []
    assert scan.classes == ["cats", "dogs.png"]
    assert sorted((i.relpath, i.label) for i in scan.items) == [
        ("cats/directory.jpg/inner.jpg", 0), ("cats/top.jpg", 0), ("dogs.png/d.jpg", 1)]
