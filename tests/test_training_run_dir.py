"""One run per run folder (megasft.training.run_dir): a previous run is never mixed with a new
one, a resume keeps metrics.jsonl in step order, and a resume never re-spreads the LR schedule
silently. Real runs of megasft.train in this process (tests.runs, the `main` fixture)."""
from __future__ import annotations

import json
from pathlib import Path

from tests.runs import train_args


def _steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_a_previous_run_is_refused_unless_resumed_or_overwritten(main, data, tmp_path):
    run = tmp_path / "run"
    assert main(train_args(data, run, "train.steps=2"))[0] == 0
    rc, err = main(train_args(data, run, "train.steps=2"))
    assert (rc, err) == (2, [f"megasft.train: train.run_dir={run} holds a previous run ({run / 'config.yaml'}, "
                             f"{run / 'metrics.jsonl'}, {run / 'checkpoints'}); resume it with checkpoint.load=auto, "
                             f"start afresh with train.overwrite=true (the previous run is moved to {run}.old-<time>), "
                             "or choose another train.run_dir"])
    before = (run / "metrics.jsonl").read_text()
    rc, _ = main(train_args(data, run, "train.steps=3", "train.overwrite=true"))
    assert rc == 0
    (archive,) = tmp_path.glob("run.old-*")
    assert (archive / "metrics.jsonl").read_text() == before                    # nothing lost
    assert sorted(p.name for p in (archive / "checkpoints").iterdir()) == ["latest", "step_00000002"]
    assert _steps(run / "metrics.jsonl") == [1, 2, 3]                            # only the new run
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000003"]


def test_resume_keeps_metrics_in_step_order(main, data, tmp_path):
    run = tmp_path / "run"
    common = ["train.steps=4", "checkpoint.save_interval=2", "checkpoint.load=auto"]
    # Step 3 is logged, then its weights turn non-finite: the run stops unsaved (latest = step 2).
    rc, _ = main(train_args(data, run, *common), fault="nan_weight@3")
    assert rc == 4 and _steps(run / "metrics.jsonl") == [1, 2, 3]
    rc, err = main(train_args(data, run, *common))
    assert rc == 0
    assert _steps(run / "metrics.jsonl") == [1, 2, 3, 4]                         # step 3 run again, once
    assert _steps(run / "metrics.rewound.jsonl") == [3]                          # the dead run's step 3


def test_resume_with_another_schedule_is_refused_or_replanned(main, data, tmp_path):
    run = tmp_path / "run"
    common = ["checkpoint.load=auto", "optim.lr=0.001", "optim.warmup_steps=1"]
    assert main(train_args(data, run, "train.steps=4", *common), fault="usr1@2")[0] == 0   # stopped at 2
    rc, err = main(train_args(data, run, "train.steps=8", *common))
    assert rc == 3 and len(err) == 1
    assert err[0].startswith(f"megasft.train: checkpoint error: {run / 'checkpoints' / 'step_00000002'} was "
                             "trained with another LR schedule (train.steps=4 -> 8); resuming would re-spread")
    assert err[0].endswith("or train.replan_schedule=true to continue on this run's schedule")
    rc, err = main(train_args(data, run, "train.steps=8", "train.replan_schedule=true", *common))
    # warmup 1 then cosine to 10 %: at step 2 of 4, 1e-3 * (0.1 + 0.9 * (1 + cos(pi/3)) / 2) = 7.75e-4;
    # of 8, 1e-3 * (0.1 + 0.9 * (1 + cos(pi/7)) / 2) = 9.55e-4.
    assert rc == 0 and err == ["megasft: train.replan_schedule: continuing step_00000002 on a new LR schedule "
                               "(train.steps=4 -> 8); the learning rate at step 2 goes from 7.750e-04 to 9.554e-04"]
    assert _steps(run / "metrics.jsonl") == list(range(1, 9))
