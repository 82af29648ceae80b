"""ZBV, the V-shaped zero-bubble schedule (megasft.pipeline.zero_bubble_v) and the V placement
of its chunks (megasft.layout).

The pass orders are checked as data against a dependency graph written out here from the V's
data flow (every pass once per micro-batch and chunk, the graph of rank orders plus data
dependencies acyclic, bubble and memory as the paper's ZB-V claims). Optimizer steps through the
schedule are checked against plain PyTorch (transformers + torch AdamW, as
tests/test_pipeline_training.py) at PP2, PP4 with tied embeddings (both copies on rank 0),
TP2xSPxPP2 with full recompute and PP2xDP2 ZeRO-1 with overlapped grad reduce / param gather, the
fused chunked loss and tied embeddings; and a checkpoint saved under zbv loads under 1f1b and back.
"""
from __future__ import annotations

from collections import deque

import pytest
import torch

from megasft.checkpoint.sharded import Checkpointer
from megasft.config import Config
from megasft.errors import ConfigError
from megasft.hf.names import assemble_canonical
from megasft.layout import Layout, bubble_fraction, bubble_slots, chunk_ranks, in_flight, resolve_schedule
from megasft.parallel_state import ParallelState
from megasft.pipeline.zero_bubble import B_PASS, F_PASS, W_PASS, zero_bubble_store
from megasft.pipeline.zero_bubble_v import (greedy_orders, paper_orders, simulated_bubble_v, zbv_orders,
                                            zbv_timeline_length)
from megasft.training.loop import Trainer
from tests.layouts import (Case, assert_losses_match, assert_pieces_match, check_case, sft_config,
                           tied_and_untied_references, train_cases, train_this_rank, weight_pieces)
from tests.multiproc import run_ranks
from tests.oracle import select_rows
from tests.test_pipeline_zero_bubble import FIELDS, RUN, case_fields
from tests.test_pipeline_zero_bubble import global_batches as zero_bubble_batches


# ------------------------------------------------------------------------------ the orders
def _v_dependencies(p: int):
    """The V's data flow on global chunks 0..2p-1 (chunk c < p on rank c, else 2p-1-c): the
    forward of chunk c needs chunk c-1's, its B needs its own forward and chunk c+1's B, its W its B."""
    def needs(kind, c, k):
        if kind == F_PASS:
            return [] if c == 0 else [(F_PASS, c - 1, k)]
        if kind == B_PASS:
            return [(F_PASS, c, k)] + ([] if c == 2 * p - 1 else [(B_PASS, c + 1, k)])
        return [(B_PASS, c, k)]
    return needs


def _acyclic(orders_global, needs) -> bool:
    """Kahn's algorithm over rank-order edges plus data edges: whether some execution exists."""
    edges, indegree = {}, {}
    for order in orders_global:
        for i, pass_ in enumerate(order):
            indegree.setdefault(pass_, 0)
            before = ([order[i - 1]] if i else []) + needs(*pass_)
            for dep in before:
                edges.setdefault(dep, []).append(pass_)
                indegree[pass_] += 1
    ready = deque(x for x, n in indegree.items() if n == 0)
    seen = 0
    while ready:
        x = ready.popleft()
        seen += 1
        for y in edges.get(x, []):
            indegree[y] -= 1
            if indegree[y] == 0:
                ready.append(y)
    return seen == len(indegree)


