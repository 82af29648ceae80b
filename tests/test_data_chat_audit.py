"""Per-token role/part attribution, the train_reasoning preprocessing option and the mask audit
(megasft inspect --audit): counts checked against the conversation text, and deliberately broken
masks (shifted by one, a user turn trained, nothing / everything trained) flagged."""
from __future__ import annotations

import json

import numpy as np
import pytest

from megasft.commands import inspect_data
from megasft.commands import preprocess as preprocess_data
from megasft.data.audit import format_audit, run_audit
from megasft.data.chat import parts
from megasft.data.chat.schema import normalize_record
from megasft.data.indexed import DatasetError, IndexedDataset, IndexedDatasetBuilder
from megasft.data.preprocess import PreprocessOptions, preprocess
from megasft.data.templates import ChatEncoder, get_template
from megasft.data.tokenizer import load_tokenizer
from tests.chat_cases import family_records
from tests.test_data_chat_schema import RECORD, tok_dir  # noqa: F401 (tok_dir: the same fixture)

pytestmark = pytest.mark.quick

# Message texts that start and end with a word boundary the test tokenizer splits at (a space or a
# special token next to them), so their tokens are theirs alone.
CHAT = {"messages": [
    {"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"},
    {"role": "assistant", "content": "the answer", "reasoning_content": "think first"},
    {"role": "user", "content": "weather Paris"},
    {"role": "assistant", "content": "sunny", "reasoning_content": "look it up"}]}


def _encode(tok_dir, records, **kw):
    tok = load_tokenizer(tok_dir, "jinja")
    enc = ChatEncoder(tok, get_template("jinja", tok.config), **kw)
    return tok, enc.encode_parts([normalize_record(r) for r in records])


