"""Hugging Face model directories on disk: safetensors reading (single file or sharded with
model.safetensors.index.json, whole tensors or this rank's rows) and size-capped writing."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from megasft.hf.names import load_canonical_sliced, module_shapes, stored_access


SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


class HFTensors:
    """The tensors of a HF directory (single or sharded safetensors), opened lazily; a missing
    lm_head.weight falls back to the tied embedding. Reads whole tensors or row/column slices."""

    def __init__(self, path: str | Path):
        self.root = Path(path)
        index = self.root / "model.safetensors.index.json"
        if index.exists():
            self.weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.root / "model.safetensors").exists():
            with safe_open(self.root / "model.safetensors", "pt") as f:
                self.weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.root}: no model.safetensors or model.safetensors.index.json")

    @contextlib.contextmanager
    def _slice(self, name: str):
        # A fresh handle per access: safetensors memory-maps the file, and every page read through
        # a long-lived handle would stay in this process's RSS (a whole-model import would hold the
        # whole model). Opening costs one header parse.
        if name not in self.weight_map and name == "lm_head.weight":
            name = "model.embed_tokens.weight"
        if name not in self.weight_map:
            raise KeyError(f"{self.root}: tensor {name!r} not found in the checkpoint")
        with safe_open(self.root / self.weight_map[name], "pt") as f:
            yield f.get_slice(name)

    def get(self, name: str, shape=None) -> torch.Tensor:
        """The whole tensor `name` in fp32."""
        with self._slice(name) as piece:
            return piece[:].float()

    def raw(self, name: str) -> torch.Tensor:
        """The whole tensor `name` in its stored dtype."""
        with self._slice(name) as piece:
            return piece[:]

    def shape(self, name: str) -> tuple[int, ...]:
        with self._slice(name) as piece:
            return tuple(piece.get_shape())

    def dtype(self, name: str) -> torch.dtype:
        with self._slice(name) as piece:
            stored = piece.get_dtype()
        if stored not in SAFETENSORS_DTYPES:
            raise ValueError(f"{self.root}: tensor {name!r} has dtype {stored}; supported: {sorted(SAFETENSORS_DTYPES)}")
        return SAFETENSORS_DTYPES[stored]

    def read(self, name: str, dim: int, start: int, length: int) -> torch.Tensor:
        """Only [start, start + length) along dim 0 or 1 is read from disk."""
        with self._slice(name) as piece:
            return piece[start:start + length] if dim == 0 else piece[:, start:start + length]


def hf_tensor_reader(path: str | Path) -> Callable[[str, tuple], torch.Tensor]:
    """get(name, expected_shape) -> the whole fp32 tensor, over the safetensors of a HF directory."""
    return HFTensors(path).get


def load_hf_into(module: nn.Module, path: str | Path) -> None:
    """Load this rank's shards of a HF checkpoint of the chunk's family (module.cfg.family) into a
    model chunk (a LlamaStage), reading only the rows (or columns) this rank holds — of a fused
    tensor, only the rows of this rank's shard of each piece."""
    tensors = HFTensors(path)
    access = stored_access(module.cfg.family, module_shapes(module), tensors.shape, tensors.read)
    load_canonical_sliced(module, *access)


def save_hf_tensors(tensors: Iterable[tuple[str, torch.Tensor]], out_dir: str | Path,
                    max_shard_bytes: int = 5 * 2 ** 30) -> None:
    """Write (name, tensor) pairs as model-0000x-of-0000y.safetensors shards plus the index,
    holding at most one shard in memory; a single shard is written as model.safetensors."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, total = 0, 0
    written: list[tuple[Path, list[str]]] = []

    def flush() -> None:
        # Shard count is unknown until the end: write under a temporary name, rename after.
        tmp = out / f".shard-{len(written)}.safetensors"
        save_file({k: v.contiguous() for k, v in shard.items()}, str(tmp), metadata={"format": "pt"})
        written.append((tmp, list(shard)))
        shard.clear()

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + nbytes > max_shard_bytes:
            flush()
            shard_bytes = 0
        shard[name] = tensor
        shard_bytes += nbytes
        total += nbytes
    if shard:
        flush()
    if len(written) == 1:
        written[0][0].rename(out / "model.safetensors")
        return
    weight_map = {}
    for i, (tmp, names) in enumerate(written):
        final = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        tmp.rename(out / final)
        weight_map.update({name: final for name in names})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
