"""Family presets: parameter counts equal transformers' meta-device models, built from the
config.json megasft would export for the preset (so the export describes the same model)."""
from __future__ import annotations

import pytest
import torch

from megasft.config import Config
from megasft.hf.config import hf_config_from_model
from megasft.model.presets import count_parameters
from megasft.planner.memory import rank_parameters

transformers = pytest.importorskip("transformers")

# preset -> the parameter count of the released checkpoint (sum of numel, tied counted once)
PUBLISHED = {"qwen2.5-0.5b": 494_032_768, "qwen2.5-72b": 72_706_203_648, "qwen3-8b": 8_190_735_360,
             "mistral-7b-v0.1": 7_241_732_096, "gemma2-9b": 9_241_705_984,
             # the text decoder of google/gemma-3-27b (the release adds a SigLIP vision tower)
             "gemma3-27b": 27_009_346_304, "phi-4": 14_659_507_200, "phi-3-mini-4k": 3_821_079_552,
             # MoE: every expert counted (total, not active, parameters)
             "qwen3-30b-a3b": 30_532_122_624, "mixtral-8x7b": 46_702_792_704}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_family_preset_counts_equal_transformers(preset):
    m = Config.from_dict({"model": {"preset": preset}}).validate().model
    config = transformers.AutoConfig.for_model(**hf_config_from_model(m, "bfloat16"))
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(config)
    assert type(hf).__name__ == hf_config_from_model(m)["architectures"][0]
    assert count_parameters(m) == sum(p.numel() for p in hf.parameters()) == PUBLISHED[preset]


@pytest.mark.quick
@pytest.mark.parametrize("preset, tp", [("qwen3-8b", 2), ("qwen2.5-72b", 8), ("gemma3-27b", 8), ("phi-4", 2)])
def test_planner_counts_the_family_parameters(preset, tp):
    """At pp=1 the planner's per-rank layers are the model's split: replicated norms (Gemma's four,
    and q/k norms) whole, everything else / tp."""
    cfg = Config.from_dict({"model": {"preset": preset}, "parallel": {"tp": tp, "dp": 1}}).validate()
    m = cfg.model
    d, h = m.head_size, m.hidden_size
    per_layer = (h * (m.num_attention_heads + 2 * m.kv_heads) * d + m.num_attention_heads * d * h
                 + 3 * h * m.intermediate_size) // tp + (4 if m.family.startswith("gemma") else 2) * h
    per_layer += ((m.num_attention_heads + 2 * m.kv_heads) * d // tp) if m.qkv_bias else 0
    per_layer += 2 * d if m.qk_norm else 0
    assert rank_parameters(cfg, 0).layers == m.num_layers * per_layer


def _attended_pairs(seq_len: int, window) -> int:
    """(query, key) pairs a causal row attends to, counted one by one."""
    return sum(1 for i in range(seq_len) for j in range(i + 1) if window is None or i - j < window)


@pytest.mark.quick
def test_planner_flops_count_the_sliding_windows():
    """Gemma 3's sliding layers cost s x W attention, the full ones s x s: the planner's attention
    FLOPs (model: whole window; executed: causal) against pairs counted one by one. The planner
    uses the continuous approximation (s/2 keys per causal query, as Narayanan et al.), i.e. half a
    key per query below the exact count."""
    from megasft.planner.flops import attended_keys, forward_flops_per_token

    m = Config.from_dict({"model": {"preset": "gemma3-27b"}}).validate().model
    s, window = 2048, m.sliding_window
    sliding = m.layer_types.count("sliding_attention")
    assert sliding == 52 and m.num_layers - sliding == 10
    width = m.num_attention_heads * m.head_size
    attention = forward_flops_per_token(m, s) - forward_flops_per_token(m, 0)
    assert attention == 4 * width * (sliding * window + (m.num_layers - sliding) * s)
    for layer, w in ((0, window), (5, None)):
        exact = _attended_pairs(s, w) / s
        assert exact - 0.5 <= attended_keys(m, layer, s, causal=True) <= exact