@pytest.mark.parametrize("build", [paper_orders, greedy_orders], ids=["paper", "greedy"])
@pytest.mark.parametrize("p", [2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 8, 16])
def test_orders_run_every_pass_once_and_respect_the_v(build, p, m):
    orders = build(p, m)
    ranks = chunk_ranks("zbv", p, 2)
    as_global = []
    for r, order in enumerate(orders):
        mine = [c for c in range(2 * p) if ranks[c] == r]
        assert mine == [r, 2 * p - 1 - r]
        for local, c in enumerate(mine):
            for kind in (F_PASS, B_PASS, W_PASS):   # each once per micro-batch, in micro-batch order
                assert [k for x, chunk, k in order if (x, chunk) == (kind, local)] == list(range(m)), \
                    f"rank {r} chunk {c}: {kind} passes"
        held = peak = 0
        for kind, _, _ in order:
            held += 1 if kind == F_PASS else -1 if kind == W_PASS else 0
            peak = max(peak, held)
        assert peak <= 2 * p    # 2p half-stage chunks: the p micro-batches 1F1B's first stage holds
        as_global.append([(kind, mine[local], k) for kind, local, k in order])
    assert sum(map(len, as_global)) == 6 * p * m
    assert _acyclic(as_global, _v_dependencies(p)), "the orders wait on each other: blocking receives would hang"
    # The last rank cannot start before the first micro-batch's p - 1 chunk forwards and is busy
    # 6m units after: nothing beats 6m + p - 1. The greedy orders reach it for m >= p, the
    # paper's for m >= 1.5p; zbv_orders takes the shorter.
    finish = zbv_timeline_length(orders, p)
    assert finish >= 6 * m + p - 1
    if m >= (p if build is greedy_orders else 1.5 * p):
        assert finish == 6 * m + p - 1
    chosen = zbv_timeline_length(zbv_orders(p, m), p)
    assert chosen <= finish and (m < p or chosen == 6 * m + p - 1)


@pytest.mark.parametrize("p, m", [(2, 2), (2, 8), (4, 4), (4, 8), (4, 16), (8, 8), (8, 32)])
def test_bubble_is_the_last_stages_start_only(p, m):
    """Qi et al. 2023, Sec. 6 (F = B = W): ZB-V leaves (p-1) chunk forwards of idle time per step,
    where 1F1B leaves (p-1)(F+B+W) = 6(p-1) of them; 1F1B's bubble is (p-1)/(m+p-1)."""
    assert simulated_bubble_v(p, m) == pytest.approx((p - 1) / (6 * m + p - 1))
    assert bubble_fraction("zbv", p, m, 2) == simulated_bubble_v(p, m)
    bubble = simulated_bubble_v(p, m)
    assert bubble * 6 * m / (1 - bubble) == pytest.approx(p - 1)      # idle chunk-pass units per rank
    assert bubble_slots("zbv", p, 2) == pytest.approx(bubble_slots("1f1b", p) / 6)
    assert [in_flight("zbv", p, r, m, 2) for r in range(p)] == [2 * p] * p   # every rank: 1F1B's first stage


# ------------------------------------------------------------------------------ layout and config
def _cfg(num_layers: int = 8, **parallel) -> Config:
    return Config.from_dict({"model": {"preset": "tiny", "num_layers": num_layers},
                             "data": {"seq_len": 64, "global_batch_tokens": 64 * 8},
                             "parallel": {"pp": 4, "pipeline_schedule": "zbv", "virtual_pipeline_size": 2,
                                          **parallel}}).validate()


def test_zbv_needs_two_chunks_per_rank():
    assert resolve_schedule("zbv", 4, 2) == "zbv"
    for v in (1, 3):
        with pytest.raises(ConfigError, match=f"exactly two model chunks per rank in a V, but "
                                              f"virtual_pipeline_size={v}; set parallel.virtual_pipeline_size=2"):
            Layout.resolve(_cfg(virtual_pipeline_size=v), 4)


def test_v_placement_puts_embedding_and_head_on_rank_zero():
    layout = Layout.resolve(_cfg(), 4)   # 8 chunks of 1 layer: rank r holds chunks r and 7 - r
    assert [layout.rank_chunks(r) for r in range(4)] == [[[0], [7]], [[1], [6]], [[2], [5]], [[3], [4]]]
    assert [layout.chunk_index(r, i) for r in range(4) for i in range(2)] == [0, 7, 1, 6, 2, 5, 3, 4]
    assert [layout.holds_embedding(0, i) for i in range(2)] == [True, False]
    assert [layout.holds_head(0, i) for i in range(2)] == [False, True]
    assert not any(layout.holds_head(r, i) or layout.holds_embedding(r, i) for r in (1, 2, 3) for i in range(2))
    assert layout.head_rank == 0 and Layout.resolve(_cfg(pipeline_schedule="interleaved"), 4).head_rank == 3
    uneven = Layout.resolve(_cfg(num_layers=10, pipeline_layers=[1, 1, 1, 3, 1, 1, 1, 1]), 4)
    assert uneven.rank_chunks(3) == [[3, 4, 5], [6]] and uneven.rank_chunk_layers(0) == [1, 1]   # chunks 3, 4; 0, 7


