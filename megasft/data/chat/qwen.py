"""Qwen2.5 / Qwen3 chat templates in plain Python: the segments the Jinja mask compiler
(:mod:`megasft.data.chat.jinja`) gives for the family's template, without its three renders and their
alignment (the compile was ~60 % of the CPU time of preprocessing a tool-calling + reasoning chat, profiled).

Used for megasft's built-in ``qwen2.5`` / ``qwen3`` and for any template whose text is one of theirs or of
the originals Qwen ships (recognised by digest: the same text renders the same). A conversation outside
what this renderer is written for goes to the Jinja compiler of the same template, which renders it or
raises its error: roles other than system / user / assistant / tool (the templates drop them silently),
a conversation opening with an assistant turn, text holding the template's own markers (``<|im_start|>``,
its end markers, ``<think>`` / ``</think>``: Qwen3 parses reasoning out of content holding them) or the
compiler's sentinel characters, reasoning that is only newlines, tool calls or tool names not in the
schema's form. tests/test_data_chat_fast_qwen.py checks the segments equal the compiler's, on the original
and the built-in templates.

What the compiler attributes, written out (Qwen3; Qwen2.5 is the same without reasoning): the header is
the generation prompt ``<|im_start|>assistant\\n``; a turn rendered with a think block (after the last user
query, with reasoning or as the last message) is ``<think>\\n`` (content), the reasoning, ``\\n</think>\\n\\n``
+ content (content); the last message's ``<think>\\n`` (or its whole empty block) is its lead, because the
generation prompt of a plain turn in that place renders it too; tool calls, with the newline that joins
them to the content, are the tool-call part; ``<|im_end|>\\n`` ends the turn.
"""
from __future__ import annotations

import hashlib
import json
from typing import Optional

from megasft.data.chat.jinja import JinjaTemplate
from megasft.data.templates import CONTENT, EOT, HEADER, LEAD, OTHER, REASONING, TOOL_CALL, ChatTemplate, Segment

QWEN2_5, QWEN3 = "qwen2.5", "qwen3"
# sha256 (see digest) of the templates Qwen ships: ../shared/chat_templates/qwen2_5.jinja and qwen3.jinja
# (the tests check these against the files).
ORIGINALS = {"55b2f4a26ac9ee719330a61a0c39d9e538b0e9322212f048326318cff4f8674a": QWEN2_5,
             "a55ee1b1660128b7098723e0abcd92caa0788061051c62d51cbe87d9cf1974d8": QWEN3}

ASSISTANT_HEADER = "<|im_start|>assistant\n"
END = "<|im_end|>\n"
EMPTY_THINK = "<think>\n\n</think>\n\n"
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
TOOLS_HEAD = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
              "function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
              "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
              "<args-json-object>}\n</tool_call>" + END)
ROLES = frozenset({"system", "user", "assistant", "tool"})
NOT_RENDERED = "reasoning not rendered by the template"
_json = json.JSONEncoder(ensure_ascii=False).encode   # tojson's output; one encoder, not one per call


def digest(source: str) -> str:
    # Jinja drops one trailing newline of a template: with or without it the text renders the same.
    return hashlib.sha256((source[:-1] if source.endswith("\n") else source).encode("utf-8")).hexdigest()


def family_of(source: str) -> Optional[str]:
    """``qwen2.5`` / ``qwen3`` when ``source`` is that family's original or megasft built-in template, else None."""
    from megasft.data.chat.families import FAMILIES

    known = {**ORIGINALS, **{digest(FAMILIES[name].source): name for name in (QWEN2_5, QWEN3)}}
    return known.get(digest(source))


def accelerated(template: JinjaTemplate) -> ChatTemplate:
    """The plain-Python renderer for a recognised Qwen template (``template`` its fallback), else ``template``."""
    family = family_of(template.source)
    return QwenTemplate(template, thinking=family == QWEN3) if family else template


