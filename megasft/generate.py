"""Generation with a trained model in one process: loading, KV-cache decoding, and ``eval-generate``
scoring (exact match against reference answers).

    python -m megasft.generate --model runs/tiny_chat/hf --prompts examples/tiny_chat/data/eval.jsonl -n 20

``--model`` is a Hugging Face export directory, a run directory (its ``latest`` checkpoint), a
checkpoint root or one checkpoint directory. The tokenizer and chat template default to the
model's own: an export's tokenizer.json / tokenizer_config.json chat template, or for a checkpoint
the tokenizer and template its training data was preprocessed with (megasft.hf.tokenizer_export).

Each record is a conversation (``messages``, ShareGPT or Alpaca, as training reads them). When it
ends with an assistant turn, that turn is the reference and the prompt is everything before it;
otherwise the whole conversation is the prompt and the answer is only printed. The prompt is
rendered with the template's generation header and encoded exactly like the training data.
Prints each prompt's last user message, the answer and the reference, then exact-match accuracy
over the records with a reference and the share of answers that ended with an end-of-turn token.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from megasft.config import Config, ModelConfig
from megasft.data.batch import MicroBatch
from megasft.hf.config import model_fields_from_hf, read_hf_config
from megasft.hf.io import load_hf_into
from megasft.model.kv_cache import KVCache
from megasft.model.llama import LlamaStage
from megasft.parallel_state import ParallelState

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- loading
def single_process_model(cfg: ModelConfig, device: str | torch.device = "cpu") -> LlamaStage:
    """An empty tp=pp=1 model of `cfg` (sdpa attention: the KV-cache path needs no varlen kernel)."""
    from dataclasses import replace

    cfg = replace(cfg, make_vocab_size_divisible_by=1, attention_backend="sdpa", recompute="none",
                  loss_chunk_tokens=0, dropout=0.0, neftune_alpha=0.0)
    # Parameters are allocated uninitialised (torch.empty; megasft.model.build draws the init), so
    # building straight on the device costs no init; every weight is loaded next.
    with torch.device(device):
        model = LlamaStage(cfg, ParallelState.single(device), list(range(cfg.num_layers)), True, True)
    return model.eval()


def load_single_process_model(path: str | Path, device: str | torch.device = "cpu") -> LlamaStage:
    """The model of a HF directory, in fp32."""
    cfg = ModelConfig(**model_fields_from_hf(read_hf_config(path)), make_vocab_size_divisible_by=1)
    model = single_process_model(cfg, device)
    load_hf_into(model, path)
    return model


def load_checkpoint_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[LlamaStage, Config]:
    """The model of a megasft checkpoint (a checkpoint directory or a root with ``latest``), fp32,
    and the run's config."""
    from megasft.checkpoint.convert import stream_model_tensors
    from megasft.checkpoint.files import read_meta, resolve_checkpoint
    from megasft.hf.names import load_hf_state_dict

    step = resolve_checkpoint(path)
    cfg = Config.from_dict(read_meta(step)["config"])
    model = single_process_model(cfg.model, device)
    load_hf_state_dict(model, dict(stream_model_tensors(step, torch.float32)))
    return model, cfg


@dataclass
class ChatModel:
    """A model with the tokenizer, template and stop ids it was trained with."""

    model: LlamaStage
    tokenizer: object
    encoder: object            # megasft.data.templates.ChatEncoder
    stop_ids: frozenset

    def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
        """The conversation rendered with the generation header, encoded like the training data."""
        return self.encoder.encode_prompt(messages)


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("model*.safetensors*"))


