"""Generation-based evaluation inside training (``train.generate_eval_interval``).

Every interval (and at the last step) the run answers the first ``train.generate_eval_samples``
conversations of ``train.generate_eval_path`` greedily and logs ``exact_match`` (answers equal to
the reference, over the records that have one) and ``eot_rate`` (answers that ended with the
end-of-turn token) as a ``generate_eval`` record of metrics.jsonl, beside the eval loss.

Layout support: any TP x PP x DP layout, by gathering. Every rank sends its shards of the current
weights to rank 0 (megasft.hf.names.gather_hf_state), which builds the tp=pp=1 model on its device
and decodes with the KV cache (megasft.generate) while the other ranks wait at the next collective.
So it is meant for models whose full weights fit one device, and one evaluation must finish within
``parallel.timeout_s``; a large model is evaluated from its export with ``python -m megasft.generate``.
The prompts are rendered with the tokenizer and template the training data was preprocessed with.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch

from megasft.config import Config
from megasft.data.indexed import DatasetError
from megasft.parallel_state import ParallelState


class GenerateEval:
    """Built by the Trainer on every rank when the interval is set; only rank 0 holds prompts."""

    def __init__(self, cfg: Config, ps: ParallelState):
        from megasft.data.templates import ChatEncoder, get_template
        from megasft.data.tokenizer import load_tokenizer
        from megasft.generate import read_conversations
        from megasft.hf.tokenizer_export import trained_chat_format

        self.cfg, self.ps = cfg, ps
        self.interval = cfg.train.generate_eval_interval
        self.conversations, self.encoder, self.tokenizer = [], None, None
        if ps.rank != 0:
            return
        t = cfg.train
        tokenizer, template = trained_chat_format(cfg)
        if tokenizer is None:
            raise DatasetError("train.generate_eval_interval needs the run's tokenizer: set data.tokenizer "
                               "(or preprocess the training data with a tokenizer path meta.json can record)")
        if not Path(t.generate_eval_path).is_file():
            raise DatasetError(f"train.generate_eval_path={t.generate_eval_path}: no such file; point it at a "
                               "JSONL file of conversations whose last assistant turn is the reference answer")
        try:
            self.conversations = read_conversations(t.generate_eval_path, t.generate_eval_samples)
        except ValueError as err:
            raise DatasetError(f"train.generate_eval_path: {err}") from None
        self.tokenizer = load_tokenizer(tokenizer, template)
        self.encoder = ChatEncoder(self.tokenizer, get_template(template, tokenizer_config=self.tokenizer.config))

    @classmethod
    def from_config(cls, cfg: Config, ps: ParallelState) -> Optional["GenerateEval"]:
        return cls(cfg, ps) if cfg.train.generate_eval_interval else None

    def due(self, step: int) -> bool:
        return step % self.interval == 0 or step == self.cfg.train.steps

    @torch.no_grad()
    def run(self, chunks, step: int, writer) -> Optional[dict]:
        """Collective: gather the weights, answer on rank 0, log there; returns rank 0's record."""
        from megasft.generate import ChatModel, Sampling, score, single_process_model
        from megasft.hf.names import gather_hf_state, load_hf_state_dict

        start = time.perf_counter()
        state = gather_hf_state(chunks, self.ps, torch.float32)   # None except on rank 0
        if state is None:
            return None
        model = single_process_model(self.cfg.model, self.ps.device)
        load_hf_state_dict(model, state)
        del state
        tok = self.tokenizer
        chat = ChatModel(model, tok, self.encoder, frozenset({tok.eot_id, tok.eos_id}))
        result = score(chat, self.conversations, Sampling(max_new_tokens=self.cfg.train.generate_eval_max_new_tokens))
        record = {"kind": "generate_eval", "step": step, "exact_match": result.exact_match,
                  "eot_rate": result.eot_rate, "answered": result.answered, "with_reference": result.with_reference,
                  "seconds": time.perf_counter() - start}
        if writer is not None:
            # Written beside MetricsWriter's records (its line format knows train / eval records only).
            writer.file.write(json.dumps(record) + "\n")
            writer.file.flush()
            print(f"generate-eval step {step:>6} | exact match {result.exact}/{result.with_reference} "
                  f"({100 * result.exact_match:.1f}%) | end-of-turn {100 * result.eot_rate:.1f}% | "
                  f"{record['seconds']:.1f} s", flush=True)
        return record