def _call_json(call) -> Optional[str]:
    """``{"name": ..., "arguments": ...}`` as both templates write a schema-form call; None for another form."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), dict):
        return None
    return '{"name": "' + fn["name"] + '", "arguments": ' + _json(fn["arguments"]) + "}"


class QwenTemplate(ChatTemplate):
    """Qwen2.5 (``thinking=False``) or Qwen3 rendered in Python; ``fallback`` renders what this does not cover."""

    def __init__(self, fallback: JinjaTemplate, thinking: bool) -> None:
        super().__init__(fallback.name, fallback.bos_token, fallback.eos_token, fallback.eot_token,
                         fallback.required_tokens)
        self.fallback, self.source, self.thinking = fallback, fallback.source, thinking
        # `in` per marker: 9 us on a 1.6 kB tool chat, a regex alternation 73 us (measured)
        self._unsafe = ("<|im_start|>", "<think>", "</think>", *fallback.end_markers, "\x00", "\x01", "\x02")
        self.fallbacks = 0
        """Conversations handed to the Jinja compiler (the tests check the benchmark's never are)."""

    def render(self, messages, add_generation_prompt=False, notes=None):
        segs = self._segments(messages, add_generation_prompt, notes)
        if segs is None:
            self.fallbacks += 1
            return self.fallback.render(messages, add_generation_prompt, notes)
        return segs

    def render_text(self, messages, add_generation_prompt=False) -> str:
        segs = self._segments(messages, add_generation_prompt, None)
        if segs is None:
            return self.fallback.render_text(messages, add_generation_prompt)
        return "".join(s.text for s in segs)

    def _segments(self, messages, add_generation_prompt: bool, notes) -> Optional[list[Segment]]:
        """The compiler's segments, or None where the fallback must render."""
        if not messages or messages[0].get("role") == "assistant":
            return None
        given: list[str] = []   # the record's own text, checked for the template's markers at once
        tools = getattr(messages, "tools", None)
        tools_text = ""
        if tools:
            if not all(isinstance(t, dict) and isinstance(t.get("function", t), dict) for t in tools):
                return None
            dumped = [_json(t) for t in tools]
            tools_text = TOOLS_HEAD + "".join("\n" + d for d in dumped) + TOOLS_TAIL
            if any(isinstance(name, str) and name not in tools_text for name in (t.get("function", t).get("name")
                                                                                  for t in tools)):
                return None   # a name JSON escapes: the compiler reports the tools as not rendered
            given += dumped
        n = len(messages)
        first_system = messages[0].get("role") == "system"
        if first_system and not isinstance(messages[0].get("content"), str):
            return None
        other: list[str] = []   # template text since the last assistant turn
        if self.thinking:
            if tools:
                other += ["<|im_start|>system\n", messages[0]["content"] + "\n\n" if first_system else "", tools_text]
            elif first_system:
                other.append("<|im_start|>system\n" + messages[0]["content"] + END)
        else:
            system = messages[0]["content"] if first_system else DEFAULT_SYSTEM
            other.append("<|im_start|>system\n" + system + ("\n\n" + tools_text if tools else END))
        last_query = n - 1   # Qwen3 renders reasoning only after the last user message that is not a tool reply
        if self.thinking:
            for i in range(n - 1, -1, -1):
                c = messages[i].get("content")
                if messages[i].get("role") == "user" and isinstance(c, str) and not (
                        c.startswith("<tool_response>") and c.endswith("</tool_response>")):
                    last_query = i
                    break
        segs: list[Segment] = []
        dropped = turn = 0
        for i, m in enumerate(messages):
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                return None
            if role != "assistant":
                if not isinstance(content, str):
                    return None
                given.append(content)
                if role == "tool":
                    if i == 0 or messages[i - 1].get("role") != "tool":
                        other.append("<|im_start|>user")
                    other.append("\n<tool_response>\n" + content + "\n</tool_response>")
                    if i == n - 1 or messages[i + 1].get("role") != "tool":
                        other.append(END)
                elif role == "user" or i > 0:
                    other.append("<|im_start|>" + role + "\n" + content + END)
                continue
            calls = m.get("tool_calls") or []
            if not (isinstance(content, str) or (content is None and calls)):
                return None
            content = content or ""
            reasoning = m.get("reasoning_content")
            if reasoning is not None and not isinstance(reasoning, str):
                return None
            call_texts = [_call_json(c) for c in calls]
            if None in call_texts:
                return None
            given += [content, reasoning or "", *call_texts]
            if self.thinking:
                body, lead, rendered = self._qwen3_body(content, reasoning or "", i > last_query, i == n - 1)
                if body is None:
                    return None
                # the first call follows the content on a new line, each further call too
                calls_text = "".join(("\n" if k or content else "") + "<tool_call>\n" + t + "\n</tool_call>"
                                     for k, t in enumerate(call_texts))
            else:
                body, lead, rendered = [(content, CONTENT)], "", False
                calls_text = "".join("\n<tool_call>\n" + t + "\n</tool_call>" for t in call_texts)
                if not content:   # the header's newline is the one before the first call
                    calls_text = calls_text[1:]
            dropped += bool(reasoning) and not rendered
            if other:
                segs.append(Segment("".join(other), OTHER, -1))
                other = []
            segs.append(Segment(ASSISTANT_HEADER, HEADER, -1))
            if lead:
                segs.append(Segment(lead, LEAD, turn))
            for text, kind in body + [(calls_text, TOOL_CALL)]:
                if not text:
                    continue
                if segs[-1].turn == turn and segs[-1].kind == kind:
                    segs[-1] = Segment(segs[-1].text + text, kind, turn)
                else:
                    segs.append(Segment(text, kind, turn))
            segs.append(Segment(END, EOT, turn))
            turn += 1
        given_text = "\n".join(given)
        if any(marker in given_text for marker in self._unsafe):
            return None
        if add_generation_prompt:
            other.append(ASSISTANT_HEADER)
        if not segs:
            return [Segment("".join(other), OTHER, -1)]
        if other:
            segs.append(Segment("".join(other), OTHER, -1))
        if notes is not None and dropped:
            notes[NOT_RENDERED] += dropped
        return segs

    @staticmethod
    def _qwen3_body(content: str, reasoning: str, after_query: bool, last: bool):
        """(body pieces [(text, kind)], lead, reasoning rendered?) of a Qwen3 assistant turn without its calls;
        body None for reasoning of newlines only (rendered as an empty block: left to the compiler)."""
        if not (after_query and (last or reasoning)):
            return [(content, CONTENT)], "", False
        if not reasoning:   # the last message without reasoning: the empty block is its lead
            return [(content.lstrip("\n"), CONTENT)], EMPTY_THINK, False
        shown = reasoning.strip("\n")
        if not shown:
            return None, "", False
        tail = ("\n</think>\n\n" + content.lstrip("\n"), CONTENT)
        if last:
            return [(shown, REASONING), tail], "<think>\n", True
        return [("<think>\n", CONTENT), (shown, REASONING), tail], "", True
