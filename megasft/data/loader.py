"""Deterministic, resumable, token-sized global batches, sharded over data-parallel ranks.

One *epoch plan* = documents shuffled with (seed, epoch), packed best-fit-decreasing into rows of
``seq_len``, rows shuffled with the same generator. An optimizer step takes the next
``global_batch_tokens / seq_len`` rows of the current epoch's plan, rank ``dp_rank`` takes the
contiguous ``rows / dp_size`` of them at its offset and cuts them into micro-batches of
``micro_batch_size`` rows. Every rank computes the same plan from the document lengths alone (the
``.idx`` file) and reads token data only for its own rows.

An epoch's rows rarely divide into whole steps. The last, partial step of an epoch is either
``fill``-ed from the next epoch's plan — taking its rows in order but deferring (to the front of the
next step) every row holding a document already in this step, so no document is trained twice in
one step — or its rows are ``drop``-ped. With ``epochs`` set the stream ends after that many epochs
(its last step is padded with empty rows) and :attr:`PackedLoader.total_steps` is the exact step
count, found by running the schedule over the document lengths alone.

The state is global — (epoch, rows consumed in that epoch, deferred rows) — so a resumed run, even
with another ``dp_size``, sees exactly the rows an uninterrupted run would have seen.

Wiring into a trainer::

    train, evalset = build_loaders(cfg.data, seed=cfg.train.seed, dp_rank=ps.dp_rank, dp_size=ps.dp)
    train.load_state_dict(ckpt["data"])          # on resume
    micro_batches = train.next_global_batch()    # list[dict] for this rank, one optimizer step
    ckpt["data"] = train.state_dict()
    for micro_batches in evalset.one_pass(): ...  # finite; the last batch is padded with empty rows
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np

from megasft.config import split_rows
from megasft.data.batch import MicroBatch
from megasft.data.indexed import DatasetError, IndexedDataset
from megasft.data.packing import build_micro_batch, pack_best_fit, padded_lengths


EPOCH_TAILS = ("fill", "drop")


@dataclass
class LoaderState:
    epoch: int = 0
    rows_consumed: int = 0
    """Rows of this epoch's plan already handed out or deferred (over all DP ranks)."""
    deferred: list = field(default_factory=list)
    """(epoch, row) of rows skipped by a filled step because they hold one of its documents;
    they open the next step."""
    dropped_rows: int = 0
    """Rows dropped at epoch tails so far (epoch_tail=drop)."""


