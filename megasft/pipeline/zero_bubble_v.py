"""ZBV, the V-shaped zero-bubble schedule (Qi et al. 2023, "Zero Bubble Pipeline Parallelism",
Sec. 6; torch.distributed.pipelining ships it as ScheduleZBVZeroBubble).

The model is cut into 2p chunks and rank r holds chunks r and 2p-1-r (megasft.layout.chunk_ranks):
a micro-batch's forward runs down the ranks through their first chunks and back up through their
second ones — rank p-1 hands chunk p-1's output to its own chunk p without p2p — and ends in the
loss on rank 0, which also holds the embedding. Backward, split into B (input gradient) and W
(weight gradient) as in ZB-H1 (megasft.pipeline.weight_grad), retraces the V. A chunk is half a
stage, so with F = B = W per chunk the only idle time left is the last rank's wait for the first
micro-batch's p - 1 chunk forwards: (p-1) of a step's 6m + p - 1 chunk-pass units, a bubble of
(p-1)/(6m+p-1) for m >= p where 1F1B has (p-1)/(m+p-1). Every rank holds at most 2p chunk
activations between their F and W — the p whole-stage micro-batches 1F1B's first stage holds.

Two constructions give the pass orders (zbv_orders), each replayed with unit costs
(zero_bubble.replay), and the shorter timeline wins, the paper's on a tie:

* the paper's hand-made order (as torch's ScheduleZBVZeroBubble builds it): it reaches the bound
  6m + p - 1 once m is at least about 1.5p, and its critical path crosses ranks a fixed number
  of times, so message latency costs it a constant, not one hop per micro-batch;
* a list-scheduling simulation, the kind of greedy construction the paper's Sec. 3 uses:
  whenever a rank is free it runs the first ready pass of PRIORITY, forwards only while fewer
  than 2p chunk activations are held. It reaches the bound for every m >= p (all p <= 12,
  m <= 48 tried), which the paper's order misses for p <= m < 1.5p, e.g. p = m = 4.

Since the replay completes, executing an order with blocking receives and non-blocking sends
cannot deadlock whatever the real costs are (tests/test_pipeline_zbv.py checks the orders).
"""
from __future__ import annotations

import contextlib
import time
from collections import deque
from functools import lru_cache

from megasft.pipeline.zero_bubble import B_PASS, F_PASS, W_PASS, receiving_ahead, replay

FIRST, SECOND = 0, 1   # a rank's local chunks: r (the V's way down) and 2p-1-r (its way up)

# The ready pass a free rank runs first. Forwards while memory allows, the way-up chunk's first (it
# brings a micro-batch to the loss, whose B starts the backward wave); then the way-down chunk's
# B and W before the way-up chunk's. Chosen among the static priority orders by replaying the
# resulting timelines: this one reaches the bound above in every case tried.
PRIORITY = ((F_PASS, SECOND), (F_PASS, FIRST), (B_PASS, FIRST), (W_PASS, FIRST), (B_PASS, SECOND),
            (W_PASS, SECOND))


def v_chunks(p: int, r: int) -> tuple[int, int]:
    """Global chunk numbers of rank r's local chunks (megasft.layout.chunk_ranks for zbv)."""
    return r, 2 * p - 1 - r


@lru_cache(maxsize=64)
def zbv_orders(p: int, m: int) -> tuple[tuple[tuple[str, int, int], ...], ...]:
    """Per rank, the ZBV order of (pass, local chunk, micro-batch) for p ranks, m micro-batches:
    the paper's, or the greedy one where that is shorter (module docstring). Each chunk runs its
    F, B and W in micro-batch order."""
    paper, greedy = paper_orders(p, m), greedy_orders(p, m)
    return paper if zbv_timeline_length(paper, p) <= zbv_timeline_length(greedy, p) else greedy


