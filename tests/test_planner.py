"""The planner: its exact counts against the real model/optimizer, its formulas, refusals and search."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megasft.config import Config, ConfigError
from megasft.data.batch import MicroBatch
from megasft.planner import (Assumptions, PlanError, candidate_of, check_fits, forward_flops_per_token,
                             make_cluster, model_flops_per_step, pin, plan, rank_state_bytes, search)
from megasft.planner.activations import in_flight_layers, layer_activations
from megasft.planner.comm import dp_bytes_per_step
from megasft.planner.hardware import GIB

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"


def _cfg(model: dict, parallel: dict | None = None, data: dict | None = None, world: int = 1, **sections) -> Config:
    raw = {"model": model, "parallel": parallel or {}, "data": data or {}, **sections}
    return pin(Config.from_dict(raw), world)


def _run_cli(argv: list[str]) -> int:
    spec = importlib.util.spec_from_file_location("plan_cli", ROOT / "tools" / "plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


# ------------------------------------------------------------------ the Llama-3.1 example configs
@pytest.mark.parametrize("name,nodes", [("llama3.1_8b", 1), ("llama3.1_70b", 8), ("llama3.1_405b", 128),
                                        ("gemma3_27b", 4), ("llama3.1_70b_32k", 8), ("llama3.1_405b_128k", 128)])
def test_example_configs_validate_and_fit_their_cluster(name, nodes):
    cfg = pin(Config.load(str(CONFIGS / f"{name}.yaml")), nodes * 8)
    result = check_fits(plan(cfg, make_cluster(nodes, 8, "h100-80gb")))
    assert result.worst.total < 80 * 1e9 * 0.995 < result.cluster.memory_bytes
    assert 0.2 < result.mfu < 0.7


def test_405b_plan_breakdown(capsys):
    cfg = Config.load(str(CONFIGS / "llama3.1_405b.yaml"))
    result = plan(cfg, make_cluster(128, 8, "h100-80gb"))
    assert result.parameters == 405_853_388_800
    p = result.config.parallel
    assert (p.tp, p.pp, p.virtual_pipeline_size, p.dp, result.micro_batches) == (8, 16, 4, 8, 64)
    assert result.bubble == pytest.approx(15 / (4 * 64 + 15))
    # Sharded state is the whole model spread over tp*pp ranks (+ padded vocab rows on the ends).
    state_params = sum(s.parameters for s in result.stages) * p.tp
    assert 405_853_388_800 <= state_params < 405_853_388_800 * 1.001
    assert _run_cli(["--config", str(CONFIGS / "llama3.1_405b.yaml"), "--nodes", "128",
                     "--gpus-per-node", "8", "--gpu", "h100-80gb"]) == 0
    out = capsys.readouterr().out
    assert "405,853,388,800 parameters" in out and "FITS" in out and "MFU" in out


# ------------------------------------------------------------------------------- refusals
def test_impossible_layout_is_refused_naming_the_overflow(capsys):
    overrides = ["parallel.tp=1", "parallel.sequence_parallel=false", "model.recompute=none"]
    cfg = Config.load(str(CONFIGS / "llama3.1_8b.yaml"), overrides)
    result = plan(cfg, make_cluster(1, 8, "h100-80gb"))
    assert not result.fits
    with pytest.raises(PlanError) as err:
        check_fits(result)
    assert f"needs {result.worst.total / GIB:.1f} GiB > 79.6 GiB" in str(err.value)
    assert "largest part: activations" in str(err.value)

    rc = _run_cli(["--config", str(CONFIGS / "llama3.1_8b.yaml"), "--nodes", "1", *overrides])
    captured = capsys.readouterr()
    assert rc == 1 and "DOES NOT FIT" in captured.out
    assert "refused: layout does not fit" in captured.err and "nearest layouts that fit" in captured.err
    suggestion = captured.err.split("apply #1 with: ")[1].split()
    assert plan(Config.load(str(CONFIGS / "llama3.1_8b.yaml"), suggestion), result.cluster).fits


def test_search_that_finds_nothing_says_what_would_fit(capsys):
    """8B (16 B/param of state before activations) cannot fit two 40 GiB A100s in any layout."""
    from megasft.planner.search import candidate_layouts, smallest_memory

    cfg = Config.load(str(CONFIGS / "llama3.1_8b.yaml"))
    cluster = make_cluster(1, 2, "a100-40gb")
    rc = _run_cli(["--config", str(CONFIGS / "llama3.1_8b.yaml"), "--nodes", "1", "--gpus-per-node", "2",
                   "--gpu", "a100-40gb", "--search"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 1 and out[0] == "no layout fits 1 nodes x 2 A100 SXM 40GB (40.0 GiB each)"
    lean = smallest_memory(cfg, cluster)
    assert lean.worst.total == min(plan(c, cluster).worst.total for _, c in candidate_layouts(cfg, cluster))
    # at least the fp32 grads + AdamW state (16 B/param, dp = 1) of 8B params split over 2 GPUs
    assert lean.worst.total > 16 * 8.0e9 / 2 > cluster.memory_bytes
    assert f"needs {lean.worst.total / GIB:.1f} GiB per GPU: short by " \
           f"{(lean.worst.total - cluster.memory_bytes) / GIB:.1f} GiB" in out[1]
    nodes = int(out[2].split()[0])
    assert out[2].endswith(f"would fit: megasft plan ... --nodes {nodes} --search")
    assert search(cfg, make_cluster(nodes, 2, "a100-40gb"), top=1)                # it does fit there
    assert not search(cfg, make_cluster(nodes // 2, 2, "a100-40gb"), top=1)       # and not on half of it


def test_layout_that_cannot_exist_is_a_config_error():
    cfg = Config.load(str(CONFIGS / "llama3.1_405b.yaml"))
    with pytest.raises(ConfigError, match="world_size=8 is not divisible by tp\\*pp"):
        plan(cfg, make_cluster(1, 8, "h100-80gb"))
    with pytest.raises(ConfigError, match="known GPUs"):
        make_cluster(1, 8, "h100-94gb")
    # 64 rows / dp 8 = 8 micro-batches: not a multiple of pp=16, which interleaving needs.
    small_batch = Config.load(str(CONFIGS / "llama3.1_405b.yaml"), ["data.global_batch_tokens=524288"])
    with pytest.raises(ConfigError, match="multiple of pp=16"):
        plan(small_batch, make_cluster(128, 8, "h100-80gb"))


# ------------------------------------------------------------------------------- search
def test_search_returns_fitting_layouts_sorted_by_throughput():
    cfg = Config.load(str(CONFIGS / "llama3.1_8b.yaml"))
    cluster = make_cluster(1, 8, "h100-80gb")
    ranked = search(cfg, cluster)
    assert len(ranked) > 10
    speeds = [p.tokens_per_second for p in ranked]
    assert speeds == sorted(speeds, reverse=True)
    assert all(p.fits and p.worst.total <= cluster.memory_bytes for p in ranked)
    for p in ranked[:5]:  # each row's overrides reproduce it through the ordinary config path
        again = plan(Config.load(str(CONFIGS / "llama3.1_8b.yaml"), candidate_of(p.config).overrides()), cluster)
        assert again.tokens_per_second == pytest.approx(p.tokens_per_second)
    assert {candidate_of(p.config).recompute for p in ranked} >= {"none", "full"}


def test_in_flight_activations_follow_korthikanti():
    # Korthikanti et al. 2022 Sec. 4.2.3: under 1F1B the first stage holds p micro-batches of
    # L/p layers = L layers whatever p is; interleaving multiplies that by (1 + (p-1)/(p*v)).
    data = {"seq_len": 64, "global_batch_tokens": 64 * 16}
    for pp in (2, 4, 8):
        cfg = _cfg({"preset": "tiny", "num_layers": 32}, {"pp": pp}, data, world=pp)
        assert in_flight_layers(cfg, 0) == 32
        assert in_flight_layers(cfg, pp - 1) == 32 // pp  # the last stage: one micro-batch
    cfg = _cfg({"preset": "tiny", "num_layers": 32}, {"pp": 4, "virtual_pipeline_size": 2}, data, world=4)
    assert in_flight_layers(cfg, 0) == 32 * (1 + 3 / 8)


def test_activation_terms():
    def layer(recompute="none", tp=1, sp=False, backend="auto"):
        cfg = _cfg({"preset": "tiny", "recompute": recompute, "attention_backend": backend},
                   {"tp": tp, "sequence_parallel": sp}, {"seq_len": 256, "global_batch_tokens": 256}, world=tp)
        return layer_activations(cfg, Assumptions())

    h, heads, s = 128, 4, 256
    # sdpa keeps the additive block-diagonal mask (e=2 bytes per score, one per layer) on top of the
    # flash-style log-sum-exp; selective recomputation drops the whole attention core.
    assert layer(backend="sdpa").full - layer().full == pytest.approx(s * 2 * s)
    assert layer("selective", backend="sdpa").stored == pytest.approx(
        layer(backend="sdpa").full - s * (4 * heads + 2 * s))
    # Full recompute keeps the layer input only, sharded along the sequence under SP.
    assert layer("full").stored == 2 * h * s
    assert layer("full", tp=2, sp=True).stored == 2 * h * s / 2
    # SP shards the norm regions: (4 + 2) bytes per element, two norms, plus one fp32 scalar each.
    assert layer(tp=2).full - layer(tp=2, sp=True).full == pytest.approx(s * (2 * (6 * h + 4)) / 2)


# -------------------------------------------------------------------------- FLOPs and comm
def test_model_flops_match_narayanan_eq3():
    # An MHA Llama with ffn = 8h/3 has 12h^2 GEMM weights per layer, like GPT, so eq. (3) of
    # Narayanan et al. 2021 applies as written: 72 B s l h^2 (1 + s/(6h) + V/(12 l h)).
    h, layers, V, s, B = 96, 3, 1000, 128, 4
    cfg = _cfg({"preset": "tiny", "hidden_size": h, "intermediate_size": 256, "num_layers": layers,
                "num_attention_heads": 4, "num_kv_heads": 4, "vocab_size": V},
               data={"seq_len": s, "global_batch_tokens": s * B})
    assert model_flops_per_step(cfg) == pytest.approx(72 * B * s * layers * h**2 * (1 + s / (6 * h) + V / (12 * layers * h)))


def test_forward_flops_equal_torch_flop_counter_on_the_model():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from megasft.model.build import build_model
    from megasft.parallel_state import ParallelState

    s = 64
    cfg = _cfg({"preset": "tiny-qkv-bias", "vocab_size": 300}, data={"seq_len": s, "global_batch_tokens": s})
    (stage,) = build_model(cfg, ParallelState.single())
    batch = MicroBatch(input_ids=torch.randint(0, 300, (1, s)), position_ids=torch.arange(s)[None],
                       cu_seqlens=torch.tensor([0, s], dtype=torch.int32), max_seqlen=s)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # math: counted bmm
        stage(batch)
    expected = forward_flops_per_token(cfg.model, s, vocab_size=cfg.model.padded_vocab_size(1)) * s
    assert counter.get_total_flops() == expected


def test_zero1_dp_traffic_is_grad_reduce_scatter_plus_param_all_gather():
    cfg = _cfg({"preset": "tiny", "vocab_size": 300}, data={"seq_len": 64, "global_batch_tokens": 64 * 4}, world=4)
    n = rank_state_bytes(cfg).parameters
    assert dp_bytes_per_step(cfg, 0) == pytest.approx((3 / 4 * n * 4, 3 / 4 * n * 2))


def test_overlap_hides_dp_communication_down_to_one_bucket():
    """Each overlap hides its collective behind compute, never below one bucket's time."""
    cluster = make_cluster(nodes=8, gpus_per_node=8, gpu="h100-80gb")
    cfg = Config.load(str(CONFIGS / "llama3.1_70b.yaml"))
    steps = {}
    for grad, gather in ((False, False), (True, False), (True, True)):
        cfg.parallel.overlap_grad_reduce, cfg.parallel.overlap_param_gather = grad, gather
        result = plan(cfg, cluster)
        steps[grad, gather] = result.step_seconds
    assert steps[False, False] > steps[True, False] > steps[True, True]
    hidden = steps[True, False] - steps[True, True]
    assert 0 < hidden <= max(c.dp_gather_seconds - c.dp_gather_bucket_seconds for c in result.comm) + 1e-9
    for c in result.comm:
        assert c.dp_gather_bucket_seconds == pytest.approx(c.dp_bucket_seconds / 2)   # bf16 vs fp32 bytes


