"""Supervised fine-tuning throughput and loss: megasft vs TRL ``SFTTrainer``, one CPU process, fp32.

    pip install trl          # CPU-only: it must not replace the installed torch (check --dry-run)
    python benchmarks/trl_sft.py [--docs 800] [--threads 1] [--order-runs 3]

Both sides start from the same tiny Llama weights (one HF directory) and train one epoch over the
same pre-tokenised documents (log-normal lengths, prompt untrained, response trained; a bigram rule
the model can learn) with the same hyper-parameters: AdamW lr --lr (2e-3), betas (0.9, 0.95), eps 1e-8,
weight decay 0.1, clip 1.0, cosine from lr to 10 % without warm-up, best-fit-decreasing packing into
rows of --seq-len, one row per micro-batch and --rows rows (gradient-accumulation steps) per
optimizer step. One row per micro-batch because TRL's padding-free collator flattens a micro-batch
into a single sequence whose block-diagonal mask is (rows x seq_len)^2 under sdpa; one row keeps
both sides on the same attention work.

Steps are interleaved: a TrainerCallback runs one megasft step after each TRL step, so load from
other processes hits both. TRL's step time runs from the end of the previous megasft step to its
own on_step_end (data loading, collation, forward/backward, optimizer, scheduler and logging);
megasft's covers building its micro-batches and Trainer.train_step. The first --warmup steps of
each side are not timed. "Equal loss" is checked on held-out documents: both final models are
evaluated by the same transformers forward (megasft's weights exported to the HF layout).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import (add_model_args, bench_config, describe_model, format_table, hf_inputs, load_hf_twin,
                    lognormal_lengths, median, pack_steps, packed_micro_batches, set_threads, sft_documents,
                    spread, trained_tokens, write_hf_twin)
from megasft.parallel_state import ParallelState
from megasft.training.loop import Trainer


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=800, help="training documents (one epoch)")
    ap.add_argument("--eval-docs", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per side")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rows", type=int, default=4, help="packed rows per optimizer step")
    ap.add_argument("--median", type=float, default=100.0, help="median document length (tokens)")
    ap.add_argument("--sigma", type=float, default=1.0, help="log-normal shape of document lengths")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--order-runs", type=int, default=0,
                    help="extra untimed megasft runs over other row orders, to show how much the held-out "
                         "loss moves with data order alone (TRL shuffles its own rows)")
    add_model_args(ap, vocab=2048, hidden=128, ffn=344)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def trl_missing() -> str | None:
    """Why TRL cannot run here, or None."""
    try:
        import trl  # noqa: F401
    except ImportError as err:
        return (f"TRL is not installed ({err}). Install it with `pip install trl` after checking with "
                "`pip install trl --dry-run` that it keeps the installed torch; skipping the benchmark.")
    return None


def make_tokenizer(vocab: int):
    """A word-level tokenizer over the ids '0'..'vocab-1': SFTTrainer needs a processing class (for
    the pad id) even when the dataset is already tokenised. Pad id 0, as megasft's rows use."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({str(i): i for i in range(vocab)}, unk_token="0"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="0", eos_token="1", unk_token="0")


def trl_dataset(docs):
    """Pre-tokenised rows with HF labels (-100 where not trained); TRL skips its own tokenisation."""
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [ids.tolist() for ids, _ in docs],
                              "labels": [np.where(mask.astype(bool), ids, -100).tolist() for ids, mask in docs]})


class CountingCollator:
    """Wraps TRL's collator to count the tokens (useful and trained) TRL really trains on."""

    def __init__(self, collator):
        self.collator, self.useful, self.trained = collator, 0, 0

    def __call__(self, examples):
        batch = self.collator(examples)
        self.useful += sum(len(e["input_ids"]) for e in examples)
        self.trained += trained_tokens([batch])
        return batch


def interleaving_callback(megasft_step, warmup: int):
    """A TrainerCallback that times each TRL step and runs (and times) one megasft step after it."""
    from transformers import TrainerCallback

    class Interleave(TrainerCallback):
        def __init__(self):
            self.mark, self.trl, self.megasft, self.trl_losses = None, [], [], []

        def on_train_begin(self, args, state, control, **kwargs):
            self.mark = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            if state.global_step > warmup:
                self.trl.append(now - self.mark)
            start = time.perf_counter()
            megasft_step(state.global_step - 1)
            if state.global_step > warmup:
                self.megasft.append(time.perf_counter() - start)
            self.mark = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.trl_losses.append(logs["loss"])

    return Interleave()


def build_trl(model, tokenizer, docs, args, steps: int, out_dir: str, callback):
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=1,
        gradient_accumulation_steps=args.rows, learning_rate=args.lr, weight_decay=0.1,
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=0,
        packing=True, packing_strategy="bfd", max_length=args.seq_len, shuffle_dataset=True,
        logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, seed=args.seed,
        dataloader_num_workers=0, disable_tqdm=True, bf16=False, fp16=False)
    trainer = SFTTrainer(model=model, args=config, train_dataset=trl_dataset(docs),
                         processing_class=tokenizer, callbacks=[callback])
    trainer.data_collator = CountingCollator(trainer.data_collator)
    return trainer


@torch.no_grad()
def eval_loss(model, micro_batches) -> float:
    """Masked mean next-token loss of a transformers model over packed micro-batches."""
    model.eval()
    total, count = 0.0, trained_tokens(micro_batches)
    for mb in micro_batches:
        out = model(**hf_inputs(mb), num_items_in_batch=count, use_cache=False)
        total += float(out.loss)
    return total


