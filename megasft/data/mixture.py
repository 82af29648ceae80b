"""Dataset mixtures (``data.sources``): the resolved plan and the deterministic, resumable row stream.

Each source has its own row stream: its documents' packing plan per epoch (the same
:meth:`PackedLoader.epoch_rows` as a single dataset, seeded per source by (train.seed, name)),
epoch after epoch. A global batch is ``rows_per_step`` row slots, filled one at a time: each slot
goes to the source whose trained tokens fall furthest short of its target share of all trained
tokens so far (``target * total - trained``; ties to the first-listed source). No random draw is
involved, so there is nothing to drift: a source ahead of its share is not chosen until the others
catch up, so every shortfall stays within a few rows' trained tokens (the share error shrinks as
1 / total; tests/test_data_mixture.py measures it), and the choice depends only on the counts,
never on the DP size — DP ranks only slice each global batch, as for a single dataset.

Targets: a ``weight`` source's is its weight. An ``epochs`` source trains ``epochs x`` its trained
tokens, T_e; with E = sum T_e and W = the sum of the weights, the run's trained tokens are
T = E / (1 - W) and an epochs source's target is T_e / T. An epochs source leaves the stream after
its last epoch; with any epochs source the run ends at the step where the last one is done
(:attr:`MixtureLoader.total_steps`, found by running the schedule over document lengths alone).

Within one step a source never repeats a document: a row holding one of the step's documents of that
source (the next epoch's copy) is deferred to the front of that source's next turn, as the single
loader's epoch seam does.

The state — per source (epoch, row, trained tokens, deferred rows) — is global, goes into every
checkpoint's meta.json, and resumes the exact row sequence at any DP size.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from megasft.config import split_rows
from megasft.config_sources import SourceConfig, read_sources
from megasft.data.batch import MicroBatch
from megasft.data.indexed import DatasetError, IndexedDataset
from megasft.data.loader import PackedLoader, split_documents
from megasft.data.packing import build_micro_batch

MAX_CLASHES = 4   # deferred rows in a row before a source sits out the rest of the step (a tiny source)


def doc_trained_tokens(ds: IndexedDataset, chunk: int = 1 << 20) -> np.ndarray:
    """Trained tokens of every document as the loss counts them (MicroBatch.trained_tokens): its mask
    without the first token, which predicts nothing across the document boundary. int64 [n_docs];
    reads the mask once, `chunk` documents at a time."""
    out = np.zeros(len(ds), np.int64)
    offsets = np.asarray(ds.offsets, np.int64)
    for a in range(0, len(ds), chunk):
        b = min(len(ds), a + chunk)
        lo, hi = offsets[a], offsets[b]
        mask, starts = ds.mask[lo:hi], offsets[a:b] - lo   # uint8 [tokens of the chunk], int64 [docs]
        out[a:b] = np.add.reduceat(mask, starts, dtype=np.int64) - mask[starts]
    return out


@dataclass
class SourceState:
    epoch: int = 0
    row: int = 0
    """Next row of this epoch's plan (the stream's position)."""
    trained: int = 0
    """Trained tokens of this source handed out so far."""
    deferred: list = field(default_factory=list)
    """(epoch, row) taken from the stream but not yet trained (they held a document of their step)."""

    def copy(self) -> "SourceState":
        return SourceState(self.epoch, self.row, self.trained, list(self.deferred))


class Source:
    """One source: its dataset, its train documents' plan per epoch, trained tokens per document."""

    def __init__(self, cfg: SourceConfig, data, seed: int, vocab_size: Optional[int], doc_multiple: int = 1) -> None:
        self.cfg, self.name, self.epochs, self.weight = cfg, cfg.name, cfg.epochs, cfg.weight
        self.dataset = IndexedDataset(cfg.path)
        self.dataset.check_trainable(vocab_size)
        fraction = 0.0 if cfg.eval_path else cfg.eval_fraction
        self.train_docs, self.eval_docs = split_documents(len(self.dataset), fraction, seed)
        # A per-source seed: sources of equal size must not share one shuffle.
        self.plan = PackedLoader(self.dataset, data.seq_len, data.global_batch_tokens, data.micro_batch_size,
                                 seed=seed * 2**32 + zlib.crc32(cfg.name.encode()), shuffle=data.shuffle,
                                 doc_indices=self.train_docs, doc_multiple=doc_multiple)
        self.doc_trained = doc_trained_tokens(self.dataset)
        self.tokens = int(self.dataset.lengths[self.train_docs].sum())
        self.trained_per_epoch = int(self.doc_trained[self.train_docs].sum())
        if self.trained_per_epoch == 0:
            raise DatasetError(f"data.sources[{self.name}] ({cfg.path}): its {len(self.train_docs)} training "
                               "documents hold no trained token (every mask is 0); check its preprocessing "
                               "(--train-on) or remove the source")

    def row_trained(self, row: list[int]) -> int:
        return int(self.doc_trained[row].sum())

    def has_rows(self, st: SourceState) -> bool:
        return self.epochs is None or st.epoch < self.epochs or bool(st.deferred)

    def take(self, st: SourceState, docs: set) -> Optional[list[int]]:
        """The source's next row holding none of `docs` (this step's documents of this source), or None;
        advances `st`. Deferred rows come first, in order."""
        for k, (e, r) in enumerate(st.deferred):
            row = self.plan.epoch_rows(e)[r]
            if docs.isdisjoint(row):
                del st.deferred[k]
                docs.update(row)
                return row
        clashes = 0
        while clashes < MAX_CLASHES and (self.epochs is None or st.epoch < self.epochs):
            rows = self.plan.epoch_rows(st.epoch)
            row, pos = rows[st.row], (st.epoch, st.row)
            st.row += 1
            if st.row == len(rows):
                st.epoch, st.row = st.epoch + 1, 0
            if docs.isdisjoint(row):
                docs.update(row)
                return row
            st.deferred.append(pos)
            clashes += 1
        return None


