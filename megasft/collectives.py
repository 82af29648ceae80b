"""Every collective and point-to-point call megasft makes during training, and the ledger that
counts them.

The wrappers are thin: they call torch.distributed and, while the ledger is recording, add one
entry per call — (group kind, operator) -> calls, bytes, seconds. Bytes are what this rank *sends*
over a ring implementation, the quantity NCCL's bus bandwidth is defined on (Patarasuk & Yuan
2009; NCCL's PERFORMANCE.md):

    all-reduce of N bytes over n ranks       2 (n-1)/n * N
    all-gather to an N-byte output           (n-1)/n * N
    reduce-scatter of an N-byte input        (n-1)/n * N
    all-to-all of an N-byte input            (n-1)/n * N  (the slice a rank keeps is not sent)
    p2p send of N bytes                      N            (receives are counted apart, as "recv")

so the ledger measures which collectives ran on which tensors, and the planner's analytic volume
(megasft.planner.comm) can be checked against it. Seconds are the time this rank was blocked in
the call — for asynchronous calls, in ``wait()`` (the exposed part); on CUDA the recording steps
synchronise around each blocking call, which is why recording is switched on only on the
steps that are logged (``train.comm_stats``).

The ledger is one per process, like torch's own memory statistics: it holds counters only, never
a group, so it cannot route a collective to the wrong grid. Group kinds come from
``ParallelState.build``, which names each group it creates (``name_group``).
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

Group = Optional[dist.ProcessGroup]

# The tensor-in/tensor-out collectives under the names newer torch gives them (*_single; 2.13 has
# both spellings) and older releases' names otherwise.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class Entry:
    calls: int = 0
    bytes: float = 0.0
    seconds: float = 0.0


@dataclass
class Ledger:
    """Calls, bytes sent and blocked seconds per (group kind, operator) while ``recording``."""

    recording: bool = False
    entries: dict = field(default_factory=lambda: defaultdict(Entry))
    kinds: dict = field(default_factory=dict)   # id(group) -> kind

    def name_group(self, group: Group, kind: str) -> None:
        if group is not None:
            self.kinds[id(group)] = kind

    def kind(self, group: Group) -> str:
        return "world" if group is None else self.kinds.get(id(group), "other")

    def add(self, group: Group, op: str, nbytes: float, seconds: float = 0.0, calls: int = 1) -> None:
        entry = self.entries[(self.kind(group), op)]
        entry.calls += calls
        entry.bytes += nbytes
        entry.seconds += seconds

    def start(self) -> None:
        self.entries.clear()
        self.recording = True

    def stop(self) -> dict:
        """Stop recording; returns {kind: {op: {calls, bytes, seconds}}} of what was recorded."""
        self.recording = False
        out: dict = {}
        for (kind, op), e in sorted(self.entries.items()):
            out.setdefault(kind, {})[op] = {"calls": e.calls, "bytes": e.bytes, "seconds": e.seconds}
        return out


LEDGER = Ledger()


def name_group(group: Group, kind: str) -> None:
    LEDGER.name_group(group, kind)


def sent_bytes(report: dict, kind: str) -> float:
    """Bytes this rank sent over groups of `kind` in a ``Ledger.stop()`` report (receives excluded)."""
    return sum(e["bytes"] for op, e in report.get(kind, {}).items() if op != "recv")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _size(group: Group) -> int:
    return 1 if group is None else dist.get_world_size(group)


class _TimedWork:
    """An async work handle whose wait() time goes to the ledger entry it was launched under."""

    def __init__(self, work, group: Group, op: str):
        self.work, self.group, self.op = work, group, op

    def wait(self):
        start = time.perf_counter()
        result = self.work.wait()
        LEDGER.add(self.group, self.op, 0.0, time.perf_counter() - start, calls=0)
        return result


def _run(call, tensor: torch.Tensor, group: Group, op: str, nbytes: float, async_op: bool):
    if not LEDGER.recording:
        return call()
    if async_op:
        LEDGER.add(group, op, nbytes)
        return _TimedWork(call(), group, op)
    cuda = tensor.is_cuda
    if cuda:
        torch.cuda.synchronize(tensor.device)
    start = time.perf_counter()
    result = call()
    if cuda:
        torch.cuda.synchronize(tensor.device)
    LEDGER.add(group, op, nbytes, time.perf_counter() - start)
    return result


def all_reduce(x: torch.Tensor, group: Group, op=dist.ReduceOp.SUM, async_op: bool = False):
    """In-place all-reduce; a no-op on a group of one (returns None when async and nothing ran)."""
    n = _size(group)
    if n == 1:
        return None
    name = "all_reduce" if op == dist.ReduceOp.SUM else f"all_reduce_{str(op).rsplit('.', 1)[-1].lower()}"
    return _run(lambda: dist.all_reduce(x, op=op, group=group, async_op=async_op), x, group, name,
                2 * (n - 1) / n * _nbytes(x), async_op)


def all_gather_into(out: torch.Tensor, x: torch.Tensor, group: Group, async_op: bool = False):
    """All-gather `x` of every rank into `out` (rank order along dim 0)."""
    n = _size(group)
    return _run(lambda: _all_gather_single(out, x, group=group, async_op=async_op), x, group,
                "all_gather", (n - 1) / n * _nbytes(out), async_op)


def reduce_scatter_into(out: torch.Tensor, x: torch.Tensor, group: Group, async_op: bool = False):
    """Sum `x` over the group; this rank keeps its dim-0 slice in `out`."""
    n = _size(group)
    return _run(lambda: _reduce_scatter_single(out, x, group=group, async_op=async_op), x, group,
                "reduce_scatter", (n - 1) / n * _nbytes(x), async_op)


def isend(t: torch.Tensor, peer: int, group: Group, tag: int):
    """Start sending `t` to global rank `peer`; returns the work to wait on."""
    work = dist.isend(t, peer, tag=tag)
    if LEDGER.recording:
        LEDGER.add(group, "send", _nbytes(t))
    return work


def recv(t: torch.Tensor, peer: int, group: Group, tag: int) -> float:
    """Receive into `t` from global rank `peer`; returns the seconds this rank waited."""
    return wait_recv(irecv(t, peer, tag), t, group)


def irecv(t: torch.Tensor, peer: int, tag: int):
    """Post a receive into `t` from global rank `peer` without waiting; wait_recv completes it."""
    return dist.irecv(t, peer, tag=tag)


def wait_recv(work, t: torch.Tensor, group: Group) -> float:
    """Wait for a receive posted with irecv; returns the seconds this rank waited."""
    start = time.perf_counter()
    work.wait()
    if t.is_cuda:
        torch.cuda.synchronize(t.device)   # NCCL work.wait() only orders streams
    seconds = time.perf_counter() - start
    if LEDGER.recording:
        LEDGER.add(group, "recv", _nbytes(t), seconds)
    return seconds


class P2PWork:
    """A posted batch of ("send" | "recv", tensor, peer global rank, tag) operations. ``wait()``
    waits for all of them and returns the seconds this rank waited; it keeps the tensors alive
    until then. With `synchronize`, a CUDA wait also waits for the device (NCCL's work.wait() only
    orders streams), so the seconds are the transfer's; without it the consumer's stream is
    ordered after the transfer and the seconds are the host's blocked time only."""

    def __init__(self, ops: list[tuple[str, torch.Tensor, int, int]], group: Group, synchronize: bool):
        self.ops, self.group, self.synchronize = ops, group, synchronize
        # Posted in the order given: the order is what matches messages where tags are ignored (NCCL).
        posted = [dist.P2POp(dist.isend if way == "send" else dist.irecv, t, peer, tag=tag)
                  for way, t, peer, tag in ops]
        self.works = dist.batch_isend_irecv(posted) if posted else []

    def wait(self) -> float:
        if not self.ops:
            return 0.0
        start = time.perf_counter()
        for work in self.works:
            work.wait()
        device = self.ops[0][1].device
        if self.synchronize and device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        if LEDGER.recording:
            for way in ("send", "recv"):
                sizes = [_nbytes(t) for w, t, _, _ in self.ops if w == way]
                if sizes:   # the wait is one: it is booked on the sends when there are any
                    booked = seconds if way == "send" or len(sizes) == len(self.ops) else 0.0
                    LEDGER.add(self.group, way, sum(sizes), booked, calls=len(sizes))
        self.ops, self.works = [], []
        return seconds


