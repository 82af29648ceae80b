"""Memory-mapped indexed dataset: one directory, four files.

- ``tokens.bin``   token ids of all documents back to back, at the smallest dtype holding vocab_size
                   (uint16 below 65536 — Llama-3's 128k vocabulary needs uint32);
- ``loss_mask.bin`` one uint8 per token, 1 = trained (a byte, not a bit: any document slice is then a
                   plain mmap view, and it costs less than the tokens themselves);
- ``doc_offsets.idx`` int64 [n_docs + 1], document d is tokens[off[d]:off[d+1]] (an ``.npy`` file);
- ``meta.json``    tokenizer hash, template, mask mode, special ids, counts (incl. dropped reasons).

Opening maps the files; nothing is read until a document is sliced, so every rank can open the
whole dataset and touch only its own rows.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

TOKENS, MASK, OFFSETS, META = "tokens.bin", "loss_mask.bin", "doc_offsets.idx", "meta.json"


class DatasetError(ValueError):
    """An indexed dataset that cannot be trained on (inconsistent files, empty, ids beyond the
    model's vocabulary); the message names the file and what to do."""


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id below vocab_size."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dt).max + 1:
            return np.dtype(dt)
    return np.dtype(np.int64)


class IndexedDatasetBuilder:
    """Append documents in order, then :meth:`finish` with the metadata. Writes stream to disk."""

    def __init__(self, out_dir: str | Path, vocab_size: int) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dtype = token_dtype(vocab_size)
        self.vocab_size = vocab_size
        self._tokens = open(self.dir / TOKENS, "wb")
        self._mask = open(self.dir / MASK, "wb")
        self._lengths: list[int] = []

    def add(self, ids: np.ndarray, mask: np.ndarray) -> None:
        """Append one document."""
        self.add_many(ids, mask, [len(ids)])

    def add_many(self, ids: np.ndarray, mask: np.ndarray, lengths: list[int]) -> None:
        """Append documents given back to back (one write per file for a whole chunk)."""
        if len(ids) != len(mask) or len(ids) != sum(lengths):
            raise ValueError(f"ids ({len(ids)}), mask ({len(mask)}) and sum(lengths) ({sum(lengths)}) must agree")
        self._tokens.write(np.asarray(ids).astype(self.dtype, copy=False).tobytes())
        self._mask.write(np.asarray(mask, dtype=np.uint8).tobytes())
        self._lengths.extend(int(n) for n in lengths)

    def finish(self, meta: dict) -> Path:
        self._tokens.close()
        self._mask.close()
        offsets = np.zeros(len(self._lengths) + 1, dtype=np.int64)
        np.cumsum(self._lengths, out=offsets[1:])
        with open(self.dir / OFFSETS, "wb") as f:
            np.save(f, offsets)
        meta = {**meta, "token_dtype": self.dtype.name, "vocab_size": self.vocab_size, "num_docs": len(self._lengths),
                "num_tokens": int(offsets[-1])}
        (self.dir / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return self.dir


class IndexedDataset:
    """Read side. ``ds[d]`` -> (ids, mask) numpy views of document d; ``ds.lengths`` int64 [n_docs]."""

    def __init__(self, path: str | Path) -> None:
        self.dir = Path(path)
        meta_file = self.dir / META
        if not meta_file.is_file():
            raise FileNotFoundError(f"{self.dir} is not an indexed dataset (no {META}); "
                                    "write one with tools/preprocess_data.py --output DIR")
        self.meta: dict = json.loads(meta_file.read_text(encoding="utf-8"))
        self.offsets = np.load(self.dir / OFFSETS, mmap_mode="r")
        dtype = np.dtype(self.meta["token_dtype"])
        n = int(self.offsets[-1])
        # np.memmap cannot map an empty file; an empty dataset gets empty arrays instead.
        self.tokens = np.memmap(self.dir / TOKENS, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)
        self.mask = np.memmap(self.dir / MASK, dtype=np.uint8, mode="r", shape=(n,)) if n else np.zeros(0, np.uint8)
        self.lengths = np.diff(np.asarray(self.offsets))

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, d: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.offsets[d]), int(self.offsets[d + 1])
        return self.tokens[a:b], self.mask[a:b]

    @property
    def pad_id(self) -> int:
        return int(self.meta.get("pad_id", 0))

    def special_id(self, name: str) -> Optional[int]:
        value = self.meta.get(name)
        return None if value is None else int(value)
