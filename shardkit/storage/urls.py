"""Sources and URLs: which store a dataset or a file lives in. Protocol dispatch happens here only.

A *source* is a dataset folder, a ``manifest.json`` path, ``s3://bucket/prefix[/manifest.json]``,
``http(s)://host/path/[manifest.json]``, or the same under any other protocol fsspec knows
(``gs://``, ``az://``, ``hf://``, ``memory://``, …). ``s3``, ``http`` and ``https`` have tuned
stores (:data:`~shardkit.storage.remote.STORES`); every other fsspec protocol is read through the
generic :class:`~shardkit.storage.generic.FsspecStore`. ``file://`` is a local path. A source
resolves to a :class:`~shardkit.storage.base.Store` rooted at the dataset's folder or prefix;
shard and index names from the manifest are plain relative names resolved inside it, never
elsewhere. Only a caller's own list of shard URLs (:class:`~shardkit.storage.listed.ListedStore`)
reads from other folders, prefixes or hosts.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..shardformat import MANIFEST_NAME
from .base import Store, redact
from .generic import FsspecStore
from .local import LocalStore
from .remote import STORES, RemoteStore

# fsspec protocols that wrap another filesystem (caches, archives, a folder of another one) or
# are local files: not a place of their own that a URL can name. ``file://`` is a local path.
_NOT_SOURCES = frozenset({"file", "local", "asynclocal", "blockcache", "cached", "filecache",
                          "simplecache", "dir", "reference", "tar", "zip", "libarchive",
                          "generic", "async_wrapper", "asyncwrapper", "dask"})


def remote_protocols() -> frozenset[str]:
    """The protocols a source or shard URL may use now: the tuned ones and every other that
    fsspec knows (its list grows when a package registers a filesystem)."""
    from fsspec.registry import known_implementations, registry

    return frozenset(STORES) | (frozenset(known_implementations) | frozenset(registry)) \
        - _NOT_SOURCES


def _is_remote(protocol: str) -> bool:
    """``protocol in remote_protocols()``, without building the set (once per URL)."""
    from fsspec.registry import known_implementations, registry

    return protocol in STORES or (protocol not in _NOT_SOURCES and (
        protocol in known_implementations or protocol in registry))


def __getattr__(name: str):
    # REMOTE_PROTOCOLS: remote_protocols() as a sorted tuple, computed when first asked for (so
    # that importing shardkit does not import fsspec); remote_protocols() also has later ones.
    if name == "REMOTE_PROTOCOLS":
        return tuple(sorted(remote_protocols()))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _scheme(text: str) -> tuple[str | None, str]:
    """``(protocol, rest)`` of a remote URL, ``(None, text)`` of a local path; other schemes are
    refused."""
    match = re.match(r"^([a-z][a-z0-9+.-]*)://(.*)$", text)
    if not match:
        return None, text
    protocol, rest = match.group(1), match.group(2)
    if not _is_remote(protocol):
        raise ValueError(f"{redact(text)}: unsupported protocol {protocol!r} (use a local path, "
                         "s3://, http(s):// or another protocol fsspec knows, such as gs://, "
                         "az://, hf://)")
    return protocol, rest


def store_class(protocol: str) -> type[RemoteStore]:
    """The store class of a remote protocol: its tuned class, else :class:`FsspecStore`. The
    filesystem's package is imported now: one that is missing is an ImportError saying what to
    install (fsspec's message, with the pip command)."""
    import fsspec

    if protocol in _NOT_SOURCES:
        raise ValueError(f"{protocol}://: not a filesystem of its own (use a local path, or the "
                         "URL of the filesystem it wraps)")
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as exc:
        raise ImportError(_install_hint(protocol, exc)) from exc
    return STORES.get(protocol, FsspecStore)


def _install_hint(protocol: str, exc: ImportError) -> str:
    """``<protocol>:// needs <package>: pip install <package> (<fsspec's message>)``."""
    from fsspec.registry import known_implementations

    known = known_implementations.get(protocol, {})
    package = known.get("class", "").split(".")[0]
    message = str(exc) if str(exc) not in ("", "None") else known.get("err") or str(exc.__cause__)
    if package in ("", "fsspec"):  # fsspec's own class: its message names what to install
        return f"{protocol}:// cannot be read: {message}"
    return f"{protocol}:// needs {package}: pip install {package} ({message})"


def split_source(source) -> tuple[str, str, str]:
    """``(protocol, base, manifest_name)`` for a dataset source (protocol ``"file"`` for local)."""
    text = os.fspath(source) if not isinstance(source, str) else source
    text = text.removeprefix("file://")
    protocol, rest = _scheme(text)
    if protocol is not None:
        if rest.endswith(".json"):
            base, _, name = rest.rpartition("/")
            return protocol, base, name
        return protocol, rest.rstrip("/"), MANIFEST_NAME
    path = Path(text).expanduser()
    if path.suffix == ".json" and not path.is_dir():
        return "file", str(path.parent), path.name
    return "file", str(path), MANIFEST_NAME


def split_file_url(url, query: bool = False) -> tuple[str, str, str]:
    """``(protocol, base, name)`` of one file's URL or path: its folder or prefix, and its name.

    Local paths are made absolute (so DataLoader workers and later ``chdir`` agree). A remote
    URL's query string (a pre-signed URL, a hub ``resolve`` URL's ``?download=true``) is kept at
    the end of its name when ``query`` is true, else refused (shardkit derives other URLs, such
    as an index file's, from a shard's). Fragments are refused."""
    if not isinstance(url, (str, os.PathLike)):
        raise TypeError(f"a shard URL must be a str or a path, got {type(url).__name__}")
    text = os.fspath(url)
    if not isinstance(text, str):
        raise TypeError(f"a shard URL must be a str or a path, got {type(text).__name__}")
    text = text.removeprefix("file://")
    protocol, rest = _scheme(text)
    if protocol is not None:
        rest, mark, args = rest.partition("?")
        if mark and query and protocol not in ("http", "https"):
            raise ValueError(f"{redact(text)}: a query string means something to http(s):// "
                             "URLs only")
        if "#" in rest or "#" in args or (mark and not query):
            raise ValueError(f"{redact(text)}: URLs with a query string or fragment are only "
                             "read through an index of their own: shardkit index URL... --out "
                             "DIR, then read DIR")
        base, _, name = rest.rpartition("/")
        if not base or not name:
            raise ValueError(f"{redact(text)}: not the URL of a file")
        return protocol, base, name + mark + args
    path = os.path.abspath(os.path.expanduser(text))
    return "file", os.path.dirname(path), os.path.basename(path)


def open_store(protocol: str, base: str, storage_options: dict | None = None, *,
               retries: int = 6, timeout: float = 60.0) -> Store:
    """The store of folder or prefix ``base`` under ``protocol`` (``"file"``: a local folder)."""
    if protocol == "file":
        return LocalStore(base, timeout=timeout)
    return store_class(protocol)(protocol, base, storage_options, retries=retries,
                                 timeout=timeout)


def make_store(source, storage_options: dict | None = None, *, retries: int = 6,
               timeout: float = 60.0) -> tuple[Store, str]:
    """``(store, manifest name)`` of a dataset source."""
    protocol, base, name = split_source(source)
    return open_store(protocol, base, storage_options, retries=retries, timeout=timeout), name
