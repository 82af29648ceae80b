"""Model presets and exact parameter counts, checked against transformers models on the meta device."""
from __future__ import annotations

import pytest
import torch

from megasft.config import Config, ConfigError, ModelConfig
from megasft.model.presets import PRESETS, count_parameters, preset_fields

transformers = pytest.importorskip("transformers")


def _model(preset: str, **fields) -> ModelConfig:
    return Config.from_dict({"model": {"preset": preset, **fields}}).model


def _hf_count(model: ModelConfig, qwen2: bool = False) -> int:
    """Parameters of the equivalent Hugging Face model, built on the meta device (no memory, no download)."""
    kwargs = dict(vocab_size=model.vocab_size, hidden_size=model.hidden_size,
                  intermediate_size=model.intermediate_size, num_hidden_layers=model.num_layers,
                  num_attention_heads=model.num_attention_heads, num_key_value_heads=model.kv_heads,
                  tie_word_embeddings=model.tie_embeddings)
    if qwen2:  # Qwen2 = Llama with biases on q/k/v only (Llama's attention_bias would add one to o_proj)
        config, cls = transformers.Qwen2Config(**kwargs), transformers.Qwen2ForCausalLM
    else:
        config, cls = transformers.LlamaConfig(**kwargs), transformers.LlamaForCausalLM
    with torch.device("meta"):
        hf = cls(config)
    return sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("preset", ["llama3.1-8b", "llama3.1-70b", "llama3.1-405b"])
def test_llama31_counts_equal_transformers(preset):
    model = _model(preset)
    assert count_parameters(model) == _hf_count(model)


def test_405b_count_is_the_published_number():
    assert count_parameters(_model("llama3.1-405b")) == 405_853_388_800
    assert count_parameters(_model("llama3.1-70b")) == 70_553_706_496
    assert count_parameters(_model("llama3.1-8b")) == 8_030_261_248


def test_tied_tiny_counts_the_shared_matrix_once():
    model = _model("tiny-tied", vocab_size=300)
    assert model.tie_embeddings
    assert count_parameters(model) == _hf_count(model)
    untied = _model("tiny", vocab_size=300)
    assert count_parameters(untied) - count_parameters(model) == 300 * model.hidden_size


def test_qkv_bias_counts_equal_qwen2():
    model = _model("tiny-qkv-bias", vocab_size=300)
    assert count_parameters(model) == _hf_count(model, qwen2=True)


def test_405b_architecture_numbers():
    m = _model("llama3.1-405b")
    assert (m.num_layers, m.hidden_size, m.intermediate_size) == (126, 16384, 53248)
    assert (m.num_attention_heads, m.kv_heads, m.vocab_size) == (128, 8, 128256)
    assert m.rope_theta == 500000.0 and m.max_position_embeddings == 131072 and not m.tie_embeddings
    assert m.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_explicit_fields_override_the_preset_and_presets_stay_unchanged():
    model = _model("llama3.1-8b", recompute="full", num_layers=2)
    assert (model.num_layers, model.recompute, model.hidden_size) == (2, "full", 4096)
    preset_fields("llama3.1-8b")["rope_scaling"]["factor"] = 1.0
    assert PRESETS["llama3.1-8b"]["rope_scaling"]["factor"] == 8.0


def test_unknown_preset_names_the_valid_ones():
    with pytest.raises(ConfigError, match="llama3.1-405b"):
        Config.from_dict({"model": {"preset": "llama3.1-400b"}})
