"""Memory-mapped indexed dataset: one directory, four files (and two optional ones).

- ``tokens.bin``   token ids of all documents back to back, at the smallest dtype holding vocab_size
                   (uint16 below 65536 — Llama-3's 128k vocabulary needs uint32);
- ``loss_mask.bin`` one uint8 per token, 1 = trained (a byte, not a bit: any document slice is then a
                   plain mmap view, and it costs less than the tokens themselves);
- ``doc_offsets.idx`` int64 [n_docs + 1], document d is tokens[off[d]:off[d+1]] (an ``.npy`` file);
- ``parts.bin``   optional, one uint8 per token: the role and part of the conversation it comes from
                   (:mod:`megasft.data.chat.parts`), for ``megasft inspect --audit``; training never reads it;
- ``meta.json``    tokenizer hash, template, mask mode, special ids, counts (incl. dropped reasons),
                   the largest token id and a blake2b digest of each of the data files;
- ``doc_rows.idx`` (optional) int64 [n_docs], the line / row of each document in its input file
                   (``meta["docs_per_input"]`` says which file): errors found later name the input record.

Writing is atomic: the builder writes into a hidden sibling directory and renames it over the output
only once every file is complete, so a failed run leaves the previous dataset byte-identical. An
existing dataset is renamed aside and deleted, never opened for writing: a job that has it
memory-mapped keeps the old inodes and reads the old bytes (rewriting in place truncates the file
under the mapping, and the reader dies of SIGBUS).

Opening maps the files; nothing is read until a document is sliced, so every rank can open the
whole dataset and touch only its own rows.
"""
from __future__ import annotations

import array
import functools
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Optional

import numpy as np

TOKENS, MASK, OFFSETS, META, ROWS = "tokens.bin", "loss_mask.bin", "doc_offsets.idx", "meta.json", "doc_rows.idx"
PARTS = "parts.bin"
VERIFY_MODES = ("full", "sizes")
RERUN = "re-run megasft preprocess to rewrite the dataset"


class DatasetError(ValueError):
    """An indexed dataset that cannot be trained on (inconsistent files, empty, ids beyond the
    model's vocabulary); the message names the file and what to do."""


def token_dtype(vocab_size: Optional[int]) -> np.dtype:
    """Smallest unsigned dtype that holds every id below vocab_size; uint32 when no vocabulary is known
    (pretokenized input without a tokenizer or --vocab-size: every Llama-family vocabulary fits)."""
    if vocab_size is None:
        return np.dtype(np.uint32)
    for dt in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dt).max + 1:
            return np.dtype(dt)
    return np.dtype(np.int64)


def _new_hash():
    return hashlib.blake2b(digest_size=32)


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, _new_hash).hexdigest()


