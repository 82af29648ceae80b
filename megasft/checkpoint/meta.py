"""The ``meta`` record of a checkpoint and the per-rank RNG states saved beside it.

    meta = {"format": 2, "step": the step it was saved after, "consumed_tokens": int,
            "trainer": Trainer.state_dict(), "optimizer": DistributedOptimizer.state_dict()
            without its shard_state (that is stored per canonical tensor, see pieces),
            "loader": PackedLoader.state_dict() | None, "model": model_shape(),
            "layout": {...}, "config": Config.to_dict()}
"""
from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch

from megasft.model.families import DEEPSEEK_MOE_OFF

FORMAT_VERSION = 2
# ModelConfig fields that fix the tensors' shapes and meaning; a checkpoint must agree on all.
# The rope fields change the math without changing a shape (Phi-3 longrope factors, partial rotation).
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_attention_heads",
                "kv_heads", "head_size", "tie_embeddings", "qkv_bias", "family", "qk_norm", "sliding_window",
                "layer_types", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
                "rope_local_theta", "rope_scaling", "partial_rotary_factor", "original_max_position_embeddings",
                "moe_router", "moe_n_group", "moe_topk_group", "moe_routed_scaling_factor", "moe_shared_experts")
# What a checkpoint saved before a field joined SHAPE_FIELDS had (the ModelConfig default then);
# a field neither saved nor listed here is not compared.
_BEFORE = {"family": "llama", "qk_norm": False,
           **{k: off for k, off in DEEPSEEK_MOE_OFF.items() if k in SHAPE_FIELDS}}


def model_shape(model_cfg) -> dict:
    return {f: getattr(model_cfg, f) for f in SHAPE_FIELDS}


def model_differences(saved: dict, model_cfg) -> list[str]:
    """'field: checkpoint X, config Y' for every shape-defining field that differs (a field the
    checkpoint's record lacks, added after it was saved, compares as its default then when
    _BEFORE knows it, else not at all)."""
    saved = {f: saved.get(f, _BEFORE.get(f)) for f in SHAPE_FIELDS if f in saved or f in _BEFORE}
    return [f"{f}: checkpoint {saved[f]!r}, config {getattr(model_cfg, f)!r}"
            for f in SHAPE_FIELDS if f in saved and saved[f] != getattr(model_cfg, f)]


def upgrade(meta: dict) -> dict:
    """A format-1 record (trainer fields at the top, the optimizer's step as "step_count") in the
    current shape, so checkpoints saved before format 2 still resume."""
    if meta.get("format", 1) >= 2:
        return meta
    meta = dict(meta, format=FORMAT_VERSION, trainer={"step": meta["step"], "best_eval": meta.get("best_eval")})
    if meta.get("optimizer") is not None:
        counters = {k: v for k, v in meta["optimizer"].items() if k != "step_count"}
        meta["optimizer"] = dict(counters, step=meta["optimizer"]["step_count"])
    return meta


# ----------------------------------------------------------------------------- RNG
def rng_state(chunks) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
             "neftune": [c.neftune_generator.get_state() if hasattr(c, "neftune_generator") else None
                         for c in chunks]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(chunks, state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    for chunk, gen in zip(chunks, state["neftune"]):
        if gen is not None and hasattr(chunk, "neftune_generator"):
            chunk.neftune_generator.set_state(gen)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# The config fields that shape the LR schedule (megasft.optim.lr_schedule): a resume continues it.
SCHEDULE_FIELDS = (("train", "steps"), ("optim", "lr"), ("optim", "min_lr_ratio"), ("optim", "warmup_ratio"),
                   ("optim", "warmup_steps"))


def schedule_change(saved: dict, cfg) -> Optional[str]:
    """How the LR schedule of this run differs from the one a checkpoint was trained with (its
    config dict), or None when they are the same."""
    now = cfg.to_dict()
    diffs = [f"{section}.{key}={saved[section][key]!r} -> {now[section][key]!r}"
             for section, key in SCHEDULE_FIELDS
             if section in saved and key in saved[section] and saved[section][key] != now[section][key]]
    return "; ".join(diffs) or None
