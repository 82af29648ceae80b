"""The planner on mixture-of-experts models (megasft.planner.moe): active-parameter FLOPs against
transformers' models and torch's FLOP counter, expert memory under expert parallelism against the
live rank, the all-to-all volume against a count of the slots that leave each rank, the saved
activations against autograd's, and the search / CLI on Qwen3-30B-A3B."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megasft.config import Config
from megasft.data.batch import MicroBatch
from megasft.model.families import moe_ffn_size
from megasft.planner import forward_flops_per_token, make_cluster, model_flops_per_step, pin, plan, search
from megasft.planner.activations import moe_bytes_per_token
from megasft.planner.comm import expert_dp_bytes_per_step, predicted_bytes
from megasft.planner.memory import rank_parameters, rank_state_bytes
from megasft.planner.moe import active_parameter_count, alltoall_bytes
from megasft.planner.report import format_search
from megasft.planner.search import candidate_of, expert_parallel_sizes
from tests.oracle import hf_model, moe_fields
from tests.test_planner import _run_cli

ROOT = Path(__file__).resolve().parents[1]
QWEN3_MOE = ROOT / "examples" / "configs" / "qwen3_30b_a3b.yaml"
FAMILIES = ["qwen3_moe", "mixtral"]


def _cfg(fields: dict, parallel: dict | None = None, world: int = 1, seq: int = 64, rows: int = 8,
         precision: str = "bf16") -> Config:
    raw = {"model": fields, "parallel": parallel or {}, "train": {"precision": precision},
           "data": {"seq_len": seq, "global_batch_tokens": seq * rows}}
    return pin(Config.from_dict(raw), world)


def _preset(name: str) -> Config:
    return Config.from_dict({"model": {"preset": name}}).validate()


# ------------------------------------------------------------------------------------ FLOPs
@pytest.mark.parametrize("family", FAMILIES)
def test_flops_count_the_active_parameters_of_the_transformers_model(family):
    """A token multiplies every matrix of the model but the embedding lookup, and of each MoE
    layer's experts only its top_k of E (transformers 5 stacks them in [E, ...] tensors); a step
    is 3 forwards of that plus Q K^T and P V over each layer's (windowed) square."""
    fields = moe_fields(family)
    cfg = _cfg(fields)
    hf = hf_model(fields)
    c = hf.config
    share = c.num_experts_per_tok / (c.num_local_experts if family == "mixtral" else c.num_experts)
    active = matmul = experts = 0.0
    for name, p in hf.named_parameters():
        used = p.numel() * (share if ".mlp.experts." in name else 1)
        experts += ".mlp.experts." in name
        active += used
        if p.dim() >= 2 and "embed_tokens" not in name:
            matmul += used
    assert experts == 2 * (c.num_hidden_layers - len(getattr(c, "mlp_only_layers", None) or []))   # gate_up, down
    assert active_parameter_count(cfg.model) == active
    assert forward_flops_per_token(cfg.model, seq_len=0) == 2 * matmul         # 2 FLOPs per multiply-add
    s = cfg.data.seq_len
    keys = min(c.sliding_window or s, s) if family == "mixtral" else s
    attention = 4 * c.num_attention_heads * c.head_dim * keys * c.num_hidden_layers
    assert model_flops_per_step(cfg) == 3 * (2 * matmul + attention) * cfg.data.global_batch_tokens


