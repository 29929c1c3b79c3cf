"""Which manifests may name shards outside their own folder: those this machine's key signed.

A manifest that arrived with the data must never send reads elsewhere (another host, another
bucket, a local file such as ``/etc/passwd``): its shard and index URLs are plain relative names
inside the dataset, checked when it is loaded. Only the user may point a manifest elsewhere,
by passing those URLs to ``shardkit index --out DIR``, which signs the manifest it writes with
an HMAC-SHA256 of its bytes under a secret key of this machine's user:
``$SHARDKIT_INDEX_KEY``, else the key file ``~/.config/shardkit/index.key`` (made on first use:
32 random bytes, readable by its owner only). A manifest with full shard URLs loads only when its
signature holds under that key, so a manifest written anywhere else (or edited since) cannot
redirect reads. Training on other machines needs the same key: a shared home folder has it,
else copy the file or set the variable.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from pathlib import Path
from typing import Literal, overload

from .errors import ManifestError

FIELD = "signature"  # the manifest field that holds it
KEY_VARIABLE = "SHARDKIT_INDEX_KEY"


def key_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "shardkit" / "index.key"


@overload
def _key(create: Literal[True]) -> bytes: ...
@overload
def _key(create: bool) -> bytes | None: ...


def _key(create: bool) -> bytes | None:
    text = os.environ.get(KEY_VARIABLE)
    if text:
        return text.encode("utf-8")
    path = key_path()
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        if not create:
            return None
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32).encode("ascii")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, key + b"\n")
    finally:
        os.close(fd)
    return key


def _canonical(doc: dict) -> bytes:
    body = {k: v for k, v in doc.items() if k != FIELD}
    return json.dumps(body, sort_keys=True, ensure_ascii=True, separators=(",", ":")).encode()


def sign(manifest_json: bytes) -> bytes:
    """The manifest's JSON with its signature under this machine's key (made if needed)."""
    doc = json.loads(manifest_json)
    doc[FIELD] = hmac.new(_key(create=True), _canonical(doc), hashlib.sha256).hexdigest()
    return (json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def check(doc: dict, where: str) -> None:
    """Raise ManifestError unless ``doc`` (a parsed manifest) carries a signature that holds
    under this machine's key."""
    given = doc.get(FIELD)
    key = _key(create=False)
    if not isinstance(given, str) or not re.fullmatch(r"[0-9a-f]{64}", given) \
            or key is None or not hmac.compare_digest(
            given, hmac.new(key, _canonical(doc), hashlib.sha256).hexdigest()):
        raise ManifestError(
            f"{where}: names shards outside its folder but is not signed by this machine's "
            f"shardkit index key (a manifest that came with the data may not point elsewhere; "
            f"index the shards here with `shardkit index ... --out DIR`, or give this machine "
            f"the key that signed it: {key_path()} or ${KEY_VARIABLE})")
