"""Single-process checks of the optimizer pieces: decay groups, fp32 accumulation hooks, overlap
misuse, layout bookkeeping, checkpoint state and the grad-norm helpers."""
import pytest
import torch
from torch import nn

from megasft.config import OptimConfig, ParallelConfig
from megasft.optim import adamw
from megasft.optim.distributed_optimizer import DistributedOptimizer
from megasft.optim.grad_norm import clip_coefficient
from megasft.parallel_state import ParallelState
from megasft.tensor_parallel.spec import set_spec, spec_of


class Block(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.norm_weight = nn.Parameter(torch.ones(16))
        self.embed = nn.Embedding(10, 8)
        self.to(dtype)

    def forward(self, ids):
        return (self.proj(self.embed(ids)) * self.norm_weight).float().square().sum()


def optimizer(model, lr=0.1, wd=0.5, overlap=False, bucket_mb=40.0, **kw):
    parallel = ParallelConfig(overlap_grad_reduce=overlap, bucket_size_mb=bucket_mb)
    return DistributedOptimizer(model.named_parameters(), OptimConfig(lr=lr, weight_decay=wd, **kw),
                                parallel, ParallelState.single(), lambda step: lr)


def test_decay_only_on_matrices():
    # Zero gradients make the Adam term exactly 0, so only the decoupled decay moves weights.
    model = Block()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = optimizer(model, lr=0.1, wd=0.5)
    opt.zero_grad()
    assert not opt.step().skipped
    for name, p in model.named_parameters():
        factor = 1 - 0.1 * 0.5 if p.ndim >= 2 else 1.0  # embedding and proj.weight decay
        torch.testing.assert_close(p.detach(), before[name] * factor, rtol=0, atol=0, msg=name)


def test_bf16_grads_accumulate_in_fp32_over_micro_batches():
    model = Block(torch.bfloat16)
    opt = optimizer(model)
    ids = [torch.tensor([1, 2, 3]), torch.tensor([4, 5]), torch.tensor([1, 9])]
    expected = {n: torch.zeros(p.shape) for n, p in model.named_parameters()}
    for mb in ids:
        grads = torch.autograd.grad(model(mb), list(model.parameters()))
        for (n, _), g in zip(model.named_parameters(), grads):
            expected[n] += g.float()
    opt.zero_grad()
    for mb in ids:
        model(mb).backward()
    main_grad = opt.grad_buffer.main_grad
    for n, p in model.named_parameters():
        assert p.grad is None and main_grad(p).dtype == torch.float32
        torch.testing.assert_close(main_grad(p), expected[n], msg=n)
    opt.zero_grad()
    assert all(not main_grad(p).any() for p in model.parameters())


def test_params_are_views_of_one_buffer():
    model = Block(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = optimizer(model)
    buffer = opt.grad_buffer
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n])  # values survive the move into the buffer
        assert p.untyped_storage().data_ptr() == buffer.param_data.untyped_storage().data_ptr()
        assert buffer.main_grad(p).untyped_storage().data_ptr() == buffer.grad_data.untyped_storage().data_ptr()
    # Decayed params first, then 1-D ones, and every element accounted for once.
    runs = [r for b in buffer.buckets for r in b.runs]
    assert [r.decay for r in runs] == [True, False]
    assert sum(r.end - r.start for r in runs) == sum(p.numel() for p in model.parameters())


def test_overlap_buckets_and_misuse_is_reported():
    model = Block()
    opt = optimizer(model, overlap=True, bucket_mb=100 * 4 / 2 ** 20)  # ~100 elements per bucket
    assert len(opt.grad_buffer.buckets) > 1
    opt.zero_grad()
    with opt.grad_buffer.no_sync():
        model(torch.tensor([1, 2])).backward()  # accumulate only
    model(torch.tensor([3])).backward()  # last micro-batch: every bucket launches
    assert all(b.launched for b in opt.grad_buffer.buckets)
    with pytest.raises(RuntimeError, match="no_sync"):
        model(torch.tensor([4])).backward()  # a further micro-batch outside no_sync is a bug


def test_model_grad_sync_params_are_deferred():
    model = Block()
    set_spec(model.norm_weight, tied=True, pp_copies=2)   # model-synced, as a pipeline-tied copy is
    opt = optimizer(model, overlap=True, bucket_mb=100 * 4 / 2 ** 20)
    last = opt.grad_buffer.buckets[-1]
    assert last.deferred and [s.name for s in last.slots] == ["norm_weight"]
    opt.zero_grad()
    model(torch.tensor([1])).backward()
    assert not last.launched and all(b.launched for b in opt.grad_buffer.buckets[:-1])
    opt.grad_buffer.finish_grad_sync()
    assert last.launched


