"""train.epochs: steps derived from the packed rows, no document twice in a step, epoch tails
filled or dropped (megasft.data.loader)."""
from __future__ import annotations

from collections import Counter

import pytest

from megasft.config import Config, ConfigError, DataConfig
from megasft.data.loader import PackedLoader, build_loaders
from tests.test_data_loader import SEQ, docs_in, make_dataset

pytestmark = pytest.mark.quick


def run_to_end(loader: PackedLoader) -> list[list[int]]:
    """Documents of every step of an epochs-limited loader (dp_size 1), until it is exhausted."""
    steps = []
    while True:
        try:
            steps.append([d for mb in loader.next_global_batch() for d in docs_in(mb)])
        except ValueError as err:
            assert "epochs were consumed" in str(err)
            return steps


@pytest.mark.parametrize("rows_per_step", [3, 4, 6], ids=["rows3", "rows4", "rows6"])
def test_two_epochs_train_every_document_exactly_twice(tmp_path, rows_per_step):
    ds = make_dataset(tmp_path, n_docs=60)
    cfg = DataConfig(train_path=str(tmp_path), seq_len=SEQ, global_batch_tokens=rows_per_step * SEQ,
                     micro_batch_size=1)
    loader, _ = build_loaders(cfg, seed=3, epochs=2)
    plan = loader.describe_plan()
    printed = int(plan.split("train.epochs=2 -> ")[1].split(" steps")[0])
    e0, e1 = len(loader.epoch_rows(0)), len(loader.epoch_rows(1))
    assert e0 % rows_per_step or e1 % rows_per_step   # some epoch tail really is partial
    steps = run_to_end(loader)
    assert printed == loader.total_steps == len(steps) == -(-(e0 + e1) // rows_per_step)
    assert Counter(d for s in steps for d in s) == Counter({d: 2 for d in range(len(ds))})
    for s in steps:
        assert len(s) == len(set(s))   # never twice in one step


def test_old_spill_over_repeated_documents_within_a_step(tmp_path):
    """The case that made the fill rule necessary: the epoch 0 -> 1 seam step, taken as the plans
    back to back, holds some document twice; the loader's step at the seam does not."""
    ds = make_dataset(tmp_path, n_docs=60)
    loader = PackedLoader(ds, SEQ, 6 * SEQ, 1, seed=8)   # a seed whose seam repeats a document
    e0, e1 = loader.epoch_rows(0), loader.epoch_rows(1)
    seam = len(e0) // 6
    naive = [d for row in (e0 + e1)[6 * seam:6 * seam + 6] for d in row]
    assert len(naive) != len(set(naive))
    for _ in range(seam):
        loader.next_global_batch()
    got = [d for mb in loader.next_global_batch() for d in docs_in(mb)]
    assert len(got) == len(set(got)) and loader.state.deferred
    assert any("filled from epoch 1's plan" in line for line in loader.drain_tail_log())


def test_drop_mode_never_mixes_epochs_and_says_what_it_dropped(tmp_path):
    ds = make_dataset(tmp_path, n_docs=60)
    loader = PackedLoader(ds, SEQ, 4 * SEQ, 1, seed=3, epochs=2, epoch_tail="drop")
    e0, e1 = loader.epoch_rows(0), loader.epoch_rows(1)
    assert loader.total_steps == len(e0) // 4 + len(e1) // 4
    steps = run_to_end(loader)
    assert len(steps) == loader.total_steps
    trained = [d for row in e0[:4 * (len(e0) // 4)] + e1[:4 * (len(e1) // 4)] for d in row]
    assert [d for s in steps for d in s] == trained
    log = loader.drain_tail_log()
    assert log[0] == (f"epoch 0: dropped its last {len(e0) % 4} rows (fewer than the 4 of a step; "
                      "data.epoch_tail=drop)")
    assert loader.state.dropped_rows == len(e0) % 4 + len(e1) % 4


@pytest.mark.parametrize("stop", [2, 4, 5], ids=["stop2", "stop4-seam", "stop5"])
def test_resume_inside_a_filled_epoch_seam(tmp_path, stop):
    ds = make_dataset(tmp_path, n_docs=60)
    make = lambda dp_rank=0, dp=1, mbs=6: PackedLoader(ds, SEQ, 6 * SEQ, mbs // dp, dp_rank, dp, seed=9, epochs=3)
    straight = run_to_end(make())
    first = make(0, 2)
    for _ in range(stop):
        first.next_global_batch()
    resumed = make()   # at another dp size: the state is global
    resumed.load_state_dict(first.state_dict())
    assert run_to_end(resumed) == straight[stop:]


def test_epochs_config_field():
    cfg = Config.from_dict({"train": {"epochs": 2, "steps": 5}, "optim": {"warmup_steps": 10}}).validate()
    assert cfg.train.epochs == 2   # warmup is checked against the derived steps, not train.steps
    with pytest.raises(ConfigError, match=r"train.epochs=0 must be >= 1"):
        Config.from_dict({"train": {"epochs": 0}}).validate()
    with pytest.raises(ConfigError, match=r"data.epoch_tail='keep' is not one of \['fill', 'drop'\]"):
        Config.from_dict({"data": {"epoch_tail": "keep"}}).validate()


def test_train_epochs_runs_the_step_count_it_prints(main, data, tmp_path):
    """End to end through megasft.train: the derived step count is printed, and run."""
    import json
    import re

    from tests.runs import train_args

    run = tmp_path / "run"
    rc, err = main(train_args(data, run, "train.epochs=2", "train.steps=1"))   # epochs override steps
    assert (rc, err) == (0, [])
    steps = int(re.search(r"train\.epochs=2 -> (\d+) steps", main.out).group(1))
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps > 1 and logged == list(range(1, steps + 1))
