"""Driving megasft at a layout for the train-step equivalence tests (the references they compare
against live in tests/oracle.py and use no megasft code)."""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.testing import assert_close

from megasft.config import Config
from megasft.hf.names import canonical_pieces
from megasft.optim import grad_buffer
from megasft.training.loop import Trainer
from tests.oracle import select_rows


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
