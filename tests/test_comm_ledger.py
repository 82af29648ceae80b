"""The communication ledger (megasft.collectives) measures, per group kind, the bytes a step
really sends; they must equal the analytic minimum for the layout — ring all-reduce 2(n-1)/n,
reduce-scatter / all-gather (n-1)/n of the buffer, p2p one activation or gradient per chunk
boundary — computed here from the model's dimensions, and the planner's prediction
(megasft.planner.comm.predicted_bytes) for the same config.

Tolerance 5 %: what the analytic count leaves out is a few scalar all-reduces (token counts,
losses, norms: tens of bytes) and the ZeRO-1 buffer padding (each bucket rounded up to dp * 64
elements: < 3 % of the tiny model's buffer with the small buckets used here). A missing or
doubled collective changes a kind's bytes by far more (one layer's TP traffic is ~40 % of it).
"""
from __future__ import annotations

import pytest

from megasft import collectives
from megasft.config import Config
from megasft.parallel_state import ParallelState
from megasft.planner.comm import predicted_bytes
from megasft.planner.pinned import pin
from megasft.training.loop import Trainer
from tests.multiproc import run_ranks
from tests.oracle import packed_batch, select_rows

SEQ, ROWS, H, FFN, LAYERS, HEADS, KV, D, VOCAB = 32, 4, 64, 128, 2, 4, 2, 16, 256
CASES = {   # name: (ranks, tp, pp, sequence parallel, overlap, cp, cp_comm, recompute)
    "tp2_pp2_dp2_zero1": (8, 2, 2, False, False, 1, "ring", "none"),
    "tp2_dp2_zero1_sp_overlap": (4, 2, 1, True, True, 1, "ring", "none"),
    "tp2_cp2_dp2_zero1_sp_ring": (8, 2, 1, True, False, 2, "ring", "none"),
    "cp2_dp2_zero1_a2a": (4, 1, 1, False, False, 2, "a2a", "none"),
    "cp2_a2a_recompute_selective": (2, 1, 1, False, False, 2, "a2a", "selective"),
    "cp2_ring_recompute_full": (2, 1, 1, False, False, 2, "ring", "full"),
}
# Documents of multiples of 2*cp = 4 tokens (the loader's CP padding), with a padding tail.
CP_ROWS = [[20, 12], [32], [8, 8, 16], [28]]


def _config(tp: int, pp: int, sp: bool, overlap: bool, cp: int = 1, cp_comm: str = "ring",
            recompute: str = "none") -> Config:
    return Config.from_dict({
        "model": {"vocab_size": VOCAB, "hidden_size": H, "intermediate_size": FFN, "num_layers": LAYERS,
                  "num_attention_heads": HEADS, "num_kv_heads": KV, "max_position_embeddings": 64,
                  "make_vocab_size_divisible_by": 8, "recompute": recompute},
        "parallel": {"tp": tp, "pp": pp, "cp": cp, "cp_comm": cp_comm, "sequence_parallel": sp,
                     "distributed_optimizer": True,
                     "overlap_grad_reduce": overlap, "overlap_param_gather": overlap, "bucket_size_mb": 0.05},
        "data": {"seq_len": SEQ, "global_batch_tokens": SEQ * ROWS, "micro_batch_size": 1},
        "train": {"steps": 3, "precision": "fp32"},
    }).validate()


def _measure(name: str) -> dict:
    world, tp, pp, sp, overlap, cp, comm, recompute = CASES[name]
    ps = ParallelState.build(tp, pp, ranks=list(range(world)), cp=cp)
    if ps is None:
        return {}
    cfg = _config(tp, pp, sp, overlap, cp, comm, recompute)
    trainer = Trainer(cfg, ps, log=False)
    batch = packed_batch(CP_ROWS if cp > 1 else [[20, 12], [32], [9, 9, 14], [30]], SEQ, VOCAB, seed=3)
    per_rank = ROWS // ps.dp
    mine = list(range(ps.dp_rank * per_rank, (ps.dp_rank + 1) * per_rank))
    micro = [select_rows(batch, [r]) for r in mine]
    trainer.train_step(micro)             # the first step: nothing in flight from before
    collectives.LEDGER.start()
    trainer.train_step(micro)
    report = collectives.LEDGER.stop()
    trainer.optimizer.finish_param_sync()
    return {"pp_rank": ps.pp_rank, "report": report, "dp": ps.dp,
            "predicted": predicted_bytes(pin(cfg, ps.world_size), ps.pp_rank)}


def _ranks(names: list[str]) -> dict:
    return {name: _measure(name) for name in names}


