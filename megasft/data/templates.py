"""Chat templates rendered as labelled text segments, and the ids + loss mask they encode to.

A template turns a conversation into a list of :class:`Segment` (text, kind, turn). The joined text
is exactly what ``transformers``' ``apply_chat_template(..., tokenize=False)`` returns for the same
template; ``kind`` says which pieces are assistant content or its end-of-turn token. The mask follows
the segments: with HF tokenizers the whole text is tokenised once and each token is placed by its
character offset; with sentencepiece each segment is tokenised on its own. Either way the cost is
linear in the number of turns (no re-tokenising of prefixes). Segment boundaries sit at special
tokens or at the newline after a role header, both pre-tokenizer split points of BPE tokenizers
(Llama-3, Qwen), so both ways give the same ids (tested).

Built-ins in plain Python (no Jinja, fast): ``llama3`` (the Meta-Llama-3-Instruct template) and ``chatml``;
``qwen2.5`` / ``qwen3`` and a template recognised as theirs (the originals Qwen ships) render in plain Python
with the Jinja compiler as fallback (:mod:`megasft.data.chat.qwen`). The other built-in families
(``llama3.1``, ``mistral``, ``gemma3``, ``phi4``, ``deepseek-v3``, ``gpt-oss``, ...:
:mod:`megasft.data.chat.families`) and any other HF ``chat_template`` go through
:class:`megasft.data.chat.jinja.JinjaTemplate`.
"""
from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Sequence

import numpy as np

MASK_MODES = ("all", "completion", "completion_eot")
REASONING_POLICIES = ("all", "last", "none")

# Segment kinds. The parts of an assistant turn: the lead (text the template puts between the generation
# prompt and the content, which the model produces at inference: Mistral's space, Qwen3's empty <think>),
# its reasoning, content, tool calls, and the end-of-turn marker closing it.
# HEADER is the generation prompt opening an assistant turn (prompt text, trained only with mask_mode=all).
OTHER, CONTENT, EOT, REASONING, TOOL_CALL, LEAD, HEADER = 0, 1, 2, 3, 4, 5, 6
PART_NAMES = {OTHER: "other", CONTENT: "content", EOT: "end-of-turn", REASONING: "reasoning",
              TOOL_CALL: "tool call", LEAD: "lead", HEADER: "header"}

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
    kind: int  # OTHER, HEADER, or the assistant part it belongs to (CONTENT, REASONING, TOOL_CALL, LEAD, EOT)
    turn: int  # index of the assistant turn for its parts, -1 otherwise (OTHER, HEADER)


