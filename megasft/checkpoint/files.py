"""A checkpoint directory on disk: step directories, the ``latest`` pointer, validation, reading.

    <checkpoint.dir>/latest            text: the name of the newest complete checkpoint
    <checkpoint.dir>/step_00000200/    one DCP checkpoint (.metadata + *.distcp, config.yaml)
    <checkpoint.dir>/.tmp-step_.../    a save in progress or killed: never read, pruned later

Everything here works without a process group (each rank, or a converter, reads on its own).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from pathlib import Path
from typing import Optional

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException

from megasft.checkpoint.planner import CheckpointMismatch, PiecesLoadPlanner

LATEST = "latest"
TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or unreadable; the message names the file."""


@contextlib.contextmanager
def quiet_single_process():
    """DCP warns that it "assumes a single process" on every no_dist call without a process group."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def step_name(step: int) -> str:
    return f"step_{step:08d}"


# ----------------------------------------------------------------------------- paths
def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from `path`: the checkpoint itself (has .metadata) or a checkpoint
    root whose ``latest`` names one."""
    path = Path(path)
    if (path / ".metadata").exists():
        return path
    latest = path / LATEST
    if latest.exists():
        target = path / latest.read_text().strip()
        if not (target / ".metadata").exists():
            raise CheckpointError(f"{latest} names {target.name!r}, but {target / '.metadata'} does not exist; "
                                  "the checkpoint was deleted or is incomplete — point checkpoint.load at an "
                                  "older step directory")
        return target
    if path.is_dir():
        found = sorted(p.name for p in path.glob("step_*") if (p / ".metadata").exists())
        hint = f"complete checkpoints here: {found}; load one by path" if found else "no complete checkpoint here"
        raise CheckpointError(f"{latest} not found ({hint})")
    raise CheckpointError(f"{path}: no such checkpoint directory")


def find_resume_path(cfg) -> Optional[Path]:
    """The checkpoint ``checkpoint.load`` asks for: None for a fresh start (load unset, or auto
    with no checkpoint saved yet)."""
    load = cfg.checkpoint.load
    if not load:
        return None
    if load == "auto":
        root = checkpoint_root(cfg)
        complete = root.is_dir() and any((p / ".metadata").exists() for p in root.glob("step_*"))
        if not (root / LATEST).exists() and not complete:
            return None   # nothing saved yet (a first save killed midway leaves only .tmp-*)
        return resolve_checkpoint(root)
    return resolve_checkpoint(load)


def checkpoint_root(cfg) -> Path:
    return cfg.checkpoint.root(cfg.train.run_dir)


# ----------------------------------------------------------------------------- reading
def check_files(path: Path):
    """Read .metadata and check every data file it references is there and long enough (a
    truncated or missing file is named before anything is loaded). Returns the DCP Metadata."""
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except FileNotFoundError as err:
        raise CheckpointError(f"{path / '.metadata'} not found: not a complete checkpoint") from err
    except Exception as err:  # noqa: BLE001 - unpickling garbage raises anything
        raise CheckpointError(f"{path / '.metadata'} is corrupt ({type(err).__name__}: {err})") from err
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.exists():
            raise CheckpointError(f"{file} is missing (listed in {path / '.metadata'})")
        if file.stat().st_size < size:
            raise CheckpointError(f"{file} is truncated: {file.stat().st_size} bytes, the checkpoint "
                                  f"metadata needs at least {size}")
    return metadata


def read_meta(path: str | Path) -> dict:
    """The ``meta`` record of a checkpoint (no process group needed)."""
    path = Path(path)
    state = {"meta": None}
    load_dcp(state, path, PiecesLoadPlanner(str(path)), None, no_dist=True)
    return state["meta"]


def load_dcp(state: dict, path: Path, planner, group, no_dist: bool) -> None:
    """dcp.load with errors that name the checkpoint (a shape mismatch stays a CheckpointMismatch)."""
    try:
        with quiet_single_process():
            dcp.load(state, checkpoint_id=str(path), planner=planner, process_group=group, no_dist=no_dist)
    except CheckpointException as err:
        causes = [e for e, _ in err.failures.values()] if hasattr(err, "failures") else []
        mismatch = next((c for c in causes if isinstance(c, CheckpointMismatch)), None)
        if mismatch is not None:
            raise CheckpointMismatch(str(mismatch)) from err
        raise CheckpointError(f"{path}: reading the checkpoint failed: {err}") from err
    except CheckpointMismatch:
        raise
    except Exception as err:  # noqa: BLE001 - corrupt data files fail inside torch.load
        raise CheckpointError(f"{path}: reading the checkpoint failed ({type(err).__name__}: {err}); "
                              "a data file is probably corrupt") from err


def write_latest(root: Path, name: str) -> None:
    """Point ``latest`` at `name` atomically (write a temp file, fsync, os.replace)."""
    tmp = root / (LATEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)   # make the renames durable before anyone trusts latest
    finally:
        os.close(fd)


def prune(root: Path, keep_last: int, keep: str) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (keep_last <= 0 keeps all) and
    leftover temporary directories; never the one named `keep`."""
    for tmp in root.glob(TMP_PREFIX + "*"):
        shutil.rmtree(tmp, ignore_errors=True)
    if keep_last <= 0:
        return
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in done[:-keep_last]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)
