"""A per-template cache of compiled conversation *structures*: one Jinja render per conversation instead of the
mask compiler's three or four, with the same segments.

Conversations of one *shape* (the message roles, the fields each message has, tool-call and tools structure,
which strings are empty: everything but the text and the numbers) render to text whose template-owned parts
are the same. So the compiler (:mod:`megasft.data.chat.jinja`) runs once per shape on a conversation whose
strings and numbers are *slots*: sentinels ``\\ue000<n>"\\ue001`` (a string; the quote tells a raw insertion from
a JSON-escaped one, ``\\"``) and numbers no text holds (rewritten to ``\\ue000<n>#\\ue001`` in what it renders).
The resulting segments, each a list of template text and slot references, form the shape's *skeleton*.

A new conversation of that shape is rendered once, for real, and its skeleton filled with its own values. The
fill is used when it is provably what the full compile gives for this conversation:

- the filled segments join to exactly the real rendering (the template put each value where the sentinel was,
  unchanged: no trim, no ``<think>`` split, no branch on a value — else the full compile runs);
- every decision the compiler took on the skeleton that a value could change comes out the same with the
  values: where a common prefix or suffix of two renders stopped at a slot's edge, the value's edge
  character differs from the other side's as the sentinel's did; every search for a template's text between
  two turns finds it at the same place in the filled text; the end-of-turn text is recomputed on the real
  rendering; the tools check runs on it;
- no value holds the compiler's sentinel characters or the slot markers.

What this leaves assumed is what the compiler's own memos assume (a template's own text depends on the roles
and fields, not on message text): that the compiler's other renders — each assistant turn replaced by
plain text, each reasoning / tool-call field by a sentinel — are their skeleton renders filled with the
values, as the one checked real rendering is. A shape whose compile raises, or takes a value-sensitive step
the fill cannot replay (a generation prompt only partly found, a template without one, a stop inside a
slot), is marked as not cacheable and always compiled in full.

Bounded: at most ``capacity`` skeletons (least recently used evicted) and ``4 * capacity`` shapes counted
before their second sighting (a skeleton is built only for a shape seen twice, so a set of distinct shapes
costs one dictionary look-up per conversation, not a second compile). A skeleton whose fill keeps failing
(values the template transforms) is dropped after ``2 * hits + 4`` failures.
"""
from __future__ import annotations

import itertools
import json
import math
import re
from collections import Counter, OrderedDict
from typing import Optional

from megasft.data.templates import EOT, Segment

OPEN, CLOSE = "\ue000", "\ue001"
CAPACITY = 256
# A slot in a rendering: raw string, JSON-escaped string, or number (after canonical()).
_MARKER = re.compile(OPEN + r'(\d+)(\\"|"|#)' + CLOSE)
# Number sentinels: 77 / 88, the slot in 8 digits, 000 (and .5 for a float); never adjacent to other digits.
_INT_BASE, _FLOAT_BASE, _STEP = 77 * 10 ** 11, 88 * 10 ** 11, 1000
_NUMBER = re.compile(r"(?<![\d.])(77|88)(\d{8})000(\.5)?(?![\d.])")
# Values holding these are compiled in full: the compiler's own sentinels (\x00-\x02) and the slot markers.
_FORBIDDEN = ("\x00", "\x01", "\x02", OPEN, CLOSE)
# Strings templates branch on, part of the shape rather than slots: roles, JSON-schema types and required
# property names (compared with the properties' keys: gpt-oss writes `name?:` for an optional one).
LITERAL_KEYS = frozenset({"role", "type", "required"})
_SLOT = "S"
RAW, JSON, NUMBER = '"', '\\"', "#"


class Uncacheable(Exception):
    """Raised while compiling a skeleton at a step whose outcome a value could change in a way the fill
    cannot check: the shape is compiled in full."""


# ---------------------------------------------------------------------------------------------- shapes
def shape(messages, tools, add_generation_prompt: bool) -> Optional[tuple[tuple, list]]:
    """(shape key, slot values in walk order), or None for a conversation the cache does not take."""
    tools_shape = shape_of_tools(tools)
    return None if tools_shape is None else shape_with(messages, tools_shape, add_generation_prompt)


def shape_of_tools(tools) -> Optional[tuple[list, list]]:
    key, values = [], []
    return (key, values) if _walk(tools, key, values, None) and _allowed(values) else None


