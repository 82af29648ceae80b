"""The planner under context parallelism: per-rank memory and work fall as 1/cp, ZeRO-1 shards over
dp*cp, the ring and all-to-all volumes from the model's dimensions, the ring's overlap with the
block attention, and the search and example configs for long rows (megasft.planner.context_parallel).

Every expected number is computed here from the dimensions and the formulas as written in the
module docstring, not by calling the function under test; all are exact (integers of bytes or
FLOPs, or sums of a few floats), hence pytest.approx's default 1e-6 relative tolerance.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from megasft.config import Config
from megasft.planner import Assumptions, check_fits, make_cluster, pin, plan, rank_state_bytes, search
from megasft.planner.activations import layer_activations, loss_bytes
from megasft.planner.comm import dp_bytes_per_step, predicted_bytes
from megasft.planner.context_parallel import (RING_GRAD_BYTES, cp_exposed_seconds, cp_transient_bytes,
                                              layer_bytes, preferred_cp_comm)
from megasft.planner.flops import executed_flops_per_micro_batch
from megasft.planner.hardware import GIB
from megasft.planner.search import candidate_of

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
# The "tiny" preset: hidden 128, 4 layers, 4 query heads of 32, 2 kv heads.
LAYERS, HEADS, KV, D = 4, 4, 2, 32
SEQ = 4096


def _tiny(cp: int = 1, tp: int = 1, dp: int = 1, comm: str = "ring", recompute: str = "none",
          precision: str = "bf16", seq: int = SEQ, rows: int = 8, **model) -> Config:
    raw = {"model": {"preset": "tiny", "recompute": recompute, **model},
           "parallel": {"tp": tp, "cp": cp, "cp_comm": comm, "sequence_parallel": tp > 1},
           "data": {"seq_len": seq, "global_batch_tokens": seq * rows}, "train": {"precision": precision}}
    return pin(Config.from_dict(raw), tp * cp * dp)


def _405b_128k(cp: int) -> tuple[Config, object]:
    """The 128K example at another cp (dp stays 1, so every rank runs the same micro-batches)."""
    cfg = Config.load(str(CONFIGS / "llama3.1_405b_128k.yaml"), [f"parallel.cp={cp}"])
    return cfg, make_cluster(16 * cp, 8, "h100-80gb")


# ------------------------------------------------------------------ memory and work per rank
@pytest.mark.parametrize("cp", [2, 4, 8])
def test_activation_memory_and_work_fall_as_one_over_cp(cp):
    one, split = _tiny(), _tiny(cp)
    a = Assumptions()
    assert layer_activations(split, a).stored == pytest.approx(layer_activations(one, a).stored / cp)
    assert layer_activations(split, a).full == pytest.approx(layer_activations(one, a).full / cp)
    assert loss_bytes(split, a) == pytest.approx(loss_bytes(one, a) / cp)
    gemm, attention = executed_flops_per_micro_batch(split, 0, a)
    assert (gemm * cp, attention * cp) == pytest.approx(executed_flops_per_micro_batch(one, 0, a))


def test_ring_transient_holds_two_kv_and_two_dkv_blocks_and_fp32_dq():
    cp, e = 4, 2
    n = SEQ // cp                                              # local tokens of one row
    block = n * KV * D                                         # elements of one K (or V) block
    expected = 2 * 2 * block * (e + RING_GRAD_BYTES) + n * HEADS * D * 4
    assert cp_transient_bytes(_tiny(cp)) == expected
    assert cp_transient_bytes(_tiny()) == 0


def test_405b_128k_activations_and_optimizer_shard_fall_as_one_over_cp():
    """Same layout, cp 2 -> 8: each rank's in-flight activations and ZeRO-1 shard shrink by cp."""
    plans = {cp: plan(*_405b_128k(cp)) for cp in (2, 8)}
    for r in range(16):
        two, eight = plans[2].stages[r], plans[8].stages[r]
        assert eight.in_flight_layers == two.in_flight_layers
        assert eight.activations == pytest.approx(two.activations / 4)
        # Each bucket is padded to a multiple of shards * 64 elements: < 1e-6 of 3.2B parameters.
        assert eight.optimizer == pytest.approx(two.optimizer / 4, rel=1e-6)
        assert eight.weights == two.weights and eight.grads == pytest.approx(two.grads, rel=1e-6)
    assert plans[8].worst.total < plans[2].worst.total


def test_zero1_shards_and_reduces_over_dp_times_cp():
    """cp=2 x dp=2 shards the optimizer and reduces gradients over 4 ranks, as dp=4 does."""
    split, plain = _tiny(cp=2, dp=2), _tiny(dp=4)
    assert rank_state_bytes(split) == rank_state_bytes(plain)
    assert dp_bytes_per_step(split, 0) == pytest.approx(dp_bytes_per_step(plain, 0))
    n = rank_state_bytes(plain).parameters
    assert dp_bytes_per_step(split, 0) == pytest.approx((3 / 4 * n * 4, 3 / 4 * n * 2))


def test_tp_and_pp_traffic_run_on_s_over_cp_tokens():
    for kind in ("tp", "pp"):
        raw = {"model": {"preset": "tiny"}, "data": {"seq_len": SEQ, "global_batch_tokens": SEQ * 8}}
        sizes = {}
        for cp in (1, 2):
            raw["parallel"] = {"tp": 2, "pp": 2, "cp": cp}
            sizes[cp] = predicted_bytes(pin(Config.from_dict(raw), 4 * cp * 2), 0)[kind]   # dp = 2
        assert sizes[2] == pytest.approx(sizes[1] / 2), kind


# ------------------------------------------------------------------ exchange volumes
@pytest.mark.parametrize("tp,kv_per_rank", [(1, 2), (2, 1), (4, 1)])   # split, split to 1, replicated
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_ring_volume(tp, kv_per_rank, recompute):
    cp, e, rows = 4, 4, 8
    cfg = _tiny(cp, tp, recompute=recompute, precision="fp32")
    n = SEQ // cp
    kv_full = SEQ * kv_per_rank * D * e                        # one of K or V of the whole row
    forward = (cp - 1) * 2 * n * kv_per_rank * D * e
    assert forward == 2 * (cp - 1) / cp * kv_full              # (cp-1)/cp of the full K and V
    # K/V round again, and the fp32 dK/dV sums: cp hops, the last one bringing them home.
    backward = forward + cp * 2 * n * kv_per_rank * D * RING_GRAD_BYTES
    assert layer_bytes(cfg) == pytest.approx((forward, backward))
    forwards = 1 if recompute == "none" else 2                 # recompute reruns the exchange
    assert predicted_bytes(cfg, 0)["cp"] == pytest.approx(rows * LAYERS * (forwards * forward + backward))
    assert layer_bytes(cfg, grad_bytes=2)[1] == pytest.approx(forward + cp * 2 * n * kv_per_rank * D * 2)


@pytest.mark.parametrize("cp,kv_moved", [(2, 2), (4, 4)])   # cp=4 > 2 kv heads: each repeated twice
def test_a2a_volume(cp, kv_moved):
    e, rows = 2, 8
    cfg = _tiny(cp, comm="a2a")
    n = SEQ // cp
    # q and out [n, 4 heads, d], k and v [n, kv_moved, d]; each all-to-all keeps 1/cp at home.
    one_way = (cp - 1) / cp * n * D * e * (2 * HEADS + 2 * kv_moved)
    assert layer_bytes(cfg) == pytest.approx((one_way, one_way))
    assert predicted_bytes(cfg, 0)["cp"] == pytest.approx(rows * LAYERS * 2 * one_way)
    assert predicted_bytes(_tiny(), 0)["cp"] == 0


# ------------------------------------------------------------------ time: overlap and the choice
def test_ring_exposes_only_what_the_block_attention_cannot_hide():
    cp, e, bw = 4, 2, 360e9
    a = Assumptions(cp_latency_us=10.0)
    cluster = make_cluster(1, 4, "h100-80gb")
    n = SEQ // cp
    block = n * KV * D * e
    # Forward attention of one layer on the rank: 4 * width * (causal keys s/2) * local queries.
    attention = 4 * HEADS * D * (SEQ / 2) * n / (989e12 * a.attention_efficiency)
    step = attention / cp
    t_fwd = 10e-6 + 2 * block / bw
    # A backward ring step carries K/V and the dK/dV sums (cp hops of those over cp-1 steps).
    t_bwd = 10e-6 + 2 * n * KV * D * (e + cp / (cp - 1) * RING_GRAD_BYTES) / bw
    for recompute, forwards in (("none", 1), ("full", 2)):
        cfg = _tiny(cp, recompute=recompute)
        expected = LAYERS * (cp - 1) * (forwards * max(0, t_fwd - step) + max(0, t_bwd - 2 * step))
        assert cp_exposed_seconds(cfg, cluster, 0, a) == pytest.approx(expected)
    # The same 4K-token row with fast links and no latency: every ring step hides behind its block.
    fast = make_cluster(1, 4, "h100-80gb", intra_node_gbps=1e6)
    assert cp_exposed_seconds(_tiny(cp), fast, 0, Assumptions(cp_latency_us=0.0)) == 0.0
    # a2a hides nothing: 4 all-to-alls each way per layer.
    one_way = (cp - 1) / cp * n * D * e * (2 * HEADS + 2 * 4)
    assert cp_exposed_seconds(_tiny(cp, comm="a2a"), cluster, 0, a) == pytest.approx(
        LAYERS * 2 * (4 * 10e-6 + one_way / bw))


