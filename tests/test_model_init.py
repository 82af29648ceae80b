"""Random init is layout-independent: every canonical tensor is drawn once from a seed of its own
name, so the stages of a pipeline hold slices of the same model. In particular a tied LM head on
the last stage is a copy of the first stage's embedding, not a second random matrix.

Single process: each stage is built with the ParallelState of its pipeline rank (no groups needed
for init)."""
from __future__ import annotations

import torch

from megasft.config import ModelConfig
from megasft.model.build import init_weights
from megasft.model.llama import LlamaStage
from megasft.parallel_state import ParallelState
from megasft.tensor_parallel.spec import spec_of
from tests.oracle import tiny_fields


def _stage(cfg: ModelConfig, pp_rank: int, pp: int = 2) -> LlamaStage:
    ps = ParallelState(rank=pp_rank, world_size=pp, tp=1, pp=pp, dp=1, tp_rank=0, pp_rank=pp_rank,
                       dp_rank=0, pp_ranks=list(range(pp)))
    layers = [[0], [1]][pp_rank]
    stage = LlamaStage(cfg, ps, layers, pre_process=pp_rank == 0, post_process=pp_rank == pp - 1)
    init_weights(stage, seed=7, std=0.02)
    return stage


def test_tied_head_on_the_last_stage_is_initialised_as_the_embedding():
    cfg = ModelConfig(**tiny_fields(num_layers=2, tie_embeddings=True))
    first, last = _stage(cfg, 0), _stage(cfg, 1)
    assert torch.equal(last.lm_head.weight, first.embedding.weight)
    assert spec_of(last.lm_head.weight).tied and spec_of(first.embedding.weight).pp_copies == 2
    whole = LlamaStage(cfg, ParallelState.single(), [0, 1], True, True)   # pp=1: one matrix serves both
    init_weights(whole, seed=7, std=0.02)
    assert torch.equal(whole.embedding.weight, first.embedding.weight) and not hasattr(whole, "lm_head")
    assert not spec_of(whole.embedding.weight).tied   # nothing to keep in sync


def test_untied_head_is_its_own_tensor():
    cfg = ModelConfig(**tiny_fields(num_layers=2, tie_embeddings=False))
    first, last = _stage(cfg, 0), _stage(cfg, 1)
    assert not torch.equal(last.lm_head.weight, first.embedding.weight)
    assert not spec_of(last.lm_head.weight).tied
