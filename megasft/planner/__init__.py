"""Memory/throughput planner: does a layout fit a cluster, how fast will it run, which is best.

Library entry points (``megasft plan`` is a thin CLI over them):

    plan(cfg, cluster, assumptions) -> Plan          per-stage memory, bubble, FLOPs, comm, step time, MFU
    check_fits(plan) -> Plan                         raises PlanError naming the overflowing number
    search(cfg, cluster, assumptions, top) -> [Plan] fitting layouts, fastest first
    nearest_fitting(cfg, cluster, ...) -> [Plan]     fitting layouts closest to cfg's own
    pin(cfg, world_size) -> Config                   a config with parallel.dp resolved, as plan() uses
    rank_state_bytes(cfg, pp_rank) -> StateBytes     exact weight/grad/optimizer bytes of one rank
    forward_flops_per_token(model, seq_len, ...)     exact GEMM + attention FLOPs per token

Context parallelism (parallel.cp, cp_comm ring | a2a): megasft.planner.context_parallel holds the
exchange volumes, the ring's overlap with the block attention and the ring-or-a2a rule.

Mixture-of-experts models (model.num_experts > 0) and expert parallelism (parallel.ep):
megasft.planner.moe holds the active-parameter count (FLOPs and MFU use it), the experts a rank
holds and the all-to-all volume (alltoall_bytes, one formula for the planner and benchmarks);
memory, activations, comm and the search read them from there.
"""
from megasft.planner.assumptions import Assumptions
from megasft.planner.estimate import Plan, PlanError, StageMemory, check_fits, plan
from megasft.planner.flops import forward_flops_per_token, model_flops_per_step
from megasft.planner.hardware import GPUS, Cluster, GpuSpec, make_cluster
from megasft.planner.memory import StateBytes, rank_parameters, rank_state_bytes
from megasft.planner.pinned import pin
from megasft.planner.search import Candidate, candidate_of, nearest_fitting, search

__all__ = [
    "Assumptions", "Plan", "PlanError", "StageMemory", "check_fits", "plan",
    "forward_flops_per_token", "model_flops_per_step", "GPUS", "Cluster", "GpuSpec", "make_cluster",
    "StateBytes", "rank_parameters", "rank_state_bytes", "pin",
    "Candidate", "candidate_of", "nearest_fitting", "search",
]
