"""A tiny Mixtral through the real entry point (one process, two pipeline stages of one layer each,
and two CP ranks that are also its expert-parallel group, dropping tokens over capacity): the train records carry the aux losses and the expert load of every MoE layer since the
last log point, the SFT loss stays the record's loss, evaluation runs, and the final HF export
loads in transformers with megasft's logits."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megasft.config import Config
from megasft.hf.io import load_hf_into
from megasft.model.llama import LlamaStage
from megasft.parallel_state import ParallelState
from tests.runs import tiny_dataset, train_args
from tests.test_hf_interop import logits_of

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
MOE = ("model.family=mixtral", "model.num_experts=4", "model.moe_top_k=2")


@pytest.mark.parametrize("flags,layout", [((), ()), (("--nproc", "2"), ("parallel.pp=2",)),
                                          (("--nproc", "2"), ("parallel.cp=2", "parallel.ep=2", "model.moe_capacity_factor=1.0"))],
                         ids=["single", "pp2", "cp2-ep2-capacity"])
def test_moe_train_logs_aux_loss_and_expert_load_and_exports(tmp_path, flags, layout):
    data, run = tiny_dataset(tmp_path / "data"), tmp_path / "run"
    args = train_args(data, run, *MOE, *layout, "train.steps=4", "train.log_interval=2", "checkpoint.export_hf=true",
                      "data.eval_fraction=0.2", "train.eval_interval=4")
    out = subprocess.run([sys.executable, "-m", "megasft.train", *flags, *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [4]    # the SFT loss of the held-out split
    assert [r["step"] for r in train] == [2, 4]
    for r in train:
        # E * sum_i f_i P_i with f_i <= 1 (a token picks an expert once) and sum_i P_i = 1: in (0, E]
        assert 0.0 < r["aux_loss"] <= 4 and math.isfinite(r["z_loss"]) and math.isfinite(r["loss"])
        # 2 steps x 64 token slots x top-2 picks per MoE layer since the last log point
        assert sorted(r["expert_load"]) == ["0", "1"]
        assert all(sum(tokens) == 2 * 64 * 2 for tokens in r["expert_load"].values())
        assert r["expert_imbalance_max"] == max(r["expert_imbalance"].values())
        if "model.moe_capacity_factor=1.0" in layout:   # the picks above count before dropping
            dropped = sum(sum(tokens) for tokens in r["expert_dropped"].values())
            assert 0 < dropped < 2 * 2 * 64 * 2 and r["moe_dropped_fraction"] == dropped / (2 * 2 * 64 * 2)
        else:
            assert "moe_dropped_fraction" not in r

    cfg = Config.load(None, list(args)).validate()
    cfg.model.moe_capacity_factor = None   # the exported model computes without dropping, as transformers does
    stage = LlamaStage(cfg.model, ParallelState.single(), list(range(cfg.model.num_layers)), True, True)
    load_hf_into(stage, run / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(run / "hf", dtype=torch.float32, attn_implementation="eager",
                                                           experts_implementation="eager")
    ids = torch.randint(0, cfg.model.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
    assert (logits_of(stage, ids, cfg.model.vocab_size) - expected).abs().max().item() < 1e-4
