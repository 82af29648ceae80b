"""Input-format readers: one JSONL line -> a validated record, or a :class:`DataError` naming file:line.

Formats (auto-detected per line from its keys, or forced):
- ``messages``: ``{"messages": [{"role": ..., "content": ...}, ...], "tools": [...]}``, OpenAI-style, with
  tool calls, tool replies, reasoning and per-turn train flags: see :mod:`megasft.data.chat.schema`
- ``sharegpt``: ``{"conversations": [{"from": "human|gpt|system|tool|...", "value": str}, ...]}``
- ``alpaca``: ``{"instruction": str, "input": str (optional), "output": str, "system": str (optional)}``
- ``pretokenized``: ``{"input_ids": [int], "labels": [int]}``, labels HF-style (-100 = not trained,
  otherwise equal to input_ids at the same position), or ``{"input_ids": [int], "loss_mask": [0|1]}``
  (1 = input_ids[t] is a trained target). Needs no tokenizer; ids are bounded by ``vocab_size`` when
  one is known (a tokenizer's, or ``--vocab-size``), else by the uint32 the dataset stores.

JSONL files are read as users have them: plain, gzip or zstd (told by their first bytes, not their
name), with or without a UTF-8 byte-order mark, or a file holding one JSON array of records
(Alpaca's ``alpaca_data.json``). Parquet and Arrow rows (:mod:`megasft.data.readers`) arrive as
dicts and go through the same schema detection; a null field there is an absent one (a columnar
file has every column in every row).
"""
from __future__ import annotations

import gzip
import io
import json
import zlib
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import numpy as np

from megasft.data.chat.schema import Conversation, SchemaError, normalize_record

FORMATS = ("auto", "messages", "sharegpt", "alpaca", "pretokenized")

SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
    "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system",
    "tool": "tool", "function": "tool", "observation": "tool", "function_call": "assistant",
}


GZIP_MAGIC, ZSTD_MAGIC = b"\x1f\x8b", b"\x28\xb5\x2f\xfd"
BOM = b"\xef\xbb\xbf"
UNREADABLE = "unreadable file"   # a DataError reason no --skip-bad skips: the rest of the file is lost
NO_VOCAB_BOUND = 2 ** 32   # without a vocabulary, ids must fit the uint32 the dataset stores


class DataError(ValueError):
    """A bad input record. ``reason`` is a short category (counted by --skip-bad); str() names file:line
    (``unit="row "`` for a table row: file.parquet:row 17)."""

    def __init__(self, path: str, line: int, reason: str, detail: str, unit: str = "") -> None:
        super().__init__(f"{path}:{unit}{line}: {reason}: {detail}")
        self.path, self.line, self.reason, self.detail, self.unit = path, line, reason, detail, unit

    def __reduce__(self):  # travels back from worker processes intact
        return DataError, (self.path, self.line, self.reason, self.detail, self.unit)


@dataclass
class Pretokenized:
    input_ids: np.ndarray  # int64
    loss_mask: np.ndarray  # uint8


Record = Union[list, Pretokenized]  # a list of messages (a Conversation for the messages format), or ids + mask


def _decompressed(raw, path: str) -> tuple:
    """(byte stream, exceptions that mean a broken stream) of a plain, gzip or zstd file, told
    apart by its magic number."""
    errors = (OSError, EOFError, zlib.error)
    magic = raw.peek(4)[:4]
    if magic.startswith(GZIP_MAGIC):
        return gzip.GzipFile(fileobj=raw, mode="rb"), errors
    if magic == ZSTD_MAGIC:
        try:
            import zstandard
        except ImportError:
            raise DataError(path, 1, UNREADABLE, "zstd-compressed; pip install zstandard") from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw)), errors + (zstandard.ZstdError,)
    return raw, errors


