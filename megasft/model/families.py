"""Model families: small declarative specs over the one decoder (megasft.model.llama).

A family is what a Hugging Face ``model_type`` adds to the Llama decoder — biases on q/k/v
(Qwen2), a per-head RMSNorm on q and k (Qwen3), a sliding attention window (Mistral), Gemma's
(1 + w) norms around both sublayers, GeGLU and scaled embedding, fused checkpoint tensors and
partial / longrope rotary embeddings (Phi-3), mixture-of-experts MLPs (Qwen3-MoE, Mixtral; DeepSeek-V3's
routing and shared experts as options of qwen3_moe, with no config.json form) — and
which ``config.json`` keys it reads. The
decoder reads ModelConfig flags and numbers (``qkv_bias``, ``qk_norm``, ``sliding_window``,
``layer_types``, soft-caps, ...) and, for what a family fixes for every size, its Family
(``gemma``); megasft.hf.config turns config.json into those fields through the spec here and
back, and refuses any key it does not know, so an architecture megasft does not implement is an
error naming it, never a silent conversion.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# config.json keys every family reads (mapped onto ModelConfig by megasft.hf.config) ...
MODEL_KEYS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
    "max_position_embeddings", "tie_word_embeddings", "layer_types",
})
# ... and the keys that do not change the model's math (generation ids, bookkeeping, HF defaults).
NEUTRAL_KEYS = frozenset({
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "bos_token_id",
    "eos_token_id", "pad_token_id", "use_cache", "initializer_range", "_name_or_path",
    "output_hidden_states", "output_attentions", "return_dict", "chunk_size_feed_forward",
    "is_encoder_decoder", "id2label", "label2id", "problem_type", "tokenizer_class",
})


@dataclass(frozen=True)
class Family:
    """What one HF model_type is, over the Llama decoder."""

    name: str                       # ModelConfig.family and config.json model_type
    architecture: str               # config.json architectures[0]
    qkv_bias: bool = False          # q/k/v projections carry biases (o_proj never does)
    qk_norm: bool = False           # per-head RMSNorm on q and k before RoPE (Qwen3)
    sliding_window: bool = False    # config.json sliding_window applies (every layer, or per layer_types)
    gemma: bool = False
    """Gemma's fixed structure: (1 + w) RMSNorms (weights init 0) before and after attention and
    MLP, GeGLU (tanh GELU) MLP, embedding times sqrt(hidden); reads layer_types,
    query_pre_attn_scalar and the logit soft-caps."""
    fixed: dict[str, Any] = field(default_factory=dict)
    """config.json keys whose value megasft implements and no other (checked on import, written on
    export): e.g. hidden_act must be 'silu'."""
    keys: frozenset[str] = frozenset()
    """Further config.json keys the family reads beyond MODEL_KEYS / NEUTRAL_KEYS / fixed."""
    fused: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """Tensors the HF checkpoint stores fused, per layer: (stored name, the canonical tensors it
    concatenates along dim 0, in order); megasft.hf.names splits them on import, fuses on export."""
    phi_rope: bool = False
    """Reads partial_rotary_factor and the top-level original_max_position_embeddings (Phi-3)."""
    moe: bool = False
    """Mixture-of-experts MLPs (megasft.model.moe): reads num_experts, num_experts_per_tok, ...;
    a model of this family needs model.num_experts > 0 and a dense family forbids it."""
    renamed: tuple[tuple[str, str], ...] = ()
    """Per-layer tensors the HF checkpoint stores under another name: (regex over the canonical
    in-layer name, its stored name as a re.sub replacement), e.g. Mixtral's experts' w1 for the
    canonical (Qwen3-MoE) gate_proj; megasft.hf.names renames on import and export."""

    @property
    def known_keys(self) -> frozenset[str]:
        return MODEL_KEYS | NEUTRAL_KEYS | frozenset(self.fixed) | self.keys


_SILU = {"hidden_act": "silu", "attention_dropout": 0.0}
# Qwen's windows apply only to layers >= max_window_layers and only with use_sliding_window:
# megasft implements one window for every layer, so it reads Qwen configs with windows off.
_QWEN = {**_SILU, "use_sliding_window": False}
# Every MoE family's: the expert count as transformers 5 writes it (num_local_experts; Qwen's Hub
# files say num_experts), top-k, and the training-only aux-loss switches (megasft's coefficient is
# model.moe_aux_loss_coef, not the file's).
_MOE_KEYS = frozenset({"num_local_experts", "num_experts_per_tok", "router_aux_loss_coef", "output_router_logits"})
_GEMMA = {"hidden_activation": "gelu_pytorch_tanh", "attention_dropout": 0.0, "attention_bias": False,
          "use_bidirectional_attention": None}
_GEMMA_KEYS = frozenset({"sliding_window", "query_pre_attn_scalar", "final_logit_softcapping", "hidden_act",
                         "sliding_window_size", "cache_implementation"})

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", "LlamaForCausalLM", fixed={**_SILU, "attention_bias": False, "mlp_bias": False},
           keys=frozenset({"pretraining_tp"})),
    # Qwen's sliding_window is inert while use_sliding_window is false (which fixed enforces).
    Family("qwen2", "Qwen2ForCausalLM", qkv_bias=True, fixed=_QWEN,
           keys=frozenset({"max_window_layers", "sliding_window"})),
    Family("qwen3", "Qwen3ForCausalLM", qk_norm=True, fixed={**_QWEN, "attention_bias": False},
           keys=frozenset({"max_window_layers", "sliding_window"})),
    Family("mistral", "MistralForCausalLM", sliding_window=True, fixed=_SILU, keys=frozenset({"sliding_window"})),
    # Gemma 2/3: transformers ignores hidden_act, sliding_window_size and cache_implementation
    # (older config.json files carry them); Gemma 3's attention ignores attn_logit_softcapping.
    Family("gemma2", "Gemma2ForCausalLM", sliding_window=True, gemma=True, fixed=_GEMMA,
           keys=_GEMMA_KEYS | {"attn_logit_softcapping"}),
    Family("gemma3_text", "Gemma3ForCausalLM", qk_norm=True, sliding_window=True, gemma=True,
           fixed={**_GEMMA, "use_bidirectional_attention": False, "attn_logit_softcapping": None},
           keys=_GEMMA_KEYS | {"rope_local_base_freq", "sliding_window_pattern", "_sliding_window_pattern"}),
    # Phi-3 / Phi-4: Llama's math in fused tensors (transformers' Phi3Attention slices qkv_proj
    # as [q; k; v], Phi3MLP chunks gate_up_proj as [gate; up]); Mistral's window when set.
    # Qwen3-MoE: Qwen3's attention with routed SwiGLU experts on every layer not kept dense by
    # decoder_sparse_step / mlp_only_layers; the HF files hold each expert's tensors by name.
    Family("qwen3_moe", "Qwen3MoeForCausalLM", qk_norm=True, moe=True, fixed={**_QWEN, "attention_bias": False},
           keys=frozenset({"max_window_layers", "sliding_window"}) | _MOE_KEYS | {
               "num_experts", "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers"}),
    # Mixtral: Mistral's attention (and window), every layer MoE with intermediate_size-wide experts
    # and renormalised top-k weights; stored as block_sparse_moe.{gate, experts.E.w1/w2/w3}.
    Family("mixtral", "MixtralForCausalLM", sliding_window=True, moe=True, fixed={**_SILU, "router_jitter_noise": 0.0},
           keys=frozenset({"sliding_window"}) | _MOE_KEYS,
           renamed=((r"mlp\.experts\.(\d+)\.gate_proj\.weight", r"block_sparse_moe.experts.\1.w1.weight"),
                    (r"mlp\.experts\.(\d+)\.down_proj\.weight", r"block_sparse_moe.experts.\1.w2.weight"),
                    (r"mlp\.experts\.(\d+)\.up_proj\.weight", r"block_sparse_moe.experts.\1.w3.weight"),
                    (r"mlp\.gate\.weight", "block_sparse_moe.gate.weight"))),
    Family("phi3", "Phi3ForCausalLM", sliding_window=True, phi_rope=True,
           fixed={**_SILU, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attention_bias": False},
           keys=frozenset({"sliding_window", "original_max_position_embeddings", "partial_rotary_factor"}),
           fused=(("self_attn.qkv_proj.weight", ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                 "self_attn.v_proj.weight")),
                  ("mlp.gate_up_proj.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight")))),
)}


def family_of(name: str) -> Family:
    from megasft.config import ConfigError

    if name not in FAMILIES:
        raise ConfigError(f"model.family={name!r} is not one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_problem(family: str, qkv_bias: bool, qk_norm: bool, sliding_window) -> str | None:
    """Why these ModelConfig flags are not a model of `family` (its export would be another model),
    or None. Llama with qkv_bias is accepted as the Qwen2 shape it always was (exported as qwen2)."""
    f = family_of(family)
    if qk_norm != f.qk_norm:
        owner = [n for n, g in FAMILIES.items() if g.qk_norm] if qk_norm else [family]
        return (f"model.qk_norm={qk_norm} is not a {family} model; per-head q/k norms belong to "
                f"family {owner[0]} (set model.family={owner[0]}) or set model.qk_norm={f.qk_norm}")
    if f.qkv_bias and not qkv_bias:
        return f"model.family={family} has q/k/v biases; set model.qkv_bias=true"
    if qkv_bias and family not in ("llama", "qwen2"):
        return f"model.qkv_bias=true is not a {family} model; use model.family=qwen2 or qkv_bias=false"
    if sliding_window is not None and not f.sliding_window:
        windowed = [n for n, g in FAMILIES.items() if g.sliding_window]
        return (f"model.sliding_window={sliding_window} is not supported for family {family}; use "
                f"model.family in {windowed} or leave sliding_window unset")
    return None


# ModelConfig fields only some families have -> those families.
_GEMMAS = ("gemma2", "gemma3_text")
FIELD_OWNERS = {"query_pre_attn_scalar": _GEMMAS, "final_logit_softcapping": _GEMMAS, "layer_types": _GEMMAS,
                "attn_logit_softcapping": ("gemma2",), "rope_local_theta": ("gemma3_text",)}


def gemma_problem(m) -> str | None:
    """Why the Gemma fields of ModelConfig `m` (layer_types, soft-caps, query_pre_attn_scalar,
    rope_local_theta) do not fit its family, or None."""
    for name, owners in FIELD_OWNERS.items():
        if getattr(m, name) is not None and m.family not in owners:
            return (f"model.{name}={getattr(m, name)!r} is not part of family {m.family}; it belongs to "
                    f"{' / '.join(owners)} (set model.family) or leave model.{name} unset")
    if m.layer_types is not None:
        kinds = ("full_attention", "sliding_attention")
        bad = [(i, t) for i, t in enumerate(m.layer_types) if t not in kinds]
        if bad:
            return f"model.layer_types[{bad[0][0]}]={bad[0][1]!r} is not one of {list(kinds)}"
        if len(m.layer_types) != m.num_layers:
            return (f"model.layer_types has {len(m.layer_types)} entries for num_layers={m.num_layers}; "
                    "give one per layer")
        if "sliding_attention" in m.layer_types and m.sliding_window is None:
            return "model.layer_types has sliding_attention layers but model.sliding_window is unset; set it"
    return None


def layer_window(m, layer: int):
    """The sliding window of decoder layer `layer` (None = full causal attention): every layer's
    with no layer_types (Mistral), else only the sliding_attention layers' (Gemma)."""
    if m.layer_types is None or m.layer_types[layer] == "sliding_attention":
        return m.sliding_window
    return None


