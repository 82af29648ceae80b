#!/usr/bin/env python
"""Kept for existing scripts: the same as `megasft preprocess` (megasft/commands/preprocess.py)."""
import sys

from megasft.commands.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
