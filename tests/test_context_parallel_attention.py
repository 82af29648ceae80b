"""Context-parallel attention (megasft.context_parallel) against single-process references.

One spawned gloo world of 4 ranks holds a CP group of 4 and two CP groups of 2 ({0, 2} and {1, 3},
so group ranks differ from global ranks) and checks every case on both sizes: each rank feeds its
local tokens (sharding.local_token_index) of packed rows through context_parallel_attention, runs
the backward with a fixed output gradient, and the parent puts every rank's pieces back into row
order and compares output and dq/dk/dv with

  * plain torch per document — F.scaled_dot_product_attention(is_causal=True) on each segment alone
    (kv heads repeated for GQA) — for the ring and a2a paths;
  * megasft's single-process attention() (sdpa backend) where a sliding window or soft-capping is on.

Tolerance 2e-5 (fp32, eps 1.2e-7): the paths differ from the references only in summation order —
the ring merges up to 2*cp blocks by their log-sum-exp and sums dK/dV over cp blocks, a2a changes
nothing numerically — over segments of at most 40 keys with O(1) values; rounding of such sums
stays near sqrt(40) * 40 * eps ~ 3e-5 in the worst case and ~1e-6 typically (measured: < 2e-6 on entries up to 6.5).
A wrong mask, a missing block or a misrouted chunk moves entries by O(0.1).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megasft.context_parallel.block_kernel import TORCH_KERNEL
from megasft.context_parallel.sharding import check_row, local_cu_seqlens, local_token_index
from megasft.context_parallel.volume import attention_bytes
from megasft.model.attention import attention, segment_ids
from tests.multiproc import run_ranks

SEQ, B, D = 64, 2, 8
# Segment lengths of the two packed rows per cp (multiples of 2*cp, as the loader pads them). The
# 40- and 36-token documents span several ranks' worth of a row (s/cp = 16 or 32 tokens); most
# documents start and end inside a row-level chunk (s/2cp); row 1 ends in a padding tail segment.
ROWS = {2: ([20, 4, 12, 12, 16], [36, 8, 12, 8]), 4: ([40, 8, 16], [24, 16, 8, 16])}
# name: (comm, nq, nkv, options); options other than {} are compared with megasft's attention().
CASES = {
    "ring_gqa": ("ring", 4, 2, {}),
    "ring_mha": ("ring", 4, 4, {}),
    "ring_mqa": ("ring", 4, 1, {}),
    "a2a_gqa": ("a2a", 4, 2, {}),
    "a2a_mha": ("a2a", 4, 4, {}),
    "a2a_mqa": ("a2a", 4, 1, {}),        # kv heads repeated cp times to split over the group
    "ring_softcap_scale": ("ring", 4, 2, dict(softcap=0.5, scale=0.3)),
    "a2a_window_softcap_scale": ("a2a", 4, 2, dict(window=5, softcap=0.5, scale=0.3)),
}
LEDGER_CASES = ("ring_gqa", "a2a_gqa")
TOL = dict(rtol=2e-5, atol=2e-5)


def _cu(cp: int) -> torch.Tensor:
    lengths = [n for row in ROWS[cp] for n in row]
    return torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)


def _inputs(cp: int, nq: int, nkv: int, seed: int):
    """Full-row q [s, b, nq, d], k, v [s, b, nkv, d] and the output gradient [s, b, nq, d]."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SEQ, B, n, D, generator=g) for n in (nq, nkv, nkv, nq)]


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(0, 1).reshape(B * SEQ, *t.shape[2:])          # [s, b, n, d] -> [b*s, n, d]


def _local(t: torch.Tensor, idx: torch.Tensor, cp: int) -> torch.Tensor:
    """This rank's tokens of a full [s, b, n, d] tensor, as the model holds them: [s/cp, b, n, d]."""
    return _flat(t)[idx].view(B, SEQ // cp, *t.shape[2:]).transpose(0, 1).contiguous()


# ------------------------------------------------------------------ the spawned ranks
def _run_case(name: str, cp: int, group, seed: int) -> dict:
    import torch.distributed as dist

    from megasft.context_parallel.attention import context_parallel_attention

    comm, nq, nkv, options = CASES[name]
    cu, rank = _cu(cp), dist.get_rank(group)
    idx = local_token_index(cu, cp, rank)
    q, k, v, dout = (_local(t, idx, cp) for t in _inputs(cp, nq, nkv, seed))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    max_len = max(max(row) for row in ROWS[cp])
    out = context_parallel_attention(q, k, v, cu, max_len, group, comm, "sdpa", **options)
    out.backward(dout)
    return {"idx": idx, **{key: _flat_local(t, cp) for key, t in
                           (("out", out.detach()), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad))}}


