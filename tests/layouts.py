"""Driving megasft at a layout for the equivalence tests (the references they compare against live
in tests/oracle.py and use no megasft code)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch.testing import assert_close

from megasft.config import Config, ModelConfig
from megasft.context_parallel.sharding import local_token_index, split_micro_batch
from megasft.hf.names import canonical_pieces, load_hf_state_dict
from megasft.model.llama import LlamaStage
from megasft.optim import grad_buffer
from megasft.parallel_state import ParallelState
from megasft.pipeline.tied import tied_copies
from megasft.tensor_parallel.comm import all_reduce, gather_last_dim
from megasft.tensor_parallel.layers import sync_replicated_grads
from megasft.training.loop import Trainer
from tests.oracle import (canonical_reference, hf_model, model_batch, packed_batch, reference_loss,
                          reference_training, select_rows, tiny_fields)


# The performance options the equivalence tests must also pass with: overlapped bucketed grad
# reduce-scatter and param all-gather (buckets small enough that the tiny model has many), and
# the fused chunked LM-head + loss (chunks that do not divide the token count).
FAST_PARALLEL = {"overlap_grad_reduce": True, "overlap_param_gather": True, "bucket_size_mb": 0.02}
FAST_MODEL = {"loss_chunk_tokens": 5}

# Weight agreement after AdamW steps (see assert_pieces_match): within 1 % of one step, with at
# most one element in 1000 of a tensor further off (gradients at fp32 rounding level).
CLOSE, OUTLIER_SHARE = 0.01, 1000


class _LateGather:
    """An all-gather whose result lands in the output only at wait(): a stand-in for a slow
    network that makes any read of a parameter before its bucket was waited for see the previous
    step's weights — deterministically, where a fast real gather would hide the bug."""

    def __init__(self, output: torch.Tensor, input: torch.Tensor, group=None, async_op: bool = False):
        self.output, self.result = output, torch.empty_like(output)
        dist.all_gather_into_tensor(self.result, input.clone(), group=group)

    def wait(self) -> bool:
        self.output.copy_(self.result)
        return True


@contextlib.contextmanager
def late_param_gather():
    """Run the ZeRO-1 parameter all-gathers as _LateGather."""
    real, grad_buffer._all_gather = grad_buffer._all_gather, _LateGather
    try:
        yield
    finally:
        grad_buffer._all_gather = real


@dataclass(frozen=True)
class Case:
    """One layout of a train-step equivalence test: where it runs (global ranks of the spawned
    world) and what it turns on."""

    name: str
    ranks: tuple[int, ...]
    tp: int = 1
    pp: int = 1
    virtual: int = 1
    schedule: str = "auto"
    micro_batch_size: int = 1
    sequence_parallel: bool = False
    zero1: bool = True
    tied: bool = False
    fast: bool = False     # the performance options: FAST_PARALLEL, FAST_MODEL, late param gathers
    cp: int = 1
    cp_comm: str = "ring"
    ep: int = 1
    pipeline_layers: tuple[int, ...] = ()   # parallel.pipeline_layers; () splits evenly

    def __str__(self) -> str:   # the pytest id
        return self.name


@dataclass(frozen=True)
class Run:
    """The training every case of a test repeats: rows of seq tokens per step, AdamW at lr with
    `warmup` linear warm-up steps, `steps` steps."""

    seq: int
    rows: int
    lr: float
    warmup: int
    steps: int


def sft_config(model_fields: dict, hf_dir: str, case: Case, run: Run) -> Config:
    """fp32 SFT config of `case` starting from the HF directory the reference model was saved to."""
    parallel = {"tp": case.tp, "pp": case.pp, "virtual_pipeline_size": case.virtual,
                "pipeline_schedule": case.schedule, "sequence_parallel": case.sequence_parallel,
                "distributed_optimizer": case.zero1, "cp": case.cp, "cp_comm": case.cp_comm, "ep": case.ep,
                "pipeline_layers": list(case.pipeline_layers) or None}
    return Config.from_dict({
        "model": {**model_fields, **(FAST_MODEL if case.fast else {}), "init_from_hf": hf_dir},
        "parallel": {**parallel, **(FAST_PARALLEL if case.fast else {})},
        "data": {"seq_len": run.seq, "global_batch_tokens": run.seq * run.rows,
                 "micro_batch_size": case.micro_batch_size},
        "optim": {"lr": run.lr, "warmup_steps": run.warmup},
        "train": {"steps": run.steps, "precision": "fp32"},
    }).validate()   # the Trainer resolves the layout for its ParallelState


