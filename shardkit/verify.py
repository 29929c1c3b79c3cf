"""Re-read every shard of a dataset and check it against the manifest."""

from __future__ import annotations

import hashlib
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from .manifest import Manifest, decode_index


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    bytes: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)  # (shard url, what differs)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(source, storage_options=None, progress: bool = False) -> VerifyReport:
    """Check sizes, sha256, index files and per-shard sample counts against the manifest."""
    manifest = Manifest.load(source, storage_options=storage_options)
    base = Path(manifest.base_url)
    report = VerifyReport()
    from tqdm.auto import tqdm
    import sys

    for shard in tqdm(manifest.shards, unit="shard", desc="verify",
                      disable=not progress or not sys.stderr.isatty(), file=sys.stderr):
        path = base / shard.url
        report.shards += 1
        try:
            data = path.read_bytes()
        except OSError as exc:
            report.problems.append((shard.url, f"cannot read: {exc.strerror or exc}"))
            continue
        report.bytes += len(data)
        if len(data) != shard.num_bytes:
            report.problems.append((shard.url, f"{len(data)} bytes, manifest says {shard.num_bytes}"))
        if hashlib.sha256(data).hexdigest() != shard.sha256:
            report.problems.append((shard.url, "sha256 differs from the manifest"))
        try:
            index = (base / shard.index_url).read_bytes()
            if hashlib.sha256(index).hexdigest() != shard.index_sha256:
                raise ValueError("sha256 of the index differs from the manifest")
            decode_index(index, shard.num_samples, shard.num_bytes, shard.index_url)
        except (OSError, ValueError) as exc:
            report.problems.append((shard.index_url, str(exc)))
        keys = _count_samples(data, shard.url, report)
        report.samples += keys
        if keys != shard.num_samples:
            report.problems.append((shard.url, f"{keys} samples, manifest says {shard.num_samples}"))
    return report


def _count_samples(data: bytes, url: str, report: VerifyReport) -> int:
    import io

    keys = set()
    last = None
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            for info in tf:
                key = info.name.split(".", 1)[0]
                if key != last:
                    if key in keys:
                        report.problems.append((url, f"sample {key!r} is not contiguous"))
                    keys.add(key)
                    last = key
    except tarfile.TarError as exc:
        report.problems.append((url, f"not a readable tar: {exc}"))
    return len(keys)