def paper_orders(p: int, m: int) -> tuple[tuple[tuple[str, int, int], ...], ...]:
    """ZB-V as the paper draws it (Qi et al. 2023, Sec. 6), built for n = max(m, 2p-1)
    micro-batches and the passes of those beyond m dropped (a subsequence of a deadlock-free order
    is one). Rank r — Warmup: 2(p-r)-1 forwards of its first chunk, r of (F second, F first), p-r
    of (F B W second). Steady, until every forward ran: [F first], B W first, F B W second.
    Cooldown: r of (B first, B second) with their W's deferred, p-r of (B W first), then the
    deferred W's of the second chunk and of the first."""
    n = max(m, 2 * p - 1)
    orders = []
    for r in range(p):
        order, nf, nb = [], [0, 0], [0, 0]

        def run(*passes: tuple[str, int]) -> None:
            for kind, local in passes:
                counter = nf if kind == F_PASS else nb
                k = counter[local] - (kind == W_PASS)   # a W follows its own B
                order.append((kind, local, k))
                counter[local] += kind != W_PASS

        run(*[(F_PASS, FIRST)] * (2 * (p - r) - 1))                          # Warmup
        run(*[(F_PASS, SECOND), (F_PASS, FIRST)] * r)
        run(*[(F_PASS, SECOND), (B_PASS, SECOND), (W_PASS, SECOND)] * (p - r))
        while nf[SECOND] < nf[FIRST] or nf[FIRST] < n:                      # Steady
            if nf[FIRST] < n:
                run((F_PASS, FIRST))
            run((B_PASS, FIRST), (W_PASS, FIRST), (F_PASS, SECOND), (B_PASS, SECOND), (W_PASS, SECOND))
        waiting = [nb[FIRST], nb[SECOND]]                                   # Cooldown
        run(*[(B_PASS, FIRST), (B_PASS, SECOND)] * r)
        for _ in range(p - r):
            run((B_PASS, FIRST))
            order.append((W_PASS, FIRST, waiting[FIRST]))
            waiting[FIRST] += 1
        order += [(W_PASS, SECOND, k) for k in range(waiting[SECOND], nb[SECOND])]
        order += [(W_PASS, FIRST, k) for k in range(waiting[FIRST], nb[FIRST])]
        orders.append(tuple(pass_ for pass_ in order if pass_[2] < m))
    return tuple(orders)


def greedy_orders(p: int, m: int) -> tuple[tuple[tuple[str, int, int], ...], ...]:
    """The list-scheduling construction (module docstring): unit time steps, each free rank
    running the first ready pass of PRIORITY. Each chunk's W's follow the order of its B's."""
    limit = 2 * p                                   # chunk activations held between F and W
    chunks = [v_chunks(p, r) for r in range(p)]
    done: dict = {}                                 # (pass, global chunk, micro-batch) -> end time
    next_f = [[0, 0] for _ in range(p)]
    next_b = [[0, 0] for _ in range(p)]
    awaiting_w = [[deque(), deque()] for _ in range(p)]
    held = [0] * p
    orders: list[list] = [[] for _ in range(p)]

    def ready(r: int, kind: str, local: int, t: int):
        c = chunks[r][local]
        if kind == F_PASS:
            k = next_f[r][local]
            upstream = c == 0 or done.get((F_PASS, c - 1, k), t + 1) <= t
            return k if k < m and held[r] < limit and upstream else None
        if kind == B_PASS:
            k = next_b[r][local]
            downstream = c == 2 * p - 1 or done.get((B_PASS, c + 1, k), t + 1) <= t
            return k if k < next_f[r][local] and done[(F_PASS, c, k)] <= t and downstream else None
        return awaiting_w[r][local][0] if awaiting_w[r][local] else None

    t = 0
    while sum(map(len, orders)) < 6 * p * m:
        chosen = []
        for r in range(p):
            for kind, local in PRIORITY:
                k = ready(r, kind, local, t)
                if k is not None:
                    chosen.append((r, kind, local, k))
                    break
        if not chosen:   # with unit costs everything started has ended: nothing will change
            raise AssertionError(f"the ZBV construction is stuck at p={p}, m={m}")   # a bug, never data
        for r, kind, local, k in chosen:
            orders[r].append((kind, local, k))
            done[(kind, chunks[r][local], k)] = t + 1
            if kind == F_PASS:
                next_f[r][local] += 1
                held[r] += 1
            elif kind == B_PASS:
                next_b[r][local] += 1
                awaiting_w[r][local].append(k)
            else:
                awaiting_w[r][local].popleft()
                held[r] -= 1
        t += 1
    return tuple(tuple(order) for order in orders)


def zbv_timeline_length(orders, p: int) -> int:
    """Replays ZBV orders with unit costs (zero_bubble.replay); the time the last pass ends."""
    def prerequisites(pass_):
        kind, c, k = pass_
        if kind == F_PASS:
            return () if c == 0 else ((F_PASS, c - 1, k),)                        # the activation
        if kind == B_PASS:
            return ((F_PASS, c, k),) if c == 2 * p - 1 else ((B_PASS, c + 1, k),)  # the output grad
        return ((B_PASS, c, k),)

    keyed = [[(kind, v_chunks(p, r)[local], k) for kind, local, k in order] for r, order in enumerate(orders)]
    return replay(keyed, prerequisites)


@lru_cache(maxsize=64)   # the Layout's theory, read on every pipelined train step
def simulated_bubble_v(p: int, m: int) -> float:
    """Idle fraction of the unit-cost ZBV timeline (each rank busy 6m units of its length)."""
    return 1.0 - 6 * m / zbv_timeline_length(zbv_orders(p, m), p)


