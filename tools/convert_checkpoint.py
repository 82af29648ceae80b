#!/usr/bin/env python
"""Kept for existing scripts: the same as `megasft convert` (megasft/commands/convert.py)."""
import sys

from megasft.commands.convert import main

if __name__ == "__main__":
    sys.exit(main())
