"""Real chat templates (../shared/chat_templates): megasft renders each original exactly as transformers'
apply_chat_template does, and its labels equal transformers' return_assistant_tokens_mask with the
family's {% generation %}-tagged training twin, conversation for conversation, on multi-turn chats with
system prompts, tools, tool calls, tool replies and reasoning where the family has them."""
from __future__ import annotations

import numpy as np
import pytest

from megasft.data.chat.jinja import JinjaTemplate
from megasft.data.templates import ChatEncoder, TemplateError
from megasft.data.tokenizer import load_tokenizer
from tests.chat_cases import TOKENS, chat_templates_dir, conversations_for, family_tokenizer_dir, hf_tokenizer

TEMPLATES = chat_templates_dir()
pytestmark = pytest.mark.skipif(TEMPLATES is None, reason="../shared/chat_templates is absent (set "
                                                         "MEGASFT_CHAT_TEMPLATES to its path to run these)")

# family -> token strings its twin trains in the header (text the generation prompt supplies at inference,
# so megasft does not train it): Qwen2.5's twin opens the span at the newline after "<|im_start|>assistant",
# DeepSeek-V3's includes "<｜Assistant｜>", or "<｜tool▁outputs▁end｜>" for a turn right after tool outputs.
TWIN_HEADER_TOKENS = {"qwen2_5": {"Ċ"}, "deepseekv3": {"<｜Assistant｜>", "<｜tool▁outputs▁end｜>"}}
TWINS = ["llama3", "qwen2_5", "qwen3", "deepseekv3", "gemma", "mistral", "phi3"]


def template(family: str, twin: bool = False) -> JinjaTemplate:
    bos, eos = TOKENS[family]
    source = (TEMPLATES / f"{family}{'_training' if twin else ''}.jinja").read_text(encoding="utf-8")
    return JinjaTemplate(source, family, {"bos_token": bos, "eos_token": eos})


def plain(conv) -> list[dict]:
    return [dict(m) for m in conv]


def original_cases(family: str):
    convs = conversations_for(family, n=24 if family == "deepseekv3" else 6)
    if family == "deepseekv3":  # the original concatenates arguments as a string: only calls-free chats render
        convs = [c for c in convs if not any(m.get("tool_calls") for m in c)]
    return convs


@pytest.mark.parametrize("family", TWINS + ["llama3_1"])
def test_original_renders_as_transformers(family):
    ref, ours = hf_tokenizer(family), template(family)
    convs = original_cases(family)
    assert len(convs) >= 2
    src = ours.source
    for conv in convs:
        for gen in (False, True):
            expected = ref.apply_chat_template(plain(conv), tools=conv.tools, chat_template=src, tokenize=False,
                                               add_generation_prompt=gen)
            assert ours.render_text(conv, add_generation_prompt=gen) == expected
            segs = ours.render(conv, add_generation_prompt=gen)
            assert "".join(s.text for s in segs) == expected


@pytest.mark.parametrize("family", TWINS)
def test_labels_equal_transformers_assistant_mask_of_the_twin(family):
    ref, twin = hf_tokenizer(family), template(family, twin=True)
    tok = load_tokenizer(family_tokenizer_dir(family))
    encoder = ChatEncoder(tok, twin, "completion_eot")
    header_tokens = TWIN_HEADER_TOKENS.get(family, set())
    differing = 0
    convs = conversations_for(family)
    assert sum(bool(m.get("tool_calls")) for c in convs for m in c) >= (2 if family in
                                                                          ("qwen2_5", "qwen3", "deepseekv3") else 0)
    for conv, (ids, mask) in zip(convs, encoder.encode_many(convs)):
        out = ref.apply_chat_template(plain(conv), tools=conv.tools, chat_template=twin.source, tokenize=True,
                                      return_dict=True, return_assistant_tokens_mask=True)
        assert ids.tolist() == out["input_ids"]
        expected = np.array(out["assistant_masks"], dtype=np.uint8)
        assert mask.sum() > 0
        diff = np.flatnonzero(mask != expected)
        pieces = {ref.convert_ids_to_tokens(int(ids[t])) for t in diff}
        # Where they differ, the twin trains a header token and megasft does not; nowhere else.
        assert (expected[diff] == 1).all() and pieces <= header_tokens, (family, pieces)
        differing += len(diff)
    if header_tokens:
        assistant_turns = sum(m["role"] == "assistant" for c in convs for m in c)
        assert 0 < differing <= assistant_turns  # at most the one header token per assistant turn


@pytest.mark.parametrize("family", TWINS)
def test_twin_generation_tags_agree_with_compiled_spans(family):
    """Rendering a twin checks its {% generation %} spans against the compiled ones (raising on disagreement)."""
    twin = template(family, twin=True)
    assert twin.has_generation_tags
    for conv in conversations_for(family):
        assert twin.render(conv)


def test_mismatching_generation_tags_are_an_error():
    source = ("{% for m in messages %}{% if m.role == 'assistant' %}<|im_start|>assistant\n{% generation %}"
              "{{ m.content }}{% endgeneration %}<|im_end|>\n{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}"
              "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    t = JinjaTemplate(source, "tags", {"eos_token": "<|im_end|>"})
    with pytest.raises(TemplateError, match=r"generation %\} spans \[\(52, 54\)\] disagree with the compiled "
                                            r"assistant spans \[\(52, 65\)\]"):
        t.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])


def test_mistral_tool_calls_are_refused_with_the_reason():
    """A known limit: Mistral's role-alternation check skips tool-call turns, so replacing them with plain
    text (how spans are found) makes the template refuse the chat; the error says so instead of the
    template's misleading "roles must alternate" alone."""
    from megasft.data.chat.schema import normalize_record
    from tests.chat_cases import WEATHER_TOOL

    conv = normalize_record({"tools": [WEATHER_TOOL], "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "abcdefghi", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "abcdefghi"}, {"role": "assistant", "content": "Sunny."}]})
    with pytest.raises(TemplateError, match="roles must alternate.* raised only with each assistant turn replaced by "
                                            "plain text, which this template refuses"):
        template("mistral").render(conv)


def test_qwen3_original_drops_history_reasoning_and_counts_it():
    """Qwen3 renders reasoning only after the last user query: earlier turns' reasoning is a counted skip,
    the last turn's is labelled reasoning."""
    from megasft.data.chat.schema import normalize_record
    from megasft.data.templates import REASONING
    from collections import Counter

    conv = normalize_record({"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning_content": "think one"},
        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d", "reasoning_content": "think two"}]})
    notes = Counter()
    segs = template("qwen3").render(conv, notes=notes)
    assert [s.text for s in segs if s.kind == REASONING] == ["think two"]
    assert notes == {"reasoning not rendered by the template": 1}