class PackedLoader:
    """Global batches of packed rows for one DP rank (see module docstring)."""

    def __init__(self, dataset: IndexedDataset | str, seq_len: int, global_batch_tokens: int,
                 micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 shuffle: bool = True, doc_indices: Optional[Sequence[int]] = None,
                 epochs: Optional[int] = None, epoch_tail: str = "fill", doc_multiple: int = 1) -> None:
        self.dataset = dataset if isinstance(dataset, IndexedDataset) else IndexedDataset(dataset)
        split_rows(global_batch_tokens, seq_len, dp_size, micro_batch_size)   # the config's rule, its message
        self.rows_per_step = global_batch_tokens // seq_len
        if epoch_tail not in EPOCH_TAILS:
            raise ValueError(f"epoch_tail={epoch_tail!r} is not one of {list(EPOCH_TAILS)}")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs={epochs} must be >= 1 (or None for an endless stream)")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} outside 0..{dp_size - 1}")
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.dp_rank, self.dp_size, self.seed, self.shuffle = dp_rank, dp_size, seed, shuffle
        self.rows_per_rank = self.rows_per_step // dp_size
        self.doc_indices = np.arange(len(self.dataset)) if doc_indices is None else np.asarray(doc_indices, np.int64)
        if len(self.doc_indices) == 0:
            raise ValueError(f"{self.dataset.dir}: no documents to load")
        # Under context parallelism every document takes a multiple of 2*cp slots (megasft.context_parallel).
        self.doc_multiple = doc_multiple
        self.lengths = padded_lengths(self.dataset.lengths, doc_multiple)   # [docs] slots per document
        too_long = self.lengths[self.doc_indices] > seq_len
        if too_long.any():
            d = int(self.doc_indices[np.flatnonzero(too_long)[0]])
            padded = f" (padded to {int(self.lengths[d])}, a multiple of 2*cp)" if doc_multiple > 1 else ""
            raise ValueError(f"{self.dataset.dir}: document {d} has {int(self.dataset.lengths[d])} tokens{padded} > "
                             f"seq_len={seq_len}; re-run megasft preprocess with --seq-len {seq_len - doc_multiple + 1}")
        self.pad_id = self.dataset.pad_id
        self.epochs, self.epoch_tail = epochs, epoch_tail
        self.state = LoaderState()
        self._plans: dict[int, list[list[int]]] = {}
        self._tail_log: list[str] = []
        self.total_steps: Optional[int] = self._count_steps() if epochs is not None else None

    # ------------------------------------------------------------------ plan
    def epoch_rows(self, epoch: int) -> list[list[int]]:
        """Rows (lists of document ids) of one epoch, in the order they are consumed."""
        if epoch not in self._plans:
            rng = np.random.default_rng([self.seed, epoch])
            docs = self.doc_indices[rng.permutation(len(self.doc_indices))] if self.shuffle else self.doc_indices
            rows = [[int(docs[i]) for i in row] for row in pack_best_fit(self.lengths[docs], self.seq_len)]
            if self.shuffle:
                rows = [rows[i] for i in rng.permutation(len(rows))]
            # Keep the current and the next epoch: a filled step reaches one boundary further.
            self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}
            self._plans[epoch] = rows
        return self._plans[epoch]

    def rows_per_epoch(self) -> int:
        return len(self.epoch_rows(self.state.epoch))

    # ------------------------------------------------------------------ batches
    def _has_epoch(self, epoch: int) -> bool:
        return self.epochs is None or epoch < self.epochs

    def _schedule_step(self) -> list[list[int]]:
        """The next step's global rows (document ids); advances the state. Fewer than rows_per_step
        only at the end of an ``epochs``-limited stream; [] once it is exhausted."""
        st = self.state
        epoch, consumed, deferred = st.epoch, st.rows_consumed, list(st.deferred)
        dropped = st.dropped_rows
        if self.epoch_tail == "drop" and self._has_epoch(epoch):
            left = len(self.epoch_rows(epoch)) - consumed + len(deferred)
            if 0 < left < self.rows_per_step:
                dropped += left
                self._tail_log.append(f"epoch {epoch}: dropped its last {left} rows (fewer than the "
                                      f"{self.rows_per_step} of a step; data.epoch_tail=drop)")
                epoch, consumed, deferred = epoch + 1, 0, []
        rows: list[list[int]] = []
        docs: set[int] = set()
        start_epoch, pending, deferred = epoch, deferred, []

        def offer(e: int, r: int) -> None:
            row = self.epoch_rows(e)[r]
            if docs.isdisjoint(row):
                rows.append(row)
                docs.update(row)
            else:   # a document of this step again (the next epoch's copy): train it next step
                deferred.append((e, r))

        for i, (e, r) in enumerate(pending):   # rows deferred by the previous step come first
            if len(rows) == self.rows_per_step:
                deferred += pending[i:]
                break
            offer(e, r)
        while len(rows) < self.rows_per_step and self._has_epoch(epoch):
            if consumed == len(self.epoch_rows(epoch)):
                if self.epoch_tail == "drop" and rows:
                    break   # a dropping run never mixes two epochs in one step
                epoch, consumed = epoch + 1, 0
                continue
            consumed += 1
            offer(epoch, consumed - 1)
        if epoch != start_epoch and rows and self.epoch_tail == "fill" and self._has_epoch(epoch):
            self._tail_log.append(f"epoch {start_epoch}: its last step was filled from epoch {epoch}'s plan"
                                  f" ({len(deferred)} rows holding a document of that step deferred to the next)")
        self.state = LoaderState(epoch, consumed, deferred, dropped)
        return rows

    def next_global_batch(self) -> list[MicroBatch]:
        """This rank's micro-batches of the next optimizer step; advances the state. The last step
        of an ``epochs``-limited stream is padded with empty rows (every rank runs as many
        micro-batches); past its end this is a DatasetError."""
        rows = self._schedule_step()
        if not rows:
            raise DatasetError(f"{self.dataset.dir}: all {self.epochs} epochs were consumed after "
                               f"{self.total_steps} steps; train.steps must not exceed the derived count")
        return self._micro_batches(rows + [[]] * (self.rows_per_step - len(rows)))

    def _count_steps(self) -> int:
        """Steps of the whole ``epochs``-limited stream: the schedule run over lengths alone."""
        saved, steps = self.state, 0
        while self._schedule_step():
            steps += 1
        self.state, self._tail_log = saved, []
        return steps

    def drain_tail_log(self) -> list[str]:
        """What happened at epoch tails since the last call (one line each), for the run log."""
        out, self._tail_log = self._tail_log, []
        return out

    def describe_plan(self) -> str:
        """The start-up lines: rows per epoch, steps per epoch, tail handling, the derived steps."""
        rows = self.rows_per_epoch()
        n = len(self.doc_indices)
        tokens = int(self.dataset.lengths[self.doc_indices].sum())
        lines = [f"data: {n} documents, {tokens} tokens packed into {rows} rows of {self.seq_len} "
                 f"(epoch 0; {tokens / max(1, rows * self.seq_len):.1%} full), {self.rows_per_step} rows "
                 f"per step = {rows / self.rows_per_step:.2f} steps per epoch; epoch tails are "
                 f"{'filled from the next epoch' if self.epoch_tail == 'fill' else 'dropped'} "
                 f"(data.epoch_tail={self.epoch_tail})"]
        if self.total_steps is not None:
            lines.append(f"data: train.epochs={self.epochs} -> {self.total_steps} steps")
        return "\n".join(lines)

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

    def _micro_batches(self, global_rows: list[list[int]]) -> list[MicroBatch]:
        mine = global_rows[self.dp_rank * self.rows_per_rank:(self.dp_rank + 1) * self.rows_per_rank]
        out = []
        for k in range(0, len(mine), self.micro_batch_size):
            rows = [[self.dataset[d] for d in row] for row in mine[k:k + self.micro_batch_size]]
            out.append(build_micro_batch(rows, self.seq_len, self.pad_id, self.doc_multiple))
        return out

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        st = self.state
        return {"epoch": st.epoch, "rows_consumed": st.rows_consumed, "deferred": [list(d) for d in st.deferred],
                "dropped_rows": st.dropped_rows, "seed": self.seed, "seq_len": self.seq_len,
                "num_docs": len(self.doc_indices), "rows_per_step": self.rows_per_step,
                "epoch_tail": self.epoch_tail, "doc_multiple": self.doc_multiple}

    def load_state_dict(self, state: dict) -> None:
        """Restore (epoch, rows consumed). The plan must be the same one: same seed, seq_len, documents."""
        if state.get("kind") == "mixture":
            raise DatasetError("the checkpoint's data state is of a data.sources mixture, this run reads "
                               "data.train_path; resume with the same data.sources, or set "
                               "data.reset_order_on_resume=true to start the data order afresh")
        for key, mine in (("seed", self.seed), ("seq_len", self.seq_len), ("num_docs", len(self.doc_indices)),
                          ("epoch_tail", self.epoch_tail), ("doc_multiple", self.doc_multiple)):
            if state.get(key, mine) != mine:
                raise DatasetError(f"data state was saved with {key}={state[key]} but this loader has {key}={mine}; "
                                   "resume with the same data, seq_len, seed and parallel.cp (documents are "
                                   "padded to 2*cp under context parallelism, which changes the packing), or set "
                                   "data.reset_order_on_resume=true to start the data order afresh")
        self.state = LoaderState(int(state["epoch"]), int(state["rows_consumed"]),
                                 [(int(e), int(r)) for e, r in state.get("deferred", [])],
                                 int(state.get("dropped_rows", 0)))


