"""Conversations with system prompts, tools, tool calls, tool replies and reasoning, per model family,
in the record schema (megasft.data.chat.schema); and a BPE tokenizer holding every family's special
tokens. Built locally, nothing downloaded."""
from __future__ import annotations

import functools
import itertools
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from megasft.data.chat.schema import normalize_record
from tests.data_fixtures import train_bpe_tokenizer

TEMPLATES_ENV = "MEGASFT_CHAT_TEMPLATES"


def chat_templates_dir() -> Optional[Path]:
    """../shared/chat_templates from the repository root, or $MEGASFT_CHAT_TEMPLATES."""
    path = Path(os.environ.get(TEMPLATES_ENV) or Path(__file__).resolve().parents[2] / "shared" / "chat_templates")
    return path if path.is_dir() else None


SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
    "<|python_tag|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<tool_call>",
    "</tool_call>", "<tool_response>", "</tool_response>", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
    "<｜User｜>", "<｜Assistant｜>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>", "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>",
    "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<s>",
    "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|pad|>"]

# bos / eos per family, as their tokenizer_config.json set them.
TOKENS = {
    "llama3": ("<|begin_of_text|>", "<|eot_id|>"), "llama3_1": ("<|begin_of_text|>", "<|eot_id|>"),
    "qwen2_5": (None, "<|im_end|>"), "qwen3": (None, "<|im_end|>"),
    "deepseekv3": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"), "gemma": ("<bos>", "<eos>"),
    "mistral": ("<s>", "</s>"), "phi3": ("<s>", "<|endoftext|>"),
}

WORDS = ["hello", "world", "the", "answer", "is", "42", "café", "naïve", "x=1;", " spaced ", "\nnewline", "ünïcode",
         "😀", "end.", "weather", "Paris", "sunny"]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def _text(rng: random.Random, lo: int = 1, hi: int = 8) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))


def _call(rng: random.Random, k: int, json_string: bool) -> dict:
    args = {"city": rng.choice(["Paris", "Oslo", "Lima"]), "days": rng.randint(1, 5)}
    return {"id": f"call{k:05d}", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps(args) if json_string else args}}


def family_records(family: str, n: int = 6, seed: int = 0) -> list[dict]:
    """Records in the schema exercising what ``family``'s template supports (see the shared README)."""
    rng = random.Random(seed)
    system = family != "gemma"
    tools = family in ("llama3_1", "qwen2_5", "qwen3", "mistral", "deepseekv3")
    tools_list = tools and family != "deepseekv3"  # DeepSeek-V3's template renders calls but no tool list
    reasoning = family in ("qwen3", "deepseekv3")
    alternate = family in ("gemma", "mistral")
    out = []
    for c in range(n):
        msgs = [{"role": "system", "content": _text(rng)}] if system and c % 2 == 0 else []
        for t in range(rng.randint(2, 3)):
            msgs.append({"role": "user", "content": _text(rng)})
            # Mistral: tool calls are a known limit (test_mistral_tool_calls_are_refused_with_the_reason)
            if tools and family != "mistral" and rng.random() < 0.6:
                calls = [_call(rng, 10 * t + k, json_string=k % 2 == 1) for k in range(1 if family == "llama3_1" else
                                                                                      rng.randint(1, 2))]
                # content null or "" (transformers itself fails on null with DeepSeek-V3's templates)
                null = family != "deepseekv3" and rng.random() < 0.5
                call = {"role": "assistant", "content": None if null else "", "tool_calls": calls}
                if family in ("qwen2_5", "qwen3") and rng.random() < 0.5:
                    call["content"] = _text(rng)
                msgs.append(call)
                for k, tc in enumerate(calls):
                    msgs.append({"role": "ipython" if family == "llama3_1" and c % 2 else "tool", "content": _text(rng),
                                 "tool_call_id": tc["id"]})
            answer = {"role": "assistant", "content": _text(rng, 0 if not alternate else 1)}
            if reasoning and rng.random() < 0.7:
                if family == "deepseekv3":  # R1-style: reasoning inline, which the template cuts from the content
                    answer["content"] = f"<think>{_text(rng)}</think>{answer['content']}"
                else:
                    answer["reasoning_content"] = _text(rng)
            msgs.append(answer)
        record = {"messages": msgs}
        if tools_list:
            record["tools"] = [WEATHER_TOOL]
        out.append(record)
    return out


LOOKUP_TOOLS = [{"type": "function", "function": {
    "name": name, "description": f"Look up the {name.split('_')[1]}.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
                   "required": ["query"]}}} for name in ("get_weather", "get_stock", "search_docs")]


def make_words(rng: random.Random, n: int = 3000) -> list[str]:
    """Pseudo-words of 1-9 letters, frequent letters likelier."""
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    return ["".join(rng.choices(letters, weights=range(26, 0, -1), k=rng.randint(1, 9))) for _ in range(n)]


