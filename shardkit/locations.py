"""Where a dataset is, as a user names it, and the first mistakes made naming it.

Shared by loading a manifest (:func:`shardkit.manifest.load_manifest`, which takes one shard or a
brace pattern as a shard list: :func:`shard_list`) and by the datasets' constructors
(:func:`check_location`: a missing path or an unpacked image folder said where the dataset is
made, not in a DataLoader worker). The messages name the path and say what to do.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ManifestError
from .gzipped import SHARD_SUFFIXES, is_shard_name
from .shardformat import MANIFEST_NAME, MANIFEST_PATH, MSGPACK_NAME, MSGPACK_PATH


def no_such_path(path) -> ManifestError:
    parent = path.parent
    try:
        near = sorted(p.name for p in parent.iterdir())[:8] if parent.is_dir() else []
    except OSError:
        near = []
    return ManifestError(f"{path}: no such file or directory" + (
        f" ({parent} holds: {', '.join(near)})" if near else ""))


def image_folder_hint(path) -> str:
    return (f"{path} is a folder of images: pack it first, e.g. "
            f"shardkit pack {path} {path}-shards --mode resize --size 256")


def check_location(source) -> None:
    """The mistakes a local path shows at a glance, raised where the dataset is made (before
    any worker starts): a path that does not exist, a folder of images not packed yet. One
    ``stat`` (and a look into a folder without a manifest); remote locations are not looked at."""
    try:
        text = os.fspath(source)
    except TypeError:
        return
    if not isinstance(text, str) or "://" in text or ("{" in text and ".." in text):
        return
    path = Path(text).expanduser()  # as the local store takes it
    if not path.exists():
        raise no_such_path(path)
    if path.is_dir() and not any((path / n).exists() for n in (MANIFEST_PATH, MANIFEST_NAME,
                                                               MSGPACK_PATH, MSGPACK_NAME)) \
            and not any(any(path.glob(f"*{suffix}")) for suffix in SHARD_SUFFIXES) \
            and image_folder(path):
        raise ManifestError(f"{path}: no manifest found ({image_folder_hint(path)})")


def image_folder(base) -> bool:
    """Whether a folder holds images (itself, or its class subfolders) among its first entries."""
    images = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
    try:
        for i, entry in enumerate(sorted(base.iterdir())[:50]):
            if entry.suffix.lower() in images:
                return True
            if entry.is_dir() and i < 10:
                if any(p.suffix.lower() in images for p in list(entry.iterdir())[:20]):
                    return True
    except OSError:
        return False
    return False


def shard_list(source) -> list[str] | None:
    """The shard paths a source names by itself: one ``.tar`` (``.tar.gz``, ``.tgz``) path or
    URL, or a brace pattern
    (``shard-{000000..000099}.tar``); None for a folder, prefix or manifest."""
    try:
        text = os.fspath(source)
    except TypeError:
        return None
    if not isinstance(text, str):
        return None
    if "{" in text and "}" in text and ".." in text:
        import braceexpand

        return list(braceexpand.braceexpand(text))
    if is_shard_name(text) and not text.endswith("/"):  # .tar, .tar.gz, .tgz
        return [text]
    return None
