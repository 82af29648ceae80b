"""Entry point: ``torchrun --nproc-per-node N -m megasft.train --config X.yaml [section.key=value ...]``.

Reads and validates the config before any process group exists, builds the parallel state,
model, optimizer and data, writes the resolved config to the run directory, trains, and (with
checkpoint.export_hf) writes the final weights as a Hugging Face directory.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from megasft.config import Config, ConfigError
from megasft.layout import Layout
from megasft.parallel_state import ParallelState, destroy


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="megasft.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML config (sections model/parallel/data/optim/train/checkpoint)")
    ap.add_argument("--profile", action="store_true",
                    help="trace a few steps with torch.profiler into <run_dir>/profile (train.profile=true)")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=100")
    args = ap.parse_args(argv)
    if args.profile:
        args.overrides.append("train.profile=true")
    return args


def describe_start(cfg: Config, ps: ParallelState, trainer) -> str:
    n_params = sum(p.numel() for p in trainer.params)
    layout = trainer.layout
    expected = 12 * n_params / (layout.dp if cfg.parallel.distributed_optimizer else 1)
    measured = trainer.optimizer.state_bytes()
    return "\n".join([
        f"megasft: world {ps.world_size} = tp {ps.tp} x pp {ps.pp} x dp {ps.dp} on {ps.device}"
        f"{' (sequence parallel)' if layout.sequence_parallel else ''}, "
        f"precision {cfg.train.precision}"
        f"{f' + FP8 GEMMs ({cfg.train.fp8})' if cfg.train.fp8 != 'off' else ''}",
        f"model: {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, vocab {cfg.model.vocab_size} "
        f"(padded {cfg.model.padded_vocab_size(ps.tp)}); {n_params:,} parameters on rank 0",
        trainer.optimizer.describe(),
        f"optimizer state on rank 0: measured {measured:,} bytes vs 12*N/DP = {expected:,.0f} "
        f"(ratio {measured / expected:.4f})",
        f"data: {cfg.data.rows_per_step()} rows x {cfg.data.seq_len} tokens per step, "
        f"{cfg.data.micro_batch_size} rows per micro-batch, {layout.micro_batches} micro-batches per rank",
    ])


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = Config.load(args.config, args.overrides).validate()
        layout = Layout.resolve(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    except (ConfigError, FileNotFoundError) as err:
        print(f"megasft.train: configuration error: {err}", file=sys.stderr)
        return 2
    from megasft.checkpoint.sharded import Checkpointer, CheckpointError, CheckpointMismatch
    from megasft.data.loader import build_loaders
    from megasft.training.loop import StopSignal, Trainer
    from megasft.training.metrics import MetricsWriter

    stop = StopSignal().install()   # before the (possibly long) model build and weight loading
    ps = ParallelState.from_env(layout.tp, layout.pp)
    torch.manual_seed(cfg.train.seed)
    run_dir = Path(cfg.train.run_dir)
    train_loader, eval_loader = build_loaders(cfg.data, cfg.train.seed, ps.dp_rank, ps.dp, cfg.model.vocab_size)
    trainer = Trainer(cfg, ps, stop=stop)
    checkpointer = Checkpointer(cfg, ps)
    try:   # before any step: a bad checkpoint fails here, naming the file and what differs
        resumed = checkpointer.resume(trainer, train_loader)
    except (CheckpointError, CheckpointMismatch) as err:
        print(f"megasft.train: checkpoint error: {err}", file=sys.stderr)
        destroy()
        return 3
    writer = None
    if ps.rank == 0:
        cfg.save(run_dir / "config.yaml")
        print(describe_start(cfg, ps, trainer), flush=True)
        if resumed is not None:
            print(f"megasft: resumed from {resumed} at step {trainer.step}", flush=True)
        writer = MetricsWriter(run_dir, cfg.train.steps, cfg.train.progress_bar)
    trainer.fit(train_loader, eval_loader, writer, checkpointer=checkpointer)
    checkpointer.close()
    if cfg.checkpoint.export_hf and trainer.step >= cfg.train.steps:
        export_final(cfg, ps, run_dir / "hf")
    if writer is not None:
        writer.close()
        if trainer.step < cfg.train.steps:
            print(f"megasft: stopped at step {trainer.step} of {cfg.train.steps} on a stop signal; "
                  f"checkpoint saved in {cfg.checkpoint.root(cfg.train.run_dir)}", flush=True)
        else:
            print(f"megasft: done after {trainer.step} steps; metrics in {run_dir / 'metrics.jsonl'}", flush=True)
    destroy()
    return 0


def export_final(cfg: Config, ps: ParallelState, out: Path) -> None:
    """Convert the final checkpoint (saved by the checkpointer at the end of fit) into a Hugging
    Face directory on rank 0 — the same streaming path as tools/convert_checkpoint.py."""
    import torch.distributed as dist

    from megasft.checkpoint.convert import megasft_to_hf
    from megasft.checkpoint.files import checkpoint_root

    if ps.world_size > 1:
        dist.barrier(group=ps.world_group)
    if ps.rank == 0:
        dtype = "fp32" if cfg.train.precision == "fp32" else "bf16"
        megasft_to_hf(checkpoint_root(cfg), out, dtype=dtype, tokenizer=cfg.data.tokenizer)
        print(f"megasft: wrote Hugging Face weights to {out}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