def rope_field_problem(family: str, rope_scaling, partial_rotary_factor: float,
                       original_max_position_embeddings) -> str | None:
    """Why Phi-3's rope settings are set on a family megasft does not test them with, or None."""
    if family_of(family).phi_rope:
        return None
    kind = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type"))
    if kind in ("longrope", "su"):
        return (f"model.rope_scaling rope_type={kind!r} is supported for family phi3 only (not {family}); "
                "use model.family=phi3 or another rope_type")
    if partial_rotary_factor != 1.0:
        return (f"model.partial_rotary_factor={partial_rotary_factor} is not supported for family {family} "
                "(its transformers model rotates whole heads); use model.family=phi3 or 1.0")
    if original_max_position_embeddings is not None:
        return (f"model.original_max_position_embeddings={original_max_position_embeddings} is a phi3 field; "
                f"for family {family} put it in model.rope_scaling")
    return None


def is_moe_layer(m, layer: int) -> bool:
    """Whether decoder layer `layer` of ModelConfig `m` has routed experts (else the dense MLP)."""
    return m.num_experts > 0 and layer not in (m.moe_dense_layers or ())


def moe_ffn_size(m) -> int:
    """A routed expert's SwiGLU inner width (Mixtral's equals the dense intermediate_size)."""
    return m.moe_intermediate_size or m.intermediate_size


