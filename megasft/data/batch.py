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
    # Context parallelism (megasft.context_parallel.sharding.split_micro_batch): this batch holds
    # one CP rank's s/cp tokens of each row. cu_seqlens and max_seqlen stay the FULL rows' (what
    # attention across the split needs), token_index [b*s/cp] says which of the full rows'
    # flattened tokens these are, and labels hold next-token targets already (shifted on the full
    # row, since a chunk's last token is trained on a token another rank holds).
    cp: int = 1
    token_index: Optional[torch.Tensor] = None
    labels_shifted: bool = False

    def targets(self) -> Optional[torch.Tensor]:
        """Next-token targets [b, s(/cp)]: position t is trained on the label of the token after it."""
        if self.labels is None or self.labels_shifted:
            return self.labels
        return shift_labels(self.labels)

    @property
    def trained_tokens(self) -> int:
        """Tokens that contribute to the loss, after the next-token shift."""
        if self.labels is None:
            return 0
        return int((self.targets() != IGNORE_INDEX).sum())

    @property
    def segment_lengths(self) -> torch.Tensor:
        """Length of every document (and padding tail) in the flattened full rows. [segments] int64"""
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()

    def token_doc_lengths(self) -> torch.Tensor:
        """Length of each held token's whole document (not of its CP chunk). [b, s(/cp)] int64"""
        lengths = self.segment_lengths
        full = torch.repeat_interleave(lengths, lengths, output_size=self.input_ids.numel() * self.cp)   # [b*s]
        return self.local(full.view(self.input_ids.shape[0], -1))

    def local(self, full: torch.Tensor) -> torch.Tensor:
        """This batch's tokens of a tensor over the full rows: [b, s, ...] -> [b, s/cp, ...]."""
        if self.token_index is None:
            return full
        b = full.shape[0]
        flat = full.reshape(-1, *full.shape[2:])[self.token_index.to(full.device)]
        return flat.view(b, -1, *full.shape[2:])

    def to(self, device: torch.device) -> "MicroBatch":
        """The same micro-batch with its tensors on `device` (non-blocking from pinned memory)."""
        return dataclasses.replace(
            self, **{f.name: getattr(self, f.name).to(device, non_blocking=True)
                     for f in dataclasses.fields(self) if torch.is_tensor(getattr(self, f.name))})

    def without_labels(self) -> "MicroBatch":
        """The same rows for inference: the model returns logits instead of the loss."""
        return dataclasses.replace(self, labels=None)
