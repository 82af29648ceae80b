"""Chat JSONL -> indexed dataset, tokenised by a pool of worker processes (logic behind
``tools/preprocess_data.py``).

Lines are read as bytes in the main process, parsed + rendered + tokenised in chunks by workers
(each holds its own tokenizer), and written in input order, so the output does not depend on the
number of workers. Every line ends up in exactly one bucket of the :class:`Summary`: kept, dropped
by policy (too long, nothing to train) or bad input (an error naming file:line, or a count with
``skip_bad``). A run that keeps nothing, or skips more than ``max_bad_fraction`` of its lines as bad,
is an error, and the output (written atomically, see :mod:`megasft.data.indexed`) is left as it was.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from megasft.data.formats import FORMATS, DataError, Pretokenized, input_files, parse_line, read_lines
from megasft.data.indexed import DatasetError, IndexedDatasetBuilder, check_replaceable, token_dtype
from megasft.data.chat import parts as part_codes
from megasft.data.templates import MASK_MODES, REASONING_POLICIES, ChatEncoder, get_template
from megasft.data.tokenizer import load_tokenizer

LONG_POLICIES = ("drop", "truncate")


@dataclass
class PreprocessOptions:
    inputs: list[str]
    """JSONL files (plain, .gz or .zst) or directories of them, read in order."""
    output: str
    """Directory for the indexed dataset."""
    tokenizer: str
    """sentencepiece .model, tokenizer.json, or a directory holding one."""
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

    def validate(self) -> None:
        for name, value, choices in (("mask_mode", self.mask_mode, MASK_MODES), ("input_format", self.input_format, FORMATS),
                                     ("long_policy", self.long_policy, LONG_POLICIES),
                                     ("train_reasoning", self.train_reasoning, REASONING_POLICIES)):
            if value not in choices:
                raise ValueError(f"{name}={value!r} is not one of {list(choices)}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction={self.max_bad_fraction} must be in [0, 1]")
        input_files(self.inputs)
        check_replaceable(Path(os.path.abspath(self.output)), self.overwrite)


@dataclass
class Summary:
    read: int = 0
    kept: int = 0
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    dropped: dict = field(default_factory=dict)
    """reason -> count: policy drops and, with skip_bad, bad lines."""
    bad: dict = field(default_factory=dict)
    """reason -> count of the bad lines alone (a subset of ``dropped``)."""
    bad_examples: list = field(default_factory=list)
    """First few skipped bad lines as 'file:line: reason: detail'."""
    histogram: dict = field(default_factory=dict)
    """Kept-document length bucket upper bound -> count."""
    parts: dict = field(default_factory=dict)
    """"role/part" (e.g. "assistant/content", "user/other", "template/other") -> [tokens, trained tokens] of
    the kept documents (megasft.data.chat.parts)."""
    not_rendered: dict = field(default_factory=dict)
    """Fields the template did not render, skipped and counted (e.g. reasoning Qwen3 drops from history)."""
    seconds: float = 0.0

    @property
    def trained_fraction(self) -> float:
        return self.trained_tokens / max(1, self.tokens)


@dataclass
class ChunkResult:
    ids: np.ndarray
    mask: np.ndarray
    lengths: list
    truncated: int
    read: int
    dropped: list  # (reason, "file:line: ..." or None) per dropped line, in input order
    parts: np.ndarray  # uint8 part code per token of ``ids``
    notes: dict  # fields not rendered -> count, this chunk


# ---------------------------------------------------------------- worker side
_WORKER: dict = {}


def _init_worker(opts: PreprocessOptions) -> None:
    # One tokenising thread per process: the processes are the parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = load_tokenizer(opts.tokenizer, opts.template)
    template = get_template(opts.template, tokenizer_config=tok.config)
    _WORKER.update(opts=opts, tok=tok, encoder=ChatEncoder(tok, template, opts.mask_mode, opts.last_turn_only,
                                                           train_reasoning=opts.train_reasoning))


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


def process_chunk(chunk: list) -> ChunkResult:
    """Parse, render, tokenise and length-filter one chunk of (path, line, bytes)."""
    opts, tok, encoder = _WORKER["opts"], _WORKER["tok"], _WORKER["encoder"]
    records: list = []  # (position in chunk, record)
    dropped: list = []
    for path, line, raw in chunk:
        try:
            records.append((path, line, parse_line(raw, path, line, opts.input_format, tok.vocab_size)))
        except DataError as e:
            if not opts.skip_bad:
                raise
            dropped.append((line, e.reason, str(e)))
    conversations = [r for _, _, r in records if not isinstance(r, Pretokenized)]
    encoder.notes.clear()
    encoded = iter(encoder.encode_parts(conversations))
    ids_out, mask_out, parts_out, lengths, truncated = [], [], [], [], 0
    for path, line, record in records:
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
    dropped.sort(key=lambda d: d[0])
    cat = (lambda xs, dt: np.concatenate(xs).astype(dt, copy=False) if xs else np.zeros(0, dt))
    # Ship ids at the dataset's dtype: a quarter of the bytes through the pool's pipe for uint16.
    return ChunkResult(cat(ids_out, token_dtype(tok.vocab_size)), cat(mask_out, np.uint8), lengths, truncated,
                       len(chunk), [(reason, msg) for _, reason, msg in dropped], cat(parts_out, np.uint8),
                       dict(encoder.notes))


# ---------------------------------------------------------------- main side
def read_chunks(paths: list[str], chunk_lines: int, progress: Optional["Progress"] = None) -> Iterator[list]:
    chunk: list = []
    done = 0  # bytes of the files finished
    for path in paths:
        for line, raw, consumed in read_lines(path):
            if progress is not None:
                progress.bytes_read = done + consumed
            if not raw.strip():
                continue  # blank lines are not records
            chunk.append((path, line, raw))
            if len(chunk) == chunk_lines:
                yield chunk
                chunk = []
        done += Path(path).stat().st_size
    if chunk:
        yield chunk


class Progress:
    """A one-line progress bar on stderr, by bytes of input consumed."""

    def __init__(self, total_bytes: int, enabled: bool) -> None:
        self.total, self.enabled, self.bytes_read = max(1, total_bytes), enabled, 0
        self.start = self.last = time.perf_counter()

    def update(self, summary: Summary, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last < 0.2 and not force):
            return
        self.last = now
        frac = min(1.0, self.bytes_read / self.total)
        bar = "#" * int(30 * frac)
        rate = summary.tokens / max(1e-9, now - self.start)
        sys.stderr.write(f"\r[{bar:<30}] {100 * frac:5.1f}%  {summary.read} conv  {rate / 1e3:8.1f}k tok/s")
        if force:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _histogram_bucket(n: int) -> int:
    return 1 << max(6, (n - 1).bit_length())  # powers of two from 64


def _counts(counts: dict) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items()))


def check_kept(s: Summary, opts: PreprocessOptions) -> None:
    """DatasetError for a run whose output must not replace anything: more bad lines than
    ``max_bad_fraction`` of those read (the wrong file, or a format misread, skipped line by
    line), or no document kept at all."""
    n_bad = sum(s.bad.values())
    if opts.skip_bad and n_bad > opts.max_bad_fraction * s.read:
        raise DatasetError(f"{n_bad} of {s.read} lines are bad ({n_bad / max(1, s.read):.1%} > --max-bad-fraction "
                           f"{opts.max_bad_fraction:g}; {_counts(s.bad)}), first {s.bad_examples[0]}; fix the input "
                           "or raise --max-bad-fraction")
    if s.kept == 0:
        dropped = f" ({_counts(s.dropped)})" if s.dropped else ""
        raise DatasetError(f"no conversation kept of {s.read} read{dropped}: the dataset would be empty; "
                           "check the input, --format, --mask-mode and --seq-len")


def _tokenize_into(builder: IndexedDatasetBuilder, files: list[str], opts: PreprocessOptions,
                   summary: Summary, hist: Counter) -> None:
    part_tokens, part_trained = np.zeros(256, np.int64), np.zeros(256, np.int64)
    progress = Progress(sum(Path(p).stat().st_size for p in files), opts.progress)
    chunks = read_chunks(files, opts.chunk_lines, progress)
    workers = opts.workers or os.cpu_count() or 1
    if workers == 1:
        _init_worker(opts)
        results = map(process_chunk, chunks)
        pool = None
    else:
        # spawn, not fork: forking a process that runs other threads (torch's pools, a test
        # runner's queues) can copy a held lock into the child and deadlock the pool.
        pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(opts,))
        results = pool.imap(process_chunk, chunks)  # ordered: output order == input order
    try:
        for res in results:
            builder.add_many(res.ids, res.mask, res.lengths, res.parts)
            total, trained = part_codes.count(res.parts, res.mask)
            part_tokens += total
            part_trained += trained
            for note, n in res.notes.items():
                summary.not_rendered[note] = summary.not_rendered.get(note, 0) + n
            hist.update(_histogram_bucket(n) for n in res.lengths)
            summary.read += res.read
            summary.kept += len(res.lengths)
            summary.truncated += res.truncated
            summary.tokens += len(res.ids)
            summary.trained_tokens += int(res.mask.sum())
            for reason, message in res.dropped:
                summary.dropped[reason] = summary.dropped.get(reason, 0) + 1
                if message is not None:   # a bad line, not a policy drop
                    summary.bad[reason] = summary.bad.get(reason, 0) + 1
                    if len(summary.bad_examples) < 10:
                        summary.bad_examples.append(message)
            progress.update(summary)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    progress.update(summary, force=True)
    summary.parts = part_codes.as_table(part_tokens, part_trained)


def preprocess(opts: PreprocessOptions) -> Summary:
    """Run the whole pipeline; returns the summary (also stored in meta.json). On any error the
    output directory is left exactly as it was."""
    opts.validate()
    files = input_files(opts.inputs)
    tok = load_tokenizer(opts.tokenizer, opts.template)
    template = get_template(opts.template, tokenizer_config=tok.config)
    summary, hist = Summary(), Counter()
    start = time.perf_counter()
    with IndexedDatasetBuilder(opts.output, tok.vocab_size, overwrite=opts.overwrite, parts=True) as builder:
        _tokenize_into(builder, files, opts, summary, hist)
        summary.seconds = time.perf_counter() - start
        summary.histogram = {k: hist[k] for k in sorted(hist)}
        check_kept(summary, opts)
        builder.finish({
            "tokenizer": str(Path(opts.tokenizer).resolve()) if opts.tokenizer else None,
            "tokenizer_sha256": tok.sha256, "template": template.name,
            "mask_mode": opts.mask_mode, "last_turn_only": opts.last_turn_only,
            "train_reasoning": opts.train_reasoning, "input_format": opts.input_format,
            "seq_len": opts.seq_len, "long_policy": opts.long_policy, "inputs": files,
            "bos_id": tok.bos_id, "eos_id": tok.eos_id, "eot_id": tok.eot_id, "pad_id": tok.pad_id,
            "summary": {**asdict(summary), "trained_fraction": summary.trained_fraction},
        })
    return summary


def format_summary(s: Summary) -> str:
    """The human-readable report printed by the CLI."""
    lines = [
        f"conversations read   {s.read:>12,}",
        f"kept                 {s.kept:>12,}",
        f"dropped              {sum(s.dropped.values()):>12,}",
        *[f"  {reason:<34}{n:>8,}" for reason, n in sorted(s.dropped.items())],
        f"truncated            {s.truncated:>12,}",
        f"tokens               {s.tokens:>12,}",
        f"trained tokens       {s.trained_tokens:>12,}",
        f"trained fraction     {s.trained_fraction:>12.3f}",
        f"throughput           {s.tokens / max(s.seconds, 1e-9):>12,.0f} tokens/s",
    ]
    if s.not_rendered:
        lines += ["not rendered by the template (skipped, counted):",
                  *[f"  {note:<34}{n:>8,}" for note, n in sorted(s.not_rendered.items())]]
    if s.parts:
        lines += ["tokens per role/part (trained / all):", *format_parts(s.parts)]
    if s.bad_examples:
        lines += ["skipped lines (first %d):" % len(s.bad_examples), *[f"  {m}" for m in s.bad_examples]]
    if s.histogram:
        lines.append("document length histogram (tokens <= bucket):")
        peak = max(s.histogram.values())
        for bucket, n in s.histogram.items():
            lines.append(f"  {bucket:>7}  {n:>9,}  {'#' * max(1, round(40 * n / peak))}")
    return "\n".join(lines)


def format_parts(table: dict) -> list[str]:
    """Rows of a {"role/part": [tokens, trained]} table (Summary.parts, the audit)."""
    return [f"  {name:<28}{trained:>12,} / {tokens:<12,} ({trained / max(1, tokens):6.1%})"
            for name, (tokens, trained) in table.items()]
