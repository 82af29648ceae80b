"""Mixture-of-experts families through Hugging Face and back (single process, CPU).

* HF -> megasft (TP2) -> HF is bit-identical per expert tensor (Qwen3-MoE's mlp.experts.E.*,
  Mixtral's block_sparse_moe.experts.E.w1/w2/w3) with the same config.json, and transformers
  loading the export computes megasft's logits; so does an export from random init.
* config.json's MoE keys (num_experts / num_local_experts, decoder_sparse_step, mlp_only_layers,
  norm_topk_prob) are read into ModelConfig and written back in the form they came in.
* Presets: their parameter counts are checked with every family's in tests/test_model_families_presets.py.
* What megasft does not train is refused by name, before any compute.
"""
from __future__ import annotations

import json

import pytest
import torch

from megasft.checkpoint.convert import hf_to_megasft, megasft_to_hf
from megasft.config import Config, ConfigError
from megasft.hf.config import hf_config_from_model, model_fields_from_hf
from megasft.layout import Layout
from megasft.model.llama import LlamaStage
from megasft.parallel_state import ParallelState
from tests.oracle import hf_model, moe_fields, tiny_fields
from tests.test_hf_families import assert_export_bit_identical, run_config_round_trip
from tests.test_hf_interop import logits_of

transformers = pytest.importorskip("transformers")
FAMILIES = ["qwen3_moe", "mixtral"]


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bit_identical_and_transformers_reproduces_megasft(tmp_path, family):
    fields = moe_fields(family)
    hf_model(fields, seed=3).save_pretrained(tmp_path / "src")
    hf_to_megasft(tmp_path / "src", tmp_path / "ck", tp=2)
    out = megasft_to_hf(tmp_path / "ck", tmp_path / "out", dtype="fp32")

    source, source_config = assert_export_bit_identical(tmp_path / "src", out)
    experts = [n for n in source if ".experts." in n]
    assert len(experts) == 3 * fields["num_experts"] * (fields["num_layers"] - len(fields.get("moe_dense_layers") or []))

    m, stage = run_config_round_trip(out, tmp_path / "run", source_config)
    given = Config.from_dict({"model": fields}).validate().model
    keys = ("num_experts", "moe_top_k", "moe_intermediate_size", "moe_norm_topk_prob", "moe_dense_layers")
    assert {k: getattr(m, k) for k in keys} == {k: getattr(given, k) for k in keys}
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager",
                                                           experts_implementation="eager")
    with torch.no_grad():
        expected = hf(input_ids=_ids(fields["vocab_size"])).logits
    assert (logits_of(stage, _ids(fields["vocab_size"]), fields["vocab_size"]) - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_export_of_a_model_without_source_config_reproduces_its_logits_in_transformers(tmp_path, family):
    """A MoE model trained from random init exports with a config.json megasft writes alone."""
    from megasft.hf.io import save_hf_tensors
    from megasft.hf.names import gather_hf_state
    from megasft.model.build import init_weights

    fields = moe_fields(family)
    m = Config.from_dict({"model": fields}).validate().model
    ps = ParallelState.single()
    stage = LlamaStage(m, ps, list(range(m.num_layers)), True, True)
    init_weights(stage, seed=4, std=0.02)
    with torch.no_grad():   # routers wide enough to route unevenly, norms off their identity init
        for name, p in stage.named_parameters():
            if name.endswith("router.weight"):
                p.normal_(0.0, 0.5)
            elif name.endswith("norm.weight"):
                p.normal_(1.0, 0.1)
    save_hf_tensors(sorted(gather_hf_state([stage], ps).items()), tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf_config_from_model(m, "float32")))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager",
                                                           experts_implementation="eager")
    assert type(hf).__name__ == {"qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM"}[family]
    with torch.no_grad():
        expected = hf(input_ids=_ids(fields["vocab_size"])).logits
    assert (logits_of(stage, _ids(fields["vocab_size"]), fields["vocab_size"]) - expected).abs().max().item() < 1e-4


