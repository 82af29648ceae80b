"""The training loop: one optimizer step over a global batch, evaluation, logging, checkpoints.

Loss normalisation (the gradient-accumulation bug made impossible): before any backward, the
number of trained tokens in the *whole global batch* is counted from the labels of every
micro-batch and all-reduced over data-parallel ranks; each micro-batch back-propagates
``loss_sum / global_count``. Summed over micro-batches and DP ranks (gradients are reduced with a
sum), the update is the gradient of ``sum of token losses / global trained tokens`` whatever the
micro-batch split, DP size or packing.
"""
from __future__ import annotations

import math
import signal
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megasft.config import Config
from megasft.model.build import build_model
from megasft.model.fp8 import fp8_autocast
from megasft.optim.distributed_optimizer import DistributedOptimizer
from megasft.optim.lr_schedule import WarmupCosine
from megasft.parallel_state import ParallelState, group_size
from megasft.pipeline import schedules
from megasft.pipeline.bubble import bubble_1f1b, bubble_interleaved
from megasft.pipeline.tied import sync_tied_embedding_grads
from megasft.tensor_parallel.cross_entropy import IGNORE_INDEX, shift_labels
from megasft.tensor_parallel.layers import sync_replicated_grads
from megasft.training import metrics
from megasft.training.profiler import maybe_profile


class StopSignal:
    """SIGUSR1 / SIGTERM request a stop at the next step boundary: finish the step, save, exit
    (Slurm sends USR1 ahead of the time limit, TERM on preemption). Install it as early as
    possible — before model build and weight loading — so a signal during start-up is not lost."""

    def __init__(self) -> None:
        self.requested = False
        self.installed = False

    def install(self) -> "StopSignal":
        if not self.installed:
            for sig in (signal.SIGUSR1, signal.SIGTERM):
                signal.signal(sig, self._handle)
            self.installed = True
        return self

    def _handle(self, signum=None, frame=None) -> None:
        self.requested = True


@dataclass
class StepOutput:
    loss: float            # global-batch mean loss (same number on every rank)
    trained_tokens: int    # trained tokens in the global batch
    grad_norm: float
    lr: float
    skipped: bool
    bubble: Optional[tuple[float, float]] = None   # (measured, theory) with pipelining


