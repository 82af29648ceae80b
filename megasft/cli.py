"""``megasft``: one command for every job (also ``python -m megasft``).

    megasft train --nproc 4 --config examples/configs/tiny_chat.yaml train.steps=50
    megasft train --config X.yaml --nproc 8 --print-config      # resolved config + plan, nothing started
    megasft preprocess --input chats.jsonl --output data/train --tokenizer T --template llama3
    megasft inspect --data data/train -n 3
    megasft convert megasft-to-hf --ckpt runs/x/checkpoints --out hf_out
    megasft plan --config examples/configs/llama3.1_70b.yaml --nodes 8 --search
    megasft plot runs/x/metrics.jsonl
    megasft chat --model runs/x/hf
    megasft eval-generate --model runs/x/hf --tokenizer T --prompts eval.jsonl

Each subcommand is the ``main(argv)`` of a library module, imported only when it runs (so
``megasft plot`` does not import torch.distributed). ``megasft SUBCOMMAND --help`` lists its
options with their defaults. Under torchrun, ``torchrun ... -m megasft train ...`` and
``torchrun ... -m megasft.train ...`` run the same code.
"""
from __future__ import annotations

import importlib
import sys

# subcommand -> (module with main(argv), one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("megasft.train", "train (--nproc N on this node; under torchrun as -m megasft.train)"),
    "preprocess": ("megasft.commands.preprocess", "chat JSONL -> indexed dataset"),
    "inspect": ("megasft.commands.inspect_data", "show what a dataset trains on, token by token"),
    "convert": ("megasft.commands.convert", "Hugging Face <-> megasft checkpoints"),
    "plan": ("megasft.commands.plan", "memory / throughput of a layout on a cluster; --search"),
    "plot": ("megasft.commands.plot", "loss / lr / grad-norm curves of a run to PNG"),
    "chat": ("megasft.chat", "chat with a trained model (checkpoint or HF export)"),
    "eval-generate": ("megasft.generate", "generate answers to held-out prompts, exact-match score"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items())
    return (f"usage: megasft SUBCOMMAND [options]   (megasft SUBCOMMAND --help for its options)\n\n"
            f"subcommands:\n{rows}\n\n{__doc__.split(chr(10) + chr(10))[1]}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"megasft: unknown subcommand {name!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        print(f"megasft: '{name}' is not available in this installation ({module_name} is missing)",
              file=sys.stderr)
        return 2
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
