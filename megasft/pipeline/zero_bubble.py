"""ZB-H1, the zero-bubble schedule with 1F1B's activation memory (Qi et al. 2023, "Zero Bubble
Pipeline Parallelism", Sec. 3.1).

Each backward is split into B (input gradient, which the previous stage waits for) and W (weight
gradient, megasft.pipeline.weight_grad), so a stage can run W passes where 1F1B idles in its
cool-down. Stage r keeps at most p - r micro-batches between their F and their W — 1F1B's peak of
in-flight activations — and with F, B and W of equal cost the bubble shrinks from 1F1B's
(p-1)(F+B+W) to (p-1)(F+B-W): one third.

Each stage runs a fixed order of passes (zb_h1_orders). Replayed with unit costs
(_timeline_length) the orders form a timeline in which every message is received after it was
sent, so executing them with blocking receives and non-blocking sends cannot deadlock, whatever
the real costs are (tests/test_pipeline_zero_bubble.py replays the orders it uses).
"""
from __future__ import annotations

import contextlib
import time
from collections import deque
from functools import lru_cache
from typing import Optional

from megasft.errors import ConfigError
from megasft.pipeline.weight_grad import WeightGradStore, use_deferred_weight_grads

F_PASS, B_PASS, W_PASS = "F", "B", "W"


def zero_bubble_store(schedule: str, cfg, ps, chunks) -> Optional[WeightGradStore]:
    """For the zero-bubble schedules (zb_h1, zbv), a WeightGradStore the chunks' TP linear layers
    defer their weight gradients to (None for other schedules). Refuses the combinations it
    cannot run."""
    from megasft.layout import ZB_H1, ZBV

    if schedule not in (ZB_H1, ZBV):
        return None
    if cfg.train.fp8 != "off":
        raise ConfigError(f"parallel.pipeline_schedule={schedule} splits the F.linear backward; Transformer "
                          "Engine's FP8 GEMMs cannot be split: set train.fp8=off or pipeline_schedule=1f1b")
    if ps.device.type == "cuda":
        # Its passes exchange one message at a time; over NCCL a send and a receive between the
        # same two ranks can wait on each other, which gloo's buffered sends never do.
        raise ConfigError(f"parallel.pipeline_schedule={schedule} is verified on the gloo backend only (its "
                          "per-pass p2p order is not yet proven deadlock-free over NCCL); use 1f1b or "
                          "interleaved on GPUs")
    store = WeightGradStore()
    for chunk in chunks:
        use_deferred_weight_grads(chunk, store)
    return store


@lru_cache(maxsize=64)
def zb_h1_orders(p: int, m: int) -> tuple[tuple[tuple[str, int], ...], ...]:
    """Per stage, the ZB-H1 order of (pass, micro-batch) for p stages and m micro-batches.

    Stage r runs 1F1B's F/B order — Warmup of p - r - 1 forwards, Steady one F then one B,
    Cooldown the remaining B's — and defers its first r weight passes: in steady state a W follows
    a B only once r W's are pending. Stage r then holds at most p micro-batches between F and W
    (1F1B's first-stage peak; 1F1B's stage r holds p - r). In the cool-down, where a stage waits
    for gradients that arrive later each time, the c-th B is followed by one W if more than
    r - c - 1 are pending; the rest fill the end. With unit costs the bubble is
    (p-1) / (3m + p - 1) for m >= p."""
    orders = []
    for r in range(p):
        order, pending = [], deque()
        warmup = min(p - r - 1, m)
        order += [(F_PASS, k) for k in range(warmup)]                     # Warmup
        for j in range(m - warmup):                                       # Steady: F, B, (W)
            order += [(F_PASS, warmup + j), (B_PASS, j)]
            pending.append(j)
            if len(pending) > r:
                order.append((W_PASS, pending.popleft()))
        for c, j in enumerate(range(m - warmup, m)):                      # Cooldown: B, (W)
            order.append((B_PASS, j))
            pending.append(j)
            if len(pending) > r - c - 1:
                order.append((W_PASS, pending.popleft()))
        order += [(W_PASS, k) for k in pending]
        orders.append(tuple(order))
    return tuple(orders)


@lru_cache(maxsize=256)
def peak_in_flight(p: int, r: int, m: int) -> int:
    """Most micro-batches stage r holds between their F and their W in the ZB-H1 order."""
    held = peak = 0
    for kind, _ in zb_h1_orders(p, m)[r]:
        held += 1 if kind == F_PASS else -1 if kind == W_PASS else 0
        peak = max(peak, held)
    return peak


