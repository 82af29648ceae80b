"""Typed run configuration: one dataclass per section, a docstring per field, one validate().

A config is read from YAML (nested sections) and patched with ``section.key=value`` overrides
from the command line. :meth:`Config.validate` checks every field and the rules within a
section; the rules that tie the parallel sizes to the model, the batch and the world size are
resolved by :meth:`megasft.layout.Layout.resolve`. Both run before any process group or tensor is
created and raise :class:`ConfigError` with a message that says what to change.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import yaml

from megasft.config_fields import field_problem
from megasft.config_read import build_section, unknown_message, yaml_message
from megasft.config_sources import SourceConfig, check_sources, read_sources
from megasft.errors import ConfigError
from megasft.model.families import FAMILIES, family_problem, gemma_problem, moe_problem, rope_field_problem

if TYPE_CHECKING:   # config stays importable without torch for the tools that only read it
    import torch


def split_rows(global_batch_tokens: int, seq_len: int, dp: int = 1, micro_batch_size: int = 1) -> int:
    """Micro-batches per DP rank of a step (m): the global batch cut into rows of seq_len tokens,
    the rows into dp x micro_batch_size. ConfigError with the nearest valid global_batch_tokens."""
    if global_batch_tokens % seq_len:
        raise ConfigError(
            f"data.global_batch_tokens={global_batch_tokens} is not a multiple of seq_len={seq_len}; "
            f"use {max(1, round(global_batch_tokens / seq_len)) * seq_len}")
    rows, per = global_batch_tokens // seq_len, dp * micro_batch_size
    if rows % per:
        raise ConfigError(f"{rows} rows per step (global_batch_tokens/seq_len) do not split into dp={dp} x "
                          f"micro_batch_size={micro_batch_size}; use global_batch_tokens="
                          f"{max(1, rows // per) * per * seq_len}")
    return rows // per


def divisors(n: int) -> list[int]:
    """The divisors of n, ascending (the valid choices an error message offers)."""
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class ModelConfig:
    preset: Optional[str] = None
    """Name from megasft.model.presets (e.g. 'llama3.1-8b'); explicit fields override it."""
    family: str = "llama"
    """llama | qwen2 | qwen3 | mistral | gemma2 | gemma3_text | phi3 | qwen3_moe | mixtral: the Hugging Face model_type (megasft.model.families). With
    model.init_from_hf it comes from config.json, as every architecture field does."""
    vocab_size: int = 32000
    """Tokenizer vocabulary size (the embedding is padded beyond it; padded rows are never predicted)."""
    hidden_size: int = 4096
    """Model width d."""
    intermediate_size: int = 11008
    """SwiGLU inner width."""
    num_layers: int = 32
    """Number of decoder layers."""
    num_attention_heads: int = 32
    """Query heads."""
    num_kv_heads: Optional[int] = None
    """Key/value heads for grouped-query attention; None means num_attention_heads (MHA)."""
    head_dim: Optional[int] = None
    """Per-head width; None means hidden_size // num_attention_heads."""
    rms_norm_eps: float = 1e-5
    """Epsilon inside RMSNorm."""
    rope_theta: float = 10000.0
    """RoPE base frequency (Llama-3: 500000)."""
    rope_scaling: Optional[dict] = None
    """HF-style rope_scaling dict (megasft.model.rope): rope_type 'llama3' (factor, low/high_freq_factor,
    original_max_position_embeddings) or 'longrope' / 'su' (short_factor, long_factor, optional
    factor / attention_factor; Phi-3)."""
    partial_rotary_factor: float = 1.0
    """Fraction of each head's dims RoPE rotates, the rest pass through (Phi-4-mini: 0.75; phi3 only)."""
    original_max_position_embeddings: Optional[int] = None
    """Phi-3's pretraining length (config.json's top-level key, phi3 only): longrope uses long_factor
    for documents longer than this and derives its attention factor from it."""
    max_position_embeddings: int = 4096
    """Longest position the model is meant for (written to HF exports)."""
    tie_embeddings: bool = False
    """Share the input embedding and the LM head (small Llamas do)."""
    qkv_bias: bool = False
    """Bias on the q/k/v projections (Qwen2-style)."""
    qk_norm: bool = False
    """Per-head RMSNorm on q and k before RoPE (Qwen3), one [head_dim] weight each per layer."""
    sliding_window: Optional[int] = None
    """Each token attends to at most this many tokens of its own document, itself included
    (Mistral's sliding window, on every layer; Gemma's on its sliding_attention layers); None =
    full causal attention."""
    layer_types: Optional[list] = None
    """Gemma: 'sliding_attention' or 'full_attention' per layer (the window applies to the first
    only); None = every layer alike."""
    query_pre_attn_scalar: Optional[int] = None
    """Gemma: attention scores are scaled by this ** -0.5 instead of head_dim ** -0.5."""
    attn_logit_softcapping: Optional[float] = None
    """Gemma 2: attention scores become c * tanh(scores / c), c this value; None = uncapped."""
    final_logit_softcapping: Optional[float] = None
    """Gemma 2/3: output logits become c * tanh(logits / c) (inside the fused loss too); None = uncapped."""
    rope_local_theta: Optional[float] = None
    """Gemma 3: RoPE base of the sliding_attention layers (rope_local_base_freq; no rope_scaling
    there); None = rope_theta."""
    num_experts: int = 0
    """Routed experts per mixture-of-experts layer (families qwen3_moe, mixtral; megasft.model.moe);
    0 = a dense model."""
    moe_top_k: int = 2
    """Experts each token is routed to (HF num_experts_per_tok)."""
    moe_intermediate_size: Optional[int] = None
    """A routed expert's SwiGLU inner width (Qwen3-MoE's moe_intermediate_size); None =
    intermediate_size (Mixtral's experts are as wide as a dense MLP)."""
    moe_norm_topk_prob: bool = True
    """Renormalise a token's top-k routing probabilities to sum to 1 (Mixtral always; Qwen3-MoE's
    norm_topk_prob)."""
    moe_dense_layers: Optional[list] = None
    """Decoder layers of a MoE model that keep the dense MLP (intermediate_size wide): e.g. [0, 1, 2]
    for first-k-dense (DeepSeek's first_k_dense_replace=3); Qwen3-MoE's mlp_only_layers and
    decoder_sparse_step are read into this list. None = experts on every layer."""
    moe_aux_loss_coef: float = 0.001
    """Weight of the load-balancing loss added to the SFT loss (Switch Transformer eq. 4, as
    transformers' router_aux_loss_coef * load_balancing_loss_func, per micro-batch; see
    megasft.model.moe). 0 trains without it (it is still logged). Not read from config.json."""
    moe_z_loss_coef: float = 0.0
    """Weight of the router z-loss (Zoph et al. 2022, ST-MoE eq. 5): the mean over MoE layers and
    tokens of logsumexp(router logits)^2; 0 = off."""
    moe_router: str = "softmax"
    """How a token picks its experts (megasft.model.router): softmax (Mixtral, Qwen3-MoE: top-k of
    the softmax) | sigmoid_group (DeepSeek-V3: sigmoid scores plus a load-balancing bias choose the
    experts within the best moe_topk_group of moe_n_group expert groups; the unbiased scores of the
    chosen ones, renormalised with moe_norm_topk_prob, times moe_routed_scaling_factor, weight them)."""
    moe_n_group: int = 1
    """sigmoid_group: groups the experts are split into (DeepSeek's n_group); 1 = no group limit."""
    moe_topk_group: int = 1
    """sigmoid_group: groups a token may route into, the ones with the highest sum of their two best
    biased scores (DeepSeek's topk_group); must be <= moe_n_group."""
    moe_routed_scaling_factor: float = 1.0
    """sigmoid_group: the routing weights are multiplied by this (DeepSeek's routed_scaling_factor)."""
    moe_shared_experts: int = 0
    """Shared experts applied to every token beside the routed ones, as one SwiGLU MLP of width
    moe_shared_experts * moe_intermediate_size whose output is added (DeepSeek's n_shared_experts)."""
    moe_bias_update_rate: float = 0.0
    """sigmoid_group: auxiliary-loss-free load balancing (Wang et al. 2024; DeepSeek-V3 Sec. 2.1.2):
    after each optimizer step every router's bias moves by this rate gamma towards balance,
    b_i += gamma * sign(mean load - load_i) over the step's tokens (all micro-batches and DP ranks);
    0 = the bias stays as loaded. DeepSeek-V3 trained with 0.001. Not read from config.json."""
    moe_capacity_factor: Optional[float] = None
    """Token dropping (Switch Transformer, GShard; Megatron's moe_expert_capacity_factor): in each
    MoE layer an expert takes at most ceil(factor * T * k / E) of the T*k (token, pick) slots a rank
    routes in one micro-batch — T its tokens there: the micro-batch's rows, the whole sequence
    under SP, s/cp of each row under CP — and the slots over capacity are dropped (that pick adds
    nothing to its token; its other picks and the residual stand, nothing is renormalised). The
    load-balancing loss and expert_load count the router's picks before dropping; expert_dropped
    and moe_dropped_fraction are logged. None = no token dropped (the default, as transformers).
    Not read from config.json."""
    moe_drop_policy: str = "probs"
    """With moe_capacity_factor, the slots an expert over capacity keeps: probs (the highest routing
    weights, ties by token order; Megatron's default) | position (the first in token order)."""
    moe_experts_backend: str = "auto"
    """How a rank runs its local experts: loop (two GEMMs per expert) | grouped_mm
    (torch._grouped_mm over all of them, no weight copies) | auto (grouped_mm on CUDA in bf16 on
    sm90+ where torch has it, else loop)."""
    make_vocab_size_divisible_by: int = 128
    """The embedding rows are padded to a multiple of this times tp (GEMM-friendly shapes)."""
    attention_backend: str = "auto"
    """auto | sdpa | torch_varlen | flash_attn. auto picks flash_attn, then torch_varlen on CUDA, sdpa on CPU."""
    norm_backend: str = "auto"
    """RMSNorm/SwiGLU kernels: auto | torch | compile | apex | te. auto picks te, then NVIDIA apex on
    CUDA, else torch; compile (torch.compile) is opt-in; apex and te replace the norm only
    (megasft.model.fused)."""
    init_std: float = 0.02
    """Std of the normal init of weight matrices (random init only)."""
    init_from_hf: Optional[str] = None
    """Hugging Face model directory to start from: its config.json sets family and every
    architecture field (a differing explicit value is an error), its safetensors the weights."""
    hf_config: Optional[dict] = None
    """The config.json the model came from (set by init_from_hf / hf-to-megasft, not by hand): the
    HF export writes it back with megasft's architecture fields over it, so it round-trips."""
    dropout: float = 0.0
    """Dropout on attention and MLP outputs (training only)."""
    recompute: str = "none"
    """Activation recomputation: none | selective (attention core) | full (whole layers)."""
    loss_chunk_tokens: int = 0
    """Fuse the LM head with the loss over chunks of this many tokens, recomputing each chunk's
    logits in backward so the full [tokens, vocab/tp] logits never exist; 0 = unfused."""
    neftune_alpha: float = 0.0
    """NEFTune noise scale alpha; 0 disables. Noise is uniform in +-alpha/sqrt(L*d), L = document length."""

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_attention_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tp: int) -> int:
        multiple = self.make_vocab_size_divisible_by * tp
        return math.ceil(self.vocab_size / multiple) * multiple


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size (keep inside a node)."""
    pp: int = 1
    """Pipeline-parallel size."""
    cp: int = 1
    """Context-parallel size: each packed row is split along the sequence over cp ranks (every
    document cut into 2*cp load-balanced chunks, megasft.context_parallel); for rows longer than
    one TP group can hold. Ranks are laid out TP fastest, then CP, then DP, then PP."""
    cp_comm: str = "ring"
    """How attention crosses the CP split: ring (K/V blocks passed around the CP ring, overlapped
    with the block computation) | a2a (Ulysses all-to-all from sequence to head sharding; needs
    num_attention_heads / tp divisible by cp) | allgather (every rank gathers the rows' full K/V:
    simplest, any window or soft-cap, holds the full K/V per layer)."""
    dp: Optional[int] = None
    """Data-parallel size; None means world_size // (tp * cp * pp)."""
    ep: int = 1
    """Expert-parallel size (mixture-of-experts models): ep consecutive ranks of a stage's dp x cp
    ranks (CP fastest, as Megatron-Core's parallel folding) form an expert-parallel group and each
    holds num_experts / ep experts of every MoE layer; tokens reach their experts by all-to-all
    (megasft.model.dispatch). Must divide dp * cp and num_experts. Expert weights are then
    replicated over dp * cp / ep ranks only, which is what their gradients are reduced and their
    ZeRO-1 state is sharded over."""
    sequence_parallel: bool = False
    """Shard activations along the sequence in norm/dropout regions (needs tp > 1 to matter)."""
    virtual_pipeline_size: int = 1
    """Model chunks per pipeline rank; > 1 selects the interleaved 1F1B schedule (or, at 2, zbv)."""
    pipeline_layers: Optional[list] = None
    """Explicit layers per pipeline stage (length pp * virtual_pipeline_size); None splits evenly."""
    pipeline_schedule: str = "auto"
    """auto | 1f1b | interleaved | all_forward_all_backward | zb_h1 | zbv. zb_h1: zero bubble,
    backward split into input and weight gradients, the weight passes filling 1F1B's cool-down
    bubble, one model chunk per rank (megasft.pipeline.zero_bubble). zbv: the same split over two
    chunks per rank placed in a V (virtual_pipeline_size=2; rank r holds chunks r and 2pp-1-r), a
    near-zero bubble at 1F1B's peak activation memory (megasft.pipeline.zero_bubble_v). Both gloo
    only for now."""
    distributed_optimizer: bool = True
    """ZeRO-1: shard fp32 main params and Adam moments over the data-parallel group."""
    overlap_grad_reduce: bool = False
    """Launch bucketed gradient reduce-scatter during the last micro-batch's backward."""
    overlap_param_gather: bool = False
    """ZeRO-1: launch the all-gather of updated params after the step and wait for each bucket
    only when the next forward first uses it (needs distributed_optimizer)."""
    bucket_size_mb: float = 40.0
    """Bucket size (of fp32 grads) for the overlapped data-parallel reduce-scatter / all-gather."""
    timeout_s: float = 120.0
    """Seconds any collective may wait for a peer before the job fails, naming the rank that
    stopped answering. gloo (CPU) raises on the waiting ranks after this; NCCL aborts the
    communicator after it (TORCH_NCCL_ASYNC_ERROR_HANDLING, on by default). Raise it when one rank
    legitimately works alone for longer (e.g. a slow first-step compile or a huge checkpoint load)."""


