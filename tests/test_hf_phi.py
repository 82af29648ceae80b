"""Phi-3 / Phi-4 checkpoints through megasft and back (single process, CPU).

* HF -> megasft (TP2, PP2) -> HF is bit-identical — the fused ``qkv_proj`` / ``gate_up_proj``
  come back from the split q/k/v and gate/up — with the same config.json, for the window config,
  the longrope config (tests.oracle.PHI3_LONGROPE) and a config.json in the transformers-4 form
  real Phi-3-128k checkpoints have (top-level rope_theta, rope_scaling type 'su',
  partial_rotary_factor) and with tied embeddings; transformers loading each export reproduces
  megasft's logits on rows longer than longrope's L0, where transformers uses long_factor. A fused
  tensor of the wrong shape is named by the converter.
* The references really use their features (longrope switches factor by length), unsupported
  Phi-3 settings are refused by name, and a checkpoint of other rope settings is refused.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megasft.checkpoint.convert import hf_to_megasft, megasft_to_hf
from megasft.checkpoint.errors import CheckpointMismatch
from megasft.checkpoint.meta import model_differences, model_shape
from megasft.config import Config, ConfigError
from megasft.hf.config import model_fields_from_hf
from megasft.model.llama import LlamaStage
from megasft.parallel_state import ParallelState
from tests.oracle import PHI3_LONGROPE, family_fields, hf_model
from tests.test_hf_families import assert_export_bit_identical, run_config_round_trip
from tests.test_hf_interop import logits_of

transformers = pytest.importorskip("transformers")


def _as_transformers4(directory: Path, kind: str) -> None:
    """Rewrite config.json as a transformers-4 Phi-3-128k config: rope_theta and
    partial_rotary_factor at the top, rope_scaling {'type': kind, factors} without L0 (which
    stays the top-level original_max_position_embeddings)."""
    file = directory / "config.json"
    config = json.loads(file.read_text())
    rope = config.pop("rope_parameters")
    config.update(rope_theta=rope["rope_theta"], partial_rotary_factor=rope["partial_rotary_factor"],
                  rope_scaling={"type": kind, "short_factor": rope["short_factor"], "long_factor": rope["long_factor"]})
    file.write_text(json.dumps(config, indent=2))


ROUND_TRIP = [pytest.param({}, None, id="window"), pytest.param(PHI3_LONGROPE, None, id="longrope-partial"),
              pytest.param(PHI3_LONGROPE, "longrope", id="transformers4-longrope"),
              pytest.param(PHI3_LONGROPE, "su", id="transformers4-su"),
              pytest.param(dict(PHI3_LONGROPE, tie_embeddings=True), None, id="longrope-partial-tied")]


@pytest.mark.parametrize("overrides, old_form", ROUND_TRIP)
def test_round_trip_is_bit_identical_and_transformers_reproduces_megasft(tmp_path, overrides, old_form):
    fields = family_fields("phi3", **overrides)
    hf_model(fields, seed=3).save_pretrained(tmp_path / "src")
    if old_form:
        _as_transformers4(tmp_path / "src", old_form)
    hf_to_megasft(tmp_path / "src", tmp_path / "ck", tp=2, pp=2)
    out = megasft_to_hf(tmp_path / "ck", tmp_path / "out", dtype="fp32")

    source, source_config = assert_export_bit_identical(tmp_path / "src", out)
    assert any(name.endswith("qkv_proj.weight") for name in source)

    m, stage = run_config_round_trip(out, tmp_path / "run", source_config)
    assert (m.family, m.partial_rotary_factor, m.original_max_position_embeddings, m.sliding_window) == (
        "phi3", fields.get("partial_rotary_factor", 1.0), fields["original_max_position_embeddings"], 3)
    # 12 tokens per row: longer than longrope's L0 = 8, so transformers takes long_factor
    ids = torch.randint(0, fields["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    if old_form == "su":
        # transformers 5.24 cannot load its own old name: Phi3Config renames su -> longrope only after
        # standardize_rope_params, which moves L0 into the dict for 'longrope' alone. The math is the same.
        config = json.loads((out / "config.json").read_text())
        config["rope_scaling"]["type"] = "longrope"
        (out / "config.json").write_text(json.dumps(config))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    assert type(hf).__name__ == "Phi3ForCausalLM"
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
    assert (logits_of(stage, ids, fields["vocab_size"]) - expected).abs().max().item() < 1e-4


@pytest.mark.quick
def test_longrope_reference_switches_to_long_factor_past_L0():
    """transformers uses long_factor for a sequence longer than L0 = 8 and short_factor otherwise,
    so the packed equivalence tests (documents on both sides of L0) check both."""
    other = dict(PHI3_LONGROPE, rope_scaling={**PHI3_LONGROPE["rope_scaling"], "long_factor": [1.0, 1.0, 1.0, 1.0]})
    a, b = hf_model(family_fields("phi3", **PHI3_LONGROPE)), hf_model(family_fields("phi3", **other))
    for n, same in ((8, True), (9, False)):
        ids = torch.randint(0, 300, (1, n), generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            diff = (a(input_ids=ids).logits - b(input_ids=ids).logits).abs().max().item()
        assert (diff == 0.0) == same, (n, diff)


def _config(**changes) -> dict:
    config = hf_model(family_fields("phi3")).config.to_dict()
    config.update(changes)
    return config


REFUSED = [
    pytest.param(dict(resid_pdrop=0.1), "config.json: resid_pdrop=0.1 is not supported for model_type phi3; "
                 "megasft implements resid_pdrop=0.0", id="resid-dropout"),
    pytest.param(dict(hidden_act="gelu_new"), "config.json: hidden_act='gelu_new' is not supported for model_type "
                 "phi3; megasft implements hidden_act='silu'", id="hidden-act"),
    pytest.param(dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
                 "config.json: rope_type='dynamic' is not supported by megasft; supported: "
                 "['default', 'llama3', 'linear', 'longrope', 'su']", id="rope-dynamic"),
]


@pytest.mark.quick
@pytest.mark.parametrize("changes, message", REFUSED)
def test_unsupported_phi3_settings_are_refused_by_name(changes, message):
    with pytest.raises(ConfigError) as err:
        model_fields_from_hf(_config(**changes))
    assert str(err.value) == message


@pytest.mark.quick
def test_phi3_rope_settings_belong_to_phi3_and_must_agree():
    with pytest.raises(ConfigError) as err:
        Config.from_dict({"model": family_fields("llama", partial_rotary_factor=0.5)}).validate()
    assert str(err.value) == ("model.partial_rotary_factor=0.5 is not supported for family llama (its "
                              "transformers model rotates whole heads); use model.family=phi3 or 1.0")
    llama = hf_model(family_fields("llama")).config.to_dict()
    llama["rope_parameters"] = {**llama["rope_parameters"], "partial_rotary_factor": 0.5}
    with pytest.raises(ConfigError) as err:
        model_fields_from_hf(llama)
    assert str(err.value) == ("config.json: partial_rotary_factor=0.5 is not supported for model_type llama; "
                              "megasft rotates the whole head (1.0)")
    with pytest.raises(ConfigError) as err:
        Config.from_dict({"model": family_fields("llama", rope_scaling=PHI3_LONGROPE["rope_scaling"])}).validate()
    assert str(err.value) == ("model.rope_scaling rope_type='longrope' is supported for family phi3 only (not "
                              "llama); use model.family=phi3 or another rope_type")
    llama["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8,
                                "long_factor": [1.0] * 8, "original_max_position_embeddings": 8}
    with pytest.raises(ConfigError) as err:
        model_fields_from_hf(llama)
    assert str(err.value) == "config.json: rope_type='longrope' is supported for model_type phi3 only, not llama"
    bad = Config.from_dict({"model": family_fields("phi3", **dict(PHI3_LONGROPE, partial_rotary_factor=1.0))}).model
    with pytest.raises(ValueError, match=r"rope_scaling.partial_rotary_factor=0.5 differs from "
                                         r"model.partial_rotary_factor=1.0"):
        LlamaStage(bad, ParallelState.single(), [0], True, True)


@pytest.mark.quick
def test_checkpoint_of_other_rope_settings_is_refused():
    """The rope fields are SHAPE_FIELDS: a checkpoint saved with other longrope factors (or another
    partial rotation) does not load; a record from before the fields existed is not compared."""
    saved = Config.from_dict({"model": family_fields("phi3", **PHI3_LONGROPE)}).model
    other = dict(PHI3_LONGROPE, rope_scaling={**PHI3_LONGROPE["rope_scaling"], "long_factor": [1.0] * 4})
    changed = Config.from_dict({"model": family_fields("phi3", **other)}).model
    assert [d.split(":")[0] for d in model_differences(model_shape(saved), changed)] == ["rope_scaling"]
    assert model_differences(model_shape(saved), saved) == []
    old_record = {k: v for k, v in model_shape(saved).items() if k not in ("rope_scaling", "partial_rotary_factor",
                                                                          "original_max_position_embeddings")}
    assert model_differences(old_record, changed) == []


def test_converter_names_a_fused_tensor_of_the_wrong_shape(tmp_path):
    fields = family_fields("phi3")
    hf_model(fields).save_pretrained(tmp_path / "hf")
    file = tmp_path / "hf" / "config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "num_key_value_heads": 4}))
    with pytest.raises(CheckpointMismatch) as err:
        hf_to_megasft(tmp_path / "hf", tmp_path / "ck", tp=2, pp=2)
    # q 64 + k 64 + v 64 rows with 4 kv heads of 16; the file has 2 kv heads (64 + 32 + 32)
    assert str(err.value) == (f"{tmp_path / 'hf' / 'model.safetensors'}: tensor "
                              "'model.layers.0.self_attn.qkv_proj.weight' has shape (128, 64), config.json "
                              "implies (192, 64)")
