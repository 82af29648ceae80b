"""Run a function on N gloo ranks in real processes, for multi-rank tests.

    results = run_ranks(fn, 4, arg1, arg2, timeout=120)   # [fn's return value on rank 0..3]

Each child sets MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE, initialises a gloo process group and
calls ``fn(*args)``; `fn` and `args` must be picklable (a module-level function). A child that
raises sends its traceback to the parent, which kills the other ranks (they would otherwise hang
in a collective) and raises RuntimeError naming the rank. A run past `timeout` seconds is killed
and fails the same way, so a deadlock fails a test instead of hanging it.
"""
from __future__ import annotations

import os
import pickle
import queue
import socket
import time
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world_size: int, port: int, results: Any, fn: Callable, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    # One intra-op thread per rank: N ranks already share the machine's few cores, and
    # oversubscribed thread pools make every collective wait on a descheduled peer.
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        # Plain pickle bytes: torch's queue would share tensors through file descriptors that die
        # with this process before the parent reads them.
        results.put((rank, True, pickle.dumps(fn(*args))))
    except BaseException:  # noqa: BLE001 - everything, including SystemExit, must reach the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0) -> list:
    """Run ``fn(*args)`` on `world_size` gloo ranks; return the per-rank results in rank order."""
    # Ranks fork from a server that imported torch once, instead of each spawned rank re-importing
    # it (seconds of CPU per rank); the server never ran torch ops, so forking from it is safe.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed"])
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, world_size, port, results, fn, args), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    values: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(values) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"run_ranks: timed out after {timeout:.0f}s; ranks done: {sorted(values)}")
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in values]
                if dead:
                    raise RuntimeError(f"run_ranks: rank {dead[0]} died with exit code "
                                       f"{procs[dead[0]].exitcode} without reporting")
                continue
            if not ok:
                raise RuntimeError(f"run_ranks: rank {rank} failed:\n{value}")
            values[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=5 if len(values) == world_size else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
    return [values[r] for r in range(world_size)]
