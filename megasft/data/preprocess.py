"""Chat records (JSONL, Parquet, Arrow / datasets ``save_to_disk``) -> indexed dataset, tokenised by a
pool of worker processes (logic behind ``megasft preprocess``).

Records are read in chunks in the main process (JSONL lines as bytes, table rows as Arrow slices, see
:mod:`megasft.data.readers`), parsed + rendered + tokenised by workers (each holds its own tokenizer),
and written in input order, so the output does not depend on the number of workers. Memory is
bounded whatever the input size: input is streamed, at most ``IN_FLIGHT_PER_WORKER`` chunks per
worker are read ahead of the writer, and the workers' results go straight to the dataset files
(one dataset, written by the main process; the per-document index costs 16 bytes a document).
With a ``cache_dir`` each input file is tokenised into its own cached dataset and the output is
assembled from them, so a re-run tokenises only the files it has not seen (:mod:`megasft.data.cache`).
Pretokenized input needs no tokenizer.  Every line ends up in exactly one bucket of the :class:`Summary`: kept, dropped
by policy (too long, nothing to train) or bad input (an error naming file:line, or a count with
``skip_bad``). A run that keeps nothing, or skips more than ``max_bad_fraction`` of its lines as bad,
is an error, and the output (written atomically, see :mod:`megasft.data.indexed`) is left as it was.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from megasft.data.cache import PreprocessCache, copy_documents, settings_key
from megasft.data.formats import FORMATS, DataError, Pretokenized, parse_item
from megasft.data.indexed import DatasetError, IndexedDatasetBuilder, check_replaceable, token_dtype
from megasft.data.readers import ROW, file_chunks, input_files, is_columnar
from megasft.data.summary import (Summary, check_kept, format_parts, format_summary,  # noqa: F401 (re-exported)
                                  histogram_bucket)
from megasft.data.chat import parts as part_codes
from megasft.data.templates import MASK_MODES, REASONING_POLICIES, ChatEncoder, get_template
from megasft.data.tokenizer import load_tokenizer

LONG_POLICIES = ("drop", "truncate")
IN_FLIGHT_PER_WORKER = 4   # chunks read ahead per worker: enough to keep each busy, a bound on memory
NEEDS_TOKENIZER = "needs a tokenizer"


@dataclass
class PreprocessOptions:
    inputs: list[str]
    """JSONL files (plain, .gz or .zst), .parquet / .arrow files, datasets save_to_disk directories, or
    directories of them, read in order."""
    output: str
    """Directory for the indexed dataset."""
    tokenizer: Optional[str] = None
    """sentencepiece .model, tokenizer.json, or a directory holding one; None reads pretokenized input only."""
    template: str = "llama3"
    """llama3 | chatml | jinja (the tokenizer's tokenizer_config.json) | path to a tokenizer_config.json."""
    mask_mode: str = "completion_eot"
    """all | completion | completion_eot."""
    last_turn_only: bool = False
    """Train only the last assistant turn of each conversation."""
    train_reasoning: str = "all"
    """Reasoning trained: all (of every turn the template renders it for: its own history policy, e.g. Qwen3
    renders it only after the last user message) | last (the last assistant turn's) | none."""
    input_format: str = "auto"
    """auto | messages | sharegpt | alpaca | pretokenized."""
    seq_len: Optional[int] = None
    """Longest kept document; longer ones follow ``long_policy``. None keeps everything."""
    long_policy: str = "drop"
    """drop | truncate conversations longer than seq_len."""
    overwrite: bool = False
    """Replace an existing dataset at ``output`` (readers keep the old files); without it, refuse."""
    skip_bad: bool = False
    """Skip and count bad lines instead of stopping at the first one."""
    max_bad_fraction: float = 0.1
    """With skip_bad, fail if more than this fraction of the lines read are bad (a wrong file, not a few bad lines)."""
    workers: int = 0
    """Tokenising processes; 0 means os.cpu_count(); 1 runs in-process."""
    chunk_lines: int = 128
    """Lines per work item (one tokenizer call per chunk)."""
    progress: bool = True
    """Draw a progress bar on stderr."""
    vocab_size: Optional[int] = None
    """Bound on pretokenized ids (the model's vocab_size); None: the tokenizer's, or none without one."""
    cache_dir: Optional[str] = None
    """Per-input-file cache of tokenised datasets (see megasft.data.cache); None: no cache."""

    def validate(self) -> None:
        for name, value, choices in (("mask_mode", self.mask_mode, MASK_MODES), ("input_format", self.input_format, FORMATS),
                                     ("long_policy", self.long_policy, LONG_POLICIES),
                                     ("train_reasoning", self.train_reasoning, REASONING_POLICIES)):
            if value not in choices:
                raise ValueError(f"{name}={value!r} is not one of {list(choices)}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction={self.max_bad_fraction} must be in [0, 1]")
        if self.tokenizer is None and self.input_format not in ("auto", "pretokenized"):
            raise ValueError(f"--format {self.input_format} needs --tokenizer (only pretokenized input_ids records "
                             "are read without one)")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"vocab_size={self.vocab_size} must be >= 1")
        input_files(self.inputs)
        check_replaceable(Path(os.path.abspath(self.output)), self.overwrite)


@dataclass
class ChunkResult:
    path: str
    ids: np.ndarray
    mask: np.ndarray
    lengths: list
    rows: list      # line / row of each kept document in its file
    truncated: int
    read: int
    dropped: list  # (reason, "file:line: ..." or None) per dropped line, in input order
    parts: np.ndarray  # uint8 part code per token of ``ids``
    notes: dict  # fields not rendered -> count, this chunk


# ---------------------------------------------------------------- worker side
_WORKER: dict = {}


def _load(opts: PreprocessOptions):
    """(tokenizer, template, vocabulary bound) of a run; the first two are None without a tokenizer."""
    if opts.tokenizer is None:
        return None, None, opts.vocab_size
    tok = load_tokenizer(opts.tokenizer, opts.template)
    template = get_template(opts.template, tokenizer_config=tok.config)
    return tok, template, opts.vocab_size if opts.vocab_size is not None else tok.vocab_size


def _init_worker(opts: PreprocessOptions) -> None:
    # One tokenising thread per process: the processes are the parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok, template, vocab = _load(opts)
    encoder = None if tok is None else ChatEncoder(tok, template, opts.mask_mode, opts.last_turn_only,
                                                   train_reasoning=opts.train_reasoning)
    _WORKER.update(opts=opts, vocab=vocab, encoder=encoder)


def _apply_length_policy(ids: np.ndarray, mask: np.ndarray, opts: PreprocessOptions):
    """-> (ids, mask, truncated?, drop reason or None)."""
    if opts.seq_len is not None and len(ids) > opts.seq_len:
        if opts.long_policy == "drop":
            return ids, mask, False, f"longer than seq_len={opts.seq_len}"
        ids, mask = ids[:opts.seq_len], mask[:opts.seq_len]
        if not mask.any():
            return ids, mask, True, "no trained tokens after truncation"
        return ids, mask, True, None
    if not mask.any():
        return ids, mask, False, "no trained tokens"
    return ids, mask, False, None


def process_chunk(chunk) -> ChunkResult:
    """Parse, render, tokenise and length-filter one chunk (a readers.LinesChunk or TableChunk)."""
    opts, vocab, encoder = _WORKER["opts"], _WORKER["vocab"], _WORKER["encoder"]
    path, unit = chunk.path, ROW if is_columnar(chunk.path) else ""
    records: list = []  # (line, record)
    dropped: list = []
    for line, item in chunk.records():
        try:
            record = parse_item(item, path, line, opts.input_format, vocab, unit)
            if encoder is None and not isinstance(record, Pretokenized):
                raise DataError(path, line, NEEDS_TOKENIZER, "a chat record, but no --tokenizer was given (only "
                                                             "pretokenized input_ids records are read without one)", unit)
            records.append((line, record))
        except DataError as e:
            if not opts.skip_bad:
                raise
            dropped.append((line, e.reason, str(e)))
    conversations = [r for _, r in records if not isinstance(r, Pretokenized)]
    if encoder is not None:
        encoder.notes.clear()
    encoded = iter(encoder.encode_parts(conversations) if conversations else ())
    ids_out, mask_out, parts_out, lengths, rows, truncated = [], [], [], [], [], 0
    for line, record in records:
        if isinstance(record, Pretokenized):
            ids, mask = record.input_ids, record.loss_mask.copy()
            mask[0] = 0  # nothing predicts a document's first token
            parts = np.full(len(ids), part_codes.UNATTRIBUTED, dtype=np.uint8)
        else:
            ids, mask, parts = next(encoded)
        ids, mask, was_truncated, reason = _apply_length_policy(ids, mask, opts)
        truncated += was_truncated
        if reason is not None:
            dropped.append((line, reason, None))
            continue
        ids_out.append(ids)
        mask_out.append(mask)
        parts_out.append(parts[:len(ids)])
        lengths.append(len(ids))
        rows.append(line)
    dropped.sort(key=lambda d: d[0])
    cat = (lambda xs, dt: np.concatenate(xs).astype(dt, copy=False) if xs else np.zeros(0, dt))
    # Ship ids at the dataset's dtype: a quarter of the bytes through the pool's pipe for uint16.
    return ChunkResult(path, cat(ids_out, token_dtype(vocab)), cat(mask_out, np.uint8), lengths, rows, truncated,
                       len(chunk), [(reason, msg) for _, reason, msg in dropped], cat(parts_out, np.uint8),
                       dict(encoder.notes) if encoder is not None else {})