@dataclass
class ChatTemplate:
    """Base: subclasses implement :meth:`render`."""

    name: str
    bos_token: Optional[str]
    eos_token: Optional[str]
    eot_token: str
    required_tokens: tuple[str, ...]

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False,
               notes: Optional[Counter] = None) -> list[Segment]:
        """Segments of the rendered conversation; ``notes`` counts fields the template did not render."""
        raise NotImplementedError

    def render_text(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        return "".join(s.text for s in self.render(messages, add_generation_prompt))


def check_plain(name: str, messages) -> None:
    """The built-in templates render role + text only: anything else in a record is refused, never dropped."""
    if getattr(messages, "tools", None):
        raise TemplateError(f"template {name!r} does not render the record's 'tools'; use the model's own chat "
                            "template (--template jinja or a template path)")
    for i, m in enumerate(messages):
        extra = [k for k in ("tool_calls", "reasoning_content") if m.get(k)]
        if extra or m.get("content") is None:
            what = extra[0] if extra else "content null"
            raise TemplateError(f"template {name!r} renders plain text turns only; message {i} has {what}: use the "
                                "model's own chat template (--template jinja or a template path)")


class Llama3Template(ChatTemplate):
    """``<|begin_of_text|>`` then per message ``<|start_header_id|>ROLE<|end_header_id|>\\n\\nCONTENT<|eot_id|>``
    (content stripped, as the HF template's ``| trim`` does)."""

    def __init__(self) -> None:
        super().__init__("llama3", "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>",
                         ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))

    def render(self, messages, add_generation_prompt=False, notes=None):
        check_plain(self.name, messages)
        segs = [Segment(self.bos_token, OTHER, -1)]
        turn = 0
        for m in messages:
            # Role headers and end-of-turn markers are their own segments: identical across turns and
            # conversations, so ChatEncoder tokenises them once (see its cache).
            header = Segment(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n", OTHER, -1)
            segs.append(header._replace(kind=HEADER) if m["role"] == "assistant" else header)
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

    def render(self, messages, add_generation_prompt=False, notes=None):
        check_plain(self.name, messages)
        segs = []
        turn = 0
        for m in messages:
            header = Segment(f"<|im_start|>{m['role']}\n", OTHER, -1)
            segs.append(header._replace(kind=HEADER) if m["role"] == "assistant" else header)
            if m["role"] == "assistant":
                # The newline after <|im_end|> completes the turn: trained with it, as the Jinja path and
                # the Qwen training templates do.
                segs += [Segment(m["content"], CONTENT, turn), Segment("<|im_end|>\n", EOT, turn)]
                turn += 1
            else:
                segs += [Segment(m["content"], OTHER, -1), Segment("<|im_end|>\n", OTHER, -1)]
        if add_generation_prompt:
            segs.append(Segment("<|im_start|>assistant\n", OTHER, -1))
        return segs


def get_template(name: str, tokenizer_config: Optional[dict] = None) -> ChatTemplate:
    """``llama3`` | ``chatml`` | a built-in family (:data:`megasft.data.chat.families.FAMILIES`) | ``jinja`` (the tokenizer's own template) | a path: a tokenizer directory, its
    tokenizer_config.json, or a ``.jinja`` file. See :func:`megasft.data.chat.sources.read_template`."""
    if name == "llama3":
        return Llama3Template()
    if name == "chatml":
        return ChatMLTemplate()
    from megasft.data.chat.families import FAMILIES, family_template

    if name in FAMILIES:
        return family_template(name)
    from megasft.data.chat.jinja import JinjaTemplate
    from megasft.data.chat.qwen import accelerated
    from megasft.data.chat.sources import read_template

    source, config = read_template(name, tokenizer_config)
    return accelerated(JinjaTemplate(source, name, config))


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
    train_reasoning: str = "all"
    """Which assistant turns' reasoning is trained: all (every turn whose reasoning the template renders,
    i.e. the template's own history policy: Qwen3 renders it only after the last user query) | last | none."""
    notes: Counter = field(default_factory=Counter)
    """Fields the template did not render (e.g. "reasoning not rendered by the template"), counted."""

    def __post_init__(self) -> None:
        self._cache: dict[str, list[int]] = {}
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode={self.mask_mode!r} is not one of {MASK_MODES}")
        if self.train_reasoning not in REASONING_POLICIES:
            raise ValueError(f"train_reasoning={self.train_reasoning!r} is not one of {REASONING_POLICIES}")

    def _trained(self, seg: Segment, last_turn: int, flag: Optional[bool]) -> bool:
        """The mask policy for one segment; ``flag`` is the turn's own train / weight (None: not given)."""
        if seg.kind in (OTHER, HEADER):
            return self.mask_mode == "all"
        if flag is False:
            return False
        if seg.kind == REASONING and (self.train_reasoning == "none" or
                                      (self.train_reasoning == "last" and seg.turn != last_turn)):
            return False
        if flag is None and self.mask_mode != "all" and self.last_turn_only and seg.turn != last_turn:
            return False
        return not (seg.kind == EOT and self.mask_mode == "completion")

    def render(self, conversation) -> tuple[list[Segment], list[Optional[bool]]]:
        """Segments and the train flag of each assistant turn."""
        flags = getattr(conversation, "train", None) or [None] * len(conversation)
        turn_flags = [f for f, m in zip(flags, conversation) if m["role"] == "assistant"]
        return self.template.render(conversation, notes=self.notes), turn_flags

    def encode_many(self, conversations: Sequence[Sequence[dict]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Encode a batch with one tokenizer call; returns (ids int64, mask uint8) per conversation."""
        return [(ids, mask) for ids, mask, _ in self.encode_parts(conversations)]

    def encode_parts(self, conversations: Sequence[Sequence[dict]]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(ids, mask, part code per token) per conversation; the codes (``role * 8 + kind``, see
        :mod:`megasft.data.chat.parts`) let an audit count trained tokens per role and part."""
        from megasft.data.chat import parts

        rendered = [self.render(c) for c in conversations]
        whole = self._whole_text()
        if whole:  # finer pieces: template text split by role (the ids do not depend on the split)
            pieces = [parts.runs(segs, conv) for (segs, _), conv in zip(rendered, conversations)]
        else:      # segment by segment the split would change the ids: template text keeps role 0
            pieces = [[(s.text, parts.code(parts.ASSISTANT if s.turn >= 0 or s.kind == HEADER else 0, s.kind), i)
                       for i, s in enumerate(segs)] for segs, _ in rendered]
        out = []
        for (segs, turn_flags), runs, (ids, counts) in zip(rendered, pieces,
                                                           self._encode_texts([[r[0] for r in rs] for rs in pieces])):
            last_turn = max((s.turn for s in segs), default=-1)
            flags = np.array([self._trained(s, last_turn, turn_flags[s.turn] if s.turn >= 0 else None) for s in segs],
                             dtype=np.uint8)
            mask = np.repeat(flags[[r[2] for r in runs]], counts) if runs else np.zeros(0, np.uint8)
            if len(mask):
                mask[0] = 0  # nothing predicts a document's first token
            out.append((ids, mask, np.repeat(np.array([r[1] for r in runs], dtype=np.uint8), counts)))
        return out

    def _whole_text(self) -> bool:
        return self.whole_text if self.whole_text is not None else hasattr(self.tokenizer, "encode_joined")

    def _encode_texts(self, rendered: list[list[str]]):
        """(ids, tokens per text piece) per conversation."""
        if self._whole_text():  # tokenise each conversation's text once (HF); the tokenizer reports tokens per piece
            yield from self.tokenizer.encode_joined(rendered)
            return
        # Segment by segment (backends without offsets, e.g. sentencepiece).
        pieces = self._encode_segments([t for texts in rendered for t in texts])
        k = 0
        for texts in rendered:
            mine = pieces[k:k + len(texts)]
            k += len(texts)
            lengths = [len(p) for p in mine]
            ids = np.fromiter(itertools.chain.from_iterable(mine), dtype=np.int64, count=sum(lengths))
            yield ids, np.array(lengths, dtype=np.int64)

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
        ids, _ = next(iter(self._encode_texts([[s.text for s in segs]])))
        return ids.tolist()
