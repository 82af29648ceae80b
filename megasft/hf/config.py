"""config.json of a Hugging Face Llama / Qwen2 directory <-> megasft ModelConfig."""
from __future__ import annotations

import json
from pathlib import Path

from megasft.config import ModelConfig


def model_fields_from_hf(config: dict) -> dict:
    """ModelConfig fields from a HF LlamaConfig / Qwen2Config dict."""
    rope = config.get("rope_scaling") or config.get("rope_parameters")
    theta = config.get("rope_theta") or (rope or {}).get("rope_theta", 10000.0)
    if rope is not None:
        rope = {k: v for k, v in rope.items() if k != "rope_theta"}
        if rope.get("rope_type", rope.get("type")) in (None, "default"):
            rope = None
    heads = config["num_attention_heads"]
    return dict(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], num_layers=config["num_hidden_layers"],
        num_attention_heads=heads, num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim"), rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta), rope_scaling=rope,
        max_position_embeddings=config.get("max_position_embeddings", 4096),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=config.get("model_type") == "qwen2" or bool(config.get("attention_bias", False)))


def hf_config_from_model(m: ModelConfig, dtype: str = "bfloat16", eos_token_id=None, bos_token_id=None) -> dict:
    """A config.json for transformers (LlamaForCausalLM; Qwen2ForCausalLM when qkv_bias)."""
    qwen = m.qkv_bias
    config = {
        "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen else "llama",
        "vocab_size": m.vocab_size, "hidden_size": m.hidden_size,
        "intermediate_size": m.intermediate_size, "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads, "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_size, "hidden_act": "silu", "rms_norm_eps": m.rms_norm_eps,
        "rope_theta": m.rope_theta, "rope_scaling": m.rope_scaling,
        "max_position_embeddings": m.max_position_embeddings,
        "tie_word_embeddings": m.tie_embeddings, "torch_dtype": dtype,
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
    }
    if not qwen:
        config.update(attention_bias=False, mlp_bias=False)
    else:
        config.update(use_sliding_window=False)
    return config


def read_hf_config(path: str | Path) -> dict:
    file = Path(path) / "config.json"
    if not file.exists():
        raise FileNotFoundError(f"{file} not found: model.init_from_hf must be a Hugging Face model directory")
    return json.loads(file.read_text())