# ---------------------------------------------------------------- main side
class Progress:
    """A one-line progress bar on stderr, by bytes of input consumed."""

    def __init__(self, total_bytes: int, enabled: bool) -> None:
        self.total, self.enabled, self.bytes_read = max(1, total_bytes), enabled, 0
        self.start = self.last = time.perf_counter()

    def update(self, read: int, tokens: int, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last < 0.2 and not force):
            return
        self.last = now
        frac = min(1.0, self.bytes_read / self.total)
        bar = "#" * int(30 * frac)
        rate = tokens / max(1e-9, now - self.start)
        sys.stderr.write(f"\r[{bar:<30}] {100 * frac:5.1f}%  {read} conv  {rate / 1e3:8.1f}k tok/s")
        if force:
            sys.stderr.write("\n")
        sys.stderr.flush()


def read_chunks(files: list[str], chunk_lines: int, progress: Optional[Progress] = None,
                order: Optional[deque] = None) -> Iterator:
    """The chunks of every file in order (a chunk never spans two files); ``order`` gets the index in
    ``files`` of each chunk yielded (a file may be given twice)."""
    done = 0  # bytes of the files finished
    for k, path in enumerate(files):
        def seen(consumed: int, base: int = done) -> None:
            if progress is not None:
                progress.bytes_read = base + consumed
        for chunk in file_chunks(path, chunk_lines, seen):
            if order is not None:
                order.append(k)
            yield chunk
        done += Path(path).stat().st_size


def _results(chunks: Iterator, opts: PreprocessOptions) -> Iterator[ChunkResult]:
    """process_chunk of every chunk, in order, by a pool holding at most IN_FLIGHT_PER_WORKER chunks
    per worker (Pool.imap would read ahead without bound, and buffer every result that finishes
    while an earlier, longer chunk is still being tokenised)."""
    workers = opts.workers or os.cpu_count() or 1
    if workers == 1:
        _init_worker(opts)
        yield from map(process_chunk, chunks)
        return
    # spawn, not fork: forking a process that runs other threads (torch's pools, a test
    # runner's queues) can copy a held lock into the child and deadlock the pool.
    pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(opts,))
    try:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(process_chunk, (chunk,)))
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
    finally:
        pool.terminate()
        pool.join()


class _FileSink:
    """Where one input file's documents go, and its summary."""

    def __init__(self, builder: IndexedDatasetBuilder, own: bool) -> None:
        self.builder, self.own, self.summary, self.hist = builder, own, Summary(files_tokenized=1), Counter()
        self.part_tokens, self.part_trained = np.zeros(256, np.int64), np.zeros(256, np.int64)

    def add(self, res: ChunkResult) -> None:
        s = self.summary
        self.builder.add_many(res.ids, res.mask, res.lengths, res.rows, parts=res.parts)
        total, trained = part_codes.count(res.parts, res.mask)
        self.part_tokens += total
        self.part_trained += trained
        for note, n in res.notes.items():
            s.not_rendered[note] = s.not_rendered.get(note, 0) + n
        self.hist.update(histogram_bucket(n) for n in res.lengths)
        s.read += res.read
        s.kept += len(res.lengths)
        s.truncated += res.truncated
        s.tokens += len(res.ids)
        s.trained_tokens += int(res.mask.sum())
        for reason, message in res.dropped:
            s.dropped[reason] = s.dropped.get(reason, 0) + 1
            if message is not None:   # a bad line, not a policy drop
                s.bad[reason] = s.bad.get(reason, 0) + 1
                if len(s.bad_examples) < 10:
                    s.bad_examples.append(message)

    def close(self, path: str) -> Summary:
        self.summary.histogram = {k: self.hist[k] for k in sorted(self.hist)}
        self.summary.parts = part_codes.as_table(self.part_tokens, self.part_trained)
        if self.own:   # a cache entry: finished on its own, with its summary
            self.builder.finish({"input": path, "summary": asdict(self.summary)})
        return self.summary


