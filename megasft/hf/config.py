"""config.json of a Hugging Face model directory <-> megasft ModelConfig, through the family specs
of megasft.model.families.

Import refuses, by name, an architecture megasft does not implement: an unknown ``model_type`` or
``architectures``, a config key the family does not know (it might change the math), a fixed
key with another value (``hidden_act``, ``attention_bias``, ...), an unsupported ``rope_type``.
Export writes the source config.json back (kept in ModelConfig.hf_config) with megasft's
architecture fields over it, so HF -> megasft -> HF gives the same config.json.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from megasft.errors import ConfigError
from megasft.model.families import FAMILIES, Family, deepseek_moe_options, moe_ffn_size, option_list

if TYPE_CHECKING:   # annotations only: megasft.config reads config.json through this module
    from megasft.config import ModelConfig

ROPE_TYPES = ("default", "llama3", "linear", "longrope", "su")   # what megasft.model.rope implements


def family_of_hf(config: dict, where: str = "config.json") -> Family:
    """The family of a HF config dict; ConfigError naming model_type / architectures otherwise."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ConfigError(f"{where}: model_type={model_type!r} is not supported by megasft; supported "
                          f"model types: {sorted(FAMILIES)}")
    family = FAMILIES[model_type]
    archs = config.get("architectures") or [family.architecture]
    if list(archs) != [family.architecture]:
        raise ConfigError(f"{where}: architectures={list(archs)} is not supported for model_type "
                          f"{model_type}; megasft trains {family.architecture} only")
    return family


def _check_keys(config: dict, family: Family, where: str) -> None:
    unknown = sorted(set(config) - family.known_keys)
    if unknown:
        raise ConfigError(f"{where}: field {unknown[0]}={config[unknown[0]]!r} is not understood by megasft's "
                          f"{family.name} family and may change the model's math; megasft refuses rather "
                          "than convert silently (remove it only if it is known not to matter)")
    for key, value in family.fixed.items():
        if key in config and config[key] != value:
            raise ConfigError(f"{where}: {key}={config[key]!r} is not supported for model_type {family.name}; "
                              f"megasft implements {key}={value!r}")
    layer_types = config.get("layer_types") or []
    other = [(i, t) for i, t in enumerate(layer_types) if t != "full_attention"]
    if other and not family.gemma:
        raise ConfigError(f"{where}: layer_types[{other[0][0]}]={other[0][1]!r} is not supported for "
                          f"model_type {family.name}; megasft implements full_attention layers only")


