"""Profiling aid (``train.profile=true``): a few training steps under torch.profiler.

The profiler follows torch's wait / warmup / active schedule, counted in optimizer steps: the
first ``wait`` steps run unprofiled (first-step costs such as allocator growth and lazy init would
dominate the trace otherwise), ``warmup`` steps are traced but discarded (the tracer's own start-up
cost lands there), and the next ``active`` steps are recorded. When they finish, every rank writes
a Chrome trace (open it in chrome://tracing or https://ui.perfetto.dev) to

    <run_dir>/profile/rank{N}.json

and rank 0 prints a table of the ops with the most self time. A run that ends inside the active
window still writes what it recorded (torch flushes on exit); one that ends before it writes nothing.

Wiring in a training loop::

    with maybe_profile(cfg.train.profile, run_dir, ps.rank, ps.device) as prof:
        while ...:
            trainer.train_step(micro_batches)
            prof.step()
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch.profiler import ProfilerActivity, profile, schedule


@dataclass(frozen=True)
class ProfileWindow:
    """Which optimizer steps are traced (torch.profiler.schedule's arguments, one cycle)."""

    wait: int = 1
    """Steps skipped first (step 1 pays one-off costs that would dominate the trace)."""
    warmup: int = 1
    """Steps traced and discarded (the tracer's start-up cost)."""
    active: int = 3
    """Steps recorded into the trace."""

    @property
    def total(self) -> int:
        return self.wait + self.warmup + self.active


class _NoProfiler:
    """Stands in when profiling is off, so the loop calls ``prof.step()`` unconditionally."""

    trace_path: Optional[Path] = None

    def step(self) -> None:
        pass


class StepProfiler:
    """torch.profiler.profile over ``window``; ``step()`` after every optimizer step."""

    def __init__(self, run_dir: str | Path, rank: int, device: torch.device, window: ProfileWindow,
                 top_ops: int = 15):
        self.trace_path = Path(run_dir) / "profile" / f"rank{rank}.json"
        self.rank, self.top_ops, self.device = rank, top_ops, device
        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self._profile = profile(
            activities=activities,
            schedule=schedule(wait=window.wait, warmup=window.warmup, active=window.active, repeat=1),
            on_trace_ready=self._write,
            record_shapes=True,        # the table groups ops by input shape: which GEMM is slow
            profile_memory=False,      # memory events inflate the trace several-fold
            with_stack=False)

    def __enter__(self) -> "StepProfiler":
        self.trace_path.parent.mkdir(parents=True, exist_ok=True)
        self._profile.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._profile.__exit__(*exc)

    def step(self) -> None:
        self._profile.step()

    def _write(self, prof: profile) -> None:
        prof.export_chrome_trace(str(self.trace_path))
        if self.rank == 0:
            print(self.top_table(prof), flush=True)
            print(f"megasft: profiler trace written to {self.trace_path} (one file per rank)", flush=True)

    def top_table(self, prof: profile) -> str:
        """The ops with the most self time (device time on CUDA, CPU time otherwise)."""
        key = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        return prof.key_averages().table(sort_by=key, row_limit=self.top_ops)


@contextlib.contextmanager
def maybe_profile(enabled: bool, run_dir: str | Path, rank: int,
                  device: torch.device | str = "cpu",
                  window: ProfileWindow = ProfileWindow()) -> Iterator[StepProfiler | _NoProfiler]:
    """A StepProfiler when `enabled`, else an object whose ``step()`` does nothing."""
    if not enabled:
        yield _NoProfiler()
        return
    with StepProfiler(run_dir, rank, torch.device(device), window) as prof:
        yield prof