def test_planner_reads_the_v():
    """Per micro-batch a rank sends one message per chunk boundary with another rank: rank 0 the
    activation of chunk 0 and the gradient of chunk 7's input; rank 3 keeps the turn (3 -> 4)
    local. The tied embedding's copies are both on rank 0: no embedding-group traffic."""
    from megasft.planner.comm import pp_messages_per_micro_batch, tied_embedding_bytes
    from megasft.planner.memory import rank_parameters

    cfg = _cfg(dp=1)
    cfg.model.tie_embeddings = True
    assert [pp_messages_per_micro_batch(cfg, r) for r in range(4)] == [2, 4, 4, 2]
    assert [tied_embedding_bytes(cfg, r) for r in range(4)] == [0.0] * 4
    stage0, stage3 = rank_parameters(cfg, 0), rank_parameters(cfg, 3)
    assert stage0.embedding == stage0.lm_head > 0 and stage0.final_norm == cfg.model.hidden_size
    assert stage3.embedding == stage3.lm_head == stage3.final_norm == 0
    cfg.parallel.pipeline_schedule = "interleaved"
    assert [pp_messages_per_micro_batch(cfg, r) for r in range(4)] == [3, 4, 4, 3]


def test_zero_bubble_store_refusals():
    cfg = _cfg()
    with pytest.raises(ConfigError, match="zbv is verified on the gloo backend only"):
        zero_bubble_store("zbv", cfg, ParallelState.single("cuda"), [])
    cfg.train.fp8 = "hybrid"
    with pytest.raises(ConfigError, match="zbv splits the F.linear backward"):
        zero_bubble_store("zbv", cfg, ParallelState.single(), [])


# ------------------------------------------------------------------------------ training
FIRST, LAST = (0, 1, 2, 3), (4, 5, 6, 7)
ZBV = dict(virtual=2, schedule="zbv")
CASES = [
    Case("pp2-zbv", (0, 1), pp=2, **ZBV),
    Case("pp4-zbv-tied", LAST, pp=4, tied=True, **ZBV),
    Case("tp2-sp-pp2-zbv-recompute", FIRST, tp=2, pp=2, sequence_parallel=True, **ZBV),
    Case("pp2-dp2-zero1-zbv-tied-overlap-fused-loss", LAST, pp=2, tied=True, fast=True, **ZBV),
]
RESHARD = Case("pp2-zbv-tied-checkpoint", (0, 1), pp=2, tied=True, **ZBV)   # saved under zbv, loaded under 1f1b


def global_batches() -> list[dict]:
    return zero_bubble_batches(seed=60)


def _checkpoint_round_trip(hf_dir: str, root: str) -> dict:
    """On ranks 0-1 (PP2, tied): step 1 under zbv, saved; loaded under 1f1b (weights must be the
    saved ones), step 2 there, saved; loaded back under zbv. Returns what the test compares."""
    ps = ParallelState.build(1, 2, ranks=list(RESHARD.ranks))
    if ps is None:
        return {}
    batches = global_batches()

    def trainer(schedule: str, load: str = None) -> tuple[Trainer, Checkpointer]:
        case = Case(RESHARD.name, RESHARD.ranks, pp=2, tied=True, schedule=schedule,
                    virtual=2 if schedule == "zbv" else 1)
        cfg = sft_config(case_fields(case), hf_dir, case, RUN)
        cfg.checkpoint.dir = f"{root}/{schedule}"
        t, ckpt = Trainer(cfg, ps, log=False), Checkpointer(cfg, ps)
        if load:
            ckpt.load(load, t, None)
        return t, ckpt

    zbv, zbv_ckpt = trainer("zbv")
    losses = [o.loss for o in train_this_rank(zbv, batches[:1], 1)]
    saved_zbv = zbv_ckpt.save(zbv, None)
    one, one_ckpt = trainer("1f1b", load=str(saved_zbv))
    loaded_1f1b = weight_pieces(one)
    losses += [o.loss for o in train_this_rank(one, batches[1:], 1)]
    saved_1f1b = one_ckpt.save(one, None)
    back, _ = trainer("zbv", load=str(saved_1f1b))
    # Evaluation (forward only) of the same weights under both schedules.
    rows = [select_rows(batches[0], [i]) for i in range(RUN.rows)]
    evaluated = [t.global_loss_sum(t.run_schedule(rows, forward_only=True)[0].stats) for t in (one, back)]
    return {"losses": losses, "step1": weight_pieces(zbv), "loaded_1f1b": loaded_1f1b,
            "weights": weight_pieces(one), "loaded_zbv": weight_pieces(back), "step": back.step,
            "evaluated": evaluated}


