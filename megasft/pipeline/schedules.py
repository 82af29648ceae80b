"""Forward/backward schedules over the micro-batches of one global batch, model-agnostic.

A schedule calls ``forward_step(chunk_index, micro_batch, input_tensor)``, which runs this rank's
model chunk ``chunk_index`` and returns either the activation to pass on, or — on the last
pipeline stage's last chunk — a pair ``(loss, stats)``: the scalar to back-propagate (already
scaled for the global batch) and a dict of detached numbers to sum over micro-batches (e.g.
loss_sum, valid tokens). ``input_tensor`` is None on the first stage's first chunk; elsewhere it is
the received activation, made to require grad so its gradient can be sent back.

Schedules (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters
Using Megatron-LM", Sec. 2.2):

  no pipeline      pp=1: forward and backward each micro-batch in turn.
  all-forward-all-backward  GPipe's order, every forward then every backward (for testing).
  1F1B             PipeDream-Flush: a warmup of (p - rank - 1) forwards, then alternate one
                   forward and one backward, then drain the remaining backwards. At most
                   p - rank micro-batches wait for their backward on a stage.
  interleaved 1F1B each rank holds v model chunks (its chunk i is global chunk i*p + rank); the
                   same idea over p*v virtual stages shrinks the bubble by v.
  ZB-H1            zero bubble (Qi et al. 2023): backward split into B (input grad) and W
                   (weight grad); W passes fill 1F1B's cool-down bubble (zero_bubble.py).
  ZBV              the same split over two chunks per rank placed in a V, rank r holding
                   chunks r and 2p-1-r; near-zero bubble at 1F1B's memory (zero_bubble_v.py).

Every stage must call with the same micro-batch list (the loader gives it to all of them), so
packing metadata needs no communication; only activations and their gradients travel (p2p.py).
"""
from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Optional

import torch

from megasft.layout import (AFAB, INTERLEAVED, NO_PIPELINE, ONE_F_ONE_B, ZB_H1, ZBV, check_micro_batches,
                            chunk_ranks, resolve_schedule, warmup_forwards)
from megasft.parallel_state import ParallelState
from megasft.pipeline.p2p import P2P, backward_through, release_storage
from megasft.pipeline.zero_bubble import zero_bubble_h1
from megasft.pipeline.zero_bubble_v import zero_bubble_v

ForwardStep = Callable[[int, dict, Optional[torch.Tensor]], object]


@dataclass
class ScheduleResult:
    """What one schedule run produced on this rank.

    busy_s: time in forward_step and backward (compute, including TP collectives inside them);
    idle_s: time waiting in pipeline p2p exchanges (the bubble, plus transfer time).
    peak_in_flight: most (micro-batch, chunk) forwards whose backward had not run yet — with one
    chunk per rank, micro-batches whose activations are held."""

    stats: dict = field(default_factory=dict)   # summed over micro-batches (last stage only)
    busy_s: float = 0.0
    idle_s: float = 0.0
    wall_s: float = 0.0                          # the whole schedule call
    peak_in_flight: int = 0

    @property
    def bubble_fraction(self) -> float:
        """idle / (busy + idle) on this stage. On the first stage, which starts first and finishes
        last, this is the pipeline's bubble fraction, comparable to bubble_1f1b/interleaved."""
        total = self.busy_s + self.idle_s
        return self.idle_s / total if total > 0 else 0.0


def _accumulate(total: dict, stats: dict) -> None:
    for key, value in stats.items():
        total[key] = total.get(key, 0.0) + float(value)


