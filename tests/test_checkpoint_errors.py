"""Checkpoint edge cases in one process: the flat-range -> canonical-block mapping, bad input
(missing latest, truncated or corrupt files, another model's checkpoint) failing before any
step with the file named, the train entry point's resume, and SIGKILL in the middle of a save."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from megasft.checkpoint.convert import hf_to_megasft
from megasft.checkpoint.pieces import flat_blocks
from megasft.checkpoint.errors import CheckpointMismatch
from megasft.checkpoint.sharded import LATEST, Checkpointer, CheckpointError, resolve_checkpoint, step_name
from megasft.config import Config
from megasft.data.indexed import IndexedDatasetBuilder
from megasft.parallel_state import ParallelState
from megasft.tensor_parallel.spec import Shard, TPSplit, set_spec
from megasft.training.loop import Trainer
from tests.oracle import hf_model, tiny_fields

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ flat ranges -> canonical blocks
def _param(name_shape, split):
    param = nn.Parameter(torch.empty(name_shape))
    if split is not None:
        set_spec(param, split=split)
    return param


CASES = [  # (megasft name, split, canonical names) - fused, padded, row-parallel, 1-D, unsplit
    ("layers.0.attention.kv_proj.weight", TPSplit(0, (Shard(8, 2, 1), Shard(8, 2, 1))),
     ("model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight")),
    ("embedding.weight", TPSplit(0, (Shard(13, 2, 1, padded=16),)), ("model.embed_tokens.weight",)),
    ("layers.0.mlp.down.weight", TPSplit(1, (Shard(10, 2, 1),)), ("model.layers.0.mlp.down_proj.weight",)),
    ("layers.0.attention.kv_proj.bias", TPSplit(0, (Shard(8, 2, 0), Shard(8, 2, 0))),
     ("model.layers.0.self_attn.k_proj.bias", "model.layers.0.self_attn.v_proj.bias")),
    ("norm.weight", None, ("model.norm.weight",)),
]


@pytest.mark.parametrize("name,split,hf_names", CASES, ids=[c[0] for c in CASES])
def test_flat_blocks_map_every_element_to_its_canonical_place(name, split, hf_names):
    g = torch.Generator().manual_seed(0)
    cols = 3
    one_d = name.endswith("bias") or name.startswith("norm")
    full_shape = lambda s: (s.size,) if one_d else ((s.size, cols) if split.dim == 0 else (cols, s.size))  # noqa: E731
    if split is None:
        fulls = [torch.randn(6, generator=g)]
        local = fulls[0]
    else:
        fulls = [torch.randn(full_shape(s), generator=g) for s in split.parts]
        local = split.local_from_full(fulls)
    param = _param(local.shape, split)
    canonical = dict(zip(hf_names, fulls))
    flat = local.reshape(-1)
    valid = torch.ones(flat.numel(), dtype=torch.bool)
    if name == "embedding.weight":   # local rows 5..7 are vocab padding (rows 13..15 of 16)
        valid[5 * cols:] = False
    for a, b in [(0, flat.numel()), (1, flat.numel() - 2), (4, 5), (2, 2 + cols + 1)]:
        covered = torch.zeros(flat.numel(), dtype=torch.bool)
        for fb in flat_blocks(name, param, a, b):
            n = int(np.prod(fb.shape))
            block = flat[fb.flat_start:fb.flat_start + n].view(fb.shape)
            expected = canonical[fb.name]
            for dim, (o, s) in enumerate(zip(fb.offsets, fb.shape)):
                expected = expected.narrow(dim, o, s)
            assert torch.equal(block, expected), (fb, a, b)
            assert not covered[fb.flat_start:fb.flat_start + n].any()
            covered[fb.flat_start:fb.flat_start + n] = True
        in_range = torch.zeros_like(covered)
        in_range[a:b] = True
        assert torch.equal(covered, in_range & valid), (a, b)


# ------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    """A tiny megasft checkpoint root (converted from a random HF model)."""
    tmp = tmp_path_factory.mktemp("imported")
    hf_model(tiny_fields(), seed=1).save_pretrained(tmp / "hf")
    hf_to_megasft(tmp / "hf", tmp / "ckpt")
    return tmp / "ckpt"


def _trainer(tmp: Path, load: str, **model):
    cfg = Config.from_dict({"model": tiny_fields(**model),
                            "data": {"seq_len": 16, "global_batch_tokens": 32, "micro_batch_size": 2},
                            "train": {"steps": 2, "precision": "fp32", "run_dir": str(tmp)},
                            "checkpoint": {"load": load}}).validate()
    ps = ParallelState.single()
    return Trainer(cfg, ps, log=False), Checkpointer(cfg, ps)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_latest_and_fresh_auto_start(imported, tmp_path):
    root = _copy(imported, tmp_path / "ck")
    (root / LATEST).unlink()
    trainer, ckpt = _trainer(tmp_path, str(root))
    with pytest.raises(CheckpointError, match=rf"{root / LATEST} not found.*{step_name(0)}"):
        ckpt.resume(trainer, None)
    (root / LATEST).write_text("step_00000099\n")
    with pytest.raises(CheckpointError, match="step_00000099.*does not exist"):
        resolve_checkpoint(root)
    trainer, ckpt = _trainer(tmp_path / "fresh", "auto")   # auto with nothing saved yet: fresh start
    assert ckpt.resume(trainer, None) is None and trainer.step == 0
    (tmp_path / "fresh" / "checkpoints" / ".tmp-step_00000002").mkdir(parents=True)   # a killed first save
    assert ckpt.resume(trainer, None) is None
    _copy(imported / step_name(0), tmp_path / "fresh" / "checkpoints" / step_name(0))   # saves, no latest
    with pytest.raises(CheckpointError, match="latest not found"):
        ckpt.resume(trainer, None)


def test_truncated_and_corrupt_files_are_named(imported, tmp_path):
    ck = _copy(imported / step_name(0), tmp_path / "trunc")
    data = next(ck.glob("*.distcp"))
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    trainer, ckpt = _trainer(tmp_path, str(ck))
    with pytest.raises(CheckpointError, match=rf"{data} is truncated"):
        ckpt.resume(trainer, None)
    ck = _copy(imported / step_name(0), tmp_path / "corrupt")
    (ck / ".metadata").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match=rf"{ck / '.metadata'} is corrupt"):
        ckpt.load(ck, trainer, None)
    ck = _copy(imported / step_name(0), tmp_path / "incomplete")
    (ck / ".metadata").unlink()
    with pytest.raises(CheckpointError, match="latest not found|no complete checkpoint"):
        ckpt.load(ck, trainer, None)
    assert trainer.step == 0


def test_other_model_shape_is_refused_with_the_differences(imported, tmp_path):
    trainer, ckpt = _trainer(tmp_path, str(imported), hidden_size=48, intermediate_size=128)
    with pytest.raises(CheckpointMismatch, match="hidden_size: checkpoint 96, config 48.*intermediate_size"):
        ckpt.resume(trainer, None)


# ------------------------------------------------------------------ the train entry point
def _dataset(path: Path) -> None:
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(path, vocab_size=1003)
    for _ in range(40):
        n = int(rng.integers(2, 17))
        builder.add(rng.integers(1, 1003, n), (rng.random(n) < 0.5).astype(np.uint8))
    builder.finish({"pad_id": 0})


def test_train_entry_resumes_and_reports_bad_checkpoints(tmp_path, capsys, monkeypatch):
    from megasft.train import main

    for var in ("WORLD_SIZE", "RANK", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)
    _dataset(tmp_path / "data")
    model = [f"model.{k}={v}" for k, v in tiny_fields().items() if k != "rope_scaling"]
    common = model + [f"data.train_path={tmp_path / 'data'}", "data.seq_len=16", "data.global_batch_tokens=64",
                      "train.precision=fp32", f"train.run_dir={tmp_path / 'run'}", "train.progress_bar=\"off\"",
                      "checkpoint.save_interval=2", "checkpoint.load=auto"]
    assert main(common + ["train.steps=2"]) == 0
    assert (tmp_path / "run" / "checkpoints" / LATEST).read_text().strip() == step_name(2)
    assert main(common + ["train.steps=4", "train.replan_schedule=true"]) == 0   # 2 more steps, new schedule
    assert "resumed from" in capsys.readouterr().out
    assert (tmp_path / "run" / "checkpoints" / LATEST).read_text().strip() == step_name(4)
    bad = [c for c in common if not c.startswith("model.hidden_size")] + ["model.hidden_size=48", "train.steps=6"]
    assert main(bad) == 3
    err = capsys.readouterr().err
    assert step_name(4) in err and "hidden_size: checkpoint 96, config 48" in err


# ------------------------------------------------------------------ SIGKILL during a save
CHILD = textwrap.dedent("""
    import sys, time
    from megasft.checkpoint import resharding as planner
    from megasft.checkpoint.sharded import Checkpointer
    from megasft.config import Config
    from megasft.parallel_state import ParallelState
    from megasft.training.loop import Trainer
    from tests.oracle import tiny_fields

    cfg = Config.from_dict({"model": tiny_fields(), "train": {"steps": 2, "precision": "fp32", "run_dir": sys.argv[1]},
                            "data": {"seq_len": 16, "global_batch_tokens": 32}}).validate()
    ps = ParallelState.single()
    trainer = Trainer(cfg, ps, log=False)
    ckpt = Checkpointer(cfg, ps)
    trainer.step = 1
    ckpt.save(trainer, None)
    resolve = planner.PiecesSavePlanner.resolve_data
    written = []
    def slow(self, item):   # let the parent kill us with the second save's files half written
        written.append(item)
        if len(written) == 5:
            print("WRITING", flush=True)
            time.sleep(60)
        return resolve(self, item)
    planner.PiecesSavePlanner.resolve_data = slow
    trainer.step = 2
    ckpt.save(trainer, None)
    print("FINISHED", flush=True)
""")


def test_sigkill_during_save_keeps_latest_at_the_previous_checkpoint(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        line = ""
        while "WRITING" not in line and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "child exited before the second save"
        assert "WRITING" in line
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    root = tmp_path / "checkpoints"
    assert (root / LATEST).read_text().strip() == step_name(1)
    partial = root / (".tmp-" + step_name(2))
    assert partial.is_dir() and not (partial / ".metadata").exists()
    assert not (root / step_name(2)).exists()
    # The previous checkpoint loads; the next save of the same step replaces the leftovers.
    trainer, ckpt = _trainer(tmp_path, str(root))
    assert ckpt.resume(trainer, None) == root / step_name(1) and trainer.step == 1
    trainer.step = 2
    ckpt.save(trainer, None)
    assert (root / LATEST).read_text().strip() == step_name(2) and not partial.exists()
    ckpt.save(trainer, None)   # saving the same step again replaces it
    assert (root / LATEST).read_text().strip() == step_name(2)
    assert sorted(p.name for p in root.iterdir()) == [LATEST, step_name(1), step_name(2)]
    assert ckpt.load(root, trainer, None)["step"] == 2
