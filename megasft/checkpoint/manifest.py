"""Checksums: ``manifest.json`` lists every file of a checkpoint with its size and sha256.

    {"algorithm": "sha256", "files": {".metadata": {"bytes": 1234, "sha256": "9f2c..."},
                                      "__0_0.distcp": {...}, ...}}

Written at save by ChecksummedWriter: each rank hashes the data files it wrote right after
writing them (so the bytes come from the page cache, and for an async save in the background
thread) into a part file ``.sha256__<rank>_.json``; DCP's coordinator, after it wrote
``.metadata``, merges the parts, adds ``.metadata`` itself and writes ``manifest.json`` last. A
directory with a manifest therefore finished writing; one without it did not (or predates
checksums).

Checked at load by hashing each file once, split across the loading ranks (``share``): every
byte is read once in total, while loading reads the model weights once per DP rank, so the check
costs less than the load it guards. Sizes are checked first (a stat per file), so a truncated or
missing file is named without reading anything.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from torch.distributed.checkpoint import FileSystemWriter

MANIFEST = "manifest.json"
ALGORITHM = "sha256"
PART_PREFIX = ".sha256"


def digest(file: Path) -> str:
    with open(file, "rb") as f:
        return hashlib.file_digest(f, ALGORITHM).hexdigest()


def write_json_atomic(file: Path, obj) -> None:
    """Write, fsync, then rename into place: a reader sees the whole file or none."""
    tmp = file.with_name(file.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, file)


def _entries(root: Path, names) -> dict:
    return {n: {"bytes": (root / n).stat().st_size, ALGORITHM: digest(root / n)} for n in sorted(names)}


class ChecksummedWriter(FileSystemWriter):
    """DCP's FileSystemWriter that also writes manifest.json (see the module docstring)."""

    def write_data(self, plan, planner):
        future = super().write_data(plan, planner)   # writes synchronously; the future is done
        root = Path(self.path)
        names = {result.storage_data.relative_path for result in future.value()}
        write_json_atomic(root / f"{PART_PREFIX}{plan.storage_data.prefix}.json", _entries(root, names))
        return future

    def finish(self, metadata, results) -> None:
        super().finish(metadata, results)   # writes .metadata
        root = Path(self.path)
        parts = sorted(root.glob(PART_PREFIX + "*.json"))
        files = {}
        for part in parts:
            files.update(json.loads(part.read_text()))
        missing = sorted({info.relative_path for info in metadata.storage_data.values()} - set(files))
        if missing:
            raise RuntimeError(f"{root}: no checksum from the rank that wrote {missing[0]}")
        files.update(_entries(root, [".metadata"]))
        write_json_atomic(root / MANIFEST, {"algorithm": ALGORITHM, "files": files})
        for part in parts:
            part.unlink()


def read_manifest(path: Path) -> tuple[Optional[dict], Optional[str]]:
    """(manifest, None), or (None, why it cannot be used); (None, None) when there is none."""
    file = path / MANIFEST
    if not file.exists():
        return None, None
    try:
        manifest = json.loads(file.read_text())
        return manifest, None if manifest.get("algorithm") == ALGORITHM else f"{file}: unknown algorithm"
    except (ValueError, OSError) as err:
        return None, f"{file} is unreadable ({type(err).__name__}: {err})"


def size_problem(path: Path, manifest: dict) -> Optional[str]:
    """The first listed file that is missing or has another size than the manifest says."""
    for name, entry in sorted(manifest["files"].items()):
        file = path / name
        if not file.exists():
            return f"{file} is missing (listed in {path / MANIFEST})"
        if file.stat().st_size != entry["bytes"]:
            return f"{file} has {file.stat().st_size} bytes, {path / MANIFEST} lists {entry['bytes']}"
    return None


def share(manifest: dict, rank: int, world: int) -> list[str]:
    """The files rank `rank` of `world` hashes: every world-th, so big per-rank files spread out."""
    return sorted(manifest["files"])[rank::world]


def digest_problem(path: Path, manifest: dict, names: list[str]) -> Optional[str]:
    """The first of `names` whose sha256 differs from the manifest's (same size, other bytes)."""
    for name in names:
        expected, actual = manifest["files"][name][ALGORITHM], digest(path / name)
        if actual != expected:
            return (f"{path / name} is corrupt: its sha256 is {actual[:16]}..., {path / MANIFEST} recorded "
                    f"{expected[:16]}... when it was written")
    return None
