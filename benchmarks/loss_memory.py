"""Peak memory of the loss region: LM head + vocab-parallel cross-entropy, unfused vs fused in token
chunks (model.loss_chunk_tokens), at the shape of one Llama-3 TP rank.

Each variant runs forward + backward in a fresh subprocess; the number reported is the peak resident
memory above what the process held once its inputs existed (the "loss region"). Default shape:
8192 tokens x (128256 / tp=8 = 16032) vocab rows, hidden 1024 (the hidden size changes the inputs,
not the logits wall), fp32.

    python benchmarks/loss_memory.py [--tokens 8192] [--vocab 16032] [--hidden 1024] [--chunk 1024]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run_variant(args) -> dict:
    import torch

    from megasft.tensor_parallel.cross_entropy import lm_head_cross_entropy, vocab_parallel_cross_entropy

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, generator=g).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, generator=g) * 0.02).requires_grad_()
    target = torch.randint(0, args.vocab, (args.tokens,), generator=g)
    target[::3] = -100
    # Gradient buffers are part of any training step; allocate them before the baseline.
    hidden.grad, weight.grad = torch.zeros_like(hidden), torch.zeros_like(weight)
    base = _rss_bytes()
    start = time.perf_counter()
    if args.chunk:
        loss_sum, count = lm_head_cross_entropy(hidden, weight, target, 0, args.vocab, None, args.chunk)
    else:
        loss_sum, count = vocab_parallel_cross_entropy(hidden @ weight.t(), target, 0, args.vocab, None)
    (loss_sum / count).backward()
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_above_inputs": peak - base, "loss": (loss_sum / count).item(), "seconds": elapsed,
            "grad_norm": float(weight.grad.norm())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=16032)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--variant", type=int, help=argparse.SUPPRESS)   # internal: run one variant, print JSON
    args = ap.parse_args()
    if args.variant is not None:
        args.chunk = args.variant
        print(json.dumps(run_variant(args)))
        return
    results = {}
    for name, chunk in (("unfused", 0), (f"fused, chunks of {args.chunk}", args.chunk)):
        cmd = [sys.executable, __file__, "--tokens", str(args.tokens), "--vocab", str(args.vocab),
               "--hidden", str(args.hidden), "--variant", str(chunk)]
        results[name] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    logits_mb = args.tokens * args.vocab * 4 / 2 ** 20
    print(f"loss region, {args.tokens} tokens x {args.vocab} vocab rows, hidden {args.hidden}, fp32 "
          f"(one [tokens, vocab] fp32 logits tensor = {logits_mb:.0f} MiB)")
    print(f"{'variant':<24} {'peak MiB':>10} {'seconds':>8} {'loss':>10} {'|grad W|':>10}")
    for name, r in results.items():
        print(f"{name:<24} {r['peak_above_inputs'] / 2 ** 20:>10.0f} {r['seconds']:>8.1f} {r['loss']:>10.5f} "
              f"{r['grad_norm']:>10.5f}")
    unfused, fused = results["unfused"], results[f"fused, chunks of {args.chunk}"]
    print(f"ratio unfused / fused peak memory: {unfused['peak_above_inputs'] / fused['peak_above_inputs']:.1f}x "
          f"(goal >= 4x); same loss: {abs(unfused['loss'] - fused['loss']) < 1e-4}")


if __name__ == "__main__":
    main()
