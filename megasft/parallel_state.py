"""ParallelState: the one object that knows the (pp, dp, cp, tp) rank grid and its process groups.

Ranks are laid out TP-fastest, then CP (context parallel), then DP, then PP, as in Megatron-LM:

    rank = pp_rank * (dp * cp * tp) + dp_rank * (cp * tp) + cp_rank * tp + tp_rank

CP ranks share every row (each holds s/cp of its tokens) and hold the same weights, so gradients
are reduced, and ZeRO-1 shards the optimizer, over the dp x cp ranks of a stage (the "grad" group;
it is the dp group when cp = 1). The data loader shards rows over dp only.

Expert parallelism (mixture-of-experts models) is carved from the dp x cp ranks of a stage, as
Megatron-Core's "parallel folding" does: number those ranks f = dp_rank * cp + cp_rank (the grad
group's order, CP fastest); ep consecutive ones (f // ep alike) form an "ep" group whose members
hold different experts and exchange tokens by all-to-all, and ep_rank = f % ep. Tokens are
per-rank work whichever row or chunk of a row they belong to, so an EP group may span CP ranks
(ep <= cp) or DP ranks or both. An expert weight is therefore held alike by the dp*cp / ep ranks
of equal ep_rank: the "expert_grad" group, over which its gradient is reduced and its ZeRO-1
state sharded. With dp=4, cp=1, ep=2: ep groups [d0,d1] [d2,d3], expert_grad groups [d0,d2]
[d1,d3]; with dp=2, cp=2, ep=2 the ep groups are the cp groups and expert_grad = dp groups.

Worked example, 16 ranks with tp=2, pp=4 (so dp=2):

    tp groups  (consecutive pairs, inside a node): [0,1] [2,3] [4,5] ... [14,15]
    dp groups  (same tp and pp rank):              [0,2] [1,3] [4,6] [5,7] ... [13,15]
    pp groups  (stride dp*tp = 4):                 [0,4,8,12] [1,5,9,13] [2,6,10,14] [3,7,11,15]
    embedding groups (first + last stage of a pp group, for tied embeddings): [0,12] [1,13] [2,14] [3,15]
    stage groups (all dp x tp ranks of one stage, FP8 amax reduction): [0..3] [4..7] [8..11] [12..15]

The state is built once from torchrun's environment and passed explicitly to every layer and
function that communicates; there are no module-level group accessors.

A hung rank: every group waits at most ``parallel.timeout_s`` in a collective, then raises on
the waiting ranks. To name the rank that stopped answering, each rank of a torchrun job runs a
:class:`Heartbeat` (a daemon thread bumping a counter in the job's TCP store); after the timeout
the survivors see whose counter stood still (a SIGSTOPped or frozen process) or who lags a step.
"""
from __future__ import annotations

import atexit
import datetime
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from megasft import collectives
from megasft.config import ConfigError