def load_chat_model(path: str | Path, tokenizer: Optional[str] = None, template: Optional[str] = None,
                    device: str = "cpu", dtype: str = "auto") -> ChatModel:
    """A ChatModel from an HF export, a run directory, a checkpoint root or a checkpoint
    (see the module docstring); `tokenizer` / `template` override the model's own."""
    from megasft.data.templates import ChatEncoder, get_template
    from megasft.data.tokenizer import load_tokenizer
    from megasft.hf.tokenizer_export import trained_chat_format

    path = Path(path)
    if is_hf_dir(path):
        model = load_single_process_model(path, device)
        tokenizer, template = tokenizer or str(path), template or "jinja"
    else:
        run_config = path / "config.yaml"
        root = Config.load(str(run_config)).checkpoint.root(str(path)) if run_config.is_file() and not \
            (path / ".metadata").exists() else path
        from megasft.checkpoint.errors import CheckpointError

        try:
            model, cfg = load_checkpoint_model(root, device)
        except CheckpointError as err:
            raise ValueError(f"{err}; --model takes an HF export (config.json + model*.safetensors), a run "
                             "directory, a checkpoint root (with latest) or a checkpoint directory") from None
        run_tokenizer, run_template = trained_chat_format(cfg)
        tokenizer, template = tokenizer or run_tokenizer, template or run_template
        if tokenizer is None:
            raise ValueError(f"{path}: the run names no tokenizer (data.tokenizer); pass --tokenizer")
    if dtype == "auto":
        dtype = "bf16" if torch.device(device).type == "cuda" else "fp32"
    model.to(DTYPES[dtype])
    tok = load_tokenizer(tokenizer, template)
    encoder = ChatEncoder(tok, get_template(template, tokenizer_config=tok.config))
    return ChatModel(model, tok, encoder, frozenset({tok.eot_id, tok.eos_id}))