@lru_cache(maxsize=256)
def peak_in_flight_v(p: int, r: int, m: int, weights: tuple[int, int] = (1, 1)) -> int:
    """Most chunk activations rank r holds between their F and W in the ZBV order, each local
    chunk counted with its weight (e.g. its layer count; 1: (micro-batch, chunk) pairs)."""
    held = peak = 0
    for kind, local, _ in zbv_orders(p, m)[r]:
        held += weights[local] if kind == F_PASS else -weights[local] if kind == W_PASS else 0
        peak = max(peak, held)
    return peak


# ---------------------------------------------------------------------------------- the runner
class _Turn:
    """Rank p-1's hand-over at the bottom of the V: chunk p-1's outputs become chunk p's inputs,
    chunk p's input gradients chunk p-1's output gradients, in micro-batch order, without p2p."""

    def __init__(self) -> None:
        self.activations: deque = deque()
        self.grads: deque = deque()


def _receives(ps, kind: str, local: int):
    """What pass (kind, local) receives over p2p, as (grad, reverse) (P2P.post_recv), or None:
    forwards their input — except the embedding's and the turn's —, B's their output gradient —
    except the loss's and the turn's —, W's nothing."""
    if kind == W_PASS:
        return None
    # F of the first chunk and B of the second take from above, the others from below in the V.
    from_above = (kind == F_PASS) == (local == FIRST)
    if ps.is_first_stage if from_above else ps.is_last_stage:
        return None
    return kind == B_PASS, local == SECOND


def _input(st, local: int, turn: _Turn):
    """What chunk `local` consumes: nothing at the embedding (rank 0's first chunk), the hand-over
    at the turn, else the activation of the chunk before it, from the rank before or after."""
    ps = st.ps
    if local == FIRST:
        return None if ps.is_first_stage else st.recv_activation()
    return turn.activations.popleft() if ps.is_last_stage else st.recv_activation(reverse=True)


def _pass_on(st, local: int, y, turn: _Turn) -> None:
    """Chunk `local`'s output to the next chunk (rank 0's second chunk ended in the loss: y None)."""
    ps = st.ps
    if local == FIRST:
        if ps.is_last_stage:
            turn.activations.append(y.detach())   # chunk p's input: its gradient is chunk p-1's
        else:
            st.send_activation(y)
    elif not ps.is_first_stage:
        st.send_activation(y, reverse=True)


def _output_grad(st, local: int, turn: _Turn):
    """The gradient of chunk `local`'s output (None for the loss)."""
    ps = st.ps
    if local == SECOND:
        return None if ps.is_first_stage else st.recv_grad(reverse=True)
    return turn.grads.popleft() if ps.is_last_stage else st.recv_grad()


def _pass_back(st, local: int, input_grad, turn: _Turn) -> None:
    """Chunk `local`'s input gradient to the chunk before it (none before the embedding)."""
    ps = st.ps
    if local == SECOND:
        if ps.is_last_stage:
            turn.grads.append(input_grad)
        else:
            st.send_grad(input_grad, reverse=True)
    elif not ps.is_first_stage:
        st.send_grad(input_grad)


def zero_bubble_v(st) -> None:
    """Run this rank's ZBV order (st: megasft.pipeline.schedules._Stage with two chunks and a
    weight store). Forward-only runs (evaluation) run the order's forwards alone: a subsequence of
    a deadlock-free order, whose forwards depend only on forwards, is deadlock-free too."""
    ps, m = st.ps, len(st.micro_batches)
    order = zbv_orders(ps.pp, m)[ps.pp_rank]
    if st.forward_only:
        order = [pass_ for pass_ in order if pass_[0] == F_PASS]
    store, turn = st.weight_store, _Turn()
    for kind, local, k in receiving_ahead(st, order, [_receives(ps, kind, local) for kind, local, _ in order]):
        # DP reduction of a bucket starts with each chunk's last micro-batch's B and W, as in 1F1B.
        sync = contextlib.nullcontext() if (st.no_sync is None or k == m - 1) else st.no_sync()
        if kind == F_PASS:
            _pass_on(st, local, st.forward(local, k, _input(st, local, turn)), turn)
        elif kind == B_PASS:
            grad = _output_grad(st, local, turn)
            with sync, store.capture(local):
                input_grad = st.backward(local, grad, release=False)
            _pass_back(st, local, input_grad, turn)
        else:
            start = time.perf_counter()
            with sync:
                store.run_oldest(local)
            st.result.busy_s += time.perf_counter() - start
            st.in_flight -= 1   # the chunk's activations are released once its W ran
    st.finish_sends()
    if not st.forward_only and store.pending():
        raise AssertionError(f"{store.pending()} weight-gradient passes left after ZBV")   # a bug
