"""Per-field ranges of the run configuration: every int and float field has one rule here.

:func:`megasft.config.check_fields` applies them at the top of ``Config.validate`` — before any
process group exists — so a bad value is one line naming the value, the rule and a valid choice
(``optim.beta2=1.0 must be in [0, 1); e.g. optim.beta2=0.95 (the default)``) instead of a
``ZeroDivisionError`` on every rank later. Rules that involve several fields stay in
``Config.validate``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class Range:
    """lo <= x (or lo < x with lo_open) and x <= hi (or x < hi with hi_open); None = unbounded."""

    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False

    def holds(self, x: float) -> bool:
        if self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo):
            return False
        return self.hi is None or (x < self.hi if self.hi_open else x <= self.hi)

    def describe(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        return f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"


def _num(x: Optional[float]) -> str:
    return str(int(x)) if x is not None and float(x).is_integer() else str(x)


AT_LEAST_1 = Range(1)
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, lo_open=True)
HALF_OPEN_UNIT = Range(0, 1, hi_open=True)    # [0, 1): probabilities, Adam betas
UNIT = Range(0, 1)                            # [0, 1]: fractions

RANGES: dict[str, Range] = {
    "model.vocab_size": AT_LEAST_1,
    "model.hidden_size": AT_LEAST_1,
    "model.intermediate_size": AT_LEAST_1,
    "model.num_layers": AT_LEAST_1,
    "model.num_attention_heads": AT_LEAST_1,
    "model.num_kv_heads": AT_LEAST_1,
    "model.head_dim": AT_LEAST_1,
    "model.rms_norm_eps": POSITIVE,
    "model.rope_theta": POSITIVE,
    "model.max_position_embeddings": AT_LEAST_1,
    "model.partial_rotary_factor": Range(0, 1, lo_open=True),
    "model.original_max_position_embeddings": AT_LEAST_1,
    "model.sliding_window": AT_LEAST_1,
    "model.query_pre_attn_scalar": AT_LEAST_1,
    "model.attn_logit_softcapping": POSITIVE,
    "model.final_logit_softcapping": POSITIVE,
    "model.rope_local_theta": POSITIVE,
    "model.num_experts": NON_NEGATIVE,          # 0 = dense
    "model.moe_top_k": AT_LEAST_1,
    "model.moe_intermediate_size": AT_LEAST_1,
    "model.moe_aux_loss_coef": NON_NEGATIVE,
    "model.moe_z_loss_coef": NON_NEGATIVE,
    "model.moe_n_group": AT_LEAST_1,
    "model.moe_topk_group": AT_LEAST_1,
    "model.moe_routed_scaling_factor": POSITIVE,
    "model.moe_shared_experts": NON_NEGATIVE,   # 0 = none
    "model.moe_bias_update_rate": NON_NEGATIVE,   # 0 = the router bias is not updated
    "model.moe_capacity_factor": POSITIVE,        # None = no token dropped
    "model.make_vocab_size_divisible_by": AT_LEAST_1,
    "model.init_std": NON_NEGATIVE,
    "model.dropout": HALF_OPEN_UNIT,
    "model.loss_chunk_tokens": NON_NEGATIVE,
    "model.neftune_alpha": NON_NEGATIVE,
    "parallel.tp": AT_LEAST_1,
    "parallel.pp": AT_LEAST_1,
    "parallel.cp": AT_LEAST_1,
    "parallel.ep": AT_LEAST_1,
    "parallel.dp": AT_LEAST_1,
    "parallel.virtual_pipeline_size": AT_LEAST_1,
    "parallel.bucket_size_mb": POSITIVE,
    "parallel.timeout_s": POSITIVE,
    "data.eval_fraction": HALF_OPEN_UNIT,
    "data.seq_len": AT_LEAST_1,
    "data.global_batch_tokens": AT_LEAST_1,
    "data.micro_batch_size": AT_LEAST_1,
    "optim.lr": NON_NEGATIVE,
    "optim.min_lr_ratio": UNIT,
    "optim.warmup_ratio": UNIT,
    "optim.warmup_steps": NON_NEGATIVE,
    "optim.beta1": HALF_OPEN_UNIT,
    "optim.beta2": HALF_OPEN_UNIT,
    "optim.eps": POSITIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.clip_grad": NON_NEGATIVE,          # 0 disables clipping
    "optim.max_consecutive_skips": AT_LEAST_1,
    "train.steps": AT_LEAST_1,
    "train.epochs": AT_LEAST_1,
    "train.seed": NON_NEGATIVE,               # numpy's generators refuse negative seeds
    "train.log_interval": AT_LEAST_1,         # a step counter modulo this
    "train.eval_interval": NON_NEGATIVE,      # 0 disables evaluation
    "train.eval_batches": NON_NEGATIVE,       # 0 = the whole eval split
    "train.generate_eval_interval": NON_NEGATIVE,   # 0 disables generation-based evaluation
    "train.generate_eval_samples": AT_LEAST_1,
    "train.generate_eval_max_new_tokens": AT_LEAST_1,
    "train.peak_tflops": POSITIVE,            # MFU divides by it
    "train.fp8_amax_history_len": AT_LEAST_1,
    "checkpoint.save_interval": NON_NEGATIVE,  # 0 saves only at the end
    "checkpoint.keep_last": NON_NEGATIVE,      # 0 keeps every checkpoint
}


def field_problem(where: str, value: Any, default: Any) -> Optional[str]:
    """The one-line error for `value` of field `where` ('section.key'), or None when it is fine.
    Only numbers are checked here (types are checked when the config is read)."""
    rule = RANGES.get(where)
    if rule is None or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value):
        return f"{where}={value!r} must be a finite number {rule.describe()}; {_example(where, default, rule)}"
    if not rule.holds(value):
        return f"{where}={value!r} must be {rule.describe()}; {_example(where, default, rule)}"
    return None


def _example(where: str, default: Any, rule: Range) -> str:
    if default is None:
        return f"leave {where} unset (the default) or give a value {rule.describe()}"
    return f"e.g. {where}={default!r} (the default)"