def read_lines(path: str) -> Iterator[tuple[int, bytes, int]]:
    """(line number, raw line, bytes of the file consumed so far) for every line of a plain, gzip or
    zstd JSONL file; a UTF-8 BOM before the first line is dropped (json.loads rejects it). A broken
    compressed stream is a DataError at the line where it broke, never a run of "invalid utf-8"."""
    line, consumed = 0, 0
    with open(path, "rb") as raw:
        stream, errors = _decompressed(raw, path)
        try:
            for line, data in enumerate(stream, 1):
                consumed = raw.tell() if stream is not raw else consumed + len(data)
                if line == 1 and data.startswith(BOM):
                    data = data[len(BOM):]
                if line == 1 and data.lstrip().startswith(b"["):   # one JSON array of records (Alpaca's release)
                    yield from _array_records(path, data + stream.read(), raw)
                    return
                yield line, data, consumed
        except errors as e:
            raise DataError(path, line + 1, UNREADABLE, f"{type(e).__name__}: {e}") from None


def _array_records(path: str, text: bytes, raw) -> Iterator[tuple[int, bytes, int]]:
    """A file holding one JSON array: each element as a line (numbered from 1 in array order)."""
    try:
        records = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(path, 1, UNREADABLE, f"starts with '[' but is not one JSON array ({e}); convert it "
                        "to JSONL with: python -c \"import json,sys; [print(json.dumps(r)) for r in "
                        f"json.load(open(sys.argv[1]))]\" {path} > {path}l") from None
    end = raw.tell()
    for i, record in enumerate(records, 1):
        yield i, json.dumps(record, ensure_ascii=False).encode(), end


def detect_format(obj: dict) -> Optional[str]:
    if "messages" in obj:
        return "messages"
    if "conversations" in obj:
        return "sharegpt"
    if "input_ids" in obj:
        return "pretokenized"
    if "instruction" in obj and "output" in obj:
        return "alpaca"
    return None


def parse_item(item, path: str, line: int, fmt: str = "auto", vocab_size: Optional[int] = None,
               unit: str = "") -> Record:
    """One record as a reader gives it: raw bytes of a JSONL line, or the dict of a table row."""
    if isinstance(item, dict):
        return parse_record(_without_nulls(item), path, line, fmt, vocab_size, unit)
    return parse_line(item, path, line, fmt, vocab_size)


def _without_nulls(value):
    """Dicts without their None values, all the way down: in Parquet / Arrow a key absent from a record
    is a null in its row (the schema is the union of every record's keys)."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def parse_line(raw: bytes, path: str, line: int, fmt: str = "auto", vocab_size: Optional[int] = None) -> Record:
    """Decode, parse and validate one JSONL line. Raises DataError with a reason category."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, line, "invalid utf-8", f"byte {e.start}: {raw[e.start:e.start + 4]!r}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, line, "malformed json", f"{e.msg} at column {e.colno}") from None
    if not isinstance(obj, dict):
        raise DataError(path, line, "malformed json", f"expected a JSON object, got {type(obj).__name__}")
    return parse_record(obj, path, line, fmt, vocab_size)


def parse_record(obj: dict, path: str, line: int, fmt: str = "auto", vocab_size: Optional[int] = None,
                 unit: str = "") -> Record:
    """Detect the schema of one record (a dict) and validate it. Raises DataError naming path:line."""
    try:
        kind = detect_format(obj) if fmt == "auto" else fmt
        if kind is None:
            raise DataError(path, line, "unknown format", f"keys {sorted(obj)[:6]} match none of messages / "
                                                          "conversations / instruction+output / input_ids")
        if kind == "pretokenized":
            return _pretokenized(obj, path, line, vocab_size)
        messages = {"messages": _messages, "sharegpt": _sharegpt, "alpaca": _alpaca}[kind](obj, path, line)
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(path, line, "no assistant turn", "nothing to train on")
        return messages
    except DataError as e:
        if unit and not e.unit:
            raise DataError(e.path, e.line, e.reason, e.detail, unit) from None
        raise


def _message_list(obj: dict, key: str, path: str, line: int) -> list:
    value = obj.get(key)
    if not isinstance(value, list) or not value:
        raise DataError(path, line, "malformed record", f"{key!r} must be a non-empty list")
    return value


def _check_content(content, path: str, line: int, turn: int) -> str:
    if not isinstance(content, str):
        raise DataError(path, line, "non-string content", f"turn {turn} content is {type(content).__name__}")
    return content


