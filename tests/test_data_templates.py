"""Chat templates and masks: text equals transformers' apply_chat_template; masks per mode; the
label invariant checked against an independent whole-text tokenisation with character offsets."""
from __future__ import annotations

import numpy as np
import pytest
from tests.data_fixtures import CHATML_JINJA, LLAMA3_JINJA, conversations, hf_tokenizer_dir, sp_model_path, \
    write_tokenizer_config
from tokenizers import Tokenizer as RustTokenizer

from megasft.data.packing import build_micro_batch
from megasft.data.templates import ChatEncoder, TemplateError, get_template
from megasft.data.tokenizer import TokenizerError, load_tokenizer

TEMPLATES = {"llama3": LLAMA3_JINJA, "chatml": CHATML_JINJA}


def hf_reference(jinja: str):
    from transformers import PreTrainedTokenizerFast

    ref = PreTrainedTokenizerFast(tokenizer_file=str(hf_tokenizer_dir() / "tokenizer.json"),
                                  bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    ref.chat_template = jinja
    return ref


@pytest.mark.parametrize("name", ["llama3", "chatml"])
def test_builtin_text_equals_transformers(name):
    ref = hf_reference(TEMPLATES[name])
    template = get_template(name)
    for msgs in conversations(30, seed=2):
        for gen in (False, True):
            expected = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert template.render_text(msgs, add_generation_prompt=gen) == expected


@pytest.mark.parametrize("name", ["llama3", "chatml"])
def test_jinja_template_matches_builtin_segments_and_transformers(name, tmp_path):
    config = write_tokenizer_config(tmp_path, TEMPLATES[name], bos_token="<|begin_of_text|>",
                                    eos_token="<|eot_id|>" if name == "llama3" else "<|im_end|>")
    jinja, builtin = get_template(str(config)), get_template(name)
    ref = hf_reference(TEMPLATES[name])
    for msgs in conversations(30, seed=3):
        assert jinja.render_text(msgs) == ref.apply_chat_template(msgs, tokenize=False)
        # Same labelled spans, modulo how literal text is grouped into segments.
        def labelled(segs):
            return [(s.text, s.kind, s.turn) for s in segs if s.text]
        def merged(segs):
            out = []
            for text, kind, turn in labelled(segs):
                if out and kind == 0 and out[-1][1] == 0:
                    out[-1] = (out[-1][0] + text, 0, -1)
                else:
                    out.append((text, kind, turn))
            return out
        assert merged(jinja.render(msgs)) == merged(builtin.render(msgs))


def test_jinja_template_that_rewrites_content_is_masked(tmp_path):
    """Was "content is transformed by the template beyond trim": the span is now what the template wrote."""
    config = write_tokenizer_config(tmp_path, "{% for m in messages %}{{ m['content'] | upper }}<|im_end|>{% endfor %}",
                                    eos_token="<|im_end|>")
    segs = get_template(str(config)).render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert [(s.text, s.kind) for s in segs] == [("HI<|im_end|>", 0), ("YO", 1), ("<|im_end|>", 2)]


def test_jinja_raise_exception_becomes_template_error(tmp_path):
    config = write_tokenizer_config(tmp_path, "{{ raise_exception('roles must alternate') }}", eos_token="<|im_end|>")
    with pytest.raises(TemplateError, match="roles must alternate"):
        get_template(str(config)).render([{"role": "user", "content": "hi"}])


def expected_trained_text(msgs, mode, last_turn_only, template):
    """What the mask must select, written from the definition of each mode."""
    if mode == "all":
        return None
    assistant = [m["content"].strip() if template == "llama3" else m["content"] for m in msgs if m["role"] == "assistant"]
    if last_turn_only:
        assistant = assistant[-1:]
    eot = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>\n"}[template]  # chatml's turn ends with a newline
    return "".join(a + (eot if mode == "completion_eot" else "") for a in assistant)


@pytest.mark.parametrize("template", ["llama3", "chatml"])
@pytest.mark.parametrize("mode", ["all", "completion", "completion_eot"])
@pytest.mark.parametrize("last_turn_only", [False, True])
def test_mask_modes_multi_turn(template, mode, last_turn_only):
    tok = load_tokenizer(hf_tokenizer_dir(), template)
    enc = ChatEncoder(tok, get_template(template), mode, last_turn_only)
    convs = [c for c in conversations(40, seed=4) if sum(m["role"] == "assistant" for m in c) >= 2]
    assert len(convs) > 10
    for msgs, (ids, mask) in zip(convs, enc.encode_many(convs)):
        assert mask[0] == 0  # nothing predicts the first token
        trained = tok.decode(ids[mask.astype(bool)].tolist())
        expected = expected_trained_text(msgs, mode, last_turn_only, template)
        if expected is None:
            assert mask[1:].all()
        else:
            assert trained == expected


def reference_labels(tok_dir, template_name, msgs, eot):
    """Independent reference: tokenise the whole rendered text once with character offsets; a position
    is trainable iff its token lies inside an assistant content span, or is the end-of-turn token that
    closes one (completion_eot)."""
    template = get_template(template_name)
    text = template.render_text(msgs)
    spans, pos = [], 0
    for m in msgs:
        content = m["content"].strip() if template_name == "llama3" else m["content"]
        header = m["role"] + ("<|end_header_id|>\n\n" if template_name == "llama3" else "\n")
        start = text.index(header, pos) + len(header)
        assert text.startswith(content, start)
        pos = start + len(content)
        if m["role"] == "assistant":
            spans.append((start, pos))
    rust = RustTokenizer.from_file(str(tok_dir / "tokenizer.json"))
    enc = rust.encode(text, add_special_tokens=False)
    labels = []
    for t, (tid, (a, b)) in enumerate(zip(enc.ids, enc.offsets)):
        inside = any(s <= a and b <= e and a < b for s, e in spans)
        closes = tid == rust.token_to_id(eot) and any(e == a for s, e in spans)
        # chatml: the newline right after the closing <|im_end|> completes the turn
        newline = template_name == "chatml" and text[a:b] == "\n" and t > 0 and labels[-1] != -100 and \
            enc.ids[t - 1] == rust.token_to_id(eot)
        labels.append(tid if (inside or closes or newline) and t > 0 else -100)
    return enc.ids, labels


@pytest.mark.parametrize("template", ["llama3", "chatml"])
def test_label_invariant_against_whole_text_tokenisation(template):
    tok = load_tokenizer(hf_tokenizer_dir(), template)
    enc = ChatEncoder(tok, get_template(template))
    eot = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>"}[template]
    for msgs in conversations(40, seed=5):
        ids, mask = enc.encode(msgs)
        batch = build_micro_batch([[(ids, mask)]], len(ids), tok.pad_id)
        ref_ids, ref_labels = reference_labels(hf_tokenizer_dir(), template, msgs, eot)
        assert batch.input_ids[0].tolist() == ref_ids  # per-segment ids == whole-text ids
        assert batch.labels[0].tolist() == ref_labels


def test_sentencepiece_llama3_masks():
    tok = load_tokenizer(sp_model_path(), "llama3")
    enc = ChatEncoder(tok, get_template("llama3"))
    msgs = [{"role": "system", "content": "You are a calculator."}, {"role": "user", "content": "What is 3 plus 4?"},
            {"role": "assistant", "content": "7"}, {"role": "user", "content": "What comes after 41?"},
            {"role": "assistant", "content": "42"}]
    ids, mask = enc.encode(msgs)
    assert tok.decode(ids.tolist()) == get_template("llama3").render_text(msgs)
    assert tok.decode(ids[mask.astype(bool)].tolist()) == "7<|eot_id|>42<|eot_id|>"
    prompt = enc.encode_prompt(msgs[:2])
    assert tok.decode(prompt).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.mark.parametrize("whole_text", [True, False])
def test_encoding_is_linear_in_turns(whole_text):
    """Every character of the rendered text is tokenised at most once (no prefix re-tokenisation)."""
    tok = load_tokenizer(hf_tokenizer_dir(), "llama3")
    seen = []
    for name in ("encode_batch", "encode_joined"):
        original = getattr(tok, name)
        size = (lambda t: len(t)) if name == "encode_batch" else (lambda segs: sum(map(len, segs)))
        setattr(tok, name, lambda texts, f=original, n=size: (seen.append(sum(map(n, texts))), f(texts))[1])
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} hello world"} for i in range(100)]
    ChatEncoder(tok, get_template("llama3"), whole_text=whole_text).encode(msgs)
    # One tokenizer call; no character tokenised twice (repeated headers are even served from a cache).
    assert len(seen) == 1 and 0 < seen[0] <= len(get_template("llama3").render_text(msgs))


