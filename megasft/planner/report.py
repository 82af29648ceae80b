"""Human-readable text for plans and search results (memory in GiB = 2^30 bytes)."""
from __future__ import annotations

from megasft.layout import INTERLEAVED, NO_PIPELINE, ZB_H1, ZBV
from megasft.planner.activations import local_tokens
from megasft.planner.context_parallel import A2A, RING, a2a_possible, cp_exposed_seconds, layer_bytes
from megasft.planner.estimate import Plan, StageMemory
from megasft.planner.hardware import GIB
from megasft.planner.memory import expert_zero_shards
from megasft.planner.moe import active_parameter_count, moe_layer_ids
from megasft.planner.search import candidate_of


def _stage_label(plan: Plan, stage: StageMemory) -> str:
    head = plan.layout.head_rank
    roles = [r for r, yes in (("embedding", stage.pp_rank == 0), ("LM head + loss", stage.pp_rank == head)) if yes]
    return f"pp rank {stage.pp_rank}" + (f" ({', '.join(roles)})" if roles else "")


def format_layout(plan: Plan) -> str:
    cfg, p = plan.config, plan.config.parallel
    return (f"{plan.layout.describe()}; micro-batch {cfg.data.micro_batch_size} x {cfg.data.seq_len} tokens, "
            f"{plan.micro_batches} micro-batches/step; recompute={cfg.model.recompute}; "
            f"ZeRO-1 {'on' if p.distributed_optimizer else 'off'}; {cfg.train.precision}")


def format_plan(plan: Plan) -> str:
    """The full breakdown ``megasft plan`` prints for one layout."""
    cluster, m = plan.cluster, plan.config.model
    gpu = cluster.gpu
    worst = plan.worst
    active = f" ({active_parameter_count(m):,} active)" if m.num_experts else ""
    lines = [
        f"model    {m.preset or 'custom'}: {plan.parameters:,} parameters{active} ({m.num_layers} layers, hidden "
        f"{m.hidden_size}, ffn {m.intermediate_size}, {m.num_attention_heads} heads / {m.kv_heads} kv, "
        f"vocab {m.vocab_size}{', tied' if m.tie_embeddings else ''})",
        *_expert_lines(plan),
        f"cluster  {cluster.nodes} nodes x {cluster.gpus_per_node} {gpu.name} ({gpu.memory_gib:.1f} GiB, "
        f"{gpu.peak_tflops:.0f} TFLOP/s bf16, {gpu.intra_node_gbps:.0f} GB/s intra-node, "
        f"{gpu.inter_node_gbps:.0f} GB/s inter-node per GPU)",
        f"layout   {format_layout(plan)}",
        "",
        f"per-rank memory, worst stage = {_stage_label(plan, worst)}",
        *_memory_rows(plan, worst),
        "  total GiB by pp rank: " + ", ".join(f"{s.pp_rank}: {s.total / GIB:.1f}" for s in _stage_sample(plan)),
        "",
        f"pipeline bubble   {plan.bubble * 100:.1f} % ({_bubble_formula(plan)})",
        f"model FLOPs/step  {plan.model_flops:.3e} (6*N{'_active' if m.num_experts else ''}*T + 12*L*h*s*T, "
        "Narayanan et al. 2021 eq. 3)",
        f"comm/step/rank    TP {_max(plan, 'tp_bytes'):.1f} GB, PP {_max(plan, 'pp_bytes'):.2f} GB, "
        + (f"CP {_max(plan, 'cp_bytes'):.1f} GB, " if plan.layout.cp > 1 else "")
        + (f"EP all-to-all {_max(plan, 'ep_bytes'):.1f} GB, " if plan.config.parallel.ep > 1 else "")
        + f"DP {_max(plan, 'dp_bytes'):.2f} GB",
        *_context_parallel_lines(plan),
        f"step time         {plan.step_seconds:.2f} s ({plan.micro_batch_seconds * 1e3:.0f} ms per micro-batch "
        f"on the slowest stage)",
        f"throughput        {plan.tokens_per_second:,.0f} tokens/s ({plan.tokens_per_second / cluster.world_size:,.0f} "
        f"per GPU), MFU {plan.mfu * 100:.1f} %",
    ]
    return "\n".join(lines)


def _memory_rows(plan: Plan, stage: StageMemory) -> list[str]:
    cfg, cluster = plan.config, plan.cluster
    rows = [
        (f"{cfg.train.precision} weights", f"{stage.parameters:,} params", stage.weights),
        ("fp32 main grads", "4 B/param", stage.grads),
        ("optimizer shard", _shard_label(plan), stage.optimizer),
        ("activations", f"{stage.in_flight_layers} layer-micro-batches in flight x "
         f"{stage.activations / max(stage.in_flight_layers, 1) / 2**20:.0f} MiB", stage.activations),
        (stage.transient_kind, "largest transient buffer", stage.transient),
        ("CUDA/NCCL overhead", "reserved + fragmentation", stage.overhead),
    ]
    lines = [f"  {label:<20}{detail:<42}{value / GIB:8.2f} GiB" for label, detail, value in rows]
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    lines.append(f"  {'total':<62}{stage.total / GIB:8.2f} GiB of {cluster.gpu.memory_gib:.1f} -> {verdict} "
                 f"({(cluster.memory_bytes - stage.total) / GIB:+.1f} GiB headroom)")
    return lines