# ----------------------------------------------------------------------------- decoding
@dataclass(frozen=True)
class Sampling:
    """temperature 0: greedy (argmax); otherwise softmax(logits / temperature) restricted to the
    smallest set of tokens whose probability reaches top_p (nucleus sampling)."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0


def pick_token(logits: torch.Tensor, sampling: Sampling, generator: Optional[torch.Generator]) -> int:
    """The next token from fp32 logits [V]."""
    if sampling.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    # Keep a token while the probability before it is below top_p: the first one is always kept.
    keep = (sorted_probs.cumsum(0) - sorted_probs) < sampling.top_p
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs.cpu(), 1, generator=generator)
    return int(order[choice.to(order.device)])


@dataclass
class Decoded:
    tokens: list[int]                      # the new tokens, the stop token included when reached
    ended: bool                            # stopped at an end-of-turn / eos token
    logits: list[torch.Tensor] = field(default_factory=list)   # [V] per new token, when asked for


@torch.no_grad()
def decode(model: LlamaStage, prompt: Sequence[int], stop_ids, sampling: Sampling = Sampling(),
           use_cache: bool = True, keep_logits: bool = False, on_token=None) -> Decoded:
    """Generate after `prompt` until a stop id, max_new_tokens or the model's context length.
    With the KV cache each step feeds only the newest token; without it, the whole sequence.
    `on_token(tokens so far)` is called after each new token (streaming output)."""
    device = next(model.parameters()).device
    vocab, limit = model.cfg.vocab_size, model.cfg.max_position_embeddings
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.temperature > 0 else None
    cache = KVCache() if use_cache else None
    ids, out = list(prompt), Decoded([], False)
    while len(out.tokens) < sampling.max_new_tokens and len(ids) < limit:
        past = cache.length if cache is not None else 0
        feed = torch.tensor([ids[past:]], device=device)                    # [1, n]
        n = feed.shape[1]
        batch = MicroBatch(input_ids=feed, position_ids=torch.arange(past, past + n, device=device)[None],
                           cu_seqlens=torch.tensor([0, n], dtype=torch.int32, device=device), max_seqlen=n)
        logits = model(batch, cache=cache)[-1, 0, :vocab].float()           # [V] at the last position
        if keep_logits:
            out.logits.append(logits.cpu())
        token = pick_token(logits, sampling, generator)
        ids.append(token)
        out.tokens.append(token)
        if on_token is not None:
            on_token(out.tokens)
        if token in stop_ids:
            out.ended = True
            break
    return out


def answer_text(chat: ChatModel, decoded: Decoded) -> str:
    return chat.tokenizer.decode(decoded.tokens[:-1] if decoded.ended else decoded.tokens).strip()


# ----------------------------------------------------------------------------- eval-generate
def split_reference(messages: Sequence[dict]) -> tuple[list[dict], Optional[str]]:
    """(prompt messages, reference answer): a final assistant turn is the reference, else None.
    The record's ``tools`` (a Conversation's) stay with the prompt."""
    from megasft.data.chat.schema import Conversation

    tools = getattr(messages, "tools", None)
    reference = None
    if messages and messages[-1].get("role") == "assistant":
        messages, reference = messages[:-1], messages[-1].get("content")
    return Conversation(list(messages), tools), reference


def read_conversations(path: str | Path, limit: Optional[int] = None) -> list[list[dict]]:
    """The conversations of a JSONL file: ``messages`` records (the training schema, a final
    assistant turn optional), ShareGPT or Alpaca; a bad line is an error naming file:line."""
    from megasft.data.chat.schema import SchemaError, normalize_record
    from megasft.data.formats import parse_line, read_lines

    out = []
    for line, raw, _ in read_lines(str(path)):
        if limit is not None and len(out) >= limit:
            break
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError as err:
            raise ValueError(f"{path}:{line}: malformed json: {err}") from None
        if isinstance(obj, dict) and "messages" in obj:   # prompt-only records are fine here
            try:
                out.append(normalize_record(obj))
            except SchemaError as err:
                raise ValueError(f"{path}:{line}: {err.reason}: {err.detail}") from None
        else:
            out.append(parse_line(raw, str(path), line))
    return out


@dataclass
class Score:
    answered: int = 0       # conversations generated for
    with_reference: int = 0
    exact: int = 0          # answers equal to their reference (stripped)
    ended: int = 0          # answers that stopped at an end-of-turn / eos token
    lines: list[str] = field(default_factory=list)

    @property
    def exact_match(self) -> float:
        return self.exact / max(1, self.with_reference)

    @property
    def eot_rate(self) -> float:
        return self.ended / max(1, self.answered)

    def summary(self) -> str:
        return (f"exact match {self.exact}/{self.with_reference} = {self.exact_match:.1%}; "
                f"stopped at end-of-turn {self.ended}/{self.answered} = {self.eot_rate:.1%}")


def score(chat: ChatModel, conversations: Sequence[Sequence[dict]], sampling: Sampling = Sampling()) -> Score:
    """Generate for every conversation (see split_reference) and count exact matches and stops."""
    result = Score()
    for messages in conversations:
        prompt, reference = split_reference(messages)
        decoded = decode(chat.model, chat.prompt_ids(prompt), chat.stop_ids, sampling)
        answer = answer_text(chat, decoded)
        result.answered += 1
        result.ended += decoded.ended
        question = next((m.get("content") for m in reversed(prompt) if m.get("role") == "user"), "")
        tail = "" if decoded.ended else " (no end-of-turn)"
        if reference is None:
            result.lines.append(f"Q: {question!r:40} A: {answer!r}{tail}")
            continue
        ok = answer == str(reference).strip()
        result.with_reference += 1
        result.exact += ok
        result.lines.append(f"Q: {question!r:40} A: {answer!r:12} ref: {reference!r:8} {'ok' if ok else 'WRONG'}{tail}")
    return result


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """--model, --tokenizer, --template, --device, --dtype (shared with megasft.chat)."""
    ap.add_argument("--model", required=True,
                    help="HF export directory, run directory, checkpoint root or checkpoint directory")
    ap.add_argument("--tokenizer", default=None, help="tokenizer override (default: the model's own)")
    ap.add_argument("--template", default=None,
                    help="chat template override: llama3 | chatml | jinja | a path (default: the model's own)")
    ap.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    ap.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                    help="compute dtype (default auto: fp32 on CPU, bf16 on CUDA)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="megasft eval-generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--prompts", required=True, help="JSONL conversations; a final assistant turn is the reference")
    ap.add_argument("-n", type=int, default=20, help="conversations to answer (default: 20)")
    ap.add_argument("--max-new-tokens", type=int, default=16, help="tokens per answer at most (default: 16)")
    args = ap.parse_args(argv)
    try:
        chat = load_chat_model(args.model, args.tokenizer, args.template, args.device, args.dtype)
        conversations = read_conversations(args.prompts, args.n)
    except (OSError, ValueError) as err:
        print(f"megasft eval-generate: {err}", file=sys.stderr)
        return 2
    result = score(chat, conversations, Sampling(max_new_tokens=args.max_new_tokens))
    print("\n".join(result.lines))
    print(result.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
