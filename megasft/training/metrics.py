"""Throughput, model FLOPs, MFU and the metric writers (console, JSONL, TensorBoard).

Model FLOPs follow Narayanan et al. 2021 eq. (3) as counted in megasft.planner.flops: 6 FLOPs per
matmul parameter per token (forward + two backward GEMMs) plus the attention square. For packed
rows the square is per document, 3 x 4 x (heads*head_dim) x sum(len^2) per layer, since a token
attends only within its own document; this is the work a varlen kernel really has to do. A layer
with a sliding window W counts the same square cut to the band |i - j| < W: 2 * pairs - n, where
pairs = w (w + 1) / 2 + (n - w) w are a document's (query, key) pairs, w = min(n, W) (n^2 when the
window covers the document).
"""
from __future__ import annotations

import json
import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megasft.config import ModelConfig
from megasft.data.batch import MicroBatch
from megasft.model.families import layer_window
from megasft.planner.flops import forward_flops_per_token
from megasft.training.progress import Progress, fit, wrap


def step_model_flops(model: ModelConfig, tokens: int, squares: dict) -> float:
    """Model FLOPs of one training step over `tokens` packed tokens (all data-parallel ranks);
    `squares` from attention_squares (summed over the same ranks)."""
    gemm = 3 * forward_flops_per_token(model, seq_len=0) * tokens
    per_layer = sum(squares[layer_window(model, layer)] for layer in range(model.num_layers))
    return gemm + 3 * 4 * model.num_attention_heads * model.head_size * per_layer


def attention_squares(model: ModelConfig, micro_batches: list[MicroBatch]) -> dict:
    """{window (None = full): sum over the segments (documents and padding tails) of the square
    attention works on, len^2, or its band 2 * pairs - len in a sliding window} for each distinct
    window of the model's layers."""
    squares = {}
    for window in sorted({layer_window(model, layer) for layer in range(model.num_layers)},
                         key=lambda w: -1 if w is None else w):
        total = 0
        for mb in micro_batches:
            n = mb.segment_lengths
            w = n if window is None else n.clamp(max=window)
            pairs = w * (w + 1) // 2 + (n - w) * w
            total += int((2 * pairs - n).sum())
        squares[window] = total
    return squares


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated device memory on CUDA; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class ThroughputWindow:
    """Steps, tokens, trained tokens, model FLOPs and the loss sum since the last log point, and
    the training time they took (CUDA synchronised at close, so the time is the device's)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._reset()

    def _reset(self) -> None:
        self.start = self.last = time.perf_counter()
        self.banked = 0.0       # training time before the last restart()
        self.steps, self.tokens, self.trained, self.flops, self.loss_sum = 0, 0, 0, 0.0, 0.0

    def add(self, tokens: int, trained: int, flops: float, loss: float = 0.0) -> None:
        """One finished step (its loss is a host float: the step is complete on the device)."""
        self.last = time.perf_counter()
        self.steps += 1
        self.tokens += tokens
        self.trained += trained
        self.flops += flops
        self.loss_sum += loss

    def restart(self) -> None:
        """After an evaluation: the time since the last step is not training time; the steps and
        losses counted so far stay in the window."""
        self.banked += self.last - self.start
        self.start = self.last = time.perf_counter()

    def close(self) -> "WindowTotals":
        """What the window held; starts the next one."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = self.banked + time.perf_counter() - self.start
        result = WindowTotals(elapsed, self.tokens, self.trained, self.flops, self.steps,
                              self.loss_sum / self.steps if self.steps else math.nan)
        self._reset()   # the device is already synchronised: one sync per log point
        return result


@dataclass(frozen=True)
class WindowTotals:
    """Wall time and work of the steps since the last log point."""

    elapsed_s: float
    tokens: int            # token slots of the global batches
    trained: int           # tokens that contributed to the loss
    flops: float           # model FLOPs over all ranks
    steps: int = 1         # optimizer steps in the window
    mean_loss: float = math.nan   # mean of the steps' global-batch losses (NaN if one was NaN)