def test_attribution_follows_the_messages(tok_dir):
    """Each role's tokens decode to that role's messages as rendered; assistant parts to what the turn produced."""
    tok, [(ids, mask, codes)] = _encode(tok_dir, [CHAT])

    def text(role, kind):
        return tok.decode(ids[codes == parts.code(parts.ROLE_CODE[role], kind)].tolist())

    assert text("system", 0) == "be brief"
    assert text("user", 0) == "hello worldweather Paris"
    assert text("assistant", 6) == "<|im_start|>assistant\n" * 2            # header: the generation prompt
    assert text("assistant", 3) == "look it up"  # the template drops reasoning before the last user message
    assert text("assistant", 2) == "<|im_end|>\n" * 2
    assert tok.decode(ids[mask == 1].tolist()) == "the answer<|im_end|>\n<think>\nlook it up\n</think>\n\nsunny<|im_end|>\n"
    assert parts.assistant_part_codes()[codes[mask == 1]].all()
    # segment by segment (sentencepiece-style) the ids and mask are the same; template text is not split by role
    _, [(ids2, mask2, codes2)] = _encode(tok_dir, [CHAT], whole_text=False)
    assert ids2.tolist() == ids.tolist() and mask2.tolist() == mask.tolist()
    assert (codes2[codes // 8 != parts.ASSISTANT] == 0).all()


def _preprocess(tok_dir, tmp_path, records, name="ds", **kw):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / name
    summary = preprocess(PreprocessOptions(inputs=[str(path)], output=str(out), tokenizer=str(tok_dir),
                                           template="jinja", workers=1, progress=False, **kw))
    return summary, IndexedDataset(out)


@pytest.mark.parametrize("policy", ["all", "last", "none"])
def test_train_reasoning_option_is_recorded_and_applied(tok_dir, tmp_path, policy):
    records = [RECORD, CHAT] + family_records("qwen3", 6)
    summary, ds = _preprocess(tok_dir, tmp_path, records, train_reasoning=policy)
    assert ds.meta["train_reasoning"] == policy
    tokens, trained = summary.parts["assistant/reasoning"]
    _, encoded = _encode(tok_dir, records)
    # the reasoning tokens of each conversation's last assistant turn (after its last header): what "last" keeps
    last = 0
    for ids, mask, codes in encoded:
        reasoning = np.flatnonzero(codes == parts.code(parts.ASSISTANT, 3))
        last += int((reasoning > np.flatnonzero(codes == parts.code(parts.ASSISTANT, 6)).max()).sum())
    assert tokens == sum(int((c == parts.code(parts.ASSISTANT, 3)).sum()) for _, _, c in encoded) > last > 0
    assert trained == {"all": tokens, "last": last, "none": 0}[policy]
    assert summary.not_rendered == {"reasoning not rendered by the template": 9}
    assert preprocess_data.parse_args(["--input", "x", "--output", "y", "--tokenizer", "t",
                                       "--train-reasoning", policy]).train_reasoning == policy


def test_summary_counts_equal_the_audit_and_the_mask(tok_dir, tmp_path, capsys):
    summary, ds = _preprocess(tok_dir, tmp_path, [RECORD, CHAT] + family_records("qwen3", 6))
    report = run_audit(ds)
    assert parts.as_table(report.tokens, report.trained) == summary.parts
    assert sum(t for _, t in summary.parts.values()) == summary.trained_tokens == int(ds.mask.sum())
    assert sum(n for n, _ in summary.parts.values()) == summary.tokens
    for name, (n, t) in summary.parts.items():
        assert t == (n if name.startswith("assistant/") and name != "assistant/header" else 0), name
    assert not report.problems and not report.none_trained and not report.all_trained
    assert inspect_data.main(["--data", str(ds.dir), "--audit", "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "flags:\n  none: every trained token is inside an assistant part" in out
    assert "conversation 0:" in out and "conversation 1:" not in out


def _dataset(path, vocab, docs):
    with IndexedDatasetBuilder(path, vocab, parts=True) as b:
        for ids, mask, codes in docs:
            b.add_many(ids, mask, [len(ids)], parts=codes)
        b.finish({"mask_mode": "completion_eot"})
    return IndexedDataset(path)


def test_audit_flags_broken_masks(tok_dir, tmp_path, capsys):
    tok, encoded = _encode(tok_dir, [RECORD, CHAT, CHAT, CHAT, CHAT])
    (i0, m0, c0), (i1, m1, c1), (i2, m2, c2), (i3, m3, c3), (i4, m4, c4) = encoded
    shifted = np.concatenate([[0], m1[:-1]]).astype(np.uint8)   # the off-by-one: labels one token late
    user = m2.copy()
    user[c2 == parts.code(parts.ROLE_CODE["user"], 0)] = 1   # a user turn trained
    nothing, everything = np.zeros_like(m3), np.ones_like(m4)
    everything[0] = 0
    ds = _dataset(tmp_path / "broken", tok.vocab_size, [(i0, m0, c0), (i1, shifted, c1), (i2, user, c2),
                                                         (i3, nothing, c3), (i4, everything, c4)])
    report = run_audit(ds)
    assert report.none_trained == [3] and report.all_trained == [4] and report.first_trained == []
    bad_docs = [doc for doc, _, _ in report.outside_docs]
    assert bad_docs == [1, 2, 4]
    assert report.outside == int((shifted & ~parts.assistant_part_codes()[c1]).sum()) + \
        int((c2 == parts.code(parts.ROLE_CODE["user"], 0)).sum()) + int((~parts.assistant_part_codes()[c4][1:]).sum())
    doc, pos, c = report.outside_docs[1]
    assert parts.name(c) == "user/content" and tok.decode([int(i2[pos])]) == "hello"
    assert parts.name(report.outside_docs[0][2]) in ("template/text", "assistant/header")  # after an end-of-turn
    text = format_audit(ds, report, show_docs=0, tokenizer=tok)
    assert "trained fraction 0 (nothing trained): 1 conversations: 3" in text
    assert "ERROR" in text and "doc 2 position" in text and "user/content 'hello'" in text
    assert inspect_data.main(["--data", str(ds.dir), "--audit", "--tokenizer", str(tok_dir)]) == 1
    # a trained first token (nothing predicts it) is an error of its own
    first = m0.copy()
    first[0] = 1
    assert run_audit(_dataset(tmp_path / "first", tok.vocab_size, [(i0, first, c0)])).first_trained == [0]


def test_audit_needs_recorded_parts(tmp_path, capsys):
    with IndexedDatasetBuilder(tmp_path / "old", 100) as b:
        b.add_many(np.array([1, 2, 3]), np.array([0, 1, 1]), [3])
        b.finish({"mask_mode": "completion_eot"})
    with pytest.raises(DatasetError, match="has no parts.bin"):
        run_audit(IndexedDataset(tmp_path / "old"))
    with pytest.raises(ValueError, match="parts .* must be given"):
        IndexedDatasetBuilder(tmp_path / "x", 100, parts=True).add_many(np.array([1]), np.array([0]), [1])
