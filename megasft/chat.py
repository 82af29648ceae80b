"""Chat with a trained model: an interactive conversation, or answers to a batch of prompts.

    python -m megasft.chat --model runs/tiny_chat/hf                      # interactive
    python -m megasft.chat --model runs/tiny_chat --prompt "What is 7 plus 5?" --temperature 0
    python -m megasft.chat --model runs/tiny_chat/hf --prompts questions.txt --system "Be brief."

``--model``: a Hugging Face export directory, a run directory (its ``latest`` checkpoint), a
checkpoint root or a checkpoint directory. The prompt is the conversation rendered with the chat
template the model was trained with, ending in the template's generation header (the assistant's
turn), encoded exactly like the training data; decoding uses a KV cache and stops at the
end-of-turn or eos token. Sampling defaults are those of the export's generation_config.json
(temperature 0.6, top-p 0.9); ``--temperature 0`` is greedy.

Interactive: each line is a user turn of one running conversation; ``/reset`` starts a new one,
``/exit`` (or end of input) quits. ``--prompts FILE``: one prompt per line, either plain text or a
JSON conversation (``messages`` / ShareGPT / Alpaca; a final assistant turn is dropped); each is
answered in a fresh conversation. Runs on one process, CPU or GPU (``--device cuda``).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from megasft.generate import (ChatModel, Sampling, add_model_args, answer_text, decode, load_chat_model,
                              split_reference)

DEFAULT_TEMPERATURE, DEFAULT_TOP_P = 0.6, 0.9   # as the export's generation_config.json
CUT_SHORT = "[stopped before end-of-turn: --max-new-tokens or the context length]"


def with_system(messages: list[dict], system: Optional[str]) -> list[dict]:
    """`messages` with the system prompt first, unless it already has one."""
    if system and not (messages and messages[0].get("role") == "system"):
        return [{"role": "system", "content": system}, *messages]
    return messages


def reply(chat: ChatModel, messages: Sequence[dict], sampling: Sampling, use_cache: bool = True,
          stream=None) -> tuple[str, bool]:
    """(the assistant's answer to `messages`, whether it ended at an end-of-turn token); `stream`
    (a text file) receives the answer as it is generated."""
    printed = [""]

    def show(tokens: list[int]) -> None:
        text = chat.tokenizer.decode([t for t in tokens if t not in chat.stop_ids])
        if text.startswith(printed[0]):   # a partial multi-byte piece may change; print only settled text
            stream.write(text[len(printed[0]):])
            stream.flush()
            printed[0] = text

    decoded = decode(chat.model, chat.prompt_ids(messages), chat.stop_ids, sampling, use_cache=use_cache,
                     on_token=show if stream is not None else None)
    return answer_text(chat, decoded), decoded.ended


def read_prompts(path: str) -> list[list[dict]]:
    """One conversation per non-empty line: plain text is a user turn, a JSON object a record."""
    from megasft.data.chat.schema import normalize_record
    from megasft.data.formats import DataError, parse_line

    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text:
                continue
            if not text.startswith("{"):
                out.append([{"role": "user", "content": text}])
                continue
            try:
                obj = json.loads(text)
                conversation = normalize_record(obj) if "messages" in obj else parse_line(text.encode(), path, lineno)
            except DataError:           # names file:line itself
                raise
            except ValueError as err:   # bad JSON, a SchemaError
                raise ValueError(f"{path}:{lineno}: {err}") from None
            out.append(split_reference(conversation)[0])
    return out


def interactive(chat: ChatModel, system: Optional[str], sampling: Sampling, use_cache: bool) -> None:
    print("megasft chat: type a message; /reset starts a new conversation, /exit quits.", file=sys.stderr)
    messages: list[dict] = with_system([], system)
    while True:
        try:
            line = input("user> ")
        except EOFError:
            print()
            return
        if line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            messages = with_system([], system)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        sys.stdout.write("assistant> ")
        answer, ended = reply(chat, messages, sampling, use_cache, stream=sys.stdout)
        sys.stdout.write("\n" if ended else f" {CUT_SHORT}\n")
        messages.append({"role": "assistant", "content": answer})


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="megasft chat", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--prompt", action="append", default=[],
                    help="answer this prompt and exit (repeatable; each in a fresh conversation)")
    ap.add_argument("--prompts", default=None, help="file of prompts, one per line (text or a JSON conversation)")
    ap.add_argument("--system", default=None, help="system prompt put before every conversation (default: none)")
    ap.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                    help="sampling temperature; 0 is greedy (default: %(default)s)")
    ap.add_argument("--top-p", type=float, default=DEFAULT_TOP_P,
                    help="nucleus sampling: keep the most likely tokens up to this probability (default: %(default)s)")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="tokens per answer at most (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    ap.add_argument("--no-cache", action="store_true",
                    help="recompute the whole sequence for every token instead of using the KV cache (a check)")
    args = ap.parse_args(argv)
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1:
        ap.error(f"need --temperature >= 0 (got {args.temperature}), 0 < --top-p <= 1 (got {args.top_p}) and "
                 f"--max-new-tokens >= 1 (got {args.max_new_tokens})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    batch = [[{"role": "user", "content": p}] for p in args.prompt]
    try:
        if args.prompts:
            batch += read_prompts(args.prompts)
        chat = load_chat_model(args.model, args.tokenizer, args.template, args.device, args.dtype)
    except (OSError, ValueError) as err:   # a path that is no model, a bad prompt line: one line
        print(f"megasft chat: {err}", file=sys.stderr)
        return 2
    sampling = Sampling(args.temperature, args.top_p, args.max_new_tokens, args.seed)
    if not batch:
        try:
            interactive(chat, args.system, sampling, not args.no_cache)
        except KeyboardInterrupt:   # Ctrl-C quits, also in the middle of an answer
            print()
        return 0
    for messages in batch:
        messages = with_system(list(messages), args.system)
        answer, ended = reply(chat, messages, sampling, not args.no_cache)
        print(f"user: {messages[-1]['content']}")
        print(f"assistant: {answer}" + ("" if ended else f"  {CUT_SHORT}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