def start_p2p(ops: list[tuple[str, torch.Tensor, int, int]], group: Group) -> P2PWork:
    """Post p2p operations as one batch and return without waiting, so the caller computes while
    they travel (the context-parallel ring); call ``wait()`` before using a received tensor."""
    return P2PWork(ops, group, synchronize=False)


def batch_p2p(ops: list[tuple[str, torch.Tensor, int, int]], group: Group) -> float:
    """Post ("send" | "recv", tensor, peer global rank, tag) operations as one batch, in the order
    given (the order is what matches messages where tags are ignored, NCCL), and wait for all.
    Returns the seconds this rank waited."""
    return P2PWork(ops, group, synchronize=True).wait()


def all_to_all_single(out: torch.Tensor, x: torch.Tensor, group: Group, async_op: bool = False):
    """Equal-split all-to-all: dim-0 slice j of this rank's `x` lands in slice i (this rank's index
    in `group`) of rank j's `out`."""
    n = _size(group)
    return _run(lambda: dist.all_to_all_single(out, x, group=group, async_op=async_op), x, group,
                "all_to_all", (n - 1) / n * _nbytes(x), async_op)


def all_to_all_uneven(out: torch.Tensor, x: torch.Tensor, out_splits: list[int], in_splits: list[int],
                      group: Group):
    """All-to-all with variable splits along dim 0: rows in_splits[j] of `x` go to rank j, and
    out_splits[i] rows arrive from rank i (expert-parallel token dispatch). Only the rows that
    leave this rank count as sent."""
    me = dist.get_rank(group)
    row = _nbytes(x) // max(x.shape[0], 1)
    sent = (sum(in_splits) - in_splits[me]) * row
    return _run(lambda: dist.all_to_all_single(out, x, out_splits, in_splits, group=group), x, group,
                "all_to_all", sent, False)
