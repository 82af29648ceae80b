"""128K-token rows through the data path (issue 18): ``megasft preprocess --seq-len 131072`` keeps
~100K-token conversations whole, packing fills their rows with shorter ones, and the loader hands
out packed micro-batches whose tokens, labels, positions and boundaries are the documents' own —
with host memory linear in seq_len: no [s, s] structure anywhere between the JSONL and the batch.

The same data scaled by 1/4 runs at seq_len 32768, so linearity is measured, not assumed: the
traced peak (tracemalloc sees every Python and numpy allocation) may grow about 4x from 32K to
128K rows, where anything quadratic in the row would grow 16x.
"""
from __future__ import annotations

import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from megasft.commands.preprocess import main as preprocess_main
from megasft.data.batch import IGNORE_INDEX
from megasft.data.indexed import IndexedDataset
from megasft.data.loader import PackedLoader
from megasft.data.templates import ChatEncoder, get_template
from megasft.data.tokenizer import load_tokenizer
from tests.data_fixtures import hf_tokenizer_dir, write_jsonl

LONG = 131072
WORDS = ["hello", "world", "the", "answer", "is", "42", "café", "naïve", "x=1;", "end.", "tabs\t", "ünïcode"]
# Words per conversation at seq_len 131072 (the fixture's BPE makes ~1.5 tokens of a word): two of
# ~97K tokens, four of 13-15K that best-fit packing puts two by two into the long ones' rows. At
# seq_len 32768 all are 1/4 as long.
CONVERSATION_WORDS = (66_000, 64_000, 10_000, 9_500, 9_000, 8_500)


def _conversation(rng: random.Random, words: int) -> dict:
    text = lambda k: " ".join(rng.choices(WORDS, k=k))   # noqa: E731
    return {"messages": [{"role": "system", "content": text(50)}, {"role": "user", "content": text(words // 2)},
                         {"role": "assistant", "content": text(words // 2 - 50)}]}


def _traced_peak(fn):
    """(fn(), peak bytes of Python/numpy allocations while it ran)."""
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _load_one_step(path: Path, seq_len: int):
    loader = PackedLoader(str(path), seq_len=seq_len, global_batch_tokens=2 * seq_len, micro_batch_size=1,
                          shuffle=False)
    return loader, loader.next_global_batch()


@pytest.fixture(scope="module")
def long_data(tmp_path_factory) -> dict:
    """{seq_len: (dataset dir, conversations, preprocess peak, (loader, batch), loader peak)}."""
    out = {}
    for seq_len in (LONG // 4, LONG):
        root = tmp_path_factory.mktemp(f"long{seq_len}")
        rng = random.Random(seq_len)
        convs = [_conversation(rng, n * seq_len // LONG) for n in CONVERSATION_WORDS]
        jsonl = write_jsonl(root / "long.jsonl", convs)
        argv = ["--input", str(jsonl), "--output", str(root / "ds"), "--tokenizer", str(hf_tokenizer_dir()),
                "--seq-len", str(seq_len), "--workers", "1", "--no-cache", "--no-progress"]
        rc, pre_peak = _traced_peak(lambda: preprocess_main(argv))
        assert rc == 0
        loaded, load_peak = _traced_peak(lambda: _load_one_step(root / "ds", seq_len))
        out[seq_len] = (root / "ds", convs, pre_peak, loaded, load_peak)
    return out


def test_preprocess_keeps_100k_token_conversations_whole(long_data):
    path, convs, *_ = long_data[LONG]
    ds = IndexedDataset(path)
    assert len(ds) == len(CONVERSATION_WORDS) and ds.meta["seq_len"] == LONG
    assert ds.meta["summary"]["dropped"] == {} and ds.meta["summary"]["truncated"] == 0
    assert all(90_000 < n <= LONG for n in ds.lengths[:2]) and all(n < LONG - 90_000 for n in ds.lengths[2:])
    # Tokens and loss mask are the chat encoder's for the whole conversation, untruncated.
    tok = load_tokenizer(str(hf_tokenizer_dir()), "llama3")
    ids, mask = ChatEncoder(tok, get_template("llama3"), "completion_eot").encode(convs[0]["messages"])
    np.testing.assert_array_equal(ds[0][0], ids)
    np.testing.assert_array_equal(ds[0][1], mask)


def test_loader_packs_long_documents_into_128k_rows(long_data):
    path, _, _, (loader, batch), _ = long_data[LONG]
    ds = IndexedDataset(path)
    rows = loader.epoch_rows(0)
    assert len(rows) == 2 and sorted(d for row in rows for d in row) == list(range(len(ds)))
    assert all(any(ds.lengths[d] > 90_000 for d in row) and len(row) > 1 for row in rows)   # filled with short ones
    assert len(batch) == 2
    for row, mb in zip(rows, batch):
        assert mb.input_ids.shape == (1, LONG) and mb.labels.shape == (1, LONG)
        lengths = [int(ds.lengths[d]) for d in row]
        pad = LONG - sum(lengths)
        assert mb.segment_lengths.tolist() == lengths + ([pad] if pad else [])
        assert mb.max_seqlen == max(lengths + [pad])
        start = 0
        for d, n in zip(row, lengths):
            ids, mask = ds[d]
            np.testing.assert_array_equal(mb.input_ids[0, start:start + n].numpy(), ids)
            want = np.where(mask.astype(bool), ids.astype(np.int64), IGNORE_INDEX)
            want[0] = IGNORE_INDEX
            np.testing.assert_array_equal(mb.labels[0, start:start + n].numpy(), want)
            np.testing.assert_array_equal(mb.position_ids[0, start:start + n].numpy(), np.arange(n))
            start += n
        assert (mb.labels[0, start:] == IGNORE_INDEX).all()


def test_host_memory_is_linear_in_seq_len(long_data):
    """Loader: three [b, s] int64 tensors (24 B per slot) and the packer's per-capacity tables (a
    segment tree of 2 * 2^ceil(log2(s+1)) counts and s+1 row lists: ~100 B per slot) are the only
    things sized by s; 256 B per slot bounds them (32 MiB at 128K, where one [s, s] bool mask alone
    would be 16 GiB). Preprocessing holds a conversation's text, ids and mask: linear too."""
    short, long = long_data[LONG // 4], long_data[LONG]
    pre_ratio, load_ratio = long[2] / short[2], long[4] / short[4]
    assert load_ratio < 6 and pre_ratio < 6, (pre_ratio, load_ratio)   # linear: ~4; quadratic: ~16
    assert long[4] < 256 * LONG, long[4]