def rank_grid(world_size: int, tp: int, pp: int, cp: int = 1, ep: int = 1) -> dict[str, list[list[int]]]:
    """Pure function: the rank lists of every tp / cp / dp / grad (dp x cp) / ep / expert_grad /
    pp / embedding / stage group for a layout."""
    if tp < 1 or pp < 1 or cp < 1 or world_size % (tp * cp * pp):
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        names, sizes = ("tp*cp*pp", f"{tp}*{cp}*{pp}") if cp > 1 else ("tp*pp", f"{tp}*{pp}")
        raise ConfigError(
            f"world_size={world_size} is not divisible by {names}={sizes}={tp * cp * pp}; "
            f"launch a multiple of {tp * cp * pp} processes or choose {names} in {divisors}")
    dp = world_size // (tp * cp * pp)
    replicas = dp * cp   # the grad group of a stage, which expert parallelism folds into
    if ep < 1 or replicas % ep:
        names = f"dp*cp={dp}*{cp}={replicas}" if cp > 1 else f"dp={dp}"
        raise ConfigError(f"parallel.ep={ep} must divide {names} (expert-parallel groups are carved from "
                          f"the {'dp x cp' if cp > 1 else 'dp'} ranks); choose ep in "
                          f"{[d for d in range(1, replicas + 1) if replicas % d == 0]}")
    P, D, C, T, F = range(pp), range(dp), range(cp), range(tp), range(replicas)

    def rank(p: int, d: int, c: int, t: int) -> int:
        return ((p * dp + d) * cp + c) * tp + t

    def folded(p: int, f: int, t: int) -> int:   # f = dp_rank * cp + cp_rank
        return rank(p, f // cp, f % cp, t)

    pp_groups = [[rank(p, d, c, t) for p in P] for d in D for c in C for t in T]
    return {"tp": [[rank(p, d, c, t) for t in T] for p in P for d in D for c in C],
            "cp": [[rank(p, d, c, t) for c in C] for p in P for d in D for t in T],
            "dp": [[rank(p, d, c, t) for d in D] for p in P for c in C for t in T],
            "grad": [[rank(p, d, c, t) for d in D for c in C] for p in P for t in T],
            "ep": [[folded(p, j * ep + e, t) for e in range(ep)] for p in P for j in range(replicas // ep) for t in T],
            "expert_grad": [[folded(p, f, t) for f in F if f % ep == e] for p in P for e in range(ep) for t in T],
            "pp": pp_groups, "embedding": [sorted({g[0], g[-1]}) for g in pp_groups],
            "stage": [[rank(p, d, c, t) for d in D for c in C for t in T] for p in P]}


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
    cp: int = 1
    cp_rank: int = 0
    ep: int = 1
    world_group: Optional[dist.ProcessGroup] = None    # all ranks of this layout
    tp_group: Optional[dist.ProcessGroup] = None
    pp_group: Optional[dist.ProcessGroup] = None
    dp_group: Optional[dist.ProcessGroup] = None       # ranks holding different rows (the loader's split)
    cp_group: Optional[dist.ProcessGroup] = None       # ranks sharing each row, s/cp tokens each
    grad_group: Optional[dist.ProcessGroup] = None     # dp x cp: gradient reduction and ZeRO-1 shards
    ep_group: Optional[dist.ProcessGroup] = None       # dp x cp ranks holding different experts (all-to-all)
    expert_grad_group: Optional[dist.ProcessGroup] = None   # dp*cp / ep ranks holding the same experts
    embedding_group: Optional[dist.ProcessGroup] = None
    # The pp ranks again, for the MoE statistics' all-reduces (megasft.training.moe_aux): a
    # communicator of their own never orders them against the stages' p2p messages.
    pp_aux_group: Optional[dist.ProcessGroup] = None
    stage_group: Optional[dist.ProcessGroup] = None    # dp x tp ranks of this pipeline stage
    # Global ranks of this rank's pipeline group, in stage order (p2p addresses by global rank).
    pp_ranks: list[int] = field(default_factory=lambda: [0])
    # Global ranks of the whole layout, in layout order (layout_ranks[0] is its rank 0).
    layout_ranks: list[int] = field(default_factory=lambda: [0])
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _subgroups: dict = field(default_factory=dict, repr=False)
    heartbeat: Optional["Heartbeat"] = field(default=None, repr=False)   # torchrun jobs only

    def __post_init__(self) -> None:
        if self.grad_group is None and self.cp == 1:   # states built by hand (tests): dp is the grad group
            self.grad_group = self.dp_group
        if self.expert_grad_group is None and self.ep == 1:
            self.expert_grad_group = self.grad_group

    # ------------------------------------------------------------------ build
    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> "ParallelState":
        """The tp=pp=dp=cp=1 state of a plain single-process run (no process group needed)."""
        return cls(rank=0, world_size=1, tp=1, pp=1, dp=1, tp_rank=0, pp_rank=0, dp_rank=0,
                   device=torch.device(device))

    @classmethod
    def from_env(cls, tp: int = 1, pp: int = 1, timeout_s: float = 120.0, cp: int = 1,
                 ep: int = 1) -> "ParallelState":
        """Initialise torch.distributed from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
        MASTER_ADDR/PORT) and build the groups, every one with `timeout_s` (parallel.timeout_s),
        and start this rank's heartbeat. NCCL on CUDA, gloo on CPU."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        # Validate before the rendezvous so a wrong layout fails at once on every rank, not as a hang.
        rank_grid(world_size, tp, pp, cp, ep)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            backend, device = "nccl", torch.device("cuda", local_rank)
        else:
            backend, device = "gloo", torch.device("cpu")
        if world_size == 1 and not dist.is_initialized() and "MASTER_ADDR" not in os.environ:
            state = cls.single(device)
            state.tp, state.pp, state.cp, state.ep = tp, pp, cp, ep
            return state
        timeout = datetime.timedelta(seconds=timeout_s)
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout)
        state = cls.build(tp, pp, device, timeout=timeout, cp=cp, ep=ep)
        state.heartbeat = Heartbeat(dist.distributed_c10d._get_default_store(), rank, world_size,
                                    interval_s=min(5.0, max(0.2, timeout_s / 5)))
        return state

    @classmethod
    def build(cls, tp: int, pp: int, device: torch.device | str = "cpu",
              ranks: Optional[list[int]] = None,
              timeout: Optional[datetime.timedelta] = None, cp: int = 1,
              ep: int = 1) -> Optional["ParallelState"]:
        """Build the groups on an already initialised default process group.

        `ranks` lays the grid over a subset of the default group (tests check several layouts in
        one spawned world); every process must call this, and those outside the subset get None.
        ``rank``/``world_size`` are then positions within the subset; p2p peers and
        ``layout_ranks`` stay global ranks. `timeout` bounds every collective of the new groups
        (None: torch's default for new groups, 30 minutes on gloo, not the default group's).
        """
        ranks = list(range(dist.get_world_size())) if ranks is None else list(ranks)
        me = dist.get_rank()
        grid = rank_grid(len(ranks), tp, pp, cp, ep)
        # new_group is collective over the default group: every process creates every group, in order.
        groups = {}
        # Sub-groups of consecutive TP ranks (ranks sharing a replicated kv head when tp > kv heads).
        sub_sizes = [d for d in range(2, tp) if tp % d == 0]
        grid["world"] = [list(range(len(ranks)))]
        for d in sub_sizes:
            grid[f"tp{d}"] = [g[i:i + d] for g in grid["tp"] for i in range(0, tp, d)]
        # With pp == 1 the stage is the whole layout (reuse the world group) and nothing is pooled
        # over stages.
        grid["pp_aux"] = grid["pp"]
        stage = ["stage", "pp_aux"] if pp > 1 else []
        # With cp == 1 the grad group is the dp group: reuse it.
        cp_kinds = ["cp", "grad"] if cp > 1 else []
        # With ep == 1 the expert replicas are the grad group's: reuse it.
        ep_kinds = ["ep", "expert_grad"] if ep > 1 else []
        kinds = ["world", "tp", "dp", "pp", "embedding"] + cp_kinds + ep_kinds + stage + [f"tp{d}" for d in sub_sizes]
        for kind in kinds:
            for local in grid[kind]:
                members = [ranks[i] for i in local]
                group = dist.new_group(members, timeout=timeout) if len(members) > 1 else None
                if me in members:
                    groups[kind] = (group, members)
                    # The communication ledger books traffic by group kind (kv sub-groups are TP).
                    # The ledger books the grad group's traffic as DP, as the planner counts it.
                    collectives.name_group(group, {"grad": "dp", "expert_grad": "dp", "pp_aux": "pp"}.get(
                        kind, "tp" if kind.startswith("tp") else kind))
        if me not in ranks:
            return None
        rank, world_size = ranks.index(me), len(ranks)
        dp = world_size // (tp * cp * pp)
        grad_group = groups["grad" if cp > 1 else "dp"][0]
        return cls(rank=rank, world_size=world_size, tp=tp, pp=pp, dp=dp, cp=cp, ep=ep,
                   tp_rank=rank % tp, cp_rank=(rank // tp) % cp, dp_rank=(rank // (tp * cp)) % dp,
                   pp_rank=rank // (tp * cp * dp),
                   world_group=groups["world"][0], tp_group=groups["tp"][0], dp_group=groups["dp"][0],
                   cp_group=groups["cp"][0] if cp > 1 else None,
                   grad_group=grad_group,
                   ep_group=groups["ep"][0] if ep > 1 else None,
                   expert_grad_group=groups["expert_grad"][0] if ep > 1 else grad_group,
                   pp_group=groups["pp"][0],
                   # Middle stages (pp > 2) belong to no embedding group.
                   embedding_group=groups.get("embedding", (None,))[0],
                   pp_aux_group=groups["pp_aux"][0] if pp > 1 else None,
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
    def grad_ranks(self) -> int:
        """Ranks the gradients are reduced over (dp x cp): the ZeRO-1 shard count."""
        return self.dp * self.cp

    @property
    def first_replica(self) -> bool:
        """Whether this rank is the one of its dp x cp replicas that writes shared state (weights
        every DP and CP rank holds alike)."""
        return self.dp_rank == 0 and self.cp_rank == 0

    @property
    def replica_rank(self) -> int:
        """This rank's place f = dp_rank * cp + cp_rank among its stage's dp x cp ranks (CP fastest),
        which expert parallelism folds into (rank_grid)."""
        return self.dp_rank * self.cp + self.cp_rank

    @property
    def ep_rank(self) -> int:
        return self.replica_rank % self.ep

    @property
    def first_expert_replica(self) -> bool:
        """Whether this rank writes the routed-expert weights it holds: the first of the dp*cp / ep
        ranks that hold the same experts (every rank of the first EP group; at ep=1 first_replica)."""
        return self.replica_rank < self.ep

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

    def diagnose_hang(self, err: Exception, timeout_s: float) -> tuple[str, bool]:
        """After a collective timed out: (one-line message naming the rank that stopped
        answering, whether this rank should print it — the lowest rank still answering)."""
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        if self.heartbeat is None:
            return f"a collective failed after parallel.timeout_s={timeout_s:g} s ({first})", self.rank == 0
        try:
            silent, waiting = self.heartbeat.unresponsive()
        except Exception as store_err:  # noqa: BLE001 - the store itself may be gone with its host
            return (f"a collective timed out after parallel.timeout_s={timeout_s:g} s and the job's store "
                    f"did not answer either ({type(store_err).__name__}); rank 0 (its host under a plain "
                    "launch) or the torchrun agent likely stopped"), True
        me = self.heartbeat.rank
        alive = [r for r in range(self.heartbeat.world_size) if r not in silent]
        reporter = bool(alive) and me == alive[0]
        if silent:
            return (f"rank {', '.join(map(str, silent))} stopped answering in step {self.heartbeat.step}: no heartbeat for {self.heartbeat.wait_s:.1f} s after a "
                    f"collective waited parallel.timeout_s={timeout_s:g} s for it; check that rank's host "
                    "and log (stopped, swapping, a hung device) or raise parallel.timeout_s if it is only "
                    "slow"), reporter
        stuck = [r for r in alive if r not in waiting]
        if stuck:
            return (f"rank {', '.join(map(str, stuck))} is alive but never reached the collective the others "
                    f"waited parallel.timeout_s={timeout_s:g} s in (step {self.heartbeat.step}): a hang "
                    "in its data, compute or I/O; check that rank's log"), reporter
        return (f"a collective timed out after parallel.timeout_s={timeout_s:g} s with every rank alive and "
                f"waiting in one: ranks issued different collectives, or one collective needs longer than "
                f"the timeout — raise parallel.timeout_s ({first})"), reporter

    def describe(self) -> str:
        cp = f"cp {self.cp_rank}/{self.cp} " if self.cp > 1 else ""
        ep = f" (ep {self.ep_rank}/{self.ep})" if self.ep > 1 else ""
        return (f"rank {self.rank}/{self.world_size}: tp {self.tp_rank}/{self.tp} {cp}"
                f"pp {self.pp_rank}/{self.pp} dp {self.dp_rank}/{self.dp}{ep} on {self.device}")


class Heartbeat:
    """A daemon thread that bumps a counter under ``megasft/beat/<rank>`` in the job's store every
    `interval_s`; a frozen process's counter stands still. `step` is set by the trainer (the
    optimizer step this rank is working on) for the messages.

    The thread is stopped and joined at exit (atexit, or :meth:`stop`): a daemon thread still
    inside a store call when the interpreter finalizes is killed as it retakes the GIL, and that
    unwinds through the store's C++ frames into std::terminate ("terminate called without an
    active exception", SIGABRT) — a finished run would exit -6 now and then."""

    PREFIX = "megasft/beat/"

    def __init__(self, store, rank: int, world_size: int, interval_s: float) -> None:
        self.store, self.rank, self.world_size, self.interval_s = store, rank, world_size, interval_s
        self.step = 0
        self._beat()   # the key exists before training starts
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="megasft-heartbeat", daemon=True)
        self._thread.start()
        atexit.register(self.stop)   # atexit runs before the interpreter starts killing daemon threads

    def stop(self) -> None:
        """End the thread and wait for the store call it may be in (ms; bounded in case the store hangs)."""
        self._stopping.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=30.0)   # a store that stopped answering must not hang the exit

    @property
    def wait_s(self) -> float:
        """How long `unresponsive` watches: a live rank beats at least twice in it."""
        return 2.5 * self.interval_s

    def _beat(self, count: int = 0) -> None:
        self.store.set(f"{self.PREFIX}{self.rank}", str(count))

    def _run(self) -> None:
        count = 0
        while not self._stopping.wait(self.interval_s):
            count += 1
            try:
                self._beat(count)
            except Exception:  # noqa: BLE001 - a store gone at shutdown; the main thread reports
                return

    def _read(self) -> dict[int, int]:
        keys = {r: f"{self.PREFIX}{r}" for r in range(self.world_size)}
        return {r: int(self.store.get(k)) for r, k in keys.items() if self.store.check([k])}

    def unresponsive(self) -> tuple[list[int], set[int]]:
        """Called by each rank whose collective timed out: (ranks whose heartbeat stood still over
        wait_s, ranks that also report a timed-out collective)."""
        self.store.set(f"{self.PREFIX}timed_out/{self.rank}", "1")
        before = self._read()
        time.sleep(self.wait_s)
        after = self._read()
        silent = [r for r in range(self.world_size) if r not in after or before.get(r) == after[r]]
        waiting = {r for r in range(self.world_size) if self.store.check([f"{self.PREFIX}timed_out/{r}"])}
        return silent, waiting


def group_size(group: Optional[dist.ProcessGroup]) -> int:
    """Size of a group; None (a size-1 group by ParallelState's convention) is 1."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Optional[dist.ProcessGroup]) -> int:
    return 0 if group is None else dist.get_rank(group)


def destroy(ps: Optional[ParallelState] = None) -> None:
    """Stop this rank's heartbeat (before its store goes) and tear the process groups down."""
    if ps is not None and ps.heartbeat is not None:
        ps.heartbeat.stop()
    if dist.is_initialized():
        dist.destroy_process_group()
