"""Greedy chat generation with a single-process megasft model loaded from a HF directory.

    python -m megasft.generate --model runs/tiny/hf --tokenizer T.model --template llama3 \\
        --prompts examples/tiny_chat/data/eval.jsonl -n 20

For each conversation the final assistant turn is held out: the prompt is everything before it
rendered with the generation header; the model decodes greedily until the end-of-turn token.
Prints each prompt's last user message, the model's answer and the reference, then the accuracy.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from megasft.config import ModelConfig
from megasft.data.batch import MicroBatch
from megasft.hf.config import model_fields_from_hf, read_hf_config
from megasft.hf.io import load_hf_into
from megasft.model.llama import LlamaStage
from megasft.parallel_state import ParallelState


def load_single_process_model(path: str | Path) -> LlamaStage:
    cfg = ModelConfig(**model_fields_from_hf(read_hf_config(path)), make_vocab_size_divisible_by=1)
    model = LlamaStage(cfg, ParallelState.single(), list(range(cfg.num_layers)), True, True)
    load_hf_into(model, path)
    return model.eval()


@torch.no_grad()
def greedy(model: LlamaStage, prompt: list[int], stop_ids: set[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding; recomputes the prefix each token (no KV cache: tiny models, short answers)."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        n = len(ids)
        batch = MicroBatch(input_ids=torch.tensor([ids]), position_ids=torch.arange(n).unsqueeze(0),
                           cu_seqlens=torch.tensor([0, n], dtype=torch.int32), max_seqlen=n)
        logits = model(batch)[-1, 0, :model.cfg.vocab_size]                # [V] at the last position
        token = int(logits.argmax())
        ids.append(token)
        if token in stop_ids:
            break
    return ids[len(prompt):]


def main(argv=None) -> None:
    from megasft.data.templates import ChatEncoder, get_template
    from megasft.data.tokenizer import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model directory (written by training or the exporter)")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--template", default="llama3")
    ap.add_argument("--prompts", required=True, help="messages-format JSONL; the last assistant turn is the reference")
    ap.add_argument("-n", type=int, default=20, help="conversations to answer")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args(argv)

    template = get_template(args.template)
    tok = load_tokenizer(args.tokenizer, template)
    encoder = ChatEncoder(tok, template)
    model = load_single_process_model(args.model)
    stop = {tok.eot_id, tok.eos_id}
    correct = stopped = 0
    with open(args.prompts, encoding="utf-8") as f:
        convs = [json.loads(line)["messages"] for line in f if line.strip()][:args.n]
    for messages in convs:
        reference = messages[-1]["content"]
        prompt = encoder.encode_prompt(messages[:-1])   # tokenised exactly like the training data
        out = greedy(model, prompt, stop, args.max_new_tokens)
        ended = bool(out) and out[-1] in stop
        answer = tok.decode(out[:-1] if ended else out).strip()
        correct += answer == reference.strip()
        stopped += ended
        print(f"Q: {messages[-2]['content']!r:40} A: {answer!r:12} ref: {reference!r:8} "
              f"{'ok' if answer == reference.strip() else 'WRONG'}{'' if ended else ' (no end-of-turn)'}")
    print(f"accuracy {correct}/{len(convs)} = {correct / max(1, len(convs)):.1%}; "
          f"stopped at end-of-turn {stopped}/{len(convs)}")


if __name__ == "__main__":
    main()