@lru_cache(maxsize=64)   # the Layout's theory, read on every pipelined train step
def simulated_bubble(p: int, m: int) -> float:
    """Idle fraction of the unit-cost ZB-H1 timeline (each stage busy 3m units of its length)."""
    orders = zb_h1_orders(p, m)
    finish = _timeline_length(orders, p, m)
    return 1.0 - 3 * m / finish


def _timeline_length(orders, p: int, m: int) -> int:
    """Replays the ZB-H1 orders with unit costs and dependencies; returns the time the last pass ends."""
    def prerequisites(pass_):
        kind, r, k = pass_
        if kind == F_PASS:
            return () if r == 0 else ((F_PASS, r - 1, k),)                 # the activation from upstream
        if kind == B_PASS:
            return ((F_PASS, r, k),) if r == p - 1 else ((B_PASS, r + 1, k),)   # the output gradient
        return ((B_PASS, r, k),)

    return replay([[(kind, r, k) for kind, k in order] for r, order in enumerate(orders)], prerequisites)


def replay(orders, prerequisites) -> int:
    """Replay per-rank pass orders with unit costs: a pass starts once its rank has finished the
    pass before it and every pass of ``prerequisites(pass)`` has finished (messages are free).
    Passes are hashable and unique across ranks. Returns the time the last pass ends; raises if
    the orders deadlock — then executing them with blocking receives would hang."""
    done = {}
    clock = [0] * len(orders)
    progress = [0] * len(orders)
    while any(progress[r] < len(order) for r, order in enumerate(orders)):
        moved = False
        for r, order in enumerate(orders):
            if progress[r] == len(order):
                continue
            needs = prerequisites(order[progress[r]])
            if any(dep not in done for dep in needs):
                continue
            clock[r] = done[order[progress[r]]] = max([clock[r]] + [done[dep] for dep in needs]) + 1
            progress[r] += 1
            moved = True
        if not moved:
            raise AssertionError("the pipeline pass orders deadlock")   # a bug, never data
    return max(clock)


LOOKAHEAD = 2   # passes ahead of its own whose receive a pass order posts (receiving_ahead)


def receiving_ahead(st, order, receives):
    """Yield the passes of `order`, having posted each one's receive (``receives[i]``: (grad,
    reverse) for _Stage.prefetch, or None) LOOKAHEAD passes earlier, so a message travels while
    this rank computes rather than after it asks for it (gloo moves a message once its receive is
    posted; measured on the ZBV benchmark, this took the bubble at m=16 from +40 % over theory to
    +17 %). Waits keep the order of the passes, so the order stays deadlock-free; the cost is at
    most LOOKAHEAD receive buffers held early."""
    receives = list(receives) + [None] * LOOKAHEAD
    for i, pass_ in enumerate([None] * LOOKAHEAD + list(order)):
        if receives[i] is not None:
            st.prefetch(*receives[i])
        if pass_ is not None:
            yield pass_


def zero_bubble_h1(st) -> None:
    """Run this stage's ZB-H1 order (st: megasft.pipeline.schedules._Stage, with a weight store).
    Forward-only runs (evaluation) have no B or W: they run the forwards in order."""
    ps, m = st.ps, len(st.micro_batches)
    if st.forward_only:
        for k in range(m):
            x = None if ps.is_first_stage else st.recv_activation()
            y = st.forward(0, k, x)
            if not ps.is_last_stage:
                st.send_activation(y)
        st.finish_sends()
        return
    store, order = st.weight_store, zb_h1_orders(ps.pp, m)[ps.pp_rank]
    # F receives its input except on the first stage, B its output gradient except on the last.
    receives = [None if kind == W_PASS or (ps.is_first_stage if kind == F_PASS else ps.is_last_stage)
                else (kind == B_PASS, False) for kind, _ in order]
    for kind, k in receiving_ahead(st, order, receives):
        # DP reduction of a bucket starts with the last micro-batch's B and W, as in 1F1B.
        last = k == m - 1
        sync = contextlib.nullcontext() if (st.no_sync is None or last) else st.no_sync()
        if kind == F_PASS:
            x = None if ps.is_first_stage else st.recv_activation()
            y = st.forward(0, k, x)
            if not ps.is_last_stage:
                st.send_activation(y)
        elif kind == B_PASS:
            grad = None if ps.is_last_stage else st.recv_grad()
            with sync, store.capture():
                input_grad = st.backward(0, grad, release=False)
            if not ps.is_first_stage:
                st.send_grad(input_grad)
        else:
            start = time.perf_counter()
            with sync:
                store.run_oldest()
            st.result.busy_s += time.perf_counter() - start
            st.in_flight -= 1   # the micro-batch's activations are released once its W ran
    st.finish_sends()
    if store.pending():
        raise AssertionError(f"{store.pending()} weight-gradient passes left after ZB-H1")  # a bug
