"""What a person watching a run reads: a live progress line per step on a terminal, and the
end-of-run summary. Rank 0 only (megasft.training.metrics.MetricsWriter owns one).

The live line is redrawn in place with a carriage return, and only when stdout is a terminal
(``train.progress_bar=auto``): a log file or a pipe gets the log-interval lines alone, never a run
of ``\\r`` frames. Every line fits LINE_WIDTH columns; the full numbers are in metrics.jsonl.
"""
from __future__ import annotations

import math
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, TextIO

LINE_WIDTH = 100


def fit(line: str, width: int = LINE_WIDTH) -> str:
    """`line` cut to `width` columns (the parts that matter come first in every line)."""
    return line if len(line) <= width else line[:width - 1] + "…"


def wrap(text: str, width: int = LINE_WIDTH) -> str:
    """Each line of `text` wrapped at spaces to `width` columns, continuations indented (start-up
    lines and run-log notes; a single word longer than that, a path, stays whole)."""
    return "\n".join("\n".join(textwrap.wrap(line, width, subsequent_indent="    ", break_long_words=False,
                                             break_on_hyphens=False)) or line for line in text.split("\n"))


def clock(seconds: float) -> str:
    """1:02:03 / 2:03 — elapsed and ETA fields."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def duration(seconds: float) -> str:
    """4 min 52 s / 1 h 02 min / 12.3 s — the summary's wall time."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


@dataclass
class RunTotals:
    """The work of this process's run (a resumed run counts from its resume step)."""

    first_step: int        # the step the run started after (0, or the resume step)
    last_step: int = 0
    tokens: int = 0        # token slots of every global batch trained in this run
    trained: int = 0       # tokens that contributed to the loss


class Progress:
    """Per-step accounting for the live line and the summary.

    ``step()`` is called after every optimizer step with that step's loss and global-batch tokens;
    on a terminal it redraws ``[####....] step 12/300 | loss 2.3456 | 9,876 tok/s | 0:41 < 9:30``
    (elapsed < ETA). ``clear()`` wipes it before a log line is printed, so the two never mix.
    """

    def __init__(self, total_steps: int, live: bool, stream: Optional[TextIO] = None,
                 now=time.perf_counter):
        self.total_steps, self.live = total_steps, live
        self.stream = stream or sys.stdout
        self.now = now
        self.start = now()
        self.totals: Optional[RunTotals] = None
        self._drawn = False

    def step(self, step: int, loss: float, tokens: int, trained: int) -> None:
        if self.totals is None:   # the first step of this process: a resume starts after step - 1
            self.totals = RunTotals(first_step=step - 1)
        t = self.totals
        t.last_step, t.tokens, t.trained = step, t.tokens + tokens, t.trained + trained
        if self.live:
            self.stream.write("\r" + self.line(step, loss))
            self.stream.flush()
            self._drawn = True

    def line(self, step: int, loss: float) -> str:
        elapsed = self.now() - self.start
        done = step - self.totals.first_step
        rate = self.totals.tokens / elapsed if elapsed > 0 else 0.0
        eta = elapsed / done * (self.total_steps - step) if done else math.inf
        width = 20
        filled = int(width * step / max(1, self.total_steps))
        bar = "[" + "#" * filled + "." * (width - filled) + "]"
        return fit(f"{bar} step {step}/{self.total_steps} | loss {loss:.4f} | {rate:,.0f} tok/s | "
                   f"{clock(elapsed)} < {clock(eta)}").ljust(LINE_WIDTH - 1)

    def clear(self) -> None:
        """Erase the live line (before a log line, or at the end)."""
        if self._drawn:
            self.stream.write("\r" + " " * (LINE_WIDTH - 1) + "\r")
            self.stream.flush()
            self._drawn = False

    def elapsed(self) -> float:
        return self.now() - self.start


def summary(progress: Progress, total_steps: int, best_eval: Optional[tuple[float, int]],
            metrics_path: Path, checkpoint: Optional[Path], export: Optional[Path],
            last_record: Optional[dict] = None) -> list[str]:
    """The end-of-run lines: wall time, steps, tokens, best eval, the pipeline bubble of the last
    log point, where the results are."""
    t = progress.totals or RunTotals(first_step=0)
    steps = t.last_step - t.first_step
    ran = f"steps {t.first_step + 1}-{t.last_step}" if steps else "no steps run"
    lines = [f"megasft: done after {t.last_step} steps in {duration(progress.elapsed())} "
             f"({ran} in this run)"
             if t.last_step >= total_steps else
             f"megasft: stopped at step {t.last_step} of {total_steps} after {duration(progress.elapsed())}",
             f"  tokens   {t.tokens:,} ({t.trained:,} trained"
             f"{f', {t.trained / t.tokens:.1%}' if t.tokens else ''})"]
    if last_record is not None and "bubble" in last_record:
        lines.append(f"  pipeline bubble {100 * last_record['bubble']:.1f}% measured at step "
                     f"{last_record['step']} (theory {100 * last_record['bubble_theory']:.1f}%)")
    if best_eval is not None:
        lines.append(f"  eval     best loss {best_eval[0]:.4f} at step {best_eval[1]}")
    if checkpoint is not None:
        lines.append(f"  checkpoint {checkpoint}")
    if export is not None:
        lines.append(f"  export   {export} (Hugging Face)")
    lines.append(f"  metrics  {metrics_path}")
    return lines   # short but for the paths, which are never cut
