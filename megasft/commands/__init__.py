"""The ``megasft`` subcommands other than train and chat: argument parsing and printing only, over
library functions (megasft.data, megasft.checkpoint, megasft.planner, megasft.training.metrics).
``tools/*.py`` are kept as thin wrappers over these for existing scripts."""
import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Docstrings as written, and every option's default in its help."""
