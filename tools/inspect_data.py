#!/usr/bin/env python
"""Kept for existing scripts: the same as `megasft inspect` (megasft/commands/inspect_data.py)."""
import sys

from megasft.commands.inspect_data import main

if __name__ == "__main__":
    sys.exit(main())
