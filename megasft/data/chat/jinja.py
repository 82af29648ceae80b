"""Any HF Jinja chat template, compiled into labelled spans without ``{% generation %}`` tags.

The method (linear in the conversation: a fixed number of full renders, never one per prefix):

1. Render the conversation ``F`` exactly as ``transformers.apply_chat_template`` does.
2. Render it again with every assistant turn replaced by a bare sentinel ``"\\0k\\0"`` (no reasoning, no
   tool calls). Whatever the template does to an assistant turn's content, reasoning or tool calls
   happens inside the turn; the text between two sentinels is the template's own text for the
   messages in between (they did not change). Splitting at the sentinels gives those literals, and
   finding them in ``F`` in order gives each turn's span: everything between the turn's header and the
   literal that follows it is what the assistant produced. A replaced turn keeps its calls as
   ``replaced_tool_calls`` for templates that track calls across messages; a literal's leading end
   marker may be another one in ``F`` (gpt-oss ends a call with ``<|call|>``, the stand-in with ``<|end|>``).
3. The header is the generation prompt (``add_generation_prompt`` minus the prompt): text at the end of
   the literal before a turn that the sentinel render adds after it (Mistral's leading space, Qwen3's
   empty ``<think></think>`` on the last turn) is the turn's *lead*, produced by the model at inference.
4. Reasoning and tool calls are told apart from content the same way: render once with them replaced by
   sentinels and take, per turn, the difference of the two spans. One render serves both when every
   marked turn then differs by exactly its sentinel; otherwise (and for a turn with both) one render per
   field. A field whose removal changes nothing was not rendered: tool calls are then an error, reasoning
   a counted skip (Qwen3 drops reasoning from turns before the last user query by design). A part nested
   in another keeps its kind.
5. The end-of-turn part is the end marker that closes the turn, the newlines after it, and an eos
   the template appends after a final assistant turn (Phi-3).

When the template carries ``{% generation %}`` tags their spans are checked against these (an error
names the turn and both spans if they disagree); they may also cover header text, as some twins do.

This runs once per conversation *shape* (roles, fields, tool-call structure): a conversation of a shape
compiled before is rendered once and its shape's skeleton filled with its values, where that is provably the
same (:mod:`megasft.data.chat.structure`); the steps above that a value can sway report to its trace.
"""
from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from typing import Optional

from megasft.data.chat.environment import compile_template, json_memo
from megasft.data.chat.generation_tags import GENERATION_TAG, check_generation_tags
from megasft.data.chat.structure import CAPACITY, OPEN, StructureCache, Trace, Uncacheable
from megasft.data.templates import CONTENT, EOT, HEADER, LEAD, OTHER, REASONING, TOOL_CALL, ChatTemplate, \
    Segment, TemplateError

# Strings that end a turn in the families we know, longest first where one prefixes another; the tokenizer's
# eos is added per template.
END_MARKERS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>", "<|return|>", "<|call|>",
               "<｜end▁of▁sentence｜>", "<|endoftext|>", "</s>")
_SENTINEL = re.compile("\x00(\\d+)\x00")


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # binary search on the first difference: slices compare in C
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _common_suffix(a: str, b: str) -> int:
    return _common_prefix(a[::-1], b[::-1])


