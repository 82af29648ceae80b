"""The Llama-family decoder, built from tensor-parallel layers.

One definition serves every layout: a ``LlamaStage`` holds the layers of one pipeline chunk (the
embedding on the first, final norm + LM head on the last); at tp=pp=1 it is a plain PyTorch Llama
whose logits equal ``transformers.LlamaForCausalLM``'s.

Activations are sequence-first, [s, b, h] (or [s/tp, b, h] under sequence parallelism), so the
sequence collectives act on a contiguous leading dim. Inputs are packed rows: ``input_ids``
[b, s], ``position_ids`` restarting per document, ``cu_seqlens`` over the flattened b*s tokens.

What a family changes is read from ModelConfig and its Family (megasft.model.families): q/k/v
biases, q/k norms, per-layer sliding windows, and for Gemma (1 + w) norms around both sublayers,
GeGLU, the scaled embedding, the attention scale and the attention / final logit soft-caps. A
mixture-of-experts model (Qwen3-MoE, Mixtral) has megasft.model.moe's MoE in place of the dense MLP
on its MoE layers; those layers also return their router statistics, and the last chunk returns
the micro-batch's auxiliary losses beside the loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megasft.config import ModelConfig
from megasft.context_parallel.attention import context_parallel_attention
from megasft.data.batch import MicroBatch
from megasft.layout import kv_partition
from megasft.model.attention import attention, resolve_backend
from megasft.model.families import family_of, is_moe_layer, layer_window
from megasft.model.fused import norm_kernel, resolve_norm_backend
from megasft.model.kv_cache import KVCache, cached_attention
from megasft.model.mlp import MLP
from megasft.model.moe import MoE, moe_groups, moe_stats
from megasft.model.rope import Rope, apply_rope
from megasft.parallel_state import ParallelState
from megasft.tensor_parallel.comm import scatter_to_sp
from megasft.tensor_parallel.cross_entropy import lm_head_cross_entropy, vocab_parallel_cross_entropy
from megasft.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                            VocabParallelEmbedding, enter_tp_region,
                                            mark_replicated, tp_shards)
from megasft.tensor_parallel.spec import Shard, set_spec


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), statistics in fp32 (as HF's LlamaRMSNorm), or with
    `plus_one` Gemma's (1 + w) * x / sqrt(...) all in fp32; the kernel comes from a resolved
    ``norm_backend`` (megasft.model.fused), the parameter is always ``weight``."""

    def __init__(self, hidden_size: int, eps: float, backend: str = "torch", plus_one: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.full((hidden_size,), 0.0 if plus_one else 1.0))
        self.kernel = norm_kernel(backend, plus_one)     # a plain callable: adds no parameters or state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x, self.weight, self.eps)