@dataclass
class DataConfig:
    train_path: Optional[str] = None
    """Prefix (or directory) of the indexed dataset written by megasft preprocess."""
    eval_path: Optional[str] = None
    """Separate indexed dataset for evaluation; None holds out eval_fraction of train."""
    eval_fraction: float = 0.0
    """Fraction of training documents held out for eval when eval_path is not given."""
    seq_len: int = 2048
    """Packed row length in tokens."""
    global_batch_tokens: int = 1048576
    """Tokens (row slots) per optimizer step over all data-parallel ranks; rows = this / seq_len."""
    micro_batch_size: int = 1
    """Rows per micro-batch on one rank."""
    shuffle: bool = True
    """Shuffle documents each epoch with the run seed before packing."""
    tokenizer: Optional[str] = None
    """Tokenizer file or directory (sentencepiece .model or HF tokenizer.json) for generation/eval."""
    template: str = "llama3"
    """Chat template name (llama3 | chatml) or path to a tokenizer_config.json with a chat_template."""
    epoch_tail: str = "fill"
    """The last, partial step of an epoch: fill (with the next epoch's rows, deferring any that hold
    a document already in the step) | drop (its rows are not trained that epoch)."""
    reset_order_on_resume: bool = False
    """On resume, ignore the data position saved in the checkpoint and start the data order
    afresh (epoch 0); needed when the training data, seq_len or seed changed since the save."""
    sources: Optional[list[SourceConfig]] = None
    """A mixture instead of train_path: a list of {name, path, weight | epochs, eval_fraction |
    eval_path} (megasft.config_sources, megasft.data.mixture)."""

    def __post_init__(self) -> None:   # YAML gives the sources as mappings; typed from here on
        self.sources = read_sources(self.sources)

    def rows_per_step(self) -> int:
        return self.global_batch_tokens // self.seq_len


