"""Attention backends against a plain per-document reference (softmax(QK^T/sqrt(d)) V, causal,
each document alone). GPU backends run only where CUDA and their package exist; elsewhere they are
skipped with the reason."""
from __future__ import annotations

import math

import pytest
import torch

from megasft.model.attention import _has_flash_attn, _has_torch_varlen, attention, resolve_backend


def _reference(q, k, v, cu_seqlens, window=None, scale=None, softcap=None):
    """Per document, per head: causal softmax attention in fp32 (kv heads repeated for GQA), keys
    within `window` of the query, scores times `scale` (1/sqrt(d)) then c * tanh(scores / c)."""
    s, b, nq, d = q.shape
    rep = nq // k.shape[2]
    flat = [t.transpose(0, 1).reshape(b * s, t.shape[2], d).float() for t in (q, k, v)]
    out = torch.zeros(b * s, nq, d)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds, bounds[1:]):
        qd, kd, vd = (t[start:end] for t in flat)
        kd, vd = kd.repeat_interleave(rep, dim=1), vd.repeat_interleave(rep, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qd, kd) * (1 / math.sqrt(d) if scale is None else scale)
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        n = end - start
        allowed = torch.ones(n, n, dtype=torch.bool).tril()
        if window is not None:
            allowed &= ~torch.ones(n, n, dtype=torch.bool).tril(-window)   # drop keys i - j >= window
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vd)
    return out.view(b, s, nq, d).transpose(0, 1)


def _inputs(device, dtype):
    g = torch.Generator().manual_seed(0)
    s, b, nq, nkv, d = 24, 2, 4, 2, 16
    q, k, v = (torch.randn(s, b, n, d, generator=g) for n in (nq, nkv, nkv))
    cu = torch.tensor([0, 5, 17, 24, 30, 48], dtype=torch.int32)   # 3 segments in row 0, 2 in row 1
    return [t.to(device, dtype) for t in (q, k, v)], cu.to(device), 18


def test_sdpa_block_diagonal_matches_per_document_reference():
    (q, k, v), cu, max_len = _inputs("cpu", torch.float32)
    out = attention(q, k, v, cu, max_len, "sdpa")
    torch.testing.assert_close(out, _reference(q, k, v, cu), rtol=1e-5, atol=1e-5)


# Gemma-style options: a window shorter than most segments, a scale other than 1/sqrt(d), a cap
# below the scores' size (randn q, k: scores ~ sqrt(d) * scale ~ 0.9) so tanh bends them.
GEMMA_OPTIONS = [pytest.param(dict(window=4), id="window"), pytest.param(dict(scale=0.2), id="scale"),
                 pytest.param(dict(window=4, scale=0.2, softcap=0.5), id="window-scale-softcap"),
                 pytest.param(dict(softcap=0.5), id="softcap")]


@pytest.mark.parametrize("options", GEMMA_OPTIONS)
def test_sdpa_window_scale_softcap_match_the_reference(options):
    (q, k, v), cu, max_len = _inputs("cpu", torch.float32)
    out = attention(q, k, v, cu, max_len, "sdpa", **options)
    torch.testing.assert_close(out, _reference(q, k, v, cu, **options), rtol=1e-5, atol=1e-5)
    if "softcap" in options:   # the cap really bends this input
        uncapped = _reference(q, k, v, cu, **{**options, "softcap": None})
        assert (out - uncapped).abs().max() > 1e-2


def test_torch_varlen_refuses_softcap_and_auto_passes_over_it():
    with pytest.raises(ValueError) as err:
        resolve_backend("torch_varlen", torch.device("cpu"), softcap=50.0)
    assert str(err.value) == ("attention_backend=torch_varlen has no logit soft-capping "
                              "(model.attn_logit_softcapping=50.0); use attention_backend=flash_attn, sdpa or auto")
    assert resolve_backend("auto", torch.device("cpu"), softcap=50.0) == "sdpa"


def test_auto_on_cpu_is_sdpa_and_gpu_backends_are_refused_clearly():
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    with pytest.raises(ValueError, match="needs CUDA"):
        resolve_backend("flash_attn", torch.device("cpu"))


@pytest.mark.cuda
@pytest.mark.parametrize("backend, available, reason", [
    ("torch_varlen", lambda: _has_torch_varlen(), "torch.nn.attention.varlen not available"),
    ("flash_attn", lambda: _has_flash_attn(), "flash-attn not installed"),
])
def test_gpu_backend_matches_reference(backend, available, reason):
    if not torch.cuda.is_available():
        pytest.skip(f"{backend}: no CUDA device")
    if not available():
        pytest.skip(f"{backend}: {reason}")
    (q, k, v), cu, max_len = _inputs("cuda", torch.bfloat16)
    out = attention(q, k, v, cu, max_len, resolve_backend(backend, q.device))
    torch.testing.assert_close(out.float().cpu(), _reference(q.cpu(), k.cpu(), v.cpu(), cu.cpu()),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend, options", [
    ("torch_varlen", dict(window=4, scale=0.2)),
    ("flash_attn", dict(window=4, scale=0.2, softcap=0.5)),
])
def test_gpu_backend_window_scale_softcap_match_reference(backend, options):
    if not torch.cuda.is_available():
        pytest.skip(f"{backend}: no CUDA device")
    if not (_has_torch_varlen() if backend == "torch_varlen" else _has_flash_attn()):
        pytest.skip(f"{backend}: not installed")
    (q, k, v), cu, max_len = _inputs("cuda", torch.bfloat16)
    out = attention(q, k, v, cu, max_len, resolve_backend(backend, q.device, options.get("softcap")), **options)
    torch.testing.assert_close(out.float().cpu(), _reference(q.cpu(), k.cpu(), v.cpu(), cu.cpu(), **options),
                               rtol=2e-2, atol=2e-2)
