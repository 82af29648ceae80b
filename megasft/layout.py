"""Layout: every fact derived from the parallel configuration, resolved once.

A :class:`Layout` is computed from a validated :class:`~megasft.config.Config` and the world size
before any process group exists (``Layout.resolve`` raises :class:`ConfigError` with the fix).
The model, the schedules, the training loop and the capacity planner all read it, so each rule —
which schedule runs, how layers split over pipeline chunks, how many forwards a stage runs before
its first backward, how kv heads are cut over TP, the bubble — is written here once.

Pipeline chunks: with pp stages and v model chunks per rank there are pp*v chunks; chunk c holds a
contiguous run of layers and lives on pipeline rank c % pp (Megatron's round-robin assignment for
the interleaved schedule, Narayanan et al. 2021, Sec. 2.2) — except under ZBV, whose two chunks
per rank form a V (Qi et al. 2023, Sec. 6): rank r holds chunks r and 2pp-1-r, so a micro-batch
runs down the ranks and back up, and chunks 0 and 2pp-1 are both on rank 0. The embedding is on
chunk 0, the final norm and LM head on chunk pp*v - 1.

Bubbles (Narayanan et al. 2021, Sec. 2.2), as the fraction of a step a stage idles, equal stage
costs and free communication: 1F1B and GPipe (p-1)/(m+p-1); interleaved (p-1)/(v*m+p-1);
ZB-H1 (Qi et al. 2023, F = B = W) (p-1)/(3m+p-1) for m >= p; ZBV (two half-stage chunks per rank,
F = B = W per chunk) (p-1)/(6m+p-1) for m >= p: only the last stage's wait for the first
micro-batch's p-1 chunk forwards is left.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from megasft.config import Config, ConfigError, divisors, split_rows

# The one set of schedule names (ParallelConfig.pipeline_schedule accepts these plus "auto").
NO_PIPELINE, ONE_F_ONE_B, INTERLEAVED, AFAB = "no_pipeline", "1f1b", "interleaved", "all_forward_all_backward"
ZB_H1, ZBV = "zb_h1", "zbv"
SCHEDULES = (NO_PIPELINE, ONE_F_ONE_B, INTERLEAVED, AFAB, ZB_H1, ZBV)


# ------------------------------------------------------------------------------ pure rules
def resolve_schedule(requested: str, pp: int, v: int) -> str:
    """The schedule ParallelConfig.pipeline_schedule selects for pp stages and v chunks per rank."""
    if requested not in ("auto",) + SCHEDULES:
        raise ConfigError(f"parallel.pipeline_schedule={requested!r} is not one of {['auto', *SCHEDULES]}")
    if v > 1 and pp == 1:
        raise ConfigError("parallel.virtual_pipeline_size > 1 needs pp > 1 (interleaving splits pipeline stages)")
    if pp == 1:
        return NO_PIPELINE
    if requested == "auto":
        return INTERLEAVED if v > 1 else ONE_F_ONE_B
    if requested == INTERLEAVED and v == 1:
        raise ConfigError("parallel.pipeline_schedule=interleaved needs virtual_pipeline_size > 1; "
                          "set parallel.virtual_pipeline_size=2 or use pipeline_schedule=1f1b")
    if requested == ZBV:
        if v != 2:
            raise ConfigError(f"parallel.pipeline_schedule=zbv places exactly two model chunks per rank in a V, "
                              f"but virtual_pipeline_size={v}; set parallel.virtual_pipeline_size=2")
        return ZBV
    if requested != INTERLEAVED and v > 1:
        raise ConfigError(f"parallel.pipeline_schedule={requested} runs one model chunk per rank, but {v} "
                          "model chunks per rank (virtual_pipeline_size) need the interleaved schedule; "
                          "use pipeline_schedule=interleaved (or auto)")
    return requested


def chunk_ranks(schedule: str, pp: int, v: int) -> list[int]:
    """The pipeline rank of each of the pp*v model chunks, in model order: round-robin (c % pp), or
    for ZBV the V — chunk c < pp on rank c, chunk c >= pp on rank 2pp-1-c."""
    if schedule == ZBV:
        return list(range(pp)) + list(range(pp - 1, -1, -1))
    return [c % pp for c in range(pp * v)]


def check_micro_batches(schedule: str, m: int, pp: int, fix: Optional[str] = None) -> None:
    """The interleaved schedule runs micro-batches in groups of pp per model chunk, so it needs m
    to be a multiple of pp (as Megatron-LM's). `fix` says what to change (default: m itself)."""
    if schedule == INTERLEAVED and m % pp:
        lower, upper = max(pp, m // pp * pp), (m // pp + 1) * pp
        fix = fix or f"use {lower} or {upper} micro-batches per step, or virtual_pipeline_size=1"
        raise ConfigError(f"interleaved pipelining needs micro-batches per step ({m}) to be a multiple "
                          f"of pp={pp}; {fix}")


def chunk_layer_counts(num_layers: int, chunks: int, explicit: Optional[Sequence[int]] = None) -> list[int]:
    """Decoder layers of each of the pp*v chunks in model order: the explicit list or an even split."""
    if explicit is not None:
        if len(explicit) != chunks or sum(explicit) != num_layers or min(explicit) < 1:
            raise ConfigError(f"parallel.pipeline_layers={list(explicit)} must list {chunks} positive counts "
                              f"(pp * virtual_pipeline_size) summing to num_layers={num_layers}")
        return list(explicit)
    if num_layers % chunks:
        suggestion = balanced_pipeline_layers(num_layers, chunks)
        hint = f" (e.g. {suggestion})" if suggestion else ""
        raise ConfigError(f"num_layers={num_layers} does not split evenly into pp*virtual_pipeline_size={chunks} "
                          f"chunks; choose pp*v in {divisors(num_layers)} or give parallel.pipeline_layers "
                          f"explicitly{hint}")
    return [num_layers // chunks] * chunks


def balanced_pipeline_layers(num_layers: int, chunks: int) -> Optional[list[int]]:
    """An explicit layer split when ``num_layers`` does not divide into ``chunks``, or None if it does.

    Every chunk gets ceil(L/chunks) layers; the surplus is taken away from the two ends first
    (first, last, second, second-to-last, ...), because chunk 0 also runs the embedding and the last
    chunk the LM head and loss. Llama 3 405B's own 126-layer, 16-stage pipeline is balanced the
    same way (Llama Team 2024, Sec. 3.3.2). None when a chunk would be left empty.
    """
    if num_layers % chunks == 0:
        return None
    per = -(-num_layers // chunks)
    surplus = per * chunks - num_layers
    if per == 1:
        return None
    layers = [per] * chunks
    order = [i for pair in zip(range(chunks), range(chunks - 1, -1, -1)) for i in pair]
    for index in list(dict.fromkeys(order))[:surplus]:
        layers[index] -= 1
    return layers


def kv_partition(num_kv_heads: int, tp: int) -> tuple[int, int]:
    """(kv heads per TP rank, TP ranks holding each copy): kv heads split when tp divides them;
    with fewer kv heads than TP ranks each rank holds a copy of the one head its queries use."""
    if num_kv_heads >= tp:
        return num_kv_heads // tp, 1
    return 1, tp // num_kv_heads


def warmup_forwards(schedule: str, pp: int, pp_rank: int, m: int, v: int = 1) -> int:
    """Forwards (of (micro-batch, chunk) pairs) stage pp_rank runs before its first backward.

    * no pipeline: none (each micro-batch runs forward then backward).
    * GPipe (all-forward-all-backward): all m.
    * 1F1B (PipeDream-Flush, Narayanan et al. 2021 Sec. 2.2.1): p - r - 1, so the last stage starts
      its first backward as early as possible.
    * interleaved (Megatron-LM's order, Sec. 2.2.2): the forwards that fit before the first
      gradient comes back round the ring (2 hops per stage below the last) plus one full round of
      the other v-1 chunks; with m == p there is no steady phase and all m*v forwards come first.
    """
    total = m * v
    if schedule == NO_PIPELINE:
        return 0
    if schedule == AFAB:
        return total
    if schedule == INTERLEAVED:
        return total if m == pp else min(2 * (pp - pp_rank - 1) + (v - 1) * pp, total)
    return min(pp - pp_rank - 1, m)   # 1F1B and ZB-H1


def in_flight(schedule: str, pp: int, pp_rank: int, m: int, v: int = 1) -> int:
    """Peak number of (micro-batch, chunk) forwards whose activations stage pp_rank holds: the
    warm-up forwards plus the one in steady state, at most all m*v of them. Summed over rank 0's
    interleaved chunks this is Korthikanti et al. 2022's factor (1 + (p-1)/(p v)) (Sec. 4.2.3).
    ZB-H1 counts a micro-batch until its W pass: every stage holds up to min(p, m). ZBV counts
    (micro-batch, chunk) pairs until their W: at most 2p on every rank, each half a stage — 1F1B's
    first-stage peak of p micro-batches."""
    if schedule == ZB_H1:
        from megasft.pipeline.zero_bubble import peak_in_flight
        return peak_in_flight(pp, pp_rank, m)
    if schedule == ZBV:
        from megasft.pipeline.zero_bubble_v import peak_in_flight_v
        return peak_in_flight_v(pp, pp_rank, m)
    return min(warmup_forwards(schedule, pp, pp_rank, m, v) + 1, m * v)


def bubble_fraction(schedule: str, pp: int, m: int, v: int = 1) -> float:
    """Idle fraction of a pipeline step (see the module docstring)."""
    if schedule == NO_PIPELINE or pp == 1:
        return 0.0
    if schedule == ZB_H1:   # (p-1) / (3m + p - 1) for m >= p (Qi et al. 2023, F = B = W)
        from megasft.pipeline.zero_bubble import simulated_bubble
        return simulated_bubble(pp, m)
    if schedule == ZBV:     # (p-1) / (6m + p - 1) for m >= p (tests/test_pipeline_zbv.py)
        from megasft.pipeline.zero_bubble_v import simulated_bubble_v
        return simulated_bubble_v(pp, m)
    return (pp - 1) / ((v if schedule == INTERLEAVED else 1) * m + pp - 1)


def bubble_slots(schedule: str, pp: int, v: int = 1) -> float:
    """Bubble length in units of one micro-batch's work on one rank: (p-1)/v (interleaved) or p-1."""
    if schedule == NO_PIPELINE or pp == 1:
        return 0.0
    if schedule == ZB_H1:   # (p-1)(F + B - W) with F = B = W, in units of F + B + W
        return (pp - 1) / 3
    if schedule == ZBV:     # p-1 chunk forwards, each F/2 of a micro-batch's F + B + W = 3F
        return (pp - 1) / 6
    return (pp - 1) / v if schedule == INTERLEAVED else float(pp - 1)


# ------------------------------------------------------------------------------ the Layout
@dataclass(frozen=True)
class Layout:
    """The resolved parallel layout of one run (the same object on every rank)."""

    world_size: int
    tp: int
    pp: int
    dp: int
    v: int                               # model chunks per pipeline rank
    sequence_parallel: bool              # requested and tp > 1
    schedule: str                        # one of SCHEDULES
    micro_batches: int                   # per optimizer step on one data-parallel rank (m)
    micro_batch_size: int                # rows per micro-batch
    seq_len: int
    hidden_size: int
    chunk_layers: tuple[int, ...]        # decoder layers of each of the pp*v chunks, model order
    kv_heads_per_rank: int
    kv_copies: int                       # TP ranks holding the same kv head (1 = split)
    cp: int = 1                          # context-parallel ranks sharing each row
    cp_comm: str = "ring"                # ring | a2a (parallel.cp_comm)
    ep: int = 1                          # expert-parallel ranks (carved from dp x cp)

    @classmethod
    def resolve(cls, cfg: Config, world_size: int) -> "Layout":
        """Check every rule that ties the parallel sizes to the model and the batch; raise
        ConfigError naming the fix. cfg must have passed Config.validate()."""
        m, p, d = cfg.model, cfg.parallel, cfg.data
        tp, cp, pp, v = p.tp, p.cp, p.pp, p.virtual_pipeline_size
        _check_tp(cfg)
        model_ranks = tp * cp * pp
        if world_size < 1 or world_size % model_ranks:
            names, sizes = ("tp*cp*pp", f"{tp}*{cp}*{pp}") if cp > 1 else ("tp*pp", f"{tp}*{pp}")
            raise ConfigError(
                f"world_size={world_size} is not divisible by {names}={sizes}={model_ranks}; "
                f"run on a multiple of {model_ranks} processes or choose {names} in {divisors(world_size)}")
        dp = world_size // model_ranks
        if p.dp is not None and p.dp != dp:
            split = f"tp={tp} * cp={cp} * pp={pp}" if cp > 1 else f"tp={tp} * pp={pp}"
            raise ConfigError(f"parallel.dp={p.dp} but world_size={world_size} / ({split}) = {dp}; "
                              f"set parallel.dp={dp} or leave it unset")
        if cp > 1:
            _check_cp(cfg)
        if m.num_experts:
            _check_moe(cfg, dp)
        elif p.ep > 1:
            raise ConfigError(f"parallel.ep={p.ep} shards routed experts, but this model has none "
                              f"(model.num_experts=0); leave parallel.ep=1 for a dense model")
        schedule = resolve_schedule(p.pipeline_schedule, pp, v)
        counts = chunk_layer_counts(m.num_layers, pp * v, p.pipeline_layers)
        sp = p.sequence_parallel and tp > 1
        if sp and d.seq_len % (tp * cp):
            # Under CP each rank's s/cp tokens are what SP splits over tp.
            need, names = (tp * cp, f"tp*cp: seq_len={d.seq_len}, tp={tp}, cp={cp}") if cp > 1 else \
                (tp, f"tp: seq_len={d.seq_len}, tp={tp}")
            raise ConfigError(f"sequence_parallel needs seq_len divisible by {names}; "
                              f"use seq_len={math.ceil(d.seq_len / need) * need}")
        micro = split_rows(d.global_batch_tokens, d.seq_len, dp, d.micro_batch_size)
        per = dp * d.micro_batch_size
        good = max(pp, micro // pp * pp) * per * d.seq_len
        check_micro_batches(schedule, micro, pp, f"use global_batch_tokens={good}")
        kv_local, kv_copies = kv_partition(m.kv_heads, tp)
        layout = cls(world_size, tp, pp, dp, v, sp, schedule, micro, d.micro_batch_size, d.seq_len,
                     m.hidden_size, tuple(counts), kv_local, kv_copies, cp, p.cp_comm, p.ep)
        if cfg.train.fp8 != "off":
            _check_fp8_gemms(cfg, layout)
        return layout

    @classmethod
    def validated(cls, cfg: Config, world_size: int) -> "Layout":
        """The whole start-up check: Config.validate() (every field), then resolve()."""
        return cls.resolve(cfg.validate(), world_size)

    # ----------------------------------------------------------------- pipeline chunks
    def rank_chunk_ids(self, pp_rank: int) -> list[int]:
        """Global chunk numbers of pipeline rank pp_rank's v chunks, in model order (its local
        chunk i is the i-th): r, r + pp, ... round-robin; r and 2pp-1-r in the ZBV V."""
        return [c for c, rank in enumerate(chunk_ranks(self.schedule, self.pp, self.v)) if rank == pp_rank]

    def rank_chunk_layers(self, pp_rank: int) -> list[int]:
        """Layer counts of the v chunks pipeline rank pp_rank owns, in chunk order."""
        return [self.chunk_layers[c] for c in self.rank_chunk_ids(pp_rank)]

    def rank_chunks(self, pp_rank: int) -> list[list[int]]:
        """Global layer ids of each model chunk held by pipeline rank pp_rank, in chunk order."""
        starts = [sum(self.chunk_layers[:c]) for c in range(len(self.chunk_layers))]
        return [list(range(starts[c], starts[c] + self.chunk_layers[c])) for c in self.rank_chunk_ids(pp_rank)]

    def chunk_index(self, pp_rank: int, local: int) -> int:
        """Global chunk number of pipeline rank pp_rank's local chunk `local`."""
        return self.rank_chunk_ids(pp_rank)[local]

    def holds_embedding(self, pp_rank: int, local: int) -> bool:
        return self.chunk_index(pp_rank, local) == 0

    def holds_head(self, pp_rank: int, local: int) -> bool:
        return self.chunk_index(pp_rank, local) == self.pp * self.v - 1

    @property
    def doc_multiple(self) -> int:
        """Every document is padded to a multiple of this many tokens: 2*cp chunks under CP."""
        return 2 * self.cp if self.cp > 1 else 1

    @property
    def head_rank(self) -> int:
        """The pipeline rank holding the final norm, LM head and loss: the last, or 0 under ZBV."""
        return chunk_ranks(self.schedule, self.pp, self.v)[-1]

    # ----------------------------------------------------------------- activations, schedule
    @property
    def activation_shape(self) -> tuple[int, int, int]:
        """Shape of the activation passed between stages: [s/cp/tp if SP else s/cp, b, h]."""
        s = self.seq_len // self.cp
        s = s // self.tp if self.sequence_parallel else s
        return (s, self.micro_batch_size, self.hidden_size)

    def in_flight(self, pp_rank: int) -> int:
        return in_flight(self.schedule, self.pp, pp_rank, self.micro_batches, self.v)

    @property
    def bubble_fraction(self) -> float:
        return bubble_fraction(self.schedule, self.pp, self.micro_batches, self.v)

    @property
    def bubble_slots(self) -> float:
        return bubble_slots(self.schedule, self.pp, self.v)

    def describe(self) -> str:
        pipeline = f"pp {self.pp} ({self.schedule}{f', v={self.v}' if self.v > 1 else ''})" if self.pp > 1 else "pp 1"
        cp = f" x cp {self.cp} ({self.cp_comm})" if self.cp > 1 else ""
        ep = f" (ep {self.ep})" if self.ep > 1 else ""
        return (f"tp {self.tp}{' + SP' if self.sequence_parallel else ''}{cp} x {pipeline} x dp {self.dp}{ep} "
                f"= {self.world_size} ranks")


def _check_cp(cfg: Config) -> None:
    """The rules context parallelism adds (megasft.context_parallel)."""
    m, p, d = cfg.model, cfg.parallel, cfg.data
    cp, step = p.cp, 2 * p.cp
    if d.seq_len % step:
        raise ConfigError(f"parallel.cp={cp} cuts every row into 2*cp={step} load-balanced chunks: seq_len={d.seq_len} "
                          f"is not a multiple of {step}; use seq_len={math.ceil(d.seq_len / step) * step}")
    if p.cp_comm == "a2a" and (m.num_attention_heads // p.tp) % cp:
        heads = m.num_attention_heads // p.tp
        raise ConfigError(f"parallel.cp_comm=a2a scatters each TP rank's {heads} query heads over cp={cp} ranks, "
                          f"which needs cp to divide them; choose cp in {divisors(heads)} or cp_comm=ring")


def _check_moe(cfg: Config, dp: int) -> None:
    """What a mixture-of-experts model (megasft.model.moe) needs of the layout: expert-TP cuts every
    expert's FFN evenly; expert parallelism splits the experts evenly over ep of the dp x cp ranks.
    Pipeline stages and CP ranks pool their router statistics per micro-batch
    (megasft.training.moe_aux, megasft.model.moe.moe_stats), so pp and cp are free."""
    from megasft.model.families import moe_ffn_size

    m, p = cfg.model, cfg.parallel
    ffn = moe_ffn_size(m)
    if ffn % p.tp:
        raise ConfigError(f"tp={p.tp} does not divide the experts' FFN width {ffn} (model.moe_intermediate_size); "
                          f"choose tp in {[x for x in divisors(m.num_attention_heads) if ffn % x == 0]}")
    replicas = dp * p.cp
    if p.ep > 1 and (replicas % p.ep or m.num_experts % p.ep):
        names, ranks = (f"dp*cp={dp}*{p.cp}={replicas}", "dp x cp") if p.cp > 1 else (f"dp={dp}", "dp")
        raise ConfigError(f"parallel.ep={p.ep} must divide both {names} (expert-parallel groups are carved from the "
                          f"{ranks} ranks) and model.num_experts={m.num_experts}; choose ep in "
                          f"{[e for e in divisors(replicas) if m.num_experts % e == 0]}")


def _check_tp(cfg: Config) -> None:
    """TP must cut query heads, kv heads (split or replicated) and the MLP evenly."""
    m, tp = cfg.model, cfg.parallel.tp
    if m.num_attention_heads % tp:
        raise ConfigError(f"tp={tp} does not divide num_attention_heads={m.num_attention_heads}; "
                          f"choose tp in {divisors(m.num_attention_heads)}")
    if m.kv_heads % tp and tp % m.kv_heads:
        valid = set(divisors(m.kv_heads)) | {k for k in divisors(m.num_attention_heads) if k % m.kv_heads == 0}
        raise ConfigError(f"tp={tp} and num_kv_heads={m.kv_heads}: one must divide the other so kv heads are "
                          f"split or replicated evenly; choose tp in {sorted(valid)}")
    if m.intermediate_size % tp:
        raise ConfigError(f"tp={tp} does not divide intermediate_size={m.intermediate_size}; choose tp in "
                          f"{[x for x in divisors(m.num_attention_heads) if m.intermediate_size % x == 0]}")


def _check_fp8_gemms(cfg: Config, layout: Layout) -> None:
    """Every FP8 GEMM dimension (tokens of a micro-batch, each linear's local in/out size) must be a
    multiple of 16, which Transformer Engine's FP8 GEMMs require."""
    m, d, fp8, tp = cfg.model, cfg.data, cfg.train.fp8, layout.tp

    def up(n: int, k: int) -> int:
        return math.ceil(n / k) * k

    d_head = m.head_size
    head_fix = f"use a head_dim that is a multiple of 16 (Llama: 128; now {d_head})"
    dims = [("data.seq_len * data.micro_batch_size (tokens per micro-batch)",
             d.seq_len * d.micro_batch_size, f"use data.seq_len={up(d.seq_len, 16)}"),
            ("model.hidden_size", m.hidden_size, f"use model.hidden_size={up(m.hidden_size, 16)}"),
            (f"num_attention_heads * head_dim / tp (this rank's q width, tp={tp})",
             m.num_attention_heads * d_head // tp, head_fix),
            (f"2 * kv heads per rank * head_dim (the fused k;v rows, tp={tp})",
             2 * layout.kv_heads_per_rank * d_head, head_fix),
            (f"intermediate_size / tp (tp={tp})", m.intermediate_size // tp,
             f"use model.intermediate_size={up(m.intermediate_size, 16 * tp)}")]
    for what, size, fix in dims:
        if size % 16:
            raise ConfigError(f"train.fp8={fp8}: {what} = {size} is not a multiple of 16, which "
                              f"Transformer Engine's FP8 GEMMs need; {fix}, or set train.fp8=off")
