"""FP8 GEMMs through NVIDIA Transformer Engine (``train.fp8``): opt-in, CUDA only.

What runs in FP8: the local GEMM, x W^T (+ b), of every ColumnParallelLinear and
RowParallelLinear in the decoder layers (q, kv, o, gate_up, down). megasft's layers keep doing the
TP/SP communication around it; only the GEMM between goes through
``transformer_engine.pytorch.Linear``, built with parallel_mode=None and the layer's local sizes.
Weights, activations and gradients outside the GEMMs stay bf16, main params and grads fp32.

What stays bf16: the embedding (a lookup, no GEMM) and the LM head. The head's logits feed the
softmax and the loss directly, so E4M3's rounding (3 mantissa bits, up to 6 % per input) would
move the loss itself, and its GEMM also runs inside the chunked fused loss
(model.loss_chunk_tokens), not as a layer call. Keeping the output layer out of FP8 is the usual
practice (Megatron-LM's output layer is not a TE layer; the DeepSeek-V3 report keeps embedding and
output head in BF16).

Scaling is Transformer Engine's delayed scaling (Micikevicius et al. 2022, "FP8 Formats for Deep
Learning"): each FP8 tensor's scale comes from the amax history of earlier micro-batches. The
amaxes are max-reduced over ParallelState.stage_group (the dp x tp ranks of a pipeline stage), when
each chunk's forward leaves the autocast and after its backward, so TP ranks quantise the shards
of one tensor with one scale and DP replicas use the same scales (Megatron-LM's amax reduction
group).
Every rank of a stage runs the same micro-batches in the same order, so these collectives match.

Parameters: the TE op is held by a plain callable (the layer's ``gemm``), not a submodule, and its
``weight`` / ``bias`` attributes are re-pointed at megasft's own Parameters, as the te RMSNorm in
megasft.model.fused does. TE's Linear reads those attributes on every forward and hands the
tensors to its autograd function, so the GEMM uses our weights and the weight gradient lands in
our parameter's .grad (then the ZeRO-1 accumulation hook). Parameter names, ParamSpecs, the flat
buffer views, checkpoints and HF export are the same as without FP8. The FP8 copy of a weight is
recast on every forward (no cache across micro-batches), so in-place optimizer updates and the
ZeRO-1 all-gather are always seen. Being outside the module tree, TE's scaling state (amax
histories, scales) is not in checkpoints either: after a resume the first micro-batch runs with
fresh scales (1.0), as the first micro-batch of a new run does.

Use: build_model checks availability, then calls use_fp8_gemms on each chunk; Trainer.forward_step
runs each chunk's forward (training and eval) in ``fp8_autocast(...)()``. Backward runs outside it,
as Transformer Engine documents: the recipe travels with the autograd context.

Status: written against Transformer Engine's source (``fp8_autocast`` of 1.x, ``autocast`` of
2.x) but not yet run on a GPU in this repository; tests/test_fp8.py holds the GPU checks, which
skip without CUDA and TE.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Callable, ContextManager, Optional

import torch
from torch import nn

from megasft.config import ConfigError, TrainConfig
from megasft.model import fused
from megasft.model.llama import LMHead
from megasft.parallel_state import ParallelState, group_size
from megasft.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear


# ------------------------------------------------------------------------------ availability
def _missing_fp8(device: torch.device) -> Optional[str]:
    """Why FP8 GEMMs cannot run on `device`, or None when they can."""
    if device.type != "cuda":
        return f"its kernels run on CUDA tensors only and this run's device is {device.type}"
    problem = fused._missing_te()
    if problem:
        return problem
    # (ok, reason), e.g. "Device compute capability 8.9 or higher required for FP8 execution.";
    # the module was renamed fp8 -> quantization in Transformer Engine 2.x.
    try:
        from transformer_engine.pytorch.quantization import check_fp8_support
    except ImportError:
        from transformer_engine.pytorch.fp8 import check_fp8_support
    ok, reason = check_fp8_support()
    return None if ok else reason


def check_fp8_available(mode: str, device: torch.device) -> None:
    """Raise ConfigError, saying how to fix it, when train.fp8=`mode` cannot run on `device`."""
    if mode == "off":
        return
    problem = _missing_fp8(device)
    if problem:
        raise ConfigError(f"train.fp8={mode} needs NVIDIA Transformer Engine on CUDA (an FP8-capable "
                          f"GPU: Hopper or Ada): pip install transformer_engine[pytorch] (or pip install "
                          f"-e '.[gpu]'); here {problem}. Or set train.fp8=off")


# ------------------------------------------------------------------------------ the GEMM
def _keep(weight: torch.Tensor) -> None:
    """TE Linear's init_method: leave its own weight alone. It is replaced by megasft's at once, and
    TE's default init would draw from the CUDA generator (shifting dropout masks)."""


