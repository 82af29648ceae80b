"""Model FLOPs (for MFU) and executed FLOPs per rank (for time), counted from the layer shapes.

Narayanan et al. 2021, Sec. 5.1, eq. (3): a GPT step of B sequences costs
``72*B*s*l*h^2 * (1 + s/(6h) + V/(12*l*h))`` FLOPs without recomputation, i.e. per token
``6 * (matmul parameters) + 12*l*h*s``: 2 FLOPs per multiply-add, x3 for forward plus the two
backward GEMMs, and ``4*s*h`` forward FLOPs per token and layer for Q K^T and P V. Here the
matmul parameters are Llama's (GQA q/k/v, o, SwiGLU gate/up/down, LM head; the embedding is a
lookup, norms and biases are elementwise) and the attention width is ``heads * head_dim``.

Model FLOPs count the full (non-causal) attention square and the unpadded vocabulary, as the paper
and PaLM's MFU (Chowdhery et al. 2022, App. B) do, so MFU is comparable across frameworks.
Executed FLOPs, which set the step time, add what really runs: the padded vocabulary, the
causal kernels' half square (``Assumptions.causal_attention``) and recomputation's extra forward.

Under context parallelism each rank runs the GEMMs of its s/cp tokens and, with every document cut
into 2*cp chunks of which it holds an early and a late one (megasft.context_parallel.sharding),
exactly 1/cp of the causal square — whichever exchange (ring or all-to-all) brings it the keys.

A layer with a sliding window W < s (Mistral; Gemma's sliding_attention layers) has each query
attend to at most W keys: its square is s x W (model FLOPs) and, causal, W * (1 - W / (2s)) keys
per query on average (s/2 at W = s), instead of s and s/2.

A mixture-of-experts layer (megasft.planner.moe) counts its *active* weights: per token the SwiGLU
of each of its top-k experts (3*h*f_moe each, f_moe/tp per rank under expert-TP) and the router
[E, h] — so the 6*N of eq. (3) is 6*N_active. The router is replicated over TP and runs on the
tokens as they arrive (s/tp of them per rank under sequence parallelism). Executed FLOPs assume
uniform routing: every EP rank's experts receive T*k rows per micro-batch whatever ep is.
"""
from __future__ import annotations

from megasft.config import Config, ModelConfig
from megasft.planner.assumptions import Assumptions
from megasft.layout import kv_partition
from megasft.model.families import layer_window, moe_ffn_size
from megasft.planner.moe import moe_layer_ids, rank_moe_layers, router_weights
from megasft.planner.pinned import layout_of, rank_layer_ids


def layer_matmul_parameters(model: ModelConfig, tp: int = 1, moe: bool = False) -> int:
    """Weights one TP rank multiplies per token of its TP region in a layer's GEMMs (replicated kv
    heads are computed on each rank): attention and the dense SwiGLU, or in a MoE layer the SwiGLU
    of each of the token's top-k experts. The router is :func:`megasft.planner.moe.router_weights`."""
    h, d = model.hidden_size, model.head_size
    q_width = model.num_attention_heads // tp * d
    kv_width = kv_partition(model.kv_heads, tp)[0] * d
    if moe:
        mlp = model.moe_top_k * 3 * h * (moe_ffn_size(model) // tp)
    else:
        mlp = 3 * h * (model.intermediate_size // tp)
    return h * (2 * q_width + 2 * kv_width) + mlp


def attended_keys(model: ModelConfig, layer: int, seq_len: int, causal: bool) -> float:
    """Keys one query of a seq_len row attends to on average in `layer` (its window counted)."""
    window = layer_window(model, layer)
    if window is None or window >= seq_len:
        return seq_len * (0.5 if causal else 1.0)
    return window * (1 - window / (2 * seq_len)) if causal else float(window)


def forward_flops_per_token(model: ModelConfig, seq_len: int, vocab_size: int | None = None,
                            causal: bool = False) -> float:
    """Forward FLOPs per token of the whole model (tp = 1): GEMMs plus the attention square.

    This is what ``torch.utils.flop_counter.FlopCounterMode`` reports for one forward of a
    [1, seq_len] row divided by seq_len (it counts matmuls and the full s x s of SDPA; pass
    ``vocab_size=model.padded_vocab_size(1)`` to match a model built with padded rows) — for a
    model without sliding windows: FlopCounterMode counts SDPA's whole square, masked or not.
    """
    vocab = model.vocab_size if vocab_size is None else vocab_size
    width = model.num_attention_heads * model.head_size
    layers = range(model.num_layers)
    keys = sum(attended_keys(model, i, seq_len, causal) for i in layers)
    moe = len(moe_layer_ids(model, layers))
    gemm = 2 * ((model.num_layers - moe) * layer_matmul_parameters(model)
                + moe * (layer_matmul_parameters(model, moe=True) + router_weights(model)))
    return gemm + 4 * width * keys + 2 * model.hidden_size * vocab


def model_flops_per_step(cfg: Config) -> float:
    """Model FLOPs of one optimizer step: 3x forward over the global batch (no recompute, full
    square; a MoE model's active weights only)."""
    return 3 * forward_flops_per_token(cfg.model, cfg.data.seq_len) * cfg.data.global_batch_tokens


def layer_attention_flops(cfg: Config, layer: int, causal: bool) -> float:
    """Forward FLOPs of one layer's attention core (Q K^T and P V) on one rank for one micro-batch:
    its a/tp heads over its s*b/cp queries, each attending to the row's average key count."""
    m, d = cfg.model, cfg.data
    width = m.num_attention_heads // cfg.parallel.tp * m.head_size
    tokens = d.seq_len * d.micro_batch_size // cfg.parallel.cp
    return 4 * width * attended_keys(m, layer, d.seq_len, causal) * tokens


def attention_passes(recompute: str) -> int:
    """Forward-equivalents of the attention core per micro-batch: forward + a backward of two, and
    one more forward under selective or full recomputation."""
    return 3 if recompute == "none" else 4


def executed_flops_per_micro_batch(cfg: Config, pp_rank: int, assumptions: Assumptions) -> tuple[float, float]:
    """(GEMM FLOPs, attention FLOPs) one rank of stage ``pp_rank`` executes per micro-batch.

    Backward costs two forwards (input and weight gradients); full recompute adds one forward of
    every layer, selective recompute one forward of the attention core (Korthikanti et al. 2022,
    Sec. 5: selective costs ~2-4 % extra FLOPs, full ~33 %).
    """
    m, p, d = cfg.model, cfg.parallel, cfg.data
    tokens = d.seq_len * d.micro_batch_size // p.cp
    layer_ids = rank_layer_ids(cfg, pp_rank)
    gemm_passes = 4 if cfg.model.recompute == "full" else 3
    router_tokens = tokens // p.tp if layout_of(cfg).sequence_parallel else tokens
    moe = rank_moe_layers(cfg, pp_rank)
    per_pass = ((len(layer_ids) - moe) * layer_matmul_parameters(m, p.tp) * tokens
                + moe * (layer_matmul_parameters(m, p.tp, moe=True) * tokens + router_weights(m) * router_tokens))
    gemm = gemm_passes * 2 * per_pass
    if pp_rank == layout_of(cfg).head_rank:
        gemm += 3 * 2 * m.hidden_size * (m.padded_vocab_size(p.tp) // p.tp) * tokens
    attention = sum(layer_attention_flops(cfg, i, assumptions.causal_attention) for i in layer_ids)
    return gemm, attention_passes(cfg.model.recompute) * attention
