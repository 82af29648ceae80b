"""Shared pieces of the ratio benchmarks (step_cpu.py, trl_sft.py, gpu_mfu.py).

- synthetic SFT documents with a long-tailed (log-normal) length distribution and a learnable
  next-token rule, so "equal loss" comparisons mean something;
- the tiny Llama both sides train, written once as a Hugging Face directory so megasft
  (``model.init_from_hf``) and transformers start from the same weights;
- packed (megasft loader format) and padded (one conversation per row) micro-batches of the same
  documents;
- a plain transformers training step (the seed's loop) and interleaved timing (A B C A B C ...,
  medians) so that load from other processes on a shared machine hits every side alike.
"""
from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from megasft.config import Config
from megasft.data.batch import MicroBatch
from megasft.data.packing import build_micro_batch, pack_best_fit, padded_lengths

IGNORE = -100
Document = tuple[np.ndarray, np.ndarray]   # (token ids, loss mask: 1 where trained)


# ----------------------------------------------------------------------------- data
def lognormal_lengths(n: int, median: float, sigma: float, max_len: int, min_len: int,
                      rng: np.random.Generator) -> np.ndarray:
    """Long-tailed document lengths: log-normal around `median`, clipped to [min_len, max_len]
    (sigma 1.0 puts ~2 % of documents above 5x the median, as real chat corpora have)."""
    raw = rng.lognormal(math.log(median), sigma, n)
    return np.clip(raw.astype(np.int64), min_len, max_len)


def sft_documents(lengths: Sequence[int], vocab: int, rng: np.random.Generator,
                  successors: int = 4, prompt_fraction: float = 0.3) -> list[Document]:
    """Documents whose tokens follow a fixed random bigram table with `successors` choices per token
    (entropy ln(successors), so the loss falls from ~ln(vocab) towards ~ln(successors) as a model
    learns). The first `prompt_fraction` of each document is the untrained prompt, the rest the
    trained response (loss mask 1)."""
    table = rng.integers(0, vocab, size=(vocab, successors))
    docs = []
    for n in lengths:
        ids = np.empty(n, dtype=np.int64)
        ids[0] = rng.integers(vocab)
        picks = rng.integers(0, successors, size=n)
        for t in range(1, n):
            ids[t] = table[ids[t - 1], picks[t]]
        mask = np.zeros(n, dtype=np.int64)
        mask[max(1, int(prompt_fraction * n)):] = 1
        docs.append((ids, mask))
    return docs


def pack_steps(docs: Sequence[Document], seq_len: int, rows_per_step: int,
               doc_multiple: int = 1) -> list[list[list[int]]]:
    """Best-fit-decreasing rows over all documents (each taking its length rounded up to
    `doc_multiple`, as the loader pads them for context parallelism), cut into steps of
    `rows_per_step` rows (a trailing partial step is dropped). Each step is a list of rows of
    document indices."""
    rows = pack_best_fit(padded_lengths(np.array([len(ids) for ids, _ in docs]), doc_multiple), seq_len)
    order = np.random.default_rng(0).permutation(len(rows))   # rows of mixed fill in every step
    rows = [rows[i] for i in order]
    return [rows[i:i + rows_per_step] for i in range(0, len(rows) - rows_per_step + 1, rows_per_step)]


def packed_micro_batches(docs: Sequence[Document], step_rows: list[list[int]], seq_len: int,
                         rows_per_micro_batch: int, pad_id: int = 0, doc_multiple: int = 1) -> list[dict]:
    """megasft's loader format (input_ids, labels, position_ids, cu_seqlens, ...) for one step."""
    return [build_micro_batch([[docs[d] for d in row] for row in step_rows[i:i + rows_per_micro_batch]],
                              seq_len, pad_id, doc_multiple)
            for i in range(0, len(step_rows), rows_per_micro_batch)]