def _expert_lines(plan: Plan) -> list[str]:
    """A MoE model's experts: how many each rank holds and whom their gradients are reduced over."""
    m, ep = plan.config.model, plan.config.parallel.ep
    if not m.num_experts:
        return []
    layers = len(moe_layer_ids(m, range(m.num_layers)))
    return [f"experts  {m.num_experts} per MoE layer ({layers} of {m.num_layers} layers), top-{m.moe_top_k}, width "
            f"{m.moe_intermediate_size or m.intermediate_size}; ep {ep}: {m.num_experts // ep} per rank, their "
            f"grads reduced over {expert_zero_shards(plan.config)} expert-DP rank(s)"]


def _shard_label(plan: Plan) -> str:
    layout, p = plan.layout, plan.config.parallel
    if not p.distributed_optimizer:
        return "12 B/param (no ZeRO-1)"
    dense = f"(dp {layout.dp} x cp {layout.cp})" if layout.cp > 1 else f"dp {layout.dp}"
    if p.ep > 1:
        return f"12 B/param / {dense}, experts / {expert_zero_shards(plan.config)}"
    return f"12 B/param / {dense}"


def _context_parallel_lines(plan: Plan) -> list[str]:
    """What CP costs: tokens per rank, the exchange per layer, what compute hides, the other exchange."""
    layout, cfg = plan.layout, plan.config
    if layout.cp == 1:
        return []
    slowest = max(range(layout.pp), key=lambda r: plan.comm[r].cp_seconds_per_micro_batch)
    exposed = plan.comm[slowest].cp_seconds_per_micro_batch
    forward, backward = layer_bytes(cfg)
    line = (f"context parallel  cp {layout.cp} ({layout.cp_comm}): {local_tokens(cfg):,} tokens per rank; per layer "
            f"{forward / 2**20:.1f} MiB forward + {backward / 2**20:.1f} MiB backward sent; "
            f"{exposed * 1e3:.1f} ms/micro-batch not hidden by compute")
    other = A2A if layout.cp_comm == RING else RING
    if other == A2A and not a2a_possible(cfg):
        return [line, f"                  a2a impossible: cp {layout.cp} does not divide "
                      f"{cfg.model.num_attention_heads // layout.tp} query heads per TP rank"]
    alternative = cp_exposed_seconds(cfg, plan.cluster, slowest, plan.assumptions, other)
    return [line, f"                  cp_comm={other} would leave {alternative * 1e3:.1f} ms/micro-batch exposed"]


def _stage_sample(plan: Plan) -> list[StageMemory]:
    stages = plan.stages
    if len(stages) <= 6:
        return list(stages)
    return list(stages[:3]) + list(stages[-3:])


def _bubble_formula(plan: Plan) -> str:
    p, m = plan.config.parallel, plan.micro_batches
    if plan.schedule == NO_PIPELINE:
        return "no pipeline"
    if plan.schedule == INTERLEAVED:
        v = p.virtual_pipeline_size
        return f"(p-1)/(v*m+p-1) = {p.pp - 1}/({v}*{m}+{p.pp - 1})"
    if plan.schedule == ZB_H1:
        if m < p.pp:
            return f"ZB-H1 with m={m} < p={p.pp}: its unit-cost timeline"
        return f"ZB-H1 (p-1)/(3m+p-1) = {p.pp - 1}/(3*{m}+{p.pp - 1})"
    if plan.schedule == ZBV:
        if m < p.pp:
            return f"ZBV with m={m} < p={p.pp}: its unit-cost timeline"
        return f"ZBV (p-1)/(6m+p-1) = {p.pp - 1}/(6*{m}+{p.pp - 1})"
    return f"(p-1)/(m+p-1) = {p.pp - 1}/({m}+{p.pp - 1})"


def _max(plan: Plan, field: str) -> float:
    return max(getattr(c, field) for c in plan.comm) / 1e9


def format_search(plans: list[Plan]) -> str:
    """One line per layout, in the given (ranked) order."""
    header = f"{'#':>3}  {'layout':<58} {'GiB':>6} {'tokens/s':>10} {'MFU':>6} {'bubble':>7}"
    rows = [header]
    for i, p in enumerate(plans, 1):
        rows.append(f"{i:>3}  {candidate_of(p.config).describe():<58} {p.worst.total / GIB:6.1f} "
                    f"{p.tokens_per_second:10,.0f} {p.mfu * 100:5.1f}% {p.bubble * 100:6.1f}%")
    return "\n".join(rows)


def format_overrides(plan: Plan) -> str:
    """The ``section.key=value`` overrides that select this plan's layout."""
    return " ".join(candidate_of(plan.config).overrides())
