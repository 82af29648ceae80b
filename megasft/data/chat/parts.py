"""Per-token attribution: which role and which part of a turn every token of a conversation comes from.

A token's part code is one byte, ``role * 8 + kind``: ``kind`` is the segment kind of
:mod:`megasft.data.templates` (content, reasoning, tool call, lead, end-of-turn, header, other) and
``role`` the message role the text belongs to, or 0 for the template's own text (role markers, default
system prompts, tool lists, separators). Preprocessing stores the codes next to the mask (``parts.bin``)
so that ``megasft inspect --audit`` can check the stored mask against them without the source data.

Assistant parts come from the template compiler (exact). Text of the other roles is located by finding
each message's content verbatim (or trimmed) in the template text between two assistant turns, in order:
a reporting aid only, never used for the mask; content the template moves or rewrites counts as template
text (Mistral puts the system prompt into the last user turn, Llama-3.1 tool lists into the first).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from megasft.data.templates import CONTENT, EOT, HEADER, LEAD, OTHER, PART_NAMES, REASONING, TOOL_CALL, Segment

ROLE_NAMES = ("template", "system", "developer", "user", "assistant", "tool", "ipython")
ROLE_CODE = {name: i for i, name in enumerate(ROLE_NAMES)}
ASSISTANT = ROLE_CODE["assistant"]
UNATTRIBUTED = 255  # tokens of pretokenized records: nothing says where they came from
ASSISTANT_PARTS = (LEAD, REASONING, CONTENT, TOOL_CALL, EOT)  # what an assistant turn produced (HEADER is prompt)


def code(role: int, kind: int) -> int:
    return role * 8 + kind


def name(c: int) -> str:
    """``"assistant/content"``, ``"assistant/header"``, ``"user/content"``, ``"template/text"``, ``"unattributed"``."""
    if c == UNATTRIBUTED:
        return "unattributed"
    role, kind = divmod(int(c), 8)
    if kind == OTHER:  # the text of a non-assistant message is its content; role 0 is the template's own text
        return "template/text" if role == 0 else f"{ROLE_NAMES[role]}/content"
    return f"{ROLE_NAMES[role] if role < len(ROLE_NAMES) else role}/{PART_NAMES.get(kind, kind)}"


def assistant_part_codes() -> np.ndarray:
    """bool[256]: True for the codes of text an assistant turn produced (the only text a mask may train)."""
    ok = np.zeros(256, dtype=bool)
    ok[[code(ASSISTANT, k) for k in ASSISTANT_PARTS]] = True
    return ok


def runs(segs: Sequence[Segment], messages) -> list[tuple[str, int, int]]:
    """(text, part code, index of its segment) pieces covering ``segs`` in order: assistant parts keep
    their segment; template text between assistant turns is split where a message's content is found."""
    # Non-assistant messages grouped by the assistant turn that follows them (gap g precedes turn g).
    gaps: list[list[dict]] = [[]]
    for m in messages:
        if m["role"] == "assistant":
            gaps.append([])
        else:
            gaps[-1].append(m)
    out: list[tuple[str, int, int]] = []
    gap, pending = 0, []   # pending: indices of the template-text segments of the current gap
    for i, s in enumerate(segs):
        if s.kind == OTHER:
            pending.append(i)
            continue
        _flush(out, segs, pending, gaps[gap] if gap < len(gaps) else [])
        pending = []
        out.append((s.text, code(ASSISTANT, s.kind), i))
        if s.turn >= 0:
            gap = s.turn + 1
    _flush(out, segs, pending, gaps[gap] if gap < len(gaps) else [])
    return out


def _flush(out: list, segs: Sequence[Segment], pending: list[int], gap_messages: list[dict]) -> None:
    """Split the template-text segments ``pending`` at the contents of ``gap_messages``, found in order."""
    if not pending:
        return
    found: list[tuple[int, int, int]] = []   # (start, end, role) in the joined text of ``pending``
    text = "".join(segs[i].text for i in pending)
    pos = 0
    for m in gap_messages:
        content = m.get("content")
        if not isinstance(content, str) or not content.strip():
            continue
        for needle in (content, content.strip()):
            j = text.find(needle, pos)
            if j >= 0:
                found.append((j, j + len(needle), ROLE_CODE.get(m["role"], 0)))
                pos = j + len(needle)
                break
    base = 0
    for i in pending:
        seg_text = segs[i].text
        lo, hi, cur = base, base + len(seg_text), base
        for start, end, role in found:
            a, b = max(start, lo), min(end, hi)
            if a >= b:
                continue
            if a > cur:
                out.append((text[cur:a], code(0, OTHER), i))
            out.append((text[a:b], code(role, OTHER), i))
            cur = b
        if hi > cur:
            out.append((text[cur:hi], code(0, OTHER), i))
        base = hi


def count(codes: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tokens per code, trained tokens per code), int64[256] each."""
    codes = np.asarray(codes, dtype=np.uint8)
    return (np.bincount(codes, minlength=256).astype(np.int64),
            np.bincount(codes[np.asarray(mask, dtype=bool)], minlength=256).astype(np.int64))


def as_table(total: np.ndarray, trained: np.ndarray) -> dict:
    """{"assistant/content": [tokens, trained], ...} for the codes that occur, in code order."""
    return {name(c): [int(total[c]), int(trained[c])] for c in np.flatnonzero(total)}