def tool_reasoning_records(n: int, seed: int = 0) -> list[dict]:
    """The tool-calling + reasoning set of benchmarks/preprocess.py (and of the Qwen renderer's tests): a
    3-function tools list; 1-3 questions, each answered after 0-2 tool calls (content null, reasoning on the
    call turn, a tool reply) by a final answer with reasoning; sentences of Zipf-distributed pseudo-words."""
    rng = random.Random(seed)
    words = make_words(rng)
    cum = list(itertools.accumulate(1 / (k + 1) for k in range(len(words))))   # Zipf-like word frequencies

    def sentence(k: int) -> str:
        return " ".join(rng.choices(words, cum_weights=cum, k=k)).capitalize() + "."

    out = []
    for _ in range(n):
        msgs = [{"role": "system", "content": sentence(12)}]
        for q in range(rng.randint(1, 3)):
            msgs.append({"role": "user", "content": sentence(rng.randint(6, 20))})
            for c in range(rng.randint(0, 2)):
                call_id = f"call_{q}_{c}"
                msgs.append({"role": "assistant", "content": None, "reasoning_content": sentence(rng.randint(8, 30)),
                             "tool_calls": [{"id": call_id, "type": "function", "function": {
                                 "name": rng.choice(LOOKUP_TOOLS)["function"]["name"],
                                 "arguments": {"query": sentence(4), "limit": rng.randint(1, 9)}}}]})
                msgs.append({"role": "tool", "tool_call_id": call_id, "content": sentence(rng.randint(10, 40))})
            msgs.append({"role": "assistant", "reasoning_content": sentence(rng.randint(10, 40)),
                         "content": " ".join(sentence(rng.randint(4, 20)) for _ in range(rng.randint(1, 4)))})
        out.append({"tools": LOOKUP_TOOLS, "messages": msgs})
    return out


# What a value may start or end with that a template's own text also has: whitespace, end markers, tags,
# JSON's escaped characters, the next turn's opening.
AFFIXES = ["\n", " ", "\n\n", "\t", "<think>", "</think>", "<tool_call>", '"', "\\", "{", "}", "é", "[INST]",
           "<|im_end|>", "<|eot_id|>", "<|end|>", "</s>", "<end_of_turn>\n", "<|im_end|>\n<|im_start|>user\n", "x"]


def with_tricky_values(records: list[dict], seed: int = 0, p: float = 0.3) -> list[dict]:
    """Copies of ``records`` whose strings (not roles, types, ids or JSON-string arguments) each get, with
    probability ``p``, an affix at either end from AFFIXES: text a template trims, splits or confuses with its own."""
    rng = random.Random(seed)

    def tricky(obj, key=None):
        if isinstance(obj, str):
            if obj and key not in ("role", "type", "id", "tool_call_id", "arguments") and rng.random() < p:
                return rng.choice(["", *AFFIXES]) + obj + rng.choice(["", *AFFIXES])
            return obj
        if isinstance(obj, dict):
            return {k: tricky(v, k) for k, v in obj.items()}
        if isinstance(obj, list):
            return [tricky(v, key) for v in obj]
        return obj

    return [tricky(r) for r in records]


def conversations_for(family: str, n: int = 6, seed: int = 0):
    return [normalize_record(r) for r in family_records(family, n, seed)]


@functools.lru_cache(maxsize=None)
def _tokenizer_json() -> Path:
    corpus = [m["content"] or "" for f in TOKENS for r in family_records(f, 20, seed=1) for m in r["messages"]]
    corpus += [json.dumps(WEATHER_TOOL, indent=4), '{"name": "get_weather", "arguments": {"city": "Paris"}}']
    return train_bpe_tokenizer(corpus, SPECIALS, 800, tempfile.mkdtemp(prefix="megasft_chat_tok_")) / "tokenizer.json"


@functools.lru_cache(maxsize=None)
def family_tokenizer_dir(family: str) -> Path:
    """The shared tokenizer.json with ``family``'s bos/eos in its tokenizer_config.json."""
    out = Path(tempfile.mkdtemp(prefix=f"megasft_chat_{family}_"))
    shutil.copy(_tokenizer_json(), out / "tokenizer.json")
    bos, eos = TOKENS[family]
    config = {"eos_token": eos, "pad_token": "<|pad|>", **({"bos_token": bos} if bos else {})}
    (out / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return out


def hf_tokenizer(family: str):
    """transformers' tokenizer over the same files: the reference the tests compare against."""
    from transformers import PreTrainedTokenizerFast

    bos, eos = TOKENS[family]
    return PreTrainedTokenizerFast(tokenizer_file=str(_tokenizer_json()), eos_token=eos, bos_token=bos)