def shape_with(messages, tools_shape: tuple[list, list], add_generation_prompt: bool) -> Optional[tuple[tuple, list]]:
    key, values = [add_generation_prompt, *tools_shape[0]], list(tools_shape[1])
    n = len(values)
    if not (_walk(list(messages), key, values, None) and _allowed(values[n:])):
        return None
    return tuple(key), values


def _allowed(values: list) -> bool:
    text = "".join([v for v in values if type(v) is str])
    return not any(c in text for c in _FORBIDDEN)   # a substring test per character: ten times a regex's speed


def _walk(obj, key: list, values: list, name) -> bool:
    """Append ``obj``'s structure to ``key`` and its slots to ``values``; False for what no slot can stand for
    (a NaN or infinity, an object). Written for speed: it runs on every conversation."""
    t = type(obj)
    if t is str:
        if obj and name not in LITERAL_KEYS:
            key.append(_SLOT)
            values.append(obj)
        else:
            key.append(("s", obj))
    elif t is dict:
        key.append("{")
        for k, v in obj.items():
            key.append(k)
            if type(v) is str and v and k not in LITERAL_KEYS:   # the common leaf, without a call
                key.append(_SLOT)
                values.append(v)
            elif type(k) is not str or not _walk(v, key, values, k):
                return False
        key.append("}")
    elif t is list or t is tuple:
        key.append("[")
        for v in obj:
            if not _walk(v, key, values, name):   # a list's strings are named by its key: "required": [...]
                return False
        key.append("]")
    elif obj is None or t is bool:
        key.append(obj)
    elif t is int or (t is float and math.isfinite(obj)):
        key.append(t)
        values.append(obj)
    else:
        return False
    return True


def sentinels(obj, counter: list, name=None):
    """``obj`` with each slot (in :func:`shape`'s walk order) replaced by its sentinel."""
    t = type(obj)
    if t is str:
        return f'{OPEN}{_next(counter)}"{CLOSE}' if obj and name not in LITERAL_KEYS else obj
    if t is int or t is float:
        n = _next(counter)
        return _INT_BASE + _STEP * n if t is int else _FLOAT_BASE + _STEP * n + 0.5
    if t is dict:
        return {k: sentinels(v, counter, k) for k, v in obj.items()}
    if t is list or t is tuple:
        return [sentinels(v, counter, name) for v in obj]
    return obj   # None, a bool


def _next(counter: list) -> int:
    counter[0] += 1
    return counter[0] - 1


# ---------------------------------------------------------------------------------------------- pieces
def pieces(s: str) -> tuple:
    """``s`` as template text and (slot, form) references; Uncacheable if it cuts a marker."""
    out, pos = [], 0
    for m in _MARKER.finditer(s):
        if m.start() > pos:
            out.append(s[pos:m.start()])
        out.append((int(m[1]), m[2]))
        pos = m.end()
    if pos < len(s):
        out.append(s[pos:])
    if any(isinstance(p, str) and (OPEN in p or CLOSE in p or "\\ue000" in p) for p in out):
        raise Uncacheable("a marker cut or transformed")   # (the last: written by tojson's ensure_ascii)
    return tuple(out)


def _rendered(value, form: str) -> str:
    """A slot's value as the template wrote the sentinel: raw, JSON-escaped (tojson), or a number."""
    if form == RAW:
        return value
    if form == JSON:
        # what json.dumps(ensure_ascii=False) escapes: '"', '\\' and control characters (never printable)
        plain = '"' not in value and "\\" not in value and value.isprintable()
        return value if plain else json.dumps(value, ensure_ascii=False)[1:-1]
    return repr(value)   # int and finite float: what str(), jinja and json.dumps give


