"""The conversation schema, template loading and the mask policy on small templates written here (they
always run): tool calls, content null, reasoning dropped from history, per-turn train flags — including
the three failures issue 14 quotes."""
from __future__ import annotations

import json

import pytest

from megasft.data.chat.schema import normalize_record
from megasft.data.formats import DataError, parse_line
from megasft.data.templates import CONTENT, EOT, HEADER, OTHER, REASONING, TOOL_CALL, ChatEncoder, TemplateError, \
    get_template
from megasft.data.tokenizer import load_tokenizer
from tests.chat_cases import family_tokenizer_dir

pytestmark = pytest.mark.quick

# ChatML with tool calls as JSON blocks and Qwen3-style reasoning: shown only on the turns after the last
# user message, so the template transforms what it is given.
TOOLS_JINJA = (
    "{% set ns = namespace(last=0) %}{% for m in messages %}{% if m.role == 'user' %}{% set ns.last = loop.index0 %}"
    "{% endif %}{% endfor %}{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t | tojson }}{% endfor %}"
    "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' %}{% if m.reasoning_content and loop.index0 > ns.last %}<think>\n"
    "{{ m.reasoning_content }}\n</think>\n\n{% endif %}{{ (m.content or '') | trim }}{% for c in m.tool_calls or [] %}"
    "<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}{% else %}{{ m.content }}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

CALL = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
RECORD = {"tools": [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}],
          "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+2?"},
                       {"role": "assistant", "content": None, "tool_calls": [CALL], "reasoning_content": "use add"},
                       {"role": "tool", "content": "3", "tool_call_id": "c1"},
                       {"role": "assistant", "content": [{"type": "text", "text": " It is "}, {"type": "text", "text": "3."}],
                        "thinking": "the tool said 3"}]}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """The shared test tokenizer, saved the way current transformers saves it: template in chat_template.jinja,
    no chat_template key in tokenizer_config.json."""
    out = tmp_path_factory.mktemp("tok")
    src = family_tokenizer_dir("qwen3")
    (out / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}), encoding="utf-8")
    (out / "chat_template.jinja").write_text(TOOLS_JINJA, encoding="utf-8")
    return out


def parts(template, conv):
    return [(s.text, s.kind, s.turn) for s in template.render(conv)]


def test_schema_normalizes_what_users_have():
    conv = normalize_record(RECORD)
    assert conv[2]["content"] is None and conv[2]["tool_calls"][0]["function"]["arguments"] == {"a": 1, "b": 2}
    assert conv[2]["reasoning_content"] == conv[2]["thinking"] == "use add"
    assert conv[4]["content"] == " It is 3." and conv[4]["reasoning_content"] == "the tool said 3"
    assert conv.tools == RECORD["tools"] and conv.train == [None] * 5


