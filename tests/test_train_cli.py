"""The user-facing path end to end: make the tiny chat data, preprocess it, `torchrun -m
megasft.train` at TP2 x PP2, export, load the export with transformers, greedy-generate."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], env_extra: dict | None = None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("tiny_chat")
    out = _run([sys.executable, "examples/tiny_chat/make_data.py", "--out", str(data), "--train", "300", "--eval", "20"])
    assert out.returncode == 0, out.stderr
    for split in ("train", "eval"):
        out = _run([sys.executable, "tools/preprocess_data.py", "--input", str(data / f"{split}.jsonl"),
                    "--output", str(data / split), "--tokenizer", str(data / "tokenizer.model"),
                    "--template", "llama3", "--seq-len", "256"])
        assert out.returncode == 0, out.stderr
    return data


def test_train_cli_tp2_pp2_export_and_generate(tiny_data, tmp_path):
    run = tmp_path / "run"
    out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
                "-m", "megasft.train", "--config", "examples/configs/tiny_chat.yaml",
                f"data.train_path={tiny_data / 'train'}", f"data.eval_path={tiny_data / 'eval'}",
                f"data.tokenizer={tiny_data / 'tokenizer.model'}", f"train.run_dir={run}",
                "parallel.pp=2", "train.steps=4", "train.log_interval=2", "train.eval_interval=4",
                "data.global_batch_tokens=4096", "train.comm_stats=true", "train.generate_eval_interval=4",
                f"train.generate_eval_path={tiny_data / 'eval.jsonl'}", "train.generate_eval_samples=3"])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "world 4 = tp 2 x pp 2 x dp 1" in out.stdout
    assert "(ratio 1.0000)" in out.stdout            # measured optimizer bytes == 12 N / DP
    resolved = (run / "config.yaml").read_text()
    assert "pp: 2" in resolved and "steps: 4" in resolved
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) and "bubble" in r for r in train)
    assert any(r["kind"] == "eval" for r in records)
    # train.comm_stats: rank 0's measured TP and PP bytes of each logged step match the planner's
    # prediction for the layout (tests/test_comm_ledger.py derives the 5 %).
    assert out.stdout.count("comm step ") == 2
    for r in train:
        for kind in ("tp", "pp"):
            sent = sum(e["bytes"] for op, e in r["comm"][kind].items() if op != "recv")
            assert sent == pytest.approx(r["comm_predicted"][kind], rel=0.05), (kind, r["comm"])
    # Generation-based eval at TP2 x PP2: rank 0 gathered every stage's shards and answered.
    generated = [r for r in records if r["kind"] == "generate_eval"]
    assert [(r["step"], r["answered"]) for r in generated] == [(4, 3)] and 0 <= generated[0]["eot_rate"] <= 1

    # The export loads in transformers and gives megasft's logits.
    from transformers import AutoModelForCausalLM

    from megasft.data.batch import MicroBatch
    from megasft.generate import load_single_process_model

    hf = AutoModelForCausalLM.from_pretrained(run / "hf").float().eval()
    ours = load_single_process_model(run / "hf")
    ids = torch.randint(0, 512, (1, 20))
    batch = MicroBatch(input_ids=ids, position_ids=torch.arange(20)[None], max_seqlen=20,
                       cu_seqlens=torch.tensor([0, 20], dtype=torch.int32))
    with torch.no_grad():
        diff = (hf(input_ids=ids).logits[0] - ours(batch)[:, 0, :512]).abs().max()
    assert diff < 1e-4

    gen = _run([sys.executable, "-m", "megasft.generate", "--model", str(run / "hf"),
                "--prompts", str(tiny_data / "eval.jsonl"), "-n", "3", "--max-new-tokens", "4"])
    assert gen.returncode == 0, gen.stderr
    assert "exact match" in gen.stdout and gen.stdout.count("Q: ") == 3


def test_train_cli_context_parallel_trains_evaluates_and_exports(tiny_data, tmp_path):
    """TP2 x CP2 (ring) through the real entry point: the loader pads documents to 2*cp, eval and
    generation-eval run, the measured CP bytes match the planner's, and the export loads."""
    run = tmp_path / "run"
    out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
                "-m", "megasft.train", "--config", "examples/configs/tiny_chat.yaml",
                f"data.train_path={tiny_data / 'train'}", f"data.eval_path={tiny_data / 'eval'}",
                f"data.tokenizer={tiny_data / 'tokenizer.model'}", f"train.run_dir={run}",
                "parallel.cp=2", "parallel.pp=1", "train.steps=4", "train.log_interval=2", "train.eval_interval=4",
                "data.global_batch_tokens=4096", "train.comm_stats=true", "train.generate_eval_interval=4",
                f"train.generate_eval_path={tiny_data / 'eval.jsonl'}", "train.generate_eval_samples=2"])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "world 4 = tp 2 x cp 2 (ring) x pp 1 x dp 1" in out.stdout
    assert "(ratio 1.0000)" in out.stdout            # the optimizer sharded over dp x cp = 2 ranks
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4] and all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    assert any(r["kind"] == "eval" for r in records) and any(r["kind"] == "generate_eval" for r in records)
    for r in train:   # rank 0's ring bytes of each logged step = the planner's (tests/test_comm_ledger.py)
        sent = sum(e["bytes"] for op, e in r["comm"]["cp"].items() if op != "recv")
        assert sent == pytest.approx(r["comm_predicted"]["cp"], rel=0.05), r["comm"]["cp"]
    assert (run / "hf" / "config.json").exists()


def test_train_cli_rejects_bad_config_before_starting(tmp_path):
    out = _run([sys.executable, "-m", "megasft.train", "--config", "examples/configs/tiny_chat.yaml",
                "parallel.tp=3"])
    assert out.returncode == 2
    assert "tp=3 does not divide num_attention_heads=4" in out.stderr
    out = _run([sys.executable, "-m", "megasft.train", "--config", "examples/configs/tiny_chat.yaml",
                "optim.learning_rate=1"])
    assert out.returncode == 2 and "unknown key" in out.stderr and "valid:" in out.stderr


def test_gpu_check_script_runs_on_cpu_as_far_as_it_can(tiny_data, tmp_path):
    """benchmarks/gpu_check.sh, the one prepared command for a lent GPU, cannot rot: on CPU its
    CUDA tests skip themselves with a reason, a short training run must lower the loss, and the
    MFU section says why it is skipped."""
    out = _run(["bash", "benchmarks/gpu_check.sh", str(tmp_path / "check")],
               env_extra={"GPU_CHECK_STEPS": "4", "GPU_CHECK_DATA": str(tiny_data)})
    report = (tmp_path / "check" / "gpu_check.txt").read_text()
    assert out.returncode == 0, report + out.stderr[-2000:]
    assert "SKIPPED" in report and "no CUDA device" in report          # the cuda-marked tests
    assert "2. tiny chat example, fp32, 4 steps" in report and "PASS: loss" in report
    assert "SKIP: no CUDA device" in report.split("## 3.")[1]
