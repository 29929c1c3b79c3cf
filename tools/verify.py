#!/usr/bin/env python
"""Thin wrapper: `python tools/verify.py --help`; same as `shardkit verify`."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from shardkit.cli import verify_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(verify_main())
