"""The profiling aid writes a Chrome trace with real op events for a tiny single-process train step."""
from __future__ import annotations

import json

from megasft.config import Config
from megasft.parallel_state import ParallelState
from megasft.training.loop import Trainer
from megasft.training.profiler import ProfileWindow, maybe_profile
from tests.oracle import model_batch, packed_batch, tiny_fields

SEQ = 32


def tiny_trainer() -> Trainer:
    cfg = Config.from_dict({
        "model": tiny_fields(attention_backend="sdpa"),
        "data": {"seq_len": SEQ, "global_batch_tokens": 2 * SEQ, "micro_batch_size": 2},
        "train": {"steps": 4, "precision": "fp32", "progress_bar": "off"},
    }).validate()
    return Trainer(cfg, ParallelState.single(), log=False)


def run_steps(trainer: Trainer, prof, steps: int) -> None:
    batch = model_batch(packed_batch([[10, 14], [32]], SEQ, vocab=1003, seed=1))
    for _ in range(steps):
        trainer.train_step([batch])
        prof.step()


def test_trace_has_op_events_and_steps(tmp_path, capsys):
    trainer = tiny_trainer()
    window = ProfileWindow(wait=1, warmup=1, active=2)
    with maybe_profile(True, tmp_path, rank=0, window=window) as prof:
        run_steps(trainer, prof, window.total)
    trace = tmp_path / "profile" / "rank0.json"
    assert prof.trace_path == trace and trace.exists()
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name", "") for e in events if e.get("ph") == "X"}
    # The active steps are recorded, the waited and warm-up ones are not.
    steps = sorted(n for n in names if n.startswith("ProfilerStep#"))
    assert steps == ["ProfilerStep#2", "ProfilerStep#3"]
    # Real work of a train step: GEMMs forward and backward, attention, the optimizer's update
    # (torch's fused AdamW kernel, or the reference kernel's addcdiv_).
    assert "aten::mm" in names or "aten::addmm" in names
    assert names & {"aten::_fused_adamw_", "aten::addcdiv_"}
    assert any(n.startswith("aten::scaled_dot_product") or "attention" in n for n in names)
    assert any("Backward" in n for n in names)
    out = capsys.readouterr().out
    assert "Self CPU" in out and str(trace) in out


def test_other_ranks_write_but_do_not_print(tmp_path, capsys):
    trainer = tiny_trainer()
    with maybe_profile(True, tmp_path, rank=3, window=ProfileWindow(wait=0, warmup=1, active=1)) as prof:
        run_steps(trainer, prof, 2)
    assert (tmp_path / "profile" / "rank3.json").exists()
    assert capsys.readouterr().out == ""


def test_disabled_writes_nothing(tmp_path):
    trainer = tiny_trainer()
    with maybe_profile(False, tmp_path, rank=0) as prof:
        run_steps(trainer, prof, 2)
    assert prof.trace_path is None
    assert not (tmp_path / "profile").exists()