def _rope(config: dict, family: Family, where: str, default_theta: float = 10000.0) -> tuple[float, Optional[dict], float]:
    """(rope_theta, rope_scaling or None, partial_rotary_factor) from either transformers form:
    rope_parameters (5.x, theta inside; Gemma 3's per layer type, of which the full_attention
    layers' is this one) or rope_theta + rope_scaling (4.x). A Phi-3 scaling dict is kept whole
    (with its partial_rotary_factor and L0 as transformers 5 writes them), so it round-trips."""
    rope = config.get("rope_parameters") or config.get("rope_scaling")
    if rope and "full_attention" in rope:
        rope = rope["full_attention"]
    theta = config.get("rope_theta") or (rope or {}).get("rope_theta", default_theta)
    rope = None if rope is None else {k: v for k, v in rope.items() if k != "rope_theta"}
    kind = (rope or {}).get("rope_type", (rope or {}).get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ConfigError(f"{where}: rope_type={kind!r} is not supported by megasft; supported: {list(ROPE_TYPES)}")
    # transformers reads rope_parameters' partial_rotary_factor first, then the top-level key
    partial = (rope or {}).get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if family.phi_rope:   # the default rope's dict says only the partial factor, kept as a field
        plain = kind == "default" and not set(rope or {}) - {"rope_type", "type", "partial_rotary_factor"}
        return float(theta), (None if plain else rope), float(partial)
    if kind in ("longrope", "su"):
        raise ConfigError(f"{where}: rope_type={kind!r} is supported for model_type phi3 only, not {family.name}")
    if partial != 1.0:
        raise ConfigError(f"{where}: partial_rotary_factor={partial} is not supported for model_type "
                          f"{family.name}; megasft rotates the whole head (1.0)")
    return float(theta), (None if kind == "default" else rope), 1.0


def _gemma_fields(config: dict, family: Family, where: str) -> dict:
    """Gemma's per-layer attention kinds, scale, soft-caps and local rope base, with transformers'
    defaults for keys an older config.json lacks (Gemma 2 alternates sliding / full from layer 0;
    Gemma 3 has one full layer in sliding_window_pattern)."""
    gemma2 = family.name == "gemma2"
    if not family.gemma:
        return dict(layer_types=None, query_pre_attn_scalar=None, attn_logit_softcapping=None,
                    final_logit_softcapping=None, rope_local_theta=None)
    pattern = 2 if gemma2 else config.get("sliding_window_pattern", config.get("_sliding_window_pattern", 6))
    layer_types = config.get("layer_types") or [
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(config["num_hidden_layers"])]
    local = None
    if not gemma2:
        rope = config.get("rope_parameters") or {}
        local_rope = rope.get("sliding_attention") or {"rope_theta": config.get("rope_local_base_freq", 10000.0)}
        if local_rope.get("rope_type", "default") != "default":
            raise ConfigError(f"{where}: rope_parameters.sliding_attention rope_type={local_rope['rope_type']!r} is "
                              "not supported; megasft rotates the sliding layers with the default rope")
        local = float(local_rope["rope_theta"])
    return dict(layer_types=list(layer_types), query_pre_attn_scalar=config.get("query_pre_attn_scalar", 256),
                attn_logit_softcapping=config.get("attn_logit_softcapping", 50.0) if gemma2 else None,
                final_logit_softcapping=config.get("final_logit_softcapping", 30.0 if gemma2 else None),
                rope_local_theta=local)


def _moe_fields(config: dict, family: Family) -> dict:
    """The mixture-of-experts fields, with transformers' defaults for keys a config.json lacks.
    Qwen3-MoE's dense layers (mlp_only_layers, and every layer l with (l + 1) % decoder_sparse_step
    != 0, as Qwen3MoeDecoderLayer decides) become one list."""
    if not family.moe:
        return dict(num_experts=0, moe_top_k=2, moe_intermediate_size=None, moe_norm_topk_prob=True,
                    moe_dense_layers=None)
    if family.name == "mixtral":
        return dict(num_experts=config.get("num_local_experts", 8), moe_top_k=config.get("num_experts_per_tok", 2),
                    moe_intermediate_size=None, moe_norm_topk_prob=True, moe_dense_layers=None)
    step = config.get("decoder_sparse_step", 1)
    dense = set(config.get("mlp_only_layers") or []) | {
        i for i in range(config["num_hidden_layers"]) if (i + 1) % step != 0}
    return dict(num_experts=config.get("num_experts", config.get("num_local_experts", 128)),
                moe_top_k=config.get("num_experts_per_tok", 8),
                moe_intermediate_size=config.get("moe_intermediate_size", 768),
                moe_norm_topk_prob=bool(config.get("norm_topk_prob", False)),
                moe_dense_layers=sorted(dense) or None)


def _qwen_moe_layer_keys(m: ModelConfig) -> dict:
    """decoder_sparse_step and mlp_only_layers saying m.moe_dense_layers: the largest step whose
    skipped layers are all dense, the rest listed (so a source config.json's own form comes back)."""
    dense = set(m.moe_dense_layers or ())
    step = max(s for s in range(1, m.num_layers + 1)
               if all(i in dense for i in range(m.num_layers) if (i + 1) % s != 0))
    rest = sorted(i for i in dense if (i + 1) % step == 0)
    return {"decoder_sparse_step": step, "mlp_only_layers": rest}


def model_fields_from_hf(config: dict, where: str = "config.json") -> dict:
    """The ModelConfig architecture fields of a HF config dict (ConfigError when megasft cannot
    train that architecture exactly)."""
    family = family_of_hf(config, where)
    _check_keys(config, family, where)
    theta, scaling, partial = _rope(config, family, where, 1e6 if family.name == "gemma3_text" else 10000.0)
    heads = config["num_attention_heads"]
    # Phi3Config's default when the key is absent; the top-level value overrides rope_parameters'
    original = config.get("original_max_position_embeddings", 4096) if family.phi_rope else None
    return dict(
        family=family.name, vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], num_layers=config["num_hidden_layers"],
        num_attention_heads=heads, num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim"), rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=theta, rope_scaling=scaling, partial_rotary_factor=partial,
        original_max_position_embeddings=original,
        max_position_embeddings=config.get("max_position_embeddings", 4096),
        tie_embeddings=bool(config.get("tie_word_embeddings", family.gemma)),   # Gemma ties by default
        qkv_bias=family.qkv_bias, qk_norm=family.qk_norm,
        sliding_window=config.get("sliding_window", 4096 if family.gemma else None) if family.sliding_window else None,
        **_gemma_fields(config, family, where), **_moe_fields(config, family))


