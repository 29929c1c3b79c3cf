#!/usr/bin/env python
"""Thin wrapper: `python tools/bench.py --help`; same as `shardkit bench`."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from shardkit.cli import bench_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(bench_main())
