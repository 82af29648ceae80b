"""Pipeline schedules vs transformers, on real gloo processes.

For each layout the transformers model runs every document of every micro-batch alone (the
reference: one loss over the global batch, one backward). megasft builds this rank's chunks with
build_model, loads the same weights, and runs the schedule over its data-parallel share of the
micro-batches; after the replicated/tied/data-parallel gradient syncs, every gradient piece each
rank holds must equal the matching slice of the reference gradient, and the last stage's summed
loss must equal the reference loss. One spawned group per world size checks many layouts.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import pytest
import torch
import torch.distributed as dist

from megasft.config import Config, ModelConfig, ParallelConfig, TrainConfig
from megasft.hf.names import canonical_pieces, load_hf_state_dict
from megasft.layout import in_flight
from megasft.model.build import build_model
from megasft.parallel_state import ParallelState
from megasft.pipeline.schedules import forward_backward
from megasft.pipeline.tied import sync_tied_embedding_grads, tied_copies
from megasft.tensor_parallel.layers import sync_replicated_grads
from tests.multiproc import run_ranks
from tests.oracle import hf_model, model_batch, packed_batch, reference_loss, tiny_fields

SEQ = 16
ROW_LAYOUTS = [[[5, 7, 4], [9, 3]], [[16], [6, 6]], [[3, 4, 5], [11, 5]], [[8, 8], [2, 9]]]
FIELDS = dict(hidden_size=64, intermediate_size=128, num_layers=8, num_attention_heads=4,
              num_kv_heads=2)

@dataclass(frozen=True)
class Pipe:
    """One schedule layout: tp x pp (x the rest of the world as dp), v chunks per rank, m
    micro-batches per DP rank, optional SP and model overrides."""

    name: str
    tp: int
    pp: int
    v: int
    schedule: str
    m: int
    sp: bool = False
    overrides: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return self.name


CASES_4 = [
    Pipe("pp2-dp2-1f1b", 1, 2, 1, "1f1b", 3),
    Pipe("pp2-dp2-afab", 1, 2, 1, "all_forward_all_backward", 2),
    Pipe("pp2-dp2-interleaved-m2", 1, 2, 2, "interleaved", 2),
    Pipe("pp2-dp2-interleaved-m6", 1, 2, 2, "interleaved", 6),
    Pipe("pp2-dp2-tied", 1, 2, 1, "1f1b", 3, overrides=dict(tie_embeddings=True)),
    Pipe("pp2-dp2-interleaved-tied", 1, 2, 2, "interleaved", 4, overrides=dict(tie_embeddings=True)),
    Pipe("pp4-1f1b-m3", 1, 4, 1, "1f1b", 3),
    Pipe("pp4-1f1b-m6", 1, 4, 1, "1f1b", 6),
    Pipe("pp4-interleaved-m4", 1, 4, 2, "interleaved", 4),
    Pipe("pp4-interleaved-m8", 1, 4, 2, "interleaved", 8),
    Pipe("tp2-sp-pp2-1f1b", 2, 2, 1, "1f1b", 3, sp=True),
    Pipe("tp2-sp-pp2-interleaved-tied", 2, 2, 2, "interleaved", 4, sp=True, overrides=dict(tie_embeddings=True)),
]
CASES_8 = [
    Pipe("tp2-pp2-dp2-1f1b", 2, 2, 1, "1f1b", 3),
    Pipe("tp2-sp-pp2-dp2-interleaved", 2, 2, 2, "interleaved", 4, sp=True),
]


def micro_batches(count: int, vocab: int) -> list[dict]:
    return [packed_batch(ROW_LAYOUTS[i % len(ROW_LAYOUTS)], SEQ, vocab, seed=100 + i) for i in range(count)]


def reference(fields: dict, batches: list[dict]):
    """(loss sum, trained tokens, {hf name: grad}) of the transformers model on all micro-batches."""
    hf = hf_model(fields, seed=1)
    total, count = 0.0, 0
    for batch in batches:
        loss_sum, n, _ = reference_loss(hf, batch)
        total, count = total + loss_sum, count + int(n)
    (total / count).backward()
    return hf, float(total), count, {name: p.grad for name, p in hf.named_parameters()}


def build_chunks(fields: dict, tp: int, pp: int, v: int, sp: bool, hf):
    cfg = Config(model=ModelConfig(**fields), train=TrainConfig(precision="fp32"),
                 parallel=ParallelConfig(tp=tp, pp=pp, virtual_pipeline_size=v, sequence_parallel=sp))
    ps = ParallelState.build(tp, pp)
    chunks = build_model(cfg, ps)
    for chunk in chunks:
        load_hf_state_dict(chunk, hf.state_dict())
    return ps, chunks


def trainer_forward_step(chunks, loss_scale: float):
    """The trainer's forward_step (megasft.training.loop): loss scaled by 1/global tokens."""
    def step(chunk_index, batch, input_tensor):
        out = chunks[chunk_index](batch, input_tensor)
        if not chunks[chunk_index].post_process:
            return out
        loss_sum, count = out
        return loss_sum * loss_scale, {"loss_sum": loss_sum.detach(), "tokens": count}
    return step