@pytest.mark.parametrize("template", ["llama3", "chatml"])
@pytest.mark.parametrize("mode", ["all", "completion", "completion_eot"])
def test_whole_text_and_segmented_encodings_agree(template, mode):
    tok = load_tokenizer(hf_tokenizer_dir(), template)
    convs = conversations(40, seed=8)
    whole = ChatEncoder(tok, get_template(template), mode, whole_text=True).encode_many(convs)
    split = ChatEncoder(tok, get_template(template), mode, whole_text=False).encode_many(convs)
    for (ids_a, mask_a), (ids_b, mask_b) in zip(whole, split):
        assert ids_a.tolist() == ids_b.tolist() and mask_a.tolist() == mask_b.tolist()


def test_tokenizer_lacking_template_tokens_is_an_error():
    with pytest.raises(TokenizerError, match="<\\|im_start\\|>"):
        load_tokenizer(sp_model_path(), "chatml")


def test_special_ids_resolved_by_name():
    tok = load_tokenizer(hf_tokenizer_dir(), "chatml")
    assert tok.eot_id == tok.token_to_id("<|im_end|>")
    assert tok.pad_id == tok.token_to_id("<|pad|>")
    assert tok.bos_id is None
    tok = load_tokenizer(hf_tokenizer_dir(), "llama3")
    assert (tok.bos_id, tok.eot_id, tok.eos_id) == (tok.token_to_id("<|begin_of_text|>"), tok.token_to_id("<|eot_id|>"),
                                                   tok.token_to_id("<|end_of_text|>"))
    assert np.all(np.asarray(tok.encode("hi<|eot_id|>"))[-1:] == tok.eot_id)