@dataclass
class OptimConfig:
    lr: float = 2e-5
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine floor as a fraction of the peak."""
    warmup_ratio: float = 0.03
    """Linear warmup length as a fraction of train.steps (ignored when warmup_steps is set)."""
    warmup_steps: Optional[int] = None
    """Linear warmup length in optimizer steps."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay on weight matrices (never on biases or norm weights)."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping (the norm is still logged)."""
    max_consecutive_skips: int = 5
    """Abort after this many consecutive skipped steps (non-finite gradient norm or loss)."""
    adamw_kernel: str = "auto"
    """auto | fused | reference. fused is torch's fused AdamW kernel (CUDA, CPU); auto uses it
    wherever torch has it for the device; reference is plain PyTorch ops (megasft.optim.adamw)."""

    def warmup(self, steps: int) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return max(1, round(self.warmup_ratio * steps)) if self.warmup_ratio > 0 else 0


@dataclass
class TrainConfig:
    steps: int = 1000
    """Optimizer steps to run (replaced by the derived count when train.epochs is set)."""
    epochs: Optional[int] = None
    """Passes over the training data instead of train.steps: the steps are derived from the packed
    rows of every epoch's plan and data.epoch_tail, and printed at start-up."""
    precision: str = "bf16"
    """bf16 (bf16 params/compute, fp32 main params and grads) | fp32."""
    seed: int = 1234
    """Seed for init, data order, dropout and NEFTune."""
    run_dir: str = "runs/default"
    """Where the resolved config, logs, metrics and checkpoints go: one run per folder
    (megasft.training.run_dir)."""
    overwrite: bool = False
    """Start afresh in a run_dir that holds a previous run: its files are moved to
    <run_dir>.old-<time>/ first (nothing is deleted). Without it such a start is refused unless
    checkpoint.load=auto resumes the run."""
    replan_schedule: bool = False
    """Resume a checkpoint trained with another LR schedule (train.steps, optim.lr, warm-up, floor)
    on this run's schedule, with a printed note of the jump in learning rate; without it the
    resume is refused rather than re-spreading the schedule silently."""
    log_interval: int = 1
    """Steps between log lines."""
    eval_interval: int = 0
    """Steps between evaluations; 0 disables."""
    eval_batches: int = 0
    """Global batches per evaluation; 0 means the whole eval split."""
    generate_eval_interval: int = 0
    """Steps between generation-based evaluations (0 disables): rank 0 gathers the full weights,
    answers the prompts of generate_eval_path greedily on one device and logs exact match and
    end-of-turn rate (megasft.training.generate_eval). For models that fit one device."""
    generate_eval_path: Optional[str] = None
    """JSONL conversations for generate_eval_interval (as megasft.generate reads them: a final
    assistant turn is the reference answer)."""
    generate_eval_samples: int = 32
    """Conversations of generate_eval_path answered per generation-based evaluation (the first N)."""
    generate_eval_max_new_tokens: int = 32
    """Tokens per answer at most in a generation-based evaluation."""
    peak_tflops: float = 989.0
    """Peak dense bf16 TFLOP/s per device for MFU (H100 SXM: 989)."""
    progress_bar: str = "auto"
    """The per-step progress line (step, loss, tok/s, elapsed < ETA), redrawn with a carriage
    return: auto (only when stdout is a terminal) | on | off."""
    profile: bool = False
    """Wrap a few steps in torch.profiler and write a trace to run_dir."""
    comm_stats: bool = False
    """Count the bytes and blocked time of every collective and p2p call by group kind (tp, pp, dp,
    embedding, world) on each logged step (megasft.collectives); rank 0's numbers go to the log
    beside the planner's prediction and to metrics.jsonl as "comm". On CUDA the counted steps
    synchronise around each collective, which is why only logged steps are counted."""
    fp8: str = "off"
    """off | hybrid | e4m3. FP8 GEMMs in the decoder layers' linears through NVIDIA Transformer
    Engine (CUDA, Hopper/Ada), delayed scaling: hybrid = E4M3 forward, E5M2 gradients (the usual
    training choice), e4m3 = E4M3 both ways. Params, activations and the embedding / LM head stay
    bf16; needs precision=bf16 (megasft.model.fp8)."""
    fp8_amax_history_len: int = 1024
    """FP8 delayed scaling: each FP8 tensor's scale comes from its last this-many amax values (one
    per micro-batch; Transformer Engine's default length)."""
    fp8_amax_compute_algo: str = "max"
    """max (largest amax in the history, conservative) | most_recent (the last one)."""

    @property
    def dtype(self) -> "torch.dtype":
        """The parameter and activation dtype of `precision` (main weights and grads stay fp32)."""
        import torch

        return torch.bfloat16 if self.precision == "bf16" else torch.float32


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None
    """Checkpoint directory; None means <run_dir>/checkpoints."""
    save_interval: int = 0
    """Steps between saves; 0 saves only at the end."""
    keep_last: int = 2
    """Keep this many newest checkpoints; older ones are pruned."""
    load: Optional[str] = None
    """auto (resume from latest if any) | path to a checkpoint | None."""
    async_save: bool = False
    """Save with torch.distributed.checkpoint.async_save."""
    export_hf: bool = False
    """After the last step, convert the final checkpoint into a Hugging Face directory <run_dir>/hf
    (rank 0, streaming, as megasft convert megasft-to-hf does)."""

    def root(self, run_dir: str) -> Path:
        """Where checkpoints and `latest` live: `dir`, or <run_dir>/checkpoints."""
        return Path(self.dir) if self.dir else Path(run_dir) / "checkpoints"