def check_replaceable(out_dir: Path, overwrite: bool) -> None:
    """Raise FileExistsError unless out_dir may become the new dataset: absent, an empty directory, or
    (with overwrite) an indexed dataset. Anything else is never deleted, --overwrite or not."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"output {out_dir} is a file, not a dataset directory; choose another --output")
    if not any(out_dir.iterdir()):
        return
    if not (out_dir / META).is_file():
        raise FileExistsError(f"output {out_dir} is a non-empty directory without {META}, not an indexed dataset; "
                              "refusing to replace it (even with --overwrite): choose another --output")
    if not overwrite:
        raise FileExistsError(f"output {out_dir} already holds a dataset; pass --overwrite to replace it "
                              "(jobs reading it keep the old files) or choose another --output")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def install_dir(new: Path, dest: Path) -> None:
    """Rename ``new`` to ``dest``; an existing ``dest`` is renamed aside first and deleted last (its
    files are unlinked, never truncated, so open mmaps stay valid). Between the two renames ``dest``
    is briefly absent: a reader opening then gets "no meta.json", never a half-written dataset."""
    old = None
    if dest.is_dir() and any(dest.iterdir()):   # rename() itself replaces an empty directory, atomically
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:12]}")
        os.rename(dest, old)
    try:
        os.rename(new, dest)
    except OSError:
        if old is not None:
            os.rename(old, dest)
        raise
    _fsync_dir(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class IndexedDatasetBuilder:
    """Append documents in order, then :meth:`finish` with the metadata. Writes stream to disk into a
    hidden sibling of ``out_dir`` (hashed as written), renamed over ``out_dir`` by finish. Used as a
    context manager, an exception deletes the partial files and leaves ``out_dir`` untouched."""

    def __init__(self, out_dir: str | Path, vocab_size: Optional[int], overwrite: bool = False,
                 parts: bool = False) -> None:
        self.dir, self.overwrite = Path(out_dir), overwrite
        target = Path(os.path.abspath(self.dir))
        check_replaceable(target, overwrite)   # before any work, not after an hour of tokenising
        self.tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:12]}")
        try:
            self.tmp.mkdir(parents=True)
        except OSError as e:
            raise OSError(f"cannot create {self.dir}: {e.strerror}; "
                          "choose an --output in a writable directory") from None
        self.dtype = token_dtype(vocab_size)
        self.vocab_size = vocab_size
        names = (TOKENS, MASK, PARTS) if parts else (TOKENS, MASK)
        self._files = {name: open(self.tmp / name, "wb") for name in names}
        self._hashes = {name: _new_hash() for name in names}
        self._lengths = array.array("q")   # 8 bytes a document, not a Python int's 36
        self._rows = array.array("q")
        self._max_id = -1

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    @property
    def has_parts(self) -> bool:
        return PARTS in self._files

    def add(self, ids: np.ndarray, mask: np.ndarray, parts: Optional[np.ndarray] = None) -> None:
        """Append one document."""
        self.add_many(ids, mask, [len(ids)], parts=parts)

    def add_many(self, ids: np.ndarray, mask: np.ndarray, lengths, rows=None,
                 parts: Optional[np.ndarray] = None) -> None:
        """Append documents given back to back (one write per file for a whole chunk); ``rows``: the
        line / row of each in its input file (-1: not known); ``parts`` (uint8 per token) is required
        by a builder made with ``parts=True`` and refused by one without."""
        if len(ids) != len(mask) or len(ids) != sum(lengths):
            raise ValueError(f"ids ({len(ids)}), mask ({len(mask)}) and sum(lengths) ({sum(lengths)}) must agree")
        if (parts is not None) != (PARTS in self._files) or (parts is not None and len(parts) != len(ids)):
            raise ValueError(f"parts ({None if parts is None else len(parts)}) must be given, one per token, exactly "
                             "when the builder was made with parts=True")
        ids = np.asarray(ids)
        if len(ids):
            self._max_id = max(self._max_id, int(ids.max()))   # meta's max_token_id: the vocab check is O(1)
        data = [(TOKENS, ids.astype(self.dtype, copy=False)), (MASK, np.asarray(mask, dtype=np.uint8))]
        for name, data in data + ([(PARTS, np.asarray(parts, dtype=np.uint8))] if parts is not None else []):
            buf = data.tobytes()
            self._files[name].write(buf)
            self._hashes[name].update(buf)
        self._lengths.extend(int(n) for n in lengths)
        if rows is None:
            self._rows.extend([-1] * len(lengths))
        else:
            self._rows.extend(int(r) for r in rows)

    def finish(self, meta: dict) -> Path:
        """Write the index and meta.json, then rename the complete dataset over ``out_dir``."""
        try:
            for f in self._files.values():
                f.flush()
                os.fsync(f.fileno())
                f.close()
            offsets = np.zeros(len(self._lengths) + 1, dtype=np.int64)
            np.cumsum(self._lengths, out=offsets[1:])
            for name, values in ((OFFSETS, offsets), (ROWS, np.frombuffer(self._rows, dtype=np.int64))):
                with open(self.tmp / name, "wb") as f:
                    np.save(f, values)
                    f.flush()
                    os.fsync(f.fileno())
            digests = {name: h.hexdigest() for name, h in self._hashes.items()}
            digests.update({name: file_digest(self.tmp / name) for name in (OFFSETS, ROWS)})
            meta = {**meta, "token_dtype": self.dtype.name, "vocab_size": self.vocab_size,
                    "num_docs": len(self._lengths), "num_tokens": int(offsets[-1]),
                    "max_token_id": self._max_id if self._lengths else None, "blake2b": digests}
            with open(self.tmp / META, "w", encoding="utf-8") as f:
                f.write(json.dumps(meta, indent=2) + "\n")
                f.flush()
                os.fsync(f.fileno())
            target = Path(os.path.abspath(self.dir))
            check_replaceable(target, self.overwrite)   # again: another run may have written it meanwhile
            install_dir(self.tmp, target)
        except BaseException:
            self.abort()
            raise
        return self.dir

    def abort(self) -> None:
        """Drop the partial files; ``out_dir`` is left as it was."""
        for f in self._files.values():
            f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _check_sizes(d: Path, meta: dict, offsets: np.ndarray) -> None:
    """The cheap checks, always run: counts and offsets against meta.json, file sizes against counts."""
    n_docs, n_tokens = int(meta["num_docs"]), int(meta["num_tokens"])
    itemsize = np.dtype(meta["token_dtype"]).itemsize
    recorded = f"{META} records {n_docs} documents, {n_tokens} tokens"
    if offsets.ndim != 1 or offsets.dtype != np.int64 or len(offsets) != n_docs + 1:
        raise DatasetError(f"{d / OFFSETS}: {offsets.dtype}{list(offsets.shape)} offsets but {recorded} "
                           f"(expected int64[{n_docs + 1}]); the files come from different runs: {RERUN}")
    if int(offsets[0]) != 0 or int(offsets[-1]) != n_tokens or (len(offsets) > 1 and (np.diff(offsets) < 0).any()):
        raise DatasetError(f"{d / OFFSETS}: offsets run {int(offsets[0])}..{int(offsets[-1])} (or decrease) but "
                           f"{recorded}; the index is corrupt: {RERUN}")
    optional = [(PARTS, n_tokens)] if PARTS in meta.get("blake2b", {}) else []
    for name, want in [(TOKENS, n_tokens * itemsize), (MASK, n_tokens)] + optional:
        size = (d / name).stat().st_size
        if size != want:
            raise DatasetError(f"{d / name}: {size} bytes but {recorded} ({want} bytes); the file is truncated "
                               f"or from another run: {RERUN}")


def _check_digests(d: Path, meta: dict) -> None:
    """The full check: every file's blake2b against meta.json (datasets written before digests: skipped)."""
    for name, want in meta.get("blake2b", {}).items():
        got = file_digest(d / name)
        if got != want:
            raise DatasetError(f"{d / name}: blake2b {got[:16]} differs from {want[:16]} recorded in {META}; "
                               f"the file changed after it was written: {RERUN}")


