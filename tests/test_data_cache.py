"""The preprocessing cache (megasft.data.cache): a re-run with one more input file tokenises only that
file and writes the dataset a fresh run writes; a changed file, template or mask setting misses the
cache; a damaged entry is remade. Which files get tokenised is observed on the worker function itself
(workers=1 runs it in this process), not taken from the run's own counters."""
from __future__ import annotations

import pytest

import megasft.data.preprocess as pre
from megasft.data.indexed import IndexedDataset
from megasft.data.preprocess import PreprocessOptions, preprocess
from tests.data_fixtures import conversations, hf_tokenizer_dir, write_jsonl
from tools import preprocess_data

DATA_FILES = ("tokens.bin", "loss_mask.bin", "doc_offsets.idx", "doc_rows.idx")


@pytest.fixture
def tokenised(monkeypatch):
    """The set of input files process_chunk sees (cleared by the test between runs)."""
    seen: set = set()
    real = pre.process_chunk

    def spy(chunk):
        seen.add(chunk.path.rsplit("/", 1)[-1])
        return real(chunk)

    monkeypatch.setattr(pre, "process_chunk", spy)
    return seen


def write_inputs(tmp_path, n_files: int = 3) -> list:
    return [write_jsonl(tmp_path / f"{k}.jsonl", [{"messages": c} for c in conversations(25, seed=20 + k)])
            for k in range(n_files)]


def run(tmp_path, name: str, files, cache="cache", **kw):
    out = tmp_path / "out" / name
    summary = preprocess(PreprocessOptions(inputs=[str(f) for f in files], output=str(out),
                                           tokenizer=str(hf_tokenizer_dir()), workers=1, progress=False,
                                           cache_dir=str(tmp_path / cache) if cache else None, **kw))
    return summary, IndexedDataset(out)


def same(a: IndexedDataset, b: IndexedDataset) -> bool:
    return all((a.dir / f).read_bytes() == (b.dir / f).read_bytes() for f in DATA_FILES)


def test_a_rerun_with_one_more_file_tokenises_only_that_file(tmp_path, tokenised):
    a, b, c = write_inputs(tmp_path)
    first, _ = run(tmp_path, "first", [a, b])
    assert tokenised == {"0.jsonl", "1.jsonl"} and first.files_tokenized == 2
    tokenised.clear()
    again, ds = run(tmp_path, "again", [a, b, c])
    assert tokenised == {"2.jsonl"} and (again.files_tokenized, again.files_cached) == (1, 2)
    fresh, ref = run(tmp_path, "fresh", [a, b, c], cache=False)
    assert same(ds, ref) and ds.meta["docs_per_input"] == ref.meta["docs_per_input"]
    for key in ("read", "kept", "tokens", "trained_tokens", "dropped", "histogram"):
        assert ds.meta["summary"][key] == ref.meta["summary"][key], key
    # The order of the inputs is the order of the dataset, cached or not; nothing is tokenised.
    tokenised.clear()
    _, swapped = run(tmp_path, "swapped", [c, a, b])
    assert not tokenised and same(swapped, run(tmp_path, "swapped-fresh", [c, a, b], cache=False)[1])
    # A file given twice is read twice (twice its documents), tokenised once with the cache.
    d = write_jsonl(tmp_path / "3.jsonl", [{"messages": c} for c in conversations(5, seed=40)])
    tokenised.clear()
    twice, ds = run(tmp_path, "twice", [d, a, d])
    assert tokenised == {"3.jsonl"} and (twice.files_tokenized, twice.files_cached) == (1, 2)
    _, ref = run(tmp_path, "twice-fresh", [d, a, d], cache=False)
    assert same(ds, ref) and ref.meta["docs_per_input"][0] == ref.meta["docs_per_input"][2] == 5
    assert ref.meta["docs_per_input"][1] == IndexedDataset(tmp_path / "out" / "first").meta["docs_per_input"][0]
    assert len(ref) == sum(ref.meta["docs_per_input"])


def test_changed_file_template_or_mask_setting_misses_the_cache(tmp_path, tokenised):
    a, b = write_inputs(tmp_path, 2)
    run(tmp_path, "base", [a, b])
    for name, kw in (("mask", {"mask_mode": "all"}), ("last", {"last_turn_only": True}),
                     ("template", {"template": "chatml"}), ("seq", {"seq_len": 40, "long_policy": "truncate"})):
        tokenised.clear()
        _, ds = run(tmp_path, name, [a, b], **kw)
        assert tokenised == {"0.jsonl", "1.jsonl"}, name
        assert same(ds, run(tmp_path, name + "-fresh", [a, b], cache=False, **kw)[1]), name
        tokenised.clear()
        run(tmp_path, name + "-again", [a, b], **kw)   # and that setting is now cached in turn
        assert not tokenised, name
    # Same name, new content: that file only.
    write_jsonl(b, [{"messages": c} for c in conversations(10, seed=99)])
    tokenised.clear()
    _, ds = run(tmp_path, "edited", [a, b])
    assert tokenised == {"1.jsonl"} and same(ds, run(tmp_path, "edited-fresh", [a, b], cache=False)[1])
    # A damaged entry (a file lost) is remade, not trusted.
    run(tmp_path, "own", [a, b], cache="cache2")
    entry = next(p for p in (tmp_path / "cache2").iterdir() if IndexedDataset(p).meta["input"] == str(a))
    (entry / "tokens.bin").unlink()
    tokenised.clear()
    _, ds = run(tmp_path, "damaged", [a, b], cache="cache2")
    assert tokenised == {"0.jsonl"} and same(ds, run(tmp_path, "damaged-fresh", [a, b], cache=False)[1])
    entry = next(p for p in (tmp_path / "cache2").iterdir() if IndexedDataset(p).meta["input"] == str(b))
    (entry / "meta.json").unlink()   # no longer a dataset at all: still the cache's to replace
    tokenised.clear()
    _, ds = run(tmp_path, "no-meta", [a, b], cache="cache2")
    assert tokenised == {"1.jsonl"} and same(ds, run(tmp_path, "no-meta-fresh", [a, b], cache=False)[1])


def test_cli_cache_dir_and_no_cache(tmp_path, monkeypatch, tokenised, capsys):
    (a,) = write_inputs(tmp_path, 1)
    monkeypatch.setenv("MEGASFT_CACHE_DIR", str(tmp_path / "envcache"))
    args = ["--input", str(a), "--tokenizer", str(hf_tokenizer_dir()), "--workers", "1", "--no-progress"]
    assert preprocess_data.main(args + ["--output", str(tmp_path / "o1")]) == 0
    assert len(list((tmp_path / "envcache").iterdir())) == 1 and tokenised == {"0.jsonl"}
    tokenised.clear()
    assert preprocess_data.main(args + ["--output", str(tmp_path / "o2")]) == 0
    assert not tokenised and "1 from the cache" in capsys.readouterr().out
    assert preprocess_data.main(args + ["--output", str(tmp_path / "o3"), "--no-cache"]) == 0
    assert tokenised == {"0.jsonl"} and IndexedDataset(tmp_path / "o3").meta["cache_dir"] is None
