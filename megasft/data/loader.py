"""Deterministic, resumable, token-sized global batches, sharded over data-parallel ranks.

One *epoch plan* = documents shuffled with (seed, epoch), packed best-fit-decreasing into rows of
``seq_len``, rows shuffled with the same generator. Epoch plans are concatenated into one endless
stream of rows; an optimizer step takes the next ``global_batch_tokens / seq_len`` rows of the stream,
rank ``dp_rank`` takes the contiguous ``rows / dp_size`` of them at its offset and cuts them into
micro-batches of ``micro_batch_size`` rows. Every rank computes the same plan from the document
lengths alone (the ``.idx`` file) and reads token data only for its own rows.

The state is global — (epoch, rows consumed in that epoch) — so a resumed run, even with another
``dp_size``, sees exactly the rows an uninterrupted run would have seen.

Wiring into a trainer::

    train, evalset = build_loaders(cfg.data, seed=cfg.train.seed, dp_rank=ps.dp_rank, dp_size=ps.dp)
    train.load_state_dict(ckpt["data"])          # on resume
    micro_batches = train.next_global_batch()    # list[dict] for this rank, one optimizer step
    ckpt["data"] = train.state_dict()
    for micro_batches in evalset.one_pass(): ...  # finite; the last batch is padded with empty rows
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np

from megasft.data.indexed import DatasetError, IndexedDataset
from megasft.data.packing import build_micro_batch, pack_best_fit


@dataclass
class LoaderState:
    epoch: int = 0
    rows_consumed: int = 0
    """Rows of this epoch's plan already handed out (over all DP ranks)."""


class PackedLoader:
    """Global batches of packed rows for one DP rank (see module docstring)."""

    def __init__(self, dataset: IndexedDataset | str, seq_len: int, global_batch_tokens: int,
                 micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 shuffle: bool = True, doc_indices: Optional[Sequence[int]] = None) -> None:
        self.dataset = dataset if isinstance(dataset, IndexedDataset) else IndexedDataset(dataset)
        if global_batch_tokens % seq_len:
            raise ValueError(f"global_batch_tokens={global_batch_tokens} is not a multiple of seq_len={seq_len}")
        self.rows_per_step = global_batch_tokens // seq_len
        if self.rows_per_step % (dp_size * micro_batch_size):
            raise ValueError(f"{self.rows_per_step} rows per step do not split into dp_size={dp_size} x "
                             f"micro_batch_size={micro_batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} outside 0..{dp_size - 1}")
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.dp_rank, self.dp_size, self.seed, self.shuffle = dp_rank, dp_size, seed, shuffle
        self.rows_per_rank = self.rows_per_step // dp_size
        self.doc_indices = np.arange(len(self.dataset)) if doc_indices is None else np.asarray(doc_indices, np.int64)
        if len(self.doc_indices) == 0:
            raise ValueError(f"{self.dataset.dir}: no documents to load")
        too_long = self.dataset.lengths[self.doc_indices] > seq_len
        if too_long.any():
            d = int(self.doc_indices[np.flatnonzero(too_long)[0]])
            raise ValueError(f"{self.dataset.dir}: document {d} has {int(self.dataset.lengths[d])} tokens > "
                             f"seq_len={seq_len}; re-run preprocess_data.py with --seq-len {seq_len}")
        self.pad_id = self.dataset.pad_id
        self.state = LoaderState()
        self._plans: dict[int, list[list[int]]] = {}

    # ------------------------------------------------------------------ plan
    def epoch_rows(self, epoch: int) -> list[list[int]]:
        """Rows (lists of document ids) of one epoch, in the order they are consumed."""
        if epoch not in self._plans:
            rng = np.random.default_rng([self.seed, epoch])
            docs = self.doc_indices[rng.permutation(len(self.doc_indices))] if self.shuffle else self.doc_indices
            rows = [[int(docs[i]) for i in row] for row in pack_best_fit(self.dataset.lengths[docs], self.seq_len)]
            if self.shuffle:
                rows = [rows[i] for i in rng.permutation(len(rows))]
            # Keep at most the current and the next epoch: a global batch can straddle one boundary.
            self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}
            self._plans[epoch] = rows
        return self._plans[epoch]

    def rows_per_epoch(self) -> int:
        return len(self.epoch_rows(self.state.epoch))

    # ------------------------------------------------------------------ batches
    def next_global_batch(self) -> list[dict]:
        """This rank's micro-batches of the next optimizer step; advances the state."""
        global_rows = []
        epoch, consumed = self.state.epoch, self.state.rows_consumed
        while len(global_rows) < self.rows_per_step:
            plan = self.epoch_rows(epoch)
            take = plan[consumed:consumed + self.rows_per_step - len(global_rows)]
            global_rows += take
            consumed += len(take)
            if consumed == len(plan):
                epoch, consumed = epoch + 1, 0
        self.state = LoaderState(epoch, consumed)
        return self._micro_batches(global_rows)

    def __iter__(self) -> Iterator[list[dict]]:
        while True:
            yield self.next_global_batch()

    def one_pass(self) -> Iterator[list[dict]]:
        """Every row of epoch 0 once (eval): global batches, the last one padded with empty rows so
        every rank runs the same number of micro-batches. Does not touch the state."""
        rows = self.epoch_rows(0)
        for start in range(0, len(rows), self.rows_per_step):
            chunk = rows[start:start + self.rows_per_step]
            yield self._micro_batches(chunk + [[]] * (self.rows_per_step - len(chunk)))

    def _micro_batches(self, global_rows: list[list[int]]) -> list[dict]:
        mine = global_rows[self.dp_rank * self.rows_per_rank:(self.dp_rank + 1) * self.rows_per_rank]
        out = []
        for k in range(0, len(mine), self.micro_batch_size):
            rows = [[self.dataset[d] for d in row] for row in mine[k:k + self.micro_batch_size]]
            out.append(build_micro_batch(rows, self.seq_len, self.pad_id))
        return out

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return {"epoch": self.state.epoch, "rows_consumed": self.state.rows_consumed, "seed": self.seed,
                "seq_len": self.seq_len, "num_docs": len(self.doc_indices), "rows_per_step": self.rows_per_step}

    def load_state_dict(self, state: dict) -> None:
        """Restore (epoch, rows consumed). The plan must be the same one: same seed, seq_len, documents."""
        for key, mine in (("seed", self.seed), ("seq_len", self.seq_len), ("num_docs", len(self.doc_indices))):
            if state.get(key, mine) != mine:
                raise DatasetError(f"data state was saved with {key}={state[key]} but this loader has {key}={mine}; "
                                   "resume with the same data, seq_len and seed, or set "
                                   "data.reset_order_on_resume=true to start the data order afresh")
        self.state = LoaderState(int(state["epoch"]), int(state["rows_consumed"]))


