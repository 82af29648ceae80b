"""Sharded, atomic, verified, resumable checkpoints with torch.distributed.checkpoint (DCP).

On disk (a shared filesystem)::

    <checkpoint.dir>/
      latest                    text: the name of the newest published checkpoint
      step_00000200/            one DCP checkpoint: .metadata + __<rank>_<i>.distcp files
        manifest.json           size and sha256 of every file (megasft.checkpoint.manifest)
        config.yaml             the resolved run config (for people; the same dict is in "meta")
      .tmp-step_00000300/       a save in progress (or killed, or finished and not yet published)

What one checkpoint holds (DCP keys):
  model/<hf name>              model weights in the model dtype, canonical (HF) names and shapes
  optim/{main,exp_avg,exp_avg_sq}/<hf name>   ZeRO-1 fp32 state in the same canonical coordinates
  meta                         step, the trainer's, optimizer's and data loader's state_dict()
                               (without tensors), layout, resolved config (megasft.checkpoint.meta)
  rng/<rank>                   each rank's RNG states (torch, CUDA, numpy, python, NEFTune)
Every rank writes only the canonical blocks it owns (megasft.checkpoint.pieces), so the files do
not depend on the layout and a checkpoint loads at any tp/pp/dp. RNG states are restored only at
the layout that saved them (other layouts draw different streams anyway).

Atomicity: every rank writes into ``.tmp-<name>`` and hashes what it wrote; DCP's coordinator
writes ``.metadata`` after all ranks finished, then ``manifest.json``; then rank 0 checks the
files are all there, renames the directory, rewrites ``latest`` with os.replace, and prunes to
``keep_last`` good checkpoints. A process killed at any point leaves ``latest`` naming the
previous checkpoint. With ``async_save`` the tensors are copied to CPU at the save step and DCP
writes them in a background thread over a dedicated gloo group; the rename happens at the next
save (or at the end), after every rank's write finished — or, when the job died before that, at
the next start (a ``.tmp-`` directory with its manifest finished writing).

Verification: loading hashes every file once, split across the ranks, against manifest.json
before anything is read into the model; a mismatch names the file. checkpoint.load=auto walks
back from ``latest`` to the newest checkpoint that verifies, saying which it skipped and why.
"""
from __future__ import annotations

import pickle
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from megasft.checkpoint.errors import CheckpointError, CheckpointMismatch
from megasft.checkpoint.files import (LATEST, TMP_PREFIX, check_files, checkpoint_root, completeness_problem,
                                      history, load_dcp, publish, quiet_single_process, read_meta,
                                      resolve_checkpoint, step_name, unpublished, verification_problem)
from megasft.checkpoint.manifest import MANIFEST, ChecksummedWriter
from megasft.checkpoint.meta import (FORMAT_VERSION, model_differences, model_shape, rng_state, schedule_change,
                                     set_rng_state, upgrade)
from megasft.checkpoint.pieces import Block, TensorPieces, model_state, optimizer_state, reset_main_params
from megasft.checkpoint.resharding import PiecesLoadPlanner, PiecesSavePlanner, PreStaged
from megasft.config import OptimConfig
from megasft.optim.lr_schedule import WarmupCosine