def padded_micro_batches(docs: Sequence[Document], doc_ids: Sequence[int], per_micro_batch: int,
                         pad_id: int = 0) -> list[dict]:
    """The usual no-packing loop: one conversation per row, `per_micro_batch` conversations padded
    to the longest of them, attention_mask 0 on padding. Labels as build_micro_batch makes them
    (the first token of a document never a target), so the trained tokens equal the packed ones."""
    out = []
    for i in range(0, len(doc_ids), per_micro_batch):
        group = [docs[d] for d in doc_ids[i:i + per_micro_batch]]
        width = max(len(ids) for ids, _ in group)
        input_ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        labels = torch.full((len(group), width), IGNORE, dtype=torch.long)
        attention_mask = torch.zeros((len(group), width), dtype=torch.long)
        for r, (ids, mask) in enumerate(group):
            n = len(ids)
            input_ids[r, :n] = torch.from_numpy(ids)
            labels[r, :n] = torch.from_numpy(np.where(mask.astype(bool), ids, IGNORE))
            labels[r, 0] = IGNORE
            attention_mask[r, :n] = 1
        out.append({"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask})
    return out


def hf_inputs(mb: MicroBatch | dict) -> dict:
    """transformers keyword arguments of a packed MicroBatch (position_ids carry the document
    boundaries) or of a padded batch dict (attention_mask does)."""
    if isinstance(mb, MicroBatch):
        return {"input_ids": mb.input_ids, "labels": mb.labels, "position_ids": mb.position_ids}
    return mb


def trained_tokens(micro_batches: Sequence[MicroBatch | dict]) -> int:
    """Targets after the next-token shift (labels[:, 1:] that are not ignored)."""
    return sum(int((hf_inputs(mb)["labels"][:, 1:] != IGNORE).sum()) for mb in micro_batches)


# ----------------------------------------------------------------------------- models
def add_model_args(ap, vocab: int, hidden: int, ffn: int, layers: int = 4, heads: int = 4,
                   kv_heads: int = 2) -> None:
    """The tiny Llama's shape as command-line options (defaults per benchmark)."""
    ap.add_argument("--vocab", type=int, default=vocab)
    ap.add_argument("--hidden", type=int, default=hidden)
    ap.add_argument("--layers", type=int, default=layers)
    ap.add_argument("--heads", type=int, default=heads)
    ap.add_argument("--kv-heads", type=int, default=kv_heads)
    ap.add_argument("--ffn", type=int, default=ffn)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's choice); on an oversubscribed machine "
                         "1 avoids OpenMP threads waiting for each other's time slices")


def set_threads(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def bench_config(args, seq_len: int, rows: int, micro_batch_rows: int, steps: int, lr: float) -> Config:
    """A validated fp32 single-process megasft Config for the tiny Llama of `args` (add_model_args):
    sdpa attention (the CPU backend), no LR warm-up (transformers' linear warm-up starts at lr 0,
    megasft's at lr/Tw; without one both run the same cosine from `lr` to 10 %)."""
    model = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                 num_layers=args.layers, num_attention_heads=args.heads, num_kv_heads=args.kv_heads,
                 rope_theta=500000.0, max_position_embeddings=seq_len, rms_norm_eps=1e-5,
                 attention_backend="sdpa", make_vocab_size_divisible_by=128)
    return Config.from_dict({
        "model": model,
        "data": {"seq_len": seq_len, "global_batch_tokens": rows * seq_len, "micro_batch_size": micro_batch_rows},
        "optim": {"lr": lr, "warmup_steps": 0},
        "train": {"steps": steps, "precision": "fp32", "seed": args.seed, "progress_bar": "off"},
    }).validate()


def describe_model(args, n_params: int) -> str:
    return (f"tiny Llama: {n_params:,} params (hidden {args.hidden}, {args.layers} layers, {args.heads} heads / "
            f"{args.kv_heads} kv, ffn {args.ffn}, vocab {args.vocab}), fp32, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def write_hf_twin(cfg: Config, directory: Path, seed: int):
    """A transformers LlamaForCausalLM with cfg.model's architecture and random weights, saved to
    `directory` and named in cfg.model.init_from_hf, so megasft builds the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megasft.hf.config import hf_config_from_model

    fields = hf_config_from_model(cfg.model, "float32")
    fields.pop("architectures"), fields.pop("model_type"), fields.pop("torch_dtype")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**fields, attn_implementation="sdpa")).float()
    model.save_pretrained(directory)
    cfg.model.init_from_hf = str(directory)
    return model


def load_hf_twin(directory: Path):
    """A fresh transformers model from the directory write_hf_twin wrote (sdpa attention, fp32)."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(directory, attn_implementation="sdpa", dtype=torch.float32)


def hf_optimizer(model, cfg: Config):
    """torch.optim.AdamW with megasft's hyper-parameters and param groups (no decay on 1-D
    params), and a LambdaLR of the same warmup-cosine schedule."""
    from megasft.optim.lr_schedule import WarmupCosine

    o = cfg.optim
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    schedule = WarmupCosine.from_config(o, cfg.train.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule.multiplier)
    return opt, sched


def hf_train_step(model, opt, sched, micro_batches: Sequence[MicroBatch | dict], clip: float) -> float:
    """The seed's plain loop on a transformers model: forward with labels, backward, clip, AdamW,
    zero_grad. ``num_items_in_batch`` (transformers' own gradient-accumulation fix) makes the loss
    the global-token mean, the same objective megasft optimises. ``use_cache=False`` as in any
    training loop; it also matters for correctness here: with a KV cache transformers skips its
    packed-sequence detection and documents of a packed row would attend to each other. Returns
    the step's loss."""
    model.train()
    count = trained_tokens(micro_batches)
    total = 0.0
    for mb in micro_batches:
        loss = model(**hf_inputs(mb), num_items_in_batch=count, use_cache=False).loss
        loss.backward()
        total += float(loss.detach())
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return total


# ----------------------------------------------------------------------------- timing
def interleaved_times(runners: dict[str, Callable[[int], object]], steps: int, warmup: int,
                      sync: Optional[Callable[[], None]] = None) -> dict[str, list[float]]:
    """Run ``runners[name](i)`` for i in 0..warmup+steps-1, round-robin over the names (A B C A B
    C ...), and return each name's wall times of the steps after warm-up. `sync` (e.g.
    torch.cuda.synchronize) is called before each clock read."""
    sync = sync or (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for i in range(warmup + steps):
        for name, run in runners.items():
            sync()
            start = time.perf_counter()
            run(i)
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def spread(xs: Sequence[float]) -> str:
    """'median [min..max]' of step times, to show how noisy the shared machine was."""
    return f"{median(xs):.3f} [{min(xs):.3f}..{max(xs):.3f}]"


def relaunch_under_torchrun(script: str, nproc: int, argv: Optional[Sequence[str]]) -> None:
    """Start `script` (a file next to this one) on `nproc` local ranks with --worker added, and exit
    with torchrun's status. The benchmarks folder goes on PYTHONPATH so `common` imports there."""
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           os.path.join(here, script), "--worker", *(argv if argv is not None else sys.argv[1:])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    raise SystemExit(subprocess.run(cmd, env=env).returncode)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table, columns right-aligned except the first."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r):
        return " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(cells[0]), "-+-".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])
