"""``megasft train --nproc 2`` as a user runs it (a real subprocess; torchrun's agent inside it):
a start-up error is one line on stderr — the launcher's ChildFailedError block never follows —
whether the parent finds it before spawning or the ranks find it after."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.runs import train_args

ROOT = Path(__file__).resolve().parents[1]


def megasft_train(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "TORCHELASTIC_RUN_ID")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}")
    return subprocess.run([sys.executable, "-m", "megasft", "train", "--nproc", "2", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_start_up_errors_are_one_line_under_the_launcher(data, tmp_path):
    # Found by the parent before any rank exists: a missing dataset.
    missing = tmp_path / "nope"
    out = megasft_train(*train_args(data, tmp_path / "a", f"data.train_path={missing}"))
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"megasft.train: no indexed dataset at {missing} (data.train_path; {missing / 'meta.json'} is missing); "
        f"write one with megasft preprocess --output {missing}"]
    assert out.stdout == ""

    # Found by both ranks after the launch (the dataset's token ids against the model's vocabulary):
    # rank 0 prints it, rank 1 is silent, and the agent's failure report is held back.
    out = megasft_train(*train_args(data, tmp_path / "b", "model.vocab_size=500"))
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"megasft.train: {data}: token id 639 >= model.vocab_size=500 in document 0; the largest is 1002 "
        "(preprocessed without a tokenizer, --vocab-size 1003); set model.vocab_size to at least 1003, or re-run "
        "megasft preprocess with the model's tokenizer or --vocab-size"], out.stderr
