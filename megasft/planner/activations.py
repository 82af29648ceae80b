"""Activation memory of a Llama decoder layer, a pipeline stage and the loss, per rank.

Method: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
Sec. 4.1 — count the tensors autograd keeps for backward, per token, in bytes. For their GPT layer
(LayerNorm, MHA, 4h GeLU MLP, dropout, attention probabilities materialised) this gives
``s*b*h*(34 + 5*a*s/h)`` (eq. 1); with TP and SP everything divides by t (eq. 4,
``s*b*h*(34 + 5*a*s/h)/t``); selective recomputation drops the ``5*a*s/h`` term (eq. 6).

The same accounting for megasft's Llama layer (``megasft.model.llama``: RMSNorm in fp32, GQA,
SwiGLU, no dropout by default), per token and per TP rank. e = bytes per activation element (2 for
bf16), ``shard`` = t under sequence parallelism else 1, a = query heads, kv = key/value heads,
d = head_dim, f = intermediate_size:

  saved tensor                          bytes / token           Korthikanti's GPT counterpart
  2 RMSNorm: fp32 input copy, output    2*(4 + e)*h/shard       2 LayerNorm inputs: 4sbh
  attention input (q/k/v GEMMs)         e*h                     QKV input: 2sbh
  q, k, v after RoPE                    e*(a + 2*kv)*d/t (*)    Q, K: 4sbh; V: 2sbh
  attention output (o_proj input)       e*a*d/t                 projection input: 2sbh
  MLP input (gate/up GEMM)              e*h                     MLP input: 2sbh
  gate|up output, SiLU(gate), product   4*e*f/t                 GeLU input + output: 16sbh
  dropout masks (only if dropout > 0)   2*h/shard               2 masks: 2sbh
  attention core                        flash: 4*a/t (fp32      softmax out, dropout mask and
                                        log-sum-exp);           output: 5as^2b (the 5as/h term)
                                        else e*a*s/t (+(1+e)*
                                        a*s/t with dropout)

(*) with tp > kv each rank holds one replicated kv head, i.e. kv/t becomes 1.

For Korthikanti's GPT layer the same bookkeeping reads 4 (LayerNorms saving their bf16 input)
+ 2 + 6 + 2 + 2 + 16 (a 4h GeLU MLP instead of SwiGLU) + 2 (dropout masks) = 34, plus 5as/h.

Assumptions, stated once:

* megasft's RMSNorm computes its statistics in fp32 like HF's LlamaRMSNorm, so autograd keeps an
  fp32 copy of the input and the normalised output (plus one fp32 value per token, counted).
* Flash-style kernels (attention_backend auto/flash_attn/torch_varlen on GPU) never materialise
  the s x s probabilities, so the ``a*s`` term is absent whatever the recompute mode. The sdpa
  backend does not either (torch dispatches the masked call to its fused CPU flash / CUDA
  memory-efficient kernels), but megasft's block-diagonal boolean mask becomes an additive mask in
  the activation dtype that each layer saves: e*s bytes per token (measured per layer with
  saved-tensor hooks; benchmarks/planner_calibration.py).
* The q/k/v and gate/up GEMMs save their input after the SP all-gather ([s, b, h], not divided by
  t), as megasft's ``enter_tp_region`` + ``F.linear`` do, unless ``Assumptions.sp_regathers_inputs``
  (Korthikanti Sec. 4.2.2: keep the shard, all-gather again in backward) says otherwise.
* Full recomputation keeps only each layer's input (``e*h/shard``) and rematerialises one layer
  at a time in backward; RoPE multiplies by constant cos/sin tables, so it keeps nothing per layer.

A mixture-of-experts layer (megasft.model.moe, megasft.model.dispatch) keeps, in place of the two
SwiGLU rows above, per token of the TP region (E experts, top-k, f = moe_ffn_size; the router runs
on the tokens as they arrive, s/t of them per rank under SP):

  router input (its GEMM)               e*h/shard
  softmax probabilities, fp32 logits    (2*4*E + 4)/shard       the softmax's output and the
   for logsumexp (z-loss), and lse                              logsumexp's input and output
  top-k ids, renormalised weights       (8*k + 4*(k + 1))/shard (the weights only with
                                                                moe_norm_topk_prob)
  dispatched rows (gate_up input)       e*k*h                   [T*k, h], grouped by expert
  experts' gate|up, SiLU(gate), product 4*e*k*f/t               the dense MLP's 4*e*f/t per pick
  combine: outputs in token order,      e*k*h + e*k             what the weighted sum saves
   routing weights
  int64 slot permutations               8*k*2 (ep = 1),         the index gathers' indices
                                        8*k*4 (ep > 1: the
                                        EP regrouping too)

Under uniform routing a rank's experts receive T*k rows whatever ep is, so only the permutations
change with ep. (The sum of the routing statistics the aux losses read is a few floats.)

Context parallelism (parallel.cp) gives each rank s/cp tokens of every row, so every per-token term
above multiplies ``s*b/cp`` tokens (:func:`local_tokens`): activation memory falls as 1/cp. The
attention core changes with the exchange (``megasft.planner.context_parallel``): the ring keeps the
same saved tensors over the local tokens (K/V blocks from other ranks are in flight only while the
layer runs, a transient); all-to-all runs the core on the head shard, so the core's output and the
o_proj input are two tensors, and kv heads repeated for the exchange are kept at their repeated count.
"""
from __future__ import annotations