def targets(sources: list[Source]) -> list[float]:
    """Each source's target share of the trained tokens (module docstring)."""
    w = sum(s.weight for s in sources if s.weight is not None)
    epoch_tokens = sum(s.epochs * s.trained_per_epoch for s in sources if s.epochs is not None)
    total = epoch_tokens / (1 - w) if epoch_tokens else None
    return [s.weight if s.weight is not None else s.epochs * s.trained_per_epoch / total for s in sources]


class MixtureLoader:
    """Global batches of rows drawn from several sources (module docstring); the PackedLoader interface."""

    def __init__(self, sources: list[Source], seq_len: int, global_batch_tokens: int, micro_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0, steps: Optional[int] = None,
                 doc_multiple: int = 1) -> None:
        split_rows(global_batch_tokens, seq_len, dp_size, micro_batch_size)
        pads = {s.dataset.pad_id for s in sources}
        if len(pads) > 1:
            raise DatasetError(f"data.sources were preprocessed with different pad ids {sorted(pads)}; "
                               "preprocess every source with the same tokenizer")
        self.sources, self.pad_id = sources, pads.pop()
        self.seq_len, self.micro_batch_size, self.seed = seq_len, micro_batch_size, seed
        self.dp_rank, self.dp_size, self.doc_multiple = dp_rank, dp_size, doc_multiple
        self.rows_per_step = global_batch_tokens // seq_len
        self.rows_per_rank = self.rows_per_step // dp_size
        self.targets = targets(sources)
        self.state = [SourceState() for _ in sources]
        self.last_rows: list[tuple[str, list[int]]] = []
        """The global rows of the last step handed out: (source name, document ids)."""
        self.total_steps: Optional[int] = None
        self._run: Optional[tuple] = None   # the simulated run of describe_plan
        if any(s.epochs is not None for s in sources):
            self._run = self._simulate(None)
            self.total_steps = self._run[0]
        self.planned_steps = self.total_steps if self.total_steps is not None else steps

    # ------------------------------------------------------------------ the stream
    def _schedule_step(self) -> list[tuple[int, list[int]]]:
        """The next step's global rows as (source index, document ids); advances the state. Fewer
        than rows_per_step only when every source is exhausted (epochs sources only)."""
        st = [s.copy() for s in self.state]
        total = sum(s.trained for s in st)
        docs: list[set] = [set() for _ in self.sources]
        rows: list[tuple[int, list[int]]] = []
        out_this_step: set[int] = set()
        while len(rows) < self.rows_per_step:
            best, best_gap = -1, 0.0
            for i, src in enumerate(self.sources):
                if i in out_this_step or not src.has_rows(st[i]):
                    continue
                gap = self.targets[i] * total - st[i].trained
                if best < 0 or gap > best_gap:
                    best, best_gap = i, gap
            if best < 0:
                break
            row = self.sources[best].take(st[best], docs[best])
            if row is None:
                out_this_step.add(best)
                continue
            n = self.sources[best].row_trained(row)
            st[best].trained += n
            total += n
            rows.append((best, row))
        self.state = st
        return rows

    def _epochs_done(self) -> bool:
        return all(not s.has_rows(st) for s, st in zip(self.sources, self.state) if s.epochs is not None)

    def _simulate(self, steps: Optional[int]) -> tuple[int, list[SourceState], list[int]]:
        """Run the schedule from the start over lengths alone: `steps` steps, or (None) until every
        epochs source is done. Returns (steps, final states, rows per source); the state is kept."""
        saved, n, rows = self.state, 0, [0] * len(self.sources)
        self.state = [SourceState() for _ in self.sources]
        while (n < steps) if steps is not None else not self._epochs_done():
            got = self._schedule_step()
            if not got:
                break
            n += 1
            for i, _ in got:
                rows[i] += 1
        final, self.state = self.state, saved
        return n, final, rows

    def next_global_batch(self) -> list[MicroBatch]:
        """This rank's micro-batches of the next optimizer step; advances the state. A step short of
        rows (the end of an all-epochs mixture) is padded with empty rows."""
        rows = self._schedule_step()
        if not rows:
            raise DatasetError(f"data.sources: every source's epochs were consumed after {self.total_steps} "
                               "steps; train.steps must not exceed the derived count")
        self.last_rows = [(self.sources[i].name, docs) for i, docs in rows]
        rows = rows + [(-1, [])] * (self.rows_per_step - len(rows))
        mine = rows[self.dp_rank * self.rows_per_rank:(self.dp_rank + 1) * self.rows_per_rank]
        out = []
        for k in range(0, len(mine), self.micro_batch_size):
            docs = [[self.sources[i].dataset[d] for d in row] for i, row in mine[k:k + self.micro_batch_size]]
            out.append(build_micro_batch(docs, self.seq_len, self.pad_id, self.doc_multiple))
        return out

    def __iter__(self):
        while True:
            yield self.next_global_batch()

    def drain_tail_log(self) -> list[str]:
        return []   # sources roll from epoch to epoch (fill); there is nothing to report per step

    # ------------------------------------------------------------------ the plan
    def describe_plan(self) -> str:
        """Start-up lines: per source its documents, tokens, trained tokens, target and simulated share
        of the run, and how many times its documents are seen (the schedule run over lengths)."""
        steps = self.planned_steps
        how = ("derived: the last epochs source is done" if self.total_steps is not None else "train.steps")
        lines = [f"data: mixture of {len(self.sources)} sources, {self.rows_per_step} rows x {self.seq_len} "
                 f"tokens per step, {steps} steps ({how})"]
        if steps is None:
            return lines[0]
        _, final, rows = self._run if self._run is not None else self._simulate(steps)
        run_trained = [st.trained for st in final]
        total = max(1, sum(run_trained))
        # Fits the log's 100 columns: an `epochs` source shows its passes as its target ("3 ep").
        header = (f"  {'source':<10} {'docs':>8} {'tokens':>10} {'trained':>10} {'rows/ep':>7} {'target':>6} "
                  f"{'share':>6} {'run trained':>11} {'passes':>6}  seen per doc")
        lines.append(header)
        for src, st, n_rows, tgt, tr in zip(self.sources, final, rows, self.targets, run_trained):
            seen = self.seen_counts(src, st)[src.train_docs]
            lo, hi = int(seen.min()), int(seen.max())
            per_epoch = len(src.plan.epoch_rows(0))
            target = f"{tgt:.1%}" if src.epochs is None else f"{src.epochs} ep"
            lines.append(f"  {src.name:<10} {len(src.train_docs):>8} {src.tokens:>10} {src.trained_per_epoch:>10} "
                         f"{per_epoch:>7} {target:>6} {tr / total:>6.1%} {tr:>11} {n_rows / per_epoch:>6.2f}  "
                         f"{lo if lo == hi else f'{lo}-{hi}'}x (mean {seen.mean():.2f})")
        return "\n".join(lines)

    @staticmethod
    def seen_counts(src: Source, st: SourceState) -> np.ndarray:
        """Times each document (dataset id) was trained when the stream stands at `st`: every earlier
        epoch once, the rows before st.row of this one, minus the deferred rows. int64 [n_docs]."""
        seen = np.zeros(len(src.dataset), np.int64)
        seen[src.train_docs] = st.epoch
        for row in src.plan.epoch_rows(st.epoch)[:st.row] if st.row else []:
            seen[row] += 1
        for e, r in st.deferred:
            seen[src.plan.epoch_rows(e)[r]] -= 1
        return seen

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return {"kind": "mixture", "seed": self.seed, "seq_len": self.seq_len, "rows_per_step": self.rows_per_step,
                "doc_multiple": self.doc_multiple,
                "sources": [{"name": s.name, "num_docs": len(s.train_docs), "epoch": st.epoch, "row": st.row,
                             "trained": st.trained, "deferred": [list(d) for d in st.deferred]}
                            for s, st in zip(self.sources, self.state)]}

    def load_state_dict(self, state: dict) -> None:
        """Restore every source's position. The sources (names, documents), seed and seq_len must be the
        ones saved; weights may change (the shortfall rule steers toward the new targets)."""
        fix = ("resume with the same data.sources, seq_len, seed and parallel.cp (documents are padded to "
               "2*cp under context parallelism), or set data.reset_order_on_resume=true to start the data "
               "order afresh")
        if state.get("kind") != "mixture":
            raise DatasetError(f"the checkpoint's data state is of a single data.train_path run, this run reads "
                               f"data.sources; {fix}")
        for key, mine in (("seed", self.seed), ("seq_len", self.seq_len), ("doc_multiple", self.doc_multiple)):
            if state.get(key, 1 if key == "doc_multiple" else None) != mine:
                raise DatasetError(f"data state was saved with {key}={state[key]} but this run has {key}={mine}; {fix}")
        saved = {s["name"]: s for s in state["sources"]}
        mine_names = [s.name for s in self.sources]
        if sorted(saved) != sorted(mine_names):
            raise DatasetError(f"data state was saved with sources {sorted(saved)} but this run has "
                               f"{sorted(mine_names)}; {fix}")
        out = []
        for src in self.sources:
            s = saved[src.name]
            if s["num_docs"] != len(src.train_docs):
                raise DatasetError(f"data.sources[{src.name}] had {s['num_docs']} training documents when saved, "
                                   f"now {len(src.train_docs)}; {fix}")
            out.append(SourceState(int(s["epoch"]), int(s["row"]), int(s["trained"]),
                                   [(int(e), int(r)) for e, r in s["deferred"]]))
        self.state = out


