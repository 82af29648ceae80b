"""DeepSeek-V3's MoE layer (megasft.model.router.SigmoidGroupRouter, shared experts in
megasft.model.moe.MoE, the auxiliary-loss-free bias update in the trainer).

* megasft's MoE with moe_router=sigmoid_group equals transformers' DeepseekV3MoE on the same weights
  (8 experts in 4 groups, 2 groups per token, top-3, 2 shared experts, scaling 2.5, a non-zero bias):
  the chosen experts and their weights, the output and the gradients of the input and of every
  weight. Here at tp=1; tests.test_moe runs the same check at expert-TP 2, with and without SP.
* The bias changes which experts are chosen, never the chosen experts' weights.
* The bias update rule on a hand-made load, and the bias stays fp32 in a bf16 model.
* A short training run updates the bias after every step from that step's logged load, logs it,
  checkpoints it under HF's name and resumes with it; the HF name table carries the new tensors;
  an HF export of such a model is refused by name.
* At dp 2 (ZeRO-1), at expert-TP 2 + SP and over 2 pipeline stages (the first of dense layers
  only), 3 train steps give every rank the single-process run's biases (the step load summed over
  DP before the update; the logged table gathered over the stages) and weights.

Routing ties: the chosen set is discontinuous where two choice scores tie, and megasft's and
transformers' scores differ by fp32 rounding (~1e-7). Random weights make exact ties measure-zero;
every comparison first asserts, from the reference's own scores, that the topk_group-th and next
group scores and the k-th and next eligible expert scores of every token are MIN_GAP apart, far
above that rounding, so both implementations must choose the same experts (checked too).
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from megasft.config import Config, ConfigError
from megasft.hf.config import hf_config_from_model
from megasft.hf.names import gather_hf_state, load_canonical, load_hf_state_dict
from megasft.model.build import init_weights
from megasft.model.llama import LlamaStage
from megasft.model.moe import MoE
from megasft.model.router import SigmoidGroupRouter, bias_update, update_router_biases
from megasft.parallel_state import ParallelState
from megasft.tensor_parallel.comm import all_gather_dim0
from megasft.tensor_parallel.layers import sync_replicated_grads
from tests.layouts import Run, assert_grads_match, assert_losses_match, assert_pieces_match, train_this_rank, weight_pieces
from tests.multiproc import run_ranks
from tests.oracle import canonical_reference, moe_fields, packed_batch
from tests.runs import train_args

transformers = pytest.importorskip("transformers")

E, K, GROUPS, TOPK_GROUP, SCALE, SHARED, FFN = 8, 3, 4, 2, 2.5, 2, 16
S, B = 6, 4                      # a [s, b] = 24-token input
# Spread over the experts and groups so that it moves some tokens' choice (test_bias_changes_...).
BIAS = torch.tensor([0.3, -0.2, 0.0, 0.1, -0.3, 0.2, -0.1, 0.05])
BIAS_NAME = "model.layers.0.mlp.gate.e_score_correction_bias"
MIN_GAP = 1e-4     # sigmoid scores in (0, 1); the two implementations' fp32 scores differ by ~1e-7
# Outputs (mean |y| ~2) and gradients (mean ~3-8): each element sums k + 1 SwiGLUs, each a sum of
# h = 64 or f <= 32 products (weight gradients also over the 24 tokens), in fp32 and in another
# order than transformers' (index_add vs gather-sum): rounding ~sqrt(64 * 24) * 6e-8 ~ 2e-6
# relative, so rtol 1e-5 leaves a 5x margin and atol 1e-6 covers outputs and input gradients near 0.
# A weight-gradient element that cancels to ~0 keeps the rounding of its 24 terms of |g| ~10
# (router: |dL/dlogit| * |x|): ~sqrt(24) * 10 * 2e-6 ~ 1e-4 at worst, 5e-6 seen at expert-TP 2 (its
# reduction sums in yet another order), so GRAD_ATOL = 5e-5, 1e-5 of the mean gradient. A wrong
# expert, a missing scale or the bias in the weights changes outputs and gradients by O(1).
RTOL, ATOL, GRAD_ATOL = 1e-5, 1e-6, 5e-5
EXPERT_STD = 0.2   # O(1) outputs (transformers' 0.02 init would leave them at 1e-3)


def deepseek_fields(**overrides) -> dict:
    """megasft ModelConfig fields of the test's MoE layer (hidden 64) with DeepSeek-V3's options."""
    options = dict(num_experts=E, moe_top_k=K, moe_intermediate_size=FFN, moe_norm_topk_prob=True,
                   moe_router="sigmoid_group", moe_n_group=GROUPS, moe_topk_group=TOPK_GROUP,
                   moe_routed_scaling_factor=SCALE, moe_shared_experts=SHARED)
    return moe_fields("qwen3_moe", **{**options, **overrides})


def hf_block(hidden: int, seed: int = 0):
    """transformers' DeepseekV3MoE of the test's sizes: router logits ~N(0, 1), so sigmoid scores
    spread over (0.1, 0.9), experts with O(1) outputs, the bias BIAS."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    config = transformers.DeepseekV3Config(
        hidden_size=hidden, moe_intermediate_size=FFN, n_routed_experts=E, num_experts_per_tok=K, n_group=GROUPS,
        topk_group=TOPK_GROUP, routed_scaling_factor=SCALE, norm_topk_prob=True, n_shared_experts=SHARED,
        num_hidden_layers=1, num_attention_heads=4, vocab_size=100, experts_implementation="eager")
    torch.manual_seed(seed)
    block = DeepseekV3MoE(config).float()
    with torch.no_grad():
        block.gate.weight.normal_(0.0, hidden ** -0.5)
        for p in (*block.experts.parameters(), *block.shared_experts.parameters()):
            p.normal_(0.0, EXPERT_STD)
        block.gate.e_score_correction_bias.copy_(BIAS)
    return block


