"""Point-to-point exchange of activations and their gradients between neighbouring pipeline stages.

Every exchange is one batch of isend/irecv (``torch.distributed.batch_isend_irecv``) with all
four directions posted before any is waited on, so two neighbours that both send and receive
cannot deadlock on ordering. Shapes are static (packed rows have a fixed length), so there is no
shape handshake: the receiver allocates ``tensor_shape`` ([s/tp if SP else s, b, h]) itself.

Neighbours form a ring over the pipeline group (Megatron-LM does the same): the last stage's
"next" is the first stage. Plain 1F1B never sends across the wrap; the interleaved schedule does,
when the last rank's chunk k feeds the first rank's chunk k+1. With pp=2 the previous and the next
rank are the same process, so messages are told apart by tag (activations 0, gradients 1) and,
for backends that ignore tags (NCCL), by a fixed posting order — activations before gradients on
both sides.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megasft import collectives
from megasft.parallel_state import ParallelState

ACTIVATION_TAG, GRAD_TAG = 0, 1


@dataclass
class Exchange:
    """What one batched exchange received, and how long this rank waited for it."""

    from_prev: Optional[torch.Tensor] = None     # activation for this stage's forward
    from_next: Optional[torch.Tensor] = None     # gradient of this stage's output
    wait_s: float = 0.0


class P2P:
    """Batched neighbour exchange for one rank of a pipeline group."""

    def __init__(self, ps: ParallelState, tensor_shape, dtype: torch.dtype):
        self.shape, self.dtype, self.device = tuple(tensor_shape), dtype, ps.device
        n, r = ps.pp, ps.pp_rank
        self.group = ps.pp_group   # for the ledger: p2p addresses peers by global rank
        self.prev_rank = ps.pp_ranks[(r - 1) % n]
        self.next_rank = ps.pp_ranks[(r + 1) % n]

    def exchange(self, send_next: Optional[torch.Tensor] = None, send_prev: Optional[torch.Tensor] = None,
                 recv_prev: bool = False, recv_next: bool = False) -> Exchange:
        """Send an activation forward and/or a gradient backward; receive an activation from the
        previous stage and/or a gradient from the next one. Returns once everything has arrived."""
        out = Exchange()
        ops = []
        # Posting order matters where tags do not (NCCL): activations first, gradients second.
        if send_next is not None:
            ops.append(("send", _contiguous(send_next), self.next_rank, ACTIVATION_TAG))
        if recv_prev:
            out.from_prev = self._empty()
            ops.append(("recv", out.from_prev, self.prev_rank, ACTIVATION_TAG))
        if send_prev is not None:
            ops.append(("send", _contiguous(send_prev), self.prev_rank, GRAD_TAG))
        if recv_next:
            out.from_next = self._empty()
            ops.append(("recv", out.from_next, self.next_rank, GRAD_TAG))
        out.wait_s = collectives.batch_p2p(ops, self.group)
        return out

    # One message at a time, for schedules whose order is a fixed list of passes (zero bubble):
    # blocking receives, sends left in flight until finish_sends(). reverse: the way back up of
    # ZBV's V, where activations travel from the next rank to the previous one and gradients from
    # the previous to the next. Each (sender, receiver, tag) then still carries one stream — on
    # the way down the activations of one chunk, on the way up those of another — so messages
    # match in order.
    def post_recv(self, grad: bool, reverse: bool = False) -> tuple[torch.Tensor, object]:
        """Post the receive of the next activation (grad=False) or gradient without waiting:
        (the tensor it lands in, the work to pass to wait_recv)."""
        t = self._empty()
        up = self.next_rank if reverse else self.prev_rank         # where activations come from
        down = self.prev_rank if reverse else self.next_rank       # where gradients come from
        return t, collectives.irecv(t, down if grad else up, GRAD_TAG if grad else ACTIVATION_TAG)

    def wait_recv(self, posted: tuple[torch.Tensor, object]) -> tuple[torch.Tensor, float]:
        """A posted receive's tensor, once it arrived, and the seconds waited for it."""
        t, work = posted
        return t, collectives.wait_recv(work, t, self.group)

    def recv_activation(self, reverse: bool = False) -> tuple[torch.Tensor, float]:
        return self.wait_recv(self.post_recv(False, reverse))

    def recv_grad(self, reverse: bool = False) -> tuple[torch.Tensor, float]:
        return self.wait_recv(self.post_recv(True, reverse))

    def isend_activation(self, y: torch.Tensor, reverse: bool = False):
        return collectives.isend(_contiguous(y), self.prev_rank if reverse else self.next_rank, self.group,
                                 ACTIVATION_TAG)

    def isend_grad(self, g: torch.Tensor, reverse: bool = False):
        return collectives.isend(_contiguous(g), self.next_rank if reverse else self.prev_rank, self.group,
                                 GRAD_TAG)

    def _empty(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device=self.device)


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous()


def release_storage(output: torch.Tensor) -> None:
    """Free a sent activation's memory while keeping its autograd node (Megatron-LM's
    deallocate_output_tensor): the next stage holds the only copy still needed, and backward
    needs just ``output.grad_fn``. Backward must then skip autograd's shape check, see
    :func:`backward_through`. Views are skipped: their storage belongs to their base.

    Requirement on the model: the chunk's last op must not save its own output for backward
    (true for the residual add that ends a decoder layer)."""
    if output._base is None:
        output.data = torch.empty((1,), device=output.device, dtype=output.dtype)


def backward_through(output: torch.Tensor, grad: Optional[torch.Tensor]) -> None:
    """``torch.autograd.backward(output, grad)`` without the check that grad's shape equals
    output's, which fails once release_storage() has shrunk output.data to one element. This
    calls the engine directly, as Megatron-LM's custom_backward does."""
    from torch.autograd.graph import _engine_run_backward

    if grad is None:   # a scalar loss
        grad = torch.ones_like(output)
    _engine_run_backward((output,), (grad,), False, False, (), allow_unreachable=True,
                         accumulate_grad=True)