class _Stage:
    """This rank's side of a schedule: runs forward/backward of its chunks, keeps the activations
    awaiting backward (FIFO per chunk), exchanges with neighbours, and keeps the books."""

    def __init__(self, forward_step: ForwardStep, micro_batches: list[dict], ps: ParallelState,
                 num_chunks: int, tensor_shape, dtype: torch.dtype, forward_only: bool,
                 no_sync: Optional[Callable[[], ContextManager]], weight_store=None, schedule: str = ONE_F_ONE_B):
        self.forward_step, self.micro_batches, self.ps = forward_step, micro_batches, ps
        # The model's last chunk (the loss) is this rank's last, on the last rank — or on rank 0 (ZBV).
        self.holds_loss = chunk_ranks(schedule, ps.pp, num_chunks)[-1] == ps.pp_rank
        self.num_chunks, self.forward_only, self.no_sync = num_chunks, forward_only, no_sync
        self.weight_store = weight_store        # zero-bubble schedules: deferred weight gradients
        self.sends: list = []                   # (work, sent activation or None) still in flight
        self.posted: dict = {}                  # (grad, reverse) -> receives posted ahead, oldest first
        self.p2p = P2P(ps, tensor_shape, dtype) if ps.pp > 1 else None
        self.result = ScheduleResult()
        self.saved = [deque() for _ in range(num_chunks)]             # (input, output) per forward
        self.backwards_left = [len(micro_batches)] * num_chunks
        self.in_flight = 0

    def is_loss_chunk(self, chunk: int) -> bool:
        return self.holds_loss and chunk == self.num_chunks - 1

    def forward(self, chunk: int, micro_batch: int, input_tensor: Optional[torch.Tensor]):
        """Run one chunk on one micro-batch; returns the activation to send (None after the loss)."""
        if input_tensor is not None and not self.forward_only:
            input_tensor.requires_grad_()
        start = time.perf_counter()
        with torch.set_grad_enabled(not self.forward_only):
            output = self.forward_step(chunk, self.micro_batches[micro_batch], input_tensor)
        if self.is_loss_chunk(chunk):
            output, stats = output
            _accumulate(self.result.stats, stats)
        self.result.busy_s += time.perf_counter() - start
        if not self.forward_only:
            self.saved[chunk].append((input_tensor, output))
            self.in_flight += 1
            self.result.peak_in_flight = max(self.result.peak_in_flight, self.in_flight)
        return None if self.is_loss_chunk(chunk) else output

    def backward(self, chunk: int, output_grad: Optional[torch.Tensor], release: bool = True) -> Optional[torch.Tensor]:
        """Backward of the oldest pending forward of `chunk`; returns the gradient of its input
        (None on the first stage's first chunk). output_grad is None for the loss. With
        release=False the micro-batch stays counted in flight (its W pass releases it)."""
        input_tensor, output = self.saved[chunk].popleft()
        self.backwards_left[chunk] -= 1
        # Gradient reduction over DP may start only once the chunk's last micro-batch is in.
        accumulate_only = self.no_sync is not None and self.backwards_left[chunk] > 0
        start = time.perf_counter()
        with self.no_sync() if accumulate_only else contextlib.nullcontext():
            backward_through(output, output_grad)
        self.result.busy_s += time.perf_counter() - start
        if release:
            self.in_flight -= 1
        return None if input_tensor is None else input_tensor.grad

    def exchange(self, send_next=None, send_prev=None, recv_prev=False, recv_next=False):
        """One batched p2p exchange with the neighbours; returns (activation, gradient) received."""
        if self.p2p is None:
            return None, None
        got = self.p2p.exchange(send_next, send_prev, recv_prev, recv_next)
        self.result.idle_s += got.wait_s
        if send_next is not None and not self.forward_only:
            release_storage(send_next)   # the next stage holds it now; backward needs only grad_fn
        return got.from_prev, got.from_next


    # One message at a time (schedules given as a list of passes): blocking receives, sends left
    # in flight; a sent activation's storage goes once its send completed (release_storage).
    # reverse: ZBV's way back up the V (P2P.recv_activation). A receive can be posted ahead
    # (prefetch) so the transfer overlaps compute; it is waited for in the same order as without.
    def prefetch(self, grad: bool, reverse: bool = False) -> None:
        self.posted.setdefault((grad, reverse), deque()).append(self.p2p.post_recv(grad, reverse))

    def recv_activation(self, reverse: bool = False) -> torch.Tensor:
        return self._receive(False, reverse)

    def recv_grad(self, reverse: bool = False) -> torch.Tensor:
        return self._receive(True, reverse)

    def _receive(self, grad: bool, reverse: bool) -> torch.Tensor:
        queue = self.posted.get((grad, reverse))
        t, wait_s = self.p2p.wait_recv(queue.popleft() if queue else self.p2p.post_recv(grad, reverse))
        self.result.idle_s += wait_s
        return t

    def send_activation(self, y: torch.Tensor, reverse: bool = False) -> None:
        self.sends.append((self.p2p.isend_activation(y, reverse), y))
        self._reap_sends()

    def send_grad(self, g: torch.Tensor, reverse: bool = False) -> None:
        self.sends.append((self.p2p.isend_grad(g, reverse), None))
        self._reap_sends()

    def _reap_sends(self) -> None:
        while self.sends and self.sends[0][0].is_completed():
            self._finish_send(*self.sends.pop(0))

    def _finish_send(self, work, activation) -> None:
        work.wait()
        if activation is not None and not self.forward_only:
            release_storage(activation)

    def finish_sends(self) -> None:
        start = time.perf_counter()
        while self.sends:
            self._finish_send(*self.sends.pop(0))
        self.result.idle_s += time.perf_counter() - start


