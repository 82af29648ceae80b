"""A checkpoint directory on disk: step directories, the ``latest`` pointer, checks, reading, publishing.

    <checkpoint.dir>/latest            text: the name of the newest published checkpoint
    <checkpoint.dir>/step_00000200/    one DCP checkpoint (.metadata + *.distcp, manifest.json, config.yaml)
    <checkpoint.dir>/.tmp-step_.../    a save in progress, killed, or finished but not yet published:
                                       never read; published at the next start when its
                                       manifest.json is there (the save finished writing), else pruned

Everything here works without a process group (each rank, or a converter, reads on its own);
hashing the files is in megasft.checkpoint.manifest.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Iterable, Optional

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from megasft.checkpoint.errors import CheckpointError, CheckpointMismatch
from megasft.checkpoint.manifest import MANIFEST, digest_problem, read_manifest, share, size_problem

LATEST = "latest"
TMP_PREFIX = ".tmp-"
_STEP = re.compile(r"step_(\d+)$")


@contextlib.contextmanager
def quiet_single_process():
    """DCP warns that it "assumes a single process" on every no_dist call without a process group."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(name: str) -> Optional[int]:
    """The step of a directory named like step_name() (with or without TMP_PREFIX), else None."""
    match = _STEP.search(name)
    return int(match.group(1)) if match else None


# ----------------------------------------------------------------------------- paths
def checkpoint_root(cfg) -> Path:
    return cfg.checkpoint.root(cfg.train.run_dir)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from `path`: the checkpoint itself (has .metadata) or a checkpoint
    root whose ``latest`` names one."""
    path = Path(path)
    if (path / ".metadata").exists():
        return path
    latest = path / LATEST
    if latest.exists():
        target = path / latest.read_text(errors="replace").strip()
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


def check_resume_target(cfg) -> None:
    """The start-up check of checkpoint.load, before any process group: an explicit path must name
    a checkpoint, and with auto a ``latest`` that names no step directory (a hand edit, a broken
    copy) is an error rather than a silent fresh start. Raises CheckpointError."""
    load = cfg.checkpoint.load
    if not load:
        return
    if load != "auto":
        resolve_checkpoint(load)
        return
    root = checkpoint_root(cfg)
    latest = root / LATEST
    if latest.exists() and step_of(latest.read_text(errors="replace").strip()) is None:
        resolve_checkpoint(root)   # raises, naming what `latest` holds


def _steps(root: Path, prefix: str = "") -> list[Path]:
    """Directories prefix + step_N under root, oldest first."""
    found = [p for p in root.glob(prefix + "step_*") if p.is_dir() and step_of(p.name) is not None]
    return sorted(found, key=lambda p: step_of(p.name))


def latest_step(root: Path) -> Optional[int]:
    latest = root / LATEST
    return step_of(latest.read_text(errors="replace").strip()) if latest.exists() else None


def history(root: Path) -> list[Path]:
    """What checkpoint.load=auto may resume from, best first: the checkpoint ``latest`` names, then
    the older step directories, newest first (newer ones belong to a run that was rewound). Empty
    when nothing was saved yet; saves without ``latest`` are an error (which one is meant?)."""
    if not root.is_dir():
        return []
    newest = latest_step(root)
    if newest is None:
        if any((p / ".metadata").exists() for p in _steps(root)):
            resolve_checkpoint(root)   # raises, listing the complete checkpoints
        return []
    older = [p for p in _steps(root) if step_of(p.name) < newest]
    return [root / step_name(newest)] + older[::-1]


def unpublished(root: Path) -> list[Path]:
    """Temporary directories of saves that finished writing (manifest.json is written last) after
    the checkpoint ``latest`` names: a job that died before publishing them."""
    if not root.is_dir():
        return []
    newest = latest_step(root)
    return [p for p in _steps(root, TMP_PREFIX) if (p / MANIFEST).exists()
            and (newest is None or step_of(p.name) > newest)]


# ----------------------------------------------------------------------------- checks and reading
def completeness_problem(path: Path) -> Optional[str]:
    """Why `path` is not a complete checkpoint (None: it is): .metadata missing or unreadable, a
    data file missing or short of what .metadata needs, manifest.json unreadable, a listed file of
    another size. Reads no data (a checkpoint saved before checksums has no manifest to check)."""
    try:
        check_files(path)
    except CheckpointError as err:
        return str(err)
    manifest, problem = read_manifest(path)
    return problem or (size_problem(path, manifest) if manifest is not None else None)


def verification_problem(path: Path, rank: int = 0, world: int = 1) -> Optional[str]:
    """completeness_problem, then the sha256 of share(rank, world) of the files (all by default)."""
    problem = completeness_problem(path)
    manifest = read_manifest(path)[0] if problem is None else None
    return problem or (digest_problem(path, manifest, share(manifest, rank, world)) if manifest else None)


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
    load_dcp(state, path, DefaultLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False), None,
             no_dist=True)
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


# ----------------------------------------------------------------------------- publishing
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


def publish(tmp: Path, final: Path, keep_last: int, bad: Iterable[Path] = ()) -> None:
    """Rename a finished save into place, point ``latest`` at it, prune. One process (rank 0)."""
    root = final.parent
    if final.exists():
        # Re-saving a step (a resumed run stopped at once): the old copy goes first. Only a kill
        # between these two renames could leave latest naming a missing directory, which
        # resolve_checkpoint reports (the old copy is in .tmp-old-<name>).
        old = root / (TMP_PREFIX + "old-" + final.name)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    write_latest(root, final.name)
    prune(root, keep_last, keep=final, bad=bad)


def prune(root: Path, keep_last: int, keep: Path, bad: Iterable[Path] = ()) -> None:
    """Delete leftover temporary directories, and step directories up to `keep` (just published)
    except the newest `keep_last` good ones: complete (completeness_problem) and not in `bad`
    (failed verification in this process). A damaged checkpoint never takes a good one's place,
    so the last good one is never deleted for it. Directories newer than `keep` (the abandoned
    future of a run resumed from an older step) are left alone. keep_last <= 0 keeps all."""
    for tmp in root.glob(TMP_PREFIX + "*"):
        shutil.rmtree(tmp, ignore_errors=True)
    if keep_last <= 0:
        return
    bad = {Path(p) for p in bad}
    upto = [p for p in _steps(root) if step_of(p.name) <= step_of(keep.name)]
    good = [p for p in upto if p == keep or (p not in bad and completeness_problem(p) is None)]
    kept = set(good[-keep_last:])   # keep is the newest of them
    for old in upto:
        if old not in kept:
            shutil.rmtree(old, ignore_errors=True)