def _as_layer_zero(block) -> nn.Module:
    """The transformers block under layer 0's names of a causal LM (model.layers.0.mlp.*)."""
    holder, layer = nn.Module(), nn.Module()
    holder.config, layer.mlp = block.config, block
    holder.model = nn.Module()
    holder.model.layers = nn.ModuleList([layer])
    return holder


def routing_gaps(logits: torch.Tensor, bias: torch.Tensor) -> tuple[float, float]:
    """(smallest gap between a token's topk_group-th and next group score, smallest gap between its
    k-th and next eligible choice score), from logits [T, E] alone (not megasft's router)."""
    choice = logits.sigmoid() + bias
    grouped = choice.view(-1, GROUPS, E // GROUPS)
    group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1).sort(dim=-1, descending=True).values   # [T, G]
    group_gap = (group_scores[:, TOPK_GROUP - 1] - group_scores[:, TOPK_GROUP]).min()
    kept = grouped.topk(2, dim=-1).values.sum(dim=-1) >= group_scores[:, TOPK_GROUP - 1:TOPK_GROUP]
    eligible = grouped.masked_fill(~kept.unsqueeze(-1), float("-inf")).view(-1, E)
    top = eligible.topk(K + 1, dim=-1).values
    return float(group_gap), float((top[:, K - 1] - top[:, K]).min())


def megasft_layer(ps: ParallelState, sequence_parallel: bool, weights: dict) -> nn.Module:
    """megasft's MoE as layer 0's mlp, loaded from canonical (HF) tensors through the name table."""
    cfg = Config.from_dict({"model": deepseek_fields()}).validate().model
    layer = nn.ModuleDict({"layers": nn.ModuleDict({"0": nn.ModuleDict({"mlp": MoE(cfg, ps, sequence_parallel)})})})
    load_canonical(layer, lambda name, shape: weights[name])
    return layer


