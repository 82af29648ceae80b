"""A data.sources mixture through real checkpoints on 2 gloo ranks: exact resume, and resume at
another DP size with the same rows.

  ref     DP2, 6 steps of a 3-source mixture (small sources: each wraps into later epochs), saves every 2
  resume  DP2 loads ref/step_4, runs 5-6                 -> bit-identical losses, weights and rows
  tp2     TP2 (DP1) loads ref/step_2, runs 3-6           -> the same rows (source, documents) per step;
                                                            losses and weights within fp32 tolerance
"""
from __future__ import annotations

import torch
from torch.testing import assert_close

from megasft.checkpoint.sharded import Checkpointer, read_meta, step_name
from megasft.config import Config
from megasft.data.loader import build_loaders
from megasft.hf.names import assemble_canonical, canonical_pieces
from megasft.layout import Layout
from megasft.parallel_state import ParallelState
from megasft.training.loop import Trainer
from tests.multiproc import run_ranks
from tests.oracle import tiny_fields
from tests.test_data_mixture import make_source

SEQ, ROWS, STEPS = 32, 8, 6
FIELDS = tiny_fields()


def make_config(tmp: str, name: str, tp: int, load=None) -> Config:
    sources = [{"name": "a", "path": f"{tmp}/a", "weight": 0.5, "eval_fraction": 0.2},
               {"name": "b", "path": f"{tmp}/b", "weight": 0.3},
               {"name": "c", "path": f"{tmp}/c", "weight": 0.2}]
    cfg = Config.from_dict({
        "model": FIELDS, "parallel": {"tp": tp},
        "data": {"sources": sources, "seq_len": SEQ, "global_batch_tokens": SEQ * ROWS, "micro_batch_size": 1},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "train": {"steps": STEPS, "precision": "fp32", "run_dir": f"{tmp}/{name}", "seed": 7, "eval_interval": 3},
        "checkpoint": {"dir": f"{tmp}/{name}/ckpt", "save_interval": 2, "keep_last": 0, "load": load},
    }).validate()
    Layout.validated(cfg, 2)
    return cfg


def run(tmp: str, name: str, tp: int, load=None):
    """(losses, rows per step, this rank's weight pieces) of one run to STEPS."""
    ps = ParallelState.build(tp, 1, ranks=[0, 1])
    cfg = make_config(tmp, name, tp, load)
    torch.manual_seed(cfg.train.seed)
    loader, evals = build_loaders(cfg.data, cfg.train.seed, ps.dp_rank, ps.dp, cfg.model.vocab_size,
                                  steps=cfg.train.steps)
    trainer = Trainer(cfg, ps, log=False)
    ckpt = Checkpointer(cfg, ps)
    ckpt.resume(trainer, loader)
    rows, step_batch = [], loader.next_global_batch

    def recording():   # the global rows (source, documents) of every step trained
        batch = step_batch()
        rows.append([(name, list(docs)) for name, docs in loader.last_rows])
        return batch

    loader.next_global_batch = recording
    outputs = trainer.fit(loader, evals, checkpointer=ckpt)
    ckpt.close()
    pieces = [(n, d, o, p.clone()) for c in trainer.chunks for n, d, o, p in canonical_pieces(c)]
    return [o.loss for o in outputs], rows, pieces


def _rank_main(tmp: str) -> dict:
    return {"ref": run(tmp, "ref", 1),
            "resume": run(tmp, "resume", 1, load=f"{tmp}/ref/ckpt/{step_name(4)}"),
            "tp2": run(tmp, "tp2", 2, load=f"{tmp}/ref/ckpt/{step_name(2)}")}


def weights(results: list[dict], name: str) -> dict:
    return assemble_canonical(p for rank in results for p in rank[name][2])


def test_mixture_resumes_exactly_and_at_another_dp_size(tmp_path):
    tmp = str(tmp_path)
    for k, (name, n_docs) in enumerate((("a", 30), ("b", 16), ("c", 8))):   # 4-12 rows per epoch
        make_source(tmp_path / name, k, n_docs, vocab=FIELDS["vocab_size"])
    results = run_ranks(_rank_main, 2, tmp, timeout=600)
    ref_losses, ref_rows, _ = results[0]["ref"]
    assert len(ref_rows) == STEPS and all(len(step) == ROWS for step in ref_rows)
    assert {name for step in ref_rows for name, _ in step} == {"a", "b", "c"}
    meta = read_meta(tmp_path / "ref" / "ckpt" / step_name(STEPS))
    assert all(s["epoch"] >= 1 for s in meta["loader"]["sources"])   # every source wrapped into epoch 1+
    ref_w = weights(results, "ref")
    # Exact resume at DP2: the same rows, bit-identical losses and weights.
    losses, rows, _ = results[0]["resume"]
    assert rows == ref_rows[4:] and losses == ref_losses[4:]
    for name, tensor in weights(results, "resume").items():
        assert torch.equal(tensor, ref_w[name]), name
    assert read_meta(tmp_path / "resume" / "ckpt" / step_name(STEPS))["loader"] == meta["loader"]
    # Resume at TP2 x DP1 from step 2: the same rows; the numbers differ only by TP's summation
    # order (fp32, tolerances of the resharding test in test_checkpoint_resume).
    losses, rows, _ = results[0]["tp2"]
    assert rows == ref_rows[2:]
    assert_close(torch.tensor(losses), torch.tensor(ref_losses[2:]), rtol=1e-5, atol=1e-6)
    for name, tensor in weights(results, "tp2").items():
        assert_close(tensor, ref_w[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert read_meta(tmp_path / "tp2" / "ckpt" / step_name(STEPS))["loader"] == meta["loader"]
