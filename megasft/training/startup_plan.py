"""``megasft train --print-config``: the resolved, validated config and what the run will do with
it — layout, rows per step, steps per epoch (when the dataset exists), and the planner's memory
estimate per GPU — computed without starting a run or creating a process group."""
from __future__ import annotations

import textwrap
from pathlib import Path

import yaml

from megasft.config import Config, ConfigError
from megasft.layout import Layout

GPUS_PER_NODE = 8   # the planner's node size for the estimate when the world is a multiple of it


def estimate_cluster(world_size: int, gpu: str):
    """The planner's cluster for `world_size` ranks: nodes of 8 when the world divides into them,
    else one node holding every rank."""
    from megasft.planner import make_cluster

    per_node = GPUS_PER_NODE if world_size % GPUS_PER_NODE == 0 else world_size
    return make_cluster(world_size // per_node, per_node, gpu)


def plan_lines(cfg: Config, layout: Layout, gpu: str = "h100-80gb") -> list[str]:
    """The derived plan, one fact per line."""
    d, t = cfg.data, cfg.train
    rows = d.rows_per_step()
    lines = [f"layout      {layout.describe()}; schedule {layout.schedule}, "
             f"bubble {100 * layout.bubble_fraction:.1f}%",
             f"batch       {rows} rows x {d.seq_len} tokens = {d.global_batch_tokens:,} tokens per step; "
             f"{rows // layout.dp} rows per dp rank = {layout.micro_batches} micro-batches of {d.micro_batch_size}",
             *data_lines(cfg, layout),
             *memory_lines(cfg, layout, gpu)]
    if t.epochs is None:
        lines.insert(2, f"steps       {t.steps} (train.steps)")
    return lines


def data_lines(cfg: Config, layout: Layout) -> list[str]:
    """Documents, packed rows and steps per epoch from the dataset's own packing plan (the same
    PackedLoader the run builds); a note when the dataset is not there yet."""
    from megasft.data.indexed import META, DatasetError
    from megasft.data.loader import build_loaders

    path = cfg.data.train_path
    if path is None or not (Path(path) / META).is_file():
        return [f"data        no dataset at {path} yet: steps per epoch unknown"]
    try:
        loader, _ = build_loaders(cfg.data, cfg.train.seed, 0, layout.dp, cfg.model.vocab_size,
                                  epochs=cfg.train.epochs, doc_multiple=layout.doc_multiple)
    except DatasetError as err:
        return [f"data        {err}"]
    rows = loader.rows_per_epoch()
    lines = [f"data        {len(loader.doc_indices):,} documents -> {rows:,} rows per epoch = "
             f"{rows / loader.rows_per_step:.2f} steps per epoch"]
    if loader.total_steps is not None:
        lines.append(f"steps       {loader.total_steps} (train.epochs={cfg.train.epochs})")
    else:
        lines.append(f"epochs      {cfg.train.steps * loader.rows_per_step / max(rows, 1):.2f} "
                     f"in train.steps={cfg.train.steps}")
    return lines


def size(n: float) -> str:
    """Bytes as GiB / MiB / KiB (tiny models are MiB, large ones GiB)."""
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 2 ** 10:.1f} KiB"


def memory_lines(cfg: Config, layout: Layout, gpu: str) -> list[str]:
    """The planner's per-rank memory of the worst pipeline stage, by component."""
    from megasft.planner import Assumptions, plan

    try:
        result = plan(cfg, estimate_cluster(layout.world_size, gpu), Assumptions())
    except ConfigError as err:
        return [f"memory      not estimated: {err}"]
    worst = result.worst
    parts = ", ".join(f"{name} {size(value)}" for name, value in worst.components().items())
    verdict = "fits" if result.fits else "does NOT fit"
    return [f"memory      {size(worst.total)} per GPU on pp rank {worst.pp_rank} (planner estimate, "
            f"{result.cluster.gpu.name}: {verdict} in {result.cluster.gpu.memory_gib:.1f} GiB)",
            *textwrap.wrap(parts, 96, initial_indent=" " * 12, subsequent_indent=" " * 12)]


def print_config(cfg: Config, layout: Layout, gpu: str = "h100-80gb") -> str:
    """The YAML of the resolved config, then the plan as YAML comments (the output is a loadable config)."""
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    plan = "\n".join(f"# {line}" for line in plan_lines(cfg, layout, gpu))
    return f"{text}\n# plan (world size {layout.world_size}; nothing was started)\n{plan}"
