"""Fault injection, a testing aid: make a run fail in a chosen way at a chosen step.

Set ``MEGASFT_FAULT`` to comma-separated ``KIND[_rankR]@STEP`` items; STEP is the 1-based
optimizer step, ``_rankR`` limits the fault to global rank R (default: every rank):

    nan_loss@3        step 3's loss reads NaN (gradients stay finite): the step is skipped
    nan_grad@2        a NaN in the gradients before step 2's update: the grad norm is NaN, skipped
    nan_weight@4      a NaN in the fp32 main params after step 4's update: the run stops, unsaved
    stop_rank1@2      rank 1 SIGSTOPs itself as step 2 starts (a frozen host)
    sleep_rank1@2     rank 1 sleeps an hour as step 2 starts (alive but stuck)
    usr1@4            SIGUSR1 arrives during step 4 (Slurm's pre-timeout warning): the run saves
                      and stops after that step

The tests of megasft's reliability guarantees use it (tests/test_reliability_runtime.py). Unset, the
trainer holds None and each hook is one ``is not None`` test per step.
"""
from __future__ import annotations

import os
import re
import signal
import time
from dataclasses import dataclass
from typing import Optional

import torch

ENV = "MEGASFT_FAULT"
KINDS = ("nan_loss", "nan_grad", "nan_weight", "stop", "sleep", "usr1")
_ITEM = re.compile(r"^(?P<kind>[a-z][a-z0-9_]*?)(?:_rank(?P<rank>\d+))?@(?P<step>\d+)$")


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: Optional[int] = None   # None: every rank


class Faults:
    """The faults of this rank, parsed from MEGASFT_FAULT."""

    def __init__(self, faults: list[Fault], rank: int) -> None:
        self.faults = [f for f in faults if f.rank is None or f.rank == rank]

    @classmethod
    def from_env(cls, rank: int) -> Optional["Faults"]:
        """None when MEGASFT_FAULT is unset or empty (the normal case)."""
        text = os.environ.get(ENV, "").strip()
        return cls(parse(text), rank) if text else None

    def due(self, kind: str, step: int) -> bool:
        return any(f.kind == kind and f.step == step for f in self.faults)

    # ------------------------------------------------------------------ hooks (called by Trainer)
    def at_step_start(self, step: int) -> None:
        if self.due("stop", step):
            os.kill(os.getpid(), signal.SIGSTOP)
        if self.due("sleep", step):
            time.sleep(3600)
        if self.due("usr1", step):
            os.kill(os.getpid(), signal.SIGUSR1)

    def loss(self, step: int, loss: float) -> float:
        return float("nan") if self.due("nan_loss", step) else loss

    def before_update(self, step: int, grads: torch.Tensor) -> None:
        if self.due("nan_grad", step):
            grads.view(-1)[0] = float("nan")

    def after_update(self, step: int, main_params: torch.Tensor) -> None:
        if self.due("nan_weight", step):
            main_params.view(-1)[0] = float("nan")


def parse(text: str) -> list[Fault]:
    """'nan_loss@3,stop_rank1@2' -> [Fault('nan_loss', 3), Fault('stop', 2, 1)]."""
    faults = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        match = _ITEM.match(item)
        if match is None or match["kind"] not in KINDS:
            raise ValueError(f"{ENV} item {item!r} must look like KIND[_rankR]@STEP with KIND in "
                             f"{list(KINDS)}, e.g. nan_loss@3 or stop_rank1@2")
        rank = match["rank"]
        faults.append(Fault(match["kind"], int(match["step"]), None if rank is None else int(rank)))
    return faults
