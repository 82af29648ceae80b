"""Multi-rank (gloo) equivalence of the ZeRO-1 optimizer with plain single-process PyTorch.

One spawn of 4 ranks runs every case; the parent compares against a reference built only from
torch.optim.AdamW (two param groups), clip_grad_norm_ and LambdaLR — no megasft code.

Cases: DP 1, 2, 4 (4 ranks form 4, 2 or 1 independent DP groups) x ZeRO-1 on/off x 1 or 4
micro-batches, plus overlapped bucketed reduction and param all-gather, TP 2 x DP 2 with TP-replicated params, bf16
params, skip-on-NaN and the optimizer-state bytes.
"""
import math
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megasft.config import OptimConfig, ParallelConfig
from megasft.optim.distributed_optimizer import DistributedOptimizer, TooManySkippedSteps
from megasft.optim.lr_schedule import WarmupCosine
from megasft.parallel_state import ParallelState
from megasft.tensor_parallel.spec import set_spec
from tests.multiproc import run_ranks

WORLD = 4
IN, HIDDEN, CLASSES, TOKENS, STEPS = 12, 32, 6, 64, 3
PEAK_LR, WARMUP, TOTAL, FLOOR, WD, CLIP = 1e-2, 1, 5, 0.1, 0.1, 0.6
TINY_BUCKET_MB = 300 * 4 / 2 ** 20  # ~300 elements per bucket: several buckets in the tiny model


class Tiny(nn.Module):
    """Linear + bias, an elementwise norm-like weight, Linear + bias."""

    def __init__(self, hidden: int = HIDDEN):
        super().__init__()
        self.fc1 = nn.Linear(IN, hidden)
        self.norm_weight = nn.Parameter(1 + 0.1 * torch.randn(hidden))
        self.fc2 = nn.Linear(hidden, CLASSES)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)) * self.norm_weight)


def make_model(dtype=torch.float32, hidden=HIDDEN) -> Tiny:
    torch.manual_seed(0)
    return Tiny(hidden).to(dtype)


def batch(step: int):
    """The global batch of one step: token features, targets and a loss mask (~70 % trained)."""
    g = torch.Generator().manual_seed(100 + step)
    x = 2 * torch.randn(TOKENS, IN, generator=g)
    y = torch.randint(0, CLASSES, (TOKENS,), generator=g)
    mask = (torch.rand(TOKENS, generator=g) < 0.7).float()
    return x, y, mask


def loss_sum(model, x, y, mask):
    logits = model(x.to(next(model.parameters()).dtype)).float()
    return (F.cross_entropy(logits, y, reduction="none") * mask).sum()


def ref_lr(t: int) -> float:
    """The seed's formula written out independently of megasft.optim.lr_schedule."""
    if t < WARMUP:
        return PEAK_LR * (t + 1) / WARMUP
    progress = (t - WARMUP) / (TOTAL - WARMUP)
    return PEAK_LR * (FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * progress)))


def reference():
    """Plain PyTorch: one process, the whole global batch, loss = token sum / valid tokens."""
    model = make_model()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=PEAK_LR, betas=(0.9, 0.95), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: ref_lr(t) / PEAK_LR)
    norms = []
    for step in range(STEPS):
        opt.zero_grad()
        x, y, mask = batch(step)
        (loss_sum(model, x, y, mask) / mask.sum()).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
        sched.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, norms


# ---------------------------------------------------------------- rank side
def optim_config(**overrides) -> OptimConfig:
    return OptimConfig(lr=PEAK_LR, warmup_steps=WARMUP, min_lr_ratio=FLOOR, beta1=0.9, beta2=0.95,
                       eps=1e-8, weight_decay=WD, clip_grad=CLIP, **overrides)


def make_optimizer(named_params, state, zero=True, overlap=False, gather_overlap=False, **optim_overrides):
    parallel = ParallelConfig(distributed_optimizer=zero, overlap_grad_reduce=overlap,
                              overlap_param_gather=gather_overlap, bucket_size_mb=TINY_BUCKET_MB)
    return DistributedOptimizer(named_params, optim_config(**optim_overrides), parallel, state,
                                WarmupCosine(PEAK_LR, WARMUP, TOTAL, FLOOR))


