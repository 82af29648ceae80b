"""Enumerate layouts (tp, pp, v, dp, micro-batch, recompute) for a cluster and rank the ones that fit.

The global batch, sequence length, model and optimizer come from the config; only the layout
changes. Every candidate is checked by ``megasft.layout.Layout.resolve``; the search adds:

* tp stays inside a node (TP collectives run every layer; Narayanan et al. 2021 Sec. 3.3 takeaway #1).
* Sequence parallelism is on whenever tp > 1: it shards norm/dropout activations at the same
  communication volume (Korthikanti et al. 2022 Sec. 4.2.2), so turning it off never helps.
* Layers that do not split evenly into pp*v chunks get :func:`megasft.layout.balanced_pipeline_layers`.
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
from megasft.planner.estimate import Plan, plan
from megasft.planner.hardware import Cluster
from megasft.planner.pinned import layout_of, pin

RECOMPUTE_ORDER = ("none", "selective", "full")
MAX_VIRTUAL_STAGES = 8
MAX_MICRO_BATCH = 8


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

    def describe(self) -> str:
        sp = "+sp" if self.sequence_parallel else ""
        v = f" v{self.v}" if self.v > 1 else ""
        uneven = " (uneven layers)" if self.pipeline_layers else ""
        return (f"tp{self.tp}{sp} pp{self.pp}{v} dp{self.dp} mbs{self.micro_batch_size} "
                f"recompute={self.recompute}{uneven}")

    def overrides(self) -> list[str]:
        """``section.key=value`` overrides that turn a config into this layout."""
        layers = list(self.pipeline_layers) if self.pipeline_layers else "null"
        return [f"parallel.tp={self.tp}", f"parallel.pp={self.pp}", f"parallel.virtual_pipeline_size={self.v}",
                f"parallel.sequence_parallel={str(self.sequence_parallel).lower()}",
                f"parallel.pipeline_layers={layers}".replace(" ", ""),
                f"data.micro_batch_size={self.micro_batch_size}", f"model.recompute={self.recompute}"]


def candidate_of(cfg: Config) -> Candidate:
    """The search knobs of a pinned config (megasft.planner.pinned)."""
    p, layout = cfg.parallel, layout_of(cfg)
    layers = tuple(p.pipeline_layers) if p.pipeline_layers else None
    return Candidate(tp=p.tp, pp=p.pp, v=p.virtual_pipeline_size, dp=layout.dp,
                     micro_batch_size=cfg.data.micro_batch_size, recompute=cfg.model.recompute,
                     sequence_parallel=layout.sequence_parallel, pipeline_layers=layers)


def apply_candidate(cfg: Config, candidate: Candidate, world_size: int) -> Config:
    """A pinned copy of ``cfg`` with ``candidate``'s knobs; raises ConfigError if the layout is invalid."""
    new = copy.deepcopy(cfg)
    p = new.parallel
    p.tp, p.pp, p.virtual_pipeline_size, p.dp = candidate.tp, candidate.pp, candidate.v, None
    p.sequence_parallel = candidate.sequence_parallel
    p.pipeline_layers = list(candidate.pipeline_layers) if candidate.pipeline_layers else None
    p.pipeline_schedule = "auto"  # v picks 1F1B or interleaved
    new.data.micro_batch_size = candidate.micro_batch_size
    new.model.recompute = candidate.recompute
    return pin(new, world_size)


def _powers_of_two_divisors(n: int, limit: int) -> list[int]:
    return [2**k for k in range(int(math.log2(max(limit, 1))) + 1) if n % 2**k == 0]


def candidate_layouts(cfg: Config, cluster: Cluster) -> Iterator[tuple[Candidate, Config]]:
    """Every valid layout for ``cfg`` on ``cluster``, with its pinned config."""
    world, layers = cluster.world_size, cfg.model.num_layers
    rows = cfg.data.rows_per_step()
    for tp in [t for t in range(1, cluster.gpus_per_node + 1) if cluster.gpus_per_node % t == 0]:
        for pp in [q for q in range(1, min(world // tp, layers) + 1) if (world // tp) % q == 0]:
            dp = world // (tp * pp)
            if rows % dp:
                continue
            max_v = min(MAX_VIRTUAL_STAGES, layers // pp) if pp > 1 else 1
            for v in range(1, max_v + 1):
                split = balanced_pipeline_layers(layers, pp * v)
                if layers % (pp * v) and split is None:
                    continue
                for mbs in _powers_of_two_divisors(rows // dp, MAX_MICRO_BATCH):
                    for recompute in RECOMPUTE_ORDER:
                        candidate = Candidate(tp, pp, v, dp, mbs, recompute, tp > 1,
                                              tuple(split) if split else None)
                        try:
                            yield candidate, apply_candidate(cfg, candidate, world)
                        except ConfigError:   # e.g. interleaving with m not a multiple of pp
                            continue


def search(cfg: Config, cluster: Cluster, assumptions: Assumptions = Assumptions(),
           top: Optional[int] = None) -> list[Plan]:
    """Plans of every layout that fits, fastest (estimated tokens/s) first."""
    fitting = [p for _, c in candidate_layouts(cfg, cluster) if (p := plan(c, cluster, assumptions)).fits]
    fitting.sort(key=lambda p: -p.tokens_per_second)
    return fitting[:top] if top else fitting


def layout_distance(a: Candidate, b: Candidate) -> float:
    """How far apart two layouts are: log2 steps of each size knob plus recompute levels."""
    steps = sum(abs(math.log2(x) - math.log2(y)) for x, y in
                ((a.tp, b.tp), (a.pp, b.pp), (a.v, b.v), (a.micro_batch_size, b.micro_batch_size)))
    recompute = abs(RECOMPUTE_ORDER.index(a.recompute) - RECOMPUTE_ORDER.index(b.recompute))
    return steps + recompute + (a.sequence_parallel != b.sequence_parallel)


def nearest_fitting(cfg: Config, cluster: Cluster, assumptions: Assumptions = Assumptions(),
                    count: int = 3) -> list[Plan]:
    """The ``count`` fitting layouts closest to cfg's own (ties broken by estimated throughput)."""
    target = candidate_of(pin(cfg, cluster.world_size))
    fitting = search(cfg, cluster, assumptions)
    fitting.sort(key=lambda p: (layout_distance(candidate_of(p.config), target), -p.tokens_per_second))
    return fitting[:count]


def smallest_memory(cfg: Config, cluster: Cluster, assumptions: Assumptions = Assumptions()) -> Optional[Plan]:
    """The valid layout with the least per-GPU memory (its worst stage), fitting or not; None if
    the cluster admits no valid layout at all."""
    plans = (plan(c, cluster, assumptions) for _, c in candidate_layouts(cfg, cluster))
    return min(plans, key=lambda p: p.worst.total, default=None)


def nodes_needed(cfg: Config, cluster: Cluster, assumptions: Assumptions = Assumptions(),
                 max_nodes: int = 1024) -> Optional[int]:
    """The smallest node count (doubling from the cluster's) at which some layout fits; None when
    none does up to ``max_nodes`` (e.g. the global batch has too few rows to spread further)."""
    nodes = cluster.nodes * 2
    while nodes <= max_nodes:
        bigger = dataclasses.replace(cluster, nodes=nodes)
        if any(plan(c, bigger, assumptions).fits for _, c in candidate_layouts(cfg, bigger)):
            return nodes
        nodes *= 2
    return None
