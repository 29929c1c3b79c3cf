#!/usr/bin/env python
"""Thin wrapper: `python tools/scale.py --help`; the scale benchmark in shardkit.bench.scale."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from shardkit.bench.scale import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
