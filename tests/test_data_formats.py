"""Input formats as users have them: the same records as JSONL, .jsonl.gz, .jsonl.zst, Parquet, a
`datasets` save_to_disk directory (written by the real `datasets` package when installed, else Arrow IPC
stream files written with pyarrow, the layout save_to_disk uses) and a folder of such directories
make byte-identical indexed datasets, for every schema (messages / ShareGPT / Alpaca / pretokenized);
a bad row names file and row; pretokenized input needs no tokenizer, and its ids are bounded by
--vocab-size in preprocessing and by the model's vocab_size at train time, naming file, row and id."""
from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest
import zstandard

from megasft.config import DataConfig
from megasft.data.formats import DataError
from megasft.data.indexed import DatasetError, IndexedDataset
from megasft.data.loader import build_loaders
from megasft.data.preprocess import PreprocessOptions, preprocess
from tests.data_fixtures import conversations, hf_tokenizer_dir, write_jsonl
from tools import preprocess_data

pa = pytest.importorskip("pyarrow", reason="Parquet / Arrow input needs pyarrow (pip install '.[data]')")
import pyarrow.parquet as pq  # noqa: E402

try:
    import datasets

    datasets.disable_progress_bars()
except ImportError:   # the folder layout is then written with pyarrow alone, as save_to_disk writes it
    datasets = None

DATA_FILES = ("tokens.bin", "loss_mask.bin", "doc_offsets.idx", "doc_rows.idx")


def records(kind: str, n: int = 30, seed: int = 0) -> list[dict]:
    """n records of one schema. Messages carry optional fields (train flags, names) on some turns only,
    so a columnar file has nulls where a JSONL record has no key."""
    rng = random.Random(seed)
    convs = conversations(n, seed=seed)
    if kind == "messages":
        out = []
        for c in convs:
            msgs = [dict(m) for m in c]
            if rng.random() < 0.3:
                msgs[-1]["train"] = rng.random() < 0.5 or not any(m["role"] == "assistant" for m in msgs[:-1])
            if rng.random() < 0.3:
                msgs[0]["name"] = "someone"
            out.append({"messages": msgs})
        return out
    if kind == "sharegpt":
        role = {"user": "human", "assistant": "gpt", "system": "system", "tool": "tool"}
        return [{"conversations": [{"from": role[m["role"]], "value": m["content"]} for m in c]} for c in convs]
    if kind == "alpaca":
        return [{"instruction": f"question {i}: " + c[-2]["content"], "input": "ctx" if i % 3 else "",
                 "output": c[-1]["content"] or "ok"} for i, c in enumerate(convs)]
    assert kind == "pretokenized"
    out = []
    for _ in range(n):
        ids = [rng.randrange(0, 300) for _ in range(rng.randint(2, 40))]   # below the test vocab of 341
        labels = [t if rng.random() < 0.6 else -100 for t in ids]
        labels[-1] = ids[-1]
        out.append({"input_ids": ids, "labels": labels})
    return out


def write_datasets_dir(path: Path, rows: list[dict], shards: int = 2) -> Path:
    """A save_to_disk directory: with `datasets` when installed, else its layout (state.json listing
    data-*.arrow Arrow IPC stream files) written with pyarrow."""
    if datasets is not None:
        datasets.Dataset.from_list(rows).save_to_disk(str(path), num_shards=shards)
        return path
    path.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    names, per = [], -(-len(rows) // shards)
    for k in range(shards):
        names.append(f"data-{k:05d}-of-{shards:05d}.arrow")
        with pa.ipc.new_stream(str(path / names[-1]), table.schema) as w:
            w.write_table(table.slice(k * per, per), max_chunksize=4)
    (path / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names]}))
    (path / "dataset_info.json").write_text("{}")
    return path