@dataclass(frozen=True)
class TrainRecord:
    """One train log point: the window's mean loss and throughput, the last step's lr and grad norm."""

    step: int
    lr: float
    loss: float            # the last step's loss (the record's "loss" is the window's mean)
    grad_norm: float
    window: WindowTotals
    world_size: int
    peak_tflops: float     # per device, for MFU
    peak_mem: int          # bytes
    skipped: int           # optimizer steps skipped so far
    bubble: Optional[tuple[float, float]] = None   # (measured, theory) with pipelining

    def as_dict(self) -> dict:
        w = self.window
        elapsed = max(w.elapsed_s, 1e-9)
        tflops = w.flops / elapsed / self.world_size / 1e12
        record = {"kind": "train", "step": self.step, "lr": self.lr, "loss": w.mean_loss,
                  "loss_avg_steps": w.steps, "last_loss": self.loss,
                  "grad_norm": self.grad_norm, "step_time_s": w.elapsed_s / max(w.steps, 1),
                  "tokens_per_s": w.tokens / elapsed,
                  "trained_tokens_per_s": w.trained / elapsed, "tflops_per_device": tflops,
                  "mfu": tflops / self.peak_tflops, "peak_mem_gb": self.peak_mem / 1e9,
                  "skipped_steps": self.skipped}
        if self.bubble is not None:
            record.update(bubble=self.bubble[0], bubble_theory=self.bubble[1])
        return record


def expert_load_record(load: torch.Tensor, layers: list) -> dict:
    """Train-record fields of the MoE expert load `load` [MoE layers, E] (tokens routed to each
    expert): the tokens per expert of each layer, each layer's max/mean imbalance (1 = perfectly
    balanced, E = every token on one expert) and the worst layer's, a scalar for TensorBoard."""
    imbalance = load.max(dim=1).values / load.mean(dim=1).clamp(min=1e-9)
    per_layer = {str(layer): float(x) for layer, x in zip(layers, imbalance.tolist())}
    return {"expert_load": {str(layer): [int(t) for t in row] for layer, row in zip(layers, load.tolist())},
            "expert_imbalance": per_layer, "expert_imbalance_max": max(per_layer.values())}


def expert_dropped_record(dropped: torch.Tensor, routed: torch.Tensor, layers: list) -> dict:
    """Train-record fields of token dropping (model.moe_capacity_factor): the picks dropped per
    expert of each layer, and the fraction of all routed picks dropped."""
    return {"expert_dropped": {str(layer): [int(t) for t in row] for layer, row in zip(layers, dropped.tolist())},
            "moe_dropped_fraction": float(dropped.sum() / routed.sum().clamp(min=1))}


def rate(tokens_per_s: float) -> str:
    """12,345 / 2.35M: a token rate in at most 7 columns up to a billion tokens per second."""
    return f"{tokens_per_s / 1e6:.2f}M" if tokens_per_s >= 1e6 else f"{tokens_per_s:,.0f}"


def format_record(r: dict, total_steps: int) -> str:
    """One log line of at most progress.LINE_WIDTH columns; metrics.jsonl keeps every field (trained
    tokens/s, TFLOP/s, the measured pipeline bubble next to theory, the last step's own loss)."""
    if r.get("kind") == "eval":
        sources = "".join(f"  {k.split('/', 1)[1]} {v:.4f}" for k, v in r.items() if k.startswith("eval_loss/"))
        return fit(f"eval {r['step']}/{total_steps}  loss {r['eval_loss']:.4f}  {r['eval_tokens']:,} tokens"
                   f"  best {r['best_eval_loss']:.4f} @ {r['best_step']}{sources}")
    # Skipped steps (rare, and what matters then) take MFU's place.
    last = f"skipped {r['skipped_steps']}" if r.get("skipped_steps") else f"MFU {100 * r['mfu']:.1f}%"
    return fit(f"step {r['step']}/{total_steps}  loss(avg {r.get('loss_avg_steps', 1)}) {r['loss']:.4f}  "
               f"lr {r['lr']:.2e}  gnorm {r['grad_norm']:.3g}  {rate(r['tokens_per_s'])} tok/s  "
               f"{r['peak_mem_gb']:.1f}GB  {last}")


