"""Peak memory of the streaming HF exporter (and importer) on a model of a few hundred MB.

    python benchmarks/export_memory.py                     # ~1-2 min, writes into a temp dir
    python benchmarks/export_memory.py --layers 16 --shard-mb 400

A random Llama (GQA, untied head) is written as a HF directory, imported with
``convert_checkpoint.py hf-to-megasft`` and exported with ``megasft-to-hf``, each in a fresh
process that reports its peak RSS (VmHWM) above its RSS once torch and megasft are imported.
The claim under test (issue 6): the exporter's extra peak stays under
2 x (largest tensor + largest output shard), i.e. it streams rather than materialising the model.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
import torch
from megasft.checkpoint.convert import hf_to_megasft, megasft_to_hf
base = rss("VmRSS:")
args = json.loads(sys.argv[1])
if args["cmd"] == "export":
    megasft_to_hf(args["ckpt"], args["out"], dtype=args["dtype"], max_shard_bytes=args["shard"])
else:
    hf_to_megasft(args["hf"], args["out"])
print(json.dumps({"base": base, "peak": rss("VmHWM:")}))
"""


def build_hf(out: Path, args) -> dict:
    """A random fp32 HF Llama directory; returns tensor sizes."""
    import torch

    from megasft.hf.config import hf_config_from_model
    from megasft.hf.io import save_hf_tensors
    from megasft.checkpoint.convert import canonical_tensors
    from megasft.config import ModelConfig

    model = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                        num_layers=args.layers, num_attention_heads=16, num_kv_heads=4)
    shapes = canonical_tensors(model)
    g = torch.Generator().manual_seed(0)
    save_hf_tensors(((n, torch.randn(s, generator=g)) for n, s in shapes.items()), out, max_shard_bytes=2 ** 30)
    (out / "config.json").write_text(json.dumps(hf_config_from_model(model, "float32")))
    sizes = {n: 4 * int(torch.Size(s).numel()) for n, s in shapes.items()}
    return sizes


def run_child(args: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def largest_shard(out: Path) -> int:
    return max(p.stat().st_size for p in out.glob("*.safetensors"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--shard-mb", type=float, default=200)
    args = ap.parse_args(argv)
    mib = 2 ** 20
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sizes = build_hf(tmp / "hf", args)
        total, largest = sum(sizes.values()), max(sizes.values())
        print(f"model: {len(sizes)} tensors, {total / mib:.0f} MiB fp32, largest tensor {largest / mib:.0f} MiB")
        imp = run_child({"cmd": "import", "hf": str(tmp / "hf"), "out": str(tmp / "ckpt")})
        print(f"hf-to-megasft: extra peak RSS {(imp['peak'] - imp['base']) / mib:.0f} MiB "
              f"(model {total / mib:.0f} MiB)")
        print("| export dtype | largest tensor (out) | largest shard | bound 2x(tensor+shard) | extra peak RSS | "
              "peak / bound | peak / model |")
        print("|---|---|---|---|---|---|---|")
        for dtype, width in (("fp32", 4), ("bf16", 2)):
            out = tmp / f"out_{dtype}"
            res = run_child({"cmd": "export", "ckpt": str(tmp / "ckpt"), "out": str(out), "dtype": dtype,
                             "shard": int(args.shard_mb * mib)})
            tensor_out = largest * width // 4
            shard = largest_shard(out)
            bound = 2 * (tensor_out + shard)
            extra = res["peak"] - res["base"]
            print(f"| {dtype} | {tensor_out / mib:.0f} MiB | {shard / mib:.0f} MiB | {bound / mib:.0f} MiB | "
                  f"{extra / mib:.0f} MiB | {extra / bound:.2f} | {extra / (total * width // 4):.2f} |")


if __name__ == "__main__":
    main()
