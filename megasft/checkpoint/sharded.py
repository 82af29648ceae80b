"""Sharded, atomic, resumable checkpoints with torch.distributed.checkpoint (DCP).

On disk (a shared filesystem)::

    <checkpoint.dir>/
      latest                    text: the name of the newest complete checkpoint
      step_00000200/            one DCP checkpoint: .metadata + __<rank>_<i>.distcp files
        config.yaml             the resolved run config (for people; the same dict is in "meta")
      .tmp-step_00000300/       a save in progress (or killed): never read

What one checkpoint holds (DCP keys):
  model/<hf name>              model weights in the model dtype, canonical (HF) names and shapes
  optim/{main,exp_avg,exp_avg_sq}/<hf name>   ZeRO-1 fp32 state in the same canonical coordinates
  meta                         step, optimizer step count (the LR schedule is a function of it),
                               consumed tokens, data-loader state, layout, resolved config
  rng/<rank>                   each rank's RNG states (torch, CUDA, numpy, python, NEFTune)
Every rank writes only the canonical blocks it owns (megasft.checkpoint.pieces), so the files do
not depend on the layout and a checkpoint loads at any tp/pp/dp. RNG states are restored only at
the layout that saved them (other layouts draw different streams anyway).

Atomicity: every rank writes into ``.tmp-<name>``; DCP's coordinator writes ``.metadata`` after
all ranks finished; then rank 0 renames the directory, rewrites ``latest`` with os.replace, and
prunes to ``keep_last``. A process killed at any point leaves ``latest`` naming the previous
complete checkpoint. With ``async_save`` the tensors are copied to CPU at the save step and DCP
writes them in a background thread over a dedicated gloo group; the rename happens at the next
save (or at the end), after every rank's write finished.
"""
from __future__ import annotations

import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from megasft.checkpoint.files import (LATEST, TMP_PREFIX, CheckpointError, check_files, checkpoint_root,
                                      find_resume_path,
                                      load_dcp, prune, quiet_single_process, read_meta, resolve_checkpoint,
                                      step_name, write_latest)
from megasft.checkpoint.pieces import (MODEL_PREFIX, Block, TensorPieces, model_state, optimizer_state,
                                       reset_main_params)
from megasft.checkpoint.planner import CheckpointMismatch, PiecesLoadPlanner, PiecesSavePlanner, PreStaged

FORMAT_VERSION = 1
# ModelConfig fields that fix the tensors' shapes and meaning; a checkpoint must agree on all.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_attention_heads",
                "kv_heads", "head_size", "tie_embeddings", "qkv_bias")


def model_differences(saved: dict, model_cfg) -> list[str]:
    """'field: checkpoint X, config Y' for every shape-defining field that differs."""
    return [f"{f}: checkpoint {saved.get(f)!r}, config {getattr(model_cfg, f)!r}"
            for f in SHAPE_FIELDS if saved.get(f) != getattr(model_cfg, f)]


def model_shape(model_cfg) -> dict:
    return {f: getattr(model_cfg, f) for f in SHAPE_FIELDS}


