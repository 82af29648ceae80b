"""Tokenizers and conversations shared by the data tests, all built locally (nothing downloaded).

Importable helpers (not pytest fixtures, so any test module can call them); built once per session.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import random
import tempfile
from pathlib import Path
from typing import Iterable, Optional, Sequence


REPO = Path(__file__).resolve().parents[1]

# The chat templates as shipped in the HF tokenizer_config.json of Meta-Llama-3-8B-Instruct and of
# ChatML models (e.g. OpenHermes / Qwen without tools), written out here so nothing is downloaded.
LLAMA3_JINJA = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHATML_JINJA = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<|im_start|>", "<|im_end|>", "<|pad|>"]


def conversations(n: int = 40, seed: int = 0, max_turns: int = 4) -> list[list[dict]]:
    """Varied multi-turn chats: system/tool turns, leading/trailing whitespace, unicode, empty content."""
    rng = random.Random(seed)
    words = ["hello", "world", "the", "answer", "is", "42", "café", "naïve", "x=1;", "  spaced  ", "\nnewline",
             "tabs\t", "ünïcode", "😀", "<b>", "end."]
    out = []
    for _ in range(n):
        msgs = [{"role": "system", "content": " ".join(rng.choices(words, k=5))}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, max_turns)):
            msgs.append({"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(1, 8)))})
            msgs.append({"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(0, 8)))})
            if rng.random() < 0.2:
                msgs.append({"role": "tool", "content": "result " + rng.choice(words)})
                msgs.append({"role": "assistant", "content": rng.choice(words)})
        out.append(msgs)
    return out


@functools.lru_cache(maxsize=None)
def hf_tokenizer_dir() -> Path:
    """A byte-level BPE tokenizer.json (Llama-3 split regex) with llama3 + chatml specials, and a
    tokenizer_config.json carrying the Llama-3 chat template."""
    corpus = [m["content"] for c in conversations(200, seed=1) for m in c]
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|pad|>",
              "chat_template": LLAMA3_JINJA}
    return train_bpe_tokenizer(corpus, SPECIALS, 600, tempfile.mkdtemp(prefix="megasft_hf_tok_"), config)


def write_tokenizer_config(directory: Path, chat_template: str, **tokens: str) -> Path:
    path = Path(directory) / "tokenizer_config.json"
    path.write_text(json.dumps({"chat_template": chat_template, **tokens}))
    return path


def load_example_module():
    spec = importlib.util.spec_from_file_location("tiny_chat_make_data", REPO / "examples/tiny_chat/make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=None)
def sp_model_path() -> Path:
    """The tiny example's sentencepiece tokenizer, trained on a few hundred of its conversations."""
    example = load_example_module()
    rng = random.Random(0)
    convs = [example.make_conversation(rng) for _ in range(300)]
    d = Path(tempfile.mkdtemp(prefix="megasft_sp_tok_"))
    return example.train_tokenizer(convs, d / "tokenizer", 400)


def write_jsonl(path: Path, lines: list) -> Path:
    """Each item is a dict (dumped as JSON), a str (written verbatim) or bytes (written raw)."""
    with open(path, "wb") as f:
        for item in lines:
            if isinstance(item, dict):
                item = json.dumps(item)
            f.write((item.encode("utf-8") if isinstance(item, str) else item) + b"\n")
    return path


# Llama-3's pre-tokenizer split pattern (tiktoken cl100k-style): used by train_bpe_tokenizer.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def train_bpe_tokenizer(corpus: Iterable[str], special_tokens: Sequence[str], vocab_size: int, out_dir: str | Path,
                        tokenizer_config: Optional[dict] = None) -> Path:
    """Train a byte-level BPE ``tokenizer.json`` with Llama-3's pre-tokenizer on ``corpus`` (for tests,
    benchmarks and toy tasks: a real tokenizer made locally). ``special_tokens`` become single ids;
    ``tokenizer_config`` (bos_token, eos_token, chat_template, ...) is written next to it. Returns the dir."""
    from tokenizers import Regex
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    if tokenizer_config is not None:
        (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")
    return out