def test_preferred_exchange():
    a = Assumptions()
    # 128K rows: each 0.2 ms ring step sits under 3 ms of block attention; a2a's exchange is exposed.
    cfg, cluster = _405b_128k(8)
    cfg = pin(cfg, cluster.world_size)
    assert cp_exposed_seconds(cfg, cluster, 1, a, "ring") == 0.0 < cp_exposed_seconds(cfg, cluster, 1, a, "a2a")
    assert preferred_cp_comm(cfg, cluster, 1, a) == "ring"
    # Multi-head attention, 1K-token shards, CP across a slow network: the ring's K/V are as large
    # as the queries and it takes 2(cp-1) steps to a2a's 8 exchanges.
    mha = _tiny(4, num_kv_heads=HEADS)
    slow = make_cluster(4, 1, "h100-80gb", inter_node_gbps=5.0)
    assert preferred_cp_comm(mha, slow, 0, a) == "a2a"
    # 8 query heads per rank do not split over cp=16: only the ring is possible.
    assert preferred_cp_comm(_tiny(16, num_attention_heads=8, num_kv_heads=2), slow, 0, a) == "ring"


# ------------------------------------------------------------------ search and the example configs
def test_search_puts_context_parallelism_first_for_128k_rows():
    cfg = Config.load(str(CONFIGS / "llama3.1_405b_128k.yaml"))
    cluster = make_cluster(128, 8, "h100-80gb")
    ranked = search(cfg, cluster)
    assert all(p.fits for p in ranked)
    assert {candidate_of(p.config).cp_comm for p in ranked if p.layout.cp > 1} == {"ring", "a2a"}
    assert all(p.layout.cp > 1 for p in ranked[:20])
    without = [p for p in ranked if p.layout.cp == 1]
    assert without and without[0].tokens_per_second < ranked[0].tokens_per_second / 3
    # The top row's overrides reproduce it through the ordinary config path.
    again = plan(Config.load(str(CONFIGS / "llama3.1_405b_128k.yaml"), candidate_of(ranked[0].config).overrides()),
                 cluster)
    assert again.tokens_per_second == pytest.approx(ranked[0].tokens_per_second)
    assert again.layout.cp == ranked[0].layout.cp > 1


@pytest.mark.parametrize("name,nodes,cp", [("llama3.1_405b_128k", 128, 8), ("llama3.1_70b_32k", 8, 2)])
def test_long_row_configs_fit_with_cp(name, nodes, cp, capsys):
    from megasft.commands.plan import main

    result = check_fits(plan(Config.load(str(CONFIGS / f"{name}.yaml")), make_cluster(nodes, 8, "h100-80gb")))
    assert result.layout.cp == cp and result.layout.cp_comm == "ring"
    assert result.worst.total < 0.85 * result.cluster.memory_bytes      # >= 10 GiB of headroom
    assert max(c.cp_seconds_per_micro_batch for c in result.comm) == 0.0
    # Without CP the same layout does not fit (or, for 405B, cannot be laid out on the cluster).
    flat = Config.load(str(CONFIGS / f"{name}.yaml"), ["parallel.cp=1"])
    assert not plan(flat, make_cluster(nodes // cp, 8, "h100-80gb")).fits
    assert main(["--config", str(CONFIGS / f"{name}.yaml"), "--nodes", str(nodes)]) == 0
    out = capsys.readouterr().out
    assert f"x cp {cp} (ring)" in out and "FITS" in out and f"context parallel  cp {cp} (ring)" in out
    assert f"{result.worst.total / GIB:.2f} GiB of 79.6" in out
