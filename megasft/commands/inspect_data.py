"""Print documents of an indexed dataset as token | text | label, trained tokens highlighted.

Example:
    megasft inspect --data data/train --tokenizer path/to/tokenizer -n 3
"""
from __future__ import annotations

import argparse
import sys

from megasft.commands import HelpFormatter
from megasft.data.indexed import IndexedDataset
from megasft.data.inspect import format_document, format_meta
from megasft.data.tokenizer import load_tokenizer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="megasft inspect", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data", required=True, help="indexed dataset directory (megasft preprocess --output)")
    p.add_argument("--tokenizer", default=None, help="tokenizer to show token text (None: the one in meta.json)")
    p.add_argument("-n", "--num", type=int, default=3, help="documents to show")
    p.add_argument("--start", type=int, default=0, help="first document index")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens shown per document (None: all)")
    p.add_argument("--color", choices=("auto", "on", "off"), default="auto",
                   help="highlight trained tokens (auto: when stdout is a terminal)")
    args = p.parse_args(argv)
    ds = IndexedDataset(args.data)
    tokenizer = load_tokenizer(args.tokenizer or ds.meta["tokenizer"], ds.meta.get("template"))
    color = args.color == "on" or (args.color == "auto" and sys.stdout.isatty())
    print(format_meta(ds))
    for doc in range(args.start, min(len(ds), args.start + args.num)):
        print()
        print(format_document(ds, doc, tokenizer, color=color, max_tokens=args.max_tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
