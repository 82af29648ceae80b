"""Print documents of an indexed dataset as token | text | label, trained tokens highlighted; or, with
--audit, the trained-token counts per role and part (whole dataset and per conversation) and the flags of
megasft.data.audit (exit status 1 when a trained token lies outside an assistant part).

Example:
    megasft inspect --data data/train --tokenizer path/to/tokenizer -n 3
    megasft inspect --data data/train --audit
"""
from __future__ import annotations

import argparse
import sys

from megasft.commands import HelpFormatter
from megasft.data.audit import format_audit, run_audit
from megasft.data.indexed import DatasetError, IndexedDataset
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
    p.add_argument("--audit", action="store_true",
                   help="count trained tokens per role/part and flag masks that train outside assistant parts; "
                        "-n conversations are listed in full, plus every flagged one (up to 20)")
    args = p.parse_args(argv)
    ds = IndexedDataset(args.data)
    source = args.tokenizer or ds.meta.get("tokenizer")
    if source is None:
        print(f"error: {args.data} was preprocessed without a tokenizer (pretokenized input); pass --tokenizer "
              "to show token text", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(source, ds.meta.get("template"))
    if args.audit:
        try:
            report = run_audit(ds)
        except DatasetError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(format_audit(ds, report, show_docs=args.num, tokenizer=tokenizer))
        return 1 if report.problems else 0
    color = args.color == "on" or (args.color == "auto" and sys.stdout.isatty())
    print(format_meta(ds))
    for doc in range(args.start, min(len(ds), args.start + args.num)):
        print()
        print(format_document(ds, doc, tokenizer, color=color, max_tokens=args.max_tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