def test_segment_counts_offset_fallback_agrees():
    """Where char_to_token finds no token (trimmed offsets), tokens are placed by their offsets instead."""
    from megasft.data.tokenizer import _segment_counts

    tok = load_tokenizer(hf_tokenizer_dir(), "llama3")
    for msgs in conversations(10, seed=9):
        segs = [s.text for s in get_template("llama3").render(msgs)]
        enc = tok.tok.encode("".join(segs), add_special_tokens=False)

        class NoCharToToken:
            ids, offsets = enc.ids, enc.offsets

            def char_to_token(self, pos):
                return None

        ids, counts = _segment_counts(enc, segs)
        ids_b, counts_b = _segment_counts(NoCharToToken(), segs)
        assert counts.tolist() == counts_b.tolist() and counts.sum() == len(ids)
        assert all(c == 0 for c, t in zip(counts.tolist(), segs) if not t)


@pytest.mark.parametrize("which", ["hf", "sentencepiece"])
def test_generation_prompt_is_a_prefix_of_the_training_ids(which):
    """Greedy generation sees the same ids for a prompt as training saw for that conversation prefix."""
    tok = load_tokenizer(hf_tokenizer_dir() if which == "hf" else sp_model_path(), "llama3")
    enc = ChatEncoder(tok, get_template("llama3"))
    for msgs in conversations(20, seed=10):
        ids, mask = enc.encode(msgs)
        turn = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        prompt = enc.encode_prompt(msgs[:turn])
        assert ids[:len(prompt)].tolist() == prompt
        assert mask[len(prompt)] == 1 or msgs[turn]["content"].strip() == ""