def count_trained_tokens(micro_batches: list[dict]) -> int:
    """Tokens that contribute to the loss (after the next-token shift) in these micro-batches."""
    return sum(int((shift_labels(mb["labels"]) != IGNORE_INDEX).sum()) for mb in micro_batches)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class Trainer:
    """Owns this rank's model chunks, optimizer and data; `fit()` runs the configured steps."""

    def __init__(self, cfg: Config, ps: ParallelState, log: bool = True, stop: Optional[StopSignal] = None):
        self.cfg, self.ps = cfg, ps
        self.chunks = build_model(cfg, ps)
        self.schedule = WarmupCosine.from_config(cfg.optim, cfg.train.steps)
        named = [(f"chunk{i}.{n}", p) for i, c in enumerate(self.chunks) for n, p in c.named_parameters()]
        self.optimizer = DistributedOptimizer(named, cfg.optim, cfg.parallel, ps, self.schedule)
        self.optimizer.register_param_sync_hooks(m for c in self.chunks for m in c.modules())
        self.params = [p for _, p in named]
        self.step = 0
        self.best_eval: Optional[tuple[float, int]] = None
        self.stop = stop or StopSignal()
        self.log = log and ps.rank == 0
        s = cfg.data.seq_len // ps.tp if cfg.parallel.sequence_parallel and ps.tp > 1 else cfg.data.seq_len
        self.tensor_shape = (s, cfg.data.micro_batch_size, cfg.model.hidden_size)
        self.dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        self.fp8_autocast = fp8_autocast(cfg.train, ps)   # a null context unless train.fp8 is on

    # ------------------------------------------------------------------ one step
    def forward_step(self, loss_scale: float):
        def step(chunk_index: int, batch: dict, input_tensor: Optional[torch.Tensor]):
            chunk = self.chunks[chunk_index]
            with self.fp8_autocast():   # one FP8 region per chunk forward; backward runs outside
                out = chunk(batch, input_tensor)
            if not chunk.post_process:
                return out
            loss_sum, count = out
            return loss_sum * loss_scale, {"loss_sum": loss_sum.detach(), "tokens": count}
        return step

    def run_schedule(self, micro_batches: list[dict], forward_only: bool):
        """Count the global trained tokens, run the pipeline schedule; returns (result, count)."""
        micro_batches = [_to_device(mb, self.ps.device) for mb in micro_batches]
        count = torch.tensor([count_trained_tokens(micro_batches)], dtype=torch.float64)
        if group_size(self.ps.dp_group) > 1:
            dist.all_reduce(count, group=self.ps.dp_group)
        global_count = int(count.item())
        # An all-padding global batch trains nothing; scale 0 keeps the step well-defined.
        scale = 1.0 / global_count if global_count else 0.0
        for chunk in self.chunks:
            chunk.train(not forward_only)
        overlap = self.cfg.parallel.overlap_grad_reduce and not forward_only
        result = schedules.forward_backward(
            self.forward_step(scale), micro_batches, self.ps, num_chunks=len(self.chunks),
            tensor_shape=self.tensor_shape, dtype=self.dtype, forward_only=forward_only,
            schedule=self.cfg.parallel.pipeline_schedule,
            no_sync=self.optimizer.grad_buffer.no_sync if overlap else None)
        return result, global_count

    def bubble_theory(self, num_micro_batches: int) -> float:
        v = len(self.chunks)
        if v > 1:
            return bubble_interleaved(self.ps.pp, num_micro_batches, v)
        return bubble_1f1b(self.ps.pp, num_micro_batches)

    def global_loss_sum(self, stats: dict) -> float:
        """Sum of token losses over the global batch, made known on every rank. Only the last
        stage's first TP rank contributes, so TP copies are not counted twice."""
        mine = self.ps.is_last_stage and self.ps.tp_rank == 0
        value = torch.tensor([float(stats.get("loss_sum", 0.0)) if mine else 0.0], dtype=torch.float64)
        if self.ps.world_size > 1:
            dist.all_reduce(value, group=self.ps.world_group)
        return float(value.item())

    def train_step(self, micro_batches: list[dict]) -> StepOutput:
        self.optimizer.zero_grad()
        result, global_count = self.run_schedule(micro_batches, forward_only=False)
        sync_replicated_grads(self.params)
        sync_tied_embedding_grads(self.chunks, self.ps)
        step = self.optimizer.step()
        loss = self.global_loss_sum(result.stats) / max(global_count, 1)
        self.step += 1
        bubble = None
        if self.ps.pp > 1:   # rank 0 is on the first stage, which measures the pipeline's bubble
            bubble = (result.bubble_fraction, self.bubble_theory(len(micro_batches)))
        return StepOutput(loss, global_count, step.grad_norm, step.lr, step.skipped, bubble)

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self, loader) -> tuple[float, int]:
        """Masked mean loss over one pass of the eval split (every rank takes part)."""
        total, tokens = 0.0, 0
        max_batches = self.cfg.train.eval_batches or math.inf
        for i, micro_batches in enumerate(loader.one_pass()):
            if i >= max_batches:
                break
            result, count = self.run_schedule(micro_batches, forward_only=True)
            total += self.global_loss_sum(result.stats)
            tokens += count
        return total / max(tokens, 1), tokens

    # ------------------------------------------------------------------ loop
    @property
    def stop_requested(self) -> bool:
        return self.stop.requested

    def fit(self, train_loader, eval_loader=None, writer: Optional[metrics.MetricsWriter] = None,
            on_step=None, checkpointer=None) -> list[StepOutput]:
        """Train to cfg.train.steps (or a stop signal). `checkpointer` (a
        megasft.checkpoint.sharded.Checkpointer) saves on its cadence, at the end and on a stop."""
        t = self.cfg.train
        self.stop.install()
        window = metrics.ThroughputWindow(self.ps.device)
        outputs = []
        with maybe_profile(t.profile, t.run_dir, self.ps.rank, self.ps.device) as prof:
            while self.step < t.steps:
                micro_batches = train_loader.next_global_batch()
                out = self.train_step(micro_batches)
                prof.step()
                outputs.append(out)
                window.add(self.cfg.data.global_batch_tokens, out.trained_tokens, self._step_flops(micro_batches))
                if self.step % t.log_interval == 0 or self.step == t.steps:
                    self._log_train(out, window, writer)
                if eval_loader is not None and t.eval_interval and (self.step % t.eval_interval == 0
                                                                     or self.step == t.steps):
                    self._eval_and_log(eval_loader, writer)
                    window.restart()   # evaluation time is not training throughput
                if on_step is not None:
                    on_step(self)
                stop = self._should_stop()
                if checkpointer is not None:
                    checkpointer.after_step(self, train_loader, last=stop or self.step >= t.steps)
                if stop:
                    break
        self.optimizer.finish_param_sync()   # the caller may read the final weights
        return outputs

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The training progress a checkpoint restores (weights and optimizer state are saved per
        canonical tensor by megasft.checkpoint, RNG per rank)."""
        return {"step": self.step, "best_eval": self.best_eval}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.best_eval = state.get("best_eval")

    def _step_flops(self, micro_batches: list[dict]) -> float:
        """Model FLOPs of this step over all ranks (document lengths summed over DP; TP/PP copies
        of a micro-batch are the same work)."""
        sq = torch.tensor([metrics.sum_sq_segment_lens(micro_batches)], dtype=torch.float64)
        if group_size(self.ps.dp_group) > 1:
            dist.all_reduce(sq, group=self.ps.dp_group)
        return metrics.step_model_flops(self.cfg.model, self.cfg.data.global_batch_tokens, int(sq.item()))

    def _log_train(self, out: StepOutput, window: "metrics.ThroughputWindow", writer) -> None:
        elapsed, tokens, trained, flops = window.close()
        if writer is None:
            return
        extra = {"bubble": out.bubble[0], "bubble_theory": out.bubble[1]} if out.bubble is not None else None
        writer.write(metrics.throughput_record(
            self.step, out.lr, out.loss, out.grad_norm, elapsed, tokens, trained, flops, self.ps.world_size,
            self.cfg.train.peak_tflops, metrics.peak_memory_bytes(self.ps.device),
            self.optimizer.skipped_total, extra))

    def _should_stop(self) -> bool:
        flag = torch.tensor([1.0 if self.stop_requested else 0.0])
        if self.ps.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.ps.world_group)   # stop together
        return bool(flag.item())

    def _eval_and_log(self, eval_loader, writer) -> None:
        loss, tokens = self.evaluate(eval_loader)
        if self.best_eval is None or loss < self.best_eval[0]:
            self.best_eval = (loss, self.step)
        if writer is not None:
            writer.write({"kind": "eval", "step": self.step, "eval_loss": loss, "eval_tokens": tokens,
                          "best_eval_loss": self.best_eval[0], "best_step": self.best_eval[1]})
