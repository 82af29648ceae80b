"""Sharded checkpoints on 4 gloo ranks: exact resume, resharding across layouts, HF round trip.

One spawned world runs every scenario (layouts use all 4 ranks). The reference for resume and
resharding is an uninterrupted run of the same config that saved along the way:

  ref     TP2xPP2, 6 steps, saves every 2 steps (keep_last=0)
  resume  TP2xPP2 loads ref/step_4 and runs steps 5-6       -> bit-identical losses and weights
  chain   TP1xPP1xDP4 loads ref/step_2, runs steps 3-4 (saves), TP4 loads that, runs 5-6
                                                             -> equal to ref within fp32 tolerance
  stop    TP2xDP2 with dropout + NEFTune + async save, ZeRO-1: a stop request after step 3 saves;
          a fresh run with load=auto resumes to 6            -> bit-identical to an uninterrupted run
  vpp     interleaved TP2xPP2 (v=2, 4 layers): resume at step 3 exact; reshard to TP1xDP4 with a
          replicated (non-ZeRO) optimizer close
  hf      HF checkpoints (tied, untied) converted with hf-to-megasft --tp 2 --pp 2, loaded at
          TP2xPP2, saved from there, exported with megasft-to-hf -> bit-identical tensors
  corrupt a copy of ref/step_4 with one byte flipped in the file rank 3 verifies
                                                             -> every rank refuses it, naming that file
  cp      CP2xDP2 (ring, ZeRO-1 over the 4 dp x cp ranks): resume at step 4 exact; reshard
          step 2 to CP1xDP4, run 3-4, then to TP2xCP2 (a2a), run 5-6 -> equal to cp_ref within fp32
          tolerance. Documents are padded to 2*cp = 4 in every CP run and, to read the same rows, in
          the CP1 one (a real cp=1 run pads nothing and refuses the cp=2 data position, see
          test_data_loader)
  ep      a Qwen3-MoE model at DP4 with EP2 (experts over 2 ranks, their ZeRO-1 state over the other
          2): resume at step 4 exact; reshard step 2 to EP1, run 3-6 -> equal to ep_ref within fp32
          tolerance; an HF MoE checkpoint loaded at TP2xCP2xEP2 (the EP group is the CP group, so both
          CP ranks of dp 0 write experts) and saved from there exports bit-identical tensors
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.testing import assert_close

from megasft.checkpoint.convert import hf_to_megasft, megasft_to_hf
from megasft.checkpoint.errors import CheckpointError
from megasft.checkpoint.manifest import MANIFEST
from megasft.checkpoint.sharded import LATEST, Checkpointer, read_meta, step_name
from megasft.config import Config
from megasft.data.indexed import IndexedDatasetBuilder
from megasft.data.loader import PackedLoader
from megasft.hf.io import hf_tensor_reader
from megasft.hf.names import assemble_canonical, canonical_pieces
from megasft.layout import Layout
from megasft.parallel_state import ParallelState
from megasft.training import faults
from megasft.training.loop import Trainer
from tests.multiproc import run_ranks
from tests.oracle import hf_model, moe_fields, tiny_fields
from tests.corrupt import flip_byte
from tests.test_hf_families import assert_export_bit_identical

SEQ, ROWS, STEPS = 16, 8, 6
FIELDS = tiny_fields(num_attention_heads=8, num_kv_heads=2)   # tp=4 splits 8 heads, copies 2 kv heads
MOE = moe_fields("qwen3_moe", vocab_size=FIELDS["vocab_size"])  # 8 experts: 4 per rank at ep 2


def make_dataset(path: Path, n_docs: int = 80) -> None:
    """Random documents of 2-16 tokens, about half of them trained."""
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(path, vocab_size=FIELDS["vocab_size"])
    for _ in range(n_docs):
        n = int(rng.integers(2, SEQ + 1))
        builder.add(rng.integers(1, FIELDS["vocab_size"], n), (rng.random(n) < 0.5).astype(np.uint8))
    builder.finish({"pad_id": 0})


def make_config(tmp: str, name: str, tp: int, pp: int, world: int, **overrides) -> Config:
    raw = {
        "model": dict(FIELDS, **overrides.pop("model", {})),
        "parallel": {"tp": tp, "pp": pp, **overrides.pop("parallel", {})},
        "data": {"train_path": f"{tmp}/data", "seq_len": SEQ, "global_batch_tokens": SEQ * ROWS,
                 "micro_batch_size": overrides.pop("mbs", 1)},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "train": {"steps": STEPS, "precision": "fp32", "run_dir": f"{tmp}/{name}", "seed": 7},
        "checkpoint": {"dir": f"{tmp}/{name}/ckpt", **overrides.pop("checkpoint", {})},
    }
    assert not overrides, overrides
    cfg = Config.from_dict(raw)
    Layout.validated(cfg, world)
    return cfg


def setup(tmp: str, name: str, tp: int, pp: int, **overrides):
    """Trainer, loader and Checkpointer of one layout on ranks 0-3, resumed per checkpoint.load."""
    doc_multiple = overrides.pop("doc_multiple", 1)
    parallel = overrides.get("parallel", {})
    ps = ParallelState.build(tp, pp, ranks=[0, 1, 2, 3], cp=parallel.get("cp", 1), ep=parallel.get("ep", 1))
    cfg = make_config(tmp, name, tp, pp, 4, **overrides)
    torch.manual_seed(cfg.train.seed)
    loader = PackedLoader(f"{tmp}/data", SEQ, SEQ * ROWS, cfg.data.micro_batch_size, ps.dp_rank, ps.dp,
                          seed=cfg.train.seed, doc_multiple=doc_multiple)
    trainer = Trainer(cfg, ps, log=False)
    ckpt = Checkpointer(cfg, ps)
    ckpt.resume(trainer, loader)
    return trainer, loader, ckpt


def run(tmp: str, name: str, tp: int, pp: int, stop_after: int = 0, **overrides):
    """Train one layout to the end (or a stop request after step `stop_after`); returns (losses of
    the steps run, this rank's canonical weight pieces)."""
    if stop_after:   # a real SIGUSR1 during that step, as Slurm sends before the time limit
        os.environ[faults.ENV] = f"usr1@{stop_after}"
    try:
        trainer, loader, ckpt = setup(tmp, name, tp, pp, **overrides)
    finally:
        os.environ.pop(faults.ENV, None)
    outputs = trainer.fit(loader, checkpointer=ckpt)
    pieces = [(n, d, o, p.clone()) for c in trainer.chunks for n, d, o, p in canonical_pieces(c)]
    return [o.loss for o in outputs], pieces


def _rank_main(tmp: str) -> dict:
    out = {}
    ref = f"{tmp}/ref/ckpt"
    out["ref"] = run(tmp, "ref", 2, 2, checkpoint={"save_interval": 2, "keep_last": 0})
    out["resume"] = run(tmp, "resume", 2, 2, checkpoint={"load": f"{ref}/{step_name(4)}"})
    out["chain1"] = run(tmp, "chain1", 1, 1, stop_after=4, mbs=2, checkpoint={"load": f"{ref}/{step_name(2)}"})
    out["chain2"] = run(tmp, "chain2", 4, 1, checkpoint={"load": f"{tmp}/chain1/ckpt"})
    noisy = dict(model={"dropout": 0.1, "neftune_alpha": 5.0}, parallel={"sequence_parallel": True})
    out["noisy_ref"] = run(tmp, "noisy_ref", 2, 1, **noisy)
    resumable = dict(noisy, checkpoint={"load": "auto", "async_save": True, "save_interval": 1, "keep_last": 2})
    out["stop"] = run(tmp, "noisy", 2, 1, stop_after=3, **resumable)
    out["stop_resumed"] = run(tmp, "noisy", 2, 1, **resumable)
    # Interleaved pipeline (4 layers, 2 chunks per rank): exact resume, and reshard to TP1xDP4.
    vpp = dict(model={"num_layers": 4}, parallel={"virtual_pipeline_size": 2})
    out["vpp_ref"] = run(tmp, "vpp_ref", 2, 2, checkpoint={"save_interval": 3, "keep_last": 0}, **vpp)
    vpp_ckpt = f"{tmp}/vpp_ref/ckpt/{step_name(3)}"
    out["vpp_resume"] = run(tmp, "vpp_resume", 2, 2, checkpoint={"load": vpp_ckpt}, **vpp)
    out["vpp_reshard"] = run(tmp, "vpp_reshard", 1, 1, mbs=2, model={"num_layers": 4},   # replicated optimizer
                             parallel={"distributed_optimizer": False}, checkpoint={"load": vpp_ckpt})
    # Context parallelism: exact resume at CP2xDP2, resharding CP2 -> CP1 -> CP2 (with TP2).
    cp2 = dict(doc_multiple=4)
    out["cp_ref"] = run(tmp, "cp_ref", 1, 1, parallel={"cp": 2}, checkpoint={"save_interval": 2, "keep_last": 0},
                        **cp2)
    cp_ref = f"{tmp}/cp_ref/ckpt"
    out["cp_resume"] = run(tmp, "cp_resume", 1, 1, parallel={"cp": 2}, checkpoint={"load": f"{cp_ref}/{step_name(4)}"},
                           **cp2)
    out["cp_to1"] = run(tmp, "cp_to1", 1, 1, stop_after=4, checkpoint={"load": f"{cp_ref}/{step_name(2)}"}, **cp2)
    out["cp_to2"] = run(tmp, "cp_to2", 2, 1, parallel={"cp": 2, "cp_comm": "a2a"},
                        checkpoint={"load": f"{tmp}/cp_to1/ckpt"}, **cp2)
    # Expert parallelism: exact resume at EP2 (DP4), resharding EP2 -> EP1; an HF import at TP2xCP2xEP2.
    out["ep_ref"] = run(tmp, "ep_ref", 1, 1, model=MOE, parallel={"ep": 2},
                        checkpoint={"save_interval": 2, "keep_last": 0})
    ep_ref = f"{tmp}/ep_ref/ckpt"
    out["ep_resume"] = run(tmp, "ep_resume", 1, 1, model=MOE, parallel={"ep": 2},
                           checkpoint={"load": f"{ep_ref}/{step_name(4)}"})
    out["ep_to1"] = run(tmp, "ep_to1", 1, 1, model=MOE, checkpoint={"load": f"{ep_ref}/{step_name(2)}"})
    trainer, loader, ckpt = setup(tmp, "hf_rt_moe", 2, 1, model=MOE, parallel={"ep": 2, "cp": 2},
                                  checkpoint={"load": f"{tmp}/imported_moe"}, **cp2)
    ckpt.save(trainer, loader)
    ckpt.close()
    for tied in (False, True):   # load the converted HF model at TP2xPP2 and save it from there
        trainer, loader, ckpt = setup(tmp, f"hf_rt_{tied}", 2, 2, model={"tie_embeddings": tied},
                                      checkpoint={"load": f"{tmp}/imported_{tied}"})
        ckpt.save(trainer, loader)
        ckpt.close()
    # Each rank hashes every 4th file of the manifest (sorted): the 4th one is rank 3's alone.
    bad = Path(f"{tmp}/corrupt/{step_name(4)}")
    if torch.distributed.get_rank() == 0:
        shutil.copytree(f"{ref}/{step_name(4)}", bad)
        flip_byte(bad, bad / sorted(json.loads((bad / MANIFEST).read_text())["files"])[3])
    torch.distributed.barrier()
    try:
        setup(tmp, "corrupt", 2, 2, checkpoint={"load": str(bad)})
        refused = "loaded"
    except CheckpointError as err:
        refused = str(err)
    out["corrupt"] = ([refused], [])   # (the message as this rank's "losses", no weights)
    return out


def meta_layout(step_dir: Path) -> tuple[int, int, int]:
    """(tp, cp, dp) a checkpoint was saved at."""
    layout = read_meta(step_dir)["layout"]
    return layout["tp"], layout["cp"], layout["dp"]


def global_weights(results: list[dict], name: str) -> dict[str, torch.Tensor]:
    return assemble_canonical(p for rank in results for p in rank[name][1])


def test_resume_reshard_and_hf_round_trip(tmp_path):
    tmp = str(tmp_path)
    make_dataset(tmp_path / "data", n_docs=80)
    originals = {}
    for tied in (False, True):
        model = hf_model(dict(FIELDS, tie_embeddings=tied), seed=11)
        model.save_pretrained(tmp_path / f"hf_{tied}")
        originals[tied] = {k: v.clone() for k, v in model.state_dict().items()}
        hf_to_megasft(tmp_path / f"hf_{tied}", tmp_path / f"imported_{tied}", tp=2, pp=2)
    hf_model(MOE, seed=12).save_pretrained(tmp_path / "hf_moe")
    hf_to_megasft(tmp_path / "hf_moe", tmp_path / "imported_moe", tp=2)

    results = run_ranks(_rank_main, 4, tmp, timeout=900)
    losses = {name: results[0][name][0] for name in results[0]}
    for rank in results[1:]:   # every rank reports the same global losses
        assert {name: rank[name][0] for name in rank} == losses

    ref, ref_w = losses["ref"], global_weights(results, "ref")
    assert len(ref) == STEPS and len(set(ref)) == STEPS
    # Exact resume at TP2xPP2: steps 5-6 and final weights bit-identical.
    assert losses["resume"] == ref[4:]
    for name, tensor in global_weights(results, "resume").items():
        assert torch.equal(tensor, ref_w[name]), name
    # Resharding TP2xPP2 -> TP1xDP4 -> TP4: the continuation matches within fp32 tolerance.
    assert_close(torch.tensor(losses["chain1"] + losses["chain2"]), torch.tensor(ref[2:]), rtol=1e-5, atol=1e-6)
    for name, tensor in global_weights(results, "chain2").items():
        assert_close(tensor, ref_w[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    vpp_ref = losses["vpp_ref"]
    assert losses["vpp_resume"] == vpp_ref[3:]
    assert_close(torch.tensor(losses["vpp_reshard"]), torch.tensor(vpp_ref[3:]), rtol=1e-5, atol=1e-6)
    # Stop request + async save + auto resume, with dropout/NEFTune RNG: bit-identical.
    assert losses["stop"] + losses["stop_resumed"] == losses["noisy_ref"]
    stopped_w, noisy_w = global_weights(results, "stop_resumed"), global_weights(results, "noisy_ref")
    assert all(torch.equal(stopped_w[k], noisy_w[k]) for k in noisy_w)
    assert losses["noisy_ref"] != ref   # the noise really changed the run
    # keep_last=2 pruned older saves; latest names the end of the run.
    ckdir = tmp_path / "noisy" / "ckpt"
    assert sorted(p.name for p in ckdir.iterdir()) == [LATEST, step_name(5), step_name(6)]
    assert (ckdir / LATEST).read_text().strip() == step_name(6)
    meta = read_meta(ckdir / step_name(6))   # counted across the resume
    assert meta["step"] == 6 and meta["consumed_tokens"] == 6 * SEQ * ROWS
    uninterrupted = read_meta(tmp_path / "noisy_ref" / "ckpt" / step_name(6))
    assert meta["loader"] == uninterrupted["loader"] and meta["layout"]["dp"] == 2
    # CP: exact resume; resharding CP2xDP2 -> CP1xDP4 -> TP2xCP2xDP1 within fp32 tolerance.
    cp_ref, cp_w = losses["cp_ref"], global_weights(results, "cp_ref")
    assert losses["cp_resume"] == cp_ref[4:]
    for name, tensor in global_weights(results, "cp_resume").items():
        assert torch.equal(tensor, cp_w[name]), name
    assert meta_layout(tmp_path / "cp_ref" / "ckpt" / step_name(2)) == (1, 2, 2)
    assert meta_layout(tmp_path / "cp_to1" / "ckpt" / step_name(4)) == (1, 1, 4)
    assert_close(torch.tensor(losses["cp_to1"] + losses["cp_to2"]), torch.tensor(cp_ref[2:]), rtol=1e-5, atol=1e-6)
    for name, tensor in global_weights(results, "cp_to2").items():
        assert_close(tensor, cp_w[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    # EP: exact resume; resharding EP2 -> EP1 within fp32 tolerance.
    ep_ref, ep_w = losses["ep_ref"], global_weights(results, "ep_ref")
    assert losses["ep_resume"] == ep_ref[4:]
    for name, tensor in global_weights(results, "ep_resume").items():
        assert torch.equal(tensor, ep_w[name]), name
    assert read_meta(tmp_path / "ep_ref" / "ckpt" / step_name(2))["layout"]["ep"] == 2
    assert_close(torch.tensor(losses["ep_to1"]), torch.tensor(ep_ref[2:]), rtol=1e-5, atol=1e-6)
    for name, tensor in global_weights(results, "ep_to1").items():
        assert_close(tensor, ep_w[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    # HF -> megasft (loaded and re-saved at TP2xPP2, MoE at TP2xCP2xEP2) -> HF: bit-identical tensors.
    moe_out = megasft_to_hf(tmp_path / "hf_rt_moe" / "ckpt", tmp_path / "export_moe", dtype="fp32")
    # Every expert of every layer as stored (config.json is megasft's own: the run saved a checkpoint).
    assert_export_bit_identical(tmp_path / "hf_moe", moe_out, same_config=False)
    for tied in (False, True):
        out = megasft_to_hf(tmp_path / f"hf_rt_{tied}" / "ckpt", tmp_path / f"export_{tied}", dtype="fp32",
                            max_shard_bytes=200_000)
        assert (out / "model.safetensors.index.json").exists()
        get = hf_tensor_reader(out)
        for name, tensor in originals[tied].items():
            if tied and name == "lm_head.weight":
                continue
            assert torch.equal(get(name, None), tensor), name
        assert Path(out / "config.json").exists()
    # The flipped byte was in a file only rank 3 hashed; every rank refused the load, naming it.
    bad = tmp_path / "corrupt" / step_name(4)
    file = bad / sorted(json.loads((bad / MANIFEST).read_text())["files"])[3]
    assert losses["corrupt"][0].startswith(f"{file} is corrupt: its sha256 is ")