def split_documents(num_docs: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, eval) document indices; eval gets round(fraction * n) documents (>= 1 if fraction > 0)."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction={eval_fraction} must be in [0, 1)")
    n_eval = max(1, round(eval_fraction * num_docs)) if eval_fraction > 0 else 0
    perm = np.random.default_rng([seed, 0x5EED]).permutation(num_docs)
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


def build_loaders(data, seed: int, dp_rank: int = 0, dp_size: int = 1, vocab_size: Optional[int] = None,
                  epochs: Optional[int] = None, steps: Optional[int] = None,
                  doc_multiple: int = 1) -> tuple[PackedLoader, Optional[PackedLoader]]:
    """(train loader, eval loader or None) from a DataConfig: eval from ``eval_path`` if given, else a
    seeded ``eval_fraction`` of the training documents. With ``vocab_size`` (the model's), a dataset
    holding a token id >= vocab_size is a DatasetError here, before any step (see
    :meth:`IndexedDataset.check_trainable`); so is an empty one. ``epochs`` (train.epochs) limits
    the training stream; its ``total_steps`` is then the run's step count. With ``data.sources`` the
    loaders are megasft.data.mixture's (``steps``, train.steps, sizes its start-up plan).
    ``doc_multiple`` (Layout.doc_multiple: 2*cp under context parallelism) pads every document."""
    if getattr(data, "sources", None):
        from megasft.data.mixture import build_mixture

        return build_mixture(data, seed, dp_rank, dp_size, vocab_size, steps=steps, doc_multiple=doc_multiple)
    if data.train_path is None:
        raise ValueError("data.train_path is not set; point it at a directory written by megasft preprocess")
    train_ds = IndexedDataset(data.train_path)
    train_ds.check_trainable(vocab_size)
    common = dict(seq_len=data.seq_len, global_batch_tokens=data.global_batch_tokens,
                  micro_batch_size=data.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size, seed=seed,
                  doc_multiple=doc_multiple)
    train_docs, eval_docs = split_documents(len(train_ds), 0.0 if data.eval_path else data.eval_fraction, seed)
    train = PackedLoader(train_ds, shuffle=data.shuffle, doc_indices=train_docs, epochs=epochs,
                         epoch_tail=data.epoch_tail, **common)
    if data.eval_path:
        eval_ds = IndexedDataset(data.eval_path)
        eval_ds.check_trainable(vocab_size)
        evalset = PackedLoader(eval_ds, shuffle=False, **common)
    elif len(eval_docs):
        evalset = PackedLoader(train_ds, shuffle=False, doc_indices=eval_docs, **common)
    else:
        evalset = None
    return train, evalset
