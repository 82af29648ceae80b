"""Named model shapes (Llama-3.1 8B/70B/405B, Qwen2.5 0.5B/72B, Qwen3-8B, Mistral-7B-v0.1, Gemma-2-9B,
Gemma-3-27B, Phi, the MoE Qwen3-30B-A3B and Mixtral-8x7B, tiny test models) and exact parameter counts.

A preset is a dict of :class:`megasft.config.ModelConfig` field values. ``Config.from_dict`` merges
it under the user's explicit ``model:`` keys, so ``model: {preset: llama3.1-8b, recompute: full}``
keeps every architecture number from here and only changes recomputation.

The Llama-3.1 numbers are those of Meta's released ``config.json`` files (Llama Team 2024,
"The Llama 3 Herd of Models", Table 3). The tiny presets leave ``vocab_size`` to the config, which
sets it from the tokenizer it trains with.
"""
from __future__ import annotations

import copy

from typing import TYPE_CHECKING

from megasft.errors import ConfigError
from megasft.model.families import is_moe_layer, moe_ffn_size

if TYPE_CHECKING:   # annotations only: config.py reads the presets at load time
    from megasft.config import ModelConfig

# Llama-3.1 extends the 8192-token pre-training context to 128K by rescaling RoPE frequencies
# ("llama3" rope_type, as in Hugging Face's modeling_rope_utils); all three sizes share it.
_LLAMA31_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

_LLAMA31_COMMON = {
    "vocab_size": 128256,
    "num_kv_heads": 8,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": _LLAMA31_ROPE_SCALING,
    "max_position_embeddings": 131072,
    "tie_embeddings": False,
    "qkv_bias": False,
}

_TINY_COMMON = {
    "hidden_size": 128,
    "intermediate_size": 344,
    "num_layers": 4,
    "num_attention_heads": 4,
    "num_kv_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 2048,
}

