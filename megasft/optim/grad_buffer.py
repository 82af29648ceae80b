"""Contiguous parameter and fp32 gradient buffers, split into buckets and sharded over DP.

Every trainable parameter of this rank gets a slot [start, end) in one flat index space. Two
buffers share that layout:

    grad_data  fp32 [total]          each param's main grad is a view into it (fp32 accumulation)
    param_data model dtype [total]   param.data is re-pointed to a view into it, so the all-gather
                                     of updated params writes the model weights in place

Layout. Parameters are laid out in reverse registration order (roughly the order backward
finishes them) and cut into buckets of about `bucket_numel` elements. Inside a bucket, weight
matrices (decayed) come first, then 1-D params, each sorted by copy count, so a shard of a bucket
holds at most a few runs of equal (weight decay, copies). Each bucket is padded to a multiple of
`num_shards` (times an alignment); rank r owns the r-th equal slice of every bucket, and its
optimizer shard is the concatenation of those slices (Megatron-LM's distributed optimizer does
the same). With one bucket this is the flat space split evenly over DP.

Accumulation. A post-accumulate-grad hook adds ``param.grad`` into the param's main grad in fp32
and frees ``param.grad``, for any number of micro-batches. With overlap, a bucket whose every
parameter has fired during a backward outside :meth:`GradBuffer.no_sync` is reduced
asynchronously at once; :meth:`GradBuffer.finish_grad_sync` reduces the rest and waits.

Parameter all-gather. After the optimizer step each rank's updated slices are all-gathered over
DP, bucket by bucket. With overlap (Megatron-LM's overlap_param_gather) the gathers are only
launched, in the order the next forward uses the buckets; forward pre-hooks installed by
:meth:`GradBuffer.register_param_sync_hooks` wait for a module's buckets just before the module
first runs, so the gather of later layers hides behind the compute of earlier ones. Anything that
reads the weights outside a module forward (checkpoint save, export) calls
:meth:`GradBuffer.finish_param_sync` first.

Routed experts under expert parallelism (ParallelState.ep > 1) are held alike only by the dp*cp/ep
ranks of the expert_grad group, not by every DP (x CP) rank: their parameters sit in buckets of their
own that are reduced, sharded and gathered over that group (``Bucket.group``).

Parameters whose gradient the model itself sums across ranks after backward (sequence-parallel
norm weights, replicated kv heads, pipeline-tied embeddings: ``ParamSpec.model_grad_sync``) sit in
a final bucket that is only reduced in finish_grad_sync(), after the model's syncs ran.

Each parameter's fp32 accumulator is a view into grad_data, read through :meth:`GradBuffer.main_grad`.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from megasft import collectives
from megasft.parallel_state import group_size
from megasft.tensor_parallel.spec import spec_of

# Module attributes (not direct calls) so tests can make the all-gather land late (tests/layouts.py).
_reduce_scatter, _all_gather = collectives.reduce_scatter_into, collectives.all_gather_into

# Shard slices are multiples of this many elements so views stay aligned for vectorised kernels.
SHARD_ALIGN = 64


def decays(param: nn.Parameter) -> bool:
    """Weight decay applies to weight matrices (embeddings included), never to biases or norms."""
    return param.ndim >= 2


@dataclass
class Slot:
    """One parameter's place in the flat space, and its fp32 gradient accumulator there."""

    name: str
    param: nn.Parameter
    start: int
    end: int
    main_grad: Optional[torch.Tensor] = None   # view of grad_data[start:end] in the param's shape


@dataclass(frozen=True)
class Run:
    """A stretch [start, end) of one bucket's shard slice (bucket-local shard coordinates) whose
    elements share weight decay and copy count."""

    start: int
    end: int
    decay: bool
    copies: int


@dataclass(frozen=True)
class ParamShard:
    """The part of one parameter this rank's shard covers: flattened-param elements
    [param_start, param_end) sit at [shard_start, shard_start + param_end - param_start) of the
    rank's optimizer shard."""

    name: str
    shape: tuple[int, ...]
    param_start: int
    param_end: int
    shard_start: int


