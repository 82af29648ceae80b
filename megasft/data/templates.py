"""Chat templates rendered as labelled text segments, and the ids + loss mask they encode to.

A template turns a conversation into a list of :class:`Segment` (text, kind, turn). The joined text
is exactly what ``transformers``' ``apply_chat_template(..., tokenize=False)`` returns for the same
template; ``kind`` says which pieces are assistant content or its end-of-turn token. The mask follows
the segments: with HF tokenizers the whole text is tokenised once and each token is placed by its
character offset; with sentencepiece each segment is tokenised on its own. Either way the cost is
linear in the number of turns (no re-tokenising of prefixes). Segment boundaries sit at special
tokens or at the newline after a role header, both pre-tokenizer split points of BPE tokenizers
(Llama-3, Qwen), so both ways give the same ids (tested).

Built-ins (plain Python, no Jinja, fast): ``llama3`` (the Meta-Llama-3-Instruct template; Llama-3.1's
template additionally injects a dated system header: use its tokenizer_config.json for that) and
``chatml``. Any HF ``chat_template`` is supported through :class:`JinjaTemplate`.
"""
from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np

ROLES = ("system", "user", "assistant", "tool")
MASK_MODES = ("all", "completion", "completion_eot")

OTHER, CONTENT, EOT = 0, 1, 2  # segment kinds

# The chat_template of Meta-Llama-3-8B-Instruct's tokenizer_config.json, which Llama3Template reproduces
# without Jinja (benchmarks compare against transformers rendering it).
LLAMA3_HF_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


class TemplateError(ValueError):
    """A template that cannot be rendered or aligned with its messages."""


class Segment(NamedTuple):
    text: str
    kind: int  # OTHER | CONTENT (assistant content) | EOT (the end-of-turn token after it)
    turn: int  # index of the assistant turn for CONTENT/EOT, -1 otherwise


