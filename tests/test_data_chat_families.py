"""Built-in chat template families (megasft.data.chat.families).

Always run: each family's parts on a small conversation, written out from the family's published format
(header / lead / reasoning / content / tool call / end-of-turn), and the refusals. With
../shared/chat_templates: each built-in renders exactly as transformers renders the family's original
template, and its labels equal transformers' return_assistant_tokens_mask with the training twin."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from megasft.data.chat.families import FAMILIES, family_template
from megasft.data.chat.schema import normalize_record
from megasft.data.templates import CONTENT, EOT, HEADER, LEAD, OTHER, REASONING, TOOL_CALL, ChatEncoder, \
    TemplateError, get_template
from megasft.data.tokenizer import load_tokenizer
from tests.chat_cases import WEATHER_TOOL, chat_templates_dir, conversations_for, family_records, \
    family_tokenizer_dir, hf_tokenizer

pytestmark = pytest.mark.quick
TEMPLATES = chat_templates_dir()
needs_shared = pytest.mark.skipif(TEMPLATES is None, reason="../shared/chat_templates is absent (set "
                                                            "MEGASFT_CHAT_TEMPLATES to its path to run these)")
# built-in name -> the tests.chat_cases family whose records and tokenizer it uses
CASES = {"llama3.1": "llama3_1", "qwen2.5": "qwen2_5", "qwen3": "qwen3", "mistral": "mistral", "gemma": "gemma",
         "phi3": "phi3", "deepseek-v3": "deepseekv3"}
H, L, R, C, T, E = HEADER, LEAD, REASONING, CONTENT, TOOL_CALL, EOT

PLAIN = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
         {"role": "assistant", "content": "Bye now."}]


def parts(family: str, messages, tools=None) -> list[tuple[int, str]]:
    segs = family_template(family).render(normalize_record({"messages": messages, **({"tools": tools} if tools else {})}))
    return [(s.kind, s.text) for s in segs if s.kind != OTHER]


def twice(header: str, eot: str, lead: str = "") -> list:
    return [(k, t) for reply in ("Hello.", "Bye now.") for k, t in ((H, header), (L, lead), (C, reply), (E, eot)) if t]


@pytest.mark.parametrize("family, expected", [
    ("llama3.1", twice("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>")),
    ("qwen2.5", twice("<|im_start|>assistant\n", "<|im_end|>\n")),
    # non-thinking Qwen3: the last turn carries an empty think block, produced by the model (its lead)
    ("qwen3", twice("<|im_start|>assistant\n", "<|im_end|>\n")[:-2] + [(L, "<think>\n\n</think>\n\n"), (C, "Bye now."),
                                                                     (E, "<|im_end|>\n")]),
    ("mistral", twice("", "</s>", lead=" ")),
    ("mistral-tekken", twice("", "</s>")),
    ("gemma3", twice("<start_of_turn>model\n", "<end_of_turn>\n")),
    ("phi3", twice("<|assistant|>\n", "<|end|>\n")[:-1] + [(E, "<|end|>\n<|endoftext|>")]),
    ("phi4", twice("<|im_start|>assistant<|im_sep|>", "<|im_end|>")),
    ("deepseek-v3", twice("<｜Assistant｜>", "<｜end▁of▁sentence｜>")),
    ("gpt-oss", twice("<|start|>assistant", "<|end|>", lead="<|channel|>final<|message|>")[:-1] + [(E, "<|return|>")]),
])
def test_parts_of_a_plain_chat(family, expected):
    assert parts(family, PLAIN) == expected


def test_gemma_has_no_system_role_and_gemma3_prefixes_it():
    with pytest.raises(TemplateError, match="System role not supported"):
        parts("gemma", PLAIN)
    assert parts("gemma", PLAIN[1:]) == twice("<start_of_turn>model\n", "<end_of_turn>\n")
    text = family_template("gemma3").render_text(normalize_record({"messages": PLAIN}))
    assert text.startswith("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n")


def test_reasoning_parts():
    chat = PLAIN[:-1] + [{"role": "assistant", "content": "Bye now.", "reasoning_content": "Plan."}]
    chat[2] = {**chat[2], "reasoning_content": "dropped"}   # before the last user query: not rendered by either
    assert parts("qwen3", chat)[-5:] == [(H, "<|im_start|>assistant\n"), (L, "<think>\n"), (R, "Plan."),
                                         (C, "\n</think>\n\nBye now."), (E, "<|im_end|>\n")]
    # gpt-oss: the analysis message, then the model's own switch to the final channel
    assert parts("gpt-oss", chat)[-6:] == [
        (H, "<|start|>assistant"), (L, "<|channel|>"), (C, "analysis<|message|>"), (R, "Plan."),
        (C, "<|end|><|start|>assistant<|channel|>final<|message|>Bye now."), (E, "<|return|>")]
    # DeepSeek-R1: reasoning inline in the content is cut from every turn by the template
    r1 = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>hmm</think>Hello."}]
    assert parts("deepseek-r1", r1) == [(H, "<｜Assistant｜>"), (C, "Hello."), (E, "<｜end▁of▁sentence｜>")]


def _call(i: int) -> dict:
    return {"id": f"call{i:05d}", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}


TOOL_CHAT = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": [_call(1)]},
             {"role": "tool", "content": "sunny", "tool_call_id": "call00001"},
             {"role": "assistant", "content": "Sunny."}]


@pytest.mark.parametrize("family, call, eot", [
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}, "id": "call00001"}]', "</s>"),
    ("mistral-tekken", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}, "id": "call00001"}]', "</s>"),
    ("llama3.1", '{"name": "get_weather", "parameters": {"city": "Oslo"}}', "<|eot_id|>"),
    # the newline before <tool_call> is the generation prompt's (<|im_start|>assistant\n)
    ("qwen2.5", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>', "<|im_end|>\n"),
    ("deepseek-v3", '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n'
                    '{"city": "Oslo"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>', "<｜end▁of▁sentence｜>"),
    ("gpt-oss", ' to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Oslo"}', "<|call|>"),
])
def test_tool_call_parts(family, call, eot):
    """The call is trained whole (with its opening tag), then the family's end of a call turn."""
    got = parts(family, TOOL_CHAT, tools=[WEATHER_TOOL] if family != "deepseek-v3" else None)
    assert (T, call) in got
    assert got[got.index((T, call)) + 1] == (E, eot)
    assert [t for k, t in got if k == C][-1] == "Sunny."


