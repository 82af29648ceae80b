"""``train.comm_stats``: the communication ledger (megasft.collectives) switched on for the logged
steps, and its report next to the planner's prediction for the same layout
(megasft.planner.comm.predicted_bytes) — bytes this rank sent per group kind in one step."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from megasft import collectives
from megasft.config import Config
from megasft.parallel_state import ParallelState

KINDS = ("tp", "cp", "ep", "pp", "dp", "embedding")


class CommStats:
    """Counts one step's communication when asked; `report` holds the last counted step's."""

    def __init__(self, cfg: Config, ps: ParallelState):
        self.enabled = cfg.train.comm_stats
        self.report: Optional[dict] = None
        self.predicted: dict[str, float] = {}
        if self.enabled:
            from megasft.planner.comm import predicted_bytes
            from megasft.planner.pinned import pin

            self.predicted = predicted_bytes(pin(cfg, ps.world_size), ps.pp_rank)

    @contextlib.contextmanager
    def counting(self, on: bool) -> Iterator[None]:
        if not (self.enabled and on):
            yield
            return
        collectives.LEDGER.start()
        try:
            yield
        finally:
            self.report = collectives.LEDGER.stop()

    def as_record(self) -> dict:
        """{"comm": {kind: {op: {calls, bytes, seconds}}}, "comm_predicted": {kind: bytes}}."""
        if self.report is None:
            return {}
        return {"comm": self.report, "comm_predicted": self.predicted}

    def line(self, step: int) -> str:
        """One log line: MB sent per group kind, measured / planned, and the seconds blocked."""
        report = self.report or {}
        parts = []
        for kind in KINDS:
            measured, planned = collectives.sent_bytes(report, kind), self.predicted.get(kind, 0.0)
            if measured or planned:
                parts.append(f"{kind} {measured / 1e6:.3g}/{planned / 1e6:.3g}")
        blocked = sum(e["seconds"] for ops in report.values() for e in ops.values())
        return (f"comm step {step}, MB sent/planned: " + " | ".join(parts or ["none"])
                + f" | blocked {blocked:.2f} s")
