"""External references for equivalence tests: a transformers Llama built from a random config,
and packed batches whose per-document reference is computed by that model on each document alone.

Nothing here uses megasft's model code, so a test comparing megasft against these numbers compares
against an independent implementation; model_batch / select_rows only hand the same rows to
megasft as its input type (megasft.data.batch.MicroBatch).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from megasft.data.batch import MicroBatch

IGNORE = -100
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def tiny_fields(**overrides) -> dict:
    """megasft ModelConfig fields of a tiny GQA Llama (6 heads, 2 kv heads, vocab 1003)."""
    fields = dict(vocab_size=1003, hidden_size=96, intermediate_size=160, num_layers=2,
                  num_attention_heads=6, num_kv_heads=2, rope_theta=500000.0,
                  rope_scaling=dict(LLAMA3_SCALING), max_position_embeddings=256,
                  rms_norm_eps=1e-6, make_vocab_size_divisible_by=8, tie_embeddings=False)
    fields.update(overrides)
    return fields


# Phi-3 longrope over a 16-dim head rotated in its first half (partial_rotary_factor 0.5, so 4
# factors each); documents longer than L0 = 8 tokens take long_factor. With max_position_embeddings
# 64 the attention factor is sqrt(1 + ln 8 / ln 8) = sqrt(2). The dict is as transformers 5
# writes it (partial factor and L0 inside), so it equals what init_from_hf reads back.
PHI3_LONGROPE = dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.3, 1.9, 2.5],
                                   "long_factor": [1.5, 3.0, 6.0, 12.0], "partial_rotary_factor": 0.5,
                                   "original_max_position_embeddings": 8},
                     partial_rotary_factor=0.5, original_max_position_embeddings=8, max_position_embeddings=64)


def family_fields(family: str, **overrides) -> dict:
    """megasft ModelConfig fields of a tiny model of `family` with its features on: Qwen2 q/k/v
    biases and tied embeddings, Qwen3 q/k norms, a Mistral (and Phi-3) sliding window (3 tokens)
    shorter than most documents of the test batches; Gemma 2 and 3 with tied embeddings, a sliding
    (3 tokens) then a full layer, an attention scale other than head_dim's, soft-caps small enough
    to bend the tiny model's logits (tests.test_hf_families checks they do), Gemma 3's q/k norms,
    local rope base and linear rope scaling on the full layer; Phi-3's longrope is PHI3_LONGROPE."""
    gemma = dict(sliding_window=3, layer_types=["sliding_attention", "full_attention"], tie_embeddings=True,
                 query_pre_attn_scalar=20, final_logit_softcapping=0.2)
    features = {"llama": {}, "qwen2": dict(qkv_bias=True, tie_embeddings=True), "qwen3": dict(qk_norm=True),
                "mistral": dict(sliding_window=3),
                "gemma2": dict(gemma, attn_logit_softcapping=0.05),
                "gemma3_text": dict(gemma, qk_norm=True, rope_local_theta=100.0,
                                    rope_scaling={"rope_type": "linear", "factor": 2.0}),
                # Phi3Config has no head_dim (hidden_size // heads = 16); L0 = max positions
                "phi3": dict(sliding_window=3, head_dim=None, original_max_position_embeddings=256)}[family]
    fields = tiny_fields(family=family, vocab_size=300, hidden_size=64, intermediate_size=96,
                         num_attention_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                         rope_scaling=None)
    fields.update(features)
    fields.update(overrides)
    return fields


def moe_fields(family: str, **overrides) -> dict:
    """megasft ModelConfig fields of a tiny mixture-of-experts model: Qwen3-MoE with 3 layers, the
    middle one dense (mlp_only_layers), 8 experts of width 32, top-2 without renormalisation;
    Mixtral with 2 layers of 4 experts (width intermediate_size), top-2, a 3-token window.
    Auxiliary-loss weights large enough that their gradients are far above fp32 rounding of the
    SFT gradient, so a test comparing gradients would see a missing or mis-scaled aux term."""
    moe = {"qwen3_moe": dict(qk_norm=True, num_layers=3, num_experts=8, moe_top_k=2, moe_intermediate_size=32,
                             moe_norm_topk_prob=False, moe_dense_layers=[1]),
           "mixtral": dict(num_experts=4, moe_top_k=2, sliding_window=3, intermediate_size=48)}[family]
    fields = family_fields("llama", **moe, moe_aux_loss_coef=0.5, moe_z_loss_coef=0.05)
    fields.update(family=family, **overrides)
    return fields


# megasft family -> (transformers config class, model class, extra config kwargs)
_HF_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"attention_bias": False}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"attention_bias": False}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"attention_bias": False}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {}),
}
# Router weights of the MoE references: wide enough that a token's k-th and (k+1)-th router logits
# are far apart (the tests assert a minimum gap), so megasft and transformers, whose logits differ
# by fp32 rounding, pick the same experts.
ROUTER_STD = 0.5


