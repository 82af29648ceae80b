"""The training loop: one optimizer step over a global batch, evaluation, logging, checkpoints.

Loss normalisation (the gradient-accumulation bug made impossible): before any backward, the
number of trained tokens in the *whole global batch* is counted from the labels of every
micro-batch and all-reduced over data-parallel ranks; each micro-batch back-propagates
``loss_sum / global_count``. Summed over micro-batches and DP ranks (gradients are reduced with a
sum), the update is the gradient of ``sum of token losses / global trained tokens`` whatever the
micro-batch split, DP size or packing.

Mixture-of-experts auxiliary losses (megasft.model.moe) are per micro-batch, as transformers computes
them for the batch it is given, pooled over the MoE layers of every pipeline stage
(megasft.training.moe_aux): each micro-batch back-propagates ``coef * aux / n``, n the number
of micro-batches in the global batch (over all DP ranks), so the update adds the gradient of the
mean of the micro-batches' aux losses — transformers' own aux loss when the global batch is one
micro-batch, and what HF Trainer's gradient accumulation with DDP averaging adds otherwise (every
micro-batch has the same s*b token slots, so this is also the token-weighted mean). The SFT loss
keeps its global trained-token normalisation; the logged ``loss`` is the SFT loss alone and
``aux_loss`` (unweighted, the mean over micro-batches) is logged beside it, with the tokens each
expert of each layer received since the last log point (``expert_load``). With DeepSeek-V3's
auxiliary-loss-free balancing (model.moe_bias_update_rate, megasft.model.router) every router's
bias takes one step after each optimizer step, from that step's expert load over all micro-batches
and DP ranks, and is logged as ``router_bias``.
"""
from __future__ import annotations

import math
import signal
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megasft import collectives
from megasft.config import Config
from megasft.context_parallel.sharding import split_micro_batch
from megasft.data.batch import MicroBatch
from megasft.layout import Layout
from megasft.model.build import build_model
from megasft.model.families import is_moe_layer
from megasft.model.fp8 import fp8_autocast
from megasft.model.router import update_router_biases
from megasft.optim.distributed_optimizer import DistributedOptimizer
from megasft.optim.lr_schedule import WarmupCosine
from megasft.parallel_state import ParallelState
from megasft.pipeline import schedules
from megasft.pipeline.zero_bubble import zero_bubble_store
from megasft.training import metrics
from megasft.training.comm_stats import CommStats
from megasft.training.faults import Faults
from megasft.training.generate_eval import GenerateEval
from megasft.training.moe_aux import AuxPool, open_pool_group
from megasft.training.profiler import maybe_profile


class NonFiniteWeights(RuntimeError):
    """An update left a NaN/inf in the fp32 main params; the run stops without saving them."""


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
    aux_loss: Optional[float] = None   # MoE: mean load-balancing loss of the micro-batches (unweighted)
    z_loss: Optional[float] = None     # MoE: mean router z-loss of the micro-batches (unweighted)