class Attention(nn.Module):
    """Grouped-query attention; query heads split over TP, kv heads split or (tp > nkv) replicated.
    Under context parallelism (ps.cp > 1) the core attends across the CP ranks' chunks of each
    row by `cp_comm` (ring | a2a, megasft.context_parallel)."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState, sequence_parallel: bool, backend: str, layer: int = 0,
                 cp_comm: str = "ring"):
        super().__init__()
        self.group, self.sequence_parallel, self.backend = ps.tp_group, sequence_parallel, backend
        self.cp_group, self.cp_comm = ps.cp_group, cp_comm
        self.recompute_core = cfg.recompute == "selective"
        d, nq, nkv = cfg.head_size, cfg.num_attention_heads, cfg.kv_heads
        self.head_dim, self.local_q = d, nq // ps.tp
        self.local_kv, copies = kv_partition(nkv, ps.tp)
        # With copies > 1 (fewer kv heads than TP ranks) each rank holds the one head its queries use.
        kv = Shard(nkv * d, nkv // self.local_kv, ps.tp_rank // copies)
        self.q_proj = ColumnParallelLinear(cfg.hidden_size, [tp_shards(nq * d, ps.tp_group)], cfg.qkv_bias)
        self.kv_proj = ColumnParallelLinear(cfg.hidden_size, [kv, kv], cfg.qkv_bias)   # [k; v] rows
        if copies > 1:
            for p in self.kv_proj.parameters():
                mark_replicated(p, copies, ps.tp_subgroup(copies))
        self.o_proj = RowParallelLinear(nq * d, cfg.hidden_size, ps.tp_group, sequence_parallel)
        self.window = layer_window(cfg, layer)
        self.scale = None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar ** -0.5
        self.softcap = cfg.attn_logit_softcapping
        if cfg.qk_norm:
            self.q_norm, self.k_norm = _head_norm(cfg, ps), _head_norm(cfg, ps)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen, cache: Optional[KVCache] = None):
        x = enter_tp_region(x, self.group, self.sequence_parallel)          # [s, b, h]
        s, b = x.shape[:2]
        q = self.q_proj(x).view(s, b, self.local_q, self.head_dim)
        k, v = self.kv_proj(x).view(s, b, 2, self.local_kv, self.head_dim).unbind(2)
        if hasattr(self, "q_norm"):     # Qwen3: RMSNorm over each head's d, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:   # incremental decoding: these queries over the cached keys + these
            k, v = cache.append(self, k, v)
            core = cached_attention(q, k, v, self.window, self.scale, self.softcap)
            return self.o_proj(core.reshape(s, b, -1))
        if self.recompute_core and self.training:
            core = checkpoint(self.core, q, k, v, cu_seqlens, max_seqlen, use_reentrant=False)
        else:                                                               # [s(/cp), b, nq/tp, d]
            core = self.core(q, k, v, cu_seqlens, max_seqlen)
        return self.o_proj(core.reshape(s, b, -1))                          # [s(/cp)(/tp), b, h]

    def core(self, q, k, v, cu_seqlens, max_seqlen):
        if self.cp_group is not None:   # this rank's s/cp tokens; cu_seqlens are the full rows'
            return context_parallel_attention(q, k, v, cu_seqlens, max_seqlen, self.cp_group, self.cp_comm,
                                              self.backend, self.window, self.scale, self.softcap)
        return attention(q, k, v, cu_seqlens, max_seqlen, self.backend, self.window, self.scale, self.softcap)


def _rms_norm(cfg: ModelConfig, ps: ParallelState, size: int) -> RMSNorm:
    plus_one = family_of(cfg.family).gemma
    return RMSNorm(size, cfg.rms_norm_eps, resolve_norm_backend(cfg.norm_backend, ps.device, plus_one), plus_one)


def _norm(cfg: ModelConfig, ps: ParallelState, sequence_parallel: bool) -> RMSNorm:
    norm = _rms_norm(cfg, ps, cfg.hidden_size)
    # Replicated on every TP rank; under SP each rank sees a different slice of the sequence, so
    # its gradient is partial and must be summed over TP.
    mark_replicated(norm.weight, ps.tp, ps.tp_group if sequence_parallel else None)
    return norm


def _head_norm(cfg: ModelConfig, ps: ParallelState) -> RMSNorm:
    norm = _rms_norm(cfg, ps, cfg.head_size)
    # One [d] weight shared by every head, replicated on every TP rank; each rank sees only its own
    # heads, so its gradient is partial and summed over TP (with or without SP; replicated kv
    # heads each see only their own queries' share, so the sum over all of TP is still exact).
    mark_replicated(norm.weight, ps.tp, ps.tp_group)
    return norm


class DecoderLayer(nn.Module):
    """x + attention(norm(x)), then + mlp(norm(x)); Gemma also norms each sublayer's output
    (attn_post_norm, mlp_post_norm) and calls its pre-MLP norm mlp_pre_norm (HF
    pre_feedforward_layernorm, where Llama's mlp_norm is HF post_attention_layernorm). A MoE layer
    (``self.moe``) has the routed experts as its mlp and returns (x, RouterStats)."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState, sequence_parallel: bool, backend: str, layer: int = 0,
                 cp_comm: str = "ring"):
        super().__init__()
        self.gemma = family_of(cfg.family).gemma
        self.rope_local = cfg.rope_local_theta is not None and layer_window(cfg, layer) is not None
        self.attn_norm = _norm(cfg, ps, sequence_parallel)
        self.attention = Attention(cfg, ps, sequence_parallel, backend, layer, cp_comm)
        if self.gemma:
            self.attn_post_norm = _norm(cfg, ps, sequence_parallel)
            self.mlp_pre_norm = _norm(cfg, ps, sequence_parallel)
            self.mlp_post_norm = _norm(cfg, ps, sequence_parallel)
        else:
            self.mlp_norm = _norm(cfg, ps, sequence_parallel)
        self.moe = is_moe_layer(cfg, layer)
        self.mlp = MoE(cfg, ps, sequence_parallel) if self.moe else MLP(cfg, ps, sequence_parallel)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen, cache: Optional[KVCache] = None):
        attn = self.attention(self.attn_norm(x), cos, sin, cu_seqlens, max_seqlen, cache)
        if self.gemma:
            attn = self.attn_post_norm(attn)
        x = x + F.dropout(attn, self.dropout, self.training)
        if self.moe:   # no MoE family is a Gemma
            out, stats = self.mlp(self.mlp_norm(x))
            return x + F.dropout(out, self.dropout, self.training), stats
        if not self.gemma:
            return x + F.dropout(self.mlp(self.mlp_norm(x)), self.dropout, self.training)
        return x + F.dropout(self.mlp_post_norm(self.mlp(self.mlp_pre_norm(x))), self.dropout, self.training)