# ---------------------------------------------------------------------------------- schedules
def no_pipeline(st: _Stage) -> None:
    """pp=1: forward and backward each micro-batch in turn; gradients accumulate."""
    for i in range(len(st.micro_batches)):
        st.forward(0, i, None)
        if not st.forward_only:
            st.backward(0, None)


def all_forward_all_backward(st: _Stage) -> None:
    """GPipe's order (Huang et al. 2019): all forwards, then all backwards. Holds every
    micro-batch's activations at once; kept as a simple reference schedule for tests."""
    m = len(st.micro_batches)
    _forwards(st, range(m))
    if not st.forward_only:
        _backwards(st, m)


def _forwards(st: _Stage, micro_batches: range) -> None:
    """Forward each micro-batch through this rank's only chunk: receive, compute, send on."""
    for i in micro_batches:
        x, _ = st.exchange(recv_prev=not st.ps.is_first_stage)
        st.exchange(send_next=st.forward(0, i, x))


def _backwards(st: _Stage, count: int) -> None:
    """Backward the `count` oldest outstanding micro-batches: receive the grad, compute, send back."""
    for _ in range(count):
        _, grad = st.exchange(recv_next=not st.ps.is_last_stage)
        st.exchange(send_prev=st.backward(0, grad))


def one_f_one_b(st: _Stage) -> None:
    """1F1B (PipeDream-Flush; Narayanan et al. 2021, Fig. 4 top). Stage r runs p - r - 1 warmup
    forwards so that the last stage starts its first backward as early as possible; in steady
    state each forward is followed by the backward of the oldest micro-batch, bounding the
    activations held to p - r micro-batches; the cooldown drains the remaining backwards."""
    p, r, m = st.ps.pp, st.ps.pp_rank, len(st.micro_batches)
    first, last = st.ps.is_first_stage, st.ps.is_last_stage
    warmup = m if st.forward_only else warmup_forwards(ONE_F_ONE_B, p, r, m)
    steady = m - warmup

    # Warmup: forwards only, filling the pipeline.
    _forwards(st, range(warmup))

    # Steady 1F1B: forward micro-batch warmup + i, backward micro-batch i.
    x = st.exchange(recv_prev=not first)[0] if steady else None
    for i in range(steady):
        y = st.forward(0, warmup + i, x)
        _, grad = st.exchange(send_next=y, recv_next=not last)
        input_grad = st.backward(0, grad)
        x, _ = st.exchange(send_prev=input_grad, recv_prev=not first and i < steady - 1)

    # Cooldown: backwards of the warmup micro-batches.
    if not st.forward_only:
        _backwards(st, warmup)


