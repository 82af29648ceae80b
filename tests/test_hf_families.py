"""config.json and weights of every family through megasft and back (single process, CPU).

* An architecture megasft does not implement — by model_type, architectures, an unknown or
  unsupported config field — is refused by name, by the converter and by model.init_from_hf.
* model.init_from_hf takes every architecture field from config.json; a conflicting YAML value is
  an error naming both, training-only fields stay the YAML's.
* HF -> megasft (TP2, PP2) -> HF gives bit-identical tensors and the same config.json, and
  transformers loading the export reproduces megasft's logits.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megasft.checkpoint.convert import hf_to_megasft, megasft_to_hf
from megasft.config import Config, ConfigError
from megasft.hf.config import hf_config_from_model, model_fields_from_hf
from megasft.hf.io import load_hf_into
from megasft.model.families import FAMILIES
from megasft.model.llama import LlamaStage
from megasft.parallel_state import ParallelState
from tests.oracle import family_fields, hf_model
from tests.test_hf_interop import logits_of

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
SUPPORTED = sorted(FAMILIES)


def run_config_round_trip(out: Path, run_dir: Path, source_config: dict):
    """The run directory's config.yaml keeps config.json: the config of init_from_hf=`out` is
    written to `run_dir`, read back and exported to the same config.json; returns (that ModelConfig,
    a single-process stage with `out`'s weights loaded)."""
    cfg = Config.from_dict({"model": {"init_from_hf": str(out)}}).validate()
    cfg.save(run_dir / "config.yaml")
    reread = Config.load(str(run_dir / "config.yaml")).validate()
    assert hf_config_from_model(reread.model, "float32") == source_config
    stage = LlamaStage(reread.model, ParallelState.single(), list(range(reread.model.num_layers)), True, True)
    load_hf_into(stage, out)
    return cfg.model, stage


def _config(family: str, **changes) -> dict:
    """The config.json dict transformers writes for the tiny model of `family`, changed."""
    config = hf_model(family_fields(family)).config.to_dict()
    config.update(changes)
    return config


REFUSED = [
    pytest.param("llama", dict(model_type="gemma"),
                 "config.json: model_type='gemma' is not supported by megasft; supported model types: "
                 f"{SUPPORTED}", id="model-type"),
    pytest.param("qwen3", dict(architectures=["Qwen3ForSequenceClassification"]),
                 "config.json: architectures=['Qwen3ForSequenceClassification'] is not supported for "
                 "model_type qwen3; megasft trains Qwen3ForCausalLM only", id="architectures"),
    pytest.param("llama", dict(quantization_config={"quant_method": "fp8"}),
                 "config.json: field quantization_config={'quant_method': 'fp8'} is not understood by "
                 "megasft's llama family and may change the model's math; megasft refuses rather than "
                 "convert silently (remove it only if it is known not to matter)", id="unknown-field"),
    pytest.param("llama", dict(sliding_window=4096),
                 "config.json: field sliding_window=4096 is not understood by megasft's llama family and may "
                 "change the model's math; megasft refuses rather than convert silently (remove it only if "
                 "it is known not to matter)", id="llama-sliding-window"),
    pytest.param("llama", dict(hidden_act="gelu"),
                 "config.json: hidden_act='gelu' is not supported for model_type llama; megasft implements "
                 "hidden_act='silu'", id="hidden-act"),
    pytest.param("llama", dict(attention_bias=True),
                 "config.json: attention_bias=True is not supported for model_type llama; megasft implements "
                 "attention_bias=False", id="llama-o-proj-bias"),
    pytest.param("qwen2", dict(use_sliding_window=True),
                 "config.json: use_sliding_window=True is not supported for model_type qwen2; megasft "
                 "implements use_sliding_window=False", id="qwen-sliding-window"),
    pytest.param("qwen3", dict(layer_types=["full_attention", "sliding_attention"]),
                 "config.json: layer_types[1]='sliding_attention' is not supported for model_type qwen3; "
                 "megasft implements full_attention layers only", id="layer-types"),
    pytest.param("qwen2", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}),
                 "config.json: rope_type='yarn' is not supported by megasft; supported: "
                 "['default', 'llama3', 'linear', 'longrope', 'su']",
                 id="rope-yarn"),
    # transformers' Gemma 3 attention ignores attn_logit_softcapping: refused rather than guessed
    pytest.param("gemma3_text", dict(attn_logit_softcapping=50.0),
                 "config.json: attn_logit_softcapping=50.0 is not supported for model_type gemma3_text; megasft "
                 "implements attn_logit_softcapping=None", id="gemma3-attn-softcap"),
    pytest.param("gemma2", dict(use_bidirectional_attention=True),
                 "config.json: use_bidirectional_attention=True is not supported for model_type gemma2; megasft "
                 "implements use_bidirectional_attention=None", id="gemma2-bidirectional"),
    pytest.param("gemma2", dict(hidden_activation="gelu"),
                 "config.json: hidden_activation='gelu' is not supported for model_type gemma2; megasft implements "
                 "hidden_activation='gelu_pytorch_tanh'", id="gemma2-exact-gelu"),
    pytest.param("gemma3_text", dict(rope_parameters={
        "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
        "full_attention": {"rope_type": "default", "rope_theta": 1e6}}),
                 "config.json: rope_parameters.sliding_attention rope_type='linear' is not supported; megasft "
                 "rotates the sliding layers with the default rope", id="gemma3-scaled-local-rope"),
]


