"""Driving megasft at a layout for the equivalence tests (the references they compare against live
in tests/oracle.py and use no megasft code)."""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.testing import assert_close

from megasft.config import Config, ModelConfig
from megasft.hf.names import canonical_pieces, load_hf_state_dict
from megasft.model.llama import LlamaStage
from megasft.optim import grad_buffer
from megasft.parallel_state import ParallelState
from megasft.tensor_parallel.comm import gather_last_dim
from megasft.tensor_parallel.layers import sync_replicated_grads
from megasft.training.loop import Trainer
from tests.oracle import hf_model, model_batch, packed_batch, reference_loss, select_rows


# The performance options the equivalence tests must also pass with: overlapped bucketed grad
# reduce-scatter and param all-gather (buckets small enough that the tiny model has many), and
# the fused chunked LM-head + loss (chunks that do not divide the token count).
FAST_PARALLEL = {"overlap_grad_reduce": True, "overlap_param_gather": True, "bucket_size_mb": 0.02}
FAST_MODEL = {"loss_chunk_tokens": 5}


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


def sft_config(model_fields: dict, hf_dir: str, world: int, parallel: dict, seq: int, rows: int,
               micro_batch_size: int, lr: float, warmup: int, steps: int, fast: bool = False) -> Config:
    """fp32 SFT config starting from the HF directory the reference model was saved to; `fast`
    adds the performance options (FAST_PARALLEL, FAST_MODEL)."""
    return Config.from_dict({
        "model": {**model_fields, **(FAST_MODEL if fast else {}), "init_from_hf": hf_dir},
        "parallel": {**parallel, **(FAST_PARALLEL if fast else {})},
        "data": {"seq_len": seq, "global_batch_tokens": seq * rows, "micro_batch_size": micro_batch_size},
        "optim": {"lr": lr, "warmup_steps": warmup},
        "train": {"steps": steps, "precision": "fp32"},
    }).validate()   # the Trainer resolves the layout for its ParallelState


def train_layout(cfg: Config, ps, global_batches: list[dict], fast: bool):
    """A Trainer for `cfg` on this rank, trained one step per global batch; returns (trainer,
    losses, weight pieces). With `fast` the parameter all-gathers land late (late_param_gather)."""
    trainer = Trainer(cfg, ps, log=False)
    with late_param_gather() if fast else contextlib.nullcontext():
        losses = train_this_rank(trainer, global_batches, cfg.data.micro_batch_size)
        weights = weight_pieces(trainer)   # inside: it waits for an overlapped param all-gather
    return trainer, losses, weights


def train_this_rank(trainer, global_batches: list[dict], micro_batch_size: int) -> list[float]:
    """One train step per global batch on this DP rank's contiguous share of its rows, cut into
    micro-batches; returns the global-batch losses."""
    ps = trainer.ps
    losses = []
    for batch in global_batches:
        per_rank = batch["input_ids"].shape[0] // ps.dp
        mine = list(range(ps.dp_rank * per_rank, (ps.dp_rank + 1) * per_rank))
        micro = [select_rows(batch, mine[i:i + micro_batch_size]) for i in range(0, per_rank, micro_batch_size)]
        losses.append(trainer.train_step(micro).loss)
    return losses


def weight_pieces(trainer) -> list[tuple]:
    """(hf_name, dim, offset, piece) of every weight shard this rank holds, detached copies."""
    trainer.optimizer.finish_param_sync()
    return [(n, d, o, p.clone()) for c in trainer.chunks for n, d, o, p in canonical_pieces(c)]


def assert_pieces_match(pieces: list[tuple], reference: dict, layout: str, atol: float) -> set:
    """Every piece equals its slice of the reference HF tensor; returns the HF names checked.

    Adam's m / sqrt(v) turns fp32 rounding of a near-zero gradient (summed in another order) into
    a visible weight difference, so `atol` is a few % of one step's update; a wrong update (lost
    micro-batch, wrong scale) is off by about the learning rate on most elements."""
    seen = set()
    for hf_name, dim, offset, piece in pieces:
        expected = reference[hf_name].detach()
        expected = expected if dim < 0 else expected.narrow(dim, offset, piece.shape[dim])
        assert_close(piece, expected, rtol=1e-4, atol=atol, msg=lambda m: f"{layout}: weight {hf_name}: {m}")
        seen.add(hf_name)
    return seen


def assert_losses_match(losses: list[float], reference: list[float], layout: str) -> None:
    assert_close(torch.tensor(losses), torch.tensor(reference), rtol=1e-5, atol=1e-6,
                 msg=lambda m: f"{layout}: losses {losses} vs {reference}: {m}")


def check_tp_equivalence(tp: int, sp: bool, fields: dict, rows: list[list[int]], seq: int) -> None:
    """megasft at tp (+SP) on packed `rows` vs the transformers model of `fields` run on each
    document alone: every document's logits (max abs diff < 1e-4), the masked loss sum and count,
    and every parameter's gradient. Called on every rank of a world of at least tp ranks."""
    ps = ParallelState.build(tp, 1)
    hf = hf_model(fields, seed=1)
    batch = packed_batch(rows, seq, fields["vocab_size"], seed=2)
    ref_sum, ref_count, ref_logits = reference_loss(hf, batch)
    (ref_sum / ref_count).backward()

    stage = LlamaStage(ModelConfig(**fields), ps, list(range(fields["num_layers"])), True, True,
                       sequence_parallel=sp)
    load_hf_state_dict(stage, hf.state_dict())

    with torch.no_grad():   # logits and packing isolation: every document as if alone
        logits = gather_last_dim(stage(model_batch(batch).without_labels()), ps.tp_group)
        for (r, start, n), ref in zip(batch["docs"], ref_logits):
            got = logits[start:start + n, r, :fields["vocab_size"]]
            assert (got - ref).abs().max() < 1e-4, f"logits differ for document at row {r}+{start}"

    loss_sum, count = stage(model_batch(batch))
    assert int(count) == int(ref_count)
    assert_close(loss_sum, ref_sum.detach(), rtol=1e-5, atol=1e-5)
    (loss_sum / count).backward()
    sync_replicated_grads(stage.parameters(), lambda p: p.grad)
    ref_grads = dict(hf.named_parameters())
    seen = set()
    for name, dim, offset, piece in canonical_pieces(stage, grads=True):
        ref = ref_grads[name].grad
        ref = ref if dim < 0 else ref.narrow(dim, offset, piece.shape[dim])
        assert_close(piece, ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"grad of {name}: {m}")
        seen.add(name)
    assert seen == set(ref_grads), f"gradients not checked: {set(ref_grads) - seen}"