def interleaved_1f1b(st: _Stage) -> None:
    """Interleaved 1F1B (Narayanan et al. 2021, Sec. 2.2.2, Fig. 4 bottom), in Megatron-LM's
    order. Virtual step k runs chunk (k mod p*v) // p on micro-batch (k // p*v)*p + k mod p:
    groups of p micro-batches go through chunk 0, then chunk 1, ... so that the first stage always
    has work while its first results travel round the ring. Backward visits chunks in reverse.
    Needs m to be a multiple of p."""
    p, r, v, m = st.ps.pp, st.ps.pp_rank, st.num_chunks, len(st.micro_batches)
    check_micro_batches(INTERLEAVED, m, p)
    first, last = st.ps.is_first_stage, st.ps.is_last_stage
    total = m * v

    def chunk_of(k: int, forward: bool) -> int:
        c = (k % (p * v)) // p
        return c if forward else v - 1 - c

    def micro_batch_of(k: int) -> int:
        return (k // (p * v)) * p + k % p

    # Warmup length (megasft.layout.warmup_forwards): what fits before the first gradient comes
    # back round the ring; with m == p there is no steady state, only warmup and cooldown.
    warmup = total if st.forward_only else warmup_forwards(INTERLEAVED, p, r, m, v)
    steady = total - warmup
    inputs = [deque() for _ in range(v)]      # received activations, per chunk, in order
    grads = [deque() for _ in range(v)]       # received output gradients, per chunk, in order

    def next_input(chunk: int):
        return None if first and chunk == 0 else inputs[chunk].popleft()

    def next_grad(chunk: int):
        return None if last and chunk == v - 1 else grads[chunk].popleft()

    # Warmup: forwards only; the last one also asks for the first gradient.
    if not first:
        inputs[0].append(st.exchange(recv_prev=True)[0])
    for k in range(warmup):
        y = st.forward(chunk_of(k, True), micro_batch_of(k), next_input(chunk_of(k, True)))
        following = chunk_of(k + 1, True)
        recv_prev = not (first and following == 0) and k != total - 1
        recv_next = k == warmup - 1 and steady > 0 and not last
        x, grad = st.exchange(send_next=y, recv_prev=recv_prev, recv_next=recv_next)
        if recv_prev:
            inputs[following].append(x)
        if recv_next:
            grads[v - 1].append(grad)

    # Steady 1F1B: forward virtual step warmup + k, backward virtual step k, one exchange.
    for k in range(steady):
        fk = k + warmup
        y = st.forward(chunk_of(fk, True), micro_batch_of(fk), next_input(chunk_of(fk, True)))
        input_grad = st.backward(chunk_of(k, False), next_grad(chunk_of(k, False)))
        # What arrives now was sent by a neighbour p-1 virtual steps ago when it wraps the ring.
        if first:
            wrapped = chunk_of(fk - (p - 1), True)
            recv_prev, following = wrapped != v - 1, wrapped + 1
        else:
            recv_prev, following = True, chunk_of(fk + 1, True)
        if last:
            wrapped = chunk_of(k - (p - 1), False)
            recv_next, preceding = wrapped != 0, wrapped - 1
        else:
            recv_next, preceding = True, chunk_of(k + 1, False)
        recv_prev = recv_prev and k != steady - 1
        x, grad = st.exchange(send_next=y, send_prev=input_grad, recv_prev=recv_prev,
                              recv_next=recv_next)
        if recv_prev:
            inputs[following].append(x)
        if recv_next:
            grads[preceding].append(grad)

    # Cooldown: the remaining backwards.
    if st.forward_only:
        return
    if steady == 0 and not last:
        grads[v - 1].append(st.exchange(recv_next=True)[1])
    for k in range(steady, total):
        input_grad = st.backward(chunk_of(k, False), next_grad(chunk_of(k, False)))
        preceding = chunk_of(k + 1, False)
        recv_next = not (last and preceding == v - 1) and k != total - 1
        _, grad = st.exchange(send_prev=input_grad, recv_next=recv_next)
        if recv_next:
            grads[preceding].append(grad)


# ----------------------------------------------------------------------------------- dispatch
RUNNERS = {NO_PIPELINE: no_pipeline, AFAB: all_forward_all_backward, ONE_F_ONE_B: one_f_one_b,
           INTERLEAVED: interleaved_1f1b, ZB_H1: zero_bubble_h1, ZBV: zero_bubble_v}


def forward_backward(forward_step: ForwardStep, micro_batches: list[dict], ps: ParallelState, *,
                     num_chunks: int = 1, tensor_shape=None, dtype: torch.dtype = torch.float32,
                     forward_only: bool = False, schedule: str = "auto",
                     no_sync: Optional[Callable[[], ContextManager]] = None,
                     weight_store=None) -> ScheduleResult:
    """Run forward (and backward) of every micro-batch through this rank's chunks.

    schedule: ParallelConfig.pipeline_schedule (resolved by megasft.layout.resolve_schedule; a
    Layout's resolved name passes through unchanged).
    tensor_shape: the activation shape between stages, [s/tp if SP else s, b, h] (static;
    Layout.activation_shape).
    no_sync: optional context-manager factory (e.g. GradBuffer.no_sync) entered around every
    backward except each chunk's last, so overlapped DP gradient reduction starts only then.
    weight_store: the megasft.pipeline.weight_grad.WeightGradStore the chunks' linear layers defer
    their weight gradients to (zero-bubble schedules need one)."""
    name = resolve_schedule(schedule, ps.pp, num_chunks)
    if ps.pp > 1 and tensor_shape is None:
        raise ValueError("pipeline schedules need tensor_shape ([s/tp if SP else s, b, h])")
    if not micro_batches:
        raise ValueError("forward_backward needs at least one micro-batch")
    if name in (ZB_H1, ZBV) and weight_store is None:
        raise ValueError(f"the {name} schedule needs the weight_store its chunks' linear layers defer to")
    start = time.perf_counter()
    st = _Stage(forward_step, micro_batches, ps, num_chunks, tensor_shape, dtype, forward_only, no_sync,
                weight_store, name)
    RUNNERS[name](st)
    st.result.wall_s = time.perf_counter() - start
    return st.result