class LlamaStage(nn.Module):
    """The layers of one pipeline chunk; ``pre_process`` adds the embedding, ``post_process`` the
    final norm, LM head and loss.

    forward(batch, hidden_states) takes the MicroBatch (megasft.data.batch) and, on non-first
    chunks, the incoming activation. It returns the activation [s(/tp), b, h], or on the last chunk
    the vocab-parallel logits [s, b, V/tp] — or ``(loss_sum, valid_count)`` when the batch carries
    labels. A mixture-of-experts model with labels adds the chunk's MoEStats (None where the chunk
    has no MoE layer) to every chunk's result: ``(activation, stats)`` or ``(loss_sum, valid_count,
    stats)``, since the load-balancing loss pools the routers of all MoE layers, whichever stage
    holds them (megasft.training.moe_aux). ``cache`` (megasft.model.kv_cache, generation at tp=pp=1)
    keeps past keys/values.
    """

    def __init__(self, cfg: ModelConfig, ps: ParallelState, layer_ids: list[int], pre_process: bool,
                 post_process: bool, sequence_parallel: bool = False, neftune_seed: int = 0,
                 cp_comm: str = "ring"):
        super().__init__()
        self.cfg, self.group = cfg, ps.tp_group
        self.sequence_parallel = sequence_parallel   # resolved: Layout.sequence_parallel
        self.pre_process, self.post_process = pre_process, post_process
        self.recompute_layers = cfg.recompute == "full"
        backend = resolve_backend(cfg.attention_backend, ps.device, cfg.attn_logit_softcapping)
        padded_vocab = cfg.padded_vocab_size(ps.tp)
        if pre_process:
            self.embedding = VocabParallelEmbedding(cfg.vocab_size, padded_vocab, cfg.hidden_size,
                                                    ps.tp_group, self.sequence_parallel)
            # Same seed on every TP rank (the noise is added to the replicated embedding output),
            # a different one per data-parallel rank (different documents).
            self.neftune_generator = torch.Generator().manual_seed(neftune_seed * 1_000_003 + ps.dp_rank)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, ps, self.sequence_parallel, backend, i, cp_comm)
                                     for i in layer_ids})
        self.moe_groups = moe_groups(ps, self.sequence_parallel)
        if post_process:
            self.norm = _norm(cfg, ps, self.sequence_parallel)
            vocab = Shard(cfg.vocab_size, ps.tp, ps.tp_rank, padded=padded_vocab)
            self.output = VocabOutput(vocab.start, max(0, min(vocab.local, cfg.vocab_size - vocab.start)),
                                      ps.tp_group, cfg.loss_chunk_tokens, cfg.final_logit_softcapping)
            if not (cfg.tie_embeddings and pre_process):
                self.lm_head = LMHead(cfg.hidden_size, vocab, self.output)        # [V/tp, h]
        if cfg.tie_embeddings and pre_process != post_process:
            # With pipelining a tied head is a second copy of the embedding (same canonical tensor,
            # so the same init and HF name), kept equal by summing both copies' gradients over the
            # embedding group, or on the rank holding both (ZBV; megasft.pipeline.tied). Set before
            # any weight is drawn or loaded.
            copy = self.embedding.weight if pre_process else self.lm_head.weight
            set_spec(copy, tied=True, pp_copies=2, tied_head=not pre_process)
        self._rope = {False: Rope(cfg)}
        if any(layer.rope_local for layer in self.layers.values()):     # Gemma 3's sliding layers
            self._rope[True] = Rope(cfg, local=True)

    def forward(self, batch: MicroBatch, hidden_states: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None):
        if self.pre_process:
            hidden_states = self._embed(batch)
        rope = {local: r.cos_sin(batch, hidden_states.dtype) for local, r in self._rope.items()}  # [s, b, 1, r]
        cu_seqlens, max_seqlen = batch.cu_seqlens, int(batch.max_seqlen)
        router_stats = []
        for layer in self.layers.values():
            cos, sin = rope[layer.rope_local]
            if self.recompute_layers and self.training:
                hidden_states = checkpoint(layer, hidden_states, cos, sin, cu_seqlens, max_seqlen,
                                           use_reentrant=False)
            else:
                hidden_states = layer(hidden_states, cos, sin, cu_seqlens, max_seqlen, cache)
            if layer.moe:
                hidden_states, stats = hidden_states
                router_stats.append(stats)
        with_stats = batch.labels is not None and self.cfg.num_experts > 0   # training a MoE model
        moe = moe_stats(router_stats, self.cfg.num_experts, self.moe_groups) if with_stats and router_stats else None
        if not self.post_process:
            return (hidden_states, moe) if with_stats else hidden_states
        x = enter_tp_region(self.norm(hidden_states), self.group, self.sequence_parallel)   # [s, b, h]
        target = None if batch.labels is None else batch.targets().t()                  # [s(/cp), b]
        if hasattr(self, "lm_head"):
            out = self.lm_head(x, target)
        else:   # tied without pipelining: the embedding's own weight, which its forward already waited for
            out = self.output(x, self.embedding.weight, target)
        return (*out, moe) if with_stats else out

    def _embed(self, batch: MicroBatch) -> torch.Tensor:
        emb = self.embedding(batch.input_ids)                               # [s(/tp), b, h]
        if family_of(self.cfg.family).gemma:
            # x sqrt(h), the factor rounded to the model dtype first as HF's Gemma embedding does
            # (sqrt(3072) = 55.43 is 55.5 in bf16); NEFTune noise comes after, as HF's hook adds it.
            emb = emb * torch.tensor(self.cfg.hidden_size ** 0.5).to(device=emb.device, dtype=emb.dtype)
        alpha = self.cfg.neftune_alpha
        if self.training and alpha > 0:
            emb = emb + neftune_noise(batch, emb, alpha, self.neftune_generator, self.group,
                                      self.sequence_parallel)
        return emb