def _tokenize(files: list[str], opts: PreprocessOptions, open_sink, run: Summary) -> list[Summary]:
    """Tokenise ``files`` (one pool for all), each into ``open_sink(path)``; their summaries, in order."""
    if not files:
        return []   # everything came from the cache: no pool, no progress bar
    progress = Progress(sum(Path(p).stat().st_size for p in files), opts.progress)
    summaries: list[Summary] = []
    sinks: dict = {}   # index in files -> sink of a file being written
    order: deque = deque()   # file index of every chunk read and not yet written (results come in order)

    def close_until(k: int) -> None:   # files before index k are complete (also those without a record)
        while len(summaries) < k:
            i = len(summaries)
            sink = sinks.pop(i, None) or open_sink(files[i])
            summaries.append(sink.close(files[i]))
            run.add(summaries[-1])
    try:
        for res in _results(read_chunks(files, opts.chunk_lines, progress, order), opts):
            k = order.popleft()
            close_until(k)
            if k not in sinks:
                sinks[k] = open_sink(files[k])
            sinks[k].add(res)
            progress.update(run.read + sinks[k].summary.read, run.tokens + sinks[k].summary.tokens)
        close_until(len(files))
    except BaseException:
        for sink in sinks.values():
            if sink.own:
                sink.builder.abort()
        raise
    progress.update(run.read, run.tokens, force=True)
    return summaries


def _from_cache(files: list[str], opts: PreprocessOptions, cache: PreprocessCache, vocab,
                builder: IndexedDatasetBuilder, run: Summary) -> list[int]:
    """Tokenise the files the cache lacks into new entries, then copy every file's entry into the
    output, in input order. Returns the kept documents per file."""
    entries = [cache.entry(p) for p in files]
    by_path = dict(zip(files, entries))
    missing = list(dict.fromkeys(p for p, e in zip(files, entries) if cache.load(e) is None))   # each once
    _tokenize(missing, opts, lambda p: _FileSink(IndexedDatasetBuilder(by_path[p], vocab, overwrite=True,
                                                                       parts=True), True),
              Summary())
    docs = []
    fresh = set(missing)   # tokenised by this run: the first mention of each counts so, any repeat as cached
    for path, entry in zip(files, entries):
        ds = cache.load(entry)
        if ds is None:
            raise DatasetError(f"preprocessing cache entry {entry} of {path} vanished or is damaged while in use; "
                               "re-run (another run may be deleting the cache)")
        summary = Summary.from_dict(ds.meta["summary"])
        if path not in fresh:
            summary.files_tokenized, summary.files_cached = 0, 1
        fresh.discard(path)
        run.add(summary)
        copy_documents(ds, builder)
        docs.append(len(ds))
    return docs


def preprocess(opts: PreprocessOptions) -> Summary:
    """Run the whole pipeline; returns the summary (also stored in meta.json). On any error the
    output directory is left exactly as it was."""
    opts.validate()
    files = input_files(opts.inputs)
    tok, template, vocab = _load(opts)
    summary = Summary()
    start = time.perf_counter()
    with IndexedDatasetBuilder(opts.output, vocab, overwrite=opts.overwrite, parts=True) as builder:
        if opts.cache_dir:
            cache = PreprocessCache(opts.cache_dir, settings_key(opts, tok, template))
            docs = _from_cache(files, opts, cache, vocab, builder, summary)
        else:   # every file straight into the output
            docs = [s.kept for s in _tokenize(files, opts, lambda p: _FileSink(builder, own=False), summary)]
        summary.seconds = time.perf_counter() - start
        check_kept(summary, opts)
        specials = {name: getattr(tok, name) if tok is not None else None
                    for name in ("bos_id", "eos_id", "eot_id", "pad_id")}
        builder.finish({
            "tokenizer": str(Path(opts.tokenizer).resolve()) if opts.tokenizer else None,
            "tokenizer_sha256": tok.sha256 if tok is not None else None,
            "template": template.name if template is not None else None,
            "mask_mode": opts.mask_mode, "last_turn_only": opts.last_turn_only,
            "train_reasoning": opts.train_reasoning, "input_format": opts.input_format, "seq_len": opts.seq_len, "long_policy": opts.long_policy, "inputs": files, "docs_per_input": docs,
            "cache_dir": str(Path(opts.cache_dir).resolve()) if opts.cache_dir else None, **specials,
            "summary": {**asdict(summary), "trained_fraction": summary.trained_fraction},
        })
    return summary