def check_layer_matches_transformers(ps: ParallelState, sequence_parallel: bool) -> None:
    """Output, routing, expert load and every gradient of megasft's MoE on this layout equal
    DeepseekV3MoE's on the same weights and input (each rank holds its TP shard, its s/tp tokens
    under SP)."""
    g = torch.Generator().manual_seed(1)
    hidden = deepseek_fields()["hidden_size"]
    x, cotangent = torch.randn(S, B, hidden, generator=g), torch.randn(S, B, hidden, generator=g)   # [s, b, h]
    block = hf_block(hidden)
    x_ref = x.transpose(0, 1).contiguous().requires_grad_()                                            # [b, s, h]
    out_ref = block(x_ref)
    (out_ref * cotangent.transpose(0, 1)).sum().backward()
    logits_ref, weights_ref, ids_ref = (t.detach() for t in block.gate(x.transpose(0, 1).reshape(-1, hidden)))
    assert min(routing_gaps(logits_ref, BIAS)) > MIN_GAP, f"near-tie in routing: {routing_gaps(logits_ref, BIAS)}"
    holder = _as_layer_zero(block)
    weights = {**canonical_reference(holder), BIAS_NAME: block.gate.e_score_correction_bias}

    layer = megasft_layer(ps, sequence_parallel, weights)
    moe = layer["layers"]["0"]["mlp"]
    group = ps.tp_group if sequence_parallel else None
    share = slice(ps.tp_rank * S // ps.tp, (ps.tp_rank + 1) * S // ps.tp) if sequence_parallel else slice(None)
    x_local = x[share].clone().requires_grad_()                                                     # [s(/tp), b, h]
    out, stats = moe(x_local)
    (out * cotangent[share]).sum().backward()
    sync_replicated_grads(layer.parameters(), lambda p: p.grad)

    assert_close(all_gather_dim0(out.detach(), group), out_ref.detach().transpose(0, 1), rtol=RTOL, atol=ATOL)
    assert_close(x_local.grad, x_ref.grad.transpose(0, 1)[share], rtol=RTOL, atol=ATOL)
    assert_grads_match(layer, canonical_reference(holder, grads=True), atol=GRAD_ATOL)   # router, (shared) experts
    # The bias is routing state: no gradient, never in the weights' comparison above.
    assert moe.router.e_score_correction_bias.grad is None
    # Same experts (as sets; transformers' topk is unsorted) with the same weights, token by token.
    with torch.no_grad():
        _, _, weights_got, ids_got = moe.router(x.reshape(-1, hidden))               # [s*b] token order
    order = torch.arange(S * B).view(S, B).t().reshape(-1)                            # -> transformers' [b*s]
    ids_got, weights_got = ids_got[order], weights_got[order]
    assert torch.equal(ids_got.sort(dim=-1).values, ids_ref.sort(dim=-1).values)
    assert_close(weights_got.gather(1, ids_got.argsort(dim=-1)), weights_ref.gather(1, ids_ref.argsort(dim=-1)),
                 rtol=RTOL, atol=ATOL)
    load = stats.counts.clone()
    if sequence_parallel:   # each rank counted its own tokens
        torch.distributed.all_reduce(load, group=group)
    assert torch.equal(load, torch.bincount(ids_ref.reshape(-1), minlength=E).float())


def test_deepseek_moe_layer_matches_transformers():
    check_layer_matches_transformers(ParallelState.single(), sequence_parallel=False)


def _router(bias: torch.Tensor) -> SigmoidGroupRouter:
    cfg = Config.from_dict({"model": deepseek_fields()}).validate().model
    router = SigmoidGroupRouter(cfg, ParallelState.single(), False)
    with torch.no_grad():
        router.weight.normal_(0.0, cfg.hidden_size ** -0.5, generator=torch.Generator().manual_seed(3))
        router.e_score_correction_bias.copy_(bias)
    return router


def test_the_bias_changes_the_choice_but_not_the_weights():
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, _, plain_weights, plain_ids = _router(torch.zeros(E))(x)
        logits, _, weights, ids = _router(BIAS)(x)
    assert min(routing_gaps(logits, BIAS)) > MIN_GAP and min(routing_gaps(logits, torch.zeros(E))) > MIN_GAP
    moved = (plain_ids.sort(dim=-1).values != ids.sort(dim=-1).values).any(dim=-1)
    assert 0 < int(moved.sum()) < 64, "the bias should move some tokens' choice, not all"
    # The weights are the unbiased sigmoid scores of the chosen experts, renormalised, times the scale.
    chosen = logits.sigmoid().gather(1, ids)
    assert_close(weights, SCALE * chosen / chosen.sum(dim=-1, keepdim=True), rtol=1e-6, atol=1e-7)
    # Same experts with and without the bias: the same weights (up to the order of the renormalising
    # sum's three terms, which follows the biased ranking: 1 ulp).
    kept = ~moved
    assert_close(weights[kept].gather(1, ids[kept].argsort(dim=-1)),
                 plain_weights[kept].gather(1, plain_ids[kept].argsort(dim=-1)), rtol=3e-7, atol=0)


def test_bias_update_rule_on_a_hand_made_load():
    load = torch.tensor([[4.0, 0.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0],     # mean 2: over, under, at the mean
                         [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 17.0]])  # mean 3
    assert torch.equal(bias_update(load, 0.5), torch.tensor([[-0.5, 0.5, 0, 0, 0, 0, 0, 0],
                                                             [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, -0.5]]))
    start = torch.full((E,), 0.5)
    routers = [_router(start), _router(start)]
    for router in routers:
        router.to(torch.bfloat16)   # as build_model casts the model: the bias must stay fp32
    update_router_biases(routers, load.double(), 1e-3)
    # 0.5 +- 1e-3 differ from 0.5 in fp32 (bf16 would round both back to 0.5)
    for router, row in zip(routers, load):
        assert router.e_score_correction_bias.dtype == torch.float32 and router.weight.dtype == torch.bfloat16
        assert torch.equal(router.e_score_correction_bias, start + 1e-3 * torch.sign(row.mean() - row))
    with pytest.raises(ValueError, match="2 routers for the load of 1 MoE layers"):
        update_router_biases(routers, load[:1], 1e-3)


def test_hf_name_table_carries_the_bias_and_shared_experts():
    """gather_hf_state -> load_hf_state_dict (the generation eval's path) gives back every tensor."""
    cfg = Config.from_dict({"model": deepseek_fields(num_layers=2, moe_dense_layers=[1])}).validate().model
    ps = ParallelState.single()
    source, target = (LlamaStage(cfg, ps, [0, 1], True, True) for _ in range(2))
    init_weights(source, seed=5, std=0.02)   # vocab padding rows zero, as an import leaves them
    with torch.no_grad():
        source.layers["0"].mlp.router.e_score_correction_bias.copy_(BIAS)   # init draws it zero
    state = gather_hf_state([source], ps)
    expected = {BIAS_NAME, "model.layers.0.mlp.gate.weight", *(f"model.layers.0.mlp.shared_experts.{n}_proj.weight"
                                                                  for n in ("gate", "up", "down"))}
    assert expected <= set(state)
    assert tuple(state["model.layers.0.mlp.shared_experts.gate_proj.weight"].shape) == (SHARED * FFN, cfg.hidden_size)
    load_hf_state_dict(target, state)
    for (name, a), b in zip(source.named_parameters(), target.parameters()):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------- training
RATE = 0.01
TRAIN = ("model.family=qwen3_moe", "model.qk_norm=true", "model.num_experts=8", "model.moe_top_k=2",
         "model.moe_intermediate_size=16", "model.moe_router=sigmoid_group", "model.moe_n_group=4",
         "model.moe_topk_group=2", "model.moe_shared_experts=1", "model.moe_routed_scaling_factor=2.0",
         f"model.moe_bias_update_rate={RATE}", "train.steps=4", "train.log_interval=1",
         "checkpoint.save_interval=2", "checkpoint.load=auto")


def _train_records(run) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_training_updates_logs_checkpoints_and_resumes_the_bias(main, data, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(train_args(data, straight, *TRAIN))[0] == 0
    records = _train_records(straight)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    bias = {layer: [0.0] * 8 for layer in ("0", "1")}
    for r in records:   # each step's update from that step's load (logged every step: the load is the step's)
        assert sorted(r["router_bias"]) == sorted(r["expert_load"]) == ["0", "1"]
        for layer, load in r["expert_load"].items():
            mean = sum(load) / len(load)
            bias[layer] = [b + RATE * ((mean > n) - (mean < n)) for b, n in zip(bias[layer], load)]
            assert r["router_bias"][layer] == pytest.approx(bias[layer], abs=1e-6), (r["step"], layer)
    assert any(b != 0 for b in records[-1]["router_bias"]["1"])   # (layer 0's is back at 0 by chance)

    # Stopped after step 2 (its checkpoint holds the bias under HF's name), resumed to 4.
    assert main(train_args(data, resumed, *TRAIN), fault="usr1@2")[0] == 0
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(resumed / "checkpoints" / "step_00000002")).read_metadata().state_dict_metadata
    assert "model/" + BIAS_NAME in keys and "model/model.layers.0.mlp.shared_experts.down_proj.weight" in keys
    assert "optim/main/" + BIAS_NAME not in keys   # state, not an optimizer parameter
    assert main(train_args(data, resumed, *TRAIN))[0] == 0
    again = {r["step"]: r for r in _train_records(resumed)}
    for r in records[2:]:
        assert again[r["step"]]["router_bias"] == r["router_bias"] and again[r["step"]]["loss"] == r["loss"]

    from megasft.checkpoint.convert import megasft_to_hf

    with pytest.raises(ConfigError, match=r"model.moe_router='sigmoid_group'.*have no Hugging Face form"):
        megasft_to_hf(straight / "checkpoints", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_export_and_config_errors_name_the_options():
    with pytest.raises(ConfigError, match="checkpoint.export_hf=true: model.moe_shared_experts=1"):
        Config.from_dict({"model": moe_fields("qwen3_moe", moe_shared_experts=1),
                          "checkpoint": {"export_hf": True}}).validate()
    with pytest.raises(ConfigError, match="model.init_from_hf=hf/qwen3-moe: model.moe_router='sigmoid_group'"):
        Config.from_dict({"model": {**deepseek_fields(), "init_from_hf": "hf/qwen3-moe"}}).validate()
    with pytest.raises(ConfigError, match="Qwen3MoeForCausalLM has no such routing"):
        hf_config_from_model(Config.from_dict({"model": deepseek_fields()}).validate().model)
    with pytest.raises(ConfigError, match="apply to model.moe_router=sigmoid_group"):
        Config.from_dict({"model": moe_fields("qwen3_moe", moe_bias_update_rate=0.001)}).validate()
    with pytest.raises(ConfigError, match="does not split into model.moe_n_group=3"):
        Config.from_dict({"model": deepseek_fields(moe_n_group=3)}).validate()
    with pytest.raises(ConfigError, match="need model.family=qwen3_moe"):
        Config.from_dict({"model": moe_fields("mixtral", moe_shared_experts=1)}).validate()


def test_a_checkpoint_records_the_routing_options():
    """Resuming a DeepSeek-routed checkpoint as a softmax model (the bias tensor would just go
    unread) is a mismatch naming the fields; a record from before they existed reads as softmax."""
    from megasft.checkpoint.meta import model_differences, model_shape

    deepseek = Config.from_dict({"model": deepseek_fields()}).validate().model
    softmax = Config.from_dict({"model": moe_fields("qwen3_moe")}).validate().model
    assert [d.split(":")[0] for d in model_differences(model_shape(deepseek), softmax)] == [
        "moe_router", "moe_n_group", "moe_topk_group", "moe_routed_scaling_factor", "moe_shared_experts"]
    before = {k: v for k, v in model_shape(softmax).items() if not k.startswith("moe_")}
    assert model_differences(before, softmax) == [] and len(model_differences(before, deepseek)) == 5


# ----------------------------------------------------------------------------- layouts
LAYOUT_RUN = Run(seq=16, rows=4, lr=1e-3, warmup=1, steps=3)
# name -> (tp, pp, sequence_parallel) on 2 ranks
LAYOUTS = {"dp2-zero1": (1, 1, False), "tp2-sp": (2, 1, True), "pp2": (1, 2, False)}


def _layout_config(tp: int, pp: int, sp: bool) -> Config:
    """Random init (the same at every layout), the layer's options (layer 0 dense, as DeepSeek's
    first_k_dense_replace; the first stage at pp 2), the bias updated at RATE."""
    return Config.from_dict({
        "model": deepseek_fields(num_layers=3, moe_dense_layers=[0], moe_bias_update_rate=RATE),
        "parallel": {"tp": tp, "pp": pp, "sequence_parallel": sp, "pipeline_layers": [1, 2] if pp > 1 else None},
        "data": {"seq_len": LAYOUT_RUN.seq, "global_batch_tokens": LAYOUT_RUN.seq * LAYOUT_RUN.rows},
        "optim": {"lr": LAYOUT_RUN.lr, "warmup_steps": LAYOUT_RUN.warmup},
        "train": {"steps": LAYOUT_RUN.steps, "precision": "fp32"}}).validate()


def _train(ps: ParallelState, tp: int, pp: int, sp: bool) -> dict:
    from megasft.training.loop import Trainer

    trainer = Trainer(_layout_config(tp, pp, sp), ps, log=False)
    lens = [[5, 7, 4], [9, 3], [16], [2, 2, 2, 2]]
    batches = [packed_batch(lens[s:] + lens[:s], LAYOUT_RUN.seq, 300, seed=20 + s) for s in range(LAYOUT_RUN.steps)]
    outputs = train_this_rank(trainer, batches, micro_batch_size=1)
    return {"losses": [o.loss for o in outputs], "weights": weight_pieces(trainer),
            "bias": trainer._moe_record(outputs[-1])["router_bias"]}   # {MoE layer: bias} of the model


def _layouts_main() -> dict:
    return {name: _train(ParallelState.build(tp, pp, ranks=[0, 1]), tp, pp, sp)
            for name, (tp, pp, sp) in LAYOUTS.items()}


def test_data_and_tensor_parallel_ranks_apply_the_single_process_bias_updates():
    single = _train(ParallelState.single(), 1, 1, False)
    reference = {name: piece for name, _, _, piece in single["weights"]}   # whole tensors at tp=dp=1
    assert sorted(single["bias"]) == [1, 2] and any(any(b) for b in single["bias"].values())
    per_rank = run_ranks(_layouts_main, 2, timeout=300)
    for name in LAYOUTS:
        seen = set()
        for rank in per_rank:
            out = rank[name]
            assert_losses_match(out["losses"], single["losses"], name)
            # Integer loads and sign updates: the very same biases (unless a near-tie routed a token
            # differently, which would show here first).
            assert out["bias"] == single["bias"], name
            seen |= assert_pieces_match(out["weights"], reference, name, LAYOUT_RUN)
        assert seen == set(reference), f"{name}: not checked: {set(reference) - seen}"