class IndexedDataset:
    """Read side. ``ds[d]`` -> (ids, mask) numpy views of document d; ``ds.lengths`` int64 [n_docs].

    Opening verifies that the files agree with meta.json, naming the one that does not.
    ``verify="sizes"`` checks counts, offsets and file sizes (milliseconds at any size: catches a
    truncated copy and files of different runs). ``verify="full"`` (default) also hashes every file
    against the digests recorded at write time, which reads the whole dataset once (about a second
    per GB on each rank, from the shared page cache): it also catches in-place corruption. Pass
    ``"sizes"`` when that start-up cost matters more, e.g. for datasets of hundreds of GB.
    """

    def __init__(self, path: str | Path, verify: str = "full") -> None:
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify={verify!r} is not one of {list(VERIFY_MODES)}")
        self.dir = Path(path)
        meta_file = self.dir / META
        if not meta_file.is_file():
            raise FileNotFoundError(f"{self.dir} is not an indexed dataset (no {META}); "
                                    "write one with megasft preprocess --output DIR")
        try:
            self.meta: dict = json.loads(meta_file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise DatasetError(f"{meta_file}: not valid JSON ({e}): {RERUN}") from None
        for name in (TOKENS, MASK, OFFSETS) + ((PARTS,) if PARTS in self.meta.get("blake2b", {}) else ()):
            if not (self.dir / name).is_file():
                raise DatasetError(f"{self.dir / name} is missing; the dataset is incomplete: {RERUN}")
        try:
            self.offsets = np.load(self.dir / OFFSETS, mmap_mode="r")
        except ValueError as e:
            raise DatasetError(f"{self.dir / OFFSETS}: not an .npy index ({e}): {RERUN}") from None
        _check_sizes(self.dir, self.meta, self.offsets)
        if verify == "full":
            _check_digests(self.dir, self.meta)
        dtype = np.dtype(self.meta["token_dtype"])
        n = int(self.offsets[-1])
        # np.memmap cannot map an empty file; an empty dataset gets empty arrays instead.
        self.tokens = np.memmap(self.dir / TOKENS, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)
        self.mask = np.memmap(self.dir / MASK, dtype=np.uint8, mode="r", shape=(n,)) if n else np.zeros(0, np.uint8)
        self.lengths = np.diff(np.asarray(self.offsets))
        has_parts = PARTS in self.meta.get("blake2b", {})
        self.parts: Optional[np.ndarray] = None if not has_parts else \
            np.memmap(self.dir / PARTS, dtype=np.uint8, mode="r", shape=(n,)) if n else np.zeros(0, np.uint8)
        """uint8 per token (role * 8 + part) where preprocessing recorded it, else None."""

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, d: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.offsets[d]), int(self.offsets[d + 1])
        return self.tokens[a:b], self.mask[a:b]

    @property
    def pad_id(self) -> int:
        # A pretokenized dataset made without a tokenizer has none: padding is never trained nor
        # attended across, so any id in range will do.
        pad = self.meta.get("pad_id")
        return 0 if pad is None else int(pad)

    def special_id(self, name: str) -> Optional[int]:
        value = self.meta.get(name)
        return None if value is None else int(value)

    @functools.cached_property
    def max_token_id(self) -> int:
        """Largest token id (-1 if empty): recorded in meta.json, or one pass over the mmap for
        datasets written before it was."""
        if "max_token_id" in self.meta:
            return -1 if self.meta["max_token_id"] is None else int(self.meta["max_token_id"])
        return int(self.tokens.max()) if len(self.tokens) else -1

    def check_trainable(self, vocab_size: Optional[int] = None) -> None:
        """DatasetError unless the dataset has documents and every id is below the model's vocab_size.

        The rule is ``max_token_id < model.vocab_size``: an id past the model's vocabulary reads a
        padding row (TP=1) or a zero vector (TP>1) or gives an infinite loss — silently. A tokenizer
        vocabulary larger than the model's is accepted as long as no id in the data reaches past it.
        """
        if len(self) == 0:
            raise DatasetError(f"{self.dir}: the dataset holds no documents, nothing to train on; "
                               f"{RERUN} (its summary says why every line was dropped)")
        if vocab_size is not None and self.max_token_id >= vocab_size:
            made = (f"the dataset's tokenizer has {self.meta['vocab_size']} tokens" if self.meta.get("tokenizer")
                    else f"preprocessed without a tokenizer, --vocab-size {self.meta.get('vocab_size')}")
            bad, where = self.locate_id(vocab_size)
            largest = f"; the largest is {self.max_token_id}" if bad != self.max_token_id else ""
            raise DatasetError(f"{self.dir}: token id {bad} >= model.vocab_size={vocab_size} in {where}{largest} "
                               f"({made}); set model.vocab_size to at least {self.max_token_id + 1}, or re-run "
                               "megasft preprocess with the model's tokenizer or --vocab-size")

    def locate_id(self, vocab_size: int) -> tuple[int, str]:
        """(the first id >= vocab_size, where it is: 'document D (input FILE:LINE, token T)'); one pass over
        the mmap, 16 M tokens at a time (a whole-dataset comparison would allocate a byte per token)."""
        step, pos = 1 << 24, 0
        for start in range(0, len(self.tokens), step):
            hits = np.flatnonzero(self.tokens[start:start + step] >= vocab_size)
            if len(hits):
                pos = start + int(hits[0])
                break
        d = int(np.searchsorted(self.offsets, pos, side="right")) - 1
        where = f"document {d}"
        per_input, inputs = self.meta.get("docs_per_input"), self.meta.get("inputs")
        if (self.dir / ROWS).is_file() and per_input and inputs and len(per_input) == len(inputs):
            row = int(np.load(self.dir / ROWS, mmap_mode="r")[d])
            k = int(np.searchsorted(np.cumsum(per_input), d, side="right"))
            unit = "row " if inputs[k].endswith((".parquet", ".arrow")) else ""   # as DataError names them
            where += f" (input {inputs[k]}:{unit}{row}, token {pos - int(self.offsets[d])})"
        return int(self.tokens[pos]), where
