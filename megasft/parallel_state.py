"""ParallelState: the one object that knows the (pp, dp, tp) rank grid and its process groups.

Ranks are laid out TP-fastest, then DP, then PP, as in Megatron-LM:

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

Worked example, 16 ranks with tp=2, pp=4 (so dp=2):

    tp groups  (consecutive pairs, inside a node): [0,1] [2,3] [4,5] ... [14,15]
    dp groups  (same tp and pp rank):              [0,2] [1,3] [4,6] [5,7] ... [13,15]
    pp groups  (stride dp*tp = 4):                 [0,4,8,12] [1,5,9,13] [2,6,10,14] [3,7,11,15]
    embedding groups (first + last stage of a pp group, for tied embeddings): [0,12] [1,13] [2,14] [3,15]
    stage groups (all dp x tp ranks of one stage, FP8 amax reduction): [0..3] [4..7] [8..11] [12..15]

The state is built once from torchrun's environment and passed explicitly to every layer and
function that communicates; there are no module-level group accessors.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from megasft.config import ConfigError


def rank_grid(world_size: int, tp: int, pp: int) -> dict[str, list[list[int]]]:
    """Pure function: the rank lists of every tp / dp / pp / embedding group for a layout."""
    if tp < 1 or pp < 1 or world_size % (tp * pp):
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ConfigError(
            f"world_size={world_size} is not divisible by tp*pp={tp}*{pp}={tp * pp}; "
            f"launch a multiple of {tp * pp} processes or choose tp*pp in {divisors}")
    dp = world_size // (tp * pp)

    def rank(p: int, d: int, t: int) -> int:
        return p * dp * tp + d * tp + t

    tp_groups = [[rank(p, d, t) for t in range(tp)] for p in range(pp) for d in range(dp)]
    dp_groups = [[rank(p, d, t) for d in range(dp)] for p in range(pp) for t in range(tp)]
    pp_groups = [[rank(p, d, t) for p in range(pp)] for d in range(dp) for t in range(tp)]
    embedding_groups = [sorted({g[0], g[-1]}) for g in pp_groups]
    stage_groups = [[rank(p, d, t) for d in range(dp) for t in range(tp)] for p in range(pp)]
    return {"tp": tp_groups, "dp": dp_groups, "pp": pp_groups, "embedding": embedding_groups,
            "stage": stage_groups}


@dataclass
class ParallelState:
    """Coordinates and groups of this rank. Groups are None when their size is 1 (no communication)."""

    rank: int
    world_size: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    world_group: Optional[dist.ProcessGroup] = None    # all ranks of this layout
    tp_group: Optional[dist.ProcessGroup] = None
    pp_group: Optional[dist.ProcessGroup] = None
    dp_group: Optional[dist.ProcessGroup] = None
    embedding_group: Optional[dist.ProcessGroup] = None
    stage_group: Optional[dist.ProcessGroup] = None    # dp x tp ranks of this pipeline stage
    # Global ranks of this rank's pipeline group, in stage order (p2p addresses by global rank).
    pp_ranks: list[int] = field(default_factory=lambda: [0])
    # Global ranks of the whole layout, in layout order (layout_ranks[0] is its rank 0).
    layout_ranks: list[int] = field(default_factory=lambda: [0])
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _subgroups: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ build
    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> "ParallelState":
        """The tp=pp=dp=1 state of a plain single-process run (no process group needed)."""
        return cls(rank=0, world_size=1, tp=1, pp=1, dp=1, tp_rank=0, pp_rank=0, dp_rank=0,
                   device=torch.device(device))

    @classmethod
    def from_env(cls, tp: int = 1, pp: int = 1, timeout_s: float = 600.0) -> "ParallelState":
        """Initialise torch.distributed from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
        MASTER_ADDR/PORT) and build the groups. NCCL on CUDA, gloo on CPU."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        # Validate before the rendezvous so a wrong layout fails at once on every rank, not as a hang.
        rank_grid(world_size, tp, pp)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            backend, device = "nccl", torch.device("cuda", local_rank)
        else:
            backend, device = "gloo", torch.device("cpu")
        if world_size == 1 and not dist.is_initialized() and "MASTER_ADDR" not in os.environ:
            state = cls.single(device)
            state.tp, state.pp = tp, pp
            return state
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        return cls.build(tp, pp, device)

    @classmethod
    def build(cls, tp: int, pp: int, device: torch.device | str = "cpu",
              ranks: Optional[list[int]] = None) -> Optional["ParallelState"]:
        """Build the groups on an already initialised default process group.

        `ranks` lays the grid over a subset of the default group (tests check several layouts in
        one spawned world); every process must call this, and those outside the subset get None.
        ``rank``/``world_size`` are then positions within the subset; p2p peers and
        ``layout_ranks`` stay global ranks.
        """
        ranks = list(range(dist.get_world_size())) if ranks is None else list(ranks)
        me = dist.get_rank()
        grid = rank_grid(len(ranks), tp, pp)
        # new_group is collective over the default group: every process creates every group, in order.
        groups = {}
        # Sub-groups of consecutive TP ranks (ranks sharing a replicated kv head when tp > kv heads).
        sub_sizes = [d for d in range(2, tp) if tp % d == 0]
        grid["world"] = [list(range(len(ranks)))]
        for d in sub_sizes:
            grid[f"tp{d}"] = [g[i:i + d] for g in grid["tp"] for i in range(0, tp, d)]
        # With pp == 1 the stage is the whole layout: reuse the world group.
        stage = ["stage"] if pp > 1 else []
        for kind in ["world", "tp", "dp", "pp", "embedding"] + stage + [f"tp{d}" for d in sub_sizes]:
            for local in grid[kind]:
                members = [ranks[i] for i in local]
                group = dist.new_group(members) if len(members) > 1 else None
                if me in members:
                    groups[kind] = (group, members)
        if me not in ranks:
            return None
        rank, world_size = ranks.index(me), len(ranks)
        dp = world_size // (tp * pp)
        return cls(rank=rank, world_size=world_size, tp=tp, pp=pp, dp=dp,
                   tp_rank=rank % tp, dp_rank=(rank // tp) % dp, pp_rank=rank // (tp * dp),
                   world_group=groups["world"][0], tp_group=groups["tp"][0], dp_group=groups["dp"][0],
                   pp_group=groups["pp"][0],
                   # Middle stages (pp > 2) belong to no embedding group.
                   embedding_group=groups.get("embedding", (None,))[0],
                   stage_group=groups["stage" if pp > 1 else "world"][0],
                   pp_ranks=groups["pp"][1], layout_ranks=ranks, device=torch.device(device),
                   _subgroups={d: groups[f"tp{d}"][0] for d in sub_sizes})

    def tp_subgroup(self, size: int) -> Optional[dist.ProcessGroup]:
        """Group of `size` consecutive TP ranks containing this rank (the ranks holding the same
        replicated kv head when tp > num_kv_heads). Built with the other groups."""
        if size == 1:
            return None
        if size == self.tp:
            return self.tp_group
        if size not in self._subgroups:
            raise ValueError(f"no TP sub-group of size {size}: it must divide tp={self.tp}")
        return self._subgroups[size]

    # ------------------------------------------------------------- properties
    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def prev_rank(self) -> Optional[int]:
        return None if self.is_first_stage else self.pp_ranks[self.pp_rank - 1]

    @property
    def next_rank(self) -> Optional[int]:
        return None if self.is_last_stage else self.pp_ranks[self.pp_rank + 1]

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size}: tp {self.tp_rank}/{self.tp} "
                f"pp {self.pp_rank}/{self.pp} dp {self.dp_rank}/{self.dp} on {self.device}")


def group_size(group: Optional[dist.ProcessGroup]) -> int:
    """Size of a group; None (a size-1 group by ParallelState's convention) is 1."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Optional[dist.ProcessGroup]) -> int:
    return 0 if group is None else dist.get_rank(group)


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