@pytest.mark.quick
@pytest.mark.parametrize("family, changes, message", REFUSED)
def test_unsupported_architecture_is_refused_by_name(family, changes, message):
    with pytest.raises(ConfigError) as err:
        model_fields_from_hf(_config(family, **changes))
    assert str(err.value) == message


def _load_tool():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", ROOT / "tools" / "convert_checkpoint.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_converter_and_init_from_hf_refuse_an_unknown_model_type(tmp_path, capsys):
    hf_model(family_fields("qwen3")).save_pretrained(tmp_path / "hf")
    file = tmp_path / "hf" / "config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "model_type": "gemma3"}))   # the multimodal one
    capsys.readouterr()   # save_pretrained's progress bar
    rc = _load_tool().main(["hf-to-megasft", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ck"),
                            "--tp", "2", "--pp", "2"])
    assert rc == 2 and capsys.readouterr().err == (
        f"convert_checkpoint: {file}: model_type='gemma3' is not supported by megasft; supported model "
        f"types: {SUPPORTED}\n")
    assert not (tmp_path / "ck").exists()
    with pytest.raises(ConfigError, match=r"model_type='gemma3' is not supported"):
        Config.from_dict({"model": {"init_from_hf": str(tmp_path / "hf")}})


def test_init_from_hf_takes_the_architecture_from_config_json(tmp_path):
    fields = family_fields("qwen3")
    hf_model(fields).save_pretrained(tmp_path)
    cfg = Config.from_dict({"model": {"init_from_hf": str(tmp_path), "recompute": "full",
                                      "loss_chunk_tokens": 8}}).validate()
    m = cfg.model
    assert (m.family, m.qk_norm, m.qkv_bias, m.hidden_size, m.num_layers, m.kv_heads, m.head_size) == \
        ("qwen3", True, False, 64, 2, 2, 16)
    assert (m.recompute, m.loss_chunk_tokens) == ("full", 8)        # training-only fields stay the YAML's
    with pytest.raises(ConfigError) as err:
        Config.from_dict({"model": {"init_from_hf": str(tmp_path), "hidden_size": 128}})
    assert str(err.value) == (
        f"model.hidden_size=128 conflicts with 64 from {tmp_path / 'config.json'} (model.init_from_hf); "
        "drop model.hidden_size (the checkpoint's architecture is used) or point init_from_hf at a "
        "matching model")
    with pytest.raises(ConfigError, match=r"model.family='llama' conflicts with 'qwen3'"):
        Config.from_dict({"model": {"init_from_hf": str(tmp_path), "family": "llama"}})


@pytest.mark.quick
def test_sliding_window_changes_the_reference():
    """The Mistral references really use their window (else the equivalence tests prove nothing)."""
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        windowed = hf_model(family_fields("mistral"))(input_ids=ids).logits
        full = hf_model(family_fields("mistral", sliding_window=None))(input_ids=ids).logits
    assert torch.equal(windowed[:, :3], full[:, :3])            # the first 3 tokens see the same keys
    assert (windowed[:, 3:] - full[:, 3:]).abs().max() > 1e-2


