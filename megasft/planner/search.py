"""Enumerate layouts (tp, cp, pp, v, dp, ep, micro-batch, recompute) for a cluster and rank the ones that fit.

The global batch, sequence length, model and optimizer come from the config; only the layout
changes. Every candidate is checked by ``megasft.layout.Layout.resolve``; the search adds:

* tp stays inside a node (TP collectives run every layer; Narayanan et al. 2021 Sec. 3.3 takeaway #1).
* Sequence parallelism is on whenever tp > 1: it shards norm/dropout activations at the same
  communication volume (Korthikanti et al. 2022 Sec. 4.2.2), so turning it off never helps.
* Layers that do not split evenly into pp*v chunks get :func:`megasft.layout.balanced_pipeline_layers`.
* Context parallelism: cp runs over powers of two up to MAX_CP that leave whole dp ranks (and a
  seq_len in 2*cp chunks, which Layout.resolve checks); each cp > 1 is tried with the ring and, where
  cp divides the query heads per TP rank, the all-to-all exchange — the ranking (exposed exchange
  time, memory) picks between them as ``megasft.planner.context_parallel.preferred_cp_comm`` does.
* Expert parallelism (a mixture-of-experts model): ep runs over the divisors of dp * cp that
  divide num_experts (the EP group is carved from the dp x cp ranks); a dense model keeps ep = 1. Layout.resolve
  refuses what megasft cannot run.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Iterator, Optional

from megasft.config import Config, ConfigError
from megasft.layout import balanced_pipeline_layers
from megasft.planner.assumptions import Assumptions
from megasft.planner.estimate import Plan, fits_memory, plan_pinned
from megasft.planner.hardware import Cluster
from megasft.planner.pinned import layout_of, pin, pin_in_place

RECOMPUTE_ORDER = ("none", "selective", "full")
MAX_VIRTUAL_STAGES = 8
MAX_MICRO_BATCH = 8
MAX_CP = 64


@dataclass(frozen=True)
class Candidate:
    """The knobs the search varies."""

    tp: int
    pp: int
    v: int
    dp: int
    micro_batch_size: int
    recompute: str
    sequence_parallel: bool
    pipeline_layers: Optional[tuple[int, ...]] = None
    cp: int = 1
    cp_comm: str = "ring"
    ep: int = 1

    def describe(self) -> str:
        sp = "+sp" if self.sequence_parallel else ""
        cp = f" cp{self.cp}-{self.cp_comm}" if self.cp > 1 else ""
        v = f" v{self.v}" if self.v > 1 else ""
        ep = f" ep{self.ep}" if self.ep > 1 else ""
        uneven = " (uneven layers)" if self.pipeline_layers else ""
        return (f"tp{self.tp}{sp}{cp} pp{self.pp}{v} dp{self.dp}{ep} mbs{self.micro_batch_size} "
                f"recompute={self.recompute}{uneven}")

    def overrides(self) -> list[str]:
        """``section.key=value`` overrides that turn a config into this layout."""
        layers = list(self.pipeline_layers) if self.pipeline_layers else "null"
        return [f"parallel.tp={self.tp}", f"parallel.cp={self.cp}", f"parallel.cp_comm={self.cp_comm}",
                f"parallel.pp={self.pp}", f"parallel.virtual_pipeline_size={self.v}", f"parallel.ep={self.ep}",
                f"parallel.sequence_parallel={str(self.sequence_parallel).lower()}",
                f"parallel.pipeline_layers={layers}".replace(" ", ""),
                f"data.micro_batch_size={self.micro_batch_size}", f"model.recompute={self.recompute}"]


def candidate_of(cfg: Config) -> Candidate:
    """The search knobs of a pinned config (megasft.planner.pinned)."""
    p, layout = cfg.parallel, layout_of(cfg)
    layers = tuple(p.pipeline_layers) if p.pipeline_layers else None
    return Candidate(tp=p.tp, pp=p.pp, v=p.virtual_pipeline_size, dp=layout.dp,
                     micro_batch_size=cfg.data.micro_batch_size, recompute=cfg.model.recompute,
                     sequence_parallel=layout.sequence_parallel, pipeline_layers=layers,
                     cp=layout.cp, cp_comm=layout.cp_comm if layout.cp > 1 else "ring", ep=p.ep)


def apply_candidate(cfg: Config, candidate: Candidate, world_size: int) -> Config:
    """A pinned copy of ``cfg`` with ``candidate``'s knobs; raises ConfigError if the layout is invalid.
    Only the sections it changes are copied (the planner never writes to a config)."""
    new = copy.copy(cfg)
    new.parallel, new.data, new.model = copy.copy(cfg.parallel), copy.copy(cfg.data), copy.copy(cfg.model)
    p = new.parallel
    p.tp, p.pp, p.virtual_pipeline_size, p.dp = candidate.tp, candidate.pp, candidate.v, None
    p.cp, p.cp_comm, p.ep = candidate.cp, candidate.cp_comm, candidate.ep
    p.sequence_parallel = candidate.sequence_parallel
    p.pipeline_layers = list(candidate.pipeline_layers) if candidate.pipeline_layers else None
    p.pipeline_schedule = "auto"  # v picks 1F1B or interleaved
    new.data.micro_batch_size = candidate.micro_batch_size
    new.model.recompute = candidate.recompute
    return pin_in_place(new, world_size)


def _powers_of_two_divisors(n: int, limit: int) -> list[int]:
    return [2**k for k in range(int(math.log2(max(limit, 1))) + 1) if n % 2**k == 0]


def expert_parallel_sizes(cfg: Config, replicas: int) -> list[int]:
    """The ep a layout of `replicas` = dp * cp ranks per stage can use: divisors of dp * cp that
    divide num_experts (only 1 for a dense model)."""
    experts = cfg.model.num_experts
    return [e for e in range(1, replicas + 1) if replicas % e == 0 and experts % e == 0] if experts else [1]


def _splits(cfg: Config, cluster: Cluster) -> Iterator[tuple[int, int, int, str, int, int]]:
    """(tp, pp, cp, cp_comm, dp, ep) of every split of the cluster that leaves whole rows per dp rank."""
    world, layers = cluster.world_size, cfg.model.num_layers
    rows = cfg.data.rows_per_step()
    for tp in [t for t in range(1, cluster.gpus_per_node + 1) if cluster.gpus_per_node % t == 0]:
        for pp in [q for q in range(1, min(world // tp, layers) + 1) if (world // tp) % q == 0]:
            for cp in _powers_of_two_divisors(world // (tp * pp), MAX_CP):
                dp = world // (tp * pp * cp)
                if rows % dp or cfg.data.seq_len % (2 * cp):
                    continue
                a2a = cp > 1 and (cfg.model.num_attention_heads // tp) % cp == 0
                for comm in ("ring", "a2a") if a2a else ("ring",):
                    for ep in expert_parallel_sizes(cfg, dp * cp):
                        yield tp, pp, cp, comm, dp, ep


def _variants(cfg: Config, cluster: Cluster) -> Iterator[list[list[Candidate]]]:
    """Per split and pipeline chunking, its candidates by micro-batch size (ascending), each a list
    over the recompute modes."""
    layers, rows = cfg.model.num_layers, cfg.data.rows_per_step()
    for tp, pp, cp, comm, dp, ep in _splits(cfg, cluster):
        max_v = min(MAX_VIRTUAL_STAGES, layers // pp) if pp > 1 else 1
        for v in range(1, max_v + 1):
            split = balanced_pipeline_layers(layers, pp * v)
            if layers % (pp * v) and split is None:
                continue
            yield [[Candidate(tp, pp, v, dp, mbs, recompute, tp > 1, tuple(split) if split else None, cp, comm, ep)
                     for recompute in RECOMPUTE_ORDER]
                   for mbs in _powers_of_two_divisors(rows // dp, MAX_MICRO_BATCH)]


def _pinned(cfg: Config, candidate: Candidate, world: int) -> Optional[Config]:
    try:
        return apply_candidate(cfg, candidate, world)
    except ConfigError:   # e.g. interleaving with m not a multiple of pp
        return None


def candidate_layouts(cfg: Config, cluster: Cluster, smallest_micro_batch: bool = False
                      ) -> Iterator[tuple[Candidate, Config]]:
    """Every valid layout for ``cfg`` on ``cluster``, with its pinned config (with
    ``smallest_micro_batch``: only each chunking's smallest valid micro-batch size)."""
    for by_mbs in _variants(cfg, cluster):
        for variants in by_mbs:
            pinned = [(c, p) for c in variants if (p := _pinned(cfg, c, cluster.world_size)) is not None]
            yield from pinned
            if pinned and smallest_micro_batch:
                break


def fitting_layouts(cfg: Config, cluster: Cluster, assumptions: Assumptions = Assumptions()) -> Iterator[Config]:
    """Pinned configs of every valid layout that fits. Activation memory grows with the micro-batch
    and nothing else does, so once no recompute mode fits at one micro-batch size the larger
    ones are skipped unplanned (with tp x cp x pp x v x mbs x recompute x cp_comm the full
    enumeration runs to tens of thousands of layouts on a large cluster, most of them too big)."""
    for by_mbs in _variants(cfg, cluster):
        for variants in by_mbs:
            pinned = [p for c in variants if (p := _pinned(cfg, c, cluster.world_size)) is not None]
            fitting = [p for p in pinned if fits_memory(p, cluster, assumptions)]
            yield from fitting
            if pinned and not fitting:
                break


def search(cfg: Config, cluster: Cluster, assumptions: Assumptions = Assumptions(),
           top: Optional[int] = None) -> list[Plan]:
    """Plans of every layout that fits, fastest (estimated tokens/s) first."""
    fitting = [plan_pinned(c, cluster, assumptions) for c in fitting_layouts(cfg, cluster, assumptions)]
    fitting.sort(key=lambda p: -p.tokens_per_second)
    return fitting[:top] if top else fitting


def layout_distance(a: Candidate, b: Candidate) -> float:
    """How far apart two layouts are: log2 steps of each size knob plus recompute levels."""
    steps = sum(abs(math.log2(x) - math.log2(y)) for x, y in
                ((a.tp, b.tp), (a.cp, b.cp), (a.pp, b.pp), (a.v, b.v), (a.ep, b.ep),
                 (a.micro_batch_size, b.micro_batch_size)))
    recompute = abs(RECOMPUTE_ORDER.index(a.recompute) - RECOMPUTE_ORDER.index(b.recompute))
    return steps + recompute + (a.sequence_parallel != b.sequence_parallel) + (a.cp_comm != b.cp_comm)


def nearest_fitting(cfg: Config, cluster: Cluster, assumptions: Assumptions = Assumptions(),
                    count: int = 3) -> list[Plan]:
    """The ``count`` fitting layouts closest to cfg's own (ties broken by estimated throughput)."""
    target = candidate_of(pin(cfg, cluster.world_size))
    fitting = search(cfg, cluster, assumptions)
    fitting.sort(key=lambda p: (layout_distance(candidate_of(p.config), target), -p.tokens_per_second))
    return fitting[:count]


def smallest_memory(cfg: Config, cluster: Cluster, assumptions: Assumptions = Assumptions()) -> Optional[Plan]:
    """The valid layout with the least per-GPU memory (its worst stage), fitting or not; None if
    the cluster admits no valid layout at all. Memory grows with the micro-batch, so only each
    chunking's smallest valid micro-batch size is planned."""
    plans = (plan_pinned(c, cluster, assumptions) for _, c in candidate_layouts(cfg, cluster, True))
    return min(plans, key=lambda p: p.worst.total, default=None)


def nodes_needed(cfg: Config, cluster: Cluster, assumptions: Assumptions = Assumptions(),
                 max_nodes: int = 1024) -> Optional[int]:
    """The smallest node count (doubling from the cluster's) at which some layout fits; None when
    none does up to ``max_nodes`` (e.g. the global batch has too few rows to spread further)."""
    nodes = cluster.nodes * 2
    while nodes <= max_nodes:
        bigger = dataclasses.replace(cluster, nodes=nodes)
        if next(fitting_layouts(cfg, bigger, assumptions), None) is not None:
            return nodes
        nodes *= 2
    return None
