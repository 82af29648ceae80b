"""RMSNorm and SwiGLU kernels behind one backend switch (``model.norm_backend``).

Every backend computes the same math on the caller's own weight tensor, so the model's parameter
names, tensor-parallel attributes and checkpoints do not depend on the choice:

  torch    pure torch, the reference: RMSNorm statistics in fp32 exactly as HF's LlamaRMSNorm,
           SwiGLU = silu(gate) * up
  compile  torch.compile of those two functions, dynamic shapes, compiled on first use (any device
           with a compiler: triton on CUDA, a C++ compiler on CPU)
  apex     NVIDIA apex's fused RMSNorm kernel (CUDA); SwiGLU as torch
  te       transformer_engine.pytorch.RMSNorm (CUDA); SwiGLU as torch
  auto     te, then apex on CUDA; torch otherwise

auto never picks compile: its gain (the reference RMSNorm is memory-bound and keeps an fp32 copy
of its input; inductor fuses it and SwiGLU into one kernel each) has not been measured on a GPU in
this repository, while its costs are certain — a compile pause at start-up per dtype and shape
class, and one more moving part under pipeline schedules and activation recomputation. It is an
explicit opt-in. On CPU it buys nothing measurable: the GEMMs dominate (benchmarks/step_cpu.py
--norm-compile: 0.99x). The te and apex paths are vendor kernels; only their glue here (weights
re-pointed to megasft's parameters) is megasft's, and it has not yet run on a GPU either.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from megasft.config import CHOICES

NORM_BACKENDS = CHOICES[("model", "norm_backend")]

NormFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]   # (x, weight, eps) -> y
SwiGLUFn = Callable[[torch.Tensor], torch.Tensor]                      # [..., 2f] -> [..., f]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = w * x / sqrt(mean(x^2) + eps), statistics in fp32 (as HF's LlamaRMSNorm)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rms_norm_plus_one(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's y = (1 + w) * x / sqrt(mean(x^2) + eps), all in fp32 and cast once at the end (as
    HF's Gemma2RMSNorm / Gemma3RMSNorm, where Llama casts before multiplying by w)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * (1.0 + weight.float())).to(x.dtype)


def geglu(gate_up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up (Gemma's MLP; HF's gelu_pytorch_tanh)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for the fused [gate; up] projection output (halves of the last dim)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# ------------------------------------------------------------------------------ availability
@functools.lru_cache(maxsize=None)
def _missing_compiler(cuda: bool) -> Optional[str]:
    if cuda:
        if importlib.util.find_spec("triton") is None:
            return "torch.compile on CUDA needs triton (it ships with the CUDA builds of torch)"
        return None
    if not any(shutil.which(c) for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c):
        return "torch.compile on CPU needs a C++ compiler on PATH (e.g. apt-get install g++)"
    return None


@functools.lru_cache(maxsize=None)
def _missing_apex() -> Optional[str]:
    # An unrelated PyPI package is also called "apex"; look for NVIDIA's fused-norm extension and
    # its normalization package on disk before importing anything named apex.
    spec = importlib.util.find_spec("apex")
    dirs = list(spec.submodule_search_locations or []) if spec else []
    is_nvidia = any((Path(d) / "normalization").is_dir() for d in dirs)
    if not is_nvidia or importlib.util.find_spec("fused_layer_norm_cuda") is None:
        return ("needs NVIDIA apex installed from github.com/NVIDIA/apex with its CUDA extensions "
                "(fused_layer_norm_cuda); the PyPI package named 'apex' is unrelated")
    try:
        importlib.import_module("fused_layer_norm_cuda")
        importlib.import_module("apex.normalization")
    except Exception as e:  # a broken CUDA build fails here, not in the first forward
        return f"NVIDIA apex is installed but its fused norm does not import ({e})"
    return None


@functools.lru_cache(maxsize=None)
def _missing_te() -> Optional[str]:
    if importlib.util.find_spec("transformer_engine") is None:
        return "needs transformer-engine (pip install -e '.[gpu]')"
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception as e:  # TE's import loads CUDA libraries and fails loudly on mismatches
        return f"transformer_engine is installed but transformer_engine.pytorch does not import ({e})"
    return None


def _missing(backend: str, device: torch.device) -> Optional[str]:
    """Why `backend` cannot run on `device`, or None when it can."""
    cuda = device.type == "cuda"
    if backend == "compile":
        return _missing_compiler(cuda)
    if backend in ("apex", "te") and not cuda:
        return f"its kernels run on CUDA tensors only and this run's device is {device.type}"
    if backend == "apex":
        return _missing_apex()
    if backend == "te":
        return _missing_te()
    return None


def resolve_norm_backend(name: str, device: torch.device, plus_one: bool = False) -> str:
    """Turn 'auto' into a concrete backend and refuse ones that cannot run here. `plus_one`:
    the model's norms are Gemma's (1 + w) RMSNorm, which only torch and compile implement."""
    if name not in NORM_BACKENDS:
        raise ValueError(f"norm backend {name!r} is not one of {NORM_BACKENDS}")
    if plus_one and name in ("apex", "te"):
        raise ValueError(f"model.norm_backend={name} has no Gemma (1 + w) RMSNorm; use 'auto', 'torch' or 'compile'")
    if name == "auto":
        if device.type != "cuda" or plus_one:
            return "torch"
        return next((b for b in ("te", "apex") if _missing(b, device) is None), "torch")
    problem = _missing(name, device)
    if problem:
        raise ValueError(f"model.norm_backend={name} is unavailable: {problem}; use 'auto' or 'torch'")
    return name


# ------------------------------------------------------------------------------ kernels
@functools.lru_cache(maxsize=None)
def _compiled(fn: Callable) -> Callable:
    """One compiled wrapper per function per process (inductor compiles it on the first call).
    dynamic=True: the token dims [s, b] are symbolic, so micro-batches of a new shape reuse the
    graph instead of recompiling. The hidden size stays static (dynamo keeps parameter shapes
    static), and size-1 dims are specialised: b=1 and b>1 compile once each."""
    return torch.compile(fn, dynamic=True)


def _apex_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from apex.normalization import fused_rms_norm_affine

    if x.dtype != weight.dtype:
        # The kernel takes one dtype; megasft casts the whole model (model.to(dtype)), so a mix
        # only comes from outside callers, who get the reference math.
        return rms_norm(x, weight, eps)
    return fused_rms_norm_affine(x, weight, weight.shape, eps)


class _TERMSNorm:
    """transformer_engine's RMSNorm run on the caller's weight.

    TE's norm is a module owning its weight, and its backward reads that attribute again, so each
    megasft RMSNorm gets its own TE op (shared between layers, backward would use the last layer's
    weight). The op is rebound to the caller's parameter on every call: gradients land on that
    parameter, and a parameter replaced by checkpoint loading is picked up. Not an nn.Module, so
    the TE op never shows up in the owner's parameters or state dict.
    """

    def __init__(self) -> None:
        self.op: Optional[torch.nn.Module] = None

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if self.op is None:
            import transformer_engine.pytorch as te

            self.op = te.RMSNorm(weight.shape[0], eps=eps, device=weight.device, params_dtype=weight.dtype)
        self.op.weight = weight
        return self.op(x)


def norm_kernel(backend: str, plus_one: bool = False) -> NormFn:
    """The RMSNorm function of a resolved backend (see resolve_norm_backend); Gemma's (1 + w)
    norm with `plus_one`."""
    if plus_one:
        return _compiled(rms_norm_plus_one) if backend == "compile" else rms_norm_plus_one
    if backend == "compile":
        return _compiled(rms_norm)
    if backend == "apex":
        return _apex_rms_norm
    if backend == "te":
        return _TERMSNorm()
    return rms_norm


def swiglu_kernel(backend: str, gelu_tanh: bool = False) -> SwiGLUFn:
    """The SwiGLU function (GeGLU with `gelu_tanh`) of a resolved backend: compiled under
    'compile', the reference otherwise."""
    fn = geglu if gelu_tanh else swiglu
    return _compiled(fn) if backend == "compile" else fn