def _rank_main(hf_dirs: dict, root: str) -> dict:
    results = train_cases(CASES, RUN, case_fields, lambda case: hf_dirs[case.tied], global_batches())
    results["checkpoint"] = _checkpoint_round_trip(hf_dirs[True], root)
    return results


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    refs, dirs = tied_and_untied_references(tmp_path_factory.mktemp("hf"), FIELDS, global_batches(), RUN, seed=13)
    return refs, run_ranks(_rank_main, 8, dirs, str(tmp_path_factory.mktemp("ckpt")), timeout=900)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_zbv_train_steps_match_plain_pytorch(trained, case):
    refs, per_rank = trained
    ref_losses, ref_weights = refs[case.tied]
    check_case(case, per_rank, ref_losses, ref_weights, RUN)
    if case.tied:   # both copies on pp rank 0, bit-identical after the steps; none elsewhere
        for out in (r[case.name] for r in per_rank if case.name in r):
            copies = out["tied"]
            assert len(copies) == (2 if out["pp_rank"] == 0 else 0), f"{case}: tied copies on pp rank {out['pp_rank']}"
            assert not copies or torch.equal(copies[0], copies[1]), f"{case}: tied copies differ at {out['coords']}"


def test_checkpoint_saved_under_zbv_loads_under_1f1b_and_back(trained):
    refs, per_rank = trained
    ref_losses, ref_weights = refs[True]
    outs = [r["checkpoint"] for r in per_rank if r["checkpoint"]]
    assert len(outs) == 2 and all(out["step"] == 2 for out in outs)

    def every(key: str) -> list[tuple]:
        return [piece for out in outs for piece in out[key]]

    # Loading is a copy: the 1f1b stages hold exactly what the zbv stages saved, and back, though
    # each rank holds other layers (zbv rank 0: chunks 0 and 3; 1f1b rank 0: the first half).
    _assert_same_weights(every("step1"), every("loaded_1f1b"), "zbv -> 1f1b")
    _assert_same_weights(every("weights"), every("loaded_zbv"), "1f1b -> zbv")
    # Step 2 under 1f1b continued step 1's optimizer state (Adam moments, the LR schedule's step).
    seen = set()
    for out in outs:
        # zbv's forward-only run sums the same token losses as 1f1b's (~200 tokens of loss ~7:
        # fp32 sums in another order agree to ~1e-6 relative).
        one_f_one_b, zbv = out["evaluated"]
        assert zbv == pytest.approx(one_f_one_b, rel=1e-6) and one_f_one_b > 0
        assert_losses_match(out["losses"], ref_losses, RESHARD.name)
        seen |= assert_pieces_match(out["weights"], ref_weights, RESHARD.name, RUN)
    assert seen == set(ref_weights)


def _assert_same_weights(saved: list[tuple], loaded: list[tuple], what: str) -> None:
    """Every loaded piece (tied and replicated copies included) equals its slice of the saved model."""
    full = assemble_canonical(saved)
    assert {name for name, *_ in loaded} == set(full), what
    for name, dim, offset, piece in loaded:
        expected = full[name] if dim < 0 else full[name].narrow(dim, offset, piece.shape[dim])
        assert torch.equal(piece, expected), f"{what}: {name}"