@pytest.mark.quick
def test_qwen_moe_dense_layers_read_and_written_in_the_source_form():
    """decoder_sparse_step=2 makes every other layer dense (Qwen3MoeDecoderLayer's rule), plus
    mlp_only_layers; the Hub's num_experts key works like transformers 5's num_local_experts; the
    export writes the source's own form back."""
    source = hf_model(moe_fields("qwen3_moe", num_layers=6)).config.to_dict()
    source.pop("num_local_experts")
    source.update(num_experts=8, decoder_sparse_step=2, mlp_only_layers=[3])
    fields = model_fields_from_hf(source)
    assert fields["moe_dense_layers"] == [0, 2, 3, 4] and fields["num_experts"] == 8
    m = Config.from_dict({"model": {**fields, "hf_config": source}}).validate().model
    assert hf_config_from_model(m, source["dtype"]) == source
    alone = hf_config_from_model(Config.from_dict({"model": fields}).validate().model)
    assert (alone["decoder_sparse_step"], alone["mlp_only_layers"]) == (2, [3])
    assert model_fields_from_hf(alone) == fields


def _refused_config(family: str, **changes) -> dict:
    config = hf_model(moe_fields(family)).config.to_dict()
    config.update(changes)
    return config


@pytest.mark.quick
def test_unsupported_moe_settings_are_refused_by_name():
    with pytest.raises(ConfigError) as err:
        model_fields_from_hf(_refused_config("mixtral", router_jitter_noise=0.1))
    assert str(err.value) == ("config.json: router_jitter_noise=0.1 is not supported for model_type mixtral; "
                              "megasft implements router_jitter_noise=0.0")
    cases = [
        (dict(family="llama", num_experts=4), "model.num_experts=4 needs a mixture-of-experts family: set "
         "model.family in ['qwen3_moe', 'mixtral'], or model.num_experts=0 for a dense llama model"),
        (dict(family="qwen3_moe", qk_norm=True), "model.family=qwen3_moe is a mixture-of-experts family; set "
         "model.num_experts (its routed experts per layer, HF num_experts / num_local_experts)"),
        (dict(moe_fields("mixtral"), moe_top_k=5), "model.moe_top_k=5 exceeds model.num_experts=4; route each "
         "token to at most 4 experts"),
        (dict(moe_fields("mixtral"), moe_dense_layers=[0]), "model.family=mixtral has experts on every layer; "
         "leave model.moe_dense_layers unset"),
        (dict(moe_fields("qwen3_moe"), moe_dense_layers=[3]), "model.moe_dense_layers=[3] must list distinct "
         "layer ids in [0, 3) (num_layers=3)"),
    ]
    for model, message in cases:
        with pytest.raises(ConfigError) as err:
            Config.from_dict({"model": model}).validate()
        assert str(err.value) == message


@pytest.mark.quick
def test_moe_layouts_that_cannot_split_the_experts_are_refused():
    for parallel, ffn, message in [
        (dict(tp=4), 30, "tp=4 does not divide the experts' FFN width 30 (model.moe_intermediate_size); "
         "choose tp in [1, 2]"),
        (dict(ep=3), 32, "parallel.ep=3 must divide both dp=4 (expert-parallel groups are carved from the dp ranks) "
         "and model.num_experts=8; choose ep in [1, 2, 4]"),
        (dict(tp=2, ep=4), 32, "parallel.ep=4 must divide both dp=2 (expert-parallel groups are carved from the dp "
         "ranks) and model.num_experts=8; choose ep in [1, 2]"),
        (dict(cp=2, ep=8), 32, "parallel.ep=8 must divide both dp*cp=2*2=4 (expert-parallel groups are carved from "
         "the dp x cp ranks) and model.num_experts=8; choose ep in [1, 2, 4]"),
    ]:
        fields = moe_fields("qwen3_moe", moe_intermediate_size=ffn)
        cfg = Config.from_dict({"model": fields, "parallel": parallel,
                                "data": {"seq_len": 16, "global_batch_tokens": 64}}).validate()
        with pytest.raises(ConfigError) as err:
            Layout.resolve(cfg, 4)
        assert str(err.value) == message
    dense = Config.from_dict({"model": tiny_fields(), "parallel": {"ep": 2},
                              "data": {"seq_len": 16, "global_batch_tokens": 64}}).validate()
    with pytest.raises(ConfigError, match=r"^parallel.ep=2 shards routed experts, but this model has none"):
        Layout.resolve(dense, 4)
    with pytest.raises(ConfigError, match=r"train.fp8=hybrid runs the dense TP linears in FP8, not the routed experts"):
        Config.from_dict({"model": moe_fields("mixtral"), "train": {"fp8": "hybrid"}}).validate()
