"""What a run reports while and after it trains (in-process, tiny model): the logged loss is the
mean over the log interval, step_time_s is per step, log lines fit 100 columns, and the
end-of-run summary holds the run's totals and where its results are."""
from __future__ import annotations

import json
import math

from tests.runs import train_args

STEPS = 6


def records(run) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["kind"] == "train"], [r for r in lines if r["kind"] == "eval"]


def test_loss_is_the_mean_over_the_log_interval_and_the_summary_adds_up(data, tmp_path, main):
    common = (f"train.steps={STEPS}", "data.eval_fraction=0.1", "train.eval_interval=2")
    rc, _ = main(train_args(data, tmp_path / "every", "train.log_interval=1", *common))
    assert rc == 0
    every, _ = records(tmp_path / "every")
    rc, err = main(train_args(data, tmp_path / "sparse", "train.log_interval=3", *common))
    assert rc == 0 and err == []
    out = main.out.splitlines()
    sparse, evals = records(tmp_path / "sparse")

    # Same seed, same data order, one process: the two runs compute the same step losses.
    per_step = {r["step"]: r["loss"] for r in every}
    assert [r["step"] for r in sparse] == [3, 6]
    for r in sparse:
        window = [per_step[s] for s in range(r["step"] - 2, r["step"] + 1)]
        # the mean of 3 float64 losses: exact up to the summation order
        assert math.isclose(r["loss"], sum(window) / 3, rel_tol=1e-12), (r, window)
        assert r["loss_avg_steps"] == 3 and r["last_loss"] == per_step[r["step"]]
        # step_time_s is one step's share of the window's training time: 3 steps of 64 tokens
        assert math.isclose(r["step_time_s"] * 3, 3 * 64 / r["tokens_per_s"], rel_tol=1e-9)
    assert any(line.startswith(f"step 3/{STEPS}  loss(avg 3) {sparse[0]['loss']:.4f}  lr ") for line in out)

    # The summary: totals over the run's steps, the best eval, the results' paths.
    trained = sum(round(64 * r["trained_tokens_per_s"] / r["tokens_per_s"]) for r in every)
    best = min(evals, key=lambda e: e["eval_loss"])
    start = next(i for i, line in enumerate(out) if line.startswith("megasft: done after"))
    summary = out[start:]
    assert summary[0].startswith(f"megasft: done after {STEPS} steps in ") and \
        summary[0].endswith(f"(steps 1-{STEPS} in this run)")
    assert summary[1] == f"  tokens   {STEPS * 64:,} ({trained:,} trained, {trained / (STEPS * 64):.1%})"
    assert summary[2] == f"  eval     best loss {best['eval_loss']:.4f} at step {best['step']}"
    checkpoint = tmp_path / "sparse" / "checkpoints" / f"step_{STEPS:08d}"
    assert summary[3] == f"  checkpoint {checkpoint}" and checkpoint.is_dir()
    assert summary[4] == f"  metrics  {tmp_path / 'sparse' / 'metrics.jsonl'}"
    assert len(summary) == 5   # no export configured
    for line in out[:start]:   # start-up lines, log lines, notes (the summary names paths, never cut)
        assert len(line) <= 100, line
        assert "\r" not in line   # stdout is not a terminal: no live progress frames


def test_plot_marks_every_logged_step(data, tmp_path, main, monkeypatch):
    import pytest

    matplotlib = pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from megasft import cli

    rc, _ = main(train_args(data, tmp_path / "run", "train.steps=4", "train.log_interval=2"))
    assert rc == 0
    drawn = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **kw: (drawn.append(fig), save(fig, *a, **kw))[1])
    assert cli.main(["plot", str(tmp_path / "run" / "metrics.jsonl")]) == 0
    png = tmp_path / "run" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    train, _ = records(tmp_path / "run")
    for ax, key in zip(drawn[0].axes, ("loss", "lr", "grad_norm")):
        line = ax.lines[0]
        assert line.get_marker() == "."                      # a point per logged step
        assert list(line.get_xdata()) == [2, 4] and list(line.get_ydata()) == [r[key] for r in train]
    assert matplotlib.get_backend().lower() == "agg"
