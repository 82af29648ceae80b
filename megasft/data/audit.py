"""The mask audit behind ``megasft inspect --audit``: the stored loss mask checked against the stored
per-token attribution (``parts.bin``: role and part of every token, written by preprocessing in the same
pass as the mask, see :mod:`megasft.data.chat.parts`).

Why the attribution is recorded rather than re-derived: re-rendering the source JSONL would need the
inputs still in place and unchanged, and cost a second preprocessing run; the side array costs one byte
per token and the audit is then one read of the dataset. What the audit can catch: a mask policy that
trains prompt text (a user, system or tool turn, a header), a shifted mask (the off-by-one bug: the first
token of a document, or the token after an assistant part, trained), and conversations with nothing or
everything trained. What it cannot: a compiler that places an assistant span wrongly, since the mask and
the parts come from the same spans; that is what the tests against transformers are for.

Counts are over positions that can be trained: a document's first token never is (nothing predicts it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
import numpy as np

from megasft.data.chat import parts as part_codes
from megasft.data.indexed import DatasetError, IndexedDataset

BLOCK_TOKENS = 1 << 24  # tokens read per pass: bounded memory at any dataset size


@dataclass
class Audit:
    docs: int = 0
    tokens: np.ndarray = field(default_factory=lambda: np.zeros(256, np.int64))   # per part code
    trained: np.ndarray = field(default_factory=lambda: np.zeros(256, np.int64))
    none_trained: list = field(default_factory=list)    # documents with trained fraction 0
    all_trained: list = field(default_factory=list)     # ... 1 (every position after the first)
    first_trained: list = field(default_factory=list)   # documents whose first token is trained
    outside: int = 0                                    # trained tokens not inside an assistant part
    outside_docs: list = field(default_factory=list)    # (doc, first such position, its part code)
    checked_outside: bool = True                        # False with mask_mode=all (prompt text is trained by design)

    @property
    def problems(self) -> bool:
        """Violations of the mask contract (the fractions 0 / 1 are warnings)."""
        return bool(self.outside or self.first_trained)


def run_audit(ds: IndexedDataset) -> Audit:
    """One pass over ``ds`` (blocks of whole documents)."""
    if ds.parts is None:
        raise DatasetError(f"{ds.dir} has no parts.bin (it was written before per-token attribution, or by a tool "
                           "that does not record it): re-run megasft preprocess to audit it")
    allowed = part_codes.assistant_part_codes()
    allowed[part_codes.UNATTRIBUTED] = True   # pretokenized records: nothing to check them against
    report = Audit(docs=len(ds), checked_outside=ds.meta.get("mask_mode") != "all")
    offsets = np.asarray(ds.offsets)
    d = 0
    while d < len(ds):
        e = int(np.searchsorted(offsets, offsets[d] + BLOCK_TOKENS, side="right")) - 1
        e = min(len(ds), max(e, d + 1))
        a, b = int(offsets[d]), int(offsets[e])
        mask, codes = np.asarray(ds.mask[a:b], dtype=bool), np.asarray(ds.parts[a:b])
        starts = offsets[d:e] - a
        lengths = np.diff(offsets[d:e + 1])
        total, trained = part_codes.count(codes, mask)
        report.tokens += total
        report.trained += trained
        nonempty = lengths > 0
        first = np.zeros(e - d, dtype=bool)
        first[nonempty] = mask[starts[nonempty]]
        report.first_trained += (np.flatnonzero(first) + d).tolist()
        cumulative = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
        per_doc = cumulative[starts + lengths] - cumulative[starts]
        trainable = np.maximum(lengths - 1, 0) + first   # a trained first token still counts as trained
        report.none_trained += (np.flatnonzero(per_doc == 0) + d).tolist()
        report.all_trained += (np.flatnonzero((per_doc == trainable) & (trainable > 0)) + d).tolist()
        if report.checked_outside:
            bad = np.flatnonzero(mask & ~allowed[codes])
            report.outside += len(bad)
            if len(bad):
                doc_of = np.searchsorted(starts, bad, side="right") - 1
                docs, where = np.unique(doc_of, return_index=True)
                report.outside_docs += [(int(k) + d, int(bad[w] - starts[k]), int(codes[bad[w]]))
                                        for k, w in zip(docs, where)]
        d = e
    return report


def doc_table(ds: IndexedDataset, doc: int) -> dict:
    """{"role/part": [tokens, trained]} of one document."""
    ids, mask = ds[doc]
    a, b = int(ds.offsets[doc]), int(ds.offsets[doc + 1])
    return part_codes.as_table(*part_codes.count(np.asarray(ds.parts[a:b]), mask))


def format_audit(ds: IndexedDataset, report: Audit, show_docs: int = 3, tokenizer=None,
                 max_listed: int = 20) -> str:
    from megasft.data.inspect import token_text
    from megasft.data.summary import format_parts

    tok_total, tok_trained = int(report.tokens.sum()), int(report.trained.sum())
    lines = [f"mask audit of {ds.dir}: {report.docs:,} conversations, {tok_total:,} tokens, {tok_trained:,} trained "
             f"({tok_trained / max(1, tok_total):.1%}); mask_mode={ds.meta.get('mask_mode')} "
             f"train_reasoning={ds.meta.get('train_reasoning', 'all')}",
             "trained / all tokens per role/part, whole dataset:",
             *format_parts(part_codes.as_table(report.tokens, report.trained))]

    def listed(docs: list) -> str:
        more = f" ... (+{len(docs) - max_listed})" if len(docs) > max_listed else ""
        return ", ".join(str(x) for x in docs[:max_listed]) + more

    flags = []
    if report.none_trained:
        flags.append(f"  trained fraction 0 (nothing trained): {len(report.none_trained):,} conversations: "
                     f"{listed(report.none_trained)}")
    if report.all_trained:
        flags.append(f"  trained fraction 1 (every position trained): {len(report.all_trained):,} conversations: "
                     f"{listed(report.all_trained)}")
    if report.first_trained:
        flags.append(f"  ERROR first token trained (nothing predicts it; a shifted mask): "
                     f"{len(report.first_trained):,} conversations: {listed(report.first_trained)}")
    if report.outside:
        flags.append(f"  ERROR {report.outside:,} trained tokens outside assistant parts, in "
                     f"{len(report.outside_docs):,} conversations; first of each:")
        for doc, pos, c in report.outside_docs[:max_listed]:
            ids, _ = ds[doc]
            text = f" {token_text(tokenizer, int(ids[pos]))!r}" if tokenizer is not None else ""
            flags.append(f"    doc {doc} position {pos}: {part_codes.name(c)}{text}")
    if not report.checked_outside:
        flags.append("  (mask_mode=all trains prompt text by design: the outside-assistant check is off)")
    lines += ["flags:", *(flags or ["  none: every trained token is inside an assistant part"])]
    shown = sorted({*range(min(show_docs, report.docs)), *report.none_trained[:max_listed],
                    *(doc for doc, _, _ in report.outside_docs[:max_listed]), *report.first_trained[:max_listed]})
    for doc in shown:
        n = int(ds.lengths[doc])
        trained = int(ds.mask[int(ds.offsets[doc]):int(ds.offsets[doc + 1])].sum())
        lines.append(f"conversation {doc}: {n:,} tokens, {trained:,} trained ({trained / max(1, n - 1):.1%} of "
                     "trainable positions)")
        lines += format_parts(doc_table(ds, doc))
    return "\n".join(lines)


def audit_text(path: str, show_docs: int = 3, tokenizer=None) -> tuple[str, bool]:
    """(the report, whether it found violations) for the dataset at ``path``."""
    ds = IndexedDataset(path)
    report = run_audit(ds)
    return format_audit(ds, report, show_docs, tokenizer), report.problems

