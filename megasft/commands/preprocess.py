"""Chat data (JSONL, Parquet, datasets save_to_disk) -> memory-mapped indexed dataset (a thin CLI
over megasft.data.preprocess).

Example:
    megasft preprocess --input train.jsonl --output data/train \\
        --tokenizer path/to/tokenizer --template llama3 --seq-len 4096 --workers 8
    megasft preprocess --input tokens.parquet --output data/pre --vocab-size 128256
"""
from __future__ import annotations

import argparse
import sys

from megasft.commands import HelpFormatter
from megasft.data.formats import FORMATS, UNREADABLE, DataError
from megasft.data.cache import default_cache_dir
from megasft.data.preprocess import LONG_POLICIES, NEEDS_TOKENIZER, PreprocessOptions, format_summary, preprocess
from megasft.data.templates import MASK_MODES, REASONING_POLICIES, TemplateError
from megasft.data.tokenizer import TokenizerError


def parse_args(argv=None) -> PreprocessOptions:
    p = argparse.ArgumentParser(prog="megasft preprocess", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help="JSONL file(s), one conversation per line, plain, .gz or .zst; a .json file holding "
                        "one JSON array of records (Alpaca's release format); .parquet / .arrow files; datasets "
                        "save_to_disk directories; or directories of them")
    p.add_argument("--output", required=True, help="output directory of the indexed dataset")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing dataset at --output (jobs reading it keep the old files)")
    p.add_argument("--tokenizer", default=None,
                   help="sentencepiece .model, tokenizer.json, or their directory; not needed for pretokenized input")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="bound on pretokenized input_ids (the model's vocab_size; None: the tokenizer's)")
    p.add_argument("--template", default="llama3",
                   help="llama3 | chatml | a built-in family (see README) | jinja | path to a tokenizer dir, "
                        "tokenizer_config.json or .jinja; @NAME picks a named template")
    p.add_argument("--mask-mode", default="completion_eot", choices=MASK_MODES, help="which tokens are trained")
    p.add_argument("--last-turn-only", action="store_true", help="train only the last assistant turn")
    p.add_argument("--train-reasoning", default="all", choices=REASONING_POLICIES,
                   help="reasoning trained: all (every turn the template renders it for: its own history policy) | "
                        "last (the last assistant turn's) | none")
    p.add_argument("--format", default="auto", choices=FORMATS, dest="input_format",
                   help="record format (auto: told per line from its keys)")
    p.add_argument("--seq-len", type=int, default=None, help="longest kept conversation in tokens (None: no limit)")
    p.add_argument("--long", default="drop", choices=LONG_POLICIES, dest="long_policy",
                   help="what to do with conversations longer than --seq-len")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad lines instead of stopping")
    p.add_argument("--max-bad-fraction", type=float, default=0.1,
                   help="with --skip-bad, fail if more than this fraction of the lines are bad")
    p.add_argument("--workers", type=int, default=0, help="tokenising processes (0 = all cores)")
    p.add_argument("--cache-dir", default=default_cache_dir(),
                   help="cache of tokenised input files: a re-run tokenises only files (or settings) it has not "
                        "seen ($MEGASFT_CACHE_DIR or ~/.cache/megasft/preprocess)")
    p.add_argument("--no-cache", action="store_const", const=None, dest="cache_dir", help="do not use the cache")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (None: only when stderr is a terminal; no \\r frames in logs)")
    args = p.parse_args(argv)
    if args.progress is None:
        args.progress = sys.stderr.isatty()
    return PreprocessOptions(inputs=args.input, **{k: v for k, v in vars(args).items() if k != "input"})


def main(argv=None) -> int:
    opts = parse_args(argv)
    try:
        summary = preprocess(opts)
    except (DataError, TemplateError, TokenizerError, ValueError, OSError, ImportError) as e:   # DatasetError: a ValueError
        skippable = isinstance(e, DataError) and e.reason not in (UNREADABLE, NEEDS_TOKENIZER) and not opts.skip_bad
        hint = " (use --skip-bad to skip and count such lines)" if skippable else ""
        print(f"error: {e}{hint}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    print(f"wrote {opts.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
