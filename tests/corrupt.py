"""Damaging files on purpose, for the tests of what megasft detects."""
from __future__ import annotations

from pathlib import Path


def flip_byte(root: Path, data: Path | None = None) -> Path:
    """Invert one byte in the middle of `data` (default: the largest data file under `root`);
    the size stays the same."""
    data = data or max(root.glob("*.distcp"), key=lambda f: f.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    return data
