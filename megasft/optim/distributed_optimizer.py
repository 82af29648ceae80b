"""ZeRO-1 AdamW: fp32 main params and Adam moments sharded over the data-parallel group.

One step (Rajbhandari et al. 2020, "ZeRO", stage 1; Megatron-LM's distributed optimizer):

    grads (fp32 main grads, summed over micro-batches)
      ─ model syncs: partial grads of replicated params over TP, tied embedding copies over PP
      ─ reduce-scatter SUM over DP ─▶ this rank's grad shard      [P] -> [P / dp]
      ─ global norm over TP, PP, DP; clip by min(1, max_norm / (norm + 1e-6))
      ─ AdamW on the shard (fp32 main params, exp_avg, exp_avg_sq)
      ─ cast to the model dtype, all-gather over DP ─▶ model params [P / dp] -> [P]
        (with overlap_param_gather: launched here, waited for by each module's next forward)

The three fp32 shard tensors live in one contiguous buffer ``shard_state`` of shape [3, S], so
optimizer state costs 12 bytes per parameter of this rank divided by DP. With
``distributed_optimizer=False`` the same code runs with one shard covering everything: grads are
all-reduced and every DP rank keeps (and updates) the full state.

The update is torch.optim.AdamW's (Loshchilov & Hutter 2019), decoupled decay (wd = 0 for 1-D
params) followed by the Adam step of megasft.optim.adamw (torch's fused kernel or the reference ops).

A non-finite global norm (or a non-finite loss, which the trainer passes in) skips the step:
params, moments and the step count stay untouched. After an update, ``max_abs_main_param`` is
the trainer's cheap check (one max-reduction over this rank's fp32 shard) that no weight became
non-finite.

Wiring in a trainer:

    opt = DistributedOptimizer(named_params, cfg.optim, cfg.parallel, ps,
                               WarmupCosine.from_config(cfg.optim, cfg.train.steps))
    print(opt.describe())                          # optimizer-state bytes per rank
    opt.register_param_sync_hooks(model.modules()) # when overlap_param_gather is on
    opt.zero_grad()
    for each micro-batch:                          # all but the last inside opt.grad_buffer.no_sync()
        (loss_sum / global_valid_tokens).backward()     # when overlap_grad_reduce is on
    result = opt.step()                            # every grad sync, then StepResult(grad_norm, ...)
    opt.finish_param_sync()                        # before reading weights outside a forward
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from megasft.config import OptimConfig, ParallelConfig
from megasft.optim.adamw import FusedUpdate, reference_update, resolve_kernel
from megasft.optim.grad_buffer import Bucket, GradBuffer, ParamShard
from megasft.optim.grad_norm import clip_coefficient, global_norm, summed, weighted_sq_sum
from megasft.parallel_state import ParallelState
from megasft.pipeline.tied import sync_tied_embedding_grads
from megasft.tensor_parallel.layers import sync_replicated_grads

MAIN, EXP_AVG, EXP_AVG_SQ = 0, 1, 2  # rows of shard_state


class TooManySkippedSteps(RuntimeError):
    """Raised after OptimConfig.max_consecutive_skips steps in a row were skipped (non-finite
    gradient norm or loss)."""


@dataclass(frozen=True)
class StepResult:
    grad_norm: float  # global norm before clipping
    skipped: bool  # True when the norm was not finite and nothing was updated
    lr: float  # the learning rate of this step (applied or not)
    clip_coef: float  # the factor the grads were scaled by (1.0 when not clipped or skipped)
    consecutive_skips: int


class DistributedOptimizer:
    """AdamW over the trainable parameters of this rank, state sharded over DP (ZeRO-1).

    named_params: ``model.named_parameters()`` (of every model chunk on this rank). The constructor
    re-points each ``param.data`` into a contiguous buffer and gives each param a fp32 main grad
    (``grad_buffer.main_grad(param)``); backward fills it through hooks (see grad_buffer).
    schedule: ``step -> lr``, e.g. lr_schedule.WarmupCosine, evaluated at the applied-step count.
    """

    def __init__(self, named_params: Iterable[tuple[str, nn.Parameter]], optim: OptimConfig,
                 parallel: ParallelConfig, state: ParallelState, schedule: Callable[[int], float]):
        self.optim = optim
        self.schedule = schedule
        self.distributed = parallel.distributed_optimizer
        self.overlap_param_gather = parallel.overlap_param_gather
        # Overlap needs several buckets; without it one bucket means one collective per step.
        overlap = parallel.overlap_grad_reduce or parallel.overlap_param_gather
        bucket_numel = int(parallel.bucket_size_mb * 2 ** 20 / 4) if overlap else None
        self.grad_buffer = GradBuffer(list(named_params), state.grad_group, shard=self.distributed,
                                      bucket_numel=bucket_numel, overlap=parallel.overlap_grad_reduce,
                                      expert_group=state.expert_grad_group, split_experts=state.ep > 1)
        # The norm sums over TP and PP always, and over DP x CP only where those ranks hold disjoint
        # shards; expert-parallel experts over EP always and over expert-DP where sharded.
        self.model_norm_groups = [state.tp_group, state.pp_group]
        self.dense_norm_groups = [state.grad_group] if self.distributed else []
        self.expert_norm_groups = ([state.expert_grad_group] if self.distributed else []) + [state.ep_group]
        self.expert_parallel = state.ep > 1
        self.embedding_group = state.embedding_group
        self.params = [slot.param for bucket in self.grad_buffer.buckets for slot in bucket.slots]
        self.shard_state = torch.zeros(3, self.grad_buffer.shard_numel, dtype=torch.float32,
                                       device=self.grad_buffer.grad_data.device)
        self.main_params_from_model()
        self.kernel = resolve_kernel(optim.adamw_kernel, self.shard_state.device)
        if self.kernel == "fused":
            rows = [self._shard_rows(b) for b in self.grad_buffer.buckets]
            self._fused = FusedUpdate([r[MAIN] for r in rows], [r[EXP_AVG] for r in rows],
                                      [r[EXP_AVG_SQ] for r in rows], optim.beta1, optim.beta2, optim.eps)
        self.step_count = 0  # applied (not skipped) updates; AdamW's t is step_count after increment
        self.consecutive_skips = 0
        self.skipped_total = 0

    # ------------------------------------------------------------------ step
    def zero_grad(self) -> None:
        """Zero the fp32 gradient buffer (call before the first micro-batch of a step)."""
        self.grad_buffer.zero_()

    def step(self, loss_finite: bool = True) -> StepResult:
        """Reduce grads over DP, clip, update this rank's shard, all-gather params.
        Collective over TP, PP and DP: every rank calls it every step. ``loss_finite=False`` (the
        global loss was NaN/inf; the same on every rank) skips the step like a non-finite norm."""
        self.sync_grads()
        norm = self.grad_norm()
        lr = self.schedule(self.step_count)
        if not math.isfinite(norm) or not loss_finite:
            return self._skip(norm, lr, "gradient norm" if not math.isfinite(norm) else "loss")
        self.consecutive_skips = 0
        coef = clip_coefficient(norm, self.optim.clip_grad)
        self.step_count += 1
        self._update(lr, coef)
        self.publish_params(overlap=self.overlap_param_gather)
        return StepResult(norm, False, lr, coef, 0)

    def sync_grads(self) -> None:
        """Every gradient sum before the update, in the one order that is right: the partial
        gradients of replicated parameters over their TP groups and the pipeline-tied embedding
        copies over the embedding group (both on the fp32 main grads, which an overlapped DP
        reduction leaves alone until then: ParamSpec.model_grad_sync), then the DP reduction."""
        main_grad = self.grad_buffer.main_grad
        sync_replicated_grads(self.params, main_grad)
        sync_tied_embedding_grads(self.params, self.embedding_group, main_grad)
        self.grad_buffer.finish_grad_sync()

    def grad_norm(self) -> float:
        """Global L2 norm of the DP-reduced gradients, each distinct parameter counted once."""
        def squares(experts: bool) -> torch.Tensor:
            pieces = ((self.grad_buffer.grad_shard(b)[r.start:r.end], r.copies)
                      for b in self.grad_buffer.buckets if b.experts == experts for r in b.runs)
            return weighted_sq_sum(pieces, self.shard_state.device)

        if not self.expert_parallel:
            return global_norm(squares(False), self.model_norm_groups + self.dense_norm_groups)
        total = summed(squares(False), self.dense_norm_groups) + summed(squares(True), self.expert_norm_groups)
        return global_norm(total, self.model_norm_groups)

    def _skip(self, norm: float, lr: float, what: str) -> StepResult:
        self.consecutive_skips += 1
        self.skipped_total += 1
        if self.consecutive_skips >= self.optim.max_consecutive_skips:
            raise TooManySkippedSteps(
                f"{self.consecutive_skips} consecutive optimizer steps were skipped (the last for a "
                f"non-finite {what}; grad norm {norm}); optim.max_consecutive_skips="
                f"{self.optim.max_consecutive_skips}. The loss or data likely diverged: lower optim.lr, "
                "check the batch for empty or corrupt samples, or resume from an earlier checkpoint")
        return StepResult(norm, True, lr, 1.0, self.consecutive_skips)

    def _update(self, lr: float, coef: float) -> None:
        """Clip, decay and Adam-update this rank's shard of every bucket."""
        buckets = self.grad_buffer.buckets
        grads = [self.grad_buffer.grad_shard(b) for b in buckets]
        rows = [self._shard_rows(b) for b in buckets]                   # [3, bucket shard] each
        wd = self.optim.weight_decay
        for bucket, grad, row in zip(buckets, grads, rows):
            if coef < 1.0:
                grad.mul_(coef)  # clip in place, as clip_grad_norm_ does; the buffer is zeroed next step
            for run in bucket.runs if wd else ():
                if run.decay:
                    row[MAIN, run.start:run.end].mul_(1 - lr * wd)
        if self.kernel == "fused":
            self._fused(grads, step=self.step_count, lr=lr)
        else:
            o = self.optim
            shards = [(r[MAIN], g, r[EXP_AVG], r[EXP_AVG_SQ]) for r, g in zip(rows, grads)]
            reference_update(shards, step=self.step_count, lr=lr, beta1=o.beta1, beta2=o.beta2, eps=o.eps)

    def max_abs_main_param(self) -> float:
        """Largest |fp32 main param| of this rank's shard; NaN or inf when some weight is not
        finite (amax propagates NaN, and unlike a sum of squares it cannot overflow)."""
        return float(torch.linalg.vector_norm(self.shard_state[MAIN], ord=math.inf))

    def main_params_from_model(self) -> None:
        """Set this rank's fp32 main params from the model params (after loading model weights
        into an already built optimizer; local, no communication)."""
        self.finish_param_sync()
        for bucket in self.grad_buffer.buckets:
            self._shard_rows(bucket)[MAIN].copy_(self.grad_buffer.param_shard(bucket))

    def publish_params(self, overlap: bool = False) -> None:
        """Cast the fp32 main shard into the model-dtype buffer and all-gather it over DP (after
        each update, or after writing main params through param_state()). A DP collective; with
        overlap it only launches the gathers (see register_param_sync_hooks)."""
        self.finish_param_sync()  # the local slices are the gathers' inputs
        for bucket in self.grad_buffer.buckets:
            self.grad_buffer.param_shard(bucket).copy_(self._shard_rows(bucket)[MAIN])
        self.grad_buffer.all_gather_params(overlap)

    def register_param_sync_hooks(self, modules) -> None:
        """Forward pre-hooks that wait for the overlapped parameter all-gather (needed only with
        parallel.overlap_param_gather; pass every module of this rank's model chunks)."""
        if self.overlap_param_gather:
            self.grad_buffer.register_param_sync_hooks(modules)

    def finish_param_sync(self) -> None:
        """Wait for the overlapped parameter all-gather: call before reading model weights outside
        a module forward (checkpoint save, export, comparisons)."""
        self.grad_buffer.finish_param_sync()

    def _shard_rows(self, bucket: Bucket) -> torch.Tensor:
        """[3, bucket shard numel] view of shard_state: main params, exp_avg, exp_avg_sq."""
        return self.shard_state[:, bucket.shard_offset:bucket.shard_offset + bucket.shard_numel]

    # ------------------------------------------------------------ inspection
    def state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank, measured from the tensors (≈ 12·N / DP)."""
        return self.shard_state.numel() * self.shard_state.element_size()

    def param_shards(self) -> list[ParamShard]:
        """Which elements of which parameter each column range of shard_state holds."""
        return self.grad_buffer.param_shards()

    def param_state(self, shard: ParamShard) -> dict[str, torch.Tensor]:
        """1-D views of shard_state for one ParamShard: fp32 main param, exp_avg, exp_avg_sq of the
        flattened-parameter elements [shard.param_start, shard.param_end)."""
        cols = slice(shard.shard_start, shard.shard_start + shard.param_end - shard.param_start)
        return {"main": self.shard_state[MAIN, cols], "exp_avg": self.shard_state[EXP_AVG, cols],
                "exp_avg_sq": self.shard_state[EXP_AVG_SQ, cols]}

    # ---------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """{"step": applied steps, "consecutive_skips", "skipped_total": the skip counters,
        "shard_state": the [3, S] fp32 tensor (not a copy)}. Map columns back to parameters with
        param_shards() (megasft.checkpoint stores them per canonical tensor that way)."""
        return {"step": self.step_count, "consecutive_skips": self.consecutive_skips,
                "skipped_total": self.skipped_total, "shard_state": self.shard_state}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a state_dict of the same layout (its shard_state may be this optimizer's own,
        already filled in place through param_state() views), then rebuild the model params from
        the fp32 main params (a DP collective)."""
        loaded = state_dict["shard_state"]
        if tuple(loaded.shape) != tuple(self.shard_state.shape):
            raise ValueError(f"optimizer shard_state has shape {tuple(loaded.shape)} but this rank's "
                             f"layout needs {tuple(self.shard_state.shape)}; the parallel layout or the "
                             "model changed — load per parameter through param_shards() instead")
        if loaded is not self.shard_state:
            self.shard_state.copy_(loaded)
        self.step_count = int(state_dict["step"])
        self.consecutive_skips = int(state_dict.get("consecutive_skips", 0))
        self.skipped_total = int(state_dict.get("skipped_total", 0))
        self.publish_params()

    def _expert_note(self) -> str:
        shards = {b.num_shards for b in self.grad_buffer.buckets if b.experts}
        return f" (routed experts over {shards.pop()} expert-DP ranks)" if shards and self.distributed else ""

    def describe(self) -> str:
        """One start-up line: state bytes per rank and what they hold."""
        n = sum(b.shard_numel for b in self.grad_buffer.buckets)
        return (f"optimizer: AdamW ({self.kernel} kernel), {'ZeRO-1 over' if self.distributed else 'replicated over'} "
                f"{self.grad_buffer.num_shards if self.distributed else 'all'} DP ranks{self._expert_note()}, "
                f"{len(self.grad_buffer.buckets)} bucket(s), state {self.state_bytes() / 2 ** 20:.1f} MiB "
                f"per rank (fp32 main params + 2 moments for {n:,} elements)")