class MixtureEval:
    """The eval split of every source that has one: name -> PackedLoader (one_pass per source)."""

    per_source = True

    def __init__(self, loaders: dict[str, PackedLoader]) -> None:
        self.loaders = loaders


def build_mixture(data, seed: int, dp_rank: int = 0, dp_size: int = 1, vocab_size: Optional[int] = None,
                  steps: Optional[int] = None, doc_multiple: int = 1) -> tuple[MixtureLoader, Optional[MixtureEval]]:
    """(train stream, per-source eval splits or None) from a DataConfig with ``sources``."""
    from megasft.config_sources import check_paths_exist

    check_paths_exist(data)
    configs = read_sources(data.sources)
    sources = [Source(c, data, seed, vocab_size, doc_multiple) for c in configs]
    common = dict(seq_len=data.seq_len, global_batch_tokens=data.global_batch_tokens,
                  micro_batch_size=data.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size, seed=seed,
                  doc_multiple=doc_multiple)
    train = MixtureLoader(sources, steps=steps, **common)
    evals = {}
    for src in sources:
        if src.cfg.eval_path:
            eval_ds = IndexedDataset(src.cfg.eval_path)
            eval_ds.check_trainable(vocab_size)
            evals[src.name] = PackedLoader(eval_ds, shuffle=False, **common)
        elif len(src.eval_docs):
            evals[src.name] = PackedLoader(src.dataset, shuffle=False, doc_indices=src.eval_docs, **common)
    return train, (MixtureEval(evals) if evals else None)