@pytest.mark.quick
@pytest.mark.parametrize("family, change", [
    ("gemma2", dict(attn_logit_softcapping=None)), ("gemma2", dict(final_logit_softcapping=None)),
    ("gemma3_text", dict(final_logit_softcapping=None)), ("gemma3_text", dict(rope_local_theta=10000.0)),
    ("gemma2", dict(layer_types=["full_attention"] * 2)), ("gemma3_text", dict(query_pre_attn_scalar=16)),
    ("gemma3_text", dict(rope_scaling=None)),
])
def test_gemma_features_change_the_reference(family, change):
    """Each Gemma feature of the test models bends transformers' logits by far more than the 1e-4
    the equivalence tests allow, so a megasft that dropped it would fail them."""
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        on = hf_model(family_fields(family), seed=1)(input_ids=ids).logits
        off = hf_model(family_fields(family, **change), seed=1)(input_ids=ids).logits
    assert (on - off).abs().max() > 1e-3


def _tensors(directory: Path) -> dict:
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


def assert_export_bit_identical(source_dir: Path, out: Path, same_config: bool = True) -> tuple[dict, dict]:
    """The exported HF directory holds the source's tensors bit for bit and (same_config) its
    config.json; returns (source tensors, source config)."""
    source, exported = _tensors(source_dir), _tensors(out)
    assert sorted(exported) == sorted(source)
    for name, tensor in source.items():
        assert torch.equal(exported[name], tensor), name
    source_config = json.loads((source_dir / "config.json").read_text())
    if same_config:
        assert json.loads((out / "config.json").read_text()) == source_config
    return source, source_config


ROUND_TRIP = [pytest.param("llama", id="llama"), pytest.param("qwen2", id="qwen2-tied-bias"),
              pytest.param("qwen3", id="qwen3-qk-norm"), pytest.param("mistral", id="mistral-window"),
              pytest.param("gemma2", id="gemma2-softcap-windows"), pytest.param("gemma3_text", id="gemma3-local-rope")]


@pytest.mark.parametrize("family", ROUND_TRIP)
def test_round_trip_is_bit_identical_and_transformers_reproduces_megasft(tmp_path, family):
    fields = family_fields(family)
    hf_model(fields, seed=3).save_pretrained(tmp_path / "src")
    hf_to_megasft(tmp_path / "src", tmp_path / "ck", tp=2, pp=2)
    out = megasft_to_hf(tmp_path / "ck", tmp_path / "out", dtype="fp32")

    _, source_config = assert_export_bit_identical(tmp_path / "src", out)
    _, stage = run_config_round_trip(out, tmp_path / "run", source_config)
    ids = torch.randint(0, fields["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    assert type(hf).__name__ == source_config["architectures"][0]
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
    assert (logits_of(stage, ids, fields["vocab_size"]) - expected).abs().max().item() < 1e-4


@pytest.mark.quick
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3"])
def test_export_without_a_source_config_loads_as_the_family(family):
    """A model trained from random init (no source config.json) exports as its family."""
    m = Config.from_dict({"model": family_fields(family)}).validate().model
    config = hf_config_from_model(m, "float32")
    assert model_fields_from_hf(config) == {k: getattr(m, k) for k in model_fields_from_hf(config)}
    hf_config = transformers.AutoConfig.for_model(**config)
    expected = {"gemma3_text": "Gemma3TextConfig"}.get(family, FAMILIES[family].architecture.replace("ForCausalLM", "Config"))
    assert type(hf_config).__name__ == expected
    assert getattr(hf_config, "head_dim", hf_config.hidden_size // hf_config.num_attention_heads) == m.head_size
    assert getattr(hf_config, "sliding_window", None) == m.sliding_window
    if m.layer_types is not None:
        assert hf_config.layer_types == m.layer_types


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "qwen3", "mistral"])
def test_export_of_a_model_without_source_config_reproduces_its_logits_in_transformers(tmp_path, family):
    """A model trained from random init is exported with a config.json megasft writes alone (no
    source config): transformers, reading that config, computes megasft's logits (so every
    Gemma field it writes — layer types, scale, caps, rope per layer type — says the same model)."""
    from megasft.hf.io import save_hf_tensors
    from megasft.hf.names import gather_hf_state
    from megasft.model.build import init_weights

    fields = family_fields(family)
    m = Config.from_dict({"model": fields}).validate().model
    ps = ParallelState.single()
    stage = LlamaStage(m, ps, list(range(m.num_layers)), True, True)
    init_weights(stage, seed=4, std=0.02)
    with torch.no_grad():   # norms off their identity init, so each norm's name and form matter
        for name, p in stage.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0 if family.startswith("gemma") else 1.0, 0.1)
    save_hf_tensors(sorted(gather_hf_state([stage], ps).items()), tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf_config_from_model(m, "float32")))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager")
    ids = torch.randint(0, fields["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
    assert (logits_of(stage, ids, fields["vocab_size"]) - expected).abs().max().item() < 1e-4