# ---------------------------------------------------------------------------------------------- tracing
class Trace:
    """What a skeleton's compile did that a value could change: stops of common prefixes / suffixes at a
    slot's edge, and searches whose text holds slots (each is replayed on the filled text)."""

    def __init__(self) -> None:
        self.stops: list = []    # [(edge a, edge b)]: the characters there must differ after the fill
        self.finds: list = []    # [(pieces before the match, pieces of the match, pieces of the needle)]
        # Where a turn's header starts in the text before it: [(pieces of that text, the generation prompt or
        # the pieces of the messages' rendering before the turn, that place from the end, the length of the
        # prompt's part found there, None for the messages' rendering)].
        self.starts: list = []

    @staticmethod
    def canonical(text: str) -> str:
        """A skeleton rendering with its number sentinels written as markers."""
        return _NUMBER.sub(lambda m: f"{OPEN}{int(m[2])}#{CLOSE}", text)

    def stop(self, a: str, b: str, c: int, reverse: bool) -> None:
        edges = (_edge(a, c, reverse), _edge(b, c, reverse))
        if any(isinstance(e, tuple) for e in edges):
            self.stops.append(edges)

    def start(self, literal: str, prompt: str, from_end: int, n) -> None:
        self.starts.append((pieces(literal), prompt if n is not None else pieces(prompt), from_end, n))

    def find(self, text: str, needle: str, pos: int, found: tuple[int, int]) -> None:
        # Found where the search starts: the filled needle is there too, and nothing starts before it.
        if found[0] < 0 or found == (pos, pos + len(needle)):
            return
        before, match = text[pos:found[0]], text[found[0]:found[1]]
        if any(OPEN in s or CLOSE in s for s in (before, match, needle)):
            self.finds.append((pieces(before), pieces(match), pieces(needle)))


def _edge(s: str, c: int, reverse: bool):
    """What stands at the stop ``c`` of a common prefix (suffix when ``reverse``) of ``s``: None past its end,
    a template character, or (slot, form, 0 | -1) for a slot's first / last character."""
    i = len(s) - 1 - c if reverse else c
    if not 0 <= i < len(s):
        return None
    prev_open, prev_close = s.rfind(OPEN, 0, i + 1), s.rfind(CLOSE, 0, i)
    next_close, next_open = s.find(CLOSE, i), s.find(OPEN, i + 1)
    inside = prev_open > prev_close or (next_close >= 0 and (next_open < 0 or next_close < next_open))
    if not inside:
        return s[i]
    if not reverse and s[i] == OPEN and (m := _MARKER.match(s, i)):
        return int(m[1]), m[2], 0
    if reverse and s[i] == CLOSE and prev_open >= 0 and (m := _MARKER.fullmatch(s, prev_open, i + 1)):
        return int(m[1]), m[2], -1
    raise Uncacheable("a common prefix or suffix stops inside a slot")


# ---------------------------------------------------------------------------------------------- skeletons
class Skeleton:
    """A shape's compiled segments as format strings over the slots' rendered values (``{i}``: ``slots[i]``)."""

    def __init__(self, segs: list[Segment], trace: Trace, notes: Counter) -> None:
        self.refs: dict = {}   # (slot, form) -> argument index
        self.segs = [self._compile(pieces(s.text)) for s in segs]   # (format string or text, whether it has slots)
        self.kinds, self.turns = [s.kind for s in segs], [s.turn for s in segs]
        self.eots = [i for i, s in enumerate(segs) if s.kind == EOT]   # one per turn, empty or not
        self.stops = [tuple(e if not isinstance(e, tuple) else (self.refs.setdefault(e[:2], len(self.refs)), e[2])
                            for e in edges)
                      for edges in dict.fromkeys(trace.stops)]
        # a needle is mostly the text it matched: None then
        self.finds = [(self._compile(before), self._compile(match), None if needle == match else self._compile(needle))
                      for before, match, needle in dict.fromkeys(trace.finds)]
        self.starts = [(self._compile(lit), prompt if n is not None else self._compile(prompt), from_end, n)
                       for lit, prompt, from_end, n in dict.fromkeys(trace.starts)]
        self.slots = list(self.refs)
        self.notes = notes
        self.hits = self.misses = 0

    def _compile(self, ps: tuple) -> tuple[str, bool]:
        """(format string, True) of pieces with slots, else (their text, False)."""
        if all(isinstance(p, str) for p in ps):
            return "".join(ps), False
        return "".join(p.replace("{", "{{").replace("}", "}}") if isinstance(p, str) else
                       "{%d}" % self.refs.setdefault(p, len(self.refs)) for p in ps), True

    def fill(self, template, values: list, text: str) -> Optional[list[Segment]]:
        """The conversation's segments, or None where the full compile must decide (see the module doc)."""
        args = [values[n] if form == RAW else _rendered(values[n], form) for n, form in self.slots]

        def filled(compiled: tuple[str, bool]) -> str:
            return compiled[0].format(*args) if compiled[1] else compiled[0]

        texts = [fmt.format(*args) if has_slots else fmt for fmt, has_slots in self.segs]
        if "".join(texts) != text:
            return None
        for a, b in self.stops:
            if (args[a[0]][a[1]] if type(a) is tuple else a) == (args[b[0]][b[1]] if type(b) is tuple else b):
                return None
        for before, match, needle in self.finds:
            head, body = filled(before), filled(match)
            if template._first_stable(head + body, body if needle is None else filled(needle), 0) != \
                    (len(head), len(head) + len(body)):
                return None
        for literal, prompt, from_end, n in self.starts:
            literal = filled(literal)
            if n is not None:
                j, m = template._header_start(literal, prompt, None, None)
            else:   # no generation prompt: the rendering of the messages before the turn
                j, m = template._after_messages(filled(prompt), literal), None
            if (len(literal) - j, m) != (from_end, n):
                return None
        starts = list(itertools.accumulate(map(len, texts), initial=0))
        if any(template._end_of_turn(text, starts[e]) != starts[e + 1] for e in self.eots):
            return None
        return [Segment._make(seg) for seg in zip(texts, self.kinds, self.turns) if seg[0]]