# ----------------------------------------------------------------------------- the checkpointer
class Checkpointer:
    """Saves and restores a Trainer (and its train loader) per ``cfg.checkpoint``.

        ckpt = Checkpointer(cfg, ps)
        ckpt.resume(trainer, loader)                 # checkpoint.load = auto | path | None
        ... after each step: ckpt.after_step(trainer, loader, last=...)
        ckpt.close()                                 # waits for an async save
    Every method is collective over the layout's ranks.
    """

    def __init__(self, cfg, ps):
        self.cfg, self.ps = cfg, ps
        self.root = checkpoint_root(cfg)
        self._pending = None          # (future, tmp dir, final dir) of an async save
        self._async_group = None
        self._resumed = (0, 0)        # (step, consumed tokens) of the checkpoint resumed from
        self.skipped: list[tuple[Path, str]] = []   # (checkpoint, why) that load=auto passed over
        self._bad: set[Path] = set()  # failed verification: prune does not count them as kept

    # ------------------------------------------------------------------ collectives
    @property
    def _no_dist(self) -> bool:
        return self.ps.world_size == 1

    def _barrier(self) -> None:
        if not self._no_dist:
            dist.barrier(group=self.ps.world_group)

    def _agree(self, problem: Optional[str]) -> Optional[str]:
        """The first problem any rank found, on every rank (each checks a different part)."""
        if self._no_dist:
            return problem
        problems = [None] * self.ps.world_size
        dist.all_gather_object(problems, problem, group=self.ps.world_group)
        return next((p for p in problems if p is not None), None)

    def _say(self, message: str) -> None:
        if self.ps.rank == 0:
            print(f"megasft: {message}", file=sys.stderr, flush=True)

    def _save_group(self):
        if self._no_dist:
            return None
        if not self.cfg.checkpoint.async_save:
            return self.ps.world_group
        if self._async_group is None:
            # The background writer's collectives must not interleave with training's on one group.
            self._async_group = dist.new_group(self.ps.layout_ranks, backend="gloo",
                                               use_local_synchronization=True)
        return self._async_group

    # ------------------------------------------------------------------ saving
    def consumed_tokens(self, trainer) -> int:
        step, tokens = self._resumed
        return tokens + (trainer.step - step) * self.cfg.data.global_batch_tokens

    def state_dict(self, trainer, loader) -> dict:
        """The DCP state dict of this rank: live views of weights and optimizer state, and each
        object's own state_dict() (its tensors are the views)."""
        opt = trainer.optimizer
        meta = {"format": FORMAT_VERSION, "step": trainer.step, "consumed_tokens": self.consumed_tokens(trainer),
                "trainer": trainer.state_dict(),
                "optimizer": {k: v for k, v in opt.state_dict().items() if k != "shard_state"},
                "loader": loader.state_dict() if loader is not None else None,
                "model": model_shape(self.cfg.model), "layout": self._layout(), "config": self.cfg.to_dict()}
        state: dict = {"meta": meta, f"rng/{self.ps.rank}": rng_state(trainer.chunks)}
        state.update(model_state(trainer.chunks, self.ps))
        state.update(optimizer_state(opt, trainer.chunks, self.ps))
        return state

    def _layout(self) -> dict:
        p = self.cfg.parallel
        return {"tp": self.ps.tp, "pp": self.ps.pp, "dp": self.ps.dp, "cp": self.ps.cp, "ep": self.ps.ep, "world": self.ps.world_size,
                "virtual_pipeline_size": p.virtual_pipeline_size, "pipeline_layers": p.pipeline_layers,
                "distributed_optimizer": p.distributed_optimizer}

    def after_step(self, trainer, loader, last: bool) -> Optional[Path]:
        """Save when the step hits save_interval, or when this is the last step of the run (the end,
        or a stop signal); on the last step also wait for the save to be complete."""
        interval = self.cfg.checkpoint.save_interval
        due = last or (interval > 0 and trainer.step % interval == 0)
        saved = self.save(trainer, loader) if due else None
        if last:
            self.close()
        return saved

    def save(self, trainer, loader) -> Path:
        """Write a checkpoint of the current step (async per config) and return its final path."""
        self._finish_pending()
        trainer.optimizer.finish_param_sync()
        name = step_name(trainer.step)
        final, tmp = self.root / name, self.root / (TMP_PREFIX + name)
        if self.ps.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)   # left by a killed save of the same step
            tmp.mkdir()
            self.cfg.save(tmp / "config.yaml")
        self._barrier()
        state = self.state_dict(trainer, loader)
        group = self._save_group()
        writer = ChecksummedWriter(str(tmp))
        if self.cfg.checkpoint.async_save:
            with quiet_single_process():
                future = dcp.async_save(stage_copy(state), storage_writer=writer, planner=PiecesSavePlanner(),
                                        process_group=group, no_dist=self._no_dist, async_stager=PreStaged())
            self._pending = (future, tmp, final)
        else:
            with quiet_single_process():
                dcp.save(state, storage_writer=writer, planner=PiecesSavePlanner(), process_group=group,
                         no_dist=self._no_dist)
            self._publish(tmp, final)
        return final

    def _finish_pending(self) -> None:
        if self._pending is None:
            return
        future, tmp, final = self._pending
        self._pending = None
        future.result()
        self._publish(tmp, final)

    def _publish(self, tmp: Path, final: Path) -> None:
        """Every rank's files are written (DCP returned everywhere): check they are all there,
        rename, point latest, prune. A save whose files are not all there is not published."""
        problem = self._agree(completeness_problem(tmp) if self.ps.rank == 0 else None)
        if problem is not None:
            raise CheckpointError(f"saving {final.name} failed: {problem}; it was not published and "
                                  f"{self.root / LATEST} still names the previous checkpoint")
        if self.ps.rank == 0:
            publish(tmp, final, self.cfg.checkpoint.keep_last, bad=self._bad)
        self._barrier()

    def close(self) -> None:
        """Complete an in-flight async save (call before exiting)."""
        self._finish_pending()

    # ------------------------------------------------------------------ loading
    def resume(self, trainer, loader) -> Optional[Path]:
        """Load what ``checkpoint.load`` names into trainer and loader; None for a fresh start.
        First publishes a save that finished writing but was not published before the job ended."""
        self._publish_finished_save()
        load = self.cfg.checkpoint.load
        if not load:
            return None
        if load != "auto":
            path = resolve_checkpoint(load)
            self.load(path, trainer, loader)
            return path
        path = self._newest_verified()
        if path is not None:
            self._load(path, trainer, loader)
        return path

    def _publish_finished_save(self) -> None:
        """Publish the newest ``.tmp-`` save newer than ``latest`` that finished writing (it has its
        manifest and all its files): an async save whose job died before the next save."""
        if self.ps.rank == 0:
            for tmp in reversed(unpublished(self.root)):   # the newest that has all its files
                problem = completeness_problem(tmp)
                if problem is None:
                    publish(tmp, self.root / tmp.name[len(TMP_PREFIX):], self.cfg.checkpoint.keep_last,
                            bad=self._bad)
                    self._say(f"published {tmp.name[len(TMP_PREFIX):]}: its save finished writing, but the job "
                              "ended before publishing it")
                    break
                self._say(f"not publishing {tmp}: {problem}")
        self._barrier()

    def _newest_verified(self) -> Optional[Path]:
        """checkpoint.load=auto: the newest checkpoint from ``latest`` back that verifies; None
        when nothing was saved yet."""
        for path in history(self.root):
            problem = self.verify(path)
            if problem is None:
                return path
            self.skipped.append((path, problem))
            self._say(f"checkpoint.load=auto: skipping {path.name}: {problem}")
        if self.skipped:
            why = "; ".join(f"{p.name}: {problem}" for p, problem in self.skipped)
            raise CheckpointError(f"checkpoint.load=auto: no checkpoint in {self.root} verifies ({why}); "
                                  "restore the files, or set checkpoint.load to null to start afresh")
        return None

    def verify(self, path: Path) -> Optional[str]:
        """Why checkpoint `path` cannot be loaded (None: every file in its manifest has the recorded
        size and sha256). Rank r hashes share r of the files. A checkpoint saved before checksums
        (no manifest.json) gets the size checks only, and says so."""
        path = Path(path)
        problem = self._agree(verification_problem(path, self.ps.rank, self.ps.world_size))
        if problem is not None:
            self._bad.add(path)
        elif not (path / MANIFEST).exists():
            self._say(f"{path} has no {MANIFEST} (saved before checksums): loading it unverified")
        return problem

    def load(self, path: str | Path, trainer, loader) -> dict:
        """Restore weights, optimizer state (when saved), step, loader and RNG from `path` (at any
        layout). Verifies the files and checks the model shape first; raises CheckpointError /
        CheckpointMismatch. Returns the checkpoint's meta record."""
        path = resolve_checkpoint(path)
        problem = self.verify(path)
        if problem is not None:
            raise CheckpointError(f"{problem}; nothing was loaded — point checkpoint.load at another checkpoint")
        return self._load(path, trainer, loader)

    def _check_schedule(self, path: Path, meta: dict) -> None:
        """A resume continues the LR schedule it was trained with (megasft.training.run_dir); a
        checkpoint converted from HF has no schedule to continue."""
        saved = meta.get("config")
        change = schedule_change(saved, self.cfg) if saved and "trainer" in meta else None
        if change is None:
            return
        if not self.cfg.train.replan_schedule:
            raise CheckpointMismatch(
                f"{path} was trained with another LR schedule ({change}); resuming would re-spread warm-up "
                "and cosine over the new settings — set them back to continue that run, or "
                "train.replan_schedule=true to continue on this run's schedule")
        step = int(meta["optimizer"]["step"]) if meta.get("optimizer") else int(meta["step"])
        # The saved section as an OptimConfig (fields a later megasft added keep their defaults).
        saved_optim = OptimConfig(**{k: v for k, v in saved["optim"].items() if k in OptimConfig.__dataclass_fields__})
        before = _lr_at(saved_optim, saved["train"]["steps"], step)
        after = _lr_at(self.cfg.optim, self.cfg.train.steps, step)
        self._say(f"train.replan_schedule: continuing {path.name} on a new LR schedule ({change}); "
                  f"the learning rate at step {step} goes from {before:.3e} to {after:.3e}")

    def _load(self, path: Path, trainer, loader) -> dict:
        metadata = check_files(path)
        meta = upgrade(read_meta(path))
        diffs = model_differences(meta.get("model", {}), self.cfg.model)
        if diffs:
            raise CheckpointMismatch(f"{path} was saved from a different model: " + "; ".join(diffs))
        self._check_schedule(path, meta)
        opt = trainer.optimizer
        state: dict = dict(model_state(trainer.chunks, self.ps))
        has_optim = any(k.startswith("optim/") for k in metadata.state_dict_metadata)
        if has_optim:
            state.update(optimizer_state(opt, trainer.chunks, self.ps))
        rng_key = f"rng/{self.ps.rank}"
        same_layout = meta.get("layout") == self._layout() and rng_key in metadata.state_dict_metadata
        if same_layout:
            state[rng_key] = None
        load_dcp(state, path, PiecesLoadPlanner(str(path)), None if self._no_dist else self.ps.world_group,
                 self._no_dist)
        if has_optim:   # shard_state was filled in place through the canonical views above
            opt.load_state_dict(dict(opt.state_dict(), **meta["optimizer"]))
        else:
            reset_main_params(opt)
        if "trainer" in meta:   # a checkpoint converted from Hugging Face has no training progress
            trainer.load_state_dict(meta["trainer"])
        if loader is not None and meta.get("loader") is not None and not self.cfg.data.reset_order_on_resume:
            loader.load_state_dict(meta["loader"])
        if same_layout:
            set_rng_state(trainer.chunks, state[rng_key])
        self._resumed = (trainer.step, int(meta.get("consumed_tokens", 0)))
        return meta


def _lr_at(optim: OptimConfig, steps: int, step: int) -> float:
    return WarmupCosine.from_config(optim, steps)(step)


def stage_copy(state: dict) -> dict:
    """A CPU copy of the blocks this rank writes (async save: training may change the originals)."""
    out = {}
    for key, value in state.items():
        if isinstance(value, TensorPieces):
            blocks = [Block(b.offsets, b.tensor.detach().to("cpu", copy=True)) for b in value.blocks if b.write]
            out[key] = TensorPieces(value.size, value.dtype, blocks)
        else:
            out[key] = pickle.loads(pickle.dumps(value))
    return out


# Re-exported: the names callers need next to the Checkpointer (directory handling is in files.py).
__all__ = ["Checkpointer", "CheckpointError", "CheckpointMismatch", "LATEST", "check_files", "read_meta",
           "resolve_checkpoint", "step_name"]
