"""One layout on one cluster: per-stage memory, step time, tokens/s and MFU, and whether it fits.

Step time (per optimizer step) is the pipeline time of the slowest stage plus the exposed
data-parallel communication and the optimizer update:

    t_mb    = GEMM FLOPs / (peak * matmul_eff) + attention FLOPs / (peak * attention_eff)
              + memory-bound elementwise traffic / HBM bandwidth
              + TP collectives + pipeline p2p            (per micro-batch, slowest pp rank)
              + CP exchange not hidden by attention      (megasft.planner.context_parallel)
              + EP all-to-alls of MoE layers             (megasft.planner.moe)
    t_pipe  = (m + bubble_slots) * t_mb                  bubble_slots = p-1, or (p-1)/v interleaved
                                                         (Narayanan et al. 2021 Sec. 2.2)
    t_step  = t_pipe + DP exposed + optimizer (memory-bound AdamW over this rank's shard)

where "DP exposed" is the weight all-gather plus the gradient reduction; with
``overlap_grad_reduce`` only the part of the reduction the last micro-batch's backward (2 of its 3
compute passes, 3 of 4 under full recompute) cannot hide, with ``overlap_param_gather`` only the
part of the all-gather the first micro-batch's forward cannot hide — each never less than one bucket.
    MFU     = model FLOPs per step / (t_step * world size * peak)
"""
from __future__ import annotations

from dataclasses import dataclass

from megasft.config import Config, ConfigError
from megasft.layout import Layout
from megasft.model.presets import count_parameters
from megasft.planner.activations import (ELEMENT_BYTES, held_activation_bytes, in_flight_layers, loss_bytes,
                                        rank_layer_activations)
from megasft.planner.assumptions import Assumptions
from megasft.planner.comm import RankComm, rank_comm
from megasft.planner.context_parallel import cp_transient_bytes, ring_merge_bytes
from megasft.planner.flops import executed_flops_per_micro_batch, model_flops_per_step
from megasft.planner.hardware import GIB, Cluster
from megasft.planner.memory import OPTIMIZER_BYTES, largest_parameter, rank_state_bytes
from megasft.planner.pinned import layout_of, pin, resolved_once

# AdamW reads the fp32 master weight, m, v and gradient (16 B), writes weight, m, v (12 B) and the
# bf16 copy of the weight (2 B): it is bound by memory bandwidth, not FLOPs.
ADAM_BYTES_PER_PARAM = 30


class PlanError(ConfigError):
    """A layout that does not fit the cluster; the message names the number that overflows."""


@dataclass(frozen=True)
class StageMemory:
    """Peak memory of one rank of a pipeline stage, by component (bytes)."""

    pp_rank: int
    layers: int
    parameters: int
    weights: float
    grads: float
    optimizer: float
    activations: float
    """Stored activations of every in-flight micro-batch chunk."""
    in_flight_layers: int
    """Layer-micro-batches those activations belong to."""
    transient: float
    """Largest short-lived buffer: one layer's backward working set or the loss/logits buffers."""
    transient_kind: str
    overhead: float
    """CUDA context, NCCL buffers, workspaces and allocator fragmentation."""

    @property
    def total(self) -> float:
        return (self.weights + self.grads + self.optimizer + self.activations + self.transient
                + self.overhead)

    def components(self) -> dict[str, float]:
        return {"weights": self.weights, "fp32 grads": self.grads, "optimizer": self.optimizer,
                "activations": self.activations, self.transient_kind: self.transient,
                "overhead": self.overhead}


