"""The structure cache of the Jinja mask compiler (megasft.data.chat.structure): a conversation filled into
its shape's compiled skeleton gets exactly the segments, notes and errors of the full compile, on every
built-in family template and every real template of ../shared/chat_templates (originals and training twins),
over the family chat cases, the benchmark's tool-calling + reasoning set and copies of both whose values
carry whitespace, end markers and tags at their edges (which templates trim, split or confuse with their own
text: there the fill must be refused, and the full compile decides). Also: one render per conversation of a
known shape, the refusals, and the cache's size bound."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from megasft.data.chat.families import FAMILIES
from megasft.data.chat.jinja import JinjaTemplate
from megasft.data.chat.schema import normalize_record
from megasft.data.chat.structure import StructureCache
from megasft.data.templates import MASK_MODES, ChatEncoder, TemplateError
from megasft.data.tokenizer import load_tokenizer
from tests.chat_cases import TOKENS, WEATHER_TOOL, chat_templates_dir, family_records, family_tokenizer_dir, \
    tool_reasoning_records, with_tricky_values

pytestmark = pytest.mark.quick
TEMPLATES = chat_templates_dir()
# built-in family -> the tests.chat_cases records it renders
CASES = {"llama3.1": "llama3_1", "qwen2.5": "qwen2_5", "qwen3": "qwen3", "mistral": "mistral",
         "mistral-tekken": "mistral", "gemma": "gemma", "gemma3": "gemma", "phi3": "phi3", "phi4": "phi3",
         "deepseek-v3": "deepseekv3", "gpt-oss": "qwen3"}
SHARED = sorted(p.stem for p in TEMPLATES.glob("*.jinja")) if TEMPLATES else []
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}<think>\n"
          "{{ m.reasoning_content or '' }}\n</think>\n\n{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def pair(source: str, name: str, tokens: dict, trusted: bool = False, **cache) -> tuple[JinjaTemplate, JinjaTemplate]:
    """(the template with a structure cache that builds a skeleton at a shape's first sighting, the full compile)."""
    fast = JinjaTemplate(source, name, tokens, trusted)
    fast.structures = StructureCache(**{"build_on": 1, **cache})
    return fast, JinjaTemplate(source, name, tokens, trusted, shapes=0)


def outcome(template: JinjaTemplate, conv, gen: bool):
    notes = Counter()
    try:
        return template.render(conv, add_generation_prompt=gen, notes=notes), notes
    except TemplateError as e:
        return str(e)


def assert_same(fast: JinjaTemplate, full: JinjaTemplate, records: list[dict], gens=(False, True)) -> None:
    for record in records:
        conv = normalize_record(record)
        for gen in gens:
            assert outcome(fast, conv, gen) == outcome(full, conv, gen), (fast.name, gen, record)


def corpus(family: str, n: int) -> list[dict]:
    records = family_records(family, n, seed=3)
    if family == "qwen3":   # also the benchmark's conversations (tools, reasoning on call turns)
        records += tool_reasoning_records(n, seed=1)
    return records + with_tricky_values(records, seed=7)


@pytest.mark.parametrize("family", sorted(CASES))
def test_fills_equal_the_full_compile_on_the_built_in_families(family):
    fast, full = pair(FAMILIES[family].source, family, FAMILIES[family].tokens(), trusted=True)
    assert_same(fast, full, corpus(CASES[family], 10))
    assert fast.structures.stats["filled"] >= 4, fast.structures.stats   # the fill is what was tested


@pytest.mark.skipif(TEMPLATES is None, reason="../shared/chat_templates is absent (set MEGASFT_CHAT_TEMPLATES)")
@pytest.mark.parametrize("stem", SHARED)
def test_fills_equal_the_full_compile_on_the_real_templates(stem):
    family = stem.removesuffix("_training")
    bos, eos = TOKENS[family]
    fast, full = pair((TEMPLATES / f"{stem}.jinja").read_text(encoding="utf-8"), stem, {"bos_token": bos, "eos_token": eos})
    assert_same(fast, full, corpus(family, 10))
    # DeepSeek-V3's original renders only call-free chats and cuts the inline <think> out of a reply: each fill
    # of these cases is refused (the equality is what is checked there)
    assert fast.structures.stats["filled"] >= (0 if stem == "deepseekv3" else 4), fast.structures.stats


def test_the_benchmark_set_through_an_unrecognised_template():
    """The benchmark's "Jinja compiler" row: Qwen3's text that the plain-Python renderer does not claim, sandboxed,
    with the cache as it runs (a skeleton at a shape's second sighting): all of its 200 first conversations give the
    same segments, hence the same ids, labels and parts under every mask mode, the fill taking most of them (the
    set has 39 shapes: 1-3 questions, 0-2 calls each)."""
    source = FAMILIES["qwen3"].source + "{#- not Qwen's text -#}"
    fast, full = pair(source, "unrecognised", FAMILIES["qwen3"].tokens(), build_on=2)
    records = tool_reasoning_records(200)
    assert_same(fast, full, records, gens=(False,))
    assert fast.structures.stats["filled"] >= 120 and fast.structures.stats["fill rejected"] == 0, fast.structures.stats
    tok = load_tokenizer(family_tokenizer_dir("qwen3"))
    convs = [normalize_record(r) for r in records[:40]]
    for mode in MASK_MODES:
        encoded = [ChatEncoder(tok, t, mode).encode_many(convs) for t in (fast, full)]
        for (ids, mask), (ids_ref, mask_ref) in zip(*encoded):
            assert np.array_equal(ids, ids_ref) and np.array_equal(mask, mask_ref)


def simple(expression: str) -> str:
    """A ChatML-like template writing each message's content as the Jinja ``expression`` over ``m``."""
    return ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ " + expression + " }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# name -> (template, a text it renders verbatim, one it does not)
