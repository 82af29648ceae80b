"""RMSNorm/SwiGLU backends (megasft.model.fused) against the pure-torch reference.

The 'torch' backend must stay bit-identical to transformers' LlamaRMSNorm and to silu(gate) * up;
every other backend importable here must match it in outputs and in input and weight gradients,
on packed-row-like [s, b, h] activations and on a second shape (compile: dynamic shapes). Backends
that cannot run here are skipped with the reason. 'compile' runs on CPU (inductor + g++), on tiny
shapes and one eps, so its compilation stays a few seconds per dtype.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from megasft.config import Config, ConfigError, ModelConfig
from megasft.hf.names import load_hf_state_dict
from megasft.model import fused
from megasft.model.fused import norm_kernel, resolve_norm_backend, rms_norm, swiglu, swiglu_kernel
from megasft.model.llama import LlamaStage
from megasft.parallel_state import ParallelState
from tests.oracle import hf_model, model_batch, packed_batch, tiny_fields

FIELDS = tiny_fields()
EPS, HIDDEN = FIELDS["rms_norm_eps"], FIELDS["hidden_size"]   # the model test then reuses the compiled graphs
SHAPES = [(7, 2, HIDDEN), (11, 3, HIDDEN)]     # [s, b, h]; the second is new to a compiled graph
TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
# apex and te run on CUDA only (benchmarks/gpu_check.sh runs the `cuda` marker).
FAST_BACKENDS = ["compile", pytest.param("apex", marks=pytest.mark.cuda), pytest.param("te", marks=pytest.mark.cuda)]
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def _device_or_skip(backend: str) -> torch.device:
    device = torch.device("cuda" if backend in ("apex", "te") else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"{backend}: no CUDA device")
    try:
        resolve_norm_backend(backend, device)
    except ValueError as e:
        pytest.skip(str(e))
    return device


def _randn(shape, dtype, device, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


def _leaves(shape, dtype, device, seed):
    """Input x and an RMSNorm-like weight (a Parameter, as in the model), both leaves."""
    x = _randn(shape, dtype, device, seed).requires_grad_()
    w = torch.nn.Parameter(1 + 0.1 * _randn(shape[-1], dtype, device, seed + 1))
    return x, w


def _out_and_grads(fn, tensors, grad_out):
    out = fn(*tensors)
    out.backward(grad_out)
    return [out.detach()] + [t.grad for t in tensors]


def _assert_all_close(got, ref, dtype, what):
    """Elementwise within tol, absolute part relative to the tensor's largest value: a weight
    gradient sums over tokens, and its bf16 rounding error grows with that sum, not per element."""
    tol = TOLERANCES[dtype]
    for name, a, b in zip(("output", "grad x", "grad w"), got, ref):
        a, b = a.float(), b.float()
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item(),
                                   msg=lambda m: f"{what} {name}: {m}")


@DTYPES
def test_torch_backend_is_bit_identical_to_hf_and_plain_swiglu(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = LlamaRMSNorm(HIDDEN, eps=EPS).to(dtype)
    x, w = _leaves(SHAPES[0], dtype, "cpu", seed=0)
    with torch.no_grad():
        hf.weight.copy_(w)
    x_hf = x.detach().clone().requires_grad_()
    grad = _randn(SHAPES[0], dtype, "cpu", seed=1)
    got = _out_and_grads(lambda x, w: norm_kernel("torch")(x, w, EPS), (x, w), grad)
    ref = _out_and_grads(lambda x, w: hf(x), (x_hf, hf.weight), grad)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))

    gate_up = _randn((7, 2, 2 * HIDDEN), dtype, "cpu", seed=2)
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(swiglu_kernel("torch")(gate_up), F.silu(gate) * up)


@DTYPES
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_norm_backend_matches_reference(backend, dtype):
    device = _device_or_skip(backend)
    kernel = norm_kernel(backend)
    for i, shape in enumerate(SHAPES):
        x, w = _leaves(shape, dtype, device, seed=i)
        x_ref, w_ref = x.detach().clone().requires_grad_(), torch.nn.Parameter(w.detach().clone())
        grad = _randn(shape, dtype, device, seed=20 + i)
        got = _out_and_grads(lambda x, w: kernel(x, w, EPS), (x, w), grad)
        ref = _out_and_grads(lambda x, w: rms_norm(x, w, EPS), (x_ref, w_ref), grad)
        _assert_all_close(got, ref, dtype, f"{backend} rms_norm {shape}")


@DTYPES
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_swiglu_backend_matches_reference(backend, dtype):
    device = _device_or_skip(backend)
    kernel = swiglu_kernel(backend)
    for i, (s, b, h) in enumerate(SHAPES):
        gate_up = _randn((s, b, 2 * h), dtype, device, seed=10 + i).requires_grad_()
        gate_up_ref = gate_up.detach().clone().requires_grad_()
        grad = _randn((s, b, h), dtype, device, seed=30 + i)
        got = _out_and_grads(kernel, (gate_up,), grad)
        ref = _out_and_grads(swiglu, (gate_up_ref,), grad)
        _assert_all_close(got, ref, dtype, f"{backend} swiglu {(s, b, h)}")


def test_compile_backend_in_the_model_keeps_parameters_and_numbers():
    """A whole stage on norm_backend=compile: same parameter names and tp attributes, same loss
    and gradients as the torch backend (fp32)."""
    _device_or_skip("compile")
    ps, layers = ParallelState.single(), list(range(FIELDS["num_layers"]))
    stages = {b: LlamaStage(ModelConfig(**FIELDS, norm_backend=b), ps, layers, True, True)
              for b in ("torch", "compile")}
    for stage in stages.values():
        load_hf_state_dict(stage, hf_model(FIELDS, seed=1).state_dict())
    assert list(stages["compile"].state_dict()) == list(stages["torch"].state_dict())
    batch = model_batch(packed_batch([[5, 7, 4], [9, 3]], 16, FIELDS["vocab_size"], seed=2))
    losses = {}
    for name, stage in stages.items():
        loss_sum, count = stage(batch)
        (loss_sum / count).backward()
        losses[name] = loss_sum.detach()
    torch.testing.assert_close(losses["compile"], losses["torch"], rtol=1e-5, atol=1e-5)
    ref = dict(stages["torch"].named_parameters())
    for name, p in stages["compile"].named_parameters():
        # torch.compile adds its own marker attributes; megasft's (tp, replication) must be intact.
        assert all(getattr(p, k) == v for k, v in vars(ref[name]).items()), f"attributes of {name} changed"
        torch.testing.assert_close(p.grad, ref[name].grad, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"grad of {name}: {m}")


def test_auto_is_torch_on_cpu_and_unavailable_backends_say_why():
    cpu = torch.device("cpu")
    assert resolve_norm_backend("auto", cpu) == "torch"
    for backend in ("apex", "te"):
        with pytest.raises(ValueError, match=f"norm_backend={backend} is unavailable: .*CUDA tensors only"):
            resolve_norm_backend(backend, cpu)
    if importlib.util.find_spec("transformer_engine") is None:
        with pytest.raises(ValueError, match=r"needs transformer-engine \(pip install"):
            resolve_norm_backend("te", torch.device("cuda"))
    with pytest.raises(ConfigError, match="norm_backend='fused' is not one of"):
        Config.from_dict({"model": {"norm_backend": "fused"}}).validate()


def test_an_unrelated_package_named_apex_is_refused_without_importing_it(tmp_path, monkeypatch):
    impostor = tmp_path / "apex"
    impostor.mkdir()
    (impostor / "__init__.py").write_text("raise RuntimeError('the unrelated apex was imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fused._missing_apex.cache_clear()
    try:
        with pytest.raises(ValueError, match="needs NVIDIA apex.*unrelated"):
            resolve_norm_backend("apex", torch.device("cuda"))
    finally:
        fused._missing_apex.cache_clear()