def merge_hf_architecture(model_raw: dict) -> dict:
    """Raw ``model:`` fields with the architecture of ``init_from_hf``'s config.json filled in.
    A field the YAML (or its preset) sets to another value is a ConfigError naming both; without
    a config.json nothing changes (megasft.train reports the missing directory)."""
    file = Path(model_raw["init_from_hf"]) / "config.json"
    if not file.is_file():
        return model_raw
    config = json.loads(file.read_text())
    fields = model_fields_from_hf(config, str(file))
    for key, value in fields.items():
        given = model_raw.get(key)
        if given is not None and given != value:
            raise ConfigError(f"model.{key}={given!r} conflicts with {value!r} from {file} (model.init_from_hf); "
                              f"drop model.{key} (the checkpoint's architecture is used) or point "
                              "init_from_hf at a matching model")
    return {**model_raw, **fields, "hf_config": config}


def _installed_rope_form() -> str:
    """'rope_parameters' with transformers >= 5 installed (or none), else 'rope_scaling'."""
    try:
        import transformers
    except ImportError:
        return "rope_parameters"
    return "rope_parameters" if int(transformers.__version__.split(".")[0]) >= 5 else "rope_scaling"


def _architecture_keys(m: ModelConfig, family: Family, rope_form: str) -> dict:
    """config.json keys that fix the architecture of `m`, in the given rope form."""
    keys = {
        "vocab_size": m.vocab_size, "hidden_size": m.hidden_size, "intermediate_size": m.intermediate_size,
        "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.kv_heads, "rms_norm_eps": m.rms_norm_eps,
        "max_position_embeddings": m.max_position_embeddings, "tie_word_embeddings": m.tie_embeddings,
        **family.fixed,
    }
    local = family.name == "gemma3_text"
    if rope_form == "rope_parameters":
        keys["rope_parameters"] = {"rope_theta": m.rope_theta, **(m.rope_scaling or {"rope_type": "default"})}
        if local:   # Gemma 3: one rope per layer type
            keys["rope_parameters"] = {"full_attention": keys["rope_parameters"], "sliding_attention": {
                "rope_type": "default", "rope_theta": m.rope_local_theta or m.rope_theta}}
        if family.phi_rope:   # Phi3Config always writes it there
            keys["rope_parameters"]["partial_rotary_factor"] = m.partial_rotary_factor
    else:
        keys.update(rope_theta=m.rope_theta, rope_scaling=m.rope_scaling)
        if local:
            keys["rope_local_base_freq"] = m.rope_local_theta or m.rope_theta
    if m.head_dim is not None or not family.phi_rope:   # Phi3Config has no head_dim (hidden // heads)
        keys["head_dim"] = m.head_size
    if family.sliding_window:
        keys["sliding_window"] = m.sliding_window
    if family.gemma:
        keys.update(layer_types=m.layer_types or ["full_attention"] * m.num_layers,
                    query_pre_attn_scalar=m.query_pre_attn_scalar or m.head_size,
                    final_logit_softcapping=m.final_logit_softcapping)
        if family.name == "gemma2":
            keys["attn_logit_softcapping"] = m.attn_logit_softcapping
    if family.name == "mixtral":
        keys.update(num_local_experts=m.num_experts, num_experts_per_tok=m.moe_top_k)
    elif family.moe:   # Qwen3-MoE (its Hub files say num_experts; transformers 5 reads both)
        keys.update(num_experts=m.num_experts, num_experts_per_tok=m.moe_top_k,
                    moe_intermediate_size=moe_ffn_size(m), norm_topk_prob=m.moe_norm_topk_prob,
                    **_qwen_moe_layer_keys(m))
    if family.phi_rope:   # the L0 megasft.model.rope.longrope_original_length uses, made explicit
        keys["original_max_position_embeddings"] = (m.original_max_position_embeddings or (m.rope_scaling or {}).get(
            "original_max_position_embeddings") or m.max_position_embeddings)
        if m.partial_rotary_factor != 1.0:
            keys["partial_rotary_factor"] = m.partial_rotary_factor
    return keys