@dataclass(frozen=True)
class VocabOutput:
    """The output projection onto this rank's vocabulary slice and, given targets, the masked
    vocab-parallel cross-entropy — fused over token chunks when chunk_tokens > 0, so the full
    [tokens, V/tp] logits never exist. With `softcap` c the logits are c * tanh(logits / c)
    (Gemma's final soft-cap: elementwise, so each rank caps its own vocabulary slice)."""

    vocab_start: int
    vocab_valid: int        # rows of the slice that are real tokens (the rest is padding)
    group: object           # the TP group
    chunk_tokens: int = 0
    softcap: Optional[float] = None

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, target: Optional[torch.Tensor]):
        """Logits [s, b, V/tp] of x [s, b, h], or (loss_sum, count) against target [s, b]."""
        if target is not None and self.chunk_tokens:
            return lm_head_cross_entropy(x, weight, target, self.vocab_start, self.vocab_valid,
                                         self.group, self.chunk_tokens, self.softcap)
        logits = F.linear(x, weight)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        if target is None:
            return logits
        return vocab_parallel_cross_entropy(logits, target, self.vocab_start, self.vocab_valid, self.group)


class LMHead(ColumnParallelLinear):
    """The untied output layer and its loss. Its weight is read only inside its own forward, so
    forward pre-hooks (the overlapped ZeRO-1 parameter all-gather waits in one) run first."""

    def __init__(self, hidden_size: int, vocab: Shard, output: VocabOutput):
        super().__init__(hidden_size, [vocab])
        self.output = output

    def forward(self, x: torch.Tensor, target: Optional[torch.Tensor] = None):
        return self.output(x, self.weight, target)


def neftune_noise(batch: MicroBatch, emb: torch.Tensor, alpha: float, generator: torch.Generator,
                  group, sequence_parallel: bool) -> torch.Tensor:
    """NEFTune (Jain et al. 2023): uniform noise in +-alpha/sqrt(L*d), L the length of the token's
    own document (so packing does not change the noise a document gets). Drawn for the full rows
    [s, b, h] on every TP and CP rank from the same generator, then this CP rank's tokens taken
    and sliced under SP, so every rank agrees with the unsplit row."""
    b = batch.input_ids.shape[0]
    s, d = batch.input_ids.shape[1] * batch.cp, emb.shape[-1]                            # full rows
    doc_len = batch.token_doc_lengths().cpu().t().unsqueeze(-1)                       # [s(/cp), b, 1]
    noise = torch.rand((s, b, d), generator=generator).mul_(2).sub_(1)
    noise = batch.local(noise.transpose(0, 1)).transpose(0, 1)                        # [s(/cp), b, d]
    noise = noise * (alpha / torch.sqrt(doc_len.float() * d))
    if sequence_parallel:
        noise = scatter_to_sp(noise, group)
    return noise.to(device=emb.device, dtype=emb.dtype)
