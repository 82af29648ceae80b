"""Resharding: the torch.distributed.checkpoint (DCP) save/load planners for TensorPieces (blocks
of canonical tensors). Not to be confused with megasft.planner, the capacity planner.

DCP's extension point for custom sharding is the planner: the save planner turns each rank's
blocks into SHARD write items (chunk offsets + sizes in the canonical tensor), the load planner
turns the blocks a rank wants into read items over whatever chunks the checkpoint holds
(``create_read_items_for_chunk_list`` computes the overlaps — this is what makes resharding work).
Plain tensors and Python objects in the same state dict take DCP's default path.

A block's tensor may also be produced lazily (``LazyBlock``): the HF importer streams tensors from
safetensors files only when the writer asks for them, so a conversion never holds the whole model.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import (SavePlan, TensorWriteData, WriteItem,
                                                  WriteItemType)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.checkpoint.staging import AsyncStager

from megasft.checkpoint.errors import CheckpointMismatch
from megasft.checkpoint.pieces import TensorPieces


@dataclasses.dataclass
class LazyBlock:
    """Stands in for a block tensor until the writer needs it: ``load()`` returns the tensor."""

    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]


def _split(state_dict: dict) -> tuple[dict, dict]:
    pieces = {k: v for k, v in state_dict.items() if isinstance(v, TensorPieces)}
    return pieces, {k: v for k, v in state_dict.items() if k not in pieces}


class PiecesSavePlanner(DefaultSavePlanner):
    """Writes the ``write=True`` blocks of TensorPieces values as shards of their canonical tensor."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False) -> None:
        self.pieces, rest = _split(state_dict)
        super().set_up_planner(rest, storage_meta, is_coordinator)

    def create_local_plan(self) -> SavePlan:
        plan = super().create_local_plan()
        items = []
        for fqn, entry in self.pieces.items():
            props = TensorProperties(dtype=entry.dtype)
            for i, block in enumerate(entry.blocks):
                if not block.write:
                    continue
                chunk = ChunkStorageMetadata(torch.Size(block.offsets), torch.Size(block.tensor.shape))
                items.append(WriteItem(MetadataIndex(fqn, chunk.offsets, i), WriteItemType.SHARD,
                                       tensor_data=TensorWriteData(chunk, props, torch.Size(entry.size))))
        self.plan = dataclasses.replace(plan, items=list(plan.items) + items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        entry = self.pieces.get(write_item.index.fqn)
        if entry is None:
            return super().resolve_data(write_item)
        tensor = entry.blocks[_block_index(entry, write_item.index)].tensor
        if isinstance(tensor, LazyBlock):
            tensor = tensor.load()
        return tensor.detach().to(device="cpu", dtype=entry.dtype)


def _block_index(entry: TensorPieces, index: MetadataIndex) -> int:
    # DCP rewrites index hints in the global plan; find the block by its offsets.
    if index.index is not None and index.index < len(entry.blocks) and \
            tuple(entry.blocks[index.index].offsets) == tuple(index.offset):
        return index.index
    for i, block in enumerate(entry.blocks):
        if tuple(block.offsets) == tuple(index.offset):
            return i
    raise KeyError(f"no block of {index.fqn} at offsets {tuple(index.offset)}")


class PiecesLoadPlanner(DefaultLoadPlanner):
    """Reads every block of TensorPieces values (replicas included) from whatever chunks the
    checkpoint holds, after checking that each canonical tensor exists with the same shape."""

    def __init__(self, checkpoint: str = "checkpoint", allow_partial_load: bool = False):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False,
                         allow_partial_load=allow_partial_load)
        self.checkpoint = checkpoint

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.caller_state = state_dict
        self.pieces, rest = _split(state_dict)
        super().set_up_planner(rest, metadata, is_coordinator)

    def load_bytes(self, read_item, value) -> None:
        super().load_bytes(read_item, value)
        fqn = read_item.dest_index.fqn
        self.caller_state[fqn] = self.state_dict[fqn]   # the caller's dict, not our split copy

    def create_local_plan(self):
        plan = super().create_local_plan()
        items = []
        for fqn, entry in self.pieces.items():
            md = self.metadata.state_dict_metadata.get(fqn)
            if not isinstance(md, TensorStorageMetadata):
                raise CheckpointMismatch(f"{self.checkpoint}: has no tensor {fqn!r}; it was saved from a "
                                         "different model (or without this state)")
            if tuple(md.size) != tuple(entry.size):
                raise CheckpointMismatch(f"{self.checkpoint}: tensor {fqn!r} has shape {tuple(md.size)}, "
                                         f"the model expects {tuple(entry.size)}")
            chunks = [ChunkStorageMetadata(torch.Size(b.offsets), torch.Size(b.tensor.shape)) for b in entry.blocks]
            items.extend(create_read_items_for_chunk_list(fqn, md, chunks))
        return dataclasses.replace(plan, items=list(plan.items) + items)

    def resolve_tensor(self, read_item):
        entry = self.pieces.get(read_item.dest_index.fqn)
        if entry is None:
            return super().resolve_tensor(read_item)
        tensor = entry.blocks[_block_index(entry, read_item.dest_index)].tensor
        for dim, (offset, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            tensor = tensor.narrow(dim, offset, length)
        return tensor


class PreStaged(AsyncStager):
    """For dcp.async_save of a state dict whose tensors were already copied off the live
    parameters (sharded.stage_copy): nothing more to stage, nothing to wait for."""

    _synchronize_after_execute = False

    def stage(self, state_dict):
        return state_dict

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass
