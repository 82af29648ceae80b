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

from megasft.data.tokenizer import train_bpe_tokenizer

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


def test_fixture_tokenizers_round_trip():
    from megasft.data.tokenizer import load_tokenizer

    hf = load_tokenizer(hf_tokenizer_dir(), "llama3")
    sp = load_tokenizer(sp_model_path(), "llama3")
    for tok in (hf, sp):
        text = "<|begin_of_text|>What is 3 plus 4?<|eot_id|>"
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eot_id
        assert tok.decode(ids) == text
