#!/usr/bin/env python
"""Kept for existing scripts: the same as `megasft plan` (megasft/commands/plan.py)."""
import sys

from megasft.commands.plan import main

if __name__ == "__main__":
    sys.exit(main())