class StructureCache:
    """Skeletons per shape for one template (see the module doc); ``capacity`` 0 turns it off."""

    def __init__(self, capacity: int = CAPACITY, build_on: int = 2) -> None:
        self.capacity, self.build_on = capacity, build_on
        self.skeletons: OrderedDict = OrderedDict()   # shape -> Skeleton, or None: compiled in full
        self.seen: dict = {}
        self.stats = Counter()
        self._tools: tuple = (None, None)   # the last tools list and its shape: a dataset's tools often repeat

    def segments(self, template, messages, add_generation_prompt: bool, text: str,
                 notes: Optional[Counter]) -> Optional[list[Segment]]:
        """The segments of ``messages`` (rendered: ``text``) from its shape's skeleton, or None."""
        if not self.capacity or not any(m.get("role") == "assistant" for m in messages):
            return None
        tools = getattr(messages, "tools", None)
        if tools is None or tools != self._tools[0]:   # an equal list's values are its values (the fill checks)
            self._tools = (tools, shape_of_tools(tools))
        got = self._tools[1] and shape_with(messages, self._tools[1], add_generation_prompt)
        if got is None:
            self.stats["not a shape"] += 1
            return None
        key, values = got
        if key in self.skeletons:
            skeleton = self.skeletons[key]
            self.skeletons.move_to_end(key)
        else:
            self.seen[key] = self.seen.get(key, 0) + 1
            if self.seen[key] < self.build_on:
                if len(self.seen) > 4 * self.capacity:
                    self.seen.clear()
                return None
            del self.seen[key]
            skeleton = self._build(template, messages, add_generation_prompt)
            self.skeletons[key] = skeleton
            if len(self.skeletons) > self.capacity:
                self.skeletons.popitem(last=False)
        if skeleton is None:
            self.stats["not cacheable"] += 1
            return None
        segs = skeleton.fill(template, values, text)
        if segs is None:
            skeleton.misses += 1
            self.stats["fill rejected"] += 1
            if skeleton.misses > 2 * skeleton.hits + 4:
                del self.skeletons[key]
            return None
        if tools and not template._renders_tools(text, messages, add_generation_prompt, tools):
            return None
        skeleton.hits += 1
        self.stats["filled"] += 1
        if notes is not None:
            notes.update(skeleton.notes)
        return segs

    def _build(self, template, messages, add_generation_prompt: bool) -> Optional[Skeleton]:
        from megasft.data.chat.schema import Conversation

        counter = [0]   # slots numbered as shape() walks: the tools, then the messages
        tools = getattr(messages, "tools", None)
        stand_in_tools = sentinels(tools, counter) if tools is not None else None
        stand_in = Conversation(sentinels(list(messages), counter), stand_in_tools)
        trace, notes = Trace(), Counter()
        template._trace = trace
        try:
            text = template._render(stand_in, add_generation_prompt, stand_in.tools)
            segs = template._compile_spans(stand_in, add_generation_prompt, notes, text)
            skeleton = Skeleton(segs, trace, notes)
        except Exception as e:   # TemplateError, Uncacheable, or whatever else a template does with a stand-in
            self.stats[f"skeletons refused ({type(e).__name__}: {str(e)[:80]})"] += 1
            return None
        finally:
            template._trace = None
        self.stats["skeletons"] += 1
        return skeleton