# One released size per further family, numbers from its config.json on the Hugging Face Hub.
_QWEN_COMMON = {"rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None, "qkv_bias": False}

PRESETS: dict[str, dict] = {
    "llama3.1-8b": {**_LLAMA31_COMMON, "hidden_size": 4096, "intermediate_size": 14336,
                    "num_layers": 32, "num_attention_heads": 32},
    "llama3.1-70b": {**_LLAMA31_COMMON, "hidden_size": 8192, "intermediate_size": 28672,
                     "num_layers": 80, "num_attention_heads": 64},
    "llama3.1-405b": {**_LLAMA31_COMMON, "hidden_size": 16384, "intermediate_size": 53248,
                      "num_layers": 126, "num_attention_heads": 128},
    "qwen2.5-0.5b": {**_QWEN_COMMON, "family": "qwen2", "qkv_bias": True, "vocab_size": 151936,
                     "hidden_size": 896, "intermediate_size": 4864, "num_layers": 24,
                     "num_attention_heads": 14, "num_kv_heads": 2, "max_position_embeddings": 32768,
                     "tie_embeddings": True},
    "qwen2.5-72b": {**_QWEN_COMMON, "family": "qwen2", "qkv_bias": True, "vocab_size": 152064,
                    "hidden_size": 8192, "intermediate_size": 29568, "num_layers": 80,
                    "num_attention_heads": 64, "num_kv_heads": 8, "max_position_embeddings": 32768,
                    "tie_embeddings": False},
    "qwen3-8b": {**_QWEN_COMMON, "family": "qwen3", "qk_norm": True, "vocab_size": 151936,
                 "hidden_size": 4096, "intermediate_size": 12288, "num_layers": 36,
                 "num_attention_heads": 32, "num_kv_heads": 8, "head_dim": 128,
                 "max_position_embeddings": 40960, "tie_embeddings": False},
    # Mistral-7B-v0.1: the release with a 4096-token sliding window on every layer.
    "mistral-7b-v0.1": {"family": "mistral", "vocab_size": 32000, "hidden_size": 4096,
                        "intermediate_size": 14336, "num_layers": 32, "num_attention_heads": 32,
                        "num_kv_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None,
                        "max_position_embeddings": 32768, "sliding_window": 4096,
                        "tie_embeddings": False, "qkv_bias": False},
    # Gemma-2-9B: every other layer (from layer 0) has a 4096-token window; logits soft-capped.
    "gemma2-9b": {"family": "gemma2", "vocab_size": 256000, "hidden_size": 3584, "intermediate_size": 14336,
                  "num_layers": 42, "num_attention_heads": 16, "num_kv_heads": 8, "head_dim": 256,
                  "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None, "max_position_embeddings": 8192,
                  "sliding_window": 4096, "layer_types": ["sliding_attention", "full_attention"] * 21,
                  "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                  "tie_embeddings": True, "qkv_bias": False},
    # Gemma-3-27B, the text decoder of the release (its config.json text_config): five 1024-token
    # sliding layers (rope base 10k) per global layer (rope base 1M, linear scaling x8).
    "gemma3-27b": {"family": "gemma3_text", "vocab_size": 262208, "hidden_size": 5376, "intermediate_size": 21504,
                   "num_layers": 62, "num_attention_heads": 32, "num_kv_heads": 16, "head_dim": 128,
                   "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
                   "rope_local_theta": 10000.0, "max_position_embeddings": 131072, "sliding_window": 1024,
                   "layer_types": [("full_attention" if (i + 1) % 6 == 0 else "sliding_attention") for i in range(62)],
                   "query_pre_attn_scalar": 168, "final_logit_softcapping": None, "qk_norm": True,
                   "tie_embeddings": True, "qkv_bias": False},
    # Phi-4 (14B, Phi3ForCausalLM; no rope scaling, no window) and Phi-3-mini-4k (2047-token window).
    "phi-4": {"family": "phi3", "vocab_size": 100352, "hidden_size": 5120, "intermediate_size": 17920,
              "num_layers": 40, "num_attention_heads": 40, "num_kv_heads": 10, "rms_norm_eps": 1e-5,
              "rope_theta": 250000.0, "rope_scaling": None, "max_position_embeddings": 16384,
              "original_max_position_embeddings": 16384, "tie_embeddings": False, "qkv_bias": False},
    "phi-3-mini-4k": {"family": "phi3", "vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192,
                      "num_layers": 32, "num_attention_heads": 32, "num_kv_heads": 32, "rms_norm_eps": 1e-5,
                      "rope_theta": 10000.0, "rope_scaling": None, "max_position_embeddings": 4096,
                      "original_max_position_embeddings": 4096, "sliding_window": 2047,
                      "tie_embeddings": False, "qkv_bias": False},
    # Test/example shapes: GQA (2 kv heads for 4 query heads) so tp=2 splits kv heads and tp=4
    # replicates them; the variants cover tied embeddings and Qwen2-style q/k/v biases.
    # Qwen3-30B-A3B: 128 experts of width 768 on every layer, 8 routed per token (3.3B active).
    "qwen3-30b-a3b": {**_QWEN_COMMON, "family": "qwen3_moe", "qk_norm": True, "vocab_size": 151936,
                      "hidden_size": 2048, "intermediate_size": 6144, "num_layers": 48,
                      "num_attention_heads": 32, "num_kv_heads": 4, "head_dim": 128,
                      "max_position_embeddings": 40960, "tie_embeddings": False, "num_experts": 128,
                      "moe_top_k": 8, "moe_intermediate_size": 768, "moe_norm_topk_prob": True},
    # Mixtral-8x7B-v0.1: 8 experts as wide as Mistral-7B's MLP on every layer, 2 per token, no window.
    "mixtral-8x7b": {"family": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                     "num_layers": 32, "num_attention_heads": 32, "num_kv_heads": 8, "rms_norm_eps": 1e-5,
                     "rope_theta": 1000000.0, "rope_scaling": None, "max_position_embeddings": 32768,
                     "tie_embeddings": False, "qkv_bias": False, "num_experts": 8, "moe_top_k": 2},
    "tiny": {**_TINY_COMMON, "tie_embeddings": False, "qkv_bias": False},
    "tiny-tied": {**_TINY_COMMON, "tie_embeddings": True, "qkv_bias": False},
    "tiny-qkv-bias": {**_TINY_COMMON, "tie_embeddings": False, "qkv_bias": True},
    "tiny-gemma3": {**_TINY_COMMON, "family": "gemma3_text", "qk_norm": True, "tie_embeddings": True,
                    "qkv_bias": False, "sliding_window": 16, "query_pre_attn_scalar": 32, "rope_local_theta": 1000.0,
                    "layer_types": ["sliding_attention"] * 3 + ["full_attention"], "final_logit_softcapping": 30.0},
}


def preset_fields(name: str) -> dict:
    """ModelConfig field values of preset ``name`` (a deep copy the caller may modify)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; valid presets: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def layer_parameter_count(model: ModelConfig, layer: int = 0) -> int:
    """Parameters of decoder layer `layer`: GQA attention (with q/k/v biases and q/k norms when the
    family has them), the SwiGLU MLP or its MoE (router [E, h], E experts and the shared experts; a
    DeepSeek router's bias is state, a buffer in transformers, and not counted) and the two RMSNorm
    weights (four for Gemma)."""
    h, d, f = model.hidden_size, model.head_size, model.intermediate_size
    q_width, kv_width = model.num_attention_heads * d, model.kv_heads * d
    attention = h * q_width + 2 * h * kv_width + q_width * h  # q, k, v, o projections
    if model.qkv_bias:
        attention += q_width + 2 * kv_width
    if model.qk_norm:
        attention += 2 * d  # one [d] RMSNorm weight each for q and k (Qwen3)
    mlp = 3 * h * f  # gate, up (h -> f) and down (f -> h)
    if is_moe_layer(model, layer):
        mlp = model.num_experts * (3 * h * moe_ffn_size(model) + h)   # each expert's SwiGLU and router row
        mlp += 3 * h * moe_ffn_size(model) * model.moe_shared_experts     # DeepSeek's shared experts
    return attention + mlp + norms_per_layer(model) * h


def norms_per_layer(model: ModelConfig) -> int:
    """[hidden] RMSNorm weights per decoder layer: before attention and MLP, and Gemma's after each."""
    from megasft.model.families import family_of

    return 4 if family_of(model.family).gemma else 2


def count_parameters(model: ModelConfig, vocab_size: int | None = None) -> int:
    """Exact parameter count of the whole model, as ``sum(p.numel())`` over a Hugging Face model.

    ``vocab_size`` defaults to the tokenizer's (unpadded) vocabulary; pass
    ``model.padded_vocab_size(tp)`` to count the rows megasft actually allocates. A tied
    embedding is counted once, as ``nn.Module.parameters()`` does.
    """
    vocab = model.vocab_size if vocab_size is None else vocab_size
    embedding = vocab * model.hidden_size
    head = 0 if model.tie_embeddings else vocab * model.hidden_size
    final_norm = model.hidden_size
    return embedding + head + final_norm + sum(layer_parameter_count(model, i) for i in range(model.num_layers))