def train_cases(cases: list[Case], run: Run, model_fields: Callable[[Case], dict],
                hf_dir: Callable[[Case], str], global_batches: list[dict]) -> dict:
    """On this rank of the spawned world: train every case this rank takes part in, one step per
    global batch. Returns {case name: losses, MoE aux losses and the train record's MoE fields,
    weight pieces, tied copies, coordinates}."""
    results = {}
    for case in cases:
        ps = ParallelState.build(case.tp, case.pp, ranks=list(case.ranks), cp=case.cp, ep=case.ep)
        if ps is None:
            continue
        cfg = sft_config(model_fields(case), hf_dir(case), case, run)
        trainer = Trainer(cfg, ps, log=False)
        with late_param_gather() if case.fast else contextlib.nullcontext():
            outputs = train_this_rank(trainer, global_batches, case.micro_batch_size)
            weights = weight_pieces(trainer)   # inside: it waits for an overlapped param all-gather
        results[case.name] = {"losses": [o.loss for o in outputs], "weights": weights, "pp_rank": ps.pp_rank,
                              "aux": [o.aux_loss for o in outputs], "grad_norms": [o.grad_norm for o in outputs],
                              "moe_record": trainer._moe_record(outputs[-1]),
                              "coords": (ps.dp_rank, ps.cp_rank, ps.tp_rank),
                              "tied": [p.detach().clone() for p in tied_copies(trainer.params)]}
    return results


def tied_and_untied_references(root, fields: dict, global_batches: list[dict], run: Run, seed: int):
    """Plain-PyTorch reference runs of the tiny model of `fields` untied and tied, each saved as an
    HF directory under `root` for the cases to start from: ({tied: (losses, final weights)},
    {tied: directory})."""
    refs, dirs = {}, {}
    for tied in (False, True):
        model = hf_model(tiny_fields(**fields, tie_embeddings=tied), seed=seed)
        dirs[tied] = str(root / f"tied{int(tied)}")
        model.save_pretrained(dirs[tied])
        losses = reference_training(model, global_batches, run.lr, run.warmup, run.steps)
        refs[tied] = (losses, {n: p.detach() for n, p in model.named_parameters()})
    return refs, dirs


def check_case(case: Case, per_rank: list[dict], ref_losses: list[float], ref_weights: dict, run: Run) -> None:
    """Every rank of `case` reproduced the reference losses and its share of the reference
    weights, and together they covered every weight."""
    outs = [r[case.name] for r in per_rank if case.name in r]
    assert len(outs) == len(case.ranks), f"{case}: ran on {len(outs)} ranks"
    seen = set()
    for out in outs:
        assert_losses_match(out["losses"], ref_losses, case.name)
        seen |= assert_pieces_match(out["weights"], ref_weights, case.name, run)
    assert seen == set(ref_weights), f"{case}: weights not checked: {set(ref_weights) - seen}"


def train_this_rank(trainer, global_batches: list[dict], micro_batch_size: int) -> list:
    """One train step per global batch on this DP rank's contiguous share of its rows, cut into
    micro-batches; returns each step's StepOutput."""
    ps = trainer.ps
    losses = []
    for batch in global_batches:
        per_rank = batch["input_ids"].shape[0] // ps.dp
        mine = list(range(ps.dp_rank * per_rank, (ps.dp_rank + 1) * per_rank))
        micro = [select_rows(batch, mine[i:i + micro_batch_size]) for i in range(0, per_rank, micro_batch_size)]
        losses.append(trainer.train_step(micro))
    return losses


def weight_pieces(trainer) -> list[tuple]:
    """(hf_name, dim, offset, piece) of every weight shard this rank holds, detached copies."""
    trainer.optimizer.finish_param_sync()
    return [(n, d, o, p.clone()) for c in trainer.chunks for n, d, o, p in canonical_pieces(c)]