def test_state_dict_round_trip_and_param_shards():
    model = Block()
    opt = optimizer(model, lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        model(torch.tensor([1, 2, 3])).backward()
        opt.step()
    saved = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state_dict().items()}
    assert saved["step"] == 2 and saved["shard_state"].shape[0] == 3
    # Every parameter maps back from its shard columns (a single rank covers each one whole).
    for shard in opt.param_shards():
        p = dict(model.named_parameters())[shard.name]
        assert (shard.param_start, shard.param_end) == (0, p.numel())
        torch.testing.assert_close(opt.param_state(shard)["main"], p.detach().reshape(-1))
    fresh_model = Block()
    fresh = optimizer(fresh_model, lr=0.01)
    fresh.load_state_dict(saved)
    assert fresh.step_count == 2 and torch.equal(fresh.shard_state, saved["shard_state"])
    for (n, p), q in zip(model.named_parameters(), fresh_model.parameters()):
        assert torch.equal(p.detach(), q.detach()), n
    with pytest.raises(ValueError, match="layout"):
        fresh.load_state_dict({**saved, "shard_state": saved["shard_state"][:, :-1]})


def test_norm_helpers():
    p = nn.Parameter(torch.zeros(3))
    assert spec_of(p).copies == 1
    set_spec(p, tp_copies=4, pp_copies=2)
    assert spec_of(p).copies == 8
    assert clip_coefficient(0.5, 1.0) == 1.0
    assert clip_coefficient(4.0, 1.0) == pytest.approx(1.0 / (4.0 + 1e-6))
    assert clip_coefficient(4.0, 0.0) == 1.0  # clip_grad 0 disables clipping
    assert "1 bucket" in optimizer(Block()).describe()


def test_chunked_update_changes_nothing(monkeypatch):
    def train(chunk):
        monkeypatch.setattr(adamw, "CHUNK", chunk)
        torch.manual_seed(0)
        model = Block()
        opt = optimizer(model, lr=0.01, adamw_kernel="reference")
        for step in range(3):
            opt.zero_grad()
            model(torch.tensor([step, 2, 7])).backward()
            opt.step()
        return opt.shard_state.clone()

    assert torch.equal(train(7), train(1 << 26))


@pytest.mark.parametrize("kernel", ["fused", "reference"])
def test_adamw_kernels_match_torch_adamw(kernel):
    """Both kernels (several buckets, decayed and undecayed runs, a clipped step, a changing lr)
    against torch.optim.AdamW with two param groups and clip_grad_norm_."""
    lrs = [0.01, 0.02, 0.005, 0.01]
    torch.manual_seed(0)
    model, ref_model = Block(), Block()
    ref_model.load_state_dict(model.state_dict())
    opt = DistributedOptimizer(model.named_parameters(),
                               OptimConfig(weight_decay=0.1, clip_grad=1.0, adamw_kernel=kernel),
                               ParallelConfig(overlap_grad_reduce=True, bucket_size_mb=60 * 4 / 2 ** 20),
                               ParallelState.single(), lambda step: lrs[step])
    assert opt.kernel == kernel and len(opt.grad_buffer.buckets) > 1
    groups = [{"params": [p for p in ref_model.parameters() if p.ndim >= 2], "weight_decay": 0.1},
              {"params": [p for p in ref_model.parameters() if p.ndim < 2], "weight_decay": 0.0}]
    ref = torch.optim.AdamW(groups, lr=lrs[0], betas=(0.9, 0.95), eps=1e-8, foreach=False)
    clipped = False
    for step, lr in enumerate(lrs):
        ids = torch.tensor([step, 2, 7, (3 * step) % 10])
        opt.zero_grad()
        model(ids).backward()
        result = opt.step()
        ref.zero_grad()
        ref_model(ids).backward()
        norm = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 1.0)
        for group in ref.param_groups:
            group["lr"] = lr
        ref.step()
        clipped |= result.clip_coef < 1.0
        assert result.grad_norm == pytest.approx(float(norm), rel=1e-5)
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7, msg=f"step {step} {name}")
    assert clipped, "the case must exercise clipping"


def test_adamw_kernel_choice():
    assert adamw.resolve_kernel("auto", torch.device("cpu")) == "fused"   # torch >= 2.4 has it on CPU
    assert adamw.resolve_kernel("reference", torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match="adamw_kernel=reference"):
        adamw.resolve_kernel("fused", torch.device("meta"))
    assert "fused kernel" in optimizer(Block()).describe()


def test_per_parameter_load_paths():
    model = Block()
    opt = optimizer(model, lr=0.1, wd=0.5)
    # Model weights loaded after the optimizer was built reach the fp32 main params.
    with torch.no_grad():
        model.proj.weight.fill_(2.0)
    opt.main_params_from_model()
    opt.zero_grad()
    opt.step()
    assert torch.equal(model.proj.weight.detach(), torch.full((16, 8), 2.0 * (1 - 0.1 * 0.5)))
    # Main params written per parameter (a resharding checkpoint load) reach the model.
    for shard in opt.param_shards():
        if shard.name == "norm_weight":
            opt.param_state(shard)["main"].fill_(3.0)
    opt.publish_params()
    assert torch.equal(model.norm_weight.detach(), torch.full((16,), 3.0))