def test_flops_equal_torch_flop_counter_on_the_moe_model():
    """One forward of the megasft Qwen3-MoE model (a dense layer between two MoE layers) under
    FlopCounterMode: each expert's GEMMs run on the rows routed to it, T*k rows in all whatever
    the routing, so the count is exact."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from megasft.model.build import build_model
    from megasft.parallel_state import ParallelState

    s = 64
    cfg = _cfg(moe_fields("qwen3_moe", moe_experts_backend="loop"), seq=s, rows=1, precision="fp32")
    (stage,) = build_model(cfg, ParallelState.single())
    batch = MicroBatch(input_ids=torch.randint(0, 300, (1, s)), position_ids=torch.arange(s)[None],
                       cu_seqlens=torch.tensor([0, s], dtype=torch.int32), max_seqlen=s)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        stage(batch)
    assert counter.get_total_flops() == forward_flops_per_token(cfg.model, s, cfg.model.padded_vocab_size(1)) * s


def test_presets_active_parameters():
    """Qwen3-30B-A3B "3.3B activated" and Mixtral-8x7B "12.9B active" (their model cards, one
    truncating 3.35B and the other rounding 12.88B: hence 0.06B); model FLOPs per token are 2 per
    active matmul weight, the embedding lookup and norm weights apart."""
    for name, billions in (("qwen3-30b-a3b", 3.3), ("mixtral-8x7b", 12.9)):
        m = _preset(name).model
        active = active_parameter_count(m)
        assert abs(active / 1e9 - billions) < 0.06
        assert forward_flops_per_token(m, 0) == 2 * (active - m.vocab_size * m.hidden_size
                                                     - (2 * m.num_layers + 1) * m.hidden_size
                                                     - (2 * m.num_layers * m.head_size if m.qk_norm else 0))


# ------------------------------------------------------------------------------------ memory
def test_expert_memory_halves_with_ep_and_optimizer_state_follows_dp_over_ep():
    """dp = 4: at ep = 2 a rank holds half the experts (weights and fp32 grads), and their ZeRO-1
    state is sharded over dp/ep = 2 expert-DP ranks instead of 4 — the same 1/dp of all experts
    per rank — while the dense weights' is still over dp. (tp = 1 without SP: no model-synced
    bucket, so the buffers are the two below.)"""
    fields = moe_fields("qwen3_moe")
    one, two = (_cfg(fields, {"ep": ep}, world=4) for ep in (1, 2))
    m = one.model
    moe_layers = m.num_layers - len(m.moe_dense_layers)
    experts_one, experts_two = rank_parameters(one, 0).experts, rank_parameters(two, 0).experts
    assert experts_one == moe_layers * m.num_experts * 3 * m.hidden_size * moe_ffn_size(m)
    assert experts_two * 2 == experts_one
    a, b = rank_state_bytes(one), rank_state_bytes(two)
    assert a.parameters - b.parameters == experts_two
    assert a.weights - b.weights == experts_two * 2                              # bf16
    dense = a.parameters - experts_one
    # ep = 1: one buffer for all (64-element alignment per shard, megasft.optim.grad_buffer);
    # ep = 2: the experts' own, padded for and sharded over 2 ranks
    align = 64
    pad = lambda n, k: -(-n // (k * align)) * k * align                            # noqa: E731
    assert a.optimizer == pad(a.parameters, 4) // 4 * 12
    assert b.optimizer == (pad(dense, 4) // 4 + pad(experts_two, 2) // 2) * 12
    assert b.grads == (pad(dense, 4) + pad(experts_two, 2)) * 4
    assert expert_dp_bytes_per_step(two, 0) == pytest.approx((experts_two * 4 / 2, experts_two * 2 / 2))


@pytest.mark.parametrize("family,tp,ep,sp,pp,cp", [
    ("qwen3_moe", 2, 1, True, 1, 1),      # the routers' SP gradients in the model-synced bucket
    ("qwen3_moe", 2, 2, True, 1, 1),      # experts in buckets of their own over expert-DP
    ("mixtral", 1, 4, False, 1, 1),       # ep = dp: the experts' state unsharded
    ("qwen3_moe", 1, 2, False, 2, 1),     # stages [MoE, dense] | [MoE, LM head]
    ("qwen3_moe", 1, 2, False, 1, 2),     # cp2 dp2: EP over the CP ranks, expert state over dp
    ("qwen3_moe", 1, 4, False, 1, 2),     # ep = dp*cp
])
def test_state_bytes_equal_the_live_moe_rank(fake_world, family, tp, ep, sp, pp, cp):
    from megasft.model.build import build_model
    from megasft.optim.distributed_optimizer import DistributedOptimizer
    from megasft.parallel_state import ParallelState

    world = tp * pp * 4
    parallel = {"tp": tp, "pp": pp, "cp": cp, "ep": ep, "sequence_parallel": sp,
                "pipeline_layers": [2, 1] if pp > 1 else None}
    cfg = _cfg(moe_fields(family), parallel, world=world)
    for rank in (0, world - 1):
        fake_world(rank, world)
        ps = ParallelState.build(tp, pp, cp=cp, ep=ep)
        params = [(f"0.{n}", p) for n, p in build_model(cfg, ps)[0].named_parameters()]
        optimizer = DistributedOptimizer(params, cfg.optim, cfg.parallel, ps, lambda step: 1e-5)
        predicted = rank_state_bytes(cfg, ps.pp_rank)
        assert predicted.parameters == sum(p.numel() for _, p in params)
        assert predicted.weights == sum(p.numel() * p.element_size() for _, p in params)
        assert predicted.grads == optimizer.grad_buffer.grad_data.numel() * 4
        assert predicted.optimizer == optimizer.state_bytes()
        dist.destroy_process_group()


@pytest.mark.parametrize("family,precision", [("qwen3_moe", "bf16"), ("mixtral", "fp32")])
def test_moe_activations_equal_what_autograd_saves(family, precision):
    """Every tensor the MoE MLP saves for backward (each storage once, the weights apart) against
    the planner's bytes per token: Qwen3's router without renormalisation in bf16 (the fp32 copies
    of the logits are separate tensors), Mixtral's renormalised one in fp32."""
    from megasft.model.moe import MoE
    from megasft.parallel_state import ParallelState

    s, b = 24, 2
    cfg = _cfg(moe_fields(family, moe_experts_backend="loop"), seq=s, precision=precision)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    torch.manual_seed(0)
    moe = MoE(cfg.model, ParallelState.single(), sequence_parallel=False).to(dtype)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.5)
    weights = {p.untyped_storage().data_ptr() for p in moe.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randn(s, b, cfg.model.hidden_size, dtype=dtype, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        moe(x)
    assert sum(saved.values()) == moe_bytes_per_token(cfg) * s * b


# -------------------------------------------------------------------------------- all-to-all
def test_alltoall_bytes_equal_a_count_of_the_slots_leaving_each_rank():
    """ep ranks of T tokens each, every token routed to k distinct experts so that each expert gets
    the same number of slots (uniform routing); rank r holds experts r*E/ep .. and sends every slot
    whose expert is elsewhere — in dispatch and combine forward, and both reversed in backward —
    and the [ep, E/ep] int64 slot counts before each dispatch."""
    tokens, k, hidden, experts, ep, e = 12, 2, 16, 8, 4, 2
    local = experts // ep
    for rank in range(ep):
        picks = [((t * k + j) + rank) % experts for t in range(tokens) for j in range(k)]
        assert len(set(picks.count(x) for x in range(experts))) == 1          # uniform
        leaving = sum(x // local != rank for x in picks)
        dispatch = leaving * hidden * e
        counts = (ep - 1) * local * 8                                          # the other ranks' rows of counts
        assert alltoall_bytes(tokens, k, hidden, experts, ep, e) == pytest.approx(counts + 4 * dispatch)
        assert alltoall_bytes(tokens, k, hidden, experts, ep, e, recomputed=True) == \
            pytest.approx(2 * (counts + 2 * dispatch) + 2 * dispatch)
    assert alltoall_bytes(tokens, k, hidden, experts, 1, e) == 0.0


def test_plan_books_the_alltoalls_per_moe_layer_and_micro_batch():
    """The planner's "ep" bytes are the formula's, over the MoE layers (not the dense one) and the
    rank's micro-batches, with a layer recomputed under full recompute; none at ep = 1."""
    fields = moe_fields("qwen3_moe")
    for recompute in ("none", "full"):
        cfg = _cfg({**fields, "recompute": recompute}, {"ep": 2}, world=4)       # dp 4: 2 micro-batches
        one = alltoall_bytes(64, 2, 64, 8, 2, 2, recomputed=recompute == "full")
        assert predicted_bytes(cfg, 0)["ep"] == pytest.approx(2 * 2 * one)
    assert predicted_bytes(_cfg(fields, world=4), 0)["ep"] == 0.0


# ------------------------------------------------------------------------------ search, CLI
def test_search_enumerates_and_prints_ep_for_qwen3_30b_a3b():
    """On one node of 8 H100s the search ranks Qwen3-30B-A3B's layouts with pipeline stages (the
    fastest here) and with expert parallelism, and the best EP layout fits only because of EP."""
    cfg = Config.load(str(QWEN3_MOE))
    cluster = make_cluster(1, 8, "h100-80gb")
    assert expert_parallel_sizes(cfg, 64) == [1, 2, 4, 8, 16, 32, 64]
    assert expert_parallel_sizes(Config.load(str(ROOT / "examples/configs/llama3.1_8b.yaml")), 8) == [1]
    ranked = search(cfg, cluster)
    assert candidate_of(ranked[0].config).pp > 1
    with_ep = [p for p in ranked if candidate_of(p.config).ep > 1]
    best = candidate_of(with_ep[0].config)
    assert best.dp * best.cp % best.ep == 0 and 128 % best.ep == 0
    assert f"dp{best.dp} ep{best.ep} " in format_search(with_ep).splitlines()[1]
    # Why: the same layout at ep = 1 holds every expert on every rank, and does not fit.
    same = plan(Config.load(str(QWEN3_MOE), [*best.overrides(), "parallel.ep=1"]), cluster)
    experts = rank_parameters(same.config, 0).experts
    assert not same.fits and same.worst.parameters - with_ep[0].worst.parameters == experts * (1 - 1 / best.ep)


def test_plan_cli_on_qwen3_30b_a3b(capsys):
    cfg = Config.load(str(QWEN3_MOE))
    result = plan(cfg, make_cluster(8, 8, "h100-80gb"))
    assert _run_cli(["--config", str(QWEN3_MOE), "--nodes", "8", "--gpus-per-node", "8", "--gpu", "h100-80gb"]) == 0
    out = capsys.readouterr().out
    active = active_parameter_count(result.config.model)
    assert f"30,532,122,624 parameters ({active:,} active)" in out and "FITS" in out
    assert "ep 8: 16 per rank, their grads reduced over 8 expert-DP rank(s)" in out
    assert f"EP all-to-all {max(c.ep_bytes for c in result.comm) / 1e9:.1f} GB" in out
    assert "6*N_active*T" in out


def _pp_bytes_rank() -> tuple[float, float]:
    """(measured, planned) "pp" bytes of one train step of this rank of a 2-stage Qwen3-MoE."""
    from megasft import collectives
    from megasft.parallel_state import ParallelState
    from megasft.training.loop import Trainer
    from tests.oracle import packed_batch, select_rows

    ps = ParallelState.build(1, 2)
    fields = moe_fields("qwen3_moe")
    cfg = _cfg(fields, {"pp": 2, "pipeline_layers": [2, 1]}, world=2, seq=16, rows=4, precision="fp32")
    trainer = Trainer(cfg, ps, log=False)
    batch = packed_batch([[8, 8], [16], [4, 12], [16]], 16, fields["vocab_size"], seed=3)
    micro = [select_rows(batch, [r]) for r in range(4)]
    trainer.train_step(micro)
    collectives.LEDGER.start()
    trainer.train_step(micro)
    report = collectives.LEDGER.stop()
    return collectives.sent_bytes(report, "pp"), predicted_bytes(cfg, ps.pp_rank)["pp"]


def test_pipeline_bytes_include_the_pooled_router_statistics():
    """Over two stages a MoE step sends its activations / gradients and, per micro-batch, the
    all-reduce of the pooled router statistics (18 float64 here: 144 B each way per micro-batch,
    576 B a step — above the 64 B the scalar loss / count all-reduces may add): the ledger's "pp"
    bytes equal the planner's."""
    from tests.multiproc import run_ranks

    for measured, planned in run_ranks(_pp_bytes_rank, 2, timeout=300):
        assert measured == pytest.approx(planned, abs=64), (measured, planned)
