"""Datasets that survive what users do to them: atomic (re)writes that never disturb a reader, files
verified against meta.json on open, token ids checked against the model's vocabulary, empty outputs
refused, and inputs as users have them (gzip / zstd / BOM / a directory), with --skip-bad bounded."""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zstandard

from megasft.config import DataConfig
from megasft.data.formats import DataError
from megasft.data.indexed import DatasetError, IndexedDataset, IndexedDatasetBuilder
from megasft.data.loader import build_loaders
from megasft.data.preprocess import preprocess
from megasft.data.tokenizer import load_tokenizer
from tests.data_fixtures import conversations, hf_tokenizer_dir, write_jsonl
from tests.test_data_preprocess import GOOD, options
from tools import preprocess_data

FILES = ("tokens.bin", "loss_mask.bin", "doc_offsets.idx", "meta.json")
RERUN = "re-run megasft preprocess to rewrite the dataset"


def cli(inputs, out, *extra) -> int:
    inputs = [str(p) for p in (inputs if isinstance(inputs, list) else [inputs])]
    return preprocess_data.main(["--input", *inputs, "--output", str(out), "--tokenizer", str(hf_tokenizer_dir()),
                                 "--workers", "1", "--no-progress", *map(str, extra)])


def snapshot(d: Path) -> dict:
    return {name: (d / name).read_bytes() for name in FILES}


def chats(n: int, seed: int) -> list[dict]:
    """n varied conversations, each with a non-empty answer (so all n are kept)."""
    return [{"messages": c + [{"role": "user", "content": "and?"}, {"role": "assistant", "content": f"done {i}"}]}
            for i, c in enumerate(conversations(n, seed=seed))]


# ------------------------------------------------------------------ 1. atomic writes, verified opens
def test_failed_or_refused_rerun_leaves_the_dataset_byte_identical(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", chats(20, seed=1))
    out = tmp_path / "ds" / "out"
    assert cli(src, out) == 0
    before = snapshot(out)
    capsys.readouterr()

    assert cli(src, out) == 1   # no --overwrite: refused before any work
    assert capsys.readouterr().err == (f"error: output {out} already holds a dataset; pass --overwrite to replace it "
                                       "(jobs reading it keep the old files) or choose another --output\n")
    # A run that fails midway (a bad record on line 7, after three chunks were written) with --overwrite.
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD] * 6 + ['{"messages": ['] + [GOOD] * 3)
    with pytest.raises(DataError, match=f"^{bad}:7: malformed json"):
        preprocess(options(tmp_path / "ds", [bad], overwrite=True, chunk_lines=2))
    assert snapshot(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]   # no temporary directory left behind
    assert IndexedDataset(out).meta["num_docs"] == len(chats(20, seed=1))


def test_overwrite_replaces_the_dataset_under_a_reader_without_disturbing_it(tmp_path):
    out = tmp_path / "out"
    assert cli(write_jsonl(tmp_path / "a.jsonl", chats(40, seed=2)), out) == 0
    reader = IndexedDataset(out)   # a running job: tokens, mask and offsets memory-mapped
    old_tokens, old_mask, old_doc = np.array(reader.tokens), np.array(reader.mask), reader[3][0].tolist()
    assert cli(write_jsonl(tmp_path / "b.jsonl", chats(5, seed=3)), out, "--overwrite") == 0
    # The rewrite is much shorter: truncating the old files in place would SIGBUS these reads.
    assert np.array_equal(reader.tokens, old_tokens) and np.array_equal(reader.mask, old_mask)
    assert reader[3][0].tolist() == old_doc
    fresh = IndexedDataset(out)
    assert len(fresh) == len(chats(5, seed=3)) and len(fresh.tokens) < len(old_tokens)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl", "out"]


