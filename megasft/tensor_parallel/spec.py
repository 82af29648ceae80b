"""ParamSpec: what every parameter is, relative to the canonical model and to the other ranks.

Every parameter is a slice of one or more *canonical* tensors (the unsharded Hugging Face
tensors). Its spec records

  split            how it is cut from them (which canonical parts are fused along which dim, and
                   which chunk of each this rank holds); None means the whole tensor. Init, HF
                   import/export and checkpoint resharding all derive local tensors from
                   canonical ones through this one description, so a model has the same weights
                   at every layout;
  tp_copies        ranks of the TP group holding an identical copy (norm weights: all tp; kv heads
                   replicated when tp > num_kv_heads: tp // kv_heads);
  grad_sync_group  the group whose ranks hold partial gradients of the same parameter, summed before
                   the optimizer step (norm weights under sequence parallelism, replicated kv heads);
  tied             a copy of the pipeline-tied embedding (the LM head on the last stage, the
                   embedding on the first), whose gradients are summed over the embedding group;
  pp_copies        pipeline chunks holding a copy (2 for a pipeline-tied embedding);
  tied_head        that copy is the LM head's (checkpoints store the embedding's copy; under ZBV
                   both are on the first stage).
  experts          (first, count): the routed experts of a MoE layer whose weights this parameter
                   stacks, each expert its own canonical tensors (megasft.model.moe); None for
                   every other parameter. Expert parallelism reads it to reduce expert gradients
                   over their own data-parallel group.

The global grad norm counts each copy 1 / (tp_copies * pp_copies); parameters whose gradients the
model sums itself (``model_grad_sync``) wait in a bucket of their own before the DP reduction.
Specs are set by the layers that create parameters (and the pipeline tie) through
:func:`set_spec`, and read everywhere through :func:`spec_of`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

_ATTR = "_megasft_spec"   # the one attribute a parameter carries


@dataclass(frozen=True)
class Shard:
    """This rank's chunk of one canonical tensor along the split dim: the canonical size is padded
    to `padded` (vocab padding), cut into `num` equal chunks, and chunk `index` is held here."""

    size: int
    num: int = 1
    index: int = 0
    padded: Optional[int] = None

    @property
    def full(self) -> int:
        return self.padded or self.size

    @property
    def local(self) -> int:
        if self.full % self.num:
            raise ValueError(f"canonical size {self.full} does not split into {self.num} equal chunks")
        return self.full // self.num

    @property
    def start(self) -> int:
        return self.index * self.local


@dataclass(frozen=True)
class TPSplit:
    """A local parameter = concat over `parts` (canonical tensors, in order) of each part's shard
    along `dim`."""

    dim: int
    parts: tuple[Shard, ...]

    def local_from_full(self, fulls: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(fulls) != len(self.parts):
            raise ValueError(f"expected {len(self.parts)} canonical tensors, got {len(fulls)}")
        pieces = []
        for full, shard in zip(fulls, self.parts):
            if full.shape[self.dim] != shard.size:
                raise ValueError(f"canonical tensor has {full.shape[self.dim]} rows along dim {self.dim}, "
                                 f"expected {shard.size}")
            if shard.padded and shard.padded > shard.size:
                pad_shape = list(full.shape)
                pad_shape[self.dim] = shard.padded - shard.size
                full = torch.cat([full, full.new_zeros(pad_shape)], dim=self.dim)
            pieces.append(full.narrow(self.dim, shard.start, shard.local))
        return torch.cat(pieces, dim=self.dim)

    def pieces(self, local: torch.Tensor) -> list[tuple[int, int, torch.Tensor]]:
        """Inverse of local_from_full: (part index, offset in the canonical tensor, piece) for every
        part, with vocab padding rows dropped (they belong to no canonical tensor)."""
        out, offset = [], 0
        for i, shard in enumerate(self.parts):
            piece = local.narrow(self.dim, offset, shard.local)
            offset += shard.local
            keep = max(0, min(shard.local, shard.size - shard.start))
            if keep:
                out.append((i, shard.start, piece.narrow(self.dim, 0, keep)))
        return out

    def full_shapes(self, local_shape: Sequence[int]) -> list[tuple[int, ...]]:
        shapes = []
        for shard in self.parts:
            shape = list(local_shape)
            shape[self.dim] = shard.size
            shapes.append(tuple(shape))
        return shapes


@dataclass(frozen=True)
class ParamSpec:
    """See the module docstring."""

    split: Optional[TPSplit] = None
    tp_copies: int = 1
    grad_sync_group: Optional[dist.ProcessGroup] = None
    tied: bool = False
    pp_copies: int = 1
    experts: Optional[tuple[int, int]] = None
    tied_head: bool = False

    @property
    def copies(self) -> int:
        """Ranks of the TP x PP grid holding an identical copy."""
        return self.tp_copies * self.pp_copies

    @property
    def model_grad_sync(self) -> bool:
        """Whether the model sums this parameter's gradient across ranks before the DP reduction."""
        return self.grad_sync_group is not None or (self.tied and self.pp_copies > 1)


def spec_of(param: torch.Tensor) -> ParamSpec:
    """The spec of a parameter (a default, unique and unsplit, when none was set)."""
    return getattr(param, _ATTR, None) or ParamSpec()


def first_replica(param: torch.Tensor, ps) -> bool:
    """Whether this rank is the first of the data-parallel replicas holding `param` (the one that
    writes it in checkpoints and exports): over dp x cp for most parameters, over the expert-DP
    ranks for routed experts, which expert parallelism spreads over the dp ranks."""
    return ps.first_expert_replica if spec_of(param).experts is not None else ps.first_replica


def set_spec(param: nn.Parameter, **changes) -> nn.Parameter:
    """Update fields of a parameter's spec; returns the parameter."""
    setattr(param, _ATTR, dataclasses.replace(spec_of(param), **changes))
    return param
