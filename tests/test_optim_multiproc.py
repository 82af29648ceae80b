"""tests/multiproc.run_ranks: results come back in rank order; a failing rank fails the caller
with its traceback even while its peers are blocked in a collective."""
import pytest
import torch
import torch.distributed as dist

from tests.multiproc import run_ranks


def sum_of_ranks(offset):
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return dist.get_rank(), dist.get_world_size(), t.item() + offset


def fail_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("deliberate failure on rank 1")
    dist.barrier()  # rank 0 would wait here forever; run_ranks must kill it


def test_results_in_rank_order():
    assert run_ranks(sum_of_ranks, 2, 10.0, timeout=60) == [(0, 2, 11.0), (1, 2, 11.0)]


def test_failure_propagates_with_traceback():
    with pytest.raises(RuntimeError, match=r"rank 1 failed:(.|\n)*ValueError: deliberate failure"):
        run_ranks(fail_on_rank_one, 2, timeout=60)