SECTIONS = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
}

CHOICES = {
    ("model", "family"): tuple(FAMILIES),
    ("model", "attention_backend"): ("auto", "sdpa", "torch_varlen", "flash_attn"),
    ("model", "norm_backend"): ("auto", "torch", "compile", "apex", "te"),
    ("model", "recompute"): ("none", "selective", "full"),
    ("model", "moe_experts_backend"): ("auto", "loop", "grouped_mm"),
    ("model", "moe_router"): ("softmax", "sigmoid_group"),
    ("model", "moe_drop_policy"): ("probs", "position"),
    ("optim", "adamw_kernel"): ("auto", "fused", "reference"),
    ("parallel", "cp_comm"): ("ring", "a2a", "allgather"),
    ("parallel", "pipeline_schedule"): ("auto", "1f1b", "interleaved", "all_forward_all_backward", "zb_h1",
                                        "zbv"),
    ("data", "epoch_tail"): ("fill", "drop"),
    ("train", "precision"): ("bf16", "fp32"),
    ("train", "progress_bar"): ("auto", "on", "off"),
    ("train", "fp8"): ("off", "hybrid", "e4m3"),
    ("train", "fp8_amax_compute_algo"): ("max", "most_recent"),
}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_dict(cls, raw: dict) -> "Config":
        raw = dict(raw or {})
        unknown = set(raw) - set(SECTIONS)
        if unknown:
            raise ConfigError(unknown_message("section", sorted(unknown)[0], SECTIONS))
        model_raw = dict(raw.get("model") or {})
        if model_raw.get("preset"):
            from megasft.model.presets import preset_fields

            model_raw = {**preset_fields(model_raw["preset"]), **model_raw}
        if model_raw.get("init_from_hf"):
            from megasft.hf.config import merge_hf_architecture

            model_raw = merge_hf_architecture(model_raw)
        raw["model"] = model_raw
        sections = {name: build_section(name, typ, raw.get(name) or {}) for name, typ in SECTIONS.items()}
        return cls(**sections)

    @classmethod
    def load(cls, path: Optional[str] = None, overrides: tuple[str, ...] | list[str] = ()) -> "Config":
        raw: dict = {}
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"no config file at {path}; pass an existing YAML file to --config")
            with open(path, encoding="utf-8") as f:
                try:
                    raw = yaml.safe_load(f) or {}
                except yaml.YAMLError as err:
                    raise ConfigError(yaml_message(path, err)) from err
            if not isinstance(raw, dict):
                raise ConfigError(f"{path} holds a {type(raw).__name__}, not a mapping of sections; "
                                  f"start it with sections such as 'model:' and 'train:'")
        for item in overrides:
            apply_override(raw, item)
        return cls.from_dict(raw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)

    # ------------------------------------------------------------- validation
    def validate(self) -> "Config":
        """Check every field's type and range, then the rules inside one section; returns self.
        The rules that tie the parallel sizes to the model, the batch and the world size are
        megasft.layout's (Layout.resolve)."""
        check_fields(self)
        m, p, d, o, t = self.model, self.parallel, self.data, self.optim, self.train
        for (section, key), choices in CHOICES.items():
            value = getattr(getattr(self, section), key)
            if value not in choices:
                raise ConfigError(f"{section}.{key}={value!r} is not one of {list(choices)}")
        if m.head_dim is None and m.hidden_size % m.num_attention_heads:
            raise ConfigError(
                f"hidden_size={m.hidden_size} is not divisible by num_attention_heads={m.num_attention_heads}; "
                "set model.head_dim explicitly or choose heads in "
                f"{divisors(m.hidden_size)[:12]}")
        if m.num_attention_heads % m.kv_heads:
            raise ConfigError(
                f"num_attention_heads={m.num_attention_heads} is not a multiple of num_kv_heads={m.kv_heads}; "
                f"choose num_kv_heads in {divisors(m.num_attention_heads)}")
        problem = family_problem(m.family, m.qkv_bias, m.qk_norm, m.sliding_window) or gemma_problem(m)
        problem = problem or rope_field_problem(m.family, m.rope_scaling, m.partial_rotary_factor,
                                                m.original_max_position_embeddings) or moe_problem(m)
        if problem:
            raise ConfigError(problem)
        if p.overlap_param_gather and not p.distributed_optimizer:
            raise ConfigError("parallel.overlap_param_gather overlaps the ZeRO-1 parameter all-gather, "
                              "which only exists with parallel.distributed_optimizer=true; enable it or "
                              "set overlap_param_gather=false")
        split_rows(d.global_batch_tokens, d.seq_len)   # rows of seq_len; the DP split is the Layout's
        check_sources(d, t)
        derived = t.epochs is not None or any(s.epochs is not None for s in d.sources or [])   # steps come later
        if o.warmup_steps is not None and not derived and o.warmup_steps > t.steps:
            raise ConfigError(f"optim.warmup_steps={o.warmup_steps} exceeds train.steps={t.steps}")
        if t.fp8 != "off":
            _check_fp8(m, t)
        _check_hf_form(self)
        if t.generate_eval_interval and not t.generate_eval_path:
            raise ConfigError(f"train.generate_eval_interval={t.generate_eval_interval} needs the prompts to answer: "
                              "set train.generate_eval_path to a JSONL file of conversations, or the interval to 0")
        return self


