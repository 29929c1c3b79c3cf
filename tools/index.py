#!/usr/bin/env python
"""Thin wrapper: `python tools/index.py --help`; same as `shardkit index`."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from shardkit.cli import index_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(index_main())
