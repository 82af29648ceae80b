"""The plain-Python Qwen2.5 / Qwen3 renderers (megasft.data.chat.qwen) give exactly what the Jinja mask
compiler gives for the same template: the same segments (text, part, turn) and not-rendered notes, hence the
same ids, labels and per-token parts under every mask mode and reasoning policy. Compared against the
compiler on megasft's built-in family template (always) and on the original Qwen template
(../shared/chat_templates; skipped without it), on every conversation of the benchmark's tool-calling +
reasoning set (its first 300 in the quick tier, all 2000 with qwen3 in the slow one), the family's chat cases
and the edge cases below; conversations the renderer leaves to the compiler still come out the same."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from megasft.data.chat.families import FAMILIES, family_template
from megasft.data.chat.jinja import JinjaTemplate
from megasft.data.chat.qwen import ORIGINALS, QwenTemplate, digest
from megasft.data.chat.schema import Conversation, normalize_record
from megasft.data.templates import MASK_MODES, REASONING_POLICIES, ChatEncoder, TemplateError, get_template
from megasft.data.tokenizer import load_tokenizer
from tests.chat_cases import LOOKUP_TOOLS, WEATHER_TOOL, chat_templates_dir, conversations_for, family_records, \
    family_tokenizer_dir, tool_reasoning_records

TEMPLATES = chat_templates_dir()
KEYS = {"qwen2.5": "qwen2_5", "qwen3": "qwen3"}   # built-in name -> tests.chat_cases family / original file stem
BENCH_SET = 2000   # benchmarks/preprocess.py's default --tool-conversations (seed 0)
REFERENCES = [(f, r) for f in KEYS for r in ("built-in", "original")]


def reference(family: str, which: str) -> JinjaTemplate:
    """The Jinja mask compiler on the family's built-in template, or on the original (skips without it)."""
    if which == "built-in":
        return JinjaTemplate(FAMILIES[family].source, family, FAMILIES[family].tokens(), trusted=True)
    if TEMPLATES is None:
        pytest.skip("../shared/chat_templates is absent (set MEGASFT_CHAT_TEMPLATES to its path to run these)")
    source = (TEMPLATES / f"{KEYS[family]}.jinja").read_text(encoding="utf-8")
    return JinjaTemplate(source, KEYS[family], {"eos_token": "<|im_end|>"})


def _call(k: int, args=None) -> dict:
    return {"id": f"c{k}", "type": "function", "function": {"name": "get_weather", "arguments": args or {"city": "Oslo"}}}