class JinjaTemplate(ChatTemplate):
    """Any HF ``chat_template``, rendered with jinja2 in the environment transformers uses."""

    def __init__(self, source: str, name: str, tokenizer_config: dict, trusted: bool = False,
                 shapes: int = CAPACITY) -> None:
        """``trusted``: megasft's own built-in family templates, rendered without the sandbox (its checks on
        every attribute access cost a third of a render); any other template is sandboxed, as transformers does.
        ``shapes``: conversation structures kept compiled (:mod:`megasft.data.chat.structure`; 0: compile each
        conversation in full)."""
        tokens = {k: _token_str(v) for k, v in tokenizer_config.items() if k.endswith("_token")}
        self.variables = {k: v for k, v in tokens.items() if v is not None}
        eos = self.variables.get("eos_token")
        eot = next((t for t in END_MARKERS if t in source), None) or eos
        if eot is None:
            raise TemplateError(f"{name}: cannot tell the end-of-turn token; set eos_token in the tokenizer_config.json")
        bos = self.variables.get("bos_token") if "bos_token" in source else None
        super().__init__(name, bos, eos, eot, tuple(t for t in (bos, eot) if t))
        self.source = source
        self.end_markers = tuple(sorted({*(m for m in END_MARKERS if m in source), *([eos] if eos else [])},
                                        key=len, reverse=True))
        self.has_generation_tags = bool(GENERATION_TAG.search(source))
        self.env, self.compiled = compile_template(source, trusted)
        # Per-template memos (a template's behaviour on a key, not on message text): tool lists it was seen
        # to render, and the generation prompt per role pattern of the messages before the first assistant turn.
        self._tools_rendered: set = set()
        self._headers: dict = {}
        self.structures = StructureCache(shapes if OPEN not in source else 0)   # a template writing markers itself
        self._trace: Optional[Trace] = None   # set while a skeleton compiles (structure.StructureCache._build)

    # ------------------------------------------------------------------ rendering
    def _render(self, messages, add_generation_prompt: bool, tools=None, spans: Optional[list] = None) -> str:
        import jinja2

        kwargs = dict(messages=list(messages), tools=tools, documents=None, add_generation_prompt=add_generation_prompt,
                      **self.variables)
        try:
            if spans is None:
                text = self.compiled.render(**kwargs)
                return text if self._trace is None else self._trace.canonical(text)
            blocks: list[str] = []
            self.env.generation_tracker = (blocks, spans)
            try:
                for block in self.compiled.generate(**kwargs):
                    blocks.append(block)
            finally:
                self.env.generation_tracker = None
            return "".join(blocks)
        except (jinja2.TemplateError, TypeError) as e:  # raise_exception(...), or str + dict in the template
            raise TemplateError(f"{self.name}: {type(e).__name__}: {e}") from None

    def render_text(self, messages, add_generation_prompt=False) -> str:
        return self._render(messages, add_generation_prompt, getattr(messages, "tools", None))

    def render(self, messages, add_generation_prompt=False, notes: Optional[Counter] = None) -> list[Segment]:
        tools = getattr(messages, "tools", None)
        tag_spans: Optional[list] = [] if self.has_generation_tags and not add_generation_prompt else None
        with json_memo(self.env):   # the renders below serialise the same tools and arguments
            text = self._render(messages, add_generation_prompt, tools, tag_spans)
            # A conversation of a structure compiled before: its skeleton filled and checked (one render in all).
            segs = self.structures.segments(self, messages, add_generation_prompt, text, notes)
            turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
            if segs is None:
                segs = self._compile_spans(messages, add_generation_prompt, notes, text)
                segs = [s for s in segs if s.text] if turns else segs
            if tag_spans is not None and turns:
                header = self._generation_header(messages, turns[0], tools)
                check_generation_tags(self, text, segs, tag_spans, header, messages, turns, tools)
        return segs

    def _compile_spans(self, messages, add_generation_prompt, notes, text: str) -> list[Segment]:
        """The segments of ``messages`` rendered as ``text``, empty ones included (one end-of-turn per turn)."""
        tools = getattr(messages, "tools", None)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        # (Not for a skeleton: tool names are slots there; its fills run the check on the real text.)
        if tools and self._trace is None and not self._renders_tools(text, messages, add_generation_prompt, tools):
            raise TemplateError(f"{self.name}: the record has a 'tools' list but this template does not render "
                                "tools; use the model's tool-use template (chat_template named 'tool_use') or drop 'tools'")
        if not turns:
            return [Segment(text, OTHER, -1)]
        header = self._generation_header(messages, turns[0], tools)
        literals = self._literals(messages, turns, add_generation_prompt, tools)
        spans = self._align(text, literals, header, messages, turns, tools)
        having = {key: [k for k, i in enumerate(turns) if messages[i].get(key)] for key in ("reasoning_content", "tool_calls")}
        # One render marks the reasoning of every turn and the calls of turns without reasoning; each marked
        # turn's two renders must then differ by exactly its sentinel (nothing else in the turn moved), else
        # (or for turns with both) one render per field, which keeps every other turn as it is.
        both = set(having["reasoning_content"]) & set(having["tool_calls"])
        combined = {**{k: "tool_calls" for k in having["tool_calls"] if k not in both},
                    **{k: "reasoning_content" for k in having["reasoning_content"]}}
        found = self._marked_parts(text, spans, literals, header, messages, turns, add_generation_prompt, tools,
                                   combined, exact=True) if combined else {}
        if found is None:
            found, passes = {}, [{k: key for k in ks} for key, ks in having.items() if ks]
        else:
            passes = [{k: "tool_calls" for k in both}] if both else []
        for marks in passes:
            for k, got in self._marked_parts(text, spans, literals, header, messages, turns, add_generation_prompt,
                                             tools, marks, exact=False).items():
                found.setdefault(k, []).extend(got)
        parts = {k: [] for k in range(len(turns))}   # turn -> [(start, end, kind)]
        for k, got in found.items():
            for start, end, kind in got:
                if kind == REASONING and start is None:
                    if notes is not None:
                        notes["reasoning not rendered by the template"] += 1
                elif end <= start:
                    raise TemplateError(f"{self.name}: message {turns[k]} has tool_calls but the template does "
                                        "not render them; use the model's tool-use chat template")
                else:
                    parts[k].append((start, end, kind))
        self._check_content_with_calls(text, spans, messages, turns, add_generation_prompt, tools)
        return self._segments(text, spans, parts)

    def _marked_parts(self, text, spans, literals, header, messages, turns, add_generation_prompt, tools, marks: dict,
                      exact: bool) -> Optional[dict]:
        """turn -> [(start, end, kind)] in ``text`` of the fields ``marks`` (turn -> field) names, found by one
        render with each replaced by a sentinel (start None: reasoning the template does not render). With
        ``exact``, None when a marked turn differs by more than its sentinel."""
        marked = list(messages)
        for k, key in marks.items():
            marked[turns[k]] = _marked(messages[turns[k]], key, f"\x01{k}\x01")
        other = self._render(_replace(messages, marked), add_generation_prompt, tools)
        # The sentinel literals are those of `messages`: every assistant turn is replaced there anyway.
        other_spans = self._align(other, literals, header, marked, turns, tools)
        out = {}
        for k, key in marks.items():
            (_, h, _, b), (_, h2, _, b2) = spans[k], other_spans[k]
            p = self._prefix(text[h:b], other[h2:b2])
            s = min(self._prefix(text[h:b], other[h2:b2], reverse=True), b - h - p, b2 - h2 - p)
            sentinel = f"\x01{k}\x01"
            if exact and other[h2 + p:b2 - s] != (sentinel if sentinel in other[h2:b2] else ""):
                return None
            kind = REASONING if key == "reasoning_content" else TOOL_CALL
            if kind == REASONING and sentinel not in other[h2:b2]:
                out[k] = [(None, None, kind)]
            else:
                out[k] = [(h + p, b - s, kind)]
        return out

    def _check_content_with_calls(self, text, spans, messages, turns, add_generation_prompt, tools) -> None:
        """A turn with tool calls and content whose template renders only the calls (Llama-3.1's) loses the
        content: an error, not a silent drop. One more render, only for conversations with such turns."""
        both = [k for k, i in enumerate(turns) if messages[i].get("tool_calls") and (messages[i].get("content") or "").strip()
                and messages[i]["content"].strip() not in text[spans[k][2]:spans[k][3]]]   # found verbatim: rendered
        if not both:
            return
        marked = list(messages)
        for k in both:
            marked[turns[k]] = _marked(messages[turns[k]], "content", f"\x02{k}\x02")
        text = self._render(_replace(messages, marked), add_generation_prompt, tools)
        for k in both:
            if f"\x02{k}\x02" not in text:
                raise TemplateError(f"{self.name}: message {turns[k]} has content and tool_calls but the template "
                                    "renders only the tool calls; move the content to a turn of its own or drop it")

    def _renders_tools(self, text, messages, add_generation_prompt, tools) -> bool:
        """Whether the record's tools are in ``text``: a tool name missing from it says no at once; otherwise
        one render without the tools decides, once per distinct tool list (templates render a tools list
        whenever they are given one, wherever they put it)."""
        names = [t.get("function", t).get("name") for t in tools]
        if any(isinstance(n, str) and n not in text for n in names):
            return False
        key = json.dumps(tools, sort_keys=True, default=str)
        if key not in self._tools_rendered:
            if text == self._render(messages, add_generation_prompt, None):
                return False
            self._tools_rendered.add(key)
        return True

    def _generation_header(self, messages, first_turn: int, tools) -> str:
        """The text add_generation_prompt appends: the assistant header the model is prompted with. It depends
        on the roles before the turn, not on their text (true of every family's template): memoised by them."""
        prefix = messages[:first_turn]
        key = (tuple((m["role"], bool(m.get("tool_calls"))) for m in prefix), bool(tools))
        if key not in self._headers:
            header = self._compute_header(prefix, tools)
            if self._trace is not None and OPEN in header:
                raise Uncacheable("a generation prompt holding message text")
            self._headers[key] = header
        return self._headers[key]

    def _compute_header(self, prefix, tools) -> str:
        with_prompt = self._render(prefix, True, tools)
        without = self._render(prefix, False, tools)
        if with_prompt.startswith(without):
            return with_prompt[len(without):]
        eos = self.eos_token  # Phi-3 ends a conversation rendered for training with eos, not a prompt
        if eos and without.endswith(eos) and with_prompt.startswith(without[:-len(eos)]):
            return with_prompt[len(without) - len(eos):]
        return ""

    def _literals(self, messages, turns, add_generation_prompt, tools) -> list[str]:
        marked = list(messages)
        for k, i in enumerate(turns):
            marked[i] = _sentinel_turn(messages[i], f"\x00{k}\x00")
        try:
            parts = _SENTINEL.split(self._render(marked, add_generation_prompt, tools))
        except TemplateError as e:
            raise TemplateError(f"{e} — raised only with each assistant turn replaced by plain text, which this "
                                "template refuses (its role checks branch on tool_calls, as Mistral's do): masks of "
                                "this conversation cannot be compiled; drop its tool calls or use a template without "
                                "that check") from None
        if parts[1::2] != [str(k) for k in range(len(turns))]:
            raise TemplateError(f"{self.name}: the template does not render every assistant turn once, in order "
                                f"(turns {parts[1::2]} of {len(turns)}); masks cannot be placed")
        return parts[0::2]

    def _align(self, text, literals, header, messages, turns, tools) -> list[tuple[int, int, int, int]]:
        """(header start, header end, body start, body end) of each assistant turn in ``text``.

        Each literal before a turn is split where that turn's header starts: the part before it (the
        previous turn's end and the messages in between) must appear verbatim; the header and lead after
        it are matched as far as the real rendering agrees (a template may render the header differently
        for a turn with tool calls, as DeepSeek-V3's does for every call after the first)."""
        cuts = [self._header_start(lit, header, messages[:i], tools) for lit, i in zip(literals[:-1], turns)]
        out, pos = [], 0
        for k, (lit, (j, header_len)) in enumerate(zip(literals, cuts)):
            stable = lit[:j]
            found, start = self._find_stable(text, stable, pos)
            if found != pos:
                raise TemplateError(f"{self.name}: rendered text does not align with the template's text before "
                                    f"assistant message {turns[k]} (char {pos}); masks cannot be placed")
            c = self._prefix(text[start:start + len(lit) - j], lit[j:])
            h, a = start + min(c, header_len), start + c
            if k + 1 < len(cuts):
                b, _ = self._find_stable(text, literals[k + 1][:cuts[k + 1][0]], a)
                if b < 0:
                    raise TemplateError(f"{self.name}: cannot find where assistant message {turns[k]} ends")
            else:
                b = len(text) - min(self._prefix(text[a:], literals[-1], reverse=True), len(text) - a)
            out.append((start, h, a, b))
            pos = b
        return out

    def _prefix(self, a: str, b: str, reverse: bool = False) -> int:
        """The common prefix (suffix) of ``a`` and ``b``, its stop traced while a skeleton compiles."""
        c = _common_suffix(a, b) if reverse else _common_prefix(a, b)
        if self._trace is not None:
            self._trace.stop(a, b, c, reverse)
        return c

    def _find_stable(self, text: str, stable: str, pos: int) -> tuple[int, int]:
        """(start, end) of the first occurrence of ``stable`` in ``text`` from ``pos``, or (-1, -1). A leading
        end marker may be another one there: the plain-text stand-in of a turn ends as a reply does, the real
        turn may not (gpt-oss closes a tool call with <|call|>, a reply with <|end|>)."""
        found = self._first_stable(text, stable, pos)
        if self._trace is not None:
            self._trace.find(text, stable, pos, found)
        return found

    def _first_stable(self, text: str, stable: str, pos: int) -> tuple[int, int]:
        j = text.find(stable, pos)
        best = (j, j + len(stable)) if j >= 0 else (-1, -1)
        marker = next((m for m in self.end_markers if stable.startswith(m)), None)
        rest = stable[len(marker):] if marker else ""
        if rest:
            i = text.find(rest, pos)
            while i >= 0 and (best[0] < 0 or i < best[0]):
                other = next((m for m in self.end_markers if text.endswith(m, pos, i)), None)
                if other is not None:
                    return i - len(other), i + len(rest)
                i = text.find(rest, i + 1)
        return best

    def _header_start(self, literal: str, header: str, prefix, tools) -> tuple[int, int]:
        """(where the turn's header starts in ``literal``, its length)."""
        if header:
            for n in range(len(header), 2, -1):  # the whole generation prompt, or the longest leading part of it
                j = literal.rfind(header[:n], max(0, len(literal) - len(header) - 64))
                if j >= 0:
                    return self._traced_start(literal, j, header, n)
            return self._traced_start(literal, len(literal), header, 0)
        # No generation prompt (Mistral): the turn starts where the messages before it end.
        rendered = self._render(prefix, False, tools)
        return self._traced_start(literal, self._after_messages(rendered, literal), rendered, None)

    @staticmethod
    def _after_messages(rendered: str, literal: str) -> int:
        """Where in ``literal`` the rendering of the messages before a turn, ``rendered``, ends."""
        for n in (64, 32, 16, 8):
            tail = rendered[-n:]
            if tail and (j := literal.rfind(tail)) >= 0:
                return j + len(tail)
        return len(literal)

    def _traced_start(self, literal: str, j: int, prompt: str, n: Optional[int]) -> tuple[int, int]:
        """(j, n or 0); while a skeleton compiles, a search for a turn's start that a value may decide is traced:
        a part of the generation ``prompt`` (``n`` characters; a longer one may be in a value, the whole one
        cannot), or the tail of the ``prompt`` rendering of the messages before the turn (``n`` None)."""
        if self._trace is not None:
            if OPEN in literal[j:]:
                raise Uncacheable("a value after where a turn starts")
            if n is None or n < len(prompt):
                self._trace.start(literal, prompt, len(literal) - j, n)
        return j, n or 0

    def _segments(self, text, spans, parts) -> list[Segment]:
        segs, pos = [], 0
        for k, (g, h, a, b) in enumerate(spans):
            segs.append(Segment(text[pos:g], OTHER, -1))
            segs.append(Segment(text[g:h], HEADER, -1))
            segs.append(Segment(text[h:a], LEAD, k))
            # Paint the body: content, then the parts widest first, so a part inside another keeps its kind
            # (gpt-oss renders a call turn's reasoning inside what its calls add: the analysis message).
            kinds = [CONTENT] * (b - a)
            for start, end, kind in sorted(parts[k], key=lambda p: p[0] - p[1]):
                kinds[max(start, a) - a:max(min(end, b), a) - a] = [kind] * (max(min(end, b), a) - max(start, a))
            cur = a
            for kind, run in itertools.groupby(kinds):
                n = len(list(run))
                segs.append(Segment(text[cur:cur + n], kind, k))
                cur += n
            end = self._end_of_turn(text, b)
            segs.append(Segment(text[b:end], EOT, k))
            pos = end
        segs.append(Segment(text[pos:], OTHER, -1))
        return segs

    def _end_of_turn(self, text: str, b: int) -> int:
        marker = next((m for m in self.end_markers if text.startswith(m, b)), None)
        if marker is None:
            return b
        end = b + len(marker)
        while end < len(text) and text[end] == "\n":
            end += 1
        eos = self.eos_token
        if eos and eos != marker and text.endswith(eos) and end == len(text) - len(eos):
            end = len(text)  # an eos the template appends after a final assistant turn
        return end