@dataclass(frozen=True)
class Plan:
    """Everything the planner predicts for one config on one cluster."""

    config: Config
    layout: Layout
    cluster: Cluster
    assumptions: Assumptions
    parameters: int
    stages: tuple[StageMemory, ...]
    comm: tuple[RankComm, ...]
    bubble: float
    model_flops: float
    """Model FLOPs per optimizer step (for MFU)."""
    micro_batch_seconds: float
    """Forward+backward of one micro-batch on the slowest stage, communication included."""
    step_seconds: float

    @property
    def schedule(self) -> str:
        return self.layout.schedule

    @property
    def micro_batches(self) -> int:
        return self.layout.micro_batches

    @property
    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total)

    @property
    def fits(self) -> bool:
        return self.worst.total <= self.cluster.memory_bytes

    @property
    def tokens_per_second(self) -> float:
        return self.config.data.global_batch_tokens / self.step_seconds

    @property
    def mfu(self) -> float:
        peak = self.cluster.gpu.peak_tflops * 1e12
        return self.model_flops / (self.step_seconds * self.cluster.world_size * peak)


def stage_memory(cfg: Config, pp_rank: int, assumptions: Assumptions) -> StageMemory:
    """Peak memory of a rank of stage ``pp_rank``: state + in-flight activations + largest transient."""
    state = rank_state_bytes(cfg, pp_rank)
    layer = max((a for a, _ in rank_layer_activations(cfg, pp_rank, assumptions)), key=lambda a: a.full)
    held, stored = in_flight_layers(cfg, pp_rank), held_activation_bytes(cfg, pp_rank, assumptions)
    # Under full recompute the rematerialised layer and its gradient temporaries coexist; otherwise
    # the gradient temporaries of the layer in backward are bounded by that layer's activations.
    # A parameter's model-dtype .grad lives until the hook folds it into main_grad; under CP the
    # ring's in-flight K/V and dK/dV blocks (or the all-to-all's send copy) sit beside them.
    working = (layer.full * (2 if cfg.model.recompute == "full" else 1)
               + largest_parameter(cfg, pp_rank) * ELEMENT_BYTES[cfg.train.precision]
               + cp_transient_bytes(cfg))
    transient, kind = working, "layer backward"
    if pp_rank == layout_of(cfg).head_rank:
        loss = loss_bytes(cfg, assumptions)
        if loss > working:
            transient, kind = loss, "logits/loss"
    allocated = state.total + stored + transient
    overhead = assumptions.reserved_gib * GIB + assumptions.fragmentation * allocated
    return StageMemory(
        pp_rank=pp_rank, layers=sum(layout_of(cfg).rank_chunk_layers(pp_rank)), parameters=state.parameters,
        weights=state.weights, grads=state.grads, optimizer=state.optimizer,
        activations=stored, in_flight_layers=held, transient=transient,
        transient_kind=kind, overhead=overhead)


def fits_memory(cfg: Config, cluster: Cluster, assumptions: Assumptions = Assumptions()) -> bool:
    """Whether every stage of a pinned config fits (the memory half of :func:`plan`, for the search)."""
    with resolved_once():
        return all(stage_memory(cfg, rank, assumptions).total <= cluster.memory_bytes
                   for rank in range(cfg.parallel.pp))


def plan(cfg: Config, cluster: Cluster, assumptions: Assumptions = Assumptions()) -> Plan:
    """Plan ``cfg`` on ``cluster``; validates the config for the cluster's world size first."""
    return plan_pinned(pin(cfg, cluster.world_size), cluster, assumptions)


def plan_pinned(cfg: Config, cluster: Cluster, assumptions: Assumptions = Assumptions()) -> Plan:
    """:func:`plan` of a config already pinned for the cluster's world size (megasft.planner.pinned)."""
    with resolved_once():
        return _plan(cfg, cluster, assumptions)


