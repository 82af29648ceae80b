#!/usr/bin/env python
"""Kept for existing scripts: the same as `megasft plot` (megasft/commands/plot.py)."""
import sys

from megasft.commands.plot import main

if __name__ == "__main__":
    sys.exit(main())
