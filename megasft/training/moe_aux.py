"""A micro-batch's MoE auxiliary losses pooled over the model chunks of every pipeline stage.

transformers' load-balancing loss (megasft.model.moe) pools the routers of all MoE layers of a
micro-batch, with N the (layer, token) pairs, F_i the top-k picks of expert i (a count, no
gradient), P_i the sum of its router probabilities and Z the sum of logsumexp(logits)^2:

    aux = E * sum_i (F_i / N) (P_i / N)        z = Z / N

Under pipeline parallelism each stage holds some of the layers, but the loss is linear in each
stage's share of P and of Z: d aux / d P_i = E F_i / N^2 and d z / d Z = 1 / N, whichever stage the
share came from. So a stage needs the whole model's F and N — numbers, not graphs — only when its
backward runs. After a rank has run the forward of all its chunks on micro-batch m it sums their
MoEStats into one float64 vector [F (E), P (E), Z, N] and starts an asynchronous all-reduce of it
over its pipeline group (ps.pp_aux_group, a group of its own so that it never queues behind or
ahead of the stages' p2p messages). The backward of each chunk's output then waits for it and
adds the weighted gradients to the chunk's own P and Z (_PooledAux); the SFT loss's gradient passes
through unchanged. At pp=1 the vector is the rank's own and nothing is sent.

Why this cannot deadlock: a rank's chunk forwards of one micro-batch happen in micro-batch order,
so every rank starts its all-reduces in increasing m, the same order everywhere. A rank waits for
m's only in a backward of m, and every backward of m comes after the loss forward of m, which comes
after every stage's forwards of m — by then every rank has started its all-reduce of m (and of
every earlier micro-batch).
"""
from __future__ import annotations

from typing import Optional

import torch

from megasft import collectives
from megasft.model.moe import MoEStats


def open_pool_group(ps) -> None:
    """Run one collective on ps.pp_aux_group at start-up (every rank of the layout calls it). NCCL
    creates a communicator on a group's first collective and blocks until every member joins; left
    to the first micro-batch, a stage would block there, inside its forward and before sending the
    activation the next stage waits for."""
    collectives.all_reduce(torch.zeros(1, device=ps.device), ps.pp_aux_group)


class AuxPool:
    """One schedule run's pooled MoE statistics, per micro-batch of `micro_batches` (the objects the
    schedule passes to forward_step). `scale` weighs one micro-batch's losses in the global batch,
    `aux_coef` and `z_coef` are model.moe_aux_loss_coef and moe_z_loss_coef; `chunks` this rank's
    model chunks, each of which reports once per micro-batch."""

    def __init__(self, micro_batches: list, num_experts: int, chunks: int, group, scale: float,
                 aux_coef: float, z_coef: float, device: torch.device):
        self.index = {id(mb): m for m, mb in enumerate(micro_batches)}
        self.experts, self.chunks, self.group = num_experts, chunks, group
        self.aux_weight, self.z_weight = scale * aux_coef, scale * z_coef
        self.totals = [torch.zeros(MoEStats.pooled_numel(num_experts), dtype=torch.float64, device=device)
                       for _ in micro_batches]                                # [F | P | Z | N] per micro-batch
        self.seen = [0] * len(micro_batches)
        self.works: list = [None] * len(micro_batches)
        self.loads: dict[int, torch.Tensor] = {}                               # chunk -> [layers, E] this step
        self.drops: dict[int, torch.Tensor] = {}                               # the same, picks over capacity

    def add(self, chunk: int, micro_batch, stats: Optional[MoEStats], out: torch.Tensor) -> torch.Tensor:
        """Count one chunk forward's statistics; returns `out` (its activation, or the scaled loss)
        carrying the backward of the micro-batch's pooled losses into `stats`."""
        m, E = self.index[id(micro_batch)], self.experts
        if stats is not None:
            total = self.totals[m]
            total[:E] += stats.load.sum(dim=0)
            total[E:2 * E] += stats.prob_sum.detach()
            total[2 * E] += stats.lse_sq.detach()
            total[2 * E + 1] += stats.pairs
            _accumulate(self.loads, chunk, stats.load.detach())
            if stats.dropped is not None:
                _accumulate(self.drops, chunk, stats.dropped)
            if self.aux_weight or self.z_weight:
                out = _PooledAux.apply(out, stats.prob_sum, stats.lse_sq, self, m)
        self.seen[m] += 1
        if self.seen[m] == self.chunks:   # every chunk of this rank has run m: share it
            self.works[m] = collectives.all_reduce(self.totals[m], self.group, async_op=True)
        return out

    def pooled(self, m: int) -> torch.Tensor:
        """[F | P | Z | N] of micro-batch m over every stage (waits for its all-reduce)."""
        if self.works[m] is not None:
            self.works[m].wait()
            self.works[m] = None
        return self.totals[m]

    def losses(self) -> tuple[float, float]:
        """(aux, z) summed over this rank's micro-batches, unweighted."""
        E, aux, z = self.experts, 0.0, 0.0
        for m in range(len(self.totals)):
            t = self.pooled(m)
            pairs = t[2 * E + 1]
            aux += float(E * ((t[:E] / pairs) * (t[E:2 * E] / pairs)).sum())
            z += float(t[2 * E] / pairs)
        return aux, z

    def step_load(self) -> Optional[torch.Tensor]:
        """[MoE layers of this rank, E] tokens per expert over the run, in chunk then layer order
        (Trainer._routers' order); None when no chunk here has a MoE layer."""
        return _rows(self.loads)

    def step_dropped(self) -> Optional[torch.Tensor]:
        """The same for the picks dropped over capacity; None without moe_capacity_factor."""
        return _rows(self.drops)


def _accumulate(table: dict, chunk: int, rows: torch.Tensor) -> None:
    table[chunk] = rows if chunk not in table else table[chunk] + rows


def _rows(table: dict) -> Optional[torch.Tensor]:
    """Every chunk's rows in chunk order."""
    return torch.cat([table[c] for c in sorted(table)]) if table else None


class _PooledAux(torch.autograd.Function):
    """Identity on x; its backward adds the pooled losses' gradients to this chunk's share of the
    probability sums and of the z-loss sum (the module docstring's derivatives)."""

    @staticmethod
    def forward(ctx, x, prob_sum, lse_sq, pool: AuxPool, m: int):
        ctx.pool, ctx.m, ctx.dtype = pool, m, prob_sum.dtype
        # A copy, not x itself: autograd would return a view of x, whose storage release_storage
        # cannot free once the activation is sent; x itself is saved by nobody and goes.
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        pool, E = ctx.pool, ctx.pool.experts
        total = pool.pooled(ctx.m)
        pairs = total[2 * E + 1]
        grad_p = pool.aux_weight * E * total[:E] / pairs ** 2                 # [E]
        grad_z = pool.z_weight / pairs                                        # []
        return grad, grad_p.to(ctx.dtype), grad_z.to(ctx.dtype), None, None