def _plan(cfg: Config, cluster: Cluster, assumptions: Assumptions) -> Plan:
    layout, gpu = layout_of(cfg), cluster.gpu
    peak = gpu.peak_tflops * 1e12
    stages, comms, per_mb, tails = [], [], [], []
    for rank in range(layout.pp):
        stages.append(stage_memory(cfg, rank, assumptions))
        comm = rank_comm(cfg, cluster, rank, assumptions)
        comms.append(comm)
        gemm, attention = executed_flops_per_micro_batch(cfg, rank, assumptions)
        compute = (gemm / (peak * assumptions.matmul_efficiency)
                   + attention / (peak * assumptions.attention_efficiency)
                   + _elementwise_seconds(cfg, cluster, rank, assumptions))
        p2p = comm.pp_seconds_per_micro_batch * (1 - assumptions.p2p_overlap)
        per_mb.append(compute + comm.tp_seconds_per_micro_batch + comm.cp_seconds_per_micro_batch
                      + comm.ep_seconds_per_micro_batch + p2p)
        tails.append(_tail_seconds(cfg, cluster, rank, comm, compute))
    t_mb = max(per_mb)
    pipeline = (layout.micro_batches + layout.bubble_slots) * t_mb
    step = pipeline + max(tails)
    return Plan(
        config=cfg, layout=layout, cluster=cluster, assumptions=assumptions,
        parameters=count_parameters(cfg.model), stages=tuple(stages), comm=tuple(comms),
        bubble=layout.bubble_fraction,
        model_flops=model_flops_per_step(cfg), micro_batch_seconds=t_mb, step_seconds=step)


def _elementwise_seconds(cfg: Config, cluster: Cluster, pp_rank: int, assumptions: Assumptions) -> float:
    """Memory-bound time of one micro-batch on a rank: its layers' activations streamed through HBM,
    and under ring CP the merging of partial attention results."""
    passes = assumptions.elementwise_passes + (1 if cfg.model.recompute == "full" else 0)
    kinds = rank_layer_activations(cfg, pp_rank, assumptions)
    streamed = sum((passes * layer.full + ring_merge_bytes(cfg)) * n for layer, n in kinds)
    return streamed / (cluster.gpu.hbm_gbps * 1e9)


def _backward_share(cfg: Config) -> float:
    """Fraction of a micro-batch's compute spent in backward (recomputation runs inside it)."""
    return 3 / 4 if cfg.model.recompute == "full" else 2 / 3


def _tail_seconds(cfg: Config, cluster: Cluster, pp_rank: int, comm: RankComm, compute: float) -> float:
    """Per-step work outside the pipeline: exposed DP communication and the optimizer update
    (`compute`: one micro-batch's forward + backward on this rank)."""
    backward = compute * _backward_share(cfg)
    reduce, gather = comm.dp_reduce_seconds, comm.dp_gather_seconds
    if cfg.parallel.overlap_grad_reduce:
        reduce = max(comm.dp_bucket_seconds, reduce - backward)
    if cfg.parallel.overlap_param_gather:
        gather = max(comm.dp_gather_bucket_seconds, gather - (compute - backward))
    shard = rank_state_bytes(cfg, pp_rank).optimizer / OPTIMIZER_BYTES
    return reduce + gather + shard * ADAM_BYTES_PER_PARAM / (cluster.gpu.hbm_gbps * 1e9)


def check_fits(result: Plan) -> Plan:
    """Return ``result`` if its worst stage fits in device memory, else raise PlanError naming it."""
    if result.fits:
        return result
    worst, capacity = result.worst, result.cluster.memory_bytes
    name, size = max(worst.components().items(), key=lambda kv: kv[1])
    detail = ""
    if name == "activations":
        detail = (f" = {worst.in_flight_layers} in-flight layer-micro-batches x "
                  f"{worst.activations / worst.in_flight_layers / GIB:.2f} GiB "
                  f"(recompute={result.config.model.recompute}, micro_batch_size={result.config.data.micro_batch_size})")
    raise PlanError(
        f"layout does not fit: pp rank {worst.pp_rank} needs {worst.total / GIB:.1f} GiB > "
        f"{capacity / GIB:.1f} GiB on {result.cluster.gpu.name} "
        f"(over by {(worst.total - capacity) / GIB:.1f} GiB); largest part: {name} {size / GIB:.1f} GiB{detail}; "
        "`megasft plan --search` lists the layouts that fit")