def _messages(obj: dict, path: str, line: int) -> Conversation:
    try:
        return normalize_record(obj)
    except SchemaError as e:
        raise DataError(path, line, e.reason, e.detail) from None


def _sharegpt(obj: dict, path: str, line: int) -> list:
    out = []
    if isinstance(obj.get("system"), str) and obj["system"]:
        out.append({"role": "system", "content": obj["system"]})
    for i, m in enumerate(_message_list(obj, "conversations", path, line)):
        if not isinstance(m, dict):
            raise DataError(path, line, "malformed record", f"turn {i} is not an object")
        role = SHAREGPT_ROLES.get(m.get("from"))
        if role is None:
            raise DataError(path, line, "unknown role",
                            f"turn {i} from {m.get('from')!r}; valid: {sorted(SHAREGPT_ROLES)}")
        out.append({"role": role, "content": _check_content(m.get("value"), path, line, i)})
    return out


def _alpaca(obj: dict, path: str, line: int) -> list:
    instruction = _check_content(obj.get("instruction"), path, line, 0)
    extra = _check_content(obj.get("input", ""), path, line, 0)
    output = _check_content(obj.get("output"), path, line, 1)
    out = []
    if obj.get("system"):
        out.append({"role": "system", "content": _check_content(obj["system"], path, line, 0)})
    # The Alpaca convention: the optional input follows the instruction after a blank line.
    out.append({"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction})
    out.append({"role": "assistant", "content": output})
    return out


def _pretokenized(obj: dict, path: str, line: int, vocab_size: Optional[int]) -> Pretokenized:
    ids = obj.get("input_ids")
    if "labels" not in obj and "loss_mask" in obj:
        mask = obj["loss_mask"]
        if not isinstance(mask, list) or not all(m in (0, 1) for m in mask):
            raise DataError(path, line, "malformed record", "loss_mask must be a list of 0 / 1")
        # loss_mask[t] = 1: input_ids[t] is a trained target -- the same positions as HF labels.
        labels = [i if m else -100 for i, m in zip(ids, mask)] if isinstance(ids, list) and len(ids) == len(mask) else mask
    else:
        labels = obj.get("labels")
    if not isinstance(ids, list) or not isinstance(labels, list) or len(ids) != len(labels) or not ids:
        raise DataError(path, line, "malformed record",
                        "input_ids and labels (or loss_mask) must be non-empty lists of equal length")
    try:
        ids_arr, lab_arr = np.asarray(ids), np.asarray(labels)
    except ValueError:  # ragged nesting
        ids_arr = lab_arr = np.zeros((0, 0))
    if ids_arr.ndim != 1 or lab_arr.ndim != 1 or ids_arr.dtype.kind != "i" or lab_arr.dtype.kind != "i":
        raise DataError(path, line, "malformed record", "input_ids/labels must be flat lists of integers")
    ids_arr, lab_arr = ids_arr.astype(np.int64), lab_arr.astype(np.int64)
    bound = NO_VOCAB_BOUND if vocab_size is None else vocab_size
    out = np.flatnonzero((ids_arr < 0) | (ids_arr >= bound))
    if len(out):
        t = int(out[0])
        where = "--vocab-size / the tokenizer's vocabulary" if vocab_size is not None else "uint32 (no --vocab-size given)"
        raise DataError(path, line, "token id out of range",
                        f"input_ids[{t}]={int(ids_arr[t])}, ids must be in [0, {bound}) ({where})")
    trained = lab_arr != -100
    bad = np.flatnonzero(trained & (lab_arr != ids_arr))
    if len(bad):
        t = int(bad[0])
        raise DataError(path, line, "labels not aligned",
                        f"labels[{t}]={int(lab_arr[t])} but input_ids[{t}]={int(ids_arr[t])}; labels follow HF "
                        "(labels[t] == input_ids[t] or -100, the loss shifts) — are they shifted by one already?")
    if not trained.any():
        raise DataError(path, line, "no assistant turn", "every label is -100")
    return Pretokenized(ids_arr, trained.astype(np.uint8))
