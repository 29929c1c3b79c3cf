#!/usr/bin/env python
"""Thin wrapper: `python tools/gpu_check.py --help`; every GPU measurement in one run, one JSON
document (shardkit/bench/gpu.py)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from shardkit.bench.gpu import main  # noqa: E402

if __name__ == "__main__":
    main()