class Trainer:
    """Owns this rank's model chunks, optimizer and data; `fit()` runs the configured steps."""

    def __init__(self, cfg: Config, ps: ParallelState, log: bool = True, stop: Optional[StopSignal] = None,
                 layout: Optional[Layout] = None):
        self.cfg, self.ps = cfg, ps
        self.layout = layout or Layout.resolve(cfg, ps.world_size)   # train.py resolved it before any group
        self.chunks = build_model(cfg, ps, self.layout)
        self.weight_store = zero_bubble_store(self.layout.schedule, cfg, ps, self.chunks)
        self.schedule = WarmupCosine.from_config(cfg.optim, cfg.train.steps)
        named = [(f"chunk{i}.{n}", p) for i, c in enumerate(self.chunks) for n, p in c.named_parameters()]
        self.optimizer = DistributedOptimizer(named, cfg.optim, cfg.parallel, ps, self.schedule)
        self.optimizer.register_param_sync_hooks(m for c in self.chunks for m in c.modules())
        self.params = [p for _, p in named]
        self.step = 0
        self.best_eval: Optional[tuple[float, int]] = None
        self.stop = stop or StopSignal()
        self.log = log and ps.rank == 0
        self.fp8_autocast = fp8_autocast(cfg.train, ps)   # a null context unless train.fp8 is on
        # Testing aid (MEGASFT_FAULT): None in a normal run, so each hook costs one test per step.
        self.faults = Faults.from_env(ps.layout_ranks[ps.rank])
        self.comm = CommStats(cfg, ps)   # train.comm_stats: the ledger on logged steps
        self.generate_eval = GenerateEval.from_config(cfg, ps)   # train.generate_eval_interval; None when off
        # MoE: tokens per expert of the model's MoE layers since the last log point [2, all MoE
        # layers, E]: the router's picks, then those dropped over capacity (rows of other stages'
        # layers zero); and of this step's layers here [own MoE layers, E], picks and drops.
        self.expert_load: Optional[torch.Tensor] = None
        self.step_load: Optional[torch.Tensor] = None
        self.step_dropped: Optional[torch.Tensor] = None
        self.moe_layers = [i for i in range(cfg.model.num_layers) if is_moe_layer(cfg.model, i)]   # whole model
        if self.moe_layers and ps.pp > 1:
            open_pool_group(ps)

    # ------------------------------------------------------------------ one step
    def forward_step(self, loss_scale: float, pool: Optional[AuxPool] = None):
        """`loss_scale` 1 / (trained tokens of the global batch); `pool` (a MoE model in training)
        adds each micro-batch's auxiliary losses to its backward."""
        moe = self.cfg.model.num_experts > 0

        def step(chunk_index: int, batch: MicroBatch, input_tensor: Optional[torch.Tensor]):
            chunk = self.chunks[chunk_index]
            with self.fp8_autocast():   # one FP8 region per chunk forward; backward runs outside
                out = chunk(batch, input_tensor)
            if moe:   # every chunk of a MoE model reports its router statistics too
                *out, stats = out
            if not chunk.post_process:
                hidden = out[0] if moe else out
                return hidden if pool is None else pool.add(chunk_index, batch, stats, hidden)
            loss_sum, count = out
            loss = loss_sum * loss_scale
            if pool is not None:
                loss = pool.add(chunk_index, batch, stats, loss)
            return loss, {"loss_sum": loss_sum.detach(), "tokens": count}
        return step

    def run_schedule(self, micro_batches: list[MicroBatch], forward_only: bool):
        """Count the global trained tokens, run the pipeline schedule; returns (result, count)."""
        micro_batches = [mb.to(self.ps.device) for mb in micro_batches]
        count = torch.tensor([sum(mb.trained_tokens for mb in micro_batches)], dtype=torch.float64)
        collectives.all_reduce(count, self.ps.dp_group)   # counted on the full rows: CP ranks agree
        global_count = int(count.item())
        # Context parallelism: each CP rank keeps its s/cp tokens of every row (labels shifted first).
        micro_batches = [split_micro_batch(mb, self.ps.cp, self.ps.cp_rank) for mb in micro_batches]
        # An all-padding global batch trains nothing; scale 0 keeps the step well-defined.
        scale = 1.0 / global_count if global_count else 0.0
        for chunk in self.chunks:
            chunk.train(not forward_only)
        overlap = self.cfg.parallel.overlap_grad_reduce and not forward_only
        m, pool = self.cfg.model, None
        if m.num_experts and not forward_only:   # each micro-batch weighs 1 / (micro-batches over DP)
            pool = AuxPool(micro_batches, m.num_experts, len(self.chunks), self.ps.pp_aux_group,
                           1.0 / (len(micro_batches) * self.ps.dp), m.moe_aux_loss_coef, m.moe_z_loss_coef,
                           self.ps.device)
        result = schedules.forward_backward(
            self.forward_step(scale, pool), micro_batches, self.ps, num_chunks=self.layout.v,
            tensor_shape=self.layout.activation_shape, dtype=self.cfg.train.dtype,
            forward_only=forward_only, schedule=self.layout.schedule,
            no_sync=self.optimizer.grad_buffer.no_sync if overlap else None, weight_store=self.weight_store)
        if pool is not None:   # known on every rank; global_sums takes them from the loss's
            result.stats["aux_loss"], result.stats["z_loss"] = pool.losses()
            self.step_load, self.step_dropped = pool.step_load(), pool.step_dropped()
        return result, global_count

    def _update_router_biases(self) -> None:
        """The auxiliary-loss-free bias step of every MoE layer from this step's expert load, summed
        over DP (moe_stats summed the TP/SP and CP shares already; TP ranks without SP route the
        same tokens alike). In float64 the integer counts sum exactly in any order, so every rank
        applies the same update to its copy of the biases."""
        if self.step_load is None:   # a pipeline stage of dense layers only
            return
        load = self.step_load.to(torch.float64)
        collectives.all_reduce(load, self.ps.dp_group)
        update_router_biases(self._routers(), load, self.cfg.model.moe_bias_update_rate)

    def _routers(self) -> list:
        """The routers of this rank's MoE layers in the order of the rows of step_load."""
        return [layer.mlp.router for chunk in self.chunks for layer in chunk.layers.values() if layer.moe]

    def _model_table(self, rows: Optional[torch.Tensor]) -> torch.Tensor:
        """[all MoE layers of the model, E] float64: `rows` (one per MoE layer here, _routers' order)
        at their layers' rows, zeros at other stages' layers — summed over PP, the whole model's."""
        table = torch.zeros(len(self.moe_layers), self.cfg.model.num_experts, dtype=torch.float64,
                            device=self.ps.device)
        own = [self.moe_layers.index(int(i)) for chunk in self.chunks for i, layer in chunk.layers.items() if layer.moe]
        if rows is not None:
            table[own] = rows.to(table)
        return table

    def global_loss_sum(self, stats: dict) -> float:
        """Sum of token losses over the global batch, made known on every rank. Only the first TP
        rank of the stage holding the loss (the last; the first under ZBV) contributes, so TP
        copies are not counted twice."""
        return self.global_sums(stats, ("loss_sum",))[0]

    def global_sums(self, stats: dict, keys: tuple[str, ...]) -> list[float]:
        """The schedule's `keys` summed over the global batch, known on every rank, in one
        all-reduce. Only the first TP rank of the stage holding the loss contributes (every CP rank
        holds the loss of its own tokens); of the MoE losses, which every CP rank of a micro-batch
        holds whole, only the first CP rank."""
        ps = self.ps
        mine = ps.pp_rank == self.layout.head_rank and ps.tp_rank == 0
        values = torch.tensor([float(stats.get(k, 0.0)) if mine and (k == "loss_sum" or ps.cp_rank == 0) else 0.0
                               for k in keys], dtype=torch.float64)
        collectives.all_reduce(values, ps.world_group)
        return values.tolist()

    def train_step(self, micro_batches: list[MicroBatch]) -> StepOutput:
        faults, n = self.faults, self.step + 1
        if self.ps.heartbeat is not None:
            self.ps.heartbeat.step = n
        if faults is not None:
            faults.at_step_start(n)
        self.optimizer.zero_grad()
        result, global_count = self.run_schedule(micro_batches, forward_only=False)
        moe = self.cfg.model.num_experts > 0
        if moe:   # the log interval's load is the sum of its steps'
            load = torch.stack([self._model_table(self.step_load), self._model_table(self.step_dropped)])
            self.expert_load = load if self.expert_load is None else self.expert_load + load
        # The loss is the same number on every rank, so a non-finite one skips the step everywhere.
        sums = self.global_sums(result.stats, ("loss_sum", "aux_loss", "z_loss") if moe else ("loss_sum",))
        loss = sums[0] / max(global_count, 1)
        aux = [x / (len(micro_batches) * self.ps.dp) for x in sums[1:]] if moe else [None, None]
        if faults is not None:
            loss = faults.loss(n, loss)
            faults.before_update(n, self.optimizer.grad_buffer.grad_data)
        # Every grad sync (TP replicas, tied copies, DP), then AdamW.
        step = self.optimizer.step(loss_finite=math.isfinite(loss))
        if self.cfg.model.moe_bias_update_rate and not step.skipped:   # a skipped step changes no state
            self._update_router_biases()
        if faults is not None:
            faults.after_update(n, self.optimizer.shard_state[0])
        self.step += 1
        bubble = None
        if self.ps.pp > 1:   # rank 0 is on the first stage, which measures the pipeline's bubble
            bubble = (result.bubble_fraction, self.layout.bubble_fraction)
        return StepOutput(loss, global_count, step.grad_norm, step.lr, step.skipped, bubble, *aux)

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
            checkpointer=None) -> list[StepOutput]:
        """Train to cfg.train.steps (or a stop signal). `checkpointer` (a
        megasft.checkpoint.sharded.Checkpointer) saves on its cadence, at the end and on a stop."""
        t = self.cfg.train
        self.stop.install()
        window = metrics.ThroughputWindow(self.ps.device)
        outputs = []
        with maybe_profile(t.profile, t.run_dir, self.ps.rank, self.ps.device) as prof:
            while self.step < t.steps:
                micro_batches = train_loader.next_global_batch()
                logged = (self.step + 1) % t.log_interval == 0 or self.step + 1 == t.steps
                with self.comm.counting(logged):
                    out = self.train_step(micro_batches)
                prof.step()
                outputs.append(out)
                for line in train_loader.drain_tail_log():   # an epoch's last step filled / dropped
                    if self.log:
                        metrics.note(writer, f"megasft: step {self.step}: {line}")
                window.add(self.cfg.data.global_batch_tokens, out.trained_tokens, self._step_flops(micro_batches),
                           out.loss)
                if writer is not None:   # rank 0: run totals and the live progress line
                    writer.step(self.step, out.loss, self.cfg.data.global_batch_tokens, out.trained_tokens)
                if logged:
                    self._log_train(out, window, writer)
                if eval_loader is not None and t.eval_interval and (self.step % t.eval_interval == 0
                                                                     or self.step == t.steps):
                    self._eval_and_log(eval_loader, writer)
                    window.restart()   # evaluation time is not training throughput
                if self.generate_eval is not None and self.generate_eval.due(self.step):
                    self.optimizer.finish_param_sync()   # the overlapped ZeRO-1 gather: current weights
                    self.generate_eval.run(self.chunks, self.step, writer)
                    window.restart()
                stop, weights_finite = self._should_stop(out.skipped)
                if not weights_finite:   # before the checkpointer: a non-finite state is never saved
                    raise NonFiniteWeights(
                        f"step {self.step}: the update left a NaN/inf in the fp32 weights (grad norm "
                        f"{out.grad_norm:.4g}, lr {out.lr:.3g}); the run stops without saving it. "
                        "Resume from the last checkpoint with a lower optim.lr or a tighter optim.clip_grad")
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

    def _step_flops(self, micro_batches: list[MicroBatch]) -> float:
        """Model FLOPs of this step over all ranks (document lengths summed over DP; TP/PP copies
        of a micro-batch are the same work)."""
        squares = metrics.attention_squares(self.cfg.model, micro_batches)
        summed = torch.tensor(list(squares.values()), dtype=torch.float64)
        collectives.all_reduce(summed, self.ps.dp_group)
        squares = dict(zip(squares, (int(x) for x in summed.tolist())))
        return metrics.step_model_flops(self.cfg.model, self.cfg.data.global_batch_tokens, squares)

    def _log_train(self, out: StepOutput, window: "metrics.ThroughputWindow", writer) -> None:
        totals = window.close()
        moe = self._moe_record(out)   # a DP collective: before rank 0 alone goes on
        if writer is None:
            return
        writer.write(metrics.TrainRecord(
            step=self.step, lr=out.lr, loss=out.loss, grad_norm=out.grad_norm, window=totals,
            world_size=self.ps.world_size, peak_tflops=self.cfg.train.peak_tflops,
            peak_mem=metrics.peak_memory_bytes(self.ps.device), skipped=self.optimizer.skipped_total,
            bubble=out.bubble).as_dict() | self.comm.as_record() | moe)
        if self.comm.report is not None:
            metrics.note(writer, self.comm.line(self.step))

    def _moe_record(self, out: StepOutput) -> dict:
        """MoE fields of a train record: the last step's aux losses and the expert load of every
        MoE layer since the last log point, summed over DP (collectives over the DP and PP groups:
        every rank calls it)."""
        if out.aux_loss is None:
            return {}
        record = {"aux_loss": out.aux_loss, "z_loss": out.z_loss}
        if self.expert_load is None:   # no training step since the last log point (on every rank)
            return record
        load = self.expert_load
        collectives.all_reduce(load, self.ps.dp_group)
        collectives.all_reduce(load, self.ps.pp_group)   # each stage holds the rows of its own layers
        self.expert_load = None
        load = load.cpu()
        record |= metrics.expert_load_record(load[0], self.moe_layers)
        if self.cfg.model.moe_capacity_factor is not None:
            record |= metrics.expert_dropped_record(load[1], load[0], self.moe_layers)
        if self.cfg.model.moe_router == "sigmoid_group":   # the same on every rank of a stage
            routers = self._routers()
            bias = self._model_table(torch.stack([r.e_score_correction_bias for r in routers]) if routers else None)
            collectives.all_reduce(bias, self.ps.pp_group)
            record["router_bias"] = {layer: row.tolist() for layer, row in zip(self.moe_layers, bias.cpu())}
        return record

    def _should_stop(self, skipped: bool) -> tuple[bool, bool]:
        """(stop requested on some rank, weights finite on every rank) in one MAX all-reduce: the
        weight check rides on the stop flag's reduction (a skipped step changed no weight)."""
        bad = not skipped and not math.isfinite(self.optimizer.max_abs_main_param())
        flags = torch.tensor([1.0 if self.stop_requested else 0.0, 1.0 if bad else 0.0])
        collectives.all_reduce(flags, self.ps.world_group, op=dist.ReduceOp.MAX)   # stop together (no-op alone)
        return bool(flags[0].item()), not bool(flags[1].item())

    def _eval_and_log(self, eval_loader, writer) -> None:
        per_source: dict = {}
        if getattr(eval_loader, "per_source", False):   # data.sources: one eval split per source
            from megasft.training.evaluate import evaluate_mixture
            loss, tokens, per_source = evaluate_mixture(self, eval_loader)
        else:
            loss, tokens = self.evaluate(eval_loader)
        if self.best_eval is None or loss < self.best_eval[0]:
            self.best_eval = (loss, self.step)
        if writer is not None:
            writer.write({"kind": "eval", "step": self.step, "eval_loss": loss, "eval_tokens": tokens,
                          "best_eval_loss": self.best_eval[0], "best_step": self.best_eval[1], **per_source})
