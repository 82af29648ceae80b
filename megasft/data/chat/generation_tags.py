"""``{% generation %}`` tags (transformers' assistant-mask markers) in a chat template: found, and their spans
checked against the spans the mask compiler (:mod:`megasft.data.chat.jinja`) gives, which they must agree with."""
from __future__ import annotations

import re

from megasft.data.templates import TemplateError

GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def check_generation_tags(template, text: str, segs, tag_spans: list, header: str, messages, turns: list[int],
                          tools) -> None:
    """Raise unless the ``{% generation %}`` spans of ``text`` cover each assistant turn's compiled segments
    ``segs``, plus at most prompt text before it (``header``, the generation prompt, or what the prompt before
    the turn ends with)."""
    merged: list[list[int]] = []
    for s, e in tag_spans:
        if merged and merged[-1][1] == s:
            merged[-1][1] = e
        elif e > s:
            merged.append([s, e])
    ours, pos = {}, 0
    for seg in segs:
        if seg.turn >= 0:
            lo, hi = ours.get(seg.turn, (pos, pos))
            ours[seg.turn] = (min(lo, pos), pos + len(seg.text))
        pos += len(seg.text)
    mine = [ours[k] for k in sorted(ours)]

    def header_text(k: int, extra: str) -> bool:
        """Tag spans may also cover prompt text: the generation prompt, or what the prompt before this
        turn ends with (DeepSeek-V3's twin trains the <｜tool▁outputs▁end｜> that opens a turn after tools)."""
        return extra in header or template._render(messages[:turns[k]], True, tools).endswith(extra)

    ok = len(merged) == len(mine) and all(
        e == hi and s <= lo and header_text(k, text[s:lo]) for k, ((s, e), (lo, hi)) in enumerate(zip(merged, mine)))
    if not ok:
        raise TemplateError(f"{template.name}: its {{% generation %}} spans {[tuple(m) for m in merged]} disagree with "
                            f"the compiled assistant spans {mine} (a tag span may only add prompt text such as "
                            f"{header!r}); fix the tags or remove them")