def test_reasoning_inside_a_call_keeps_its_kind():
    """gpt-oss renders a call turn's reasoning (analysis message) only in its tool-call branch: the reasoning is
    nested in what the calls add, and stays reasoning (so --train-reasoning none leaves it out)."""
    chat = [TOOL_CHAT[0], {**TOOL_CHAT[1], "reasoning_content": "need tool"}] + TOOL_CHAT[2:]
    assert parts("gpt-oss", chat, tools=[WEATHER_TOOL])[:6] == [
        (H, "<|start|>assistant"), (L, "<|channel|>"), (T, "analysis<|message|>"), (R, "need tool"),
        (T, '<|end|><|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Oslo"}'),
        (E, "<|call|>")]
    assert parts("qwen3", chat, tools=[WEATHER_TOOL])[:6] == [
        (H, "<|im_start|>assistant\n"), (C, "<think>\n"), (R, "need tool"), (C, "\n</think>\n\n"),
        (T, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'), (E, "<|im_end|>\n")]


def test_refusals_name_the_cause():
    with pytest.raises(TemplateError, match="Tool call IDs should be alphanumeric strings with length 9"):
        parts("mistral", [TOOL_CHAT[0], {**TOOL_CHAT[1], "tool_calls": [{**_call(1), "id": "short"}]}])
    with pytest.raises(TemplateError, match="message 1 has content and tool_calls but the template renders only the "
                                            "tool calls"):
        parts("llama3.1", [TOOL_CHAT[0], {**TOOL_CHAT[1], "content": "Let me check."}] + TOOL_CHAT[2:])
    with pytest.raises(TemplateError, match="Phi-3 renders system, user and assistant turns only"):
        parts("phi3", [TOOL_CHAT[0], {"role": "assistant", "content": "Checking."}] + TOOL_CHAT[2:])
    with pytest.raises(TemplateError, match=r"not a built-in \(llama3, chatml, llama3.1, qwen2.5, qwen3, mistral"):
        get_template("qwen9")
    assert get_template("qwen3").name == "qwen3" and set(FAMILIES) >= set(CASES)


# ------------------------------------------------------------------ against the originals (../shared)
def _mistral_tool_records(n: int = 4, seed: int = 0) -> list[dict]:
    """Mistral chats with tool calls (9-character ids), roles alternating apart from the call turns."""
    rng = random.Random(seed)
    out = []
    for c in range(n):
        msgs = [{"role": "system", "content": "Be brief."}] if c % 2 else []
        for t in range(rng.randint(1, 3)):
            msgs.append({"role": "user", "content": f"question {c} {t}"})
            if rng.random() < 0.7:
                calls = [_call(10 * t + k) for k in range(rng.randint(1, 2))]
                msgs.append({"role": "assistant", "content": None, "tool_calls": calls})
                msgs += [{"role": "tool", "content": f"result {k}", "tool_call_id": tc["id"]} for k, tc in enumerate(calls)]
            msgs.append({"role": "assistant", "content": f"answer {c} {t}"})
        out.append({"tools": [WEATHER_TOOL], "messages": msgs})
    return out


def _cases(family: str, thinking: bool = True):
    convs = conversations_for(CASES[family], n=12)
    if family == "mistral":
        convs += [normalize_record(r) for r in _mistral_tool_records()]
    if family == "qwen3" and not thinking:
        convs = [normalize_record({"messages": [{k: v for k, v in m.items() if k not in ("reasoning_content", "thinking")}
                                                for m in r["messages"]], "tools": r.get("tools")})
                 for r in family_records("qwen3", 12)]
    return convs


def _for_transformers(conv, family: str, original: bool = True) -> list[dict]:
    msgs = [dict(m) for m in conv]
    if family == "deepseek-v3" and original:   # it concatenates arguments: give it the JSON string users have
        for m in msgs:
            if m.get("tool_calls"):
                m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.dumps(c["function"]["arguments"])}}
                                   for c in m["tool_calls"]]
    return msgs