def check_fields(cfg: Config) -> None:
    """Each numeric field against its range in megasft.config_fields (raises the first problem)."""
    for name, typ in SECTIONS.items():
        section, default = getattr(cfg, name), typ()
        for f in fields(typ):
            problem = field_problem(f"{name}.{f.name}", getattr(section, f.name), getattr(default, f.name))
            if problem:
                raise ConfigError(problem)





def _check_hf_form(cfg: Config) -> None:
    """A model without a Hugging Face form (megasft.hf.config.hf_form_problem) neither starts from
    nor exports to one."""
    from megasft.hf.config import hf_form_problem

    problem = hf_form_problem(cfg.model)
    if problem and cfg.model.init_from_hf:
        raise ConfigError(f"model.init_from_hf={cfg.model.init_from_hf}: {problem}; start from random init or "
                          "a megasft checkpoint (checkpoint.load), or leave these options at their defaults")
    if problem and cfg.checkpoint.export_hf:
        raise ConfigError(f"checkpoint.export_hf=true: {problem}; keep the megasft checkpoint "
                          "(checkpoint.export_hf=false) or train with these options at their defaults")


def _check_fp8(m: ModelConfig, t: TrainConfig) -> None:
    """train.fp8's field rules: bf16 params and activations, no whole-layer recompute. The GEMM
    shape rule depends on tp and lives in megasft.layout."""
    if t.precision != "bf16":
        raise ConfigError(f"train.fp8={t.fp8} runs FP8 GEMMs on bf16 params and activations; set "
                          f"train.precision=bf16 (now {t.precision}) or train.fp8=off")
    if m.num_experts:
        raise ConfigError(f"train.fp8={t.fp8} runs the dense TP linears in FP8, not the routed experts of a "
                          f"mixture-of-experts model (model.num_experts={m.num_experts}); set train.fp8=off")
    if m.recompute == "full":
        # torch.utils.checkpoint re-runs the layers during backward, outside the FP8 autocast,
        # so the recomputed GEMMs would be bf16 and differ from the forward's FP8 ones.
        raise ConfigError(f"train.fp8={t.fp8} does not support model.recompute=full (the recomputed "
                          "forward would not run in FP8); use model.recompute=selective (attention "
                          "core only, no GEMMs) or none, or train.fp8=off")


def apply_override(raw: dict, item: str) -> None:
    """Apply one ``section.key=value`` override (value parsed as YAML) to a raw config dict."""
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.steps=100")
    dotted, text = item.split("=", 1)
    section, key = dotted.split(".", 1)
    if section not in SECTIONS:
        raise ConfigError(unknown_message("section", section, SECTIONS))
    raw.setdefault(section, {})
    if raw[section] is None:
        raw[section] = {}
    raw[section][key] = yaml.safe_load(text) if text != "" else None
