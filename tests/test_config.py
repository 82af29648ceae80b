"""Config validation: every rule says how to fix it (per-field ranges live in
tests/test_reliability_runtime.py, layout rules in tests/test_layout.py)."""
from __future__ import annotations

import pytest

from megasft.config import Config, ConfigError
from megasft.layout import Layout


@pytest.mark.parametrize("override, message", [
    ("parallel.tp=5", "tp=5 does not divide num_attention_heads=32; choose tp in"),
    ("model.num_kv_heads=3", "not a multiple of num_kv_heads=3"),
    ("parallel.pp=3", "does not split evenly"),
    ("train.precision=fp16", "not one of ['bf16', 'fp32']"),
    ("model.hiden_size=4", "did you mean 'hidden_size'"),
    ("data.global_batch_tokens=1000", "not a multiple of seq_len=2048"),
])
def test_config_validation_is_actionable(override, message):
    with pytest.raises(ConfigError) as err:
        Layout.validated(Config.load(None, [override]), 120)
    assert message in str(err.value)


@pytest.mark.parametrize("overrides, message", [
    (["parallel.pp=2", "parallel.pipeline_schedule=interleaved"], "needs virtual_pipeline_size > 1"),
    (["parallel.pp=2", "parallel.virtual_pipeline_size=2", "parallel.pipeline_schedule=1f1b"],
     "use pipeline_schedule=interleaved"),
    (["parallel.pp=2", "parallel.virtual_pipeline_size=2", "data.global_batch_tokens=6144"],
     "micro-batches per step (3) to be a multiple of pp=2; use global_batch_tokens=4096"),
])
def test_pipeline_config_rules(overrides, message):
    with pytest.raises(ConfigError) as err:
        Layout.validated(Config.load(None, overrides), 2)
    assert message in str(err.value)


def test_yaml_on_off_progress_bar_is_accepted():
    assert Config.load(None, ["train.progress_bar=off"]).train.progress_bar == "off"
    assert Config.load(None, ["train.progress_bar=on"]).train.progress_bar == "on"
