"""Verified checkpoints in one process: a same-size byte flip is refused naming the file (through
megasft.train and the Checkpointer), load=auto falls back to the newest checkpoint that verifies
and says which it skipped and why, keep_last keeps good checkpoints rather than damaged ones and
never loses the last good one to a save that did not finish, and an async save that finished
writing is published at the next start when the job died before publishing it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megasft.checkpoint.errors import CheckpointError
from megasft.checkpoint.manifest import MANIFEST
from megasft.checkpoint.meta import upgrade
from megasft.checkpoint.sharded import LATEST, Checkpointer, step_name
from megasft.config import Config
from megasft.data.indexed import IndexedDatasetBuilder
from megasft.parallel_state import ParallelState
from megasft.training.loop import Trainer
from tests.corrupt import flip_byte
from tests.oracle import tiny_fields


def listing(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def checkpointer(tmp: Path, load=None, **checkpoint):
    cfg = Config.from_dict({"model": tiny_fields(),
                            "data": {"seq_len": 16, "global_batch_tokens": 32, "micro_batch_size": 2},
                            "train": {"steps": 9, "precision": "fp32", "run_dir": str(tmp)},
                            "checkpoint": {"load": load, **checkpoint}}).validate()
    ps = ParallelState.single()
    return Trainer(cfg, ps, log=False), Checkpointer(cfg, ps)


def save_steps(ckpt: Checkpointer, trainer: Trainer, steps) -> None:
    for step in steps:
        trainer.step = step
        ckpt.save(trainer, None)


# ------------------------------------------------------------------ through megasft.train
def test_train_refuses_a_flipped_byte_and_auto_falls_back(tmp_path, capsys, monkeypatch):
    from megasft.train import main

    for var in ("WORLD_SIZE", "RANK", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(tmp_path / "data", vocab_size=1003)
    for _ in range(40):
        n = int(rng.integers(2, 17))
        builder.add(rng.integers(1, 1003, n), (rng.random(n) < 0.5).astype(np.uint8))
    builder.finish({"pad_id": 0})
    model = [f"model.{k}={v}" for k, v in tiny_fields().items() if k != "rope_scaling"]
    root = tmp_path / "run" / "checkpoints"
    common = model + [f"data.train_path={tmp_path / 'data'}", "data.seq_len=16", "data.global_batch_tokens=64",
                      "train.precision=fp32", f"train.run_dir={tmp_path / 'run'}", "train.progress_bar=\"off\"",
                      "checkpoint.save_interval=1", "checkpoint.keep_last=0"]
    assert main(common + ["train.steps=2", "checkpoint.load=auto"]) == 0
    manifest = json.loads((root / step_name(2) / MANIFEST).read_text())
    assert set(manifest["files"]) == {p.name for p in (root / step_name(2)).iterdir()} - {MANIFEST, "config.yaml"}
    data = flip_byte(root / step_name(2))
    capsys.readouterr()
    assert main(common + ["train.steps=3", f"checkpoint.load={root / step_name(2)}"]) == 3
    err = capsys.readouterr().err
    assert f"checkpoint error: {data} is corrupt: its sha256 is" in err and "nothing was loaded" in err
    assert main(common + ["train.steps=3", "checkpoint.load=auto", "train.replan_schedule=true"]) == 0
    captured = capsys.readouterr()
    assert f"checkpoint.load=auto: skipping {step_name(2)}: {data} is corrupt" in captured.err
    assert f"resumed from {root / step_name(1)} at step 1" in captured.out
    # The resumed run re-saved step 2 over the damaged copy and went on to 3.
    assert (root / LATEST).read_text().strip() == step_name(3)
    assert listing(root) == [LATEST, step_name(1), step_name(2), step_name(3)]
    assert main(common + ["train.steps=3", f"checkpoint.load={root / step_name(2)}"]) == 0


# ------------------------------------------------------------------ through the Checkpointer
def test_auto_skips_damaged_checkpoints_and_prune_keeps_good_ones(tmp_path, capsys):
    trainer, ckpt = checkpointer(tmp_path, keep_last=0)
    save_steps(ckpt, trainer, [1, 2, 3])
    root = ckpt.root
    data = flip_byte(root / step_name(3))
    with pytest.raises(CheckpointError, match=rf"^{data} is corrupt: its sha256 is .*{MANIFEST} recorded"):
        ckpt.load(root / step_name(3), trainer, None)
    capsys.readouterr()

    trainer, ckpt = checkpointer(tmp_path, load="auto", keep_last=2)
    assert ckpt.resume(trainer, None) == root / step_name(2) and trainer.step == 2
    assert [(p.name, why.startswith(f"{data} is corrupt: ")) for p, why in ckpt.skipped] == [(step_name(3), True)]
    assert f"skipping {step_name(3)}: {data} is corrupt" in capsys.readouterr().err
    # keep_last=2 keeps the two newest good checkpoints, not the damaged step 3 in their place.
    save_steps(ckpt, trainer, [4])
    assert listing(root) == [LATEST, step_name(2), step_name(4)]

    # A truncated file and a latest naming a deleted directory are skipped too, newest first.
    save_steps(ckpt, trainer, [5])
    with open(root / step_name(5) / ".metadata", "r+b") as f:
        f.truncate(10)
    (root / LATEST).write_text(step_name(7) + "\n")
    trainer, ckpt = checkpointer(tmp_path, load="auto")
    assert ckpt.resume(trainer, None) == root / step_name(4) and trainer.step == 4
    reasons = [why for _, why in ckpt.skipped]
    assert [p.name for p, _ in ckpt.skipped] == [step_name(7), step_name(5)]
    assert f"{root / step_name(7) / '.metadata'} not found" in reasons[0]
    assert f"{root / step_name(5) / '.metadata'} is corrupt" in reasons[1]
    assert listing(root) == [LATEST, step_name(4), step_name(5)]   # keep_last=2 at step 5
    flip_byte(root / step_name(4))
    trainer, ckpt = checkpointer(tmp_path, load="auto")
    with pytest.raises(CheckpointError, match=rf"no checkpoint in {root} verifies \({step_name(7)}: .*"
                                              rf"{step_name(5)}: .*{step_name(4)}: .* is corrupt.*start afresh"):
        ckpt.resume(trainer, None)


def test_an_unfinished_save_is_not_published_and_prunes_nothing(tmp_path):
    trainer, ckpt = checkpointer(tmp_path, keep_last=1, async_save=True)
    save_steps(ckpt, trainer, [4])
    ckpt.close()
    save_steps(ckpt, trainer, [5])
    ckpt._pending[0].result()   # the background write finished; publishing waits for the next save
    tmp = ckpt.root / (".tmp-" + step_name(5))
    data = max(tmp.glob("*.distcp"), key=lambda f: f.stat().st_size)
    with open(data, "r+b") as f:   # the write "finished", but a file lost its tail
        f.truncate(data.stat().st_size - 1)
    with pytest.raises(CheckpointError, match=rf"saving {step_name(5)} failed: {data} is truncated.*not published"):
        ckpt.close()
    assert (ckpt.root / LATEST).read_text().strip() == step_name(4)
    assert (ckpt.root / step_name(4) / MANIFEST).exists() and not (ckpt.root / step_name(5)).exists()


def test_finished_async_save_is_published_at_the_next_start(tmp_path, capsys):
    trainer, ckpt = checkpointer(tmp_path, keep_last=2, async_save=True)
    save_steps(ckpt, trainer, [5])
    ckpt.close()
    save_steps(ckpt, trainer, [6])   # written in the background; published only at the next save
    root = ckpt.root
    ckpt._pending[0].result()   # the background write finished
    del ckpt   # and the job dies here: no next save, no close
    assert (root / LATEST).read_text().strip() == step_name(5)
    capsys.readouterr()

    trainer, ckpt = checkpointer(tmp_path, load="auto", keep_last=2)
    assert ckpt.resume(trainer, None) == root / step_name(6) and trainer.step == 6
    assert f"published {step_name(6)}" in capsys.readouterr().err
    assert (root / LATEST).read_text().strip() == step_name(6)
    assert listing(root) == [LATEST, step_name(5), step_name(6)]


def test_format_1_meta_is_read_in_the_current_shape():
    """Checkpoints saved before format 2 kept the trainer's fields at the top of meta and called
    the optimizer's step "step_count"."""
    old = {"format": 1, "step": 7, "best_eval": (2.5, 6), "consumed_tokens": 224,
           "optimizer": {"step_count": 6, "consecutive_skips": 1, "skipped_total": 1}}
    new = upgrade(old)
    assert new["trainer"] == {"step": 7, "best_eval": (2.5, 6)}
    assert new["optimizer"] == {"step": 6, "consecutive_skips": 1, "skipped_total": 1}
    assert old["optimizer"] == {"step_count": 6, "consecutive_skips": 1, "skipped_total": 1}   # not modified
    assert upgrade(new) is new
