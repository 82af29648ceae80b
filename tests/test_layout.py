"""megasft.layout: every schedule, partition and layout rule once, with its error, table-driven.

Expected values are worked by hand from the papers' formulas (Narayanan et al. 2021 for schedules
and bubbles), not computed with the code under test.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from megasft.config import Config, ConfigError
from megasft.layout import (Layout, balanced_pipeline_layers, bubble_fraction, bubble_slots,
                            chunk_layer_counts, in_flight, kv_partition, resolve_schedule,
                            warmup_forwards)
from megasft.parallel_state import ParallelState, rank_grid


# ----------------------------------------------------------------------------- schedule choice
@pytest.mark.parametrize("requested, pp, v, expected", [
    ("auto", 1, 1, "no_pipeline"),
    ("1f1b", 1, 1, "no_pipeline"),           # one stage: nothing to pipeline
    ("auto", 4, 1, "1f1b"),
    ("auto", 4, 2, "interleaved"),
    ("interleaved", 4, 2, "interleaved"),
    ("all_forward_all_backward", 4, 1, "all_forward_all_backward"),
], ids=lambda x: str(x))
def test_schedule_choice(requested, pp, v, expected):
    assert resolve_schedule(requested, pp, v) == expected


@pytest.mark.parametrize("requested, pp, v, message", [
    ("interleaved", 4, 1, "needs virtual_pipeline_size > 1"),
    ("1f1b", 4, 2, "need the interleaved schedule"),
    ("all_forward_all_backward", 4, 2, "need the interleaved schedule"),
    ("gpipe", 4, 1, "not one of"),
    ("auto", 1, 2, "virtual_pipeline_size > 1 needs pp > 1"),
], ids=["interleaved-v1", "1f1b-v2", "afab-v2", "unknown", "virtual-without-pp"])
def test_schedule_choice_errors(requested, pp, v, message):
    with pytest.raises(ConfigError, match=message):
        resolve_schedule(requested, pp, v)


# ---------------------------------------------------------------------------- layer partition
def test_chunk_layer_counts_even_and_explicit():
    assert chunk_layer_counts(8, 4) == [2, 2, 2, 2]
    assert chunk_layer_counts(8, 2, [3, 5]) == [3, 5]


@pytest.mark.parametrize("layers, chunks, explicit, message", [
    (7, 2, None, r"num_layers=7 does not split evenly into pp\*virtual_pipeline_size=2 chunks; choose pp\*v in "
                 r"\[1, 7\] or give parallel.pipeline_layers explicitly \(e.g. \[3, 4\]\)"),
    (8, 2, [4, 3], r"pipeline_layers=\[4, 3\] must list 2 positive counts .* summing to num_layers=8"),
    (8, 2, [8, 0], r"must list 2 positive counts"),
    (8, 2, [2, 3, 3], r"must list 2 positive counts"),
], ids=["uneven", "wrong-sum", "empty-chunk", "wrong-length"])
def test_chunk_layer_counts_errors(layers, chunks, explicit, message):
    with pytest.raises(ConfigError, match=message):
        chunk_layer_counts(layers, chunks, explicit)


def test_balanced_pipeline_layers_trims_the_ends():
    assert balanced_pipeline_layers(126, 64) == [1] + [2] * 62 + [1]
    assert balanced_pipeline_layers(126, 16) == [7] + [8] * 14 + [7]
    assert balanced_pipeline_layers(32, 8) is None  # even split needs no list
    assert balanced_pipeline_layers(4, 8) is None   # would leave chunks empty


def test_rank_chunks_round_robin():
    # pp=2, v=2, 8 layers: chunks 0..3 of 2 layers; rank r owns chunks r and r + pp.
    layout = Layout.validated(_cfg(parallel={"pp": 2, "virtual_pipeline_size": 2}), 2)
    assert layout.rank_chunks(0) == [[0, 1], [4, 5]]
    assert layout.rank_chunks(1) == [[2, 3], [6, 7]]
    assert layout.rank_chunk_layers(1) == [2, 2]
    assert [layout.holds_embedding(0, i) for i in range(2)] == [True, False]
    assert [layout.holds_head(1, i) for i in range(2)] == [False, True]
    assert not layout.holds_head(0, 1)


# ------------------------------------------------------------------------------ kv heads over TP
@pytest.mark.parametrize("kv, tp, expected", [
    (8, 1, (8, 1)), (8, 4, (2, 1)), (4, 4, (1, 1)), (2, 4, (1, 2)), (1, 8, (1, 8)),
])
def test_kv_partition(kv, tp, expected):
    assert kv_partition(kv, tp) == expected


# ------------------------------------------------------------------- warm-up, in-flight, bubbles
@dataclass(frozen=True)
class Pipe:
    """A schedule on p stages with m micro-batches and v chunks, and the hand-worked counts of
    every rank: forwards before the first backward, and the peak held."""
    name: str
    schedule: str
    p: int
    m: int
    v: int
    warmup: list = field(default_factory=list)
    held: list = field(default_factory=list)


PIPES = [
    Pipe("none", "no_pipeline", 1, 4, 1, [0], [1]),
    Pipe("1f1b-p4-m8", "1f1b", 4, 8, 1, [3, 2, 1, 0], [4, 3, 2, 1]),         # p - r - 1, p - r
    Pipe("1f1b-p4-m2", "1f1b", 4, 2, 1, [2, 2, 1, 0], [2, 2, 2, 1]),         # capped by m
    Pipe("afab-p2-m3", "all_forward_all_backward", 2, 3, 1, [3, 3], [3, 3]),
    # 2(p - r - 1) + (v - 1) p: rank 0 of p=2, v=2 runs 2 + 2 = 4 forwards first.
    Pipe("interleaved-p2-m4-v2", "interleaved", 2, 4, 2, [4, 2], [5, 3]),
    Pipe("interleaved-p2-m2-v2", "interleaved", 2, 2, 2, [4, 4], [4, 4]),    # m == p: all first
    Pipe("interleaved-p4-m8-v2", "interleaved", 4, 8, 2, [10, 8, 6, 4], [11, 9, 7, 5]),
]


@pytest.mark.parametrize("pipe", PIPES, ids=lambda c: c.name)
def test_warmup_and_in_flight(pipe):
    assert [warmup_forwards(pipe.schedule, pipe.p, r, pipe.m, pipe.v) for r in range(pipe.p)] == pipe.warmup
    assert [in_flight(pipe.schedule, pipe.p, r, pipe.m, pipe.v) for r in range(pipe.p)] == pipe.held


def test_bubble_formulas():
    # Narayanan et al. 2021 Sec. 2.2: (p-1)/(m+p-1), and (p-1)/(v*m+p-1) interleaved.
    assert bubble_fraction("1f1b", 4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction("all_forward_all_backward", 4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction("interleaved", 4, 8, v=2) == pytest.approx(3 / 19)
    assert bubble_fraction("no_pipeline", 1, 8) == 0.0
    assert (bubble_slots("1f1b", 4), bubble_slots("interleaved", 4, 2), bubble_slots("no_pipeline", 1)) == (3.0, 1.5, 0.0)


# ------------------------------------------------------------------------------ Layout.resolve
def _cfg(model: dict | None = None, parallel: dict | None = None, data: dict | None = None,
         train: dict | None = None) -> Config:
    return Config.from_dict({
        "model": {"hidden_size": 64, "intermediate_size": 128, "num_layers": 8, "num_attention_heads": 4,
                  "num_kv_heads": 2, **(model or {})},
        "parallel": parallel or {},
        "data": {"seq_len": 16, "global_batch_tokens": 16 * 8, **(data or {})},
        "train": train or {},
    })


def test_resolved_layout_holds_every_derived_fact():
    layout = Layout.validated(_cfg(parallel={"tp": 4, "pp": 2, "sequence_parallel": True},
                                   data={"micro_batch_size": 2}), 16)
    assert (layout.tp, layout.pp, layout.dp, layout.v, layout.schedule) == (4, 2, 2, 1, "1f1b")
    assert layout.micro_batches == 8 // (2 * 2)
    assert layout.sequence_parallel and layout.activation_shape == (16 // 4, 2, 64)
    assert (layout.kv_heads_per_rank, layout.kv_copies) == (1, 2)   # 2 kv heads over tp=4
    assert layout.chunk_layers == (4, 4)
    assert layout.bubble_fraction == pytest.approx(1 / (2 + 1))
    assert layout.describe() == "tp 4 + SP x pp 2 (1f1b) x dp 2 = 16 ranks"
    plain = Layout.validated(_cfg(parallel={"sequence_parallel": True}), 1)
    assert not plain.sequence_parallel and plain.activation_shape == (16, 1, 64)   # SP needs tp > 1
    assert plain.schedule == "no_pipeline" and plain.dp == 1 and plain.micro_batches == 8


@dataclass(frozen=True)
class Bad:
    name: str
    world: int
    message: str
    model: dict = field(default_factory=dict)
    parallel: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)


BAD = [
    Bad("world-not-divisible", 6, r"world_size=6 is not divisible by tp\*pp=2\*2=4; run on a multiple of 4 "
        r"processes or choose tp\*pp in \[1, 2, 3, 6\]", parallel={"tp": 2, "pp": 2}),
    Bad("dp-mismatch", 4, r"parallel.dp=4 but world_size=4 / \(tp=2 \* pp=1\) = 2; set parallel.dp=2",
        parallel={"tp": 2, "dp": 4}),
    Bad("tp-heads", 3, r"tp=3 does not divide num_attention_heads=4; choose tp in \[1, 2, 4\]", parallel={"tp": 3}),
    Bad("tp-kv-heads", 4, r"tp=4 and num_kv_heads=3: one must divide the other",
        model={"num_attention_heads": 12, "num_kv_heads": 3, "hidden_size": 96}, parallel={"tp": 4}),
    Bad("tp-mlp", 2, r"tp=2 does not divide intermediate_size=129", model={"intermediate_size": 129},
        parallel={"tp": 2}),
    Bad("sp-seq-len", 4, r"sequence_parallel needs seq_len divisible by tp: seq_len=18, tp=4; use seq_len=20",
        parallel={"tp": 4, "sequence_parallel": True}, data={"seq_len": 18, "global_batch_tokens": 18 * 8}),
    Bad("rows-dp", 3, r"8 rows per step \(global_batch_tokens/seq_len\) do not split into dp=3 x "
        r"micro_batch_size=1; use global_batch_tokens=96", model={"num_attention_heads": 4}),
    Bad("interleaved-m", 2, r"micro-batches per step \(3\) to be a multiple of pp=2; use global_batch_tokens=32",
        parallel={"pp": 2, "virtual_pipeline_size": 2}, data={"global_batch_tokens": 16 * 3}),
    Bad("schedule", 2, r"needs virtual_pipeline_size > 1", parallel={"pp": 2, "pipeline_schedule": "interleaved"}),
    Bad("uneven-layers", 3, r"num_layers=8 does not split evenly", parallel={"pp": 3},
        data={"global_batch_tokens": 16 * 3}),
    Bad("fp8-gemm", 2, r"train.fp8=hybrid: intermediate_size / tp \(tp=2\) = 40 is not a multiple of 16",
        model={"intermediate_size": 80}, parallel={"tp": 2}, train={"fp8": "hybrid"}),
]


@pytest.mark.parametrize("bad", BAD, ids=lambda b: b.name)
def test_layout_errors_say_how_to_fix(bad):
    cfg = _cfg(bad.model, bad.parallel, bad.data, bad.train)
    with pytest.raises(ConfigError, match=bad.message):
        Layout.validated(cfg, bad.world)


def test_validate_does_not_touch_the_parallel_fields():
    cfg = _cfg(parallel={"tp": 2})
    Layout.validated(cfg, 4)
    assert cfg.parallel.dp is None   # dp lives in the Layout, the config stays as written


# ------------------------------------------------------------------------------ rank grid
def test_rank_grid_matches_megatron_worked_example():
    grid = rank_grid(16, tp=2, pp=4)
    assert grid["tp"][:3] == [[0, 1], [2, 3], [4, 5]]
    assert grid["dp"][:4] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert grid["pp"] == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    assert grid["embedding"] == [[0, 12], [1, 13], [2, 14], [3, 15]]


def test_expert_parallel_groups_fold_into_dp_x_cp():
    """EP groups are ep consecutive ranks of a stage's dp x cp ranks, CP fastest (Megatron-Core's
    folding); expert_grad groups their ranks of equal ep rank; ParallelState.ep_rank is the place
    in the EP group and first_expert_replica marks the first EP group."""
    grid = rank_grid(8, tp=1, pp=2, ep=2)                  # dp 4 per stage: EP over dp ranks
    assert grid["ep"] == [[0, 1], [2, 3], [4, 5], [6, 7]] and grid["expert_grad"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    grid = rank_grid(8, tp=1, pp=1, cp=2, ep=2)            # dp 4: the EP groups are the CP groups
    assert grid["ep"] == grid["cp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert grid["expert_grad"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    for tp, cp, ep in [(2, 2, 4), (1, 2, 4), (2, 4, 2), (1, 1, 4)]:
        dp = 8 // (tp * cp)
        grid = rank_grid(8, tp=tp, pp=1, cp=cp, ep=ep)
        assert sorted(r for g in grid["ep"] for r in g) == list(range(8))
        assert all(len(g) == ep for g in grid["ep"]) and all(len(g) == dp * cp // ep for g in grid["expert_grad"])
        for group in grid["ep"]:
            for place, r in enumerate(group):
                ps = ParallelState(rank=r, world_size=8, tp=tp, pp=1, dp=dp, tp_rank=r % tp, pp_rank=0,
                                   dp_rank=r // (tp * cp), cp=cp, cp_rank=r // tp % cp, ep=ep)
                assert ps.ep_rank == place and ps.first_expert_replica == (group in grid["ep"][:tp])
    with pytest.raises(ConfigError, match=r"parallel.ep=8 must divide dp\*cp=2\*2=4 .* choose ep in \[1, 2, 4\]"):
        rank_grid(8, tp=2, pp=1, cp=2, ep=8)


def test_invalid_world_size_names_the_fix():
    with pytest.raises(ConfigError, match=r"world_size=4 is not divisible by tp\*pp=3\*1=3"):
        rank_grid(4, tp=3, pp=1)
