"""The micro-batch: what the loader hands the model, and the label convention both sides share.

Labels follow the Hugging Face convention: ``labels[t]`` is the target for ``input_ids[t]``,
IGNORE_INDEX where a token is not trained, and the shift to next-token targets happens inside the
loss (:func:`shift_labels`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets: position t is trained on labels[t + 1]; the last position gets
    IGNORE_INDEX. [b, s] -> [b, s]."""
    pad = labels.new_full((labels.shape[0], 1), IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch of packed rows. Every stage of a pipeline gets the same one, so packing
    metadata never travels between stages."""

    input_ids: torch.Tensor              # [b, s] int64
    position_ids: torch.Tensor           # [b, s] int64, restarting at 0 for every document
    cu_seqlens: torch.Tensor             # [segments + 1] int32 over the flattened b*s tokens
    max_seqlen: int                      # longest segment
    labels: Optional[torch.Tensor] = None   # [b, s] int64, IGNORE_INDEX where not trained; None = no loss

    @property
    def trained_tokens(self) -> int:
        """Tokens that contribute to the loss, after the next-token shift."""
        if self.labels is None:
            return 0
        return int((shift_labels(self.labels) != IGNORE_INDEX).sum())

    @property
    def segment_lengths(self) -> torch.Tensor:
        """Length of every document (and padding tail) in the flattened tokens. [segments] int64"""
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()

    def to(self, device: torch.device) -> "MicroBatch":
        """The same micro-batch with its tensors on `device` (non-blocking from pinned memory)."""
        return dataclasses.replace(
            self, **{f.name: getattr(self, f.name).to(device, non_blocking=True)
                     for f in dataclasses.fields(self) if torch.is_tensor(getattr(self, f.name))})

    def without_labels(self) -> "MicroBatch":
        """The same rows for inference: the model returns logits instead of the loss."""
        return dataclasses.replace(self, labels=None)