def write_all_formats(d: Path, rows: list[dict]) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    plain = write_jsonl(d / "in.jsonl", rows).read_bytes()
    (d / "in.jsonl.gz").write_bytes(gzip.compress(plain))
    (d / "in.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(plain))
    pq.write_table(pa.Table.from_pylist(rows), d / "in.parquet", row_group_size=7)   # several row groups
    ipc = d / "in.arrow"   # a lone Arrow IPC stream file
    with pa.ipc.new_stream(str(ipc), pa.Table.from_pylist(rows).schema) as w:
        w.write_table(pa.Table.from_pylist(rows), max_chunksize=5)
    half = len(rows) // 2
    folder = d / "folder"   # a folder of two save_to_disk datasets, read in name order
    write_datasets_dir(folder / "a", rows[:half])
    write_datasets_dir(folder / "b", rows[half:])
    return {"jsonl": d / "in.jsonl", "gz": d / "in.jsonl.gz", "zst": d / "in.jsonl.zst", "parquet": d / "in.parquet",
            "arrow": ipc, "save_to_disk": write_datasets_dir(d / "saved", rows, shards=3), "folder": folder}


def run(tmp_path: Path, name: str, inputs, **kw) -> IndexedDataset:
    kw.setdefault("workers", 1)
    kw.setdefault("tokenizer", str(hf_tokenizer_dir()))
    out = tmp_path / "out" / name
    preprocess(PreprocessOptions(inputs=[str(p) for p in inputs], output=str(out), progress=False, **kw))
    return IndexedDataset(out)


def same_data(a: IndexedDataset, b: IndexedDataset) -> bool:
    return all((a.dir / f).read_bytes() == (b.dir / f).read_bytes() for f in DATA_FILES[:3])


@pytest.mark.parametrize("kind", ["messages", "sharegpt", "alpaca", "pretokenized"])
def test_every_input_format_gives_the_same_dataset(tmp_path, kind):
    rows = records(kind)
    files = write_all_formats(tmp_path / "in", rows)
    ref = run(tmp_path, "ref", [files["jsonl"]])
    assert len(ref) == len(rows) - ref.meta["summary"]["dropped"].get("no trained tokens", 0) and len(ref) > 20
    for name, path in files.items():
        got = run(tmp_path, name, [path], chunk_lines=4)   # chunks smaller than the row groups / batches
        assert same_data(got, ref), name
        assert got.meta["summary"]["read"] == len(rows), name
    if kind != "messages":
        return   # the pool does not look at the schema: one kind is enough for the next check
    # One pool of two workers over a mix of formats: the concatenation of the single-format datasets.
    mixed = run(tmp_path, "mixed", [files["parquet"], files["save_to_disk"], files["gz"]], workers=2, chunk_lines=6)
    assert len(mixed) == 3 * len(ref)
    assert np.array_equal(mixed.tokens, np.tile(ref.tokens, 3)) and np.array_equal(mixed.mask, np.tile(ref.mask, 3))
    assert mixed.meta["docs_per_input"][-1] == len(ref)


def test_a_bad_row_names_its_file_and_row(tmp_path):
    rows = records("messages", 12)
    rows[5] = {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad.parquet", row_group_size=4)
    with pytest.raises(DataError) as err:
        run(tmp_path, "bad", [tmp_path / "bad.parquet"], chunk_lines=3)
    # Rows count from 0, as pyarrow's table.slice(5, 1) and datasets' ds[5] find the record.
    assert str(err.value).startswith(f"{tmp_path / 'bad.parquet'}:row 5: unknown role: turn 0 role 'wizard'")
    assert pq.read_table(tmp_path / "bad.parquet").slice(5, 1).to_pylist()[0]["messages"][0]["role"] == "wizard"
    saved = write_datasets_dir(tmp_path / "saved", rows, shards=2)   # rows 0-5 and 6-11
    with pytest.raises(DataError, match=r"data-00000-of-00002\.arrow:row 5: unknown role"):
        run(tmp_path, "bad2", [saved])
    kept = preprocess(PreprocessOptions(inputs=[str(tmp_path / "bad.parquet")], output=str(tmp_path / "skip"),
                                        tokenizer=str(hf_tokenizer_dir()), skip_bad=True, workers=1, progress=False))
    assert kept.bad == {"unknown role": 1} and kept.bad_examples[0].startswith(f"{tmp_path / 'bad.parquet'}:row 5:")
    # A DatasetDict directory is refused with its splits named; a corrupt Parquet file is one clear error.
    if datasets is not None:
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:4])}).save_to_disk(str(tmp_path / "dd"))
        with pytest.raises(FileNotFoundError, match=r"DatasetDict \(splits \['train'\]\); pass one split's directory"):
            run(tmp_path, "dd", [tmp_path / "dd"])
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"junk\.parquet:row 0: unreadable file: not a readable \.parquet file"):
        run(tmp_path, "junk", [tmp_path / "junk.parquet"])