def _replace(messages, new: list):
    """``new`` messages with the record-level tools of ``messages`` (a Conversation or a plain list)."""
    from megasft.data.chat.schema import Conversation

    return Conversation(new, getattr(messages, "tools", None))


def _marked(message: dict, key: str, sentinel: str) -> dict:
    """``message`` with its reasoning replaced by ``sentinel`` (the rendered reasoning is then exactly where
    the two renders differ), or its tool calls dropped and ``sentinel`` appended to its content (the calls'
    whole rendering, tags included, is where they differ; the sentinel keeps the boundary unambiguous)."""
    out = dict(message)
    if key == "reasoning_content":
        out["reasoning_content"] = out["thinking"] = sentinel
    elif key == "content":
        out["content"] = sentinel
    else:
        out["replaced_tool_calls"] = out.pop("tool_calls")
        out["content"] = (out.get("content") or "") + sentinel
    return out


def _sentinel_turn(message: dict, sentinel: str) -> dict:
    """An assistant turn replaced by plain text. Its tool calls, if any, are kept as ``replaced_tool_calls``:
    templates ignore the key, except those that track calls across messages (a role-alternation check that
    skips tool-call turns, a tool reply named after the last call), which can read it and render the text
    around the turn as they do with the calls (megasft's built-in Mistral and gpt-oss templates do)."""
    out = {"role": "assistant", "content": sentinel}
    if message.get("tool_calls"):
        out["replaced_tool_calls"] = message["tool_calls"]
    return out


def _token_str(value) -> Optional[str]:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None
