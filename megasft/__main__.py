"""``python -m megasft SUBCOMMAND ...`` = the ``megasft`` command (megasft.cli)."""
import sys

from megasft.cli import main

sys.exit(main())
