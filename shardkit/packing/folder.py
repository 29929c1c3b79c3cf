"""Scan a source folder: which files are samples, their labels and their keys.

Layouts:
- ImageFolder: one sub-folder per class (nested folders inside a class are walked too, whatever
  their names: ``cats/album.jpg/x.jpg`` is an image of class ``cats``). Class indices follow the
  sorted folder names, as in torchvision's ``ImageFolder``.
- Flat: images directly in the source folder, no labels.

Problems found while scanning (symlink loops, unreadable folders, empty class folders) are returned,
not raised, so that ``on_error`` decides what happens with them.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SourceError
from ..shardformat import IMAGE_FIELDS

IMAGE_EXTENSIONS = tuple(f".{field}" for field in IMAGE_FIELDS)
ARRAY_EXTENSIONS = (".npy", ".pt")
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_KEY_STEM_CHARS = 48


@dataclass(frozen=True)
class Item:
    """One source file that becomes one sample."""

    relpath: str  # POSIX path relative to the source folder
    path: str  # absolute path used to read it
    key: str
    label: int | None
    class_name: str | None
    kind: str  # "image" or "array"
    size: int = -1  # bytes, from the scan (-1: could not stat)


@dataclass
class Scan:
    root: str
    items: list[Item]
    classes: list[str] | None
    ignored: int = 0  # files whose extension is not an image or array extension
    problems: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)

    @property
    def kind(self) -> str:
        kinds = {item.kind for item in self.items}
        return kinds.pop() if len(kinds) == 1 else "mixed"


def make_key(relpath: str) -> str:
    """A stable, unique, dot-free sample key for a relative source path.

    Readable part: the path without its extension, every run of characters outside
    ``[A-Za-z0-9_-]`` replaced by ``_``, cut to its last 48 characters. Unique part: 12 hex digits of
    the SHA-1 of the whole relative path (extension included), so ``a.jpg`` and ``a.png`` differ.
    """
    stem = relpath.rsplit(".", 1)[0] if "." in relpath.rsplit("/", 1)[-1] else relpath
    readable = _KEY_UNSAFE.sub("_", stem).strip("_")[-_KEY_STEM_CHARS:].lstrip("_") or "x"
    digest = hashlib.sha1(relpath.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return f"{readable}-{digest}"


def _kind_of(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith(IMAGE_EXTENSIONS):
        return "image"
    if lower.endswith(ARRAY_EXTENSIONS):
        return "array"
    return None


def _walk_files(top: str, top_rel: str, problems: list[tuple[str, str]],
                seen: set[tuple[int, int]]) -> list[tuple[str, os.DirEntry]]:
    """``(relative path, entry)`` of all files below ``top`` (following symlinks, refusing loops),
    sorted by relative path. Plain strings and ``os.scandir``: this runs once per file."""
    out: list[tuple[str, os.DirEntry]] = []
    stack = [(top, top_rel)]
    while stack:
        folder, rel = stack.pop()
        try:
            st = os.stat(folder)
        except OSError as exc:
            problems.append((rel, f"cannot open folder: {exc.strerror or exc}"))
            continue
        ident = (st.st_dev, st.st_ino)
        if ident in seen:
            problems.append((rel, "symlink loop (folder already visited)"))
            continue
        seen.add(ident)
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            problems.append((rel, f"cannot list folder: {exc.strerror or exc}"))
            continue
        subdirs = []
        for entry in entries:
            entry_rel = f"{rel}/{entry.name}"
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError as exc:  # ELOOP on a self-referencing link
                problems.append((entry_rel, f"unreadable: {exc.strerror or exc}"))
                continue
            if is_dir:  # walked into whatever its name, as torchvision's ImageFolder does
                subdirs.append((entry.path, entry_rel))
            else:
                out.append((entry_rel, entry))
        stack.extend(reversed(subdirs))
    return out


def scan_folder(src: str | os.PathLike) -> Scan:
    """Find the samples below ``src``. Raises ``SourceError`` for a missing or empty source."""
    root = Path(src).expanduser()
    if not root.exists():
        raise SourceError(root, "source folder does not exist")
    if not root.is_dir():
        raise SourceError(root, "source is not a folder")
    root = root.resolve()
    problems: list[tuple[str, str]] = []
    seen: set[tuple[int, int]] = set()
    try:
        top_entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        raise SourceError(root, f"cannot list source folder: {exc.strerror or exc}") from exc
    class_dirs = [e for e in top_entries if _is_dir(e)]  # classes, whatever their names
    top_files = [e for e in top_entries if not _is_dir(e)]
    items: list[Item] = []
    ignored = 0
    classes: list[str] | None

    def add(rel: str, entry: os.DirEntry, label: int | None, class_name: str | None) -> None:
        nonlocal ignored
        kind = _kind_of(entry.name)
        if kind is None:
            ignored += 1
            return
        try:
            st = entry.stat(follow_symlinks=True)
        except OSError:
            size = -1  # a dangling link: reported as unreadable when it is read
        else:
            if not stat.S_ISREG(st.st_mode):  # FIFOs, sockets, devices could block or never end
                problems.append((rel, "not a regular file"))
                return
            size = st.st_size
        items.append(Item(rel, entry.path, make_key(rel), label, class_name, kind, size))

    if class_dirs:
        classes = [e.name for e in class_dirs]
        seen.add(_ident(root))
        for entry in top_files:
            if _kind_of(entry.name) is not None:
                problems.append((entry.name, "image beside class folders (not in any class)"))
            else:
                ignored += 1
        for label, entry in enumerate(class_dirs):
            before = len(items)
            for rel, file_entry in _walk_files(entry.path, entry.name, problems, seen):
                add(rel, file_entry, label, entry.name)
            if len(items) == before:
                problems.append((entry.name, "empty class folder (no images)"))
    else:
        classes = None
        for entry in top_files:
            add(entry.name, entry, None, None)
    if not items:
        hint = ", ".join(IMAGE_EXTENSIONS + ARRAY_EXTENSIONS)
        raise SourceError(root, f"no images found (supported extensions: {hint})")
    keys: dict[str, str] = {}
    for item in items:
        if item.key in keys:  # a SHA-1 prefix collision: practically never, but never silent
            raise SourceError(item.relpath, f"key {item.key!r} collides with {keys[item.key]!r}")
        keys[item.key] = item.relpath
    return Scan(str(root), items, classes, ignored, problems)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:
        return False


def _ident(path: Path) -> tuple[int, int]:
    st = path.stat()
    return (st.st_dev, st.st_ino)