def analytic(tp: int, pp: int, dp: int, sp: bool, pp_rank: int, cp: int = 1, cp_comm: str = "ring",
             recompute: str = "none") -> dict:
    """Bytes a rank of stage pp_rank sends in one step, from the dimensions alone (fp32)."""
    micro_batches, first, last = ROWS // dp, pp_rank == 0, pp_rank == pp - 1
    layers = LAYERS // pp
    ring = (tp - 1) / tp
    s = SEQ // cp                                         # this rank's tokens of a row
    act = s * H * 4                                       # one micro-batch's [s/cp, 1, h] activation
    # Per layer: forward 2 all-reduces (or 2 all-gathers + 2 reduce-scatters), backward the same.
    tp_mb = layers * 8 * ring * act + (first + last) * 2 * ring * act
    tp_mb += last * 3 * 2 * ring * s * 4                 # cross-entropy max / target / sum-exp
    # CP per layer: ring forward sends cp-1 K/V blocks, backward the K/V again plus cp fp32 dK/dV
    # hops (the last one home); a2a forward 4 all-to-alls (q, k, v, out) of (cp-1)/cp, backward 4.
    # Recompute resends the forward's — all of it, except a2a's output all-to-all under selective
    # (torch's checkpoint stops once backward has its tensors, and nothing saved follows it).
    # Full recompute also reruns the layer's forward TP collectives.
    kv = 2 * s * (KV // tp) * D * 4
    q_heads, kv_heads = HEADS // tp, KV // tp
    if cp == 1:
        cp_layer = 0.0
    elif cp_comm == "ring":
        cp_layer = (cp - 1) * kv * (1 + (recompute != "none")) + (cp - 1) * kv + cp * kv
    else:
        call = (cp - 1) / cp * s * D * 4                  # one head's all-to-all
        again = {"none": 0, "selective": q_heads + 2 * kv_heads, "full": 2 * q_heads + 2 * kv_heads}[recompute]
        cp_layer = call * (2 * (2 * q_heads + 2 * kv_heads) + again)
    norms = (layers * 2 + last) * H if sp else 0          # SP: partial norm gradients summed over TP
    vocab = VOCAB // tp
    per_layer = H * (HEADS * D // tp) * 2 + 2 * H * (KV * D // tp) + 3 * H * (FFN // tp) + 2 * H
    params = layers * per_layer + first * vocab * H + last * (vocab * H + H)
    dp_ring = (dp * cp - 1) / (dp * cp)                  # ZeRO-1 over the dp x cp ranks
    return {"tp": micro_batches * tp_mb + 2 * ring * norms * 4,
            "pp": micro_batches * (act / (tp if sp else 1)) if pp > 1 else 0.0,
            "dp": dp_ring * params * 4 * 2,              # fp32 grad reduce-scatter + fp32 weight all-gather
            "cp": micro_batches * layers * cp_layer,
            "embedding": 0.0}


@pytest.fixture(scope="module")
def measured():
    per_rank = run_ranks(_ranks, 8, list(CASES), timeout=300)
    return {name: [r[name] for r in per_rank if r.get(name)] for name in CASES}


@pytest.mark.parametrize("name", list(CASES))
def test_measured_bytes_equal_analytic_and_planner(measured, name):
    world, tp, pp, sp, _, cp, comm, recompute = CASES[name]
    outs = measured[name]
    assert len(outs) == world
    for out in outs:
        expected = analytic(tp, pp, out["dp"], sp, out["pp_rank"], cp, comm, recompute)
        for kind, want in expected.items():
            got = collectives.sent_bytes(out["report"], kind)
            planned = out["predicted"][kind]
            where = f"{name} pp_rank {out['pp_rank']} {kind}"
            assert got == pytest.approx(want, rel=0.05, abs=64), f"{where}: measured {got:.0f} vs analytic {want:.0f}"
            assert planned == pytest.approx(want, rel=0.05, abs=64), f"{where}: planner {planned:.0f} vs analytic {want:.0f}"


def test_ledger_books_each_operator(measured):
    """The breakdown names the operators the layout runs: ZeRO-1 reduce-scatters and all-gathers
    over DP, SP all-gathers / reduce-scatters over TP, sends and receives over PP, and blocked
    time for the p2p waits."""
    pp_report = measured["tp2_pp2_dp2_zero1"][0]["report"]
    assert {"reduce_scatter", "all_gather"} <= set(pp_report["dp"])
    assert {"send", "recv"} <= set(pp_report["pp"]) and pp_report["pp"]["send"]["seconds"] >= 0
    assert "all_reduce" in pp_report["tp"] and "all_gather" not in pp_report["tp"]
    sp_report = measured["tp2_dp2_zero1_sp_overlap"][0]["report"]
    assert {"all_gather", "reduce_scatter"} <= set(sp_report["tp"])