def export_family(m: ModelConfig) -> Family:
    """The family an export is written as: Llama with q/k/v biases is the Qwen2 architecture."""
    return FAMILIES["qwen2" if m.family == "llama" and m.qkv_bias else m.family]


def hf_form_problem(m: ModelConfig) -> Optional[str]:
    """Why `m` has no Hugging Face form (config.json and tensors) megasft can write or read, or None.
    DeepSeek-V3's MoE options have no config.json key or tensors in the families megasft converts
    (and DeepSeek-V3's own family needs MLA attention, which megasft lacks): an export would
    silently give transformers another model, an import would lack the bias and shared experts."""
    held = {k: v for k, v in deepseek_moe_options(m).items() if k != "moe_bias_update_rate"}   # training-only
    if not held:
        return None
    return (f"{option_list(held)} (DeepSeek-V3's MoE) have no Hugging Face form in megasft: {export_family(m).architecture} "
            "has no such routing or shared experts, and DeepSeek-V3's own architecture needs MLA attention, "
            "which megasft does not implement")


def hf_config_from_model(m: ModelConfig, dtype: str = "bfloat16", eos_token_id=None, bos_token_id=None) -> dict:
    """A config.json transformers loads as `m`'s family. With m.hf_config (the source config) it is
    that config with the architecture keys overwritten (only keys it had, unless one it lacked is
    needed to say the same model); ids given here replace the source's. ConfigError for a model
    no HF family holds (hf_form_problem)."""
    problem = hf_form_problem(m)
    if problem:
        raise ConfigError(f"{problem}; keep the megasft checkpoint")
    family = export_family(m)
    source = m.hf_config if m.hf_config and m.hf_config.get("model_type") == family.name else None
    if source is None:
        config = {"architectures": [family.architecture], "model_type": family.name,
                  **_architecture_keys(m, family, _installed_rope_form())}
        config.update(bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    else:
        form = "rope_parameters" if "rope_parameters" in source else "rope_scaling"
        wanted = _architecture_keys(m, family, form)
        config = {**source, **{k: v for k, v in wanted.items() if k in source}}
        if model_fields_from_hf(config) != model_fields_from_hf({**config, **wanted}):
            config.update(wanted)
        for key, value in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id)):
            if value is not None:
                config[key] = value
    config["torch_dtype" if "torch_dtype" in config else "dtype"] = dtype
    return config


def read_hf_config(path: str | Path) -> dict:
    file = Path(path) / "config.json"
    if not file.exists():
        raise FileNotFoundError(f"{file} not found: model.init_from_hf must be a Hugging Face model directory")
    return json.loads(file.read_text())