U = {"role": "user", "content": "Weather in Oslo?"}
SYS = {"role": "system", "content": "Be brief."}
EDGE_RECORDS = [
    {"messages": [U, {"role": "assistant", "content": "Sunny."}]},                              # no system, no tools
    {"messages": [U, {"role": "assistant", "content": ""}, {"role": "user", "content": "again"},
                  {"role": "assistant", "content": "\n\nleading newlines", "reasoning_content": "\nplan\n\n"}]},
    {"messages": [SYS, U, {"role": "assistant", "content": "A.", "reasoning_content": ""}]},     # empty reasoning
    {"messages": [SYS, U, {"role": "system", "content": "Later system."}, {"role": "assistant", "content": "B."},
                  {"role": "assistant", "content": "Two in a row.", "reasoning_content": "r"}]},
    # multi-step tools after the last query: every call turn's reasoning is rendered; two calls, content + calls
    {"tools": [WEATHER_TOOL, *LOOKUP_TOOLS], "messages": [
        U, {"role": "assistant", "content": "Checking.", "reasoning_content": "need two", "tool_calls": [
            _call(1), _call(2, {"city": "Zürich", "days": [1, 2], "note": "naïve \"quoted\""})]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"}, {"role": "tool", "content": "rain", "tool_call_id": "c2"},
        {"role": "assistant", "content": None, "tool_calls": [_call(3)]},
        {"role": "tool", "content": "snow", "tool_call_id": "c3"},
        {"role": "assistant", "content": "Mixed.", "reasoning_content": "sum up"}]},
    # a user turn that is a tool reply in tags does not count as the last query (Qwen3)
    {"messages": [U, {"role": "assistant", "content": "a", "reasoning_content": "first"},
                  {"role": "user", "content": "<tool_response>42</tool_response>"},
                  {"role": "assistant", "content": "b", "reasoning_content": "second"}]},
    {"messages": [U, {"role": "assistant", "content": "a", "reasoning_content": "first"},   # a query: not in both tags
                  {"role": "user", "content": "<tool_response> opens only"},
                  {"role": "assistant", "content": "b", "reasoning_content": "second"}]},
    # ends in a tool reply / a call: no assistant message last
    {"tools": [WEATHER_TOOL], "messages": [SYS, U, {"role": "assistant", "content": None, "tool_calls": [_call(1)],
                                                    "reasoning_content": "call it"},
                                           {"role": "tool", "content": "sunny", "tool_call_id": "c1"}]},
    {"tools": [WEATHER_TOOL], "messages": [U, {"role": "assistant", "content": "", "tool_calls": [_call(1)]}]},
    {"messages": [SYS, U]},                                                                    # no assistant turn
    {"messages": [U, {"role": "assistant", "content": "😀 ünïcode", "reasoning_content": "x"},
                  {"role": "tool", "content": "late tool", "tool_call_id": "c9"}]},
]
# Left to the compiler (it renders them, or raises its error): each for the reason named.
QWEN3_FALLBACKS = [{"messages": [U, {"role": "assistant", "content": "a", "reasoning_content": "\n\n"}]}]  # newlines only
FALLBACK_RECORDS = [
    {"messages": [{"role": "developer", "content": "dropped by both templates"}, U, {"role": "assistant", "content": "x"}]},
    {"messages": [{"role": "assistant", "content": "opens"}, U, {"role": "assistant", "content": "x"}]},
    {"messages": [U, {"role": "assistant", "content": "<think>inline</think>answer"}]},         # Qwen3 parses it
    {"messages": [{"role": "user", "content": "a <|im_end|> inside"}, {"role": "assistant", "content": "x"}]},
    {"messages": [U, {"role": "assistant", "content": "nul \x00 char"}]},
    {"tools": [{"type": "function", "function": {"name": 'quo"te', "parameters": {}}}], "messages": [
        U, {"role": "assistant", "content": "x"}]},
]


def edge_cases() -> list:
    return [normalize_record(r) for r in EDGE_RECORDS]


def chat_cases(family: str) -> list:
    """The family's chat cases (tests.chat_cases), with and without reasoning."""
    key = KEYS[family]
    plain = [normalize_record({"messages": [{k: v for k, v in m.items() if k not in ("reasoning_content", "thinking")}
                                            for m in r["messages"]], "tools": r.get("tools")})
             for r in family_records(key, 12, seed=3)]
    return conversations_for(key, n=40) + plain


@pytest.fixture(scope="module")
def bench_set() -> list:
    return [normalize_record(r) for r in tool_reasoning_records(BENCH_SET)]


def same_segments(fast: QwenTemplate, ref: JinjaTemplate, conv, gen: bool) -> None:
    mine, theirs = Counter(), Counter()
    assert fast.render(conv, gen, mine) == ref.render(conv, gen, theirs)
    assert mine == theirs
    assert fast.render_text(conv, gen) == ref.render_text(conv, gen)


def check_tool_set(family: str, which: str, convs) -> None:
    """As preprocessing renders them (no generation prompt), every one by the fast path."""
    ref, fast = reference(family, which), family_template(family)
    for conv in convs:
        mine, theirs = Counter(), Counter()
        assert fast.render(conv, False, mine) == ref.render(conv, False, theirs)
        assert mine == theirs
    assert fast.fallbacks == 0


@pytest.mark.quick
@pytest.mark.parametrize("family, which", REFERENCES)
def test_segments_equal_the_compiler_on_the_benchmark_tool_set_start(family, which, bench_set):
    check_tool_set(family, which, bench_set[:300])


@pytest.mark.slow
@pytest.mark.parametrize("which", ["built-in", "original"])
def test_segments_equal_the_compiler_on_the_whole_benchmark_tool_set(which, bench_set):
    """Every conversation of the benchmark's default tool set, with qwen3, the template it runs (~1 ms of
    compiling each: 4-8 s, hence not in the quick tier)."""
    check_tool_set("qwen3", which, bench_set)


@pytest.mark.quick
@pytest.mark.parametrize("family, which", REFERENCES)
def test_segments_equal_the_compiler_on_chat_and_edge_cases(family, which):
    ref, fast = reference(family, which), family_template(family)
    for conv in chat_cases(family) + edge_cases():
        for gen in (False, True):
            same_segments(fast, ref, conv, gen)
    assert fast.fallbacks == 0


def same_outcome(fast: QwenTemplate, ref: JinjaTemplate, conv) -> None:
    """The same segments, or the same error (its message after the template's name, which may differ)."""
    try:
        expected = ref.render(conv)
    except TemplateError as e:
        with pytest.raises(TemplateError) as got:
            fast.render(conv)
        assert str(got.value).split(": ", 1)[1] == str(e).split(": ", 1)[1]
    else:
        assert fast.render(conv) == expected


@pytest.mark.quick
@pytest.mark.parametrize("family, which", REFERENCES)
def test_what_it_does_not_cover_goes_to_the_compiler(family, which):
    ref, fast = reference(family, which), family_template(family)
    cases = [normalize_record(r) for r in FALLBACK_RECORDS + (QWEN3_FALLBACKS if family == "qwen3" else [])]
    # plain message lists (no schema) too: content as a list (Qwen3 renders it as '', Qwen2.5 fails)
    cases.append([U, {"role": "assistant", "content": ["not", "a", "string"]}])
    for k, conv in enumerate(cases):
        same_outcome(fast, ref, conv)
        assert fast.fallbacks == k + 1, conv


@pytest.mark.quick
@pytest.mark.parametrize("family, which", REFERENCES)
def test_ids_labels_and_parts_equal_the_compiler(family, which, bench_set):
    """Every mask mode x reasoning policy; last-turn-only, per-turn train flags and segment-by-segment
    tokenisation once each (the segments decide them all)."""
    ref, fast = reference(family, which), family_template(family)
    tok = load_tokenizer(family_tokenizer_dir(KEYS[family]))
    convs = bench_set[:20] + chat_cases(family)[:10] + edge_cases()
    flagged = [Conversation(c, c.tools, [(None, True, False)[k % 3] for k in range(len(c))]) for c in convs[::3]]
    settings = [dict(mask_mode=m, train_reasoning=p) for m in MASK_MODES for p in REASONING_POLICIES]
    settings += [dict(last_turn_only=True, train_reasoning="last"), dict(whole_text=False), dict(last_turn_only=True)]
    for k, kw in enumerate(settings):
        cases = flagged if k == len(settings) - 1 else convs
        encoders = [ChatEncoder(tok, t, **kw) for t in (fast, ref)]
        for (ids, mask, parts), (ids2, mask2, parts2) in zip(*(e.encode_parts(cases) for e in encoders)):
            assert np.array_equal(ids, ids2) and np.array_equal(mask, mask2) and np.array_equal(parts, parts2), kw
        assert encoders[0].notes == encoders[1].notes
    assert encoders[0].notes["reasoning not rendered by the template"] > 0
    prompt = [SYS, U]
    assert ChatEncoder(tok, fast).encode_prompt(prompt) == ChatEncoder(tok, ref).encode_prompt(prompt)
    assert fast.fallbacks == 0


@pytest.mark.quick
def test_recognised_templates_get_the_fast_renderer(tmp_path):
    for family in KEYS:
        builtin = get_template(family)
        assert isinstance(builtin, QwenTemplate) and builtin.thinking == (family == "qwen3")
        # the same text from a file (sandboxed fallback), with Jinja's insignificant trailing newline
        path = tmp_path / f"{KEYS[family]}.jinja"
        path.write_text(FAMILIES[family].source + "\n", encoding="utf-8")
        from_file = get_template(str(path), {"eos_token": "<|im_end|>"})
        assert isinstance(from_file, QwenTemplate) and from_file.fallback.env is not builtin.fallback.env
        assert (from_file.eot_token, from_file.required_tokens, from_file.bos_token) == \
            (builtin.eot_token, builtin.required_tokens, builtin.bos_token)
        # any other text, however close, is the compiler's
        path.write_text(FAMILIES[family].source + "{# changed #}", encoding="utf-8")
        assert isinstance(get_template(str(path), {"eos_token": "<|im_end|>"}), JinjaTemplate)
    assert not isinstance(get_template("llama3.1"), QwenTemplate)


@pytest.mark.quick
@pytest.mark.skipif(TEMPLATES is None, reason="../shared/chat_templates is absent (set MEGASFT_CHAT_TEMPLATES)")
def test_the_originals_are_recognised():
    assert {digest((TEMPLATES / f"{KEYS[f]}.jinja").read_text(encoding="utf-8")): f for f in KEYS} == ORIGINALS
    template = get_template(str(TEMPLATES / "qwen3.jinja"), {"eos_token": "<|im_end|>"})
    assert isinstance(template, QwenTemplate) and template.thinking
    assert isinstance(get_template(str(TEMPLATES / "qwen3_training.jinja"), {"eos_token": "<|im_end|>"}), JinjaTemplate)

