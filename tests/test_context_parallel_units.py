"""Context parallelism, single process: the loader's per-document padding to 2*cp, the split of a
micro-batch (labels shifted on the full row), and the per-token quantities the model reads from
whole documents (NEFTune noise, Phi-3 longrope) equal to the unsplit row's at every CP rank."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megasft.config import ModelConfig
from megasft.context_parallel.sharding import split_micro_batch
from megasft.data.batch import IGNORE_INDEX, shift_labels
from megasft.data.indexed import DatasetError
from megasft.data.loader import PackedLoader
from megasft.data.packing import build_micro_batch
from megasft.model.build import init_weights
from megasft.model.llama import LlamaStage
from megasft.model.rope import Rope
from megasft.parallel_state import ParallelState
from tests.oracle import PHI3_LONGROPE, family_fields, model_batch, packed_batch, tiny_fields
from tests.test_data_loader import SEQ, docs_in, make_dataset


def test_documents_are_padded_to_the_multiple_untrained_with_positions_running_on():
    docs = [(np.arange(1, 6), np.ones(5, np.uint8)), (np.arange(10, 13), np.ones(3, np.uint8))]
    mb = build_micro_batch([docs], seq_len=16, pad_id=0, doc_multiple=4)
    assert mb.cu_seqlens.tolist() == [0, 8, 12, 16]            # 5 -> 8, 3 -> 4, tail 4
    assert mb.input_ids[0].tolist() == [1, 2, 3, 4, 5, 0, 0, 0, 10, 11, 12, 0, 0, 0, 0, 0]
    assert mb.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 0, 1, 2, 3]
    assert (mb.labels[0, 5:8] == IGNORE_INDEX).all() and (mb.labels[0, 11:] == IGNORE_INDEX).all()
    # The real tokens' labels and the count of trained targets are the unpadded batch's.
    plain = build_micro_batch([docs], seq_len=16, pad_id=0)
    assert mb.trained_tokens == plain.trained_tokens
    assert mb.labels[0, :5].tolist() == plain.labels[0, :5].tolist()


def test_loader_packs_padded_lengths_and_refuses_another_multiple_on_resume(tmp_path):
    ds = make_dataset(tmp_path / "d", n_docs=40)
    loader = PackedLoader(ds, SEQ, 4 * SEQ, 2, seed=1, doc_multiple=8)
    seen = []
    for _ in range(3):
        for mb in loader.next_global_batch():
            lengths = mb.segment_lengths
            assert (lengths % 8 == 0).all()
            seen += docs_in(mb)
    assert len(seen) == len(set(seen)) > 0
    other = PackedLoader(ds, SEQ, 4 * SEQ, 2, seed=1)
    with pytest.raises(DatasetError, match="doc_multiple=8 but this loader has doc_multiple=1.*parallel.cp"):
        other.load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match="padded to 40, a multiple of 2\\*cp"):
        PackedLoader(ds, SEQ, 4 * SEQ, 2, seed=1, doc_multiple=20)


@pytest.mark.parametrize("cp", [2, 4])
def test_split_keeps_every_token_and_shifts_labels_on_the_full_row(cp):
    batch = model_batch(packed_batch([[16, 8], [8, 24], [32]], 32, 1003, seed=3))
    full_targets = shift_labels(batch.labels).reshape(-1)
    seen = torch.zeros(batch.input_ids.numel(), dtype=torch.long)
    trained = 0
    for rank in range(cp):
        part = split_micro_batch(batch, cp, rank)
        assert part.input_ids.shape == (3, 32 // cp) and part.labels_shifted
        idx = part.token_index
        seen[idx] += 1
        assert torch.equal(part.input_ids.reshape(-1), batch.input_ids.reshape(-1)[idx])
        assert torch.equal(part.position_ids.reshape(-1), batch.position_ids.reshape(-1)[idx])
        assert torch.equal(part.targets().reshape(-1), full_targets[idx])   # a chunk's last target is the next chunk's token
        trained += part.trained_tokens
    assert (seen == 1).all() and trained == batch.trained_tokens


def test_neftune_noise_at_each_cp_rank_is_the_whole_rows_noise():
    fields = tiny_fields(neftune_alpha=5.0)
    stage = LlamaStage(ModelConfig(**fields), ParallelState.single(), [0, 1], True, True).train()
    init_weights(stage, seed=0, std=0.02)   # a built stage is uninitialised memory (NaNs would fail equal)
    batch = model_batch(packed_batch([[16, 8], [8, 24]], 32, fields["vocab_size"], seed=4))
    state = stage.neftune_generator.get_state()
    full = stage._embed(batch)                                                   # [s, b, h]
    assert torch.isfinite(full).all()
    for rank in range(2):
        stage.neftune_generator.set_state(state)
        part = split_micro_batch(batch, 2, rank)
        got = stage._embed(part)                                                 # [s/2, b, h]
        assert torch.equal(got, part.local(full.transpose(0, 1)).transpose(0, 1))


def test_longrope_factor_follows_the_whole_document_not_the_chunk():
    # Phi-3 longrope switches factor at documents longer than 8 tokens: at cp 2 a 16-token
    # document's chunks hold 4 + 4 tokens, and must still take the long factor.
    cfg = ModelConfig(**family_fields("phi3", **PHI3_LONGROPE))
    rope = Rope(cfg)
    batch = model_batch(packed_batch([[16, 8], [8, 8]], 32, cfg.vocab_size, seed=5))
    cos, sin = rope.cos_sin(batch, torch.float32)                                # [s, b, 1, r]
    for rank in range(2):
        part = split_micro_batch(batch, 2, rank)
        got = rope.cos_sin(part, torch.float32)
        for full, mine in zip((cos, sin), got):
            assert torch.equal(mine, part.local(full.transpose(0, 1)).transpose(0, 1))