class _TEGemm:
    """transformer_engine.pytorch.Linear as the GEMM of one megasft layer, on that layer's weight.

    One op per layer: TE keeps per-module FP8 state (amax histories and scales of the input, the
    weight and the output gradient). Built on first use, on the weight's device, with the local
    sizes and parallel_mode=None. Not an nn.Module, so the op never shows up in the owner's
    modules, parameters or state dict.
    """

    def __init__(self) -> None:
        self.op: Optional[nn.Module] = None

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if self.op is None:
            import transformer_engine.pytorch as te

            out_features, in_features = weight.shape
            self.op = te.Linear(in_features, out_features, bias=bias is not None, params_dtype=weight.dtype,
                                device=weight.device, init_method=_keep, parallel_mode=None)
        # nn.Module.__setattr__ swaps the registered Parameter; the op's own one is freed.
        if self.op.weight is not weight:
            self.op.weight = weight
        if bias is not None and self.op.bias is not bias:
            self.op.bias = bias
        return self.op(x.contiguous())                   # [s, b, in] -> [s, b, out]


def use_fp8_gemms(module: nn.Module) -> int:
    """Route the local GEMM of every decoder-layer TP linear under `module` through Transformer
    Engine's FP8 Linear (the LM head keeps F.linear). Returns how many layers were switched."""
    switched = 0
    for m in module.modules():
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear)) and not isinstance(m, LMHead):
            m.gemm = _TEGemm()
            switched += 1
    return switched


# ------------------------------------------------------------------------------ autocast
def fp8_recipe(train: TrainConfig, reduce_amax: bool):
    """Transformer Engine's DelayedScaling recipe for this run's train.fp8 settings."""
    from transformer_engine.common.recipe import DelayedScaling, Format

    fmt = {"hybrid": Format.HYBRID, "e4m3": Format.E4M3}[train.fp8]
    try:
        return DelayedScaling(fp8_format=fmt, amax_history_len=train.fp8_amax_history_len,
                              amax_compute_algo=train.fp8_amax_compute_algo, reduce_amax=reduce_amax)
    except TypeError as e:   # releases before reduce_amax existed
        raise ConfigError(f"train.fp8={train.fp8}: this transformer_engine's DelayedScaling lacks "
                          f"reduce_amax ({e}); upgrade: pip install -U transformer_engine[pytorch]") from e


def fp8_autocast(train: TrainConfig, ps: ParallelState) -> Callable[[], ContextManager]:
    """A factory of the context one chunk's forward runs in: Transformer Engine's FP8 autocast with
    this run's recipe and amax group (the stage's dp x tp ranks), or a null context when FP8 is off.
    Call it once per forward: the amax reduction happens as each context exits."""
    if train.fp8 == "off":
        return contextlib.nullcontext
    import transformer_engine.pytorch as te

    # A one-rank stage has nothing to reduce: switch the reduction off, since TE would read a
    # None group as the default (whole-world) group.
    group = ps.stage_group if group_size(ps.stage_group) > 1 else None
    recipe = fp8_recipe(train, reduce_amax=group is not None)
    autocast = getattr(te, "autocast", None)
    if autocast is not None and "amax_reduction_group" in inspect.signature(autocast).parameters:
        return functools.partial(autocast, enabled=True, recipe=recipe, amax_reduction_group=group)
    # Transformer Engine 1.x (and 2.x before autocast replaced it).
    return functools.partial(te.fp8_autocast, enabled=True, fp8_recipe=recipe, fp8_group=group)