# ----------------------------------------------------------------------------- RNG
def rng_state(chunks) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
             "neftune": [c.neftune_generator.get_state() if hasattr(c, "neftune_generator") else None
                         for c in chunks]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(chunks, state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    for chunk, gen in zip(chunks, state["neftune"]):
        if gen is not None and hasattr(chunk, "neftune_generator"):
            chunk.neftune_generator.set_state(gen)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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

    # ------------------------------------------------------------------ collectives
    @property
    def _no_dist(self) -> bool:
        return self.ps.world_size == 1

    def _barrier(self) -> None:
        if not self._no_dist:
            dist.barrier(group=self.ps.world_group)

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
        """The DCP state dict of this rank: live views of weights and optimizer state."""
        opt = trainer.optimizer
        meta = {"format": FORMAT_VERSION, "step": trainer.step, "consumed_tokens": self.consumed_tokens(trainer),
                "optimizer": {"step_count": opt.step_count, "consecutive_skips": opt.consecutive_skips,
                              "skipped_total": opt.skipped_total},
                "loader": loader.state_dict() if loader is not None else None,
                "best_eval": trainer.best_eval, "model": model_shape(self.cfg.model),
                "layout": self._layout(), "config": self.cfg.to_dict()}
        state: dict = {"meta": meta, f"rng/{self.ps.rank}": rng_state(trainer.chunks)}
        state.update(model_state(trainer.chunks, self.ps))
        state.update(optimizer_state(opt, trainer.chunks, self.ps))
        return state

    def _layout(self) -> dict:
        p = self.cfg.parallel
        return {"tp": self.ps.tp, "pp": self.ps.pp, "dp": self.ps.dp, "world": self.ps.world_size,
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
        if self.cfg.checkpoint.async_save:
            future = dcp.async_save(stage_copy(state), checkpoint_id=str(tmp), planner=PiecesSavePlanner(),
                                    process_group=group, no_dist=self._no_dist, async_stager=PreStaged())
            self._pending = (future, tmp, final)
        else:
            with quiet_single_process():
                dcp.save(state, checkpoint_id=str(tmp), planner=PiecesSavePlanner(), process_group=group,
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
        """Every rank's files are written (DCP returned everywhere): rename, point latest, prune."""
        self._barrier()
        if self.ps.rank == 0:
            if final.exists():
                # Re-saving a step (a resumed run stopped at once): the old copy goes first. Only a
                # kill between these two renames could leave latest naming a missing directory,
                # which resolve_checkpoint reports (the old copy is in .tmp-old-<name>).
                old = self.root / (TMP_PREFIX + "old-" + final.name)
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            write_latest(self.root, final.name)
            prune(self.root, self.cfg.checkpoint.keep_last, keep=final.name)
        self._barrier()

    def close(self) -> None:
        """Complete an in-flight async save (call before exiting)."""
        self._finish_pending()

    # ------------------------------------------------------------------ loading
    def resume(self, trainer, loader) -> Optional[Path]:
        """Load what ``checkpoint.load`` names into trainer and loader; None for a fresh start."""
        path = find_resume_path(self.cfg)
        if path is not None:
            self.load(path, trainer, loader)
        return path

    def load(self, path: str | Path, trainer, loader) -> dict:
        """Restore weights, optimizer state (when saved), step, loader and RNG from `path` (at any
        layout). Checks files and model shape first; raises CheckpointError / CheckpointMismatch.
        Returns the checkpoint's meta record."""
        path = resolve_checkpoint(path)
        metadata = check_files(path)
        meta = read_meta(path)
        diffs = model_differences(meta.get("model", {}), self.cfg.model)
        if diffs:
            raise CheckpointMismatch(f"{path} was saved from a different model: " + "; ".join(diffs))
        state: dict = dict(model_state(trainer.chunks, self.ps))
        has_optim = any(k.startswith("optim/") for k in metadata.state_dict_metadata)
        if has_optim:
            state.update(optimizer_state(trainer.optimizer, trainer.chunks, self.ps))
        rng_key = f"rng/{self.ps.rank}"
        same_layout = meta.get("layout") == self._layout() and rng_key in metadata.state_dict_metadata
        if same_layout:
            state[rng_key] = None
        load_dcp(state, path, PiecesLoadPlanner(str(path)), None if self._no_dist else self.ps.world_group,
              self._no_dist)
        opt = trainer.optimizer
        if has_optim:
            o = meta["optimizer"]
            opt.step_count, opt.consecutive_skips = int(o["step_count"]), int(o["consecutive_skips"])
            opt.skipped_total = int(o.get("skipped_total", 0))
        else:
            reset_main_params(opt)
        trainer.step = int(meta["step"])
        trainer.best_eval = meta.get("best_eval")
        if loader is not None and meta.get("loader") is not None and not self.cfg.data.reset_order_on_resume:
            loader.load_state_dict(meta["loader"])
        if same_layout:
            set_rng_state(trainer.chunks, state[rng_key])
        self._resumed = (trainer.step, int(meta.get("consumed_tokens", 0)))
        return meta


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
__all__ = ["Checkpointer", "CheckpointError", "CheckpointMismatch", "LATEST", "MODEL_PREFIX", "check_files",
           "read_meta", "resolve_checkpoint", "step_name"]
