"""Gemma 2 / Gemma 3 specifics in one process: config.json in the older (transformers 4.x / Hub)
forms, the rules on Gemma's ModelConfig fields, the bf16 embedding scale, identity init of the
(1 + w) norms, the norm kernels that have no (1 + w) form, and checkpoint shape fields. The
equivalence against transformers at TP/SP/PP is tests/test_model_families.py's, the round trip
tests/test_hf_families.py's."""
from __future__ import annotations

import pytest
import torch

from megasft.checkpoint.meta import model_differences, model_shape
from megasft.config import Config, ConfigError, ModelConfig
from megasft.hf.config import hf_config_from_model, model_fields_from_hf
from megasft.model.build import build_model
from megasft.model.fused import resolve_norm_backend
from megasft.model.llama import LlamaStage
from megasft.parallel_state import ParallelState
from tests.oracle import family_fields, hf_model

transformers = pytest.importorskip("transformers")


def _current(family: str) -> dict:
    return hf_model(family_fields(family)).config.to_dict()


def _older_form(family: str) -> dict:
    """The same model's config.json as the Hub's Gemma releases carry it: rope_theta (+ Gemma 3's
    rope_local_base_freq, rope_scaling, sliding_window_pattern) instead of rope_parameters and
    layer_types; Gemma 2's hidden_act / sliding_window_size / cache_implementation leftovers and
    no tie_word_embeddings (tied by default)."""
    config = {k: v for k, v in _current(family).items()
              if k not in ("rope_parameters", "layer_types", "_sliding_window_pattern", "tie_word_embeddings")}
    if family == "gemma2":   # layer 0 sliding, 1 full: Gemma 2's fixed alternation
        config.update(rope_theta=10000.0, hidden_act="gelu_pytorch_tanh", sliding_window_size=config["sliding_window"],
                      cache_implementation="hybrid")
    else:                    # pattern 2: one full layer in two, the last of each pair
        config.update(rope_theta=10000.0, rope_local_base_freq=100.0, sliding_window_pattern=2,
                      rope_scaling={"rope_type": "linear", "factor": 2.0})
    return config


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_older_config_json_forms_read_as_the_same_model_and_round_trip(family):
    older = _older_form(family)
    assert model_fields_from_hf(older) == model_fields_from_hf(_current(family))
    m = Config.from_dict({"model": {**model_fields_from_hf(older), "hf_config": older}}).validate().model
    assert hf_config_from_model(m, older["dtype"]) == older        # written back in its own form
    # and transformers reads that form as the same architecture megasft does
    hf = transformers.AutoConfig.for_model(**older)
    assert hf.layer_types == m.layer_types and hf.tie_word_embeddings is True


REFUSED = [
    (dict(family="llama", attn_logit_softcapping=50.0),
     "model.attn_logit_softcapping=50.0 is not part of family llama; it belongs to gemma2 (set model.family) or "
     "leave model.attn_logit_softcapping unset"),
    (dict(family="gemma2", rope_local_theta=10000.0),
     "model.rope_local_theta=10000.0 is not part of family gemma2; it belongs to gemma3_text (set model.family) "
     "or leave model.rope_local_theta unset"),
    (dict(family="gemma2", layer_types=["sliding_attention"]),
     "model.layer_types has 1 entries for num_layers=2; give one per layer"),
    (dict(family="gemma2", layer_types=["sliding_attention", "local"]),
     "model.layer_types[1]='local' is not one of ['full_attention', 'sliding_attention']"),
    (dict(family="gemma2", sliding_window=None),
     "model.layer_types has sliding_attention layers but model.sliding_window is unset; set it"),
    (dict(family="gemma3_text", qk_norm=True, attn_logit_softcapping=50.0),
     "model.attn_logit_softcapping=50.0 is not part of family gemma3_text; it belongs to gemma2 (set "
     "model.family) or leave model.attn_logit_softcapping unset"),
]


@pytest.mark.parametrize("changes, message", REFUSED)
def test_gemma_fields_outside_their_family_are_refused(changes, message):
    fields = {k: v for k, v in family_fields("gemma2").items() if k not in ("rope_scaling",)}
    fields.update(changes)
    if fields["family"] == "llama":
        fields = {k: v for k, v in fields.items() if k not in ("layer_types", "query_pre_attn_scalar",
                                                                "final_logit_softcapping", "sliding_window")}
    with pytest.raises(ConfigError) as err:
        Config.from_dict({"model": fields}).validate()
    assert str(err.value) == message


def test_embedding_scale_is_rounded_to_bf16_as_transformers_does():
    """sqrt(3072) = 55.43 is 55.5 in bf16: HF multiplies by the rounded factor, and so must megasft."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2TextScaledWordEmbedding

    fields = family_fields("gemma2", hidden_size=3072, vocab_size=64, num_layers=1, layer_types=["sliding_attention"])
    stage = LlamaStage(ModelConfig(**fields), ParallelState.single(), [], True, False).to(torch.bfloat16)
    hf = Gemma2TextScaledWordEmbedding(64, 3072, None, embed_scale=3072 ** 0.5).to(torch.bfloat16)
    with torch.no_grad():
        hf.weight.copy_(stage.embedding.weight.normal_())
    ids = torch.arange(64).view(2, 32)
    batch = type("B", (), {"input_ids": ids})()
    got = stage._embed(batch)                                           # [s, b, h]
    assert torch.equal(got, hf(ids).transpose(0, 1))
    assert not torch.equal(got, (stage.embedding(ids) * 3072 ** 0.5))   # the unrounded factor differs


def test_random_init_norms_are_the_identity():
    cfg = Config.from_dict({"model": {"preset": "tiny-gemma3", "vocab_size": 300}}).validate()
    (stage,) = build_model(cfg, ParallelState.single())
    norms = {n: p for n, p in stage.named_parameters() if n.endswith("norm.weight")}
    assert len(norms) == 4 * (4 + 2) + 1                     # 4 layers x (4 norms + q/k norms) + final
    assert all(bool((p == 0).all()) for p in norms.values())  # (1 + 0) * x / rms(x): HF's Gemma init


@pytest.mark.parametrize("backend", ["apex", "te"])
def test_vendor_norm_kernels_are_refused_for_gemma_norms(backend):
    with pytest.raises(ValueError) as err:
        resolve_norm_backend(backend, torch.device("cpu"), plus_one=True)
    assert str(err.value) == (f"model.norm_backend={backend} has no Gemma (1 + w) RMSNorm; use 'auto', "
                              "'torch' or 'compile'")
    assert resolve_norm_backend("auto", torch.device("cuda"), plus_one=True) == "torch"


def test_checkpoint_shape_fields_name_the_architecture():
    gemma = Config.from_dict({"model": family_fields("gemma3_text")}).validate().model
    other = Config.from_dict({"model": family_fields("gemma3_text", sliding_window=5)}).validate().model
    assert model_differences(model_shape(gemma), other) == ["sliding_window: checkpoint 3, config 5"]
    llama = Config.from_dict({"model": family_fields("llama")}).validate().model
    assert "family: checkpoint 'gemma3_text', config 'llama'" in model_differences(model_shape(gemma), llama)
    # a checkpoint saved before family / qk_norm / the Gemma fields were recorded still matches its Llama
    before = {k: v for k, v in model_shape(llama).items() if k in ("vocab_size", "hidden_size", "intermediate_size",
              "num_layers", "num_attention_heads", "kv_heads", "head_size", "tie_embeddings", "qkv_bias")}
    assert model_differences(before, llama) == []
