"""Planner calibration: predicted vs measured peak memory of real CPU training steps, per rank.

For several layouts of a small Llama (activations dominate: hidden 256, 4 layers, seq 1024, fp32)
each rank runs one warm-up train step, then one measured train step, and the peak is compared with
``megasft.planner.estimate.stage_memory`` for that rank (reserved_gib = 0, fragmentation = 0:
on CPU there is no CUDA context, NCCL buffer or caching allocator to pad).

Measurement (allocator level, not RSS — RSS holds the Python/torch runtime and glibc's arenas):

* live before the step: every torch tensor storage alive between the warm-up and the measured step
  (found with ``gc``, de-duplicated by storage pointer: the flat parameter buffer, the fp32
  gradient buffer, the optimizer's [3, shard] state, rope tables, ...). The planner's exact state
  bytes (weights + grads + optimizer) are checked against this too;
* increase during the step: ``torch.profiler.profile(profile_memory=True)`` around the measured
  ``train_step``; every CPU-allocator allocation and free inside it is a ``[memory]`` event with
  +bytes / -bytes; the peak of their running sum (ordered by time) is the most the step allocated
  on top of what was live. Each layout runs in fresh processes that profile exactly once, so the
  profiler's table of allocation sizes holds no stale entries from an earlier session. Frees of
  storages allocated before the window are not reported (the profiler does not know their size),
  which can only make the measured peak larger, never smaller.

measured peak = live before + peak increase; predicted = state + in-flight activations +
largest transient (layer backward or logits/loss), the planner's own decomposition.

Attention backend: on CPU the only backend is ``sdpa`` with a block-diagonal causal boolean mask
[b, 1, s, s]. PyTorch's CPU SDPA dispatches masked attention to its flash kernel (saves q, k, v,
out, log-sum-exp and the mask, never the probabilities). This benchmark found that; the planner
now models sdpa as exactly that (flash + e*s bytes of mask per token per layer). The script still
prints the planner's prediction under the flash assumption (``attention_backend`` != sdpa) and the
flash prediction plus this script's own count of the mask (``sdpa_mask_bytes``) as a cross-check.

    python benchmarks/planner_calibration.py            # ~1 min on 2 cores
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megasft.config import Config  # noqa: E402
from megasft.planner.activations import ELEMENT_BYTES, in_flight_layers  # noqa: E402
from megasft.planner.assumptions import Assumptions  # noqa: E402
from megasft.planner.estimate import stage_memory  # noqa: E402
from megasft.planner.memory import rank_state_bytes  # noqa: E402
from tests.multiproc import run_ranks  # noqa: E402
from tests.oracle import packed_batch, select_rows  # noqa: E402

MIB = 2 ** 20
# (name, tp, pp, sequence_parallel, recompute, rows per step, micro_batch_size)
LAYOUTS = [
    ("single", 1, 1, False, "none", 2, 1),
    ("single-mb2", 1, 1, False, "none", 2, 2),
    ("single-selective", 1, 1, False, "selective", 2, 1),
    ("single-full", 1, 1, False, "full", 2, 1),
    ("tp2", 2, 1, False, "none", 2, 1),
    ("tp2-sp", 2, 1, True, "none", 2, 1),
    ("pp2-1f1b", 1, 2, False, "none", 4, 1),
]


def make_config(args, tp: int, pp: int, sp: bool, recompute: str, rows: int, mbs: int,
                backend: str = "sdpa") -> Config:
    model = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                 num_layers=args.layers, num_attention_heads=args.heads, num_kv_heads=args.kv_heads,
                 rope_theta=500000.0, max_position_embeddings=args.seq, rms_norm_eps=1e-5,
                 attention_backend=backend, make_vocab_size_divisible_by=128, recompute=recompute,
                 tie_embeddings=False)
    return Config.from_dict({
        "model": model,
        "parallel": {"tp": tp, "pp": pp, "sequence_parallel": sp},
        "data": {"seq_len": args.seq, "global_batch_tokens": rows * args.seq, "micro_batch_size": mbs},
        "optim": {"lr": 1e-4, "warmup_steps": 0},
        "train": {"steps": 4, "precision": "fp32", "progress_bar": "off"},
    }).validate()


def live_tensor_bytes() -> int:
    """Bytes of all distinct CPU tensor storages reachable from Python objects right now."""
    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type != "cpu":
                continue
            storage = obj.untyped_storage()
        except Exception:   # noqa: BLE001 - meta/fake/sparse tensors etc.
            continue
        key = storage.data_ptr()
        if key and key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def peak_of_memory_events(prof) -> tuple[int, int, int]:
    """(peak running sum, final running sum, number of events) of the CPU [memory] events."""
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
              and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    running = peak = 0
    for e in events:
        running += e.nbytes()
        peak = max(peak, running)
    return peak, running, len(events)


def _rank_main(args, layout) -> dict:
    from megasft.parallel_state import ParallelState
    from megasft.training.loop import Trainer

    name, tp, pp, sp, recompute, rows, mbs = layout
    torch.set_num_threads(1)
    ps = ParallelState.build(tp, pp)
    cfg = make_config(args, tp, pp, sp, recompute, rows, mbs)
    torch.manual_seed(0)
    trainer = Trainer(cfg, ps, log=False)
    # Two documents per row (lengths 3/5 and 2/5 of the row), so the packed mask is block-diagonal.
    seq = args.seq
    lens = [[3 * seq // 5, seq - 3 * seq // 5], [2 * seq // 5, seq - 2 * seq // 5]]
    batches = [packed_batch([lens[(i + s) % 2] for i in range(rows)], seq, args.vocab, seed=s)
               for s in range(2)]
    micro = [[select_rows(b, list(range(i, i + mbs))) for i in range(0, rows, mbs)] for b in batches]

    trainer.train_step(micro[0])              # warm-up: lazily created buffers, first-step paths
    live = live_tensor_bytes()
    state = (sum(p.numel() * p.element_size() for p in trainer.params)
             + trainer.optimizer.grad_buffer.grad_data.numel() * 4 + trainer.optimizer.state_bytes())
    from torch.profiler import ProfilerActivity, profile
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.train_step(micro[1])
    seconds = time.perf_counter() - t0
    peak, final, n_events = peak_of_memory_events(prof)
    return {"layout": name, "rank": ps.rank, "pp_rank": ps.pp_rank, "tp_rank": ps.tp_rank,
            "live": live, "state": state, "peak_increase": peak, "final_increase": final,
            "events": n_events, "seconds": seconds}


def predict(args, layout, pp_rank: int, backend: str):
    name, tp, pp, sp, recompute, rows, mbs = layout
    cfg = make_config(args, tp, pp, sp, recompute, rows, mbs, backend=backend)
    a = Assumptions(reserved_gib=0.0, fragmentation=0.0,
                    loss_chunk_tokens=cfg.model.loss_chunk_tokens or None)
    return stage_memory(cfg, pp_rank, a), rank_state_bytes(cfg, pp_rank)


def sdpa_mask_bytes(args, layout, pp_rank: int) -> int:
    """What the flash assumption leaves out on CPU (found with saved_tensors_hooks, see RESULTS.md):
    the CPU flash SDPA kernel turns each layer's boolean [b, 1, s, s] mask into an additive mask in
    the query dtype and saves it for backward, e*s*s*b bytes per layer-micro-batch (the mask is
    built inside megasft.model.attention._sdpa, so every layer has its own). Stored for every
    in-flight layer without recomputation; with selective/full recomputation it is rebuilt in
    backward, so one layer's mask is live at a time."""
    name, tp, pp, sp, recompute, rows, mbs = layout
    cfg = make_config(args, tp, pp, sp, recompute, rows, mbs)
    one = ELEMENT_BYTES[cfg.train.precision] * args.seq * args.seq * mbs
    return one * (in_flight_layers(cfg, pp_rank) if recompute == "none" else 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=688)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--only", default=None, help="comma-separated layout names")
    args = ap.parse_args()

    layouts = [lay for lay in LAYOUTS if args.only is None or lay[0] in args.only.split(",")]
    print(f"model: hidden {args.hidden}, ffn {args.ffn}, {args.layers} layers, {args.heads} heads / "
          f"{args.kv_heads} kv, vocab {args.vocab}, seq {args.seq}, fp32, sdpa (CPU), "
          f"torch {torch.__version__}")
    print("planner: Assumptions(reserved_gib=0, fragmentation=0); 'pred' = attention_backend=sdpa as run "
          "(flash-style + the saved additive mask), 'pred flash' = same layout planned with a flash backend\n")
    header = ("layout", "rank", "pp", "state MiB (pred/live)", "act MiB", "transient MiB",
              "pred MiB", "pred flash MiB", "pred flash+mask MiB", "measured MiB (live+step)",
              "meas/pred", "meas/pred flash", "meas/pred flash+mask")
    rows, errors, errors_flash, errors_mask = [], [], [], []
    t_start = time.perf_counter()
    for layout in layouts:
        name, tp, pp = layout[:3]
        results = run_ranks(_rank_main, tp * pp, args, layout, timeout=300)
        for r in results:
            sm, state = predict(args, layout, r["pp_rank"], "sdpa")
            smf, _ = predict(args, layout, r["pp_rank"], "auto")
            assert r["state"] == state.total, (name, r["state"], state.total)
            measured = r["live"] + r["peak_increase"]
            pred, pred_flash = sm.total, smf.total
            pred_mask = pred_flash + sdpa_mask_bytes(args, layout, r["pp_rank"])
            errors.append(abs(measured / pred - 1))
            errors_flash.append(abs(measured / pred_flash - 1))
            errors_mask.append(abs(measured / pred_mask - 1))
            rows.append((name, r["rank"], r["pp_rank"],
                         f"{state.total / MIB:.1f}/{r['live'] / MIB:.1f}",
                         f"{sm.activations / MIB:.1f} ({smf.activations / MIB:.1f})",
                         f"{sm.transient / MIB:.1f} {sm.transient_kind}",
                         f"{pred / MIB:.1f}", f"{pred_flash / MIB:.1f}", f"{pred_mask / MIB:.1f}",
                         f"{measured / MIB:.1f} ({r['live'] / MIB:.1f}+{r['peak_increase'] / MIB:.1f})",
                         f"{measured / pred:.3f}", f"{measured / pred_flash:.3f}",
                         f"{measured / pred_mask:.3f}"))
    from benchmarks.common import format_table
    print(format_table(header, rows))
    print("\nact MiB: in-flight stored activations, sdpa assumption (flash assumption in brackets); "
          "transient: sdpa assumption;\nstate pred/live: the planner's exact weights+grads+optimizer vs "
          "all live tensor storages")
    print(f"max relative error |measured/pred - 1|: sdpa assumption {max(errors):.1%}, "
          f"flash assumption {max(errors_flash):.1%}, flash + fp32 sdpa mask {max(errors_mask):.1%}")
    print(f"wall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