def _flat_local(t: torch.Tensor, cp: int) -> torch.Tensor:
    return t.transpose(0, 1).reshape(B * SEQ // cp, *t.shape[2:])


def _rank_main() -> dict:
    import torch.distributed as dist

    from megasft import collectives
    from megasft.context_parallel.attention import context_parallel_attention

    rank = dist.get_rank()
    groups = {4: dist.new_group([0, 1, 2, 3])}
    pairs = [dist.new_group([0, 2]), dist.new_group([1, 3])]   # every rank creates every group
    groups[2] = pairs[rank % 2]
    results: dict = {"group_ranks": {cp: dist.get_process_group_ranks(g) for cp, g in groups.items()}}
    for cp, group in groups.items():
        collectives.name_group(group, "cp")
        seed = 10 * cp + rank % 2 * (cp == 2)       # the two cp=2 groups check different data
        for name in CASES:
            results[(cp, name)] = _run_case(name, cp, group, seed)
        for name in LEDGER_CASES:
            collectives.LEDGER.start()
            _run_case(name, cp, group, seed)
            results[(cp, "ledger", name)] = collectives.sent_bytes(collectives.LEDGER.stop(), "cp")
        x = torch.arange(cp, dtype=torch.float32).unsqueeze(1) + 10 * dist.get_rank(group)   # [cp, 1]
        out = torch.empty_like(x)
        collectives.all_to_all_single(out, x, group)
        results[(cp, "all_to_all")] = out
        q, k = torch.zeros(SEQ // cp, B, 4, D), torch.zeros(SEQ // cp, B, 2, D)
        for comm, options in (("ring", dict(window=4)), ("a2a", {})):
            try:
                context_parallel_attention(q[:, :, : 3 if comm == "a2a" else 4], k, k, _cu(cp), 40, group, comm,
                                           "sdpa", **options)
                results[(cp, "error", comm)] = None
            except ValueError as e:
                results[(cp, "error", comm)] = str(e)
    return results


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_rank_main, 4, timeout=240)


# ------------------------------------------------------------------ references
def _per_document(q, k, v, cu):
    """Plain torch: each segment alone through causal SDPA, kv heads repeated for GQA. [s, b, nq, d]"""
    flat = [_flat(t) for t in (q, k, v)]
    rep = q.shape[2] // k.shape[2]
    pieces = []
    bounds = cu.tolist()
    for start, end in zip(bounds, bounds[1:]):
        qd, kd, vd = (t[start:end].transpose(0, 1) for t in flat)   # [n, L, d]
        kd, vd = kd.repeat_interleave(rep, 0), vd.repeat_interleave(rep, 0)
        pieces.append(F.scaled_dot_product_attention(qd, kd, vd, is_causal=True).transpose(0, 1))
    return torch.cat(pieces).view(B, SEQ, q.shape[2], D).transpose(0, 1)


def _reference(cp: int, name: str, seed: int) -> dict:
    _, nq, nkv, options = CASES[name]
    q, k, v, dout = _inputs(cp, nq, nkv, seed)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    cu = _cu(cp)
    if options:
        out = attention(q, k, v, cu, max(max(row) for row in ROWS[cp]), "sdpa", **options)
    else:
        out = _per_document(q, k, v, cu)
    out.backward(dout)
    return {key: _flat(t) for key, t in (("out", out.detach()), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad))}


def _groups(ranks, cp):
    """(global ranks, seed) of each CP group of size cp in the spawned world."""
    seen = {}
    for r, res in enumerate(ranks):
        members = tuple(res["group_ranks"][cp])
        seen.setdefault(members, 10 * cp + r % 2 * (cp == 2))
    return seen.items()


def _assembled(ranks, members, key) -> dict:
    """Every rank's local pieces of one case put back into row order: {out, dq, dk, dv} [b*s, n, d]."""
    full = {}
    for r in members:
        res = ranks[r][key]
        for name in ("out", "dq", "dk", "dv"):
            t = full.setdefault(name, torch.full((B * SEQ, *res[name].shape[1:]), float("nan")))
            t[res["idx"]] = res[name]
    return full


