#!/usr/bin/env python
"""Thin wrapper: `python tools/show.py --help`; same as `shardkit show`."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from shardkit.cli import show_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(show_main())