# DeepSeek-V3's MoE options (megasft.model.router; MLA attention is not implemented, so no family
# reads them from config.json) -> their off values.
DEEPSEEK_MOE_OFF = {"moe_router": "softmax", "moe_n_group": 1, "moe_topk_group": 1, "moe_routed_scaling_factor": 1.0,
                    "moe_shared_experts": 0, "moe_bias_update_rate": 0.0}


def deepseek_moe_options(m) -> dict:
    """The DeepSeek-V3 MoE fields of ModelConfig `m` that are on (differ from DEEPSEEK_MOE_OFF)."""
    return {k: getattr(m, k) for k, off in DEEPSEEK_MOE_OFF.items() if getattr(m, k) != off}


def router_problem(m) -> str | None:
    """Why the DeepSeek-V3 routing fields of MoE ModelConfig `m` do not fit together, or None."""
    on = deepseek_moe_options(m)
    if on and m.family == "mixtral":
        return (f"model.family=mixtral routes by softmax without shared experts; {option_list(on)} need "
                "model.family=qwen3_moe (its attention with DeepSeek-V3's MoE)")
    if m.moe_router == "softmax":
        sigmoid_only = {k: v for k, v in on.items() if k != "moe_shared_experts"}
        if sigmoid_only:
            return (f"{option_list(sigmoid_only)} apply to model.moe_router=sigmoid_group (DeepSeek-V3), not softmax; "
                    "set model.moe_router=sigmoid_group or leave them at their defaults")
        return None
    e, groups, chosen = m.num_experts, m.moe_n_group, m.moe_topk_group
    if e % groups:
        return (f"model.num_experts={e} does not split into model.moe_n_group={groups} equal groups; choose "
                f"moe_n_group in {[d for d in range(1, e + 1) if e % d == 0]}")
    if chosen > groups:
        return (f"model.moe_topk_group={chosen} exceeds model.moe_n_group={groups}; a token routes into at most "
                f"{groups} groups")
    if chosen < groups and e // groups < 2:
        return (f"model.moe_n_group={groups} leaves {e // groups} expert per group, but a group's score is the sum "
                "of its two best experts' (DeepSeek-V3); use fewer groups")
    if m.moe_top_k > chosen * (e // groups):
        return (f"model.moe_top_k={m.moe_top_k} exceeds the {chosen * (e // groups)} experts of "
                f"model.moe_topk_group={chosen} groups of {e // groups}; raise moe_topk_group or lower moe_top_k")
    return None


def option_list(values: dict) -> str:
    """'model.k=v, ...' of ModelConfig fields, for messages."""
    return ", ".join(f"model.{k}={v!r}" for k, v in values.items())


def moe_problem(m) -> str | None:
    """Why the mixture-of-experts fields of ModelConfig `m` do not fit its family, or None."""
    moe_families = [n for n, f in FAMILIES.items() if f.moe]
    f = family_of(m.family)
    if f.moe and m.num_experts == 0:
        return (f"model.family={m.family} is a mixture-of-experts family; set model.num_experts (its routed "
                "experts per layer, HF num_experts / num_local_experts)")
    if not f.moe:
        if m.num_experts:
            return (f"model.num_experts={m.num_experts} needs a mixture-of-experts family: set model.family "
                    f"in {moe_families}, or model.num_experts=0 for a dense {m.family} model")
        if m.moe_dense_layers:
            return "model.moe_dense_layers is only for mixture-of-experts models (model.num_experts > 0); leave it unset"
        if m.moe_capacity_factor is not None:
            return ("model.moe_capacity_factor drops tokens routed to experts, and a dense model has none "
                    "(model.num_experts=0); leave it unset")
        if deepseek_moe_options(m):
            return (f"{option_list(deepseek_moe_options(m))} are only for mixture-of-experts models (model.num_experts "
                    "> 0); leave them at their defaults")
        return None
    if m.moe_top_k > m.num_experts:
        return (f"model.moe_top_k={m.moe_top_k} exceeds model.num_experts={m.num_experts}; route each token to "
                f"at most {m.num_experts} experts")
    dense = list(m.moe_dense_layers or ())
    bad = [i for i in dense if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < m.num_layers]
    if bad or len(set(dense)) != len(dense):
        return (f"model.moe_dense_layers={dense} must list distinct layer ids in [0, {m.num_layers}) "
                f"(num_layers={m.num_layers})")
    if m.family == "mixtral":
        if dense:
            return "model.family=mixtral has experts on every layer; leave model.moe_dense_layers unset"
        if not m.moe_norm_topk_prob:
            return "model.family=mixtral always renormalises its top-k routing weights; set model.moe_norm_topk_prob=true"
        if m.moe_intermediate_size not in (None, m.intermediate_size):
            return (f"model.family=mixtral's experts are intermediate_size={m.intermediate_size} wide; leave "
                    f"model.moe_intermediate_size unset (now {m.moe_intermediate_size})")
    return router_problem(m)