class MetricsWriter:
    """Writes one record per log point to stdout (a line of at most 100 columns), the full record
    to <run_dir>/metrics.jsonl and TensorBoard (when the tensorboard package is installed), and
    draws the per-step progress line on a terminal. Only rank 0 creates one."""

    def __init__(self, run_dir: str | Path, total_steps: int, progress_bar: str = "auto"):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", encoding="utf-8")
        self.total_steps = total_steps
        live = progress_bar == "on" or (progress_bar == "auto" and sys.stdout.isatty())
        self.progress = Progress(total_steps, live)
        self.last_train: Optional[dict] = None   # for the summary's pipeline bubble
        self.tb = self._tensorboard(Path(run_dir) / "tensorboard")

    @staticmethod
    def _tensorboard(path: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:      # tensorboard is optional
            return None
        return SummaryWriter(str(path))

    def step(self, step: int, loss: float, tokens: int, trained: int) -> None:
        """After every optimizer step: run totals, and the live line on a terminal."""
        self.progress.step(step, loss, tokens, trained)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key, value, record["step"])
        if record.get("kind") == "train":
            self.last_train = record
        self.progress.clear()
        print(self.format(record), flush=True)

    def format(self, r: dict) -> str:
        return format_record(r, self.total_steps)

    def close(self) -> None:
        self.progress.clear()
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def note(writer: Optional[MetricsWriter], line: str) -> None:
    """Print a note of the run log between steps (wrapped to 100 columns), wiping the live
    progress line first."""
    if writer is not None:
        writer.progress.clear()
    print(wrap(line), flush=True)


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a metrics.jsonl; a torn last line (a killed run) is skipped."""
    train, evals = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            (evals if record.get("kind") == "eval" else train).append(record)
    return train, evals


def loss_curves(train: list[dict], evals: list[dict]) -> dict[str, tuple[list, list]]:
    """label -> (steps, losses) of the loss panel: train, eval (a mixture's: pooled over its sources)
    and, with data.sources, one 'eval <name>' curve per source."""
    curves = {"train": ([r["step"] for r in train], [r["loss"] for r in train])}
    if evals:
        curves["eval"] = ([r["step"] for r in evals], [r["eval_loss"] for r in evals])
    for key in sorted({k for r in evals for k in r if k.startswith("eval_loss/")}):
        points = [(r["step"], r[key]) for r in evals if key in r]
        curves[f"eval {key.split('/', 1)[1]}"] = ([x for x, _ in points], [y for _, y in points])
    return curves


def plot_metrics(path: str | Path, out: str | Path) -> Path:
    """Draw loss (train, eval, eval per source), learning rate and pre-clip grad norm against step
    to a PNG, a marker at every logged step."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install matplotlib (or pip install -e \".[hf]\")") from None

    matplotlib.use("Agg")   # files only, no display
    import matplotlib.pyplot as plt

    train, evals = read_metrics(path)
    if not train:
        raise ValueError(f"{path}: no training records to plot")
    steps = [r["step"] for r in train]
    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    # One marker per logged step, so a sparse log (log_interval > 1) is not read as a smooth curve.
    for label, (xs, ys) in loss_curves(train, evals).items():
        style = ".-" if label == "train" else "o-" if label == "eval" else ".--"
        axes[0].plot(xs, ys, style, label="train (mean over each log interval)" if label == "train" else label)
    axes[0].set_ylabel("loss (per trained token)")
    axes[0].legend()
    axes[1].plot(steps, [r["lr"] for r in train], ".-")
    axes[1].set_ylabel("learning rate")
    axes[2].plot(steps, [r["grad_norm"] for r in train], ".-")
    axes[2].set_ylabel("grad norm (pre-clip)")
    axes[2].set_xlabel("step")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(str(path))
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