def _moe_config(fields: dict, family: str) -> dict:
    """The transformers config kwargs of the MoE fields (eager expert loop: the plain reference)."""
    if family == "mixtral":
        return {"num_local_experts": fields["num_experts"], "num_experts_per_tok": fields["moe_top_k"],
                "sliding_window": fields.get("sliding_window"), "experts_implementation": "eager"}
    return {"num_experts": fields["num_experts"], "num_experts_per_tok": fields["moe_top_k"],
            "moe_intermediate_size": fields["moe_intermediate_size"],
            "norm_topk_prob": fields["moe_norm_topk_prob"], "mlp_only_layers": list(fields.get("moe_dense_layers") or []),
            "experts_implementation": "eager"}


def hf_model(fields: dict, seed: int = 0):
    """The transformers model of megasft `fields` (its family's class; a Llama with qkv_bias is a
    Qwen2ForCausalLM: bias on q/k/v only, where Llama's attention_bias would also put one on
    o_proj), random weights — biases and norm weights too, so their mapping is tested."""
    import transformers

    family = fields.get("family", "llama")
    if family == "llama" and fields.get("qkv_bias"):
        family = "qwen2"
    config_name, model_name, extra = _HF_CLASSES[family]
    if family == "mistral":
        extra = {"sliding_window": fields.get("sliding_window")}
    if family.startswith("gemma"):   # no pad_token_id: megasft's embedding has no padding_idx
        extra = {key: fields.get(key) for key in ("sliding_window", "layer_types", "query_pre_attn_scalar",
                                                   "final_logit_softcapping", "attn_logit_softcapping")}
        extra["pad_token_id"] = None
        if family == "gemma3_text":
            extra["rope_local_base_freq"] = fields.get("rope_local_theta")
    if family == "phi3":   # pad_token_id None: Phi3Config's default 32000 is beyond the tiny vocab
        extra = {"sliding_window": fields.get("sliding_window"), "pad_token_id": None, "bos_token_id": None,
                 "eos_token_id": None, "partial_rotary_factor": fields.get("partial_rotary_factor", 1.0),
                 "original_max_position_embeddings": fields["original_max_position_embeddings"]}
    else:
        extra = {**extra, "head_dim": fields.get("head_dim") or fields["hidden_size"] // fields["num_attention_heads"]}
    if family in ("qwen3_moe", "mixtral"):
        extra.update(_moe_config(fields, family))
    config = getattr(transformers, config_name)(
        vocab_size=fields["vocab_size"], hidden_size=fields["hidden_size"],
        intermediate_size=fields["intermediate_size"], num_hidden_layers=fields["num_layers"],
        num_attention_heads=fields["num_attention_heads"],
        num_key_value_heads=fields.get("num_kv_heads") or fields["num_attention_heads"],
        # a copy: transformers edits the rope dict in place
        rope_theta=fields["rope_theta"], rope_scaling=copy.deepcopy(fields.get("rope_scaling")),
        max_position_embeddings=fields["max_position_embeddings"], rms_norm_eps=fields["rms_norm_eps"],
        tie_word_embeddings=fields.get("tie_embeddings", False),
        attn_implementation="eager", **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):       # transformers inits biases to zero
                p.normal_(0, 0.02)
            elif name.endswith("mlp.gate.weight"):   # a MoE router
                p.normal_(0, ROUTER_STD)
            elif family != "llama" and name.endswith("norm.weight"):   # and norm weights to one (0: Gemma's 1 + w)
                p.normal_(0.0 if family.startswith("gemma") else 1.0, 0.1)
    return model


def canonical_reference(model, grads: bool = False) -> dict:
    """The parameters (or their .grad) of a transformers model by the unfused (Llama) names: Phi-3's
    qkv_proj split as its Phi3Attention slices it ([q; k; v], q = heads * hidden_size // heads rows,
    k and v = kv_heads * that), gate_up_proj as Phi3MLP chunks it ([gate; up]); the fused experts
    of Qwen3-MoE / Mixtral per expert as their checkpoints hold them (mlp.experts.E.gate_proj ...)."""
    c = model.config
    d = c.hidden_size // c.num_attention_heads
    out = {}
    for name, p in model.named_parameters():
        t = p.grad if grads else p.detach()
        if name.endswith("self_attn.qkv_proj.weight"):
            base = name[:-len("qkv_proj.weight")]
            q, k, v = t.split([c.num_attention_heads * d, c.num_key_value_heads * d, c.num_key_value_heads * d])
            out.update({base + "q_proj.weight": q, base + "k_proj.weight": k, base + "v_proj.weight": v})
        elif name.endswith("mlp.experts.gate_up_proj"):   # transformers 5's fused [E, 2f, h] experts
            base = name[:-len("gate_up_proj")]
            for e, expert in enumerate(t):
                gate, up = expert.chunk(2, dim=0)                 # as Qwen3MoeExperts / MixtralExperts chunk it
                out.update({f"{base}{e}.gate_proj.weight": gate, f"{base}{e}.up_proj.weight": up})
        elif name.endswith("mlp.experts.down_proj"):        # [E, h, f]
            base = name[:-len("down_proj")]
            out.update({f"{base}{e}.down_proj.weight": expert for e, expert in enumerate(t)})
        elif name.endswith("mlp.gate_up_proj.weight"):
            base = name[:-len("gate_up_proj.weight")]
            gate, up = t.chunk(2, dim=0)
            out.update({base + "gate_proj.weight": gate, base + "up_proj.weight": up})
        else:
            out[name] = t
    return out


def packed_batch(doc_lens_per_row: list[list[int]], seq_len: int, vocab: int, seed: int = 0) -> dict:
    """A packed micro-batch in megasft's loader format with random tokens and labels. The first
    token of each document and padding are never trained; about 60 % of other tokens are."""
    g = torch.Generator().manual_seed(seed)
    b = len(doc_lens_per_row)
    ids = torch.randint(0, vocab, (b, seq_len), generator=g)
    labels = torch.full((b, seq_len), IGNORE)
    pos = torch.zeros((b, seq_len), dtype=torch.long)
    cu, docs = [0], []
    for r, lens in enumerate(doc_lens_per_row):
        start = 0
        for n in list(lens) + ([seq_len - sum(lens)] if sum(lens) < seq_len else []):
            pos[r, start:start + n] = torch.arange(n)
            cu.append(r * seq_len + start + n)
            if start < sum(lens):
                trained = torch.rand(n, generator=g) < 0.6
                trained[0] = False
                seg = labels[r, start:start + n]
                seg[trained] = ids[r, start:start + n][trained]
                docs.append((r, start, n))
            start += n
    lens_all = [cu[i + 1] - cu[i] for i in range(len(cu) - 1)]
    return {"input_ids": ids, "labels": labels, "position_ids": pos,
            "cu_seqlens": torch.tensor(cu, dtype=torch.int32), "max_seqlen": max(lens_all),
            "docs": docs}


def reference_loss(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(loss_sum, count, per-document logits) with each document run through `model` alone."""
    loss_sum, count, logits_per_doc = 0.0, 0, []
    for r, start, n in batch["docs"]:
        ids = batch["input_ids"][r:r + 1, start:start + n]
        labels = batch["labels"][r, start:start + n]
        logits = model(input_ids=ids).logits[0]                       # [n, V]
        logits_per_doc.append(logits)
        target = labels[1:]
        loss_sum = loss_sum + F.cross_entropy(logits[:-1], target, ignore_index=IGNORE, reduction="sum")
        count += int((target != IGNORE).sum())
    return loss_sum, torch.tensor(count), logits_per_doc


def segments(batch: dict) -> list[tuple[int, int, int]]:
    """(row, start, length) of every segment of a packed batch: the documents and padding tails."""
    seq = batch["input_ids"].shape[1]
    cu = batch["cu_seqlens"].tolist()
    return [(a // seq, a % seq, b - a) for a, b in zip(cu, cu[1:])]


def reference_moe(model, batch: dict, micro_batch_size: int) -> dict:
    """A MoE model's SFT loss and auxiliary losses on a packed batch, every segment (padding tails
    too) run alone: {loss_sum, count, logits: per-document logits, aux / z: per micro-batch of
    micro_batch_size rows, router_logits: per micro-batch, per MoE layer [tokens, E] in row-major
    token order, min_gap: the smallest distance of a token's k-th and (k+1)-th router logit}.
    aux is transformers' own load_balancing_loss_func over the micro-batch's router logits; z is
    ST-MoE's mean logsumexp^2 (transformers has none for these models)."""
    import importlib

    c = model.config
    balance = importlib.import_module(type(model).__module__).load_balancing_loss_func
    experts, k = getattr(c, "num_experts", None) or c.num_local_experts, c.num_experts_per_tok
    docs = {(r, start): n for r, start, n in batch["docs"]}
    loss_sum, count, logits, per_row = 0.0, 0, [], {}
    for r, start, n in segments(batch):
        out = model(input_ids=batch["input_ids"][r:r + 1, start:start + n], output_router_logits=True)
        per_row.setdefault(r, []).append(out.router_logits)
        if (r, start) in docs:
            logits.append(out.logits[0])
            target = batch["labels"][r, start + 1:start + n]
            loss_sum = loss_sum + F.cross_entropy(out.logits[0, :-1], target, ignore_index=IGNORE, reduction="sum")
            count += int((target != IGNORE).sum())
    result = {"loss_sum": loss_sum, "count": count, "logits": logits, "aux": [], "z": [], "router_logits": []}
    gaps = []
    for first in range(0, batch["input_ids"].shape[0], micro_batch_size):
        rows = [seg for r in range(first, first + micro_batch_size) for seg in per_row[r]]
        layers = tuple(torch.cat([seg[i] for seg in rows]) for i in range(len(rows[0])))   # [tokens, E] each
        result["router_logits"].append(layers)
        result["aux"].append(balance(layers, experts, k))
        result["z"].append(torch.stack([torch.logsumexp(x, dim=-1).square() for x in layers]).mean())
        top = torch.stack(layers).detach().topk(k + 1, dim=-1).values    # softmax keeps the order
        gaps.append(float((top[..., k - 1] - top[..., k]).min()))
    result["min_gap"] = min(gaps)
    return result


def model_batch(batch: dict) -> MicroBatch:
    """The micro-batch megasft's model consumes (without the reference's 'docs' entry)."""
    return MicroBatch(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                      cu_seqlens=batch["cu_seqlens"], max_seqlen=batch["max_seqlen"], labels=batch["labels"])


def select_rows(batch: dict, rows: list[int]) -> MicroBatch:
    """A micro-batch made of some rows of `batch`; cu_seqlens recomputed (a segment starts wherever
    position_ids is 0)."""
    position_ids = batch["position_ids"][rows]
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten().tolist() + [flat.numel()]
    return MicroBatch(input_ids=batch["input_ids"][rows], position_ids=position_ids,
                      cu_seqlens=torch.tensor(starts, dtype=torch.int32),
                      max_seqlen=max(b - a for a, b in zip(starts, starts[1:])), labels=batch["labels"][rows])


def warmup_cosine(step: int, warmup: int, total: int, floor: float) -> float:
    """The seed's LR multiplier, written out independently of megasft.optim.lr_schedule."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _reference_optimizer(model, lr: float, warmup: int, total: int, weight_decay: float):
    """torch AdamW with decay on >=2-D params only (transformers' 3-D experts included), LambdaLR."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda t: warmup_cosine(t, warmup, total, 0.1))


def reference_moe_training(model, global_batches: list[dict], lr: float, warmup: int, total: int,
                           micro_batch_size: int, aux_coef: float, z_coef: float, clip: float = 1.0,
                           weight_decay: float = 0.1, forward=None) -> dict:
    """reference_training for a MoE model: each step minimises the global-token SFT loss plus
    aux_coef (z_coef) times the mean over the step's micro-batches of micro_batch_size rows of
    transformers' load-balancing loss (the z-loss). Returns {losses (SFT), aux (mean per step),
    grad_norms (before clipping), min_gap (smallest top-k router-logit gap seen), load ([MoE
    layers, E] top-k picks summed over the steps)}; `model` ends with the final weights.
    `forward(model, batch, micro_batch_size)` returns what reference_moe does (its default)."""
    opt, sched = _reference_optimizer(model, lr, warmup, total, weight_decay)
    out = {"losses": [], "aux": [], "grad_norms": [], "min_gap": math.inf, "load": 0}
    for batch in global_batches:
        opt.zero_grad()
        ref = (forward or reference_moe)(model, batch, micro_batch_size)
        aux, z = torch.stack(ref["aux"]).mean(), torch.stack(ref["z"]).mean()
        sft = ref["loss_sum"] / ref["count"]
        (sft + aux_coef * aux + z_coef * z).backward()
        out["grad_norms"].append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        opt.step()
        sched.step()
        out["losses"].append(sft.item())
        out["aux"].append(aux.item())
        out["min_gap"] = min(out["min_gap"], ref["min_gap"])
        k, experts = model.config.num_experts_per_tok, ref["router_logits"][0][0].shape[-1]
        out["load"] = out["load"] + sum(torch.stack([torch.bincount(x.topk(k).indices.reshape(-1), minlength=experts)
                                                     for x in layers]) for layers in ref["router_logits"])
    return out


def reference_training(model, global_batches: list[dict], lr: float, warmup: int, total: int,
                       clip: float = 1.0, weight_decay: float = 0.1) -> list[float]:
    """Plain PyTorch SFT steps: global-token masked loss, AdamW with decay on >=2-D params only,
    clip_grad_norm_, LambdaLR. Returns the loss of each step; `model` ends with the final weights."""
    opt, sched = _reference_optimizer(model, lr, warmup, total, weight_decay)
    losses = []
    for batch in global_batches:
        opt.zero_grad()
        loss_sum, count, _ = reference_loss(model, batch)
        loss = loss_sum / count
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses
