"""Input files -> chunks of raw records, streamed: no reader holds more than one chunk of a file.

Three kinds of file, told by name (JSONL compression by content, see :mod:`megasft.data.formats`):
- JSONL: ``*.jsonl``, ``*.jsonl.gz``, ``*.jsonl.zst`` (a file given by name may be called anything);
- Parquet: ``*.parquet``, read record batch by record batch (``pyarrow.parquet.ParquetFile.iter_batches``);
- Arrow IPC streams: ``*.arrow``, the files ``datasets.Dataset.save_to_disk`` writes (``data-*.arrow`` beside
  ``dataset_info.json`` / ``state.json``), read batch by batch from a memory map with pyarrow's IPC
  stream reader; the ``datasets`` package is not needed.

A directory is a ``save_to_disk`` dataset (its ``state.json`` lists the files in order), or a folder of
input files and ``save_to_disk`` datasets, in name order. A ``DatasetDict`` (``dataset_dict.json``) is
refused: which split to train on is the user's choice.

Chunks travel to the worker processes as they are (a columnar chunk as the Arrow IPC bytes of its
rows -- pickling a RecordBatch slice would ship the whole batch's buffers -- turned into Python objects
there, not in the reading process) and yield ``(line or row, item)``: raw bytes of a JSONL line, or the
dict of one table row. Memory per file: one record batch (Parquet: at most BATCH_ROWS rows; Arrow:
the file's own batches, views of the memory map). Rows are numbered from 0, as ``table.slice(i, 1)``
and ``load_from_disk(dir)[i]`` count them (for a multi-file dataset: within the named ``.arrow`` file);
lines from 1, as editors count them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from megasft.data.formats import DataError, UNREADABLE, read_lines

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PARQUET_SUFFIXES = (".parquet",)
ARROW_SUFFIXES = (".arrow",)
INPUT_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES + ARROW_SUFFIXES
DATASETS_STATE, DATASETS_INFO, DATASETS_DICT = "state.json", "dataset_info.json", "dataset_dict.json"
BATCH_ROWS = 8192   # Parquet rows decoded at a time
ROW = "row "   # DataError.unit of table rows: "file.parquet:row 17: reason: detail"


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise ImportError("reading Parquet / Arrow (datasets save_to_disk) input needs pyarrow: "
                          "pip install 'megasft[data]' (or pip install pyarrow)") from None
    return pyarrow


def is_columnar(path: str) -> bool:
    return path.endswith(PARQUET_SUFFIXES + ARROW_SUFFIXES)


def _datasets_dir_files(path: Path) -> Optional[list[str]]:
    """The ``.arrow`` files of a ``save_to_disk`` directory, in the dataset's order; None if it is not one."""
    state = path / DATASETS_STATE
    if not state.is_file():
        return None
    try:
        names = [f["filename"] for f in json.loads(state.read_text(encoding="utf-8"))["_data_files"]]
    except (ValueError, KeyError, TypeError) as e:
        raise FileNotFoundError(f"{state}: not a datasets save_to_disk state file ({type(e).__name__}: {e}); "
                                "re-save the dataset with Dataset.save_to_disk") from None
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{path}: {state.name} lists {missing[0]}, which is missing; the saved dataset is "
                                "incomplete: copy it again or re-save it")
    return [str(path / n) for n in names]


def input_files(inputs: list[str]) -> list[str]:
    """The files to read, in order: a file as given; a ``save_to_disk`` directory as its ``.arrow`` files;
    any other directory as its INPUT_SUFFIXES files and ``save_to_disk`` subdirectories, by name."""
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            if (path / DATASETS_DICT).is_file():
                splits = json.loads((path / DATASETS_DICT).read_text(encoding="utf-8")).get("splits", [])
                raise FileNotFoundError(f"{path} is a datasets DatasetDict (splits {splits}); pass one split's "
                                        f"directory, e.g. {path / (splits[0] if splits else 'train')}")
            own = _datasets_dir_files(path)
            if own is not None:
                files += own
                continue
            found = []
            for child in sorted(path.iterdir()):
                if child.is_file() and child.name.endswith(INPUT_SUFFIXES):
                    found.append(str(child))
                elif child.is_dir() and (sub := _datasets_dir_files(child)) is not None:
                    found += sub
            if not found:
                patterns = " / ".join("*" + s for s in INPUT_SUFFIXES)
                raise FileNotFoundError(f"input directory {path} holds no {patterns} files and no datasets "
                                        "save_to_disk directory; pass the files themselves or the directory that "
                                        "holds them")
            files += found
        elif path.is_file():
            files.append(str(path))
        else:
            raise FileNotFoundError(f"input {path} does not exist")
    return files


@dataclass
class LinesChunk:
    """JSONL lines of one file: (line number, raw bytes)."""

    path: str
    lines: list

    def __len__(self) -> int:
        return len(self.lines)

    def records(self) -> Iterator[tuple[int, object]]:
        return iter(self.lines)


@dataclass
class TableChunk:
    """Consecutive rows ``first_row ..`` of one Parquet / Arrow file, as an Arrow IPC stream of one batch."""

    path: str
    first_row: int
    rows: int
    ipc: bytes

    @classmethod
    def of(cls, path: str, first_row: int, batch) -> "TableChunk":
        pa = _pyarrow()
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, batch.schema) as writer:   # writes the slice's rows only
            writer.write_batch(batch)
        return cls(path, first_row, batch.num_rows, sink.getvalue().to_pybytes())

    def __len__(self) -> int:
        return self.rows

    def records(self) -> Iterator[tuple[int, object]]:
        # to_pylist in the worker: it is the costly step, the reading process only copies buffers.
        batch = _pyarrow().ipc.open_stream(self.ipc).read_next_batch()
        return enumerate(batch.to_pylist(), self.first_row)


def _jsonl_chunks(path: str, chunk_lines: int, progress: Callable[[int], None]) -> Iterator[LinesChunk]:
    lines: list = []
    for line, raw, consumed in read_lines(path):
        progress(consumed)
        if not raw.strip():
            continue  # blank lines are not records
        lines.append((line, raw))
        if len(lines) == chunk_lines:
            yield LinesChunk(path, lines)
            lines = []
    if lines:
        yield LinesChunk(path, lines)


def _batches(path: str):
    """(record batches, their total row count or None, the mapped source or None) of a Parquet or Arrow
    IPC file."""
    pa = _pyarrow()
    try:
        if path.endswith(PARQUET_SUFFIXES):
            pf = pa.parquet.ParquetFile(path)
            return pf.iter_batches(batch_size=BATCH_ROWS), pf.metadata.num_rows, None
        source = pa.memory_map(path)   # zero-copy: batches are views of the mapped file
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(source)   # the random-access IPC ("Feather v2") layout
            return (reader.get_batch(i) for i in range(reader.num_record_batches)), None, source
        return iter(reader), None, source
    except (pa.ArrowException, OSError) as e:
        raise DataError(path, 0, UNREADABLE, f"not a readable {Path(path).suffix} file: {e}", ROW) from None


def _table_chunks(path: str, chunk_lines: int, progress: Callable[[int], None]) -> Iterator[TableChunk]:
    pa = _pyarrow()
    size = Path(path).stat().st_size
    batches, total, source = _batches(path)
    row = 0
    try:
        for batch in batches:
            for start in range(0, batch.num_rows, chunk_lines):
                piece = batch.slice(start, chunk_lines)
                yield TableChunk.of(path, row, piece)
                row += piece.num_rows
                progress(size * row // total if total else source.tell())
    except (pa.ArrowException, OSError) as e:
        raise DataError(path, row, UNREADABLE, f"{type(e).__name__}: {e}", ROW) from None
    progress(size)


def file_chunks(path: str, chunk_lines: int, progress: Optional[Callable[[int], None]] = None):
    """The chunks of one input file; ``progress(bytes of the file consumed)`` is called as it is read."""
    progress = progress or (lambda _: None)
    if is_columnar(path):
        return _table_chunks(path, chunk_lines, progress)
    return _jsonl_chunks(path, chunk_lines, progress)