@dataclass
class Bucket:
    """Flat-space range [start, end) reduced by one collective; rank r owns the r-th of its
    equal slices, which sits at shard_offset in that rank's optimizer shard."""

    start: int
    end: int  # padded: (end - start) is a multiple of num_shards * SHARD_ALIGN
    slots: list[Slot]
    shard_numel: int
    shard_offset: int
    deferred: bool  # holds model_grad_sync params: reduced only in finish_grad_sync
    group: Optional[dist.ProcessGroup] = None  # the ranks holding these params alike (DP, or expert-DP)
    num_shards: int = 1   # ZeRO-1 shards of this bucket: the group's size, or 1 unsharded
    shard_rank: int = 0
    experts: bool = False  # holds expert-parallel routed experts
    runs: list[Run] = field(default_factory=list)  # this rank's slice, by (decay, copies)
    fired: set = field(default_factory=set)  # params whose grads are final in this backward
    handle: Optional[dist.Work] = None  # the gradient reduction in flight
    launched: bool = False
    gather: Optional[dist.Work] = None  # the parameter all-gather in flight


def _pad(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _bucket_slots(named: list[tuple[str, nn.Parameter]], bucket_numel: Optional[int],
                  split_experts: bool) -> list[tuple[bool, list]]:
    """Group parameters (already in layout order) into buckets of about bucket_numel elements;
    with split_experts, routed experts' params form buckets of their own; model_grad_sync params
    form a last bucket of their own. Returns (experts?, members) per bucket."""
    def expert(p: nn.Parameter) -> bool:
        return split_experts and spec_of(p).experts is not None

    groups = []
    for experts in ((False, True) if split_experts else (False,)):
        current, size = [], 0
        for name, param in named:
            if spec_of(param).model_grad_sync or expert(param) != experts:
                continue
            current.append((name, param))
            size += param.numel()
            if bucket_numel is not None and size >= bucket_numel:
                groups.append((experts, current))
                current, size = [], 0
        if current:
            groups.append((experts, current))
    deferred = [(n, p) for n, p in named if spec_of(p).model_grad_sync]
    if any(expert(p) for _, p in deferred):
        raise ValueError("a routed expert's gradient cannot be both model-synced and expert-parallel")
    if deferred:
        groups.append((False, deferred))
    return groups


class GradBuffer:
    """The flat param/grad buffers of one rank, their buckets, the accumulation hooks, and the DP
    collectives: reduce (reduce-scatter or all-reduce, SUM) of grads, all-gather of params.

    num_shards is the DP size under ZeRO-1 and 1 without it (every rank keeps the whole state).
    With split_experts (expert parallelism), routed experts' buckets use expert_group instead
    (their shard count is that group's size)."""

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], dp_group: Optional[dist.ProcessGroup],
                 shard: bool, bucket_numel: Optional[int] = None, overlap: bool = False,
                 expert_group: Optional[dist.ProcessGroup] = None, split_experts: bool = False):
        named = _unique_trainable(named_params)
        dtypes = {p.dtype for _, p in named}
        if len(dtypes) != 1:
            raise ValueError(f"all trainable parameters must share one dtype for the flat param buffer, "
                             f"got {sorted(map(str, dtypes))}; cast the model with model.to(dtype) first")
        self.dp_group, self.expert_group, self.shard = dp_group, expert_group, shard
        self.num_shards = group_size(dp_group) if shard else 1
        self.overlap = overlap
        self._sync_enabled = True
        self.buckets = self._build_buckets(list(reversed(named)), bucket_numel, split_experts)
        for bucket in self.buckets:
            bucket.runs = self._shard_runs(bucket)
        total = self.buckets[-1].end
        device = named[0][1].device
        self.grad_data = torch.zeros(total, dtype=torch.float32, device=device)
        self.param_data = torch.zeros(total, dtype=named[0][1].dtype, device=device)
        self._bind_params()
        self._hooks = [slot.param.register_post_accumulate_grad_hook(self._make_hook(bucket, slot))
                       for bucket in self.buckets for slot in bucket.slots]

    # ---------------------------------------------------------------- layout
    def _build_buckets(self, named: list[tuple[str, nn.Parameter]], bucket_numel: Optional[int],
                       split_experts: bool) -> list[Bucket]:
        buckets, offset, shard_offset = [], 0, 0
        for experts, group in _bucket_slots(named, bucket_numel, split_experts):
            ranks = self.expert_group if experts else self.dp_group
            num_shards = group_size(ranks) if self.shard else 1
            shard_rank = 0 if ranks is None or not self.shard else dist.get_rank(ranks)
            # Stable sort: decayed first, then by copies, so a shard slice has few distinct runs.
            group = sorted(group, key=lambda item: (not decays(item[1]), spec_of(item[1]).copies))
            slots, start = [], offset
            for name, param in group:
                slots.append(Slot(name, param, offset, offset + param.numel()))
                offset += param.numel()
            offset = start + _pad(offset - start, num_shards * SHARD_ALIGN)
            deferred = any(spec_of(p).model_grad_sync for _, p in group)
            bucket = Bucket(start, offset, slots, (offset - start) // num_shards, shard_offset, deferred,
                            ranks, num_shards, shard_rank, experts)
            shard_offset += bucket.shard_numel
            buckets.append(bucket)
        self.shard_numel = shard_offset
        return buckets

    def _bind_params(self) -> None:
        """Copy each param into param_data and make param.data and its main grad views of the buffers."""
        self._slots = {}
        for bucket in self.buckets:
            for slot in bucket.slots:
                p = slot.param
                view = self.param_data[slot.start:slot.end].view(p.shape)
                view.copy_(p.detach())
                p.data = view
                slot.main_grad = self.grad_data[slot.start:slot.end].view(p.shape)
                self._slots[id(p)] = slot

    def main_grad(self, param: nn.Parameter) -> torch.Tensor:
        """The fp32 gradient accumulator of a parameter this buffer holds."""
        return self._slots[id(param)].main_grad

    def shard_range(self, bucket: Bucket) -> tuple[int, int]:
        """This rank's slice [start, end) of `bucket` in the flat space."""
        start = bucket.start + bucket.shard_rank * bucket.shard_numel
        return start, start + bucket.shard_numel

    def _shard_runs(self, bucket: Bucket) -> list[Run]:
        """Maximal stretches of this rank's slice of `bucket` with equal (decay, copies); padding
        is left out (its grads and params are zero and stay zero)."""
        lo, hi = self.shard_range(bucket)
        runs: list[Run] = []
        for slot in bucket.slots:
            s, e = max(lo, slot.start), min(hi, slot.end)
            if s >= e:
                continue
            run = Run(s - lo, e - lo, decays(slot.param), spec_of(slot.param).copies)
            last = runs[-1] if runs else None
            if last and last.end == run.start and (last.decay, last.copies) == (run.decay, run.copies):
                runs[-1] = Run(last.start, run.end, run.decay, run.copies)
            else:
                runs.append(run)
        return runs

    def param_shards(self) -> list[ParamShard]:
        """For every parameter this rank's shard touches, which of its elements and where."""
        out = []
        for bucket in self.buckets:
            lo, hi = self.shard_range(bucket)
            for slot in bucket.slots:
                s, e = max(lo, slot.start), min(hi, slot.end)
                if s < e:
                    out.append(ParamShard(slot.name, tuple(slot.param.shape), s - slot.start,
                                          e - slot.start, bucket.shard_offset + s - lo))
        return out

    def grad_shard(self, bucket: Bucket) -> torch.Tensor:
        lo, hi = self.shard_range(bucket)
        return self.grad_data[lo:hi]

    def param_shard(self, bucket: Bucket) -> torch.Tensor:
        lo, hi = self.shard_range(bucket)
        return self.param_data[lo:hi]

    # ---------------------------------------------------------- accumulation
    def _make_hook(self, bucket: Bucket, slot: Slot):
        def hook(param: nn.Parameter) -> None:
            slot.main_grad.add_(param.grad)  # bf16 grad added into the fp32 accumulator
            param.grad = None
            if self.overlap and self._sync_enabled:
                self._mark_ready(bucket, slot)
        return hook

    def _mark_ready(self, bucket: Bucket, slot: Slot) -> None:
        if bucket.launched or slot.name in bucket.fired:
            raise RuntimeError(
                f"gradient of {slot.name} accumulated again after its bucket was reduced; with "
                "overlap_grad_reduce run every micro-batch but the last inside grad_buffer.no_sync()")
        bucket.fired.add(slot.name)
        if not bucket.deferred and len(bucket.fired) == len(bucket.slots):
            self._launch(bucket)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate only; the overlapped reduce waits for a later one."""
        previous, self._sync_enabled = self._sync_enabled, False
        try:
            yield
        finally:
            self._sync_enabled = previous

    # ----------------------------------------------------------- collectives
    def _launch(self, bucket: Bucket) -> None:
        """Start the SUM reduction of one bucket over its group (DP, or expert-DP): in-place
        reduce-scatter into this rank's slice under ZeRO-1, all-reduce of the whole bucket otherwise."""
        bucket.launched = True
        data = self.grad_data[bucket.start:bucket.end]
        if bucket.num_shards > 1:
            lo, hi = self.shard_range(bucket)
            bucket.handle = _reduce_scatter(self.grad_data[lo:hi], data, group=bucket.group,
                                            async_op=True)  # [P_b] -> [P_b / dp]
        elif bucket.group is not None:
            bucket.handle = collectives.all_reduce(data, bucket.group, async_op=True)

    def finish_grad_sync(self) -> None:
        """Reduce every bucket not reduced yet and wait for all. Idempotent until zero_grad()."""
        for bucket in self.buckets:
            if not bucket.launched:
                self._launch(bucket)
        for bucket in self.buckets:
            if bucket.handle is not None:
                bucket.handle.wait()
                bucket.handle = None

    def all_gather_params(self, overlap: bool = False) -> None:
        """Every rank's updated param_data slices to every rank: [P_b / dp] -> [P_b] per bucket.
        With overlap the gathers are only launched; see register_param_sync_hooks()."""
        if not self.shard:
            return
        self.finish_param_sync()  # never two gathers writing one bucket
        # Buckets are laid out in reverse registration order, so the reversed list is the order
        # of first use in forward (the deferred bucket, holding embeddings and norms, goes first).
        for b in reversed(self.buckets):
            if b.num_shards == 1:
                continue
            b.gather = _all_gather(self.param_data[b.start:b.end], self.param_shard(b),
                                   group=b.group, async_op=True)
        if not overlap:
            self.finish_param_sync()

    def finish_param_sync(self) -> None:
        """Wait for every parameter all-gather still in flight (a no-op when none is)."""
        for bucket in self.buckets:
            _wait_gather(bucket)

    def params_in_flight(self) -> bool:
        return any(b.gather is not None for b in self.buckets)

    def register_param_sync_hooks(self, modules) -> list:
        """Make each module's forward wait for the all-gather of the buckets holding its own
        (non-recursive) parameters. A parameter must be used only inside its module's forward
        (or after it), which holds for every megasft layer. Returns the hook handles."""
        bucket_of = {id(slot.param): bucket for bucket in self.buckets for slot in bucket.slots}
        handles = []
        for module in modules:
            needed = {id(bucket_of[id(p)]): bucket_of[id(p)]
                      for p in module.parameters(recurse=False) if id(p) in bucket_of}
            if needed:
                wait = functools.partial(_wait_before_forward, list(needed.values()))
                handles.append(module.register_forward_pre_hook(wait))
        return handles

    def zero_(self) -> None:
        """Zero the accumulated gradients and forget which buckets were reduced."""
        for bucket in self.buckets:
            if bucket.handle is not None:
                bucket.handle.wait()  # never zero memory a collective is still writing
        self.grad_data.zero_()
        for bucket in self.buckets:
            bucket.fired.clear()
            bucket.launched = False
            bucket.handle = None
            for slot in bucket.slots:
                slot.param.grad = None


def _wait_gather(bucket: Bucket) -> None:
    if bucket.gather is not None:
        bucket.gather.wait()
        bucket.gather = None


def _wait_before_forward(buckets: list[Bucket], module, args) -> None:
    for bucket in buckets:
        _wait_gather(bucket)


def _unique_trainable(named_params) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters, each once (a tied parameter may be listed under two names)."""
    seen, out = set(), []
    for name, param in named_params:
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            out.append((name, param))
    if not out:
        raise ValueError("no trainable parameters were given to the optimizer")
    return out