@pytest.mark.parametrize("message, error", [
    ({"role": "user", "content": None}, "missing content: turn 0 (user) has content null"),
    ({"role": "assistant", "content": "x", "foo": 1}, "unknown field: turn 0 has ['foo']"),
    ({"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]},
     "malformed tool call: turn 0 tool_calls[0] arguments is not valid JSON"),
    ({"role": "user", "content": [{"type": "image", "url": "x"}]}, "non-text content: turn 0 content part 0 is 'image'"),
    ({"role": "user", "content": "x", "train": True}, "malformed train flag: turn 0 is 'user' with train=true"),
    ({"role": "assistant", "content": "x", "weight": 2}, "malformed train flag: turn 0 weight must be 0 or 1"),
], ids=["null-user", "unknown-field", "bad-arguments", "image-part", "train-user", "weight-2"])
def test_schema_errors_name_turn_and_rule(message, error):
    with pytest.raises(DataError) as e:
        parse_line(json.dumps({"messages": [message, {"role": "assistant", "content": "y"}]}).encode(), "f.jsonl", 7)
    assert str(e.value).startswith(f"f.jsonl:7: {error}")


def test_content_null_with_tool_calls_is_accepted_and_the_call_is_trained(tok_dir):
    """Was: content null rejected; content "" kept with the tool call silently dropped."""
    conv = parse_line(json.dumps(RECORD).encode(), "f", 1)
    template = get_template("jinja", load_tokenizer(tok_dir).config)
    got = [(t, k) for t, k, _ in parts(template, conv) if k not in (OTHER, HEADER)]
    assert [t for t, k, _ in parts(template, conv) if k == HEADER] == ["<|im_start|>assistant\n"] * 2
    assert got == [("<think>\n", CONTENT), ("use add", REASONING), ("\n</think>\n\n", CONTENT),
                   ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>', TOOL_CALL),
                   ("<|im_end|>\n", EOT), ("<think>\n", CONTENT), ("the tool said 3", REASONING),
                   ("\n</think>\n\nIt is 3.", CONTENT), ("<|im_end|>\n", EOT)]
    with pytest.raises(TemplateError, match="template 'llama3' does not render the record's 'tools'"):
        get_template("llama3").render(conv)
    with pytest.raises(TemplateError, match="template 'llama3' renders plain text turns only; message 2 has tool_calls"):
        get_template("llama3").render(list(conv))
    empty = normalize_record({"messages": [{"role": "user", "content": "hi"},
                                           {"role": "assistant", "content": "", "tool_calls": [CALL]}]})
    with pytest.raises(TemplateError, match="message 1 has tool_calls but the template does not render them"):
        get_template(str(_plain_chatml(tok_dir))).render(empty)


def _plain_chatml(tok_dir):
    path = tok_dir / "plain.jinja"
    path.write_text("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}",
                    encoding="utf-8")
    return path


def test_tokenizer_dir_with_chat_template_jinja_loads(tok_dir):
    """Was: "tokenizer_config.json has no chat_template string"."""
    tok = load_tokenizer(tok_dir, "jinja")
    assert tok.eot_id == tok.token_to_id("<|im_end|>")
    assert get_template(str(tok_dir)).source == TOOLS_JINJA


def test_named_template_list(tmp_path):
    config = {"eos_token": "<|im_end|>", "chat_template": [{"name": "default", "template": "{{ 'A' }}<|im_end|>"},
                                                            {"name": "tool_use", "template": TOOLS_JINJA}]}
    path = tmp_path / "tokenizer_config.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    assert get_template(str(path)).source.startswith("{{ 'A' }}")
    assert get_template(f"{path}@tool_use").source == TOOLS_JINJA
    with pytest.raises(TemplateError, match=r"has no chat template named 'nope'; it has \['default', 'tool_use'\]"):
        get_template(f"{path}@nope")


def test_tools_the_template_does_not_render_are_an_error(tok_dir):
    conv = normalize_record({**RECORD, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    with pytest.raises(TemplateError, match="has a 'tools' list but this template does not render tools"):
        get_template(str(_plain_chatml(tok_dir))).render(conv)


@pytest.mark.parametrize("policy, expected", [
    ("all", ["use add", "the tool said 3"]), ("last", ["the tool said 3"]), ("none", [])], ids=["all", "last", "none"])
def test_train_reasoning_policy(tok_dir, policy, expected):
    tok = load_tokenizer(tok_dir, "jinja")
    enc = ChatEncoder(tok, get_template("jinja", tok.config), train_reasoning=policy)
    conv = normalize_record(RECORD)
    (ids, mask, kinds), = enc.encode_parts([conv])
    trained_reasoning = tok.decode(ids[(kinds % 8 == REASONING) & (mask == 1)].tolist())
    assert trained_reasoning == "".join(expected)


def test_per_turn_train_flags_override_the_mode(tok_dir):
    tok = load_tokenizer(tok_dir, "jinja")
    template = get_template("jinja", tok.config)
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "first", "train": True},
            {"role": "user", "content": "b"}, {"role": "assistant", "content": "second", "weight": 0},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "third"}]
    conv = normalize_record({"messages": msgs})
    ids, mask = ChatEncoder(tok, template, "completion_eot", last_turn_only=True).encode(conv)
    assert tok.decode(ids[mask == 1].tolist()) == "first<|im_end|>\nthird<|im_end|>\n"
    ids, mask = ChatEncoder(tok, template, "all").encode(conv)
    assert "second" not in tok.decode(ids[mask == 1].tolist())


def test_history_reasoning_the_template_drops_is_counted(tok_dir):
    tok = load_tokenizer(tok_dir, "jinja")
    enc = ChatEncoder(tok, get_template("jinja", tok.config))
    conv = normalize_record({"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning_content": "r1"},
        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d", "reasoning_content": "r2"}]})
    ids, mask = enc.encode(conv)
    assert tok.decode(ids[mask == 1].tolist()) == "b<|im_end|>\n<think>\nr2\n</think>\n\nd<|im_end|>\n"
    assert enc.notes == {"reasoning not rendered by the template": 1}


def test_compiling_is_linear_in_turns(tok_dir):
    """A fixed number of full renders per conversation, whatever its length (no per-prefix rendering)."""
    template = get_template("jinja", load_tokenizer(tok_dir).config)
    template.structures.capacity = 0   # the full compile (test_data_chat_structure checks the cache's one render)
    calls = []
    original = template._render
    template._render = lambda *a, **k: (calls.append(len(a[0])), original(*a, **k))[1]
    for turns in (4, 50, 50):
        calls.clear()
        msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}",
                 **({"reasoning_content": "r"} if i % 4 == 1 else {}),
                 **({"tool_calls": [CALL], "content": None} if i % 4 == 3 else {})} for i in range(turns)]
        template.render(normalize_record({"messages": msgs}))
        full = [n for n in calls if n == turns]
        # text, sentinels, reasoning and calls marked in one; the first prompt's two renders, memoised by its
        # roles after the first conversation
        assert len(full) == 3 and len(calls) == (5 if turns == 4 else 3)