# ------------------------------------------- exact state bytes against the real model and optimizer
@pytest.mark.parametrize("preset,tp,pp,v,sp,precision", [
    ("tiny", 2, 2, 1, False, "bf16"),          # kv heads split, dp = 3
    ("tiny-tied", 4, 2, 2, False, "fp32"),     # kv heads replicated, tied head copy on the last stage
    ("tiny-qkv-bias", 4, 1, 1, True, "bf16"),  # SP norms and replicated biased kv heads synced by the model
    ("tiny-qkv-bias", 1, 1, 1, False, "bf16"),  # one stage holds embedding and head
    ("tiny-gemma3", 2, 2, 1, True, "bf16"),    # Gemma's four SP norms and q/k norms per layer, tied over PP
])
def test_state_bytes_equal_the_live_rank(fake_world, preset, tp, pp, v, sp, precision):
    from megasft.model.build import build_model
    from megasft.optim.distributed_optimizer import DistributedOptimizer
    from megasft.parallel_state import ParallelState

    world = tp * pp * 3
    cfg = _cfg({"preset": preset, "vocab_size": 300},
               {"tp": tp, "pp": pp, "virtual_pipeline_size": v, "sequence_parallel": sp},
               {"seq_len": 64, "global_batch_tokens": 64 * 12}, world=world, train={"precision": precision})
    for rank in (0, world - 1):  # first and last pipeline stage
        fake_world(rank, world)
        ps = ParallelState.build(tp, pp)
        params = [(f"{i}.{n}", p) for i, chunk in enumerate(build_model(cfg, ps)) for n, p in chunk.named_parameters()]
        optimizer = DistributedOptimizer(params, cfg.optim, cfg.parallel, ps, lambda step: 1e-5)
        predicted = rank_state_bytes(cfg, ps.pp_rank)
        assert predicted.parameters == sum(p.numel() for _, p in params)
        assert predicted.weights == sum(p.numel() * p.element_size() for _, p in params)
        assert predicted.grads == optimizer.grad_buffer.grad_data.numel() * 4
        assert predicted.optimizer == optimizer.state_bytes()
        dist.destroy_process_group()


