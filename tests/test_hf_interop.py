"""Hugging Face import/export against transformers (single process, CPU).

A random HF Llama (GQA, llama3 rope scaling; tied and untied embeddings) is imported with
hf-to-megasft, trained two steps in megasft (so the exported weights are megasft's, not the
originals), saved, exported with megasft-to-hf, and loaded with
``transformers.AutoModelForCausalLM.from_pretrained``: its logits must match megasft's own.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megasft.checkpoint.convert import hf_to_megasft, megasft_to_hf
from megasft.checkpoint.sharded import Checkpointer
from megasft.config import Config
from megasft.data.batch import MicroBatch
from megasft.hf.io import load_hf_into
from megasft.model.llama import LlamaStage
from megasft.parallel_state import ParallelState
from megasft.training.loop import Trainer
from tests.oracle import hf_model, packed_batch, select_rows, tiny_fields

ROOT = Path(__file__).resolve().parents[1]
SEQ = 16


def megasft_config(fields: dict, tmp: Path, load: str) -> Config:
    return Config.from_dict({
        "model": fields, "data": {"seq_len": SEQ, "global_batch_tokens": 4 * SEQ, "micro_batch_size": 2},
        "optim": {"lr": 1e-2, "warmup_steps": 1}, "train": {"steps": 2, "precision": "fp32", "run_dir": str(tmp)},
        "checkpoint": {"load": load, "dir": str(tmp / "ckpt")}}).validate()


def logits_of(chunk: LlamaStage, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """megasft logits [b, s, V] for one document per row."""
    b, s = ids.shape
    batch = MicroBatch(input_ids=ids, position_ids=torch.arange(s).repeat(b, 1),
                       cu_seqlens=torch.arange(0, b * s + 1, s, dtype=torch.int32), max_seqlen=s)
    chunk.eval()
    with torch.no_grad():
        return chunk(batch)[:, :, :vocab].transpose(0, 1)             # [s, b, V_pad] -> [b, s, V]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_export_gives_transformers_the_same_logits(tmp_path, tied):
    from transformers import AutoModelForCausalLM

    fields = tiny_fields(tie_embeddings=tied)
    hf_model(fields, seed=4).save_pretrained(tmp_path / "hf")
    hf_to_megasft(tmp_path / "hf", tmp_path / "imported")
    cfg = megasft_config(fields, tmp_path, str(tmp_path / "imported"))
    ps = ParallelState.single()
    trainer = Trainer(cfg, ps, log=False)
    ckpt = Checkpointer(cfg, ps)
    ckpt.resume(trainer, None)
    batch = packed_batch([[5, 7, 4], [9, 3], [16], [2, 2, 2, 2]], SEQ, fields["vocab_size"], seed=1)
    for _ in range(2):
        trainer.train_step([select_rows(batch, [0, 1]), select_rows(batch, [2, 3])])
    ckpt.save(trainer, None)

    out = megasft_to_hf(tmp_path / "ckpt", tmp_path / "export", dtype="fp32")
    hf = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32, attn_implementation="eager")
    assert hf.config.tie_word_embeddings == tied
    ids = torch.randint(0, fields["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
    got = logits_of(trainer.chunks[0], ids, fields["vocab_size"])
    assert (got - expected).abs().max().item() < 1e-4
    # The export really holds the trained weights, not the imported ones.
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32)
    assert not torch.equal(original.model.norm.weight, hf.model.norm.weight)


def test_cli_round_trip_writes_generation_config_and_tokenizer(tmp_path):
    """tools/convert_checkpoint.py both ways as subprocesses; bf16 export; eos includes <|eot_id|>."""
    from megasft.data.tokenizer import load_tokenizer
    from tests.data_fixtures import train_bpe_tokenizer

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok_dir = train_bpe_tokenizer(["hello world, a tiny corpus"] * 20, specials, 300, tmp_path / "tok",
                                  {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"})
    fields = tiny_fields(vocab_size=300)
    model = hf_model(fields, seed=2)
    model.save_pretrained(tmp_path / "hf", max_shard_size="200KB")   # sharded input with an index
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    tool = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py")]
    subprocess.run(tool + ["hf-to-megasft", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ck"),
                           "--tp", "2", "--pp", "2"], check=True, cwd=tmp_path)
    subprocess.run(tool + ["megasft-to-hf", "--ckpt", str(tmp_path / "ck"), "--out", str(tmp_path / "out"),
                           "--dtype", "bf16", "--tokenizer", str(tok_dir), "--max-shard-size-mb", "0.1"],
                   check=True, cwd=tmp_path)
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    tok = load_tokenizer(tok_dir, "llama3")
    generation = json.loads((out / "generation_config.json").read_text())
    assert tok.specials.eot_id in generation["eos_token_id"] and tok.specials.eos_id in generation["eos_token_id"]
    assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out)
    assert hf.dtype == torch.bfloat16
    for name, tensor in model.state_dict().items():
        assert torch.equal(hf.state_dict()[name], tensor.to(torch.bfloat16)), name


def test_init_from_hf_sliced_reader_matches_full_tensors(tmp_path):
    """load_hf_into reads through safetensors get_slice; at tp=1 it must give the full tensors (TP
    slices are checked against transformers by test_training_equivalence, which uses init_from_hf)."""
    fields = tiny_fields()
    model = hf_model(fields, seed=9)
    model.save_pretrained(tmp_path)
    cfg = Config.from_dict({"model": fields}).model
    ps = ParallelState.single()
    stage = LlamaStage(cfg, ps, [0, 1], pre_process=True, post_process=True)
    load_hf_into(stage, tmp_path)
    state = model.state_dict()
    assert torch.equal(stage.layers["1"].mlp.down.weight, state["model.layers.1.mlp.down_proj.weight"])
    kv = torch.cat([state["model.layers.0.self_attn.k_proj.weight"], state["model.layers.0.self_attn.v_proj.weight"]])
    assert torch.equal(stage.layers["0"].attention.kv_proj.weight, kv)
    embed = stage.embedding.weight
    assert torch.equal(embed[:fields["vocab_size"]], state["model.embed_tokens.weight"])
    assert not embed[fields["vocab_size"]:].any()   # vocab padding rows are zero
