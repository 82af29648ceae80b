"""Build this rank's model chunks from a Config: partition, construct, initialise, cast."""
from __future__ import annotations

import zlib
from typing import Optional

import torch
from torch import nn

from megasft.config import Config
from megasft.hf.names import load_canonical
from megasft.layout import Layout
from megasft.model.families import family_of
from megasft.model.fp8 import check_fp8_available, use_fp8_gemms
from megasft.model.llama import LlamaStage
from megasft.parallel_state import ParallelState


def build_model(cfg: Config, ps: ParallelState, layout: Optional[Layout] = None) -> list[LlamaStage]:
    """The model chunks this rank owns (one, or virtual_pipeline_size when interleaving), with
    weights identical at every layout: random init from canonical tensors, or the HF checkpoint
    named by model.init_from_hf. With train.fp8 the decoder layers' GEMMs run in FP8
    (megasft.model.fp8); parameters are the same. `layout`: the run's resolved Layout (resolved
    here from cfg and ps when not given)."""
    m = cfg.model
    layout = layout or Layout.resolve(cfg, ps.world_size)
    check_fp8_available(cfg.train.fp8, ps.device)   # before any weights are built or loaded
    chunks = []
    for i, layer_ids in enumerate(layout.rank_chunks(ps.pp_rank)):
        chunks.append(LlamaStage(m, ps, layer_ids, pre_process=layout.holds_embedding(ps.pp_rank, i),
                                 post_process=layout.holds_head(ps.pp_rank, i),
                                 sequence_parallel=layout.sequence_parallel, neftune_seed=cfg.train.seed,
                                 cp_comm=layout.cp_comm))
    for chunk in chunks:
        if m.init_from_hf:
            from megasft.hf.io import load_hf_into
            load_hf_into(chunk, m.init_from_hf)
        else:
            init_weights(chunk, cfg.train.seed, m.init_std)
        chunk.to(device=ps.device, dtype=cfg.train.dtype)
        if cfg.train.fp8 != "off":
            use_fp8_gemms(chunk)
    return chunks


def init_weights(module: nn.Module, seed: int, std: float) -> None:
    """Layout-independent random init: each canonical (HF) tensor is drawn in full from a generator
    seeded by its name, then sliced to this rank's shard. Norm weights 1 (0 for Gemma's (1 + w)
    norms: the identity either way), biases 0."""
    gemma = family_of(module.cfg.family).gemma if hasattr(module, "cfg") else False

    def draw(name: str, shape) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return torch.zeros(shape) if gemma else torch.ones(shape)
        if name.endswith("bias"):   # q/k/v biases, DeepSeek's e_score_correction_bias
            return torch.zeros(shape)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        return torch.randn(shape, generator=generator) * std

    load_canonical(module, draw)