def test_logged_attention_square_counts_each_layers_window():
    """The training log's model FLOPs (megasft.training.metrics) count, per layer, the pairs the
    block-causal (windowed) mask really allows, as the full square n^2 = 2 * pairs - n counts them."""
    from megasft.model.attention import block_causal_mask
    from megasft.training.metrics import attention_squares, step_model_flops

    cu = torch.tensor([0, 3, 11, 16], dtype=torch.int32)            # documents of 3, 8 and 5 tokens
    mb = MicroBatch(input_ids=torch.zeros(1, 16, dtype=torch.long), position_ids=torch.zeros(1, 16, dtype=torch.long),
                    cu_seqlens=cu, max_seqlen=8)
    model = Config.from_dict({"model": {"preset": "tiny-gemma3", "sliding_window": 4}}).validate().model
    squares = attention_squares(model, [mb])
    for window, square in squares.items():
        pairs = int(block_causal_mask(cu, 1, 16, window).sum())
        assert square == 2 * pairs - 16, window
    assert squares[None] == 3 ** 2 + 8 ** 2 + 5 ** 2 and None in squares and len(squares) == 2
    full = step_model_flops(model, 16, {w: squares[None] for w in squares})
    assert step_model_flops(model, 16, squares) < full          # a window smaller than a document saves work


def test_zb_h1_plan_reports_its_bubble_and_memory():
    """The planner reads the schedule's rules from megasft.layout: ZB-H1's bubble (p-1)/(3m+p-1)
    and every stage holding up to p micro-batches (1F1B: p - r)."""
    from megasft.layout import Layout

    cfg = Config.from_dict({"model": {"preset": "tiny"}, "data": {"seq_len": 64, "global_batch_tokens": 64 * 16},
                            "parallel": {"pp": 4, "pipeline_schedule": "zb_h1"}}).validate()
    layout = Layout.resolve(cfg, 4)
    assert layout.bubble_fraction == pytest.approx(3 / (3 * 16 + 3))
    assert [layout.in_flight(r) for r in range(4)] == [4, 4, 4, 4]
    cfg.parallel.pipeline_schedule = "1f1b"
    assert [Layout.resolve(cfg, 4).in_flight(r) for r in range(4)] == [4, 3, 2, 1]
