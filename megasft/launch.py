"""``megasft train --nproc N``: torchrun's elastic agent in this process, without its error block.

A bare ``torchrun`` ends every failed run with its ``ChildFailedError`` block (about 35 lines:
the command, each failed rank's exit code, "To enable traceback see ...") *after* whatever the
ranks printed, so the one-line error megasft's rank 0 gives is not what the user reads last. Here
the agent runs through ``torch.distributed.run.run`` (torchrun's own code path, standalone
rendezvous on a free localhost port) and:

* a failure whose exit code is one megasft reports itself (2 configuration / start-up, 3
  checkpoint, 4 diverged, 5 a rank stopped answering; rank 0 printed the one line) adds nothing:
  the command exits with that code;
* any other failure (a Python traceback, a crash, a signal) keeps the agent's log lines and adds
  one line naming the first failed rank and its exit code.

The configuration and the inputs are checked by ``megasft.train.main`` *before* this runs, so the
common mistakes never spawn a process. Multi-node jobs keep using torchrun (``launch/``): this
wrapper is for one node.
"""
from __future__ import annotations

import logging
import os
import sys

REPORTED_CODES = (2, 3, 4, 5)   # megasft.train's exit codes; rank 0 already printed the message


class _Held(logging.Handler):
    """Holds the agent's log records until the outcome says whether they are worth showing."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _hold_agent_logs() -> tuple[_Held, list[tuple[logging.Logger, bool]]]:
    held = _Held()
    saved = []
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher")):
            logger = logging.getLogger(name)
            saved.append((logger, logger.propagate))
            logger.propagate = False
            logger.addHandler(held)
    return held, saved


def launch_local(nproc: int, train_argv: list[str]) -> int:
    """Run ``python -m megasft.train *train_argv`` on ``nproc`` local ranks; return the exit code."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # torchrun sets OMP_NUM_THREADS=1 for each rank when it is unset (and warns); do the same quietly.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = torchrun.parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "megasft.train", *train_argv])
    held, saved = _hold_agent_logs()
    try:
        torchrun.run(args)
        return 0
    except ChildFailedError as err:
        # A rank megasft stopped itself (its line printed by rank 0) outranks the ranks the agent
        # then terminated (exit -15).
        reported = [(r, f) for r, f in sorted(err.failures.items()) if f.exitcode in REPORTED_CODES]
        rank, failure = reported[0] if reported else min(err.failures.items())
        if failure.exitcode in REPORTED_CODES:
            return failure.exitcode
        stderr = logging.StreamHandler(sys.stderr)
        for record in held.records:
            stderr.handle(record)
        print(f"megasft.train: rank {rank} failed with exit code {failure.exitcode} "
              f"(its output is above; {failure.error_file or 'no error file'})", file=sys.stderr, flush=True)
        return failure.exitcode if failure.exitcode > 0 else 1
    except SignalException as err:   # SIGINT / SIGTERM to this process: the agent has stopped the ranks
        print(f"megasft.train: stopped by signal {err.sigval.name}", file=sys.stderr, flush=True)
        return 128 + int(err.sigval)
    finally:
        for logger, propagate in saved:
            logger.removeHandler(held)
            logger.propagate = propagate