def grid_state(tp: int, dp: int, groups: dict) -> ParallelState:
    """ParallelState of this rank in a world of WORLD ranks laid out TP-fastest, then DP (pp = 1)."""
    rank = dist.get_rank()
    return ParallelState(rank=rank, world_size=WORLD, tp=tp, pp=1, dp=dp, tp_rank=rank % tp, pp_rank=0,
                         dp_rank=(rank // tp) % dp, tp_group=groups.get(("tp", tp, dp)),
                         dp_group=groups.get(("dp", tp, dp)))


def build_groups() -> dict:
    """Every group the cases use; new_group is collective, so all ranks create all groups in order."""
    rank, groups = dist.get_rank(), {}
    for tp, dp in ((1, 2), (1, 4), (2, 2)):
        for kind, lists in (("tp", [[s + t for t in range(tp)] for s in range(0, WORLD, tp)]),
                            ("dp", [[b + d * tp for d in range(dp)] for b in range(WORLD) if b % (tp * dp) < tp])):
            for ranks in lists:
                group = dist.new_group(ranks) if len(ranks) > 1 else None
                if rank in ranks:
                    groups[(kind, tp, dp)] = group
    return groups


def local_batch(state: ParallelState, step: int, micro: int):
    """This DP rank's share of the global batch, split into micro-batches, and the global count."""
    x, y, mask = batch(step)
    count = mask[torch.arange(TOKENS).chunk(state.dp)[state.dp_rank]].sum()
    if state.dp_group is not None:
        dist.all_reduce(count, group=state.dp_group)  # once per step, before backward
    shards = [t.chunk(state.dp)[state.dp_rank] for t in (x, y, mask)]
    return list(zip(*(t.chunk(micro) for t in shards))), count


def train(state, zero, micro, overlap=False, dtype=torch.float32, gather_overlap=False, **optim_overrides):
    model = make_model(dtype)
    opt = make_optimizer(model.named_parameters(), state, zero=zero, overlap=overlap,
                         gather_overlap=gather_overlap, **optim_overrides)
    opt.register_param_sync_hooks(model.modules())
    norms = []
    for step in range(STEPS):
        opt.zero_grad()
        micro_batches, count = local_batch(state, step, micro)
        for i, mb in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with nullcontext() if last else opt.grad_buffer.no_sync():
                (loss_sum(model, *mb) / count).backward()
            # The overlapped all-gather of the previous step is waited for by the first forward.
            assert not opt.grad_buffer.params_in_flight()
        result = opt.step()
        assert not result.skipped
        assert opt.grad_buffer.params_in_flight() == (gather_overlap and zero and state.dp > 1)
        norms.append(result.grad_norm)
    opt.finish_param_sync()
    return model, opt, norms


def params_of(model):
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def equivalence_cases(groups):
    out = {}
    for dp in (1, 2, 4):
        state = grid_state(1, dp, groups)
        for zero in (True, False):
            for micro in (1, 4):
                model, _, norms = train(state, zero, micro)
                out[("dp", dp, zero, micro)] = (params_of(model), norms)
            # Bucketed reduction overlapping backward; several buckets in this tiny model.
            model, opt, norms = train(state, zero, 4, overlap=True)
            assert len(opt.grad_buffer.buckets) > 1
            out[("overlap", dp, zero, 4)] = (params_of(model), norms)
        # ... and the param all-gather overlapping the next forward (alone and with the above).
        for grad_overlap in (False, True):
            model, opt, norms = train(state, True, 2, overlap=grad_overlap, gather_overlap=True)
            assert len(opt.grad_buffer.buckets) > 1
            out[("param-gather-overlap", dp, grad_overlap, 2)] = (params_of(model), norms)
        # The default kernel is torch's fused AdamW; the reference kernel shards the same way.
        model, opt, norms = train(state, True, 2, adamw_kernel="reference")
        assert opt.kernel == "reference"
        out[("reference-kernel", dp, True, 2)] = (params_of(model), norms)
    return out


def tp_case(groups):
    """TP 2 x DP 2, ZeRO-1: fc1 split by rows, fc2 by columns, norm weight and fc2 bias replicated
    (tp_copies = 2). Gradients come from a plain full model on this DP rank's data, sliced."""
    state = grid_state(2, 2, groups)
    full = make_model()
    split = {"fc1.weight": 0, "fc1.bias": 0, "fc2.weight": 1}
    local = {}
    for name, p in full.named_parameters():
        piece = p.detach().chunk(2, dim=split[name])[state.tp_rank] if name in split else p.detach()
        local[name] = nn.Parameter(piece.clone())
        set_spec(local[name], tp_copies=1 if name in split else 2)
    opt = make_optimizer(list(local.items()), state)
    norms = []
    for step in range(STEPS):
        opt.zero_grad()
        full.zero_grad()
        micro_batches, count = local_batch(state, step, 1)
        (loss_sum(full, *micro_batches[0]) / count).backward()
        for name, p in full.named_parameters():
            grad = p.grad.chunk(2, dim=split[name])[state.tp_rank] if name in split else p.grad
            opt.grad_buffer.main_grad(local[name]).copy_(grad)
        norms.append(opt.step().grad_norm)
        with torch.no_grad():  # rebuild the full weights from the TP shards
            for name, p in full.named_parameters():
                if name in split:
                    pieces = [torch.empty_like(local[name]) for _ in range(2)]
                    dist.all_gather(pieces, local[name].detach(), group=state.tp_group)
                    p.copy_(torch.cat(pieces, dim=split[name]))
                else:
                    p.copy_(local[name])
    return params_of(full), norms


def bf16_case(groups):
    """bf16 params, fp32 main params, DP 2 ZeRO-1: returns what the parent needs to check that
    every rank's gathered bf16 params equal the fp32 main params (from their owners) cast to bf16."""
    state = grid_state(1, 2, groups)
    model, opt, _ = train(state, True, 2, dtype=torch.bfloat16)
    shards = [(s, {k: v.clone() for k, v in opt.param_state(s).items()}) for s in opt.param_shards()]
    main_grad_dtypes = {opt.grad_buffer.main_grad(p).dtype for p in model.parameters()}
    return {n: p.detach().clone() for n, p in model.named_parameters()}, shards, main_grad_dtypes


def nan_case(groups):
    """Non-finite grads on one rank skip the step everywhere and leave params and moments alone;
    K consecutive skips abort."""
    state = grid_state(1, 2, groups)
    model = make_model()
    opt = make_optimizer(model.named_parameters(), state, max_consecutive_skips=3)

    def step(poison: bool):
        opt.zero_grad()
        micro_batches, count = local_batch(state, 0, 1)
        (loss_sum(model, *micro_batches[0]) / count).backward()
        if poison and state.dp_rank == 0:
            opt.grad_buffer.main_grad(model.fc1.weight)[0, 0] = float("nan")
        return opt.step()

    assert not step(False).skipped
    before = (opt.shard_state.clone(), params_of(model), opt.step_count)
    result = step(True)
    assert result.skipped and not math.isfinite(result.grad_norm) and result.consecutive_skips == 1
    assert torch.equal(opt.shard_state, before[0]) and opt.step_count == before[2]
    assert all(torch.equal(p, before[1][n]) for n, p in params_of(model).items())
    assert not step(False).skipped and opt.consecutive_skips == 0  # a good step resets the counter
    assert step(True).skipped and step(True).consecutive_skips == 2
    with pytest.raises(TooManySkippedSteps, match="max_consecutive_skips=3"):
        step(True)
    return opt.skipped_total


def bytes_case(groups):
    """Measured state bytes per rank for a model big enough that padding is noise."""
    out = {}
    for dp in (1, 2, 4):
        state = grid_state(1, dp, groups)
        for zero in (True, False):
            model = make_model(hidden=4096)
            n = sum(p.numel() for p in model.parameters())
            out[(dp, zero)] = (make_optimizer(model.named_parameters(), state, zero=zero).state_bytes(), n)
    return out


def worker():
    torch.use_deterministic_algorithms(True)
    groups = build_groups()
    return {"equivalence": equivalence_cases(groups), "tp": tp_case(groups), "bf16": bf16_case(groups),
            "nan_skips": nan_case(groups), "bytes": bytes_case(groups)}


# ------------------------------------------------------------------- parent
@pytest.fixture(scope="module")
def results():
    return run_ranks(worker, WORLD, timeout=180)


@pytest.fixture(scope="module")
def ref():
    return reference()


def assert_matches(params, norms, ref, what):
    ref_params, ref_norms = ref
    assert max(ref_norms) > CLIP, "the reference must exercise clipping"
    assert norms == pytest.approx(ref_norms, rel=1e-5), what
    for name, expected in ref_params.items():
        torch.testing.assert_close(params[name], expected, rtol=1e-5, atol=2e-6, msg=f"{what}: {name}")


def test_dp_zero_microbatch_equivalence(results, ref):
    for rank, result in enumerate(results):
        for key, (params, norms) in result["equivalence"].items():
            assert_matches(params, norms, ref, f"rank {rank} case {key}")


def test_tp2_dp2_counts_replicated_params_once(results, ref):
    for rank, result in enumerate(results):
        assert_matches(*result["tp"], ref, f"rank {rank} tp2 dp2")


def test_bf16_params_are_cast_fp32_main_params(results, ref):
    for pair in ((0, 1), (2, 3)):  # the two DP groups
        main = {n: torch.full((p.numel(),), float("nan")) for n, p in ref[0].items()}
        for rank in pair:
            for shard, views in results[rank]["bf16"][1]:
                main[shard.name][shard.param_start:shard.param_end] = views["main"]
        for rank in pair:
            params, _, grad_dtypes = results[rank]["bf16"]
            assert grad_dtypes == {torch.float32}
            for name, p in params.items():
                assert p.dtype == torch.bfloat16
                assert torch.equal(p, main[name].view(p.shape).to(torch.bfloat16)), (rank, name)
                # bf16 compute perturbs the grads; an Adam step moves a weight by about lr at most,
                # so the run stays within a few lr of the fp32 reference.
                torch.testing.assert_close(p.float(), ref[0][name], rtol=0, atol=2 * STEPS * PEAK_LR)


def test_nan_skips(results):
    assert [r["nan_skips"] for r in results] == [4] * WORLD


def test_state_bytes_per_rank(results):
    for result in results:
        for (dp, zero), (measured, n) in result["bytes"].items():
            expected = 12 * n / (dp if zero else 1)
            assert abs(measured - expected) / expected < 0.01, (dp, zero, measured, expected)
