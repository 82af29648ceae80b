"""Side-by-side view of documents as the trainer sees them: position | token id | token text | label.

Labels come from the same :func:`build_micro_batch` the loader uses, so what is shown is what is
trained: a trained position t shows ``label == input_ids[t]`` (HF convention; the loss shifts), and
the first token of every document is never trained. Checking this by eye before a launch catches
the off-by-one mask bug.
"""
from __future__ import annotations

from typing import Optional

from megasft.data.indexed import IndexedDataset
from megasft.data.batch import IGNORE_INDEX
from megasft.data.packing import build_micro_batch

GREEN, RESET = "\033[1;32m", "\033[0m"


def token_text(tokenizer, token_id: int) -> str:
    """Printable form of one token: the decoded text with whitespace made visible."""
    text = tokenizer.decode([token_id]) if tokenizer is not None else ""
    return repr(text)[1:-1] if text else f"<{token_id}>"


def format_document(dataset: IndexedDataset, doc: int, tokenizer=None, color: bool = False,
                    max_tokens: Optional[int] = None) -> str:
    ids, mask = dataset[doc]
    n = len(ids)
    batch = build_micro_batch([[(ids, mask)]], n, dataset.pad_id)
    input_ids, labels = batch.input_ids[0].tolist(), batch.labels[0].tolist()
    trained = sum(lab != IGNORE_INDEX for lab in labels)
    lines = [f"document {doc}: {n} tokens, {trained} trained ({trained / max(1, n):.1%})",
             f"{'pos':>5} | {'id':>7} | {'token':<24} | {'label':>7}"]
    for t, (tok_id, label) in enumerate(zip(input_ids, labels)):
        if max_tokens is not None and t >= max_tokens:
            lines.append(f"  ... {n - t} more tokens")
            break
        row = f"{t:>5} | {tok_id:>7} | {token_text(tokenizer, tok_id):<24.24} | {label if label != IGNORE_INDEX else '-100':>7}"
        if label != IGNORE_INDEX:
            row = f"{GREEN}{row}  <- trained{RESET}" if color else f"{row}  <- trained"
        lines.append(row)
    return "\n".join(lines)


def format_meta(dataset: IndexedDataset) -> str:
    m = dataset.meta
    s = m.get("summary", {})
    return (f"{dataset.dir}: {m['num_docs']:,} documents, {m['num_tokens']:,} tokens ({m['token_dtype']}), "
            f"template={m.get('template')} mask_mode={m.get('mask_mode')} last_turn_only={m.get('last_turn_only')} "
            f"train_reasoning={m.get('train_reasoning', 'all')} "
            f"trained fraction={s.get('trained_fraction', float('nan')):.3f}")
