"""The preprocessing cache: one tokenised indexed dataset per input file, reused by later runs.

An entry is keyed by the blake2b of the input file's bytes and of every setting that changes what
preprocessing makes of them: the tokenizer file's sha256 and its tokenizer_config.json, the template
(name and Jinja source), mask mode, last-turn-only, train-reasoning, input format, seq_len and long policy, skip-bad,
the vocabulary bound, and the source code of the modules that parse, render and tokenise. So a re-run
that adds an input file tokenises only that file; one that changes any setting (or megasft's data
code) misses every entry and tokenises everything. Nothing is ever invalidated in place: a stale entry
is simply never looked up again; delete the cache directory to reclaim its space.

Location: ``--cache-dir`` (``PreprocessOptions.cache_dir``; the CLI defaults to ``$MEGASFT_CACHE_DIR``
or ``~/.cache/megasft/preprocess``), one sub-directory per entry, named by its key. Entries are written
like any indexed dataset (a hidden sibling renamed into place when complete), so a run killed half-way
leaves no half-written entry (the files it finished stay cached: the re-run starts after them), and two
runs making the same entry at once both make identical bytes.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

from megasft.data.chat.parts import UNATTRIBUTED
from megasft.data.indexed import IndexedDataset, file_digest

# Modules whose code decides the bytes of an entry: a change to any of them is a new key.
_CODE = ("formats.py", "readers.py", "preprocess.py", "templates.py", "tokenizer.py", "chat/jinja.py",
         "chat/schema.py", "indexed.py")


def default_cache_dir() -> str:
    return os.environ.get("MEGASFT_CACHE_DIR") or str(Path.home() / ".cache" / "megasft" / "preprocess")


def code_digest() -> str:
    here = Path(__file__).parent
    h = hashlib.blake2b(digest_size=16)
    for name in _CODE:
        h.update(name.encode() + b"\0" + (here / name).read_bytes())
    return h.hexdigest()


def settings_key(opts, tok, template) -> str:
    """Digest of everything but the input bytes that decides an entry (see the module docstring)."""
    settings = {
        "tokenizer_sha256": tok.sha256 if tok is not None else None,
        "tokenizer_config": tok.config if tok is not None else None,
        "template": template.name if template is not None else None,
        "template_source": getattr(template, "source", None),
        "mask_mode": opts.mask_mode, "last_turn_only": opts.last_turn_only,
        "train_reasoning": opts.train_reasoning, "input_format": opts.input_format,
        "seq_len": opts.seq_len, "long_policy": opts.long_policy, "skip_bad": opts.skip_bad,
        "vocab_size": opts.vocab_size, "code": code_digest(),
    }
    return hashlib.blake2b(json.dumps(settings, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


class PreprocessCache:
    def __init__(self, root: str | Path, settings: str) -> None:
        self.root, self.settings = Path(root), settings
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(f"cannot create the preprocessing cache {self.root}: {e.strerror}; pass --cache-dir "
                          "in a writable place, or --no-cache") from None

    def entry(self, path: str) -> Path:
        """The entry directory of one input file (it may not exist yet)."""
        h = hashlib.blake2b(self.settings.encode(), digest_size=16)
        h.update(file_digest(Path(path)).encode())
        return self.root / h.hexdigest()

    @staticmethod
    def load(entry: Path) -> Optional[IndexedDataset]:
        """The entry's dataset, or None if there is none. A damaged one (a file lost or cut short) is
        deleted, to be remade: the cache directory holds nothing else, and an open reader keeps its inodes."""
        if not entry.exists():
            return None
        try:
            return IndexedDataset(entry, verify="sizes")
        except (OSError, ValueError):
            shutil.rmtree(entry, ignore_errors=True)
            return None


def copy_documents(src: IndexedDataset, builder, max_tokens: int = 1 << 24) -> None:
    """Append every document of ``src`` to ``builder``, in order, ``max_tokens`` at a time (bounded memory)."""
    offsets = np.asarray(src.offsets)
    rows_file = src.dir / "doc_rows.idx"
    rows = np.load(rows_file, mmap_mode="r") if rows_file.is_file() else np.full(len(src), -1, dtype=np.int64)
    d = 0
    while d < len(src):
        # Whole documents up to max_tokens (at least one, however long).
        e = max(d + 1, int(np.searchsorted(offsets, offsets[d] + max_tokens, side="right")) - 1)
        a, b = int(offsets[d]), int(offsets[e])
        parts = None
        if builder.has_parts:   # an entry written without parts (none are) reads as unattributed
            parts = src.parts[a:b] if src.parts is not None else np.full(b - a, UNATTRIBUTED, dtype=np.uint8)
        builder.add_many(src.tokens[a:b], src.mask[a:b], np.diff(offsets[d:e + 1]), rows[d:e], parts=parts)
        d = e