TRANSFORMS = {
    "trim": (simple("m.content | trim"), "Yes.", " Yes. "),
    "upper": (simple("m.content | upper"), "YES 42.", "Yes."),
    "truncate": (simple("m.content[:6]"), "Yes.", "Yes, indeed."),
    "branch on a value": (simple("'No!' if m.content == 'no' else m.content"), "Yes.", "no"),
    # a user message's length: a sentinel has 4 characters (and so do AND? and Yes.)
    "a value's length": (simple("m.content ~ (' (' ~ (m.content | length) ~ ')' if m.role == 'user' else '')"),
                         "Yes.", "Yes!!"),
    # the lead: a reasoning opening with the newline the empty think block has there would move the compiled lead
    "lead": (CHATML, "plan", "\nplan"),
    # the reply holds the template's text up to the next turn: the search for the turn's end stops early
    "next turn in a value": (CHATML, "Yes.", "Yes.<|im_end|>\n<|im_start|>user\nAND?<|im_end|>\n"),
}


@pytest.mark.parametrize("name", TRANSFORMS)
def test_values_the_template_transforms_are_compiled_in_full(name):
    source, filled, refused = TRANSFORMS[name]
    fast, full = pair(source, name, {"eos_token": "<|im_end|>"})
    filled_then_refused(fast, full, filled, refused, lambda text: [
        {"role": "user", "content": text}, {"role": "assistant", "content": text, "reasoning_content": text},
        {"role": "user", "content": "AND?"}, {"role": "assistant", "content": "DONE"}])


def filled_then_refused(fast, full, filled: str, refused: str, messages) -> None:
    """The conversation ``messages(filled)`` is filled, ``messages(refused)`` (the same shape) refused; both as
    the full compile has them."""
    for text, stat in ((filled, "filled"), (refused, "fill rejected")):
        before = fast.structures.stats[stat]
        assert_same(fast, full, [{"messages": messages(text)}], gens=(False,))
        assert fast.structures.stats[stat] == before + 1, (fast.name, stat, fast.structures.stats)


# name -> (template, its tokens, a question the compile's search is not swayed by, one it is)
SEARCHES = {
    # the newlines after an end marker are the turn's: a message written right after it that opens with one
    "end of turn": ("{% for m in messages %}{% if m.role == 'assistant' %}<|im_start|>assistant\n{{ m.content }}"
                    "<|im_end|>{% else %}{{ m.content }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
                    "<|im_start|>assistant\n{% endif %}", {"eos_token": "<|im_end|>"}, "More?", "\nMore?"),
    # DeepSeek-R1's generation prompt ends in <think>\n, which a reply does not have: the longest part of it found
    # before a turn is its start, unless a message holds the whole
    "partial generation prompt": (FAMILIES["deepseek-v3"].source, FAMILIES["deepseek-v3"].tokens(), "More?",
                                  "More?<｜Assistant｜><think>\nR"),
    # no generation prompt: a turn starts where the rendering of the messages before it ends, found by its tail
    "no generation prompt": ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% if loop.last %}[END]{% endif %}"
                             "{% endfor %}", {"eos_token": "</s>"}, "More?", "[END][END]"),
}