def assert_pieces_match(pieces: list[tuple], reference: dict, layout: str, run: Run) -> set:
    """Every piece equals its slice of the reference HF tensor, to within the size of an AdamW
    step; returns the HF names checked.

    One AdamW step moves an element by at most about the learning rate (Kingma & Ba 2015, Sec.
    2.1: |step| <= lr when (1 - beta1) <= sqrt(1 - beta2), as with betas (0.9, 0.95)). Summing a
    gradient in another order (micro-batches, TP partial sums, DP reduce-scatter) changes it by
    fp32 rounding, ~1e-7 of its size, so an element's step changes by ~1e-7 of lr — except where
    the gradient itself is at rounding level (terms that cancel), where m / sqrt(v) may change by
    O(1). Hence: every element within CLOSE (1 %) of one step plus 1e-4 of the weight, except at
    most 1 in OUTLIER_SHARE elements of a tensor (at least one), and those within the hard bound
    of two trajectories that each move at most lr per step. A wrong update — a lost micro-batch,
    a wrong scale, a missed sync — moves most elements of a tensor by O(lr) and fails."""
    step = run.lr
    seen = set()
    for hf_name, dim, offset, piece in pieces:
        expected = reference[hf_name].detach()
        expected = expected if dim < 0 else expected.narrow(dim, offset, piece.shape[dim])
        diff = (piece - expected).abs()
        outliers = int((diff > CLOSE * step + 1e-4 * expected.abs()).sum())
        allowed = max(1, piece.numel() // OUTLIER_SHARE)
        where = f"{layout}: weight {hf_name} {tuple(piece.shape)}"
        assert outliers <= allowed, (f"{where}: {outliers} elements differ by more than {CLOSE:.0%} of one "
                                     f"step (lr {step}; at most {allowed} may); max diff {float(diff.max()):.3g}")
        assert float(diff.max()) <= 2 * step * run.steps, f"{where}: max diff {float(diff.max()):.3g} > 2 * lr * steps"
        seen.add(hf_name)
    return seen


def gather_cp_tokens(local: torch.Tensor, batch, cp_group) -> torch.Tensor:
    """Every CP rank's [s/cp, b, ...] tokens back in row order: [s, b, ...] (the identity at cp 1)."""
    if cp_group is None:
        return local
    cp = dist.get_world_size(cp_group)
    parts = [torch.empty_like(local) for _ in range(cp)]
    dist.all_gather(parts, local.contiguous(), group=cp_group)
    b = local.shape[1]
    full = torch.empty((b * local.shape[0] * cp, *local.shape[2:]), dtype=local.dtype)
    for r, part in enumerate(parts):
        full[local_token_index(batch.cu_seqlens, cp, r)] = part.transpose(0, 1).reshape(-1, *local.shape[2:])
    return full.view(b, -1, *local.shape[2:]).transpose(0, 1)


def assert_losses_match(losses: list[float], reference: list[float], layout: str) -> None:
    assert_close(torch.tensor(losses), torch.tensor(reference), rtol=1e-5, atol=1e-6,
                 msg=lambda m: f"{layout}: losses {losses} vs {reference}: {m}")


def check_tp_equivalence(tp: int, sp: bool, fields: dict, rows: list[list[int]], seq: int, cp: int = 1,
                         cp_comm: str = "ring", ranks=None) -> None:
    """megasft at tp (+SP) (x cp by `cp_comm`) on packed `rows` vs the transformers model of
    `fields` run on each document alone: every document's logits (max abs diff < 1e-4), the masked
    loss sum and count, and every parameter's gradient. Called on every rank of the world; the
    layout runs on `ranks` (default: the first tp*cp)."""
    ps = ParallelState.build(tp, 1, ranks=list(ranks or range(tp * cp)), cp=cp)
    if ps is None:
        return
    hf = hf_model(fields, seed=1)
    batch = packed_batch(rows, seq, fields["vocab_size"], seed=2)
    ref_sum, ref_count, ref_logits = reference_loss(hf, batch)
    (ref_sum / ref_count).backward()

    stage = LlamaStage(ModelConfig(**fields), ps, list(range(fields["num_layers"])), True, True,
                       sequence_parallel=sp, cp_comm=cp_comm)
    load_hf_state_dict(stage, hf.state_dict())
    mine = split_micro_batch(model_batch(batch), cp, ps.cp_rank)   # this CP rank's s/cp tokens

    with torch.no_grad():   # logits and packing isolation: every document as if alone
        logits = gather_last_dim(stage(mine.without_labels()), ps.tp_group)
        logits = gather_cp_tokens(logits, mine, ps.cp_group)                           # [s, b, V]
        for (r, start, n), ref in zip(batch["docs"], ref_logits):
            got = logits[start:start + n, r, :fields["vocab_size"]]
            assert (got - ref).abs().max() < 1e-4, f"logits differ for document at row {r}+{start}"

    loss_sum, count = stage(mine)
    # Each CP rank holds the loss of its own tokens: the row's is their sum.
    total, count = all_reduce(loss_sum.detach().clone(), ps.cp_group), all_reduce(count.double(), ps.cp_group)
    assert int(count) == int(ref_count)
    assert_close(total, ref_sum.detach(), rtol=1e-5, atol=1e-5)
    (loss_sum / count).backward()
    sync_replicated_grads(stage.parameters(), lambda p: p.grad)
    for p in stage.parameters():   # CP ranks hold partial gradients of the same weights
        if cp > 1:
            dist.all_reduce(p.grad, group=ps.cp_group)
    assert_grads_match(stage, canonical_reference(hf, grads=True))   # fused tensors split by transformers' rule


def assert_grads_match(stage, ref_grads: dict, atol: float = 1e-6) -> None:
    """Every gradient piece this rank holds equals its slice of the reference gradient (by
    canonical name) within rtol 1e-5 and `atol` (at least; see below), and every reference
    gradient was checked."""
    seen = set()
    for name, dim, offset, piece in canonical_pieces(stage, grads=True):
        ref = ref_grads[name]
        # An element is a sum over tokens (and over ranks) of terms up to about the tensor's largest
        # element; another summation order moves it by ~ terms x 1.2e-7 of that size, so small
        # elements get an absolute allowance of 2e-6 of the tensor's max (and atol at least).
        tol = max(atol, 2e-6 * float(ref.abs().max()))
        ref = ref if dim < 0 else ref.narrow(dim, offset, piece.shape[dim])
        assert_close(piece, ref, rtol=1e-5, atol=tol, msg=lambda m: f"grad of {name}: {m}")
        seen.add(name)
    assert seen == set(ref_grads), f"gradients not checked: {set(ref_grads) - seen}"