def sync_grads(chunks, ps) -> None:
    """What the optimizer's grad sync does without it: replicated, tied, then DP sums."""
    params = [p for c in chunks for p in c.parameters()]
    sync_replicated_grads(params, lambda p: p.grad)
    sync_tied_embedding_grads(params, ps.embedding_group, lambda p: p.grad)
    if ps.dp_group is not None:
        for p in params:
            dist.all_reduce(p.grad, group=ps.dp_group)


def _run_case(case: Pipe) -> dict:
    """This rank's side of one layout: the gradient pieces that differ from the reference (checked
    here, reported to the parent), the schedule's stats and its peak in-flight count."""
    tp, pp, v, schedule, m, sp = case.tp, case.pp, case.v, case.schedule, case.m, case.sp
    fields = tiny_fields(**{**FIELDS, **case.overrides})
    dp = dist.get_world_size() // (tp * pp)
    batches = micro_batches(m * dp, fields["vocab_size"])
    hf, ref_sum, ref_count, ref_grads = reference(fields, batches)
    ps, chunks = build_chunks(fields, tp, pp, v, sp, hf)
    mine = [model_batch(b) for b in batches[ps.dp_rank * m:(ps.dp_rank + 1) * m]]
    shape = (SEQ // tp if sp else SEQ, 2, fields["hidden_size"])
    kwargs = dict(num_chunks=v, tensor_shape=shape, dtype=torch.float32, schedule=schedule)

    evaluated = forward_backward(trainer_forward_step(chunks, 1.0 / ref_count), mine, ps,
                                 forward_only=True, **kwargs)
    forward_only_grads = any(p.grad is not None for c in chunks for p in c.parameters())
    result = forward_backward(trainer_forward_step(chunks, 1.0 / ref_count), mine, ps, **kwargs)
    sync_grads(chunks, ps)

    checked, wrong = set(), []
    for chunk in chunks:
        for name, dim, offset, piece in canonical_pieces(chunk, grads=True):
            ref = ref_grads[name] if dim < 0 else ref_grads[name].narrow(dim, offset, piece.shape[dim])
            # fp32 gradients summed in another order (micro-batches, stages, TP/DP sums).
            if not torch.allclose(piece, ref, rtol=1e-5, atol=2e-6):
                wrong.append(f"grad of {name} (dim {dim}, offset {offset}): max diff "
                             f"{float((piece - ref).abs().max()):.3g}")
            checked.add(name)
    tied = tied_copies(p for c in chunks for p in c.parameters())
    return {"checked": checked, "wrong": wrong, "forward_only_grads": forward_only_grads,
            "all": set(ref_grads), "ref_sum": ref_sum, "ref_count": ref_count,
            "stats": result.stats, "eval_stats": evaluated.stats, "last": ps.is_last_stage,
            "counted": ps.is_last_stage and ps.tp_rank == 0, "pp_rank": ps.pp_rank,
            "tied_grad": [p.grad.clone() for p in tied], "peak": result.peak_in_flight,
            "busy": result.busy_s, "idle": result.idle_s}


def _rank_main(cases) -> dict:
    return {case.name: _run_case(case) for case in cases}


def check_case(case: Pipe, results: list[dict]) -> None:
    per_rank = [r[case.name] for r in results]
    name, pp, m, v, schedule = case.name, case.pp, case.m, case.v, case.schedule
    wrong = [w for r in per_rank for w in r["wrong"]]
    assert not wrong, f"{name}: " + "; ".join(wrong[:5])
    assert not any(r["forward_only_grads"] for r in per_rank), f"{name}: forward_only made gradients"
    checked = set().union(*(r["checked"] for r in per_rank))
    assert checked == per_rank[0]["all"], f"{name}: gradients not checked: {per_rank[0]['all'] - checked}"
    counted = [r for r in per_rank if r["counted"]]
    for key in ("stats", "eval_stats"):
        loss = sum(r[key]["loss_sum"] for r in counted)
        tokens = sum(r[key]["tokens"] for r in counted)
        assert tokens == per_rank[0]["ref_count"], f"{name} {key}: {tokens} tokens"
        assert abs(loss - per_rank[0]["ref_sum"]) < 1e-4 * abs(loss), f"{name} {key}: loss {loss}"
    assert all(r["stats"] == {} for r in per_rank if not r["last"]), f"{name}: stats off the last stage"
    if schedule == "1f1b":   # activations held: at most p - rank micro-batches
        assert all(r["peak"] <= min(pp - r["pp_rank"], m) for r in per_rank), \
            f"{name}: peak in-flight {[r['peak'] for r in per_rank]}"
    # The schedule holds exactly what megasft.layout (and so the planner) predicts.
    predicted = [in_flight(schedule, pp, r["pp_rank"], m, v) for r in per_rank]
    assert [r["peak"] for r in per_rank] == predicted, f"{name}: peak in-flight vs layout"
    if case.overrides.get("tie_embeddings"):
        copies = [g for r in per_rank for g in r["tied_grad"]]
        assert len(copies) == 2 * len(per_rank) // pp, f"{name}: {len(copies)} tied copies"
        first, last = [r["tied_grad"] for r in per_rank if r["pp_rank"] == 0], \
                      [r["tied_grad"] for r in per_rank if r["pp_rank"] == pp - 1]
        for a, b in zip(first, last):   # same TP/DP coordinates on both stages
            assert torch.equal(a[0], b[0]), f"{name}: tied copies' gradients differ after sync"


@pytest.fixture(scope="module")
def ran_4():
    return run_ranks(_rank_main, 4, CASES_4, timeout=600)


@pytest.fixture(scope="module")
def ran_8():
    return run_ranks(_rank_main, 8, CASES_8, timeout=600)


@pytest.mark.parametrize("case", CASES_4, ids=str)
def test_pipeline_matches_transformers_4_ranks(ran_4, case):
    check_case(case, ran_4)


@pytest.mark.parametrize("case", CASES_8, ids=str)
def test_pipeline_tp2_pp2_dp2_matches_transformers(ran_8, case):
    check_case(case, ran_8)


def test_interleaved_schedule_refuses_a_micro_batch_count_pp_does_not_divide():
    ps = ParallelState(rank=0, world_size=4, tp=1, pp=4, dp=1, tp_rank=0, pp_rank=0, dp_rank=0,
                       pp_ranks=[0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"multiple of pp=4; use 4 or 8 micro-batches"):
        forward_backward(lambda *a: None, [{}] * 6, ps, num_chunks=2, tensor_shape=(4, 1, 8))


def test_no_sync_wraps_all_but_the_last_backward():
    """Overlapped DP reduction may start only with a chunk's last micro-batch: every earlier
    backward runs inside no_sync(), and gradients still accumulate over all micro-batches."""
    w = torch.ones(3, requires_grad=True)
    inside = []

    @contextlib.contextmanager
    def no_sync():
        inside.append(True)
        yield

    def step(chunk, batch, input_tensor):
        loss = (w * batch["x"]).sum()
        return loss, {"loss_sum": loss.detach(), "tokens": 1}

    batches = [{"x": torch.full((3,), float(i))} for i in range(1, 5)]
    result = forward_backward(step, batches, ParallelState.single(), no_sync=no_sync)
    assert len(inside) == 3
    assert torch.equal(w.grad, torch.full((3,), 10.0))
    assert result.stats == {"loss_sum": 30.0, "tokens": 4.0} and result.busy_s > 0