@pytest.mark.parametrize("name", SEARCHES)
def test_values_the_compilers_searches_meet_are_compiled_in_full(name):
    source, tokens, filled, refused = SEARCHES[name]
    fast, full = pair(source, name, tokens)
    filled_then_refused(fast, full, filled, refused, lambda text: [
        {"role": "user", "content": "Well?"}, {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": text}, {"role": "assistant", "content": "Done."}])


def test_numbers_nested_arguments_and_escaped_strings_are_slots():
    """Ints and floats in tool arguments are slots too (the sentinel is a number), lists and objects nest, True /
    False / None are part of the shape, and a JSON-rendered string is filled JSON-escaped."""
    fast, full = pair(FAMILIES["qwen3"].source, "qwen3", FAMILIES["qwen3"].tokens(), trusted=True)
    records = [{"tools": [WEATHER_TOOL], "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": {"city": city, "days": days, "scale": scale, "flags": [True, None, days],
                                                 "where": {"lat": -scale, "note": note}}}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"}, {"role": "assistant", "content": "Sunny."}]}
        for city, days, scale, note in (("Oslo", 3, 1.5, "plain"), ("Zürich", -12, 0.25, 'say "hi"\n\\ok'),
                                        ("Lima", 10 ** 12, 3.0, "tab\there"))]
    assert_same(fast, full, records)
    assert fast.structures.stats["filled"] == 6 and len(fast.structures.skeletons) == 2   # with / without the prompt


def test_one_render_per_conversation_of_a_known_shape():
    """The full compile renders a conversation three times (four with both reasoning and calls); once its shape
    has a skeleton (built at its second sighting, by default), a conversation is rendered once."""
    template = JinjaTemplate(FAMILIES["qwen3"].source, "qwen3", FAMILIES["qwen3"].tokens(), trusted=True)
    calls = []
    original = template._render
    template._render = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
    counts = []
    for record in tool_reasoning_records(80, seed=5):
        conv = normalize_record(record)
        if len(conv) == 7 and sum(bool(m.get("tool_calls")) for m in conv) == 2:   # one shape: 2 calls, 1 answer
            calls.clear()
            template.render(conv)
            counts.append(len(calls))
    assert len(counts) >= 3 and min(counts[:2]) >= 3 and counts[2:] == [1] * (len(counts) - 2), counts


def test_shapes_the_cache_does_not_take():
    """No generation prompt and a 9-character id check (Mistral's tool calls: the sentinel ids fail it), values
    holding the compiler's sentinel characters, and a template writing the slot markers itself: full compiles."""
    fast, full = pair(FAMILIES["mistral"].source, "mistral", FAMILIES["mistral"].tokens(), trusted=True)
    call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "abcdefghi", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}
    assert_same(fast, full, [{"tools": [WEATHER_TOOL], "messages": [
        {"role": "user", "content": "weather?"}, call, {"role": "tool", "content": "sunny", "tool_call_id": "abcdefghi"},
        {"role": "assistant", "content": "Sunny."}]}], gens=(False,))
    assert fast.structures.stats["not cacheable"] == 1
    assert_same(fast, full, [{"messages": [{"role": "user", "content": "a\x00b"}, {"role": "assistant", "content": "c"}]}],
                gens=(False,))
    assert fast.structures.stats["not a shape"] == 1
    assert JinjaTemplate(CHATML + "{# \ue000 #}", "markers", {"eos_token": "<|im_end|>"}).structures.capacity == 0


def test_generation_tags_are_checked_on_a_filled_conversation():
    source = ("{% for m in messages %}{% if m.role == 'assistant' %}<|im_start|>assistant\n{% generation %}"
              "{{ m.content }}{% endgeneration %}<|im_end|>\n{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}"
              "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fast, _ = pair(source, "tags", {"eos_token": "<|im_end|>"})
    for reply in ("yo", "hey"):
        with pytest.raises(TemplateError, match="generation %} spans .* disagree"):
            fast.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}])
    assert fast.structures.stats["filled"] == 2


def test_the_cache_is_bounded():
    """At most ``capacity`` skeletons (least recently used evicted) and ``4 * capacity`` shapes counted before their
    second sighting; the segments stay the full compile's."""
    fast, full = pair(CHATML, "bounded", {"eos_token": "<|im_end|>"}, capacity=3, build_on=2)
    for turns in range(1, 21):   # 20 shapes, each seen twice in a row: its second sighting builds a skeleton
        record = {"messages": [m for k in range(turns) for m in ({"role": "user", "content": f"q{k}"},
                                                                 {"role": "assistant", "content": f"a{k}"})]}
        assert_same(fast, full, [record, record], gens=(False,))
        assert len(fast.structures.skeletons) <= 3
    assert fast.structures.stats["skeletons"] == 20 and fast.structures.stats["filled"] == 20
    for turns in range(1, 40):   # each seen once: counted, never built
        assert_same(fast, full, [{"messages": [{"role": "user", "content": "q"}] * turns}], gens=(False,))
        assert len(fast.structures.seen) <= 4 * 3
    assert fast.structures.stats["skeletons"] == 20


def test_a_skeleton_whose_fills_keep_failing_is_dropped():
    fast, full = pair(CHATML, "dropped", {"eos_token": "<|im_end|>"})
    records = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a",
                                                                "reasoning_content": reasoning}]}
               for reasoning in ["plan"] + ["\nplan"] * 7]   # one fill, then refusals (the lead: see above)
    assert_same(fast, full, records, gens=(False,))
    assert fast.structures.stats["filled"] == 1 and fast.structures.stats["fill rejected"] == 7
    assert not fast.structures.skeletons   # dropped after 2 * 1 + 4 refusals, at the 7th
