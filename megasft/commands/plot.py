"""Plot a run's loss / learning rate / grad norm curves to PNG, one point per logged step.

    megasft plot runs/tiny_chat/metrics.jsonl -o runs/tiny_chat/curves.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megasft.commands import HelpFormatter
from megasft.training.metrics import plot_metrics


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="megasft plot", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("metrics", type=Path, help="metrics.jsonl written by megasft train")
    ap.add_argument("-o", "--out", type=Path, default=None,
                    help="PNG path (None: curves.png next to the metrics file)")
    args = ap.parse_args(argv)
    try:
        out = plot_metrics(args.metrics, args.out or args.metrics.with_name("curves.png"))
    except (ImportError, ValueError, OSError) as err:
        print(f"megasft plot: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
