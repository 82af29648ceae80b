"""MoE routers: which experts each token goes to, and with what weights (megasft.model.moe's "route").

Every router maps tokens x [T, h] to (logits [T, E], fp32 probabilities [T, E] for the
load-balancing loss, routing weights [T, k] in x's dtype, expert ids [T, k]); its weight is HF's
``mlp.gate.weight`` [E, h], replicated over TP (see megasft.model.moe for how its gradient is summed).

  Router              softmax top-k (Mixtral, Qwen3-MoE): transformers' MixtralTopKRouter /
                      Qwen3MoeTopKRouter.
  SigmoidGroupRouter  DeepSeek-V3 (DeepSeek-AI 2024, Sec. 2.1.2): transformers' DeepseekV3TopkRouter.

SigmoidGroupRouter in steps, s = sigmoid(x W^T) computed in fp32 (as transformers does):
  1. choice scores c = s + b, b the per-expert bias (HF ``mlp.gate.e_score_correction_bias``);
  2. group limit: the E experts form moe_n_group groups of consecutive ids, a group's score is the
     sum of its two best c, and only the experts of the moe_topk_group best groups stay eligible;
  3. the top-k eligible experts by c;
  4. their weights are the *unbiased* s of the chosen experts, divided by their sum
     (+1e-20, transformers' guard) with moe_norm_topk_prob, times moe_routed_scaling_factor.
The bias therefore moves tokens between experts without entering any weight or gradient.

Auxiliary-loss-free load balancing (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy
for Mixture-of-Experts"; DeepSeek-V3 eq. 16): after each optimizer step every layer's bias moves
by b_i += gamma * sign(mean_j load_j - load_i), load_i the tokens routed to expert i in the step
(bias_step). The bias is state, not a trainable weight: a parameter with requires_grad=False, so
init, checkpoints, resharding and the HF name table carry it like the weights, while the optimizer
(which takes trainable parameters only) never touches it. It stays fp32 whatever the model dtype:
bf16 holds 8 significant bits, so at |b| >= 0.25 an update of gamma = 1e-3 would round away.

The probabilities a sigmoid router returns for the load-balancing loss are the scores normalised
per token, s_i / sum_j s_j (DeepSeek-V3 eq. 20's s'), so the loss keeps its softmax meaning.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megasft.config import ModelConfig
from megasft.parallel_state import ParallelState
from megasft.tensor_parallel.layers import mark_replicated


class RouterStats(NamedTuple):
    """One MoE layer's router statistics over the tokens its router saw (this rank's share)."""

    counts: torch.Tensor       # [E] top-k picks per expert (float, no gradient)
    prob_sum: torch.Tensor     # [E] sum over tokens of the router's probabilities (softmax; sigmoid: normalised scores)
    lse_sq_sum: torch.Tensor   # [] sum over tokens of logsumexp(logits)^2
    tokens: int
    dropped: Optional[torch.Tensor] = None   # [E] picks over capacity per expert (moe_capacity_factor only)


class Router(nn.Module):
    """Softmax top-k routing (Mixtral, Qwen3-MoE); the weight is HF's ``mlp.gate.weight`` [E, h]."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState, sequence_parallel: bool):
        super().__init__()
        self.top_k, self.renormalise = cfg.moe_top_k, cfg.moe_norm_topk_prob
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        mark_replicated(self.weight, ps.tp, ps.tp_group if sequence_parallel else None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [T, E], fp32 probabilities [T, E], routing weights [T, k] in x's dtype, expert ids [T, k])."""
        logits = F.linear(x, self.weight)
        probs = torch.softmax(logits.float(), dim=-1)
        top, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalise:
            top = top / top.sum(dim=-1, keepdim=True)
        return logits, probs, top.to(x.dtype), experts


def router_stats(logits: torch.Tensor, probs: torch.Tensor, experts: torch.Tensor) -> RouterStats:
    counts = torch.bincount(experts.reshape(-1), minlength=probs.shape[-1]).to(probs.dtype)
    lse_sq = torch.logsumexp(logits.float(), dim=-1).square().sum()
    return RouterStats(counts, probs.sum(dim=0), lse_sq, logits.shape[0])


class SigmoidGroupRouter(Router):
    """DeepSeek-V3's bias-corrected, group-limited sigmoid top-k routing (the module docstring's
    steps); ``weight`` is HF's ``mlp.gate.weight`` [E, h], ``e_score_correction_bias`` its bias [E]."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState, sequence_parallel: bool):
        super().__init__(cfg, ps, sequence_parallel)
        self.groups, self.topk_group = cfg.moe_n_group, cfg.moe_topk_group
        self.scale = cfg.moe_routed_scaling_factor
        # Every rank applies the same update to its copy (bias_step), so no gradient sync is needed.
        self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.num_experts), requires_grad=False)
        mark_replicated(self.e_score_correction_bias, ps.tp, None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [T, E], normalised scores [T, E], routing weights [T, k] in x's dtype, expert ids [T, k])."""
        logits = F.linear(x.float(), self.weight.float())                     # [T, E] fp32, as transformers
        scores = logits.sigmoid()
        with torch.no_grad():   # the choice is discrete: no gradient flows through it
            experts = torch.topk(self._eligible(scores + self.e_score_correction_bias), self.top_k, dim=-1).indices
        top = scores.gather(1, experts)                                       # [T, k] unbiased
        if self.renormalise:
            top = top / (top.sum(dim=-1, keepdim=True) + 1e-20)
        probs = scores / scores.sum(dim=-1, keepdim=True)
        return logits, probs, (top * self.scale).to(x.dtype), experts

    def _eligible(self, choice: torch.Tensor) -> torch.Tensor:
        """Choice scores [T, E] with the experts outside each token's moe_topk_group best groups at -inf."""
        if self.topk_group == self.groups:   # every group is chosen
            return choice
        tokens, experts = choice.shape
        grouped = choice.view(tokens, self.groups, experts // self.groups)    # [T, G, E/G]
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)             # [T, G]
        chosen = torch.topk(group_scores, self.topk_group, dim=-1).indices    # [T, topk_group]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, chosen, True)
        return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(tokens, experts)

    def bias_step(self, load: torch.Tensor, rate: float) -> None:
        """The auxiliary-loss-free update from this layer's step load [E] (tokens per expert)."""
        with torch.no_grad():
            self.e_score_correction_bias.add_(bias_update(load, rate).to(self.e_score_correction_bias))

    def _apply(self, fn, recurse: bool = True):
        # Module.to(dtype=bf16) casts every parameter; the bias follows the device only (module docstring).
        bias = self.e_score_correction_bias.data
        super()._apply(fn, recurse)
        self.e_score_correction_bias.data = bias.to(device=fn(bias[:0]).device)
        return self


def bias_update(load: torch.Tensor, rate: float) -> torch.Tensor:
    """gamma * sign(mean load - load_i) per expert of load [..., E]: underloaded experts' bias rises,
    overloaded ones' falls, an expert exactly at the mean keeps its bias."""
    return rate * torch.sign(load.mean(dim=-1, keepdim=True) - load)


def build_router(cfg: ModelConfig, ps: ParallelState, sequence_parallel: bool) -> nn.Module:
    """The router model.moe_router names."""
    router = {"softmax": Router, "sigmoid_group": SigmoidGroupRouter}[cfg.moe_router]
    return router(cfg, ps, sequence_parallel)


def update_router_biases(routers: list[SigmoidGroupRouter], load: torch.Tensor, rate: float) -> None:
    """Every MoE layer's auxiliary-loss-free bias step from the step's load [layers, E], summed over
    every micro-batch and data-parallel rank (the same tensor on every rank, so every copy of a
    bias gets the same update)."""
    if len(routers) != load.shape[0]:
        raise ValueError(f"{len(routers)} routers for the load of {load.shape[0]} MoE layers")
    for router, row in zip(routers, load):
        router.bias_step(row, rate)
