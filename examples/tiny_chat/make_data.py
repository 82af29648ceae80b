"""The bundled tiny chat task: a calculator assistant, and the tokenizer trained on it.

Each conversation is a system prompt followed by 1-3 user questions about small numbers
("What is 7 plus 5?", "What is 9 minus 4?", "What comes after 41?"), each answered by the assistant
with the number only. Answers are short and deterministic, so a tiny Llama (hidden 128, 4 layers)
trained for a few minutes on CPU answers far above chance (~1/20 for a random number).

The script writes, deterministically for a given --seed:
  OUT/train.jsonl, OUT/eval.jsonl   messages-format conversations (eval uses a disjoint seed)
  OUT/tokenizer.model               a sentencepiece BPE (vocab --vocab-size, digits split) trained on the
                                    rendered corpus, with the llama3 template's special tokens as
                                    user-defined symbols (each one id): <|begin_of_text|>,
                                    <|end_of_text|>, <|start_header_id|>, <|end_header_id|>, <|eot_id|>, <|pad|>

Generate and preprocess (a few seconds in all)::

    python examples/tiny_chat/make_data.py --out examples/tiny_chat/data
    python tools/preprocess_data.py --input examples/tiny_chat/data/train.jsonl \\
        --output examples/tiny_chat/data/train --tokenizer examples/tiny_chat/data/tokenizer.model \\
        --template llama3 --seq-len 256
    python tools/preprocess_data.py --input examples/tiny_chat/data/eval.jsonl \\
        --output examples/tiny_chat/data/eval --tokenizer examples/tiny_chat/data/tokenizer.model \\
        --template llama3 --seq-len 256
    python tools/inspect_data.py --data examples/tiny_chat/data/train \\
        --tokenizer examples/tiny_chat/data/tokenizer.model -n 2

Then data.train_path=examples/tiny_chat/data/train, data.eval_path=examples/tiny_chat/data/eval,
data.tokenizer=examples/tiny_chat/data/tokenizer.model, data.template=llama3.
"""
from __future__ import annotations

import argparse
import io
import json
import random
from pathlib import Path

import sentencepiece as spm

from megasft.data.templates import Llama3Template

SYSTEM_PROMPT = "You are a calculator. Reply with the number only."
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>", "<|pad|>"]
DEFAULT_OUT = Path(__file__).resolve().parent / "data"


def make_question(rng: random.Random) -> tuple[str, str]:
    """One (question, answer) pair; three skills with a few phrasings each."""
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randrange(10), rng.randrange(10)
        q = rng.choice(["What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}."]).format(a=a, b=b)
        return q, str(a + b)
    if kind == 1:
        a = rng.randrange(10)
        b = rng.randrange(a + 1)
        q = rng.choice(["What is {a} minus {b}?", "Subtract {b} from {a}.", "Compute {a} - {b}."]).format(a=a, b=b)
        return q, str(a - b)
    n = rng.randrange(99)
    return rng.choice(["What comes after {n}?", "What is the next number after {n}?"]).format(n=n), str(n + 1)


def make_conversation(rng: random.Random) -> dict:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for _ in range(rng.randint(1, 3)):
        question, answer = make_question(rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def train_tokenizer(conversations: list[dict], out_prefix: Path, vocab_size: int) -> Path:
    """Sentencepiece BPE on the llama3-rendered corpus; identity normalisation so text round-trips
    (newlines of the role headers included) and no dummy prefix (segments are encoded separately)."""
    template = Llama3Template()
    corpus = [template.render_text(c["messages"]) for c in conversations]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        user_defined_symbols=SPECIAL_TOKENS, split_digits=True, byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        bos_id=-1, eos_id=-1, unk_id=0, hard_vocab_limit=False, num_threads=2, minloglevel=2,
        max_sentence_length=1 << 16)
    path = out_prefix.with_suffix(".model")
    path.write_bytes(model.getvalue())
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    parser.add_argument("--train", type=int, default=4000, help="training conversations")
    parser.add_argument("--eval", type=int, default=200, help="evaluation conversations")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train_rng, eval_rng = random.Random(args.seed), random.Random(args.seed + 1)
    train = [make_conversation(train_rng) for _ in range(args.train)]
    evals = [make_conversation(eval_rng) for _ in range(args.eval)]
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "eval.jsonl", evals)
    model = train_tokenizer(train, args.out / "tokenizer", args.vocab_size)
    print(f"wrote {args.out / 'train.jsonl'} ({len(train)}), {args.out / 'eval.jsonl'} ({len(evals)}), {model}")


if __name__ == "__main__":
    main()