@dataclass
class ChatTemplate:
    """Base: subclasses implement :meth:`render`."""

    name: str
    bos_token: Optional[str]
    eos_token: Optional[str]
    eot_token: str
    required_tokens: tuple[str, ...]

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> list[Segment]:
        raise NotImplementedError

    def render_text(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        return "".join(s.text for s in self.render(messages, add_generation_prompt))


class Llama3Template(ChatTemplate):
    """``<|begin_of_text|>`` then per message ``<|start_header_id|>ROLE<|end_header_id|>\\n\\nCONTENT<|eot_id|>``
    (content stripped, as the HF template's ``| trim`` does)."""

    def __init__(self) -> None:
        super().__init__("llama3", "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>",
                         ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))

    def render(self, messages, add_generation_prompt=False):
        segs = [Segment(self.bos_token, OTHER, -1)]
        turn = 0
        for m in messages:
            # Role headers and end-of-turn markers are their own segments: identical across turns and
            # conversations, so ChatEncoder tokenises them once (see its cache).
            segs.append(Segment(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n", OTHER, -1))
            if m["role"] == "assistant":
                segs += [Segment(m["content"].strip(), CONTENT, turn), Segment("<|eot_id|>", EOT, turn)]
                turn += 1
            else:
                segs += [Segment(m["content"].strip(), OTHER, -1), Segment("<|eot_id|>", OTHER, -1)]
        if add_generation_prompt:
            segs.append(Segment("<|start_header_id|>assistant<|end_header_id|>\n\n", OTHER, -1))
        return segs


class ChatMLTemplate(ChatTemplate):
    """``<|im_start|>ROLE\\nCONTENT<|im_end|>\\n`` per message; no BOS."""

    def __init__(self) -> None:
        super().__init__("chatml", None, None, "<|im_end|>", ("<|im_start|>", "<|im_end|>"))

    def render(self, messages, add_generation_prompt=False):
        segs = []
        turn = 0
        for m in messages:
            segs.append(Segment(f"<|im_start|>{m['role']}\n", OTHER, -1))
            if m["role"] == "assistant":
                segs += [Segment(m["content"], CONTENT, turn), Segment("<|im_end|>", EOT, turn)]
                turn += 1
            else:
                segs += [Segment(m["content"], OTHER, -1), Segment("<|im_end|>", OTHER, -1)]
            segs.append(Segment("\n", OTHER, -1))
        if add_generation_prompt:
            segs.append(Segment("<|im_start|>assistant\n", OTHER, -1))
        return segs


_SENTINEL = re.compile("\x00(\\d+)\x00")


class JinjaTemplate(ChatTemplate):
    """Any HF ``chat_template``, rendered with jinja2 in the same sandboxed environment transformers uses.

    Spans are found in linear time: the template is rendered once with each message's content replaced
    by a sentinel (which marks where every message sits) and once with the real contents; the two are
    aligned piece by piece, allowing for the ``| trim`` many templates apply to content.
    """

    def __init__(self, source: str, name: str, tokenizer_config: dict) -> None:
        tokens = {k: _token_str(v) for k, v in tokenizer_config.items() if k.endswith("_token")}
        self.variables = {k: v for k, v in tokens.items() if v is not None}
        eot = next((t for t in ("<|eot_id|>", "<|im_end|>", "<end_of_turn>") if t in source), None)
        eot = eot or self.variables.get("eos_token")
        if eot is None:
            raise TemplateError(f"{name}: cannot tell the end-of-turn token; set eos_token in the tokenizer_config.json")
        bos = self.variables.get("bos_token") if "bos_token" in source else None
        super().__init__(name, bos, self.variables.get("eos_token"), eot, tuple(t for t in (bos, eot) if t))
        self.compiled = _jinja_env().from_string(source)

    def _render(self, messages, add_generation_prompt: bool) -> str:
        import jinja2

        try:
            return self.compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                        **self.variables)
        except jinja2.TemplateError as e:  # e.g. the template's own raise_exception("roles must alternate")
            raise TemplateError(f"{self.name}: {e}") from None

    def render(self, messages, add_generation_prompt=False):
        marked = [{**m, "content": f"\x00{i}\x00"} for i, m in enumerate(messages)]
        parts = _SENTINEL.split(self._render(marked, add_generation_prompt))
        text = self._render(messages, add_generation_prompt)
        segs: list[Segment] = []
        pos, turn, after_assistant = 0, 0, False
        for k in range(0, len(parts), 2):
            literal = parts[k]
            if not text.startswith(literal, pos):
                raise TemplateError(f"{self.name}: template output does not align with its messages near char {pos}")
            if after_assistant and literal.startswith(self.eot_token):
                segs.append(Segment(self.eot_token, EOT, turn - 1))
                segs.append(Segment(literal[len(self.eot_token):], OTHER, -1))
            else:
                segs.append(Segment(literal, OTHER, -1))
            pos += len(literal)
            after_assistant = False
            if k + 1 == len(parts):
                break
            m = messages[int(parts[k + 1])]
            nxt = parts[k + 2]
            content = next((c for c in (m["content"], m["content"].strip())
                            if text.startswith(c, pos) and text.startswith(nxt, pos + len(c))), None)
            if content is None:
                raise TemplateError(
                    f"{self.name}: message {parts[k + 1]} content is transformed by the template beyond trim; "
                    "masks need the content verbatim — use a built-in template or simplify the chat_template")
            if m["role"] == "assistant":
                segs.append(Segment(content, CONTENT, turn))
                turn, after_assistant = turn + 1, True
            else:
                segs.append(Segment(content, OTHER, -1))
            pos += len(content)
        if pos != len(text):
            raise TemplateError(f"{self.name}: rendered text has {len(text) - pos} unaligned trailing chars")
        return segs


def _token_str(value) -> Optional[str]:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _jinja_env():
    """The environment transformers compiles chat templates in (sandboxed, trim/lstrip blocks)."""
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """Accept ``{% generation %}`` blocks (HF assistant-mask markers); we find spans ourselves."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


def get_template(name: str, tokenizer_config: Optional[dict] = None) -> ChatTemplate:
    """``llama3`` | ``chatml`` | ``jinja`` (the chat_template of ``tokenizer_config``) | a path to a
    tokenizer_config.json (or its directory) holding a ``chat_template``."""
    if name == "llama3":
        return Llama3Template()
    if name == "chatml":
        return ChatMLTemplate()
    if name == "jinja":
        config, where = tokenizer_config or {}, "the tokenizer's tokenizer_config.json"
    else:
        path = Path(name)
        path = path / "tokenizer_config.json" if path.is_dir() else path
        if not path.is_file():
            raise TemplateError(f"template {name!r} is not one of llama3, chatml, jinja, nor a tokenizer_config.json path")
        config, where = json.loads(path.read_text(encoding="utf-8")), str(path)
    source = config.get("chat_template")
    if isinstance(source, list):  # HF allows a list of named templates; "default" is the one used
        source = next((t["template"] for t in source if t.get("name") == "default"), None)
    if not isinstance(source, str):
        raise TemplateError(f"{where} has no chat_template string")
    return JinjaTemplate(source, name, config)


@dataclass
class ChatEncoder:
    """Conversations -> (token ids, loss mask). The mask marks trained positions (HF labels: position t
    is trained to predict input_ids[t]); the first token is never trained (nothing predicts it).
    Cost is linear in the conversation: every character is tokenised at most once."""

    tokenizer: object
    template: ChatTemplate
    mask_mode: str = "completion_eot"
    last_turn_only: bool = False
    whole_text: Optional[bool] = None
    """Tokenise whole conversations and place tokens by character offset (default when the tokenizer
    can: HF ``encode_joined``) or segment by segment (False; sentencepiece)."""

    def __post_init__(self) -> None:
        self._cache: dict[str, list[int]] = {}
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode={self.mask_mode!r} is not one of {MASK_MODES}")

    def _trained(self, seg: Segment, last_turn: int) -> bool:
        if self.mask_mode == "all":
            return True
        if seg.kind == OTHER or (seg.kind == EOT and self.mask_mode == "completion"):
            return False
        return not self.last_turn_only or seg.turn == last_turn

    def encode_many(self, conversations: Sequence[Sequence[dict]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Encode a batch with one tokenizer call; returns (ids int64, mask uint8) per conversation."""
        out = []
        for ids, mask in self._encode_rendered([self.template.render(c) for c in conversations]):
            if len(mask):
                mask[0] = 0
            out.append((ids, mask))
        return out

    def _encode_rendered(self, rendered: list[list[Segment]]):
        whole = self.whole_text if self.whole_text is not None else hasattr(self.tokenizer, "encode_joined")
        return self._encode_whole(rendered) if whole else self._encode_segmented(rendered)

    def _flags(self, segs: list[Segment]) -> np.ndarray:
        last_turn = max((s.turn for s in segs), default=-1)
        return np.array([self._trained(s, last_turn) for s in segs], dtype=np.uint8)

    def _encode_whole(self, rendered: list[list[Segment]]):
        """Tokenise each conversation's text once (HF); the tokenizer reports tokens per segment."""
        joined = self.tokenizer.encode_joined([[s.text for s in segs] for segs in rendered])
        for segs, (ids, counts) in zip(rendered, joined):
            yield ids, np.repeat(self._flags(segs), counts)

    def _encode_segmented(self, rendered: list[list[Segment]]):
        """Tokenise segment by segment (backends without offsets, e.g. sentencepiece)."""
        pieces = self._encode_segments([s.text for segs in rendered for s in segs])
        k = 0
        for segs in rendered:
            mine = pieces[k:k + len(segs)]
            k += len(segs)
            lengths = [len(p) for p in mine]
            ids = np.fromiter(itertools.chain.from_iterable(mine), dtype=np.int64, count=sum(lengths))
            yield ids, np.repeat(self._flags(segs), lengths)

    def _encode_segments(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text. Short texts are cached: role headers, end-of-turn markers and repeated
        system prompts recur in every conversation, and a tokenizer call costs ~10-30 us per text
        however short it is (measured with HF tokenizers), which dominates multi-turn chats."""
        cache = self._cache
        todo = list(dict.fromkeys(t for t in texts if t not in cache))
        fresh = dict(zip(todo, self.tokenizer.encode_batch(todo))) if todo else {}
        for text, ids in fresh.items():
            if len(text) <= 256 and len(cache) < 1 << 16:
                cache[text] = ids
        return [cache[t] if t in cache else fresh[t] for t in texts]

    def encode(self, messages: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
        return self.encode_many([messages])[0]

    def encode_prompt(self, messages: Sequence[dict]) -> list[int]:
        """Ids of ``messages`` followed by the assistant header: the prompt for greedy generation
        (generate until ``tokenizer.eot_id``)."""
        # Encoded exactly like training data (same segmentation), so a trained prompt prefix has the same ids.
        segs = self.template.render(messages, add_generation_prompt=True)
        ids, _ = next(iter(self._encode_rendered([segs])))
        return ids.tolist()
