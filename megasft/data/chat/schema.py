"""The conversation record schema: OpenAI-style ``messages`` with tool calls, tool replies, reasoning,
``content: null`` or a list of text parts, a record-level ``tools`` list and per-turn ``train`` flags.

:func:`normalize_record` turns one record into a :class:`Conversation`: the messages exactly as a chat
template should see them (the same dicts ``transformers.apply_chat_template`` is given) plus what is not
for the template (the per-message train flags). Nothing is dropped silently: an unknown message field,
a malformed tool call or a non-text content part is a :class:`SchemaError`.
"""
from __future__ import annotations

import json
from typing import Optional

ROLES = ("system", "developer", "user", "assistant", "tool", "ipython")
REASONING_KEYS = ("reasoning_content", "thinking")
MESSAGE_KEYS = frozenset({"role", "content", "tool_calls", "tool_call_id", "name", "train", "weight",
                          *REASONING_KEYS})


class SchemaError(ValueError):
    """A record that does not follow the schema: ``reason`` is a short category, ``detail`` the specifics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class Conversation(list):
    """The messages (a list, so code that takes a message list keeps working) plus the record's
    ``tools`` (JSON-schema function specs handed to the template) and one train flag per message:
    True / False from the record's ``train`` or ``weight``, None where the mask mode decides."""

    def __init__(self, messages, tools: Optional[list] = None, train: Optional[list] = None) -> None:
        super().__init__(messages)
        self.tools = tools
        self.train = list(train) if train is not None else [None] * len(self)


def normalize_record(obj: dict) -> Conversation:
    """``{"messages": [...], "tools": [...]?}`` -> Conversation; raises SchemaError."""
    raw = obj.get("messages")
    if not isinstance(raw, list) or not raw:
        raise SchemaError("malformed record", "'messages' must be a non-empty list")
    tools = obj.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise SchemaError("malformed tools", "'tools' must be a list of JSON-schema objects "
                                             '({"type": "function", "function": {"name": ..., "parameters": ...}})')
    messages, train = [], []
    for i, m in enumerate(raw):
        message, flag = normalize_message(m, i)
        messages.append(message)
        train.append(flag)
    return Conversation(messages, tools or None, train)


def normalize_message(m, i: int) -> tuple[dict, Optional[bool]]:
    """One message -> (the dict the template sees, its train flag)."""
    if not isinstance(m, dict):
        raise SchemaError("malformed record", f"turn {i} is not an object")
    role = m.get("role")
    if role not in ROLES:
        raise SchemaError("unknown role", f"turn {i} role {role!r}; valid: {list(ROLES)}")
    unknown = sorted(set(m) - MESSAGE_KEYS)
    if unknown:
        raise SchemaError("unknown field", f"turn {i} has {unknown}; known fields: {sorted(MESSAGE_KEYS)} "
                                           "(rename it, or remove it if the template should not see it)")
    out = {"role": role, "content": _content(m.get("content"), i, role, bool(m.get("tool_calls")))}
    if m.get("tool_calls") is not None:
        if role != "assistant":
            raise SchemaError("misplaced tool_calls", f"turn {i} is {role!r}; only assistant turns call tools")
        out["tool_calls"] = [_tool_call(c, i, k) for k, c in enumerate(_list(m["tool_calls"], i, "tool_calls"))]
    for key in ("tool_call_id", "name"):
        if key in m:
            if not isinstance(m[key], str):
                raise SchemaError("malformed record", f"turn {i} {key} must be a string, got {type(m[key]).__name__}")
            out[key] = m[key]
    reasoning = next((m[k] for k in REASONING_KEYS if m.get(k) is not None), None)
    if reasoning is not None:
        if role != "assistant" or not isinstance(reasoning, str):
            raise SchemaError("malformed reasoning", f"turn {i}: reasoning_content/thinking must be a string "
                                                     "on an assistant turn")
        # Both names, as transformers passes them: Qwen3/DeepSeek templates read reasoning_content, gpt-oss thinking.
        out["reasoning_content"] = out["thinking"] = reasoning
    return out, _train_flag(m, i, role)


def _list(value, i: int, key: str) -> list:
    if not isinstance(value, list):
        raise SchemaError("malformed record", f"turn {i} {key} must be a list, got {type(value).__name__}")
    return value


def _content(content, i: int, role: str, has_tool_calls: bool):
    """A string, None (an assistant turn that only calls tools) or a list of text parts, joined."""
    if content is None:
        if role == "assistant" and has_tool_calls:
            return None  # kept as None: templates test `content is none` (DeepSeek) and render accordingly
        raise SchemaError("missing content", f"turn {i} ({role}) has content null; only an assistant turn with "
                                             "tool_calls may have no content")
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type", "text") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise SchemaError("non-text content", f"turn {i} content part {k} is {kind!r}; only "
                                                      '{"type": "text", "text": ...} parts are supported')
            texts.append(part["text"])
        return "".join(texts)
    if not isinstance(content, str):
        raise SchemaError("non-string content", f"turn {i} content is {type(content).__name__}")
    return content


def _tool_call(call, i: int, k: int) -> dict:
    """OpenAI format ``{"id"?, "type": "function", "function": {"name", "arguments"}}``; arguments may be
    an object or a JSON string and are passed to the template as an object (what HF templates expect)."""
    where = f"turn {i} tool_calls[{k}]"
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise SchemaError("malformed tool call", f'{where} must be {{"type": "function", "function": '
                                                 '{"name": str, "arguments": object or JSON string}}')
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            raise SchemaError("malformed tool call", f"{where} arguments is not valid JSON ({e.msg} at column "
                                                     f"{e.colno}); pass an object or a JSON string") from None
    if not isinstance(args, dict):
        raise SchemaError("malformed tool call", f"{where} arguments must be a JSON object, got {type(args).__name__}")
    out = {"type": call.get("type", "function"), "function": {"name": fn["name"], "arguments": args}}
    if "id" in call:
        out["id"] = call["id"]
    return out


def _train_flag(m: dict, i: int, role: str) -> Optional[bool]:
    """``train: true|false`` or axolotl's ``weight: 0|1``; None when neither is given."""
    flag = None
    if "train" in m:
        if not isinstance(m["train"], bool):
            raise SchemaError("malformed train flag", f"turn {i} train must be true or false, got {m['train']!r}")
        flag = m["train"]
    if "weight" in m:
        if m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
            raise SchemaError("malformed train flag", f"turn {i} weight must be 0 or 1, got {m['weight']!r}")
        if flag is not None and flag != bool(m["weight"]):
            raise SchemaError("malformed train flag", f"turn {i} has train={m['train']} and weight={m['weight']}")
        flag = bool(m["weight"])
    if flag and role != "assistant":
        raise SchemaError("malformed train flag", f"turn {i} is {role!r} with train=true; only assistant turns are "
                                                  "trained (system, user and tool text is never a target)")
    return flag
