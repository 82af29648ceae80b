"""Input formats, bad-input handling (error naming file:line, or a count with skip_bad), length
policies, worker-count independence, and the indexed dataset written by preprocessing."""
from __future__ import annotations

import json

import numpy as np
import pytest

from megasft.data.formats import DataError, parse_line
from megasft.data.indexed import IndexedDataset
from megasft.data.preprocess import PreprocessOptions, format_summary, preprocess
from megasft.data.templates import ChatEncoder, get_template
from megasft.data.tokenizer import load_tokenizer
from tests.data_fixtures import conversations, hf_tokenizer_dir, write_jsonl
from tools import preprocess_data

GOOD = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]}

BAD_LINES = {
    "malformed json": '{"messages": [',
    "unknown role": json.dumps({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}),
    "non-string content": json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}),
    "no assistant turn": json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
    "invalid utf-8": b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
}


def options(tmp_path, inputs, **kw) -> PreprocessOptions:
    kw.setdefault("workers", 1)
    return PreprocessOptions(inputs=[str(p) for p in inputs], output=str(tmp_path / "out"),
                             tokenizer=str(hf_tokenizer_dir()), progress=False, **kw)


def test_formats_map_to_messages():
    sharegpt = {"system": "be brief", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    assert parse_line(json.dumps(sharegpt).encode(), "f", 1) == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    alpaca = {"instruction": "Sum", "input": "1 2", "output": "3"}
    assert parse_line(json.dumps(alpaca).encode(), "f", 1) == [
        {"role": "user", "content": "Sum\n\n1 2"}, {"role": "assistant", "content": "3"}]
    assert parse_line(json.dumps(GOOD).encode(), "f", 1) == GOOD["messages"]
    pre = parse_line(json.dumps({"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}).encode(), "f", 1, vocab_size=10)
    assert pre.input_ids.tolist() == [5, 6, 7] and pre.loss_mask.tolist() == [0, 1, 1]
    with pytest.raises(DataError, match="unknown format"):
        parse_line(b'{"text": "x"}', "f", 1)
    with pytest.raises(DataError, match="unknown role"):  # forced format ignores other keys
        parse_line(json.dumps({"conversations": [{"from": "alien", "value": "x"}]}).encode(), "f", 1, "sharegpt")


def test_pretokenized_shifted_labels_are_rejected():
    with pytest.raises(DataError, match="shifted"):
        parse_line(json.dumps({"input_ids": [5, 6, 7], "labels": [6, 7, -100]}).encode(), "f", 4, vocab_size=10)
    for bad in ([1.5, 2], [[1], [2]], ["1", "2"], [1, [2]]):
        with pytest.raises(DataError, match="flat lists of integers"):
            parse_line(json.dumps({"input_ids": bad, "labels": [-100, -100]}).encode(), "f", 4, vocab_size=10)
    with pytest.raises(DataError, match="out of range"):
        parse_line(json.dumps({"input_ids": [5, 60], "labels": [5, 60]}).encode(), "f", 4, vocab_size=10)


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_each_bad_line_names_file_and_line(tmp_path, reason):
    path = write_jsonl(tmp_path / "in.jsonl", [GOOD, GOOD, BAD_LINES[reason], GOOD])
    with pytest.raises(DataError) as err:
        preprocess(options(tmp_path, [path]))
    assert err.value.reason == reason
    assert str(err.value).startswith(f"{path}:3: {reason}")


def test_skip_bad_counts_every_reason(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [GOOD, *BAD_LINES.values(), GOOD, "", GOOD])
    summary = preprocess(options(tmp_path, [path], skip_bad=True, max_bad_fraction=1.0, workers=2, chunk_lines=2))
    assert summary.read == 8 and summary.kept == 3
    assert summary.dropped == {reason: 1 for reason in BAD_LINES}
    assert any(m.startswith(f"{path}:2: ") for m in summary.bad_examples)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["summary"]["dropped"] == summary.dropped and meta["num_docs"] == 3
    text = format_summary(summary)
    for reason in BAD_LINES:
        assert reason in text


def test_cli_reports_error_and_hint(tmp_path, capsys):
    path = write_jsonl(tmp_path / "in.jsonl", [GOOD, BAD_LINES["unknown role"]])
    code = preprocess_data.main(["--input", str(path), "--output", str(tmp_path / "o"), "--tokenizer",
                                 str(hf_tokenizer_dir()), "--workers", "1", "--no-progress"])
    assert code == 1
    assert f"{path}:2: unknown role" in capsys.readouterr().err


def test_long_conversations_dropped_or_truncated(tmp_path):
    tok = load_tokenizer(hf_tokenizer_dir(), "llama3")
    long = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello world " * 40}]}
    late = {"messages": [{"role": "user", "content": "hello world " * 40}, {"role": "assistant", "content": "x"}]}
    path = write_jsonl(tmp_path / "in.jsonl", [GOOD, long, late])
    n = len(ChatEncoder(tok, get_template("llama3")).encode(long["messages"])[0])
    dropped = preprocess(options(tmp_path, [path], seq_len=32))
    assert dropped.kept == 1 and dropped.dropped == {"longer than seq_len=32": 2} and n > 32
    kept = preprocess(options(tmp_path, [path], seq_len=32, long_policy="truncate", overwrite=True))
    assert kept.kept == 2 and kept.truncated == 2
    assert kept.dropped == {"no trained tokens after truncation": 1}  # `late` loses its only answer
    ds = IndexedDataset(tmp_path / "out")
    assert ds.lengths.tolist()[1] == 32


def test_output_independent_of_workers_and_matches_encoder(tmp_path):
    convs = conversations(120, seed=7)
    path = write_jsonl(tmp_path / "in.jsonl", [{"messages": c} for c in convs])
    one = preprocess(options(tmp_path / "a", [path], workers=1))
    two = preprocess(options(tmp_path / "b", [path], workers=2, chunk_lines=7))
    a, b = IndexedDataset(tmp_path / "a" / "out"), IndexedDataset(tmp_path / "b" / "out")
    assert one.tokens == two.tokens and one.trained_tokens == two.trained_tokens
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.mask, b.mask)
    assert a.tokens.dtype == np.uint16  # vocab 600 needs more than uint8, less than uint32
    enc = ChatEncoder(load_tokenizer(hf_tokenizer_dir(), "llama3"), get_template("llama3"))
    kept = [c for c in convs if enc.encode(c)[1].any()]  # all-empty answers have nothing to train
    assert len(a) == len(kept)
    for d in (0, len(a) // 2, len(a) - 1):
        ids, mask = enc.encode(kept[d])
        assert a[d][0].tolist() == ids.tolist() and a[d][1].tolist() == mask.tolist()
    assert a.meta["tokenizer_sha256"] and a.meta["mask_mode"] == "completion_eot" and a.meta["template"] == "llama3"
    assert a.meta["pad_id"] == load_tokenizer(hf_tokenizer_dir(), "llama3").pad_id


def test_alpaca_json_array_file_equals_its_jsonl(tmp_path):
    """Alpaca is released as one JSON array (alpaca_data.json); it reads as the same records as JSONL."""
    records = [{"instruction": f"Add {i} and {i + 1}", "input": "" if i % 2 else "show work", "output": str(2 * i + 1)}
               for i in range(30)]
    array = tmp_path / "alpaca_data.json"
    array.write_text(json.dumps(records, indent=2), encoding="utf-8")
    lines = write_jsonl(tmp_path / "alpaca.jsonl", records)
    preprocess(options(tmp_path / "a", [array]))
    preprocess(options(tmp_path / "b", [lines]))
    a, b = IndexedDataset(tmp_path / "a" / "out"), IndexedDataset(tmp_path / "b" / "out")
    assert len(a) == len(b) == 30
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.mask, b.mask)

    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(records)[:-5], encoding="utf-8")
    with pytest.raises(DataError, match=r"broken.json:1: unreadable file: starts with '\[' but is not one JSON "
                                        r"array .*json.load\(open\(sys.argv\[1\]\)\)\]\" .*broken.json > "):
        preprocess(options(tmp_path / "c", [broken]))


def test_pretokenized_input_round_trips(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"input_ids": [1, 2, 3, 4], "labels": [1, -100, 3, 4]}])
    preprocess(options(tmp_path, [path]))
    ids, mask = IndexedDataset(tmp_path / "out")[0]
    assert ids.tolist() == [1, 2, 3, 4] and mask.tolist() == [0, 0, 1, 1]  # first token never trained


def test_jinja_template_from_tokenizer_config_matches_builtin(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"messages": c} for c in conversations(30, seed=12)])
    preprocess(options(tmp_path / "builtin", [path]))
    preprocess(options(tmp_path / "jinja", [path], template=str(hf_tokenizer_dir() / "tokenizer_config.json")))
    a, b = IndexedDataset(tmp_path / "builtin" / "out"), IndexedDataset(tmp_path / "jinja" / "out")
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.mask, b.mask)
    assert b.meta["template"].endswith("tokenizer_config.json")