@needs_shared
@pytest.mark.parametrize("family, thinking", [(f, True) for f in CASES] + [("qwen3", False)])
def test_builtin_renders_as_transformers_with_the_original(family, thinking):
    ref, ours = hf_tokenizer(CASES[family]), family_template(family)
    source = (TEMPLATES / FAMILIES[family].reference).read_text(encoding="utf-8")
    convs = _cases(family, thinking)
    assert sum(bool(m.get("tool_calls")) for c in convs for m in c) >= (0 if family in ("gemma", "phi3") else 2)
    for conv in convs:
        for gen in (False, True):
            expected = ref.apply_chat_template(_for_transformers(conv, family), tools=conv.tools, chat_template=source,
                                               tokenize=False, add_generation_prompt=gen)
            assert "".join(s.text for s in ours.render(conv, add_generation_prompt=gen)) == expected


# family -> header tokens the twin trains and megasft does not (tests/test_data_chat_templates.py explains)
TWIN_HEADER_TOKENS = {"qwen2.5": {"Ċ"}, "deepseek-v3": {"<｜Assistant｜>", "<｜tool▁outputs▁end｜>"}}


@needs_shared
@pytest.mark.parametrize("family", ["qwen2.5", "qwen3", "mistral", "gemma", "phi3", "deepseek-v3"])
def test_builtin_labels_equal_the_twin_assistant_mask(family):
    """Where the twin renders like the original (for qwen3: no reasoning before the last user query, which
    the original drops and the twin keeps), the built-in's labels are the twin's assistant mask."""
    key = CASES[family]
    ref, tok = hf_tokenizer(key), load_tokenizer(family_tokenizer_dir(key))
    twin = (TEMPLATES / f"{key}_training.jinja").read_text(encoding="utf-8")
    convs = _cases(family)
    if family == "qwen3":  # the twin renders a <think> block in every assistant turn: one question, one answer
        convs = [normalize_record({"messages": [m for m in c if m["role"] == "system"] + [
            next(m for m in c if m["role"] == "user"), c[-1]]}) for c in convs + _cases("qwen3", thinking=False)]
        assert any(m.get("reasoning_content") for c in convs for m in c)
    encoder = ChatEncoder(tok, family_template(family), "completion_eot")
    header_tokens = TWIN_HEADER_TOKENS.get(family, set())
    for conv, (ids, mask) in zip(convs, encoder.encode_many(convs)):
        out = ref.apply_chat_template(_for_transformers(conv, family, original=False), tools=conv.tools, chat_template=twin,
                                      tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert ids.tolist() == out["input_ids"]
        expected = np.array(out["assistant_masks"], dtype=np.uint8)
        diff = np.flatnonzero(mask != expected)
        assert mask.sum() > 0 and (expected[diff] == 1).all()
        # Where they differ the twin trains a header token, or a token straddling prompt text and the turn
        # (DeepSeek's second call turn has no header: a user text ending in " " and its "\n" are one token),
        # which megasft leaves untrained: the token's first character is prompt.
        text = "".join(s.text for s in family_template(family).render(conv))
        offsets = ref(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        starts, pos = set(), 0
        for seg in family_template(family).render(conv):
            if seg.kind not in (OTHER, HEADER):
                starts.add(pos)
            pos += len(seg.text)
        straddling = {t for t in diff if any(offsets[t][0] < b < offsets[t][1] for b in starts)}
        assert {ref.convert_ids_to_tokens(int(ids[t])) for t in set(diff) - straddling} <= header_tokens
