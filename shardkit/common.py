"""Small helpers that packing, reading and the command line share: byte sizes and CPU counts."""

from __future__ import annotations

import os
import re

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | str, name: str = "max_bytes") -> int:
    """``256MB`` -> 256_000_000, ``1GiB`` -> 1_073_741_824, ints unchanged; at least 4096.
    ``name`` is the argument's name in error messages."""
    number: float
    if isinstance(value, int) and not isinstance(value, bool):
        number, unit = value, 1
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"{name}: cannot parse {value!r} (examples: 256MB, 1GiB, 100000)")
        number, unit = float(match.group(1)), _UNITS[match.group(2).lower()]
    result = int(number * unit)
    if result < 4096:
        raise ValueError(f"{name} must be at least 4096 bytes, got {value!r}")
    return result


def format_bytes(n: float) -> str:
    """``1234567`` -> ``1.2 MB`` (decimal units, as ``parse_bytes`` reads them)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
