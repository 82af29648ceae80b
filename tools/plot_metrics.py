#!/usr/bin/env python
"""Plot a run's loss / learning rate / grad norm curves to PNG.

    python tools/plot_metrics.py runs/tiny_chat/metrics.jsonl -o runs/tiny_chat/curves.png
"""
import argparse
from pathlib import Path

from megasft.training.metrics import plot_metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("metrics", type=Path, help="metrics.jsonl written by megasft.train")
    ap.add_argument("-o", "--out", type=Path, help="PNG path (default: next to the metrics file)")
    args = ap.parse_args()
    out = plot_metrics(args.metrics, args.out or args.metrics.with_name("curves.png"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