def test_open_names_the_file_that_disagrees_with_meta(tmp_path):
    good = tmp_path / "good"
    assert cli(write_jsonl(tmp_path / "in.jsonl", chats(30, seed=4)), good) == 0
    other = tmp_path / "other"
    assert cli(write_jsonl(tmp_path / "in2.jsonl", chats(10, seed=5)), other) == 0
    meta = json.loads((good / "meta.json").read_text())
    n_docs, n_tok = meta["num_docs"], meta["num_tokens"]
    recorded = f"meta.json records {n_docs} documents, {n_tok} tokens"

    def broken(name: str, damage) -> Path:
        d = tmp_path / name
        shutil.copytree(good, d)
        damage(d)
        return d

    truncated = broken("truncated", lambda d: (d / "tokens.bin").write_bytes((d / "tokens.bin").read_bytes()[:-2]))
    with pytest.raises(DatasetError) as err:
        IndexedDataset(truncated, verify="sizes")
    assert str(err.value) == (f"{truncated}/tokens.bin: {2 * n_tok - 2} bytes but {recorded} ({2 * n_tok} bytes); "
                              f"the file is truncated or from another run: {RERUN}")

    mixed = broken("mixed", lambda d: shutil.copy(other / "doc_offsets.idx", d / "doc_offsets.idx"))
    with pytest.raises(DatasetError) as err:
        IndexedDataset(mixed)
    n_other = json.loads((other / "meta.json").read_text())["num_docs"]
    assert str(err.value) == (f"{mixed}/doc_offsets.idx: int64[{n_other + 1}] offsets but {recorded} "
                              f"(expected int64[{n_docs + 1}]); the files come from different runs: {RERUN}")

    def flip_mask_byte(d: Path) -> None:
        data = bytearray((d / "loss_mask.bin").read_bytes())
        data[len(data) // 2] ^= 1
        (d / "loss_mask.bin").write_bytes(bytes(data))

    flipped = broken("flipped", flip_mask_byte)
    with pytest.raises(DatasetError, match=rf"^{flipped}/loss_mask.bin: blake2b [0-9a-f]{{16}} differs from "
                                           rf"{meta['blake2b']['loss_mask.bin'][:16]} recorded in meta.json; "
                                           rf"the file changed after it was written: {RERUN}$"):
        IndexedDataset(flipped)
    assert len(IndexedDataset(flipped, verify="sizes")) == n_docs   # the documented way to skip the hash

    missing = broken("missing", lambda d: (d / "loss_mask.bin").unlink())
    with pytest.raises(DatasetError, match=f"^{missing}/loss_mask.bin is missing; the dataset is incomplete"):
        IndexedDataset(missing)


def old_format(d: Path) -> Path:
    """What the code before digests and max_token_id wrote: the same files, a meta.json without them."""
    meta = json.loads((d / "meta.json").read_text())
    del meta["blake2b"], meta["max_token_id"]
    (d / "meta.json").write_text(json.dumps(meta))
    return d


# ------------------------------------------------------------------ 2. inputs checked against the model
def test_token_ids_beyond_the_model_vocab_fail_at_start_up(tmp_path):
    vocab = load_tokenizer(hf_tokenizer_dir(), "llama3").vocab_size
    top = vocab - 1   # the tokenizer's last id, past a model vocabulary of vocab - 40
    out = tmp_path / "pre"
    rows = [{"input_ids": [1, 5, top, 7], "labels": [1, 5, top, 7]}, {"input_ids": [3, 4], "labels": [-100, 4]}]
    assert cli(write_jsonl(tmp_path / "pre.jsonl", rows), out) == 0
    assert json.loads((out / "meta.json").read_text())["max_token_id"] == top
    cfg = DataConfig(train_path=str(out), seq_len=8, global_batch_tokens=8, micro_batch_size=1)
    with pytest.raises(DatasetError) as err:
        build_loaders(cfg, seed=0, vocab_size=vocab - 40)
    # The message names the input record (file:line) and the token, not only the dataset.
    assert str(err.value) == (f"{out}: token id {top} >= model.vocab_size={vocab - 40} in document 0 (input "
                              f"{tmp_path / 'pre.jsonl'}:1, token 2) (the dataset's tokenizer has {vocab} tokens); "
                              f"set model.vocab_size to at least {vocab}, or re-run megasft preprocess with the "
                              "model's tokenizer or --vocab-size")
    train, _ = build_loaders(cfg, seed=0, vocab_size=vocab)   # max id < model.vocab_size: fine
    assert len(train.doc_indices) == 2
    # A dataset written before max_token_id gets it from the data, and a separate eval set is checked too.
    old = old_format(shutil.copytree(out, tmp_path / "old"))
    assert IndexedDataset(old).max_token_id == top
    with pytest.raises(DatasetError, match=f"^{old}: token id {top} >= model.vocab_size={top}"):
        build_loaders(DataConfig(train_path=str(old), seq_len=8, global_batch_tokens=8, micro_batch_size=1),
                      seed=0, vocab_size=top)
    small = tmp_path / "small"
    assert cli(write_jsonl(tmp_path / "small.jsonl", [{"input_ids": [3, 4], "labels": [-100, 4]}]), small) == 0
    with pytest.raises(DatasetError, match=f"^{old}: token id {top} >= model.vocab_size={top}"):
        build_loaders(DataConfig(train_path=str(small), eval_path=str(old), seq_len=8, global_batch_tokens=8,
                                 micro_batch_size=1), seed=0, vocab_size=top)


def test_empty_dataset_is_an_error_in_preprocessing_and_training(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [GOOD, GOOD])
    assert cli(src, tmp_path / "out", "--seq-len", 4) == 1   # every conversation is longer than 4 tokens
    assert capsys.readouterr().err == ("error: no conversation kept of 2 read (longer than seq_len=4: 2): the dataset "
                                       "would be empty; check the input, --format, --mask-mode and --seq-len\n")
    assert not (tmp_path / "out").exists()
    IndexedDatasetBuilder(tmp_path / "empty", vocab_size=600).finish({"pad_id": 0})   # as older code wrote them
    cfg = DataConfig(train_path=str(tmp_path / "empty"), seq_len=8, global_batch_tokens=8, micro_batch_size=1)
    with pytest.raises(DatasetError) as err:
        build_loaders(cfg, seed=0, vocab_size=600)
    assert str(err.value) == (f"{tmp_path / 'empty'}: the dataset holds no documents, nothing to train on; "
                              f"{RERUN} (its summary says why every line was dropped)")


# ------------------------------------------------------------------ 7. input files as users have them
def test_gzip_zstd_bom_and_directory_inputs_read_like_plain_jsonl(tmp_path, capsys):
    rows = chats(24, seed=6)
    lines = [json.dumps(r).encode() + b"\n" for r in rows]
    parts = [b"".join(lines[:8]), b"".join(lines[8:16]), b"".join(lines[16:])]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + parts[0])   # a BOM, as Windows editors write
    (inputs / "b.jsonl.gz").write_bytes(gzip.compress(parts[1]))
    (inputs / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(parts[2]))
    (inputs / "notes.txt").write_text("not data")
    assert cli(inputs, tmp_path / "from_dir") == 0
    assert cli(write_jsonl(tmp_path / "plain.jsonl", rows), tmp_path / "plain") == 0
    a, b = IndexedDataset(tmp_path / "from_dir"), IndexedDataset(tmp_path / "plain")
    assert len(a) == len(rows) and np.array_equal(a.tokens, b.tokens) and np.array_equal(a.mask, b.mask)
    assert a.meta["inputs"] == [str(inputs / n) for n in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst")]
    assert a.meta["summary"]["dropped"] == {}

    # gzip told by its bytes, not its name; a broken stream names file:line, not "invalid utf-8".
    disguised = tmp_path / "disguised.jsonl"
    disguised.write_bytes(gzip.compress(parts[1]))
    assert cli(disguised, tmp_path / "disguised") == 0 and len(IndexedDataset(tmp_path / "disguised")) == 8
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(parts[1])[:-10])   # the trailer lost: every line there, the stream unfinished
    capsys.readouterr()
    assert cli(cut, tmp_path / "cut", "--skip-bad") == 1
    # Line 8 is where reading broke (gzip verifies the trailer while delivering the last line); no
    # "--skip-bad" hint: a broken file is not a bad line to skip.
    assert capsys.readouterr().err == (f"error: {cut}:8: unreadable file: EOFError: Compressed file ended before the "
                                       "end-of-stream marker was reached\n")
    (tmp_path / "nothing").mkdir()
    assert cli(tmp_path / "nothing", tmp_path / "x") == 1
    assert capsys.readouterr().err == (f"error: input directory {tmp_path / 'nothing'} holds no *.jsonl / *.jsonl.gz /"
                                       " *.jsonl.zst / *.parquet / *.arrow files and no datasets save_to_disk "
                                       "directory; pass the files themselves or the directory that holds them\n")


def test_skip_bad_fails_when_too_much_is_bad_and_unwritable_output_is_one_line(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [b"\xff\xfe binary \x00"] * 9 + [GOOD])
    assert cli(src, tmp_path / "out", "--skip-bad") == 1
    assert capsys.readouterr().err == (
        f"error: 9 of 10 lines are bad (90.0% > --max-bad-fraction 0.1; invalid utf-8: 9), first {src}:1: invalid "
        "utf-8: byte 0: b'\\xff\\xfe b'; fix the input or raise --max-bad-fraction\n")
    assert not (tmp_path / "out").exists()
    assert cli(src, tmp_path / "out", "--skip-bad", "--max-bad-fraction", 0.95) == 0
    assert IndexedDataset(tmp_path / "out").meta["summary"]["bad"] == {"invalid utf-8": 9}

    (tmp_path / "afile").write_text("")
    capsys.readouterr()
    assert cli(src, tmp_path / "afile" / "out") == 1
    assert capsys.readouterr().err == (f"error: cannot create {tmp_path / 'afile' / 'out'}: Not a directory; "
                                       "choose an --output in a writable directory\n")