def test_pretokenized_input_needs_no_tokenizer(tmp_path, capsys):
    rows = records("pretokenized", 20, seed=3)
    files = write_all_formats(tmp_path / "in", rows)
    with_tok = run(tmp_path, "tok", [files["jsonl"]])
    for name in ("jsonl", "parquet", "save_to_disk"):
        bare = run(tmp_path, f"bare-{name}", [files[name]], tokenizer=None)
        # Without a vocabulary the ids are stored as uint32 (any Llama vocabulary fits); same values.
        assert bare.tokens.dtype == np.uint32 and bare.meta["tokenizer"] is None and bare.meta["pad_id"] is None
        assert np.array_equal(bare.tokens, with_tok.tokens) and np.array_equal(bare.mask, with_tok.mask)
    # loss_mask (1 = trained target) is the same as HF labels.
    masked = [{"input_ids": r["input_ids"], "loss_mask": [int(t != -100) for t in r["labels"]]} for r in rows]
    assert same_data(run(tmp_path, "mask", [write_jsonl(tmp_path / "mask.jsonl", masked)], tokenizer=None),
                     run(tmp_path, "bare-again", [files["jsonl"]], tokenizer=None))
    # --vocab-size bounds the ids: the error names file, row and the id; the dtype follows the bound.
    top = max(max(r["input_ids"]) for r in rows)
    assert top >= 256   # so a bound of top + 1 needs uint16
    first = next(i for i, r in enumerate(rows) if top in r["input_ids"])
    assert preprocess_data.main(["--input", str(files["parquet"]), "--output", str(tmp_path / "v"), "--no-progress",
                                 "--vocab-size", str(top), "--workers", "1", "--no-cache"]) == 1
    err = capsys.readouterr().err
    assert f"{files['parquet']}:row {first}: token id out of range: input_ids[{rows[first]['input_ids'].index(top)}]" \
           f"={top}, ids must be in [0, {top})" in err, err
    assert run(tmp_path, "bound", [files["parquet"]], tokenizer=None, vocab_size=top + 1).tokens.dtype == np.uint16
    # A chat record needs a tokenizer: said per record, naming file:line.
    chat = write_jsonl(tmp_path / "chat.jsonl", [rows[0], records("messages", 1)[0]])
    with pytest.raises(DataError, match=r"chat\.jsonl:2: needs a tokenizer"):
        run(tmp_path, "chat", [chat], tokenizer=None)


def test_the_models_vocab_bounds_pretokenized_ids_at_train_time(tmp_path):
    rows = [{"input_ids": [3, 4, 5], "labels": [3, 4, 5]}, {"input_ids": [1, 2, 900, 7], "labels": [-100, 2, 900, 7]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pre.parquet")
    ds = run(tmp_path, "pre", [tmp_path / "pre.parquet"], tokenizer=None)
    cfg = DataConfig(train_path=str(ds.dir), seq_len=8, global_batch_tokens=8, micro_batch_size=1)
    with pytest.raises(DatasetError) as err:
        build_loaders(cfg, seed=0, vocab_size=512)
    assert str(err.value).startswith(f"{ds.dir}: token id 900 >= model.vocab_size=512 in document 1 (input "
                                     f"{tmp_path / 'pre.parquet'}:row 1, token 2) (preprocessed without a tokenizer")
    train, _ = build_loaders(cfg, seed=0, vocab_size=901)   # in range: rows are built, padded with id 0
    ids = sorted(int(t) for mb in train.next_global_batch() for t in mb.input_ids.flatten())
    assert ids[-1] == 900 and len(ids) == 8


def test_reading_is_streamed_and_the_pool_holds_a_bounded_number_of_chunks(tmp_path):
    import pickle

    import megasft.data.preprocess as pre
    from megasft.data.readers import file_chunks

    rows = records("pretokenized", 3000, seed=5)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "big.parquet")
    chunks = list(file_chunks(str(tmp_path / "big.parquet"), 10))
    assert [len(c) for c in chunks] == [10] * 300
    # A chunk carries its own rows, not the record batch it was cut from (what pickling a slice would ship).
    whole = pickle.dumps(pa.Table.from_pylist(rows).to_batches()[0])
    assert max(len(pickle.dumps(c)) for c in chunks) < len(whole) / 100
    # Reading runs at most IN_FLIGHT_PER_WORKER chunks per worker ahead of the results taken.
    taken = [0]

    def counted():
        for c in chunks:
            taken[0] += 1
            yield c
    opts = PreprocessOptions(inputs=[str(tmp_path / "big.parquet")], output=str(tmp_path / "o"), workers=2,
                             progress=False)
    ahead = []
    for k, res in enumerate(pre._results(counted(), opts), 1):
        ahead.append(taken[0] - k)
        assert res.read == 10
    assert max(ahead) <= pre.IN_FLIGHT_PER_WORKER * 2 and len(ahead) == 300
