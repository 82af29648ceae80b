"""Convert between Hugging Face directories (Llama, Qwen2/2.5, Qwen3, Mistral, Gemma 2/3, Phi-3/4;
config.json decides, an unsupported architecture is refused by name) and megasft checkpoints (one
process, CPU only).

Examples:
    megasft convert hf-to-megasft --hf /models/Llama-3.1-8B --out ckpt --tp 8 --pp 1
    megasft convert megasft-to-hf --ckpt runs/x/checkpoints --out hf_out --dtype bf16 \\
        --tokenizer /models/Llama-3.1-8B

A megasft checkpoint does not depend on the layout: the hf-to-megasft result loads at --tp/--pp
(checked here) and at any other. --ckpt takes a checkpoint directory or a root holding ``latest``.
The export is a complete chat model: weights, config.json, generation_config.json (eos = end-of-turn
and eos ids), tokenizer.json, tokenizer_config.json with the run's chat template, special_tokens_map.json.
Exit status: 0 on success, 2 on bad input (the message names the file and what differs).
"""
from __future__ import annotations

import argparse
import sys

from megasft.checkpoint.convert import DTYPES, hf_to_megasft, megasft_to_hf
from megasft.checkpoint.errors import CheckpointError, CheckpointMismatch
from megasft.commands import HelpFormatter
from megasft.config import ConfigError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="megasft convert", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("hf-to-megasft", help="HF directory -> megasft checkpoint", formatter_class=HelpFormatter)
    imp.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    imp.add_argument("--out", required=True, help="checkpoint root to create (gets step_00000000 and latest)")
    imp.add_argument("--tp", type=int, default=1, help="tensor-parallel size the model must split into")
    imp.add_argument("--pp", type=int, default=1, help="pipeline-parallel size the model must split into")
    exp = sub.add_parser("megasft-to-hf", help="megasft checkpoint -> HF directory", formatter_class=HelpFormatter)
    exp.add_argument("--ckpt", required=True, help="checkpoint directory, or a root with 'latest'")
    exp.add_argument("--out", required=True, help="output HF directory")
    exp.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                     help="weight dtype (None: the dtype of the model the run started from, i.e. "
                          "torch_dtype of model.init_from_hf's config.json; bf16 when unknown)")
    exp.add_argument("--tokenizer", default=None,
                     help="tokenizer file or directory to export as tokenizer.json (None: the one the run's "
                          "training data was preprocessed with, else data.tokenizer)")
    exp.add_argument("--template", default=None,
                     help="chat template written to tokenizer_config.json (None: the run's, as for --tokenizer)")
    exp.add_argument("--max-shard-size-mb", type=float, default=5 * 1024.0, help="safetensors shard cap (MiB)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "hf-to-megasft":
            path = hf_to_megasft(args.hf, args.out, tp=args.tp, pp=args.pp)
        else:
            path = megasft_to_hf(args.ckpt, args.out, dtype=args.dtype, tokenizer=args.tokenizer,
                                 max_shard_bytes=int(args.max_shard_size_mb * 2 ** 20), template=args.template)
    except (CheckpointError, CheckpointMismatch, ConfigError, FileNotFoundError, KeyError, ValueError) as err:
        print(f"convert_checkpoint: {err}", file=sys.stderr)
        return 2
    print(f"convert_checkpoint: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