# ------------------------------------------------------------------ multi-rank tests
@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("name", list(CASES))
def test_context_parallel_attention_matches_the_single_process_reference(ranks, cp, name):
    for members, seed in _groups(ranks, cp):
        got, want = _assembled(ranks, members, (cp, name)), _reference(cp, name, seed)
        for key in ("out", "dq", "dk", "dv"):
            torch.testing.assert_close(got[key], want[key], **TOL, msg=lambda m: f"{name} cp={cp} {key}: {m}")


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("name", LEDGER_CASES)
def test_ledger_books_the_cp_bytes_of_the_volume_model(ranks, cp, name):
    comm, nq, nkv, _ = CASES[name]
    forward, backward = attention_bytes(comm, cp, B * SEQ // cp, nq, nkv, D, element_bytes=4)
    for res in ranks:
        assert res[(cp, "ledger", name)] == pytest.approx(forward + backward, rel=1e-12)
    assert forward > 0


@pytest.mark.parametrize("cp", [2, 4])
def test_all_to_all_single_delivers_slice_j_to_rank_j(ranks, cp):
    for members, _ in _groups(ranks, cp):
        for i, r in enumerate(members):
            want = torch.tensor([[10.0 * j + i] for j in range(cp)])   # slice j came from group rank j
            torch.testing.assert_close(ranks[r][(cp, "all_to_all")], want)


@pytest.mark.parametrize("cp", [2, 4])
def test_unsupported_combinations_name_the_alternative(ranks, cp):
    for res in ranks:
        assert "cp_comm=a2a" in res[(cp, "error", "ring")] and "window" in res[(cp, "error", "ring")]
        assert "cp_comm=ring" in res[(cp, "error", "a2a")]


# ------------------------------------------------------------------ single-process units
@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_local_token_index_holds_every_token_once_in_balanced_chunks(cp):
    g = torch.Generator().manual_seed(cp)
    lengths = (torch.randint(0, 6, (7,), generator=g) * 2 * cp).tolist()   # zero-length segments too
    cu = torch.tensor([0] + lengths).cumsum(0)
    total = int(cu[-1])
    held = [local_token_index(cu, cp, r) for r in range(cp)]
    assert sorted(torch.cat(held).tolist()) == list(range(total))
    local_cu = local_cu_seqlens(cu, cp)
    for r, idx in enumerate(held):
        assert len(idx) == total // cp
        # Segment by segment: chunk r then chunk 2cp-1-r of each, so positions rise within a segment
        # and local_cu_seqlens marks where each segment's tokens start.
        want = []
        for start, n in zip(cu[:-1].tolist(), lengths):
            c = n // (2 * cp)
            want += list(range(start + r * c, start + (r + 1) * c))
            want += list(range(start + (2 * cp - 1 - r) * c, start + (2 * cp - r) * c))
        assert idx.tolist() == want
        assert torch.equal(segment_ids(cu, total)[idx], segment_ids(local_cu, total // cp))


def test_check_row_names_the_segment_that_does_not_split():
    with pytest.raises(ValueError, match="segment 1 .* 6 tokens, not a multiple of 2\\*cp=4"):
        check_row(torch.tensor([0, 8, 14, 16]), 2)


@pytest.mark.parametrize("causal,softcap", [(True, None), (False, None), (True, 0.5), (False, 0.5)])
def test_torch_block_kernel_forward_and_backward(causal, softcap):
    """Forward against per-segment SDPA (and its logsumexp), backward against autograd through the
    kernel's own forward; GQA with 2 query heads per kv head, segments of different q/k lengths
    where the block is not causal."""
    g = torch.Generator().manual_seed(1)
    cu_q = torch.tensor([0, 6, 10, 18], dtype=torch.int32)
    cu_k = cu_q if causal else torch.tensor([0, 3, 12, 14], dtype=torch.int32)
    q = torch.randn(18, 4, D, generator=g, requires_grad=True)
    k, v = (torch.randn(int(cu_k[-1]), 2, D, generator=g, requires_grad=True) for _ in range(2))
    dout = torch.randn(18, 4, D, generator=g)
    scale = 0.3
    out, lse = TORCH_KERNEL.forward(q, k, v, cu_q, cu_k, 8, 9, causal, scale, softcap)
    if softcap is None:
        for (qs, qe), (ks, ke) in zip(zip(cu_q.tolist(), cu_q[1:].tolist()), zip(cu_k.tolist(), cu_k[1:].tolist())):
            qd = q[qs:qe].transpose(0, 1)
            kd, vd = (t[ks:ke].transpose(0, 1).repeat_interleave(2, 0) for t in (k, v))
            want = F.scaled_dot_product_attention(qd, kd, vd, is_causal=causal, scale=scale).transpose(0, 1)
            torch.testing.assert_close(out[qs:qe], want, rtol=1e-5, atol=1e-5)
            scores = (qd @ kd.transpose(1, 2)) * scale
            if causal:
                scores = scores.masked_fill(~torch.ones(qe - qs, ke - ks, dtype=torch.bool).tril(), -math.inf)
            torch.testing.assert_close(lse[qs:qe], scores.logsumexp(-1).t(), rtol=1e-5, atol=1e-5)
    dq, dk, dv = TORCH_KERNEL.backward(dout, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(),
                                       cu_q, cu_k, 8, 9, causal, scale, softcap)
    want = torch.autograd.grad(out, (q, k, v), dout)
    for got, ref in zip((dq, dk, dv), want):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
