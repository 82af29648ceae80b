"""The run folder holds one run: its config, metrics, checkpoints and export — never two mixed.

* Starting in a folder that holds a previous run is refused unless the run resumes it
  (``checkpoint.load=auto``, or a checkpoint under its own root) or asks to start afresh (``train.overwrite=true``, which moves the
  previous run aside to ``<run_dir>.old-<time>``; nothing is deleted).
* A resume keeps ``metrics.jsonl`` in step order: records of steps after the resumed checkpoint
  (logged by the run that died, to be run again) move to ``metrics.rewound.jsonl``.
* A resume never re-spreads the LR schedule silently (the checkpointer's rule,
  megasft.checkpoint.meta.schedule_change): a checkpoint trained with another schedule is refused
  unless ``train.replan_schedule=true``, which continues on the new one and says where the
  learning rate jumps.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

from megasft.config import Config, ConfigError

METRICS, REWOUND = "metrics.jsonl", "metrics.rewound.jsonl"
RUN_FILES = ("config.yaml", METRICS, REWOUND, "hf", "tensorboard", "profile")


def previous_run(cfg: Config) -> list[str]:
    """What of a previous run the run folder (and the checkpoint root) holds; empty if none."""
    run_dir, root = Path(cfg.train.run_dir), cfg.checkpoint.root(cfg.train.run_dir)
    found = [str(run_dir / name) for name in RUN_FILES if (run_dir / name).exists()]
    if root.is_dir() and any(root.iterdir()):
        found.append(str(root))
    return found


def resumes_this_run(cfg: Config) -> bool:
    """checkpoint.load continues the run in this folder: auto, or a checkpoint under its root."""
    load = cfg.checkpoint.load
    root = cfg.checkpoint.root(cfg.train.run_dir).resolve()
    return load == "auto" or (load is not None and root in (Path(load).resolve(), *Path(load).resolve().parents))


def check_run_dir(cfg: Config) -> None:
    """Refuse to mix two runs in one folder (a start-up check: reads only)."""
    if resumes_this_run(cfg) or cfg.train.overwrite:
        return
    found = previous_run(cfg)
    if found:
        raise ConfigError(
            f"train.run_dir={cfg.train.run_dir} holds a previous run ({', '.join(found)}); resume it with "
            "checkpoint.load=auto, start afresh with train.overwrite=true (the previous run is moved to "
            f"{cfg.train.run_dir.rstrip('/')}.old-<time>), or choose another train.run_dir")


def archive_previous_run(cfg: Config) -> Optional[Path]:
    """train.overwrite=true: move the previous run's files to <run_dir>.old-<time>/ (call on one
    rank, before anything of the new run is written). Returns the archive, or None."""
    found = previous_run(cfg)
    if not cfg.train.overwrite or not found or resumes_this_run(cfg):
        return None
    archive = Path(f"{cfg.train.run_dir.rstrip('/')}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    archive.mkdir(parents=True)
    for path in map(Path, found):
        os.replace(path, archive / path.name)
    return archive


def rewind_metrics(run_dir: str | Path, step: int) -> int:
    """Keep metrics.jsonl in step order for a run resumed at `step`: records of later steps move
    (appended) to metrics.rewound.jsonl. Returns how many moved."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return 0
    keep, moved = [], []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            later = json.loads(line).get("step", 0) > step
        except json.JSONDecodeError:   # a torn last line of a killed run
            later = True
        (moved if later else keep).append(line)
    if moved:
        with open(Path(run_dir) / REWOUND, "a", encoding="utf-8") as f:
            f.writelines(line if line.endswith("\n") else line + "\n" for line in moved)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(keep), encoding="utf-8")
        os.replace(tmp, path)
    return len(moved)