def megasft_as_hf(trainer: Trainer, hf_dir: Path):
    """megasft's trained weights in a transformers model (the export path users take)."""
    from megasft.hf.names import gather_hf_state

    model = load_hf_twin(hf_dir)
    model.load_state_dict(gather_hf_state(trainer.chunks, trainer.ps, torch.float32), strict=True)
    return model


def order_spread(cfg, hf_dir: Path, docs, step_rows, eval_batches, runs: int) -> list[float]:
    """Held-out loss of megasft after the same epoch with the rows in `runs` other random orders."""
    rows = [row for step in step_rows for row in step]
    per_step = len(step_rows[0])
    losses = []
    for seed in range(1, runs + 1):
        order = np.random.default_rng(seed).permutation(len(rows))
        trainer = Trainer(cfg, ParallelState.single(), log=False)
        for i in range(0, len(order), per_step):
            trainer.train_step(packed_micro_batches(docs, [rows[j] for j in order[i:i + per_step]],
                                                    cfg.data.seq_len, 1))
        losses.append(eval_loss(megasft_as_hf(trainer, hf_dir), eval_batches))
    return losses


def main(argv=None) -> None:
    args = parse_args(argv)
    set_threads(args)
    reason = trl_missing()
    if reason:
        print(reason)
        return
    import trl

    rng = np.random.default_rng(args.seed)
    lengths = lognormal_lengths(args.docs + args.eval_docs, args.median, args.sigma, args.seq_len, 8, rng)
    docs = sft_documents(lengths, args.vocab, rng)
    train_docs, eval_docs = docs[:args.docs], docs[args.docs:]
    step_rows = pack_steps(train_docs, args.seq_len, args.rows)
    eval_batches = [mb for rows in pack_steps(eval_docs, args.seq_len, 1)
                    for mb in packed_micro_batches(eval_docs, rows, args.seq_len, 1)]
    steps = len(step_rows)
    cfg = bench_config(args, args.seq_len, args.rows, 1, steps, args.lr)
    megasft_tokens = {"useful": 0, "trained": 0}

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "hf"
        write_hf_twin(cfg, hf_dir, args.seed)
        trainer = Trainer(cfg, ParallelState.single(), log=False)
        megasft_losses = []

        def megasft_step(i: int) -> None:
            micro_batches = packed_micro_batches(train_docs, step_rows[i % steps], args.seq_len, 1)
            megasft_tokens["useful"] += sum(len(train_docs[d][0]) for row in step_rows[i % steps] for d in row)
            megasft_tokens["trained"] += trained_tokens(micro_batches)
            megasft_losses.append(trainer.train_step(micro_batches).loss)

        callback = interleaving_callback(megasft_step, args.warmup)
        start_loss = eval_loss(load_hf_twin(hf_dir), eval_batches)
        trl_trainer = build_trl(load_hf_twin(hf_dir), make_tokenizer(args.vocab), train_docs, args, steps,
                                str(Path(tmp) / "trl"), callback)
        print(describe_model(args, sum(p.numel() for p in trainer.params)) + f", trl {trl.__version__}")
        print(f"data: {len(train_docs)} training documents (median {np.median(lengths):.0f}, "
              f"max {lengths.max()} tokens) -> {steps} steps of {args.rows} packed rows x {args.seq_len}, "
              f"one row per micro-batch; {len(eval_docs)} held-out documents")
        trl_trainer.train()
        megasft_eval = eval_loss(megasft_as_hf(trainer, hf_dir), eval_batches)
        spread_losses = order_spread(cfg, hf_dir, train_docs, step_rows, eval_batches, args.order_runs)
    trl_eval = eval_loss(trl_trainer.model, eval_batches)
    collator = trl_trainer.data_collator
    print(report(steps, callback, megasft_tokens, collator, megasft_losses, start_loss,
                 {"megasft": megasft_eval, "TRL SFTTrainer": trl_eval}))
    if spread_losses:
        print(f"megasft held-out loss over {len(spread_losses)} other row orders: "
              + ", ".join(f"{x:.4f}" for x in spread_losses)
              + f" (range {min(spread_losses + [megasft_eval]):.4f}..{max(spread_losses + [megasft_eval]):.4f} "
              "with the timed run): the loss gap to compare against")


def report(steps, callback, megasft_tokens, collator, megasft_losses, start_loss, evals) -> str:
    """Per side: median step time, useful and trained tokens/s (mean tokens per step over the epoch
    / median step time), last training loss, held-out loss after the epoch."""
    sides = {"megasft": (callback.megasft, megasft_tokens["useful"], megasft_tokens["trained"], megasft_losses),
             "TRL SFTTrainer": (callback.trl, collator.useful, collator.trained, callback.trl_losses)}
    rows, rate = [], {}
    for name, (times, useful, trained, losses) in sides.items():
        t = median(times)
        rate[name] = (useful / steps / t, trained / steps / t)
        rows.append([name, spread(times), f"{useful / steps:,.0f}", f"{rate[name][0]:,.0f}",
                     f"{rate[name][1]:,.0f}", f"{losses[-1]:.4f}", f"{evals[name]:.4f}"])
    table = format_table(["side", "step s median [min..max]", "useful tok/step", "useful tok/s",
                          "trained tok/s", "last train loss", "held-out loss"], rows)
    ratio = rate["megasft"][1] / rate["TRL SFTTrainer"][1]
    gap = evals["megasft"] - evals["TRL SFTTrainer"]
    return "\n".join([table,
                      f"held-out loss before training {start_loss:.4f}; after {steps} steps megasft - TRL = {gap:+.4f}",
                      f"megasft / TRL SFTTrainer (trained tok/s): {ratio:.2f}x (goal >= 1.0 at equal loss)"])


if __name__ == "__main__":
    main()