from dataclasses import dataclass

from megasft.config import Config
from megasft.layout import ZBV
from megasft.model.families import moe_ffn_size
from megasft.model.presets import norms_per_layer
from megasft.planner.assumptions import Assumptions
from megasft.planner.pinned import layout_of

ELEMENT_BYTES = {"bf16": 2, "fp32": 4}
FP32_BYTES = 4  # statistics kept in fp32 whatever the precision (RMSNorm, softmax, log-sum-exp)
INDEX_BYTES = 8  # int64 expert ids and slot permutations


def uses_flash_attention(cfg: Config) -> bool:
    """Whether the attention kernel avoids materialising s x s probabilities (planning for GPUs)."""
    return cfg.model.attention_backend != "sdpa"


def _sequence_shard(cfg: Config) -> int:
    return cfg.parallel.tp if layout_of(cfg).sequence_parallel else 1


def local_tokens(cfg: Config) -> int:
    """Tokens of one micro-batch a rank computes: s*b, or s*b/cp under context parallelism."""
    return cfg.data.seq_len * cfg.data.micro_batch_size // cfg.parallel.cp


def layer_bytes_per_token(cfg: Config, assumptions: Assumptions, moe: bool = False) -> float:
    """Bytes one TP rank keeps per token for a layer (a MoE layer with `moe`) without recomputation
    (attention core apart)."""
    m, t = cfg.model, cfg.parallel.tp
    e = ELEMENT_BYTES[cfg.train.precision]
    h, d, f = m.hidden_size, m.head_size, m.intermediate_size
    shard = _sequence_shard(cfg)
    linear_input = e * h / t if shard > 1 and assumptions.sp_regathers_inputs else e * h
    q_width = m.num_attention_heads // t * d
    kv_width = layout_of(cfg).kv_heads_per_rank * d
    norms = norms_per_layer(m) * ((FP32_BYTES + e) * h + FP32_BYTES) / shard   # Gemma: 4
    attention = linear_input + e * (q_width + 2 * kv_width) + e * q_width
    mlp = moe_bytes_per_token(cfg) if moe else linear_input + 4 * e * (f // t)
    dropout_masks = 2 * h / shard if m.dropout > 0 else 0.0
    return norms + attention + mlp + dropout_masks


def moe_bytes_per_token(cfg: Config) -> float:
    """Bytes one TP rank keeps per token of its TP region for a MoE layer's MLP (the module
    docstring's rows; uniform routing)."""
    m, t = cfg.model, cfg.parallel.tp
    e, h, k, experts = ELEMENT_BYTES[cfg.train.precision], m.hidden_size, m.moe_top_k, m.num_experts
    renormalised = FP32_BYTES * (k + 1) if m.moe_norm_topk_prob else 0
    router = e * h + 2 * FP32_BYTES * experts + FP32_BYTES + INDEX_BYTES * k + renormalised
    ffn = 4 * e * k * (moe_ffn_size(m) // t)
    permutations = INDEX_BYTES * k * (4 if cfg.parallel.ep > 1 else 2)
    return router / _sequence_shard(cfg) + e * k * h + ffn + e * k * h + e * k + permutations


def attention_core_bytes_per_token(cfg: Config) -> float:
    """Bytes per token the attention core keeps: fp32 log-sum-exp per head, plus for sdpa the
    additive [b, 1, s, s] mask row of the token (e*s bytes; one mask per layer, not per head).

    Neither path stores Korthikanti et al. 2022 eq. (1)'s 5as/h probabilities term; megasft has no
    attention dropout. Under context parallelism a local query's mask row still spans all s keys,
    and the all-to-all exchange adds :func:`a2a_extra_bytes_per_token`.
    """
    m, s = cfg.model, cfg.data.seq_len
    heads = m.num_attention_heads // cfg.parallel.tp
    core = 4.0 * heads + a2a_extra_bytes_per_token(cfg)
    if uses_flash_attention(cfg):
        return core
    return core + float(ELEMENT_BYTES[cfg.train.precision] * s)


def a2a_extra_bytes_per_token(cfg: Config) -> float:
    """What cp_comm=a2a keeps beyond the ring per local token: the core's head-sharded output next
    to the o_proj input (e*a_t*d), and K and V at their repeated head count k_a instead of k_t."""
    from megasft.planner.context_parallel import a2a_kv_heads

    layout = layout_of(cfg)
    if layout.cp == 1 or layout.cp_comm != "a2a":
        return 0.0
    m, e = cfg.model, ELEMENT_BYTES[cfg.train.precision]
    q_heads, kv = m.num_attention_heads // layout.tp, layout.kv_heads_per_rank
    return float(e * m.head_size * (q_heads + 2 * (a2a_kv_heads(kv, layout.cp) - kv)))


@dataclass(frozen=True)
class LayerActivations:
    """Activation bytes of one layer for one micro-batch on one rank."""

    stored: float
    """Kept from the layer's forward until its backward (what in-flight micro-batches multiply)."""
    full: float
    """Everything the layer's backward needs at once (rematerialised under full recompute)."""


def layer_activations(cfg: Config, assumptions: Assumptions, moe: bool = False) -> LayerActivations:
    """Activation bytes of a decoder layer (a MoE layer with `moe`) per micro-batch under ``model.recompute``."""
    tokens = local_tokens(cfg)
    body = layer_bytes_per_token(cfg, assumptions, moe) * tokens
    core = attention_core_bytes_per_token(cfg) * tokens
    full = body + core
    mode = cfg.model.recompute
    if mode == "full":
        e = ELEMENT_BYTES[cfg.train.precision]
        stored = e * cfg.model.hidden_size / _sequence_shard(cfg) * tokens
    elif mode == "selective":
        stored = body  # Korthikanti et al. 2022 eq. (6): the attention core is recomputed
    else:
        stored = full
    return LayerActivations(stored=stored, full=full)


def rank_layer_activations(cfg: Config, pp_rank: int, assumptions: Assumptions) -> list[tuple[LayerActivations, int]]:
    """(activations, how many of pipeline rank ``pp_rank``'s decoder layers have them): a layer's
    depend only on whether it is a MoE layer (the search plans thousands of layouts)."""
    from megasft.planner.moe import rank_moe_layers

    layers, moe = sum(layout_of(cfg).rank_chunk_layers(pp_rank)), rank_moe_layers(cfg, pp_rank)
    return [(layer_activations(cfg, assumptions, kind), n) for kind, n in ((False, layers - moe), (True, moe)) if n]


def held_activation_bytes(cfg: Config, pp_rank: int, assumptions: Assumptions) -> float:
    """Stored activations of the :func:`in_flight_layers` layer-micro-batches, each at the mean of the
    rank's layers (exact where they are alike, and without a pipeline, where each layer is held once)."""
    kinds = rank_layer_activations(cfg, pp_rank, assumptions)
    mean = sum(a.stored * n for a, n in kinds) / sum(n for _, n in kinds)
    return in_flight_layers(cfg, pp_rank) * mean


def in_flight_layers(cfg: Config, pp_rank: int) -> int:
    """Layer-micro-batches whose stored activations ``pp_rank`` holds at its peak.

    The n in-flight chunk forwards of a rank are, in Megatron's interleaved order, k = 0..n-1 on
    the rank's model chunk (k // pp) % v; with v = 1 all are the rank's only chunk. Under ZBV the
    pass order itself is weighed, each held chunk activation by its chunk's layers.
    """
    layout = layout_of(cfg)
    layers = layout.rank_chunk_layers(pp_rank)
    if layout.schedule == ZBV:
        from megasft.pipeline.zero_bubble_v import peak_in_flight_v
        return peak_in_flight_v(layout.pp, pp_rank, layout.micro_batches, tuple(layers))
    return sum(layers[(k // layout.pp) % len(layers)] for k in range(layout.in_flight(pp_rank)))


def loss_bytes(cfg: Config, assumptions: Assumptions) -> float:
    """Last stage: vocab-parallel logits/loss buffers plus the final-norm and LM-head inputs.

    megasft's vocab-parallel cross-entropy keeps one fp32 working copy of the logits, which becomes
    the softmax saved for backward and then, in place, the gradient; the model-dtype logits
    (forward) or their gradient (backward) sit next to it: 4 + e bytes per logit at the peak.
    The logits exist for one micro-batch at a time (1F1B runs each micro-batch's loss backward
    right after its forward); chunking the loss over tokens would bound them by the chunk.
    """
    m, p = cfg.model, cfg.parallel
    e = ELEMENT_BYTES[cfg.train.precision]
    tokens = local_tokens(cfg)
    chunk = min(tokens, assumptions.loss_chunk_tokens or tokens)
    logits = chunk * m.padded_vocab_size(p.tp) // p.tp * (FP32_BYTES + e)
    norm = ((FP32_BYTES + e) * m.hidden_size + FP32_BYTES) / _sequence_shard(cfg)
    head_input = e * m.hidden_size  # gathered to the full sequence before the LM head GEMM
    return logits + tokens * (norm + head_input)
