"""The Jinja environment chat templates are rendered in: transformers' (sandboxed, trim/lstrip blocks, its
``tojson`` / ``raise_exception`` / ``strftime_now``, ``{% generation %}`` spans recorded on request), made
cheaper for the mask compiler, which renders a conversation three or four times (once when its shape is
cached: :mod:`megasft.data.chat.structure`):

- the sandbox's per-access safety check is memoised: its answer depends only on the object's type and the
  attribute name (``jinja2.sandbox.is_internal_attribute`` and ``modifies_known_mutable`` test isinstance and
  the name), and the check was ~40% of a render (profiled);
- ``tojson`` results are memoised within one compile of a conversation (:func:`json_memo`): the three renders
  serialise the same tools list and call arguments (~13% of a tool-calling conversation's compile);
- ``message.content`` on a plain dict reads the key at once: jinja first tries the attribute and catches the
  AttributeError (an exception per field access: reading the key first makes a render ~20% cheaper); a name that is no attribute of ``dict``
  gives the same value or undefined either way;
- megasft's own family templates (``trusted``) skip the sandbox.
"""
from __future__ import annotations

import contextlib
import json
from datetime import datetime

_DICT_ATTRIBUTES = frozenset(dir(dict))


def compile_template(source: str, trusted: bool = False):
    """(environment, compiled template) for ``source``; ``trusted`` drops the sandbox (megasft's own templates)."""
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            out = caller()
            tracker = getattr(self.environment, "generation_tracker", None)
            if tracker is not None:  # as transformers does: the span starts at the text generated so far
                blocks, spans = tracker
                start = len("".join(blocks))
                spans.append((start, start + len(out)))
            return out

    class DictFields:
        def getattr(self, obj, attribute):
            if type(obj) is dict and attribute not in _DICT_ATTRIBUTES:
                try:
                    return obj[attribute]
                except KeyError:
                    return self.undefined(obj=obj, name=attribute)
            return super().getattr(obj, attribute)

    class Trusted(DictFields, jinja2.Environment):
        pass

    class Sandbox(DictFields, ImmutableSandboxedEnvironment):
        def __init__(self, **kw):
            super().__init__(**kw)
            self._safe: dict = {}

        def is_safe_attribute(self, obj, attr, value) -> bool:
            key = (type(obj), attr)
            ok = self._safe.get(key)
            if ok is None:
                ok = self._safe[key] = super().is_safe_attribute(obj, attr, value)
            return ok

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = (Trusted if trusted else Sandbox)(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.json_memo = None

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        memo = env.json_memo
        key = (id(x), ensure_ascii, indent, separators, sort_keys)
        if memo is not None and key in memo and memo[key][0] is x:
            return memo[key][1]
        out = json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
        if memo is not None and isinstance(x, (dict, list)):
            memo[key] = (x, out)   # holding x keeps its id from being reused while the memo lives
        return out

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.generation_tracker = None
    return env, env.from_string(source)


@contextlib.contextmanager
def json_memo(env):
    """Memoise ``tojson`` while compiling one conversation: its messages are not modified meanwhile (the
    compiler's marked copies are new dicts sharing the unchanged values)."""
    outer = env.json_memo
    if outer is None:
        env.json_memo = {}
    try:
        yield
    finally:
        if outer is None:
            env.json_memo = None