def split_documents(num_docs: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, eval) document indices; eval gets round(fraction * n) documents (>= 1 if fraction > 0)."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction={eval_fraction} must be in [0, 1)")
    n_eval = max(1, round(eval_fraction * num_docs)) if eval_fraction > 0 else 0
    perm = np.random.default_rng([seed, 0x5EED]).permutation(num_docs)
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


def build_loaders(data, seed: int, dp_rank: int = 0, dp_size: int = 1,
                  vocab_size: Optional[int] = None) -> tuple[PackedLoader, Optional[PackedLoader]]:
    """(train loader, eval loader or None) from a DataConfig: eval from ``eval_path`` if given, else a
    seeded ``eval_fraction`` of the training documents. With ``vocab_size`` (the model's), a dataset
    holding a token id >= vocab_size is a DatasetError here, before any step (see
    :meth:`IndexedDataset.check_trainable`); so is an empty one."""
    if data.train_path is None:
        raise ValueError("data.train_path is not set; point it at a directory written by tools/preprocess_data.py")
    train_ds = IndexedDataset(data.train_path)
    train_ds.check_trainable(vocab_size)
    common = dict(seq_len=data.seq_len, global_batch_tokens=data.global_batch_tokens,
                  micro_batch_size=data.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size, seed=seed)
    train_docs, eval_docs = split_documents(len(train_ds), 0.0 if data.eval_path else data.eval_fraction, seed)
    train = PackedLoader(train_ds, shuffle=data.shuffle, doc_indices=train_docs, **common)
    if data.eval_path:
        eval_ds = IndexedDataset(data.eval_path)
        eval_ds.check_trainable(vocab_size)
        evalset = PackedLoader(eval_ds, shuffle=False, **common)
    elif len(eval_docs):
        evalset = PackedLoader(train_ds, shuffle=False, doc_indices=eval_docs, **common)
    else:
        evalset = None
    return train, evalset
