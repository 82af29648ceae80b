"""Token dropping (model.moe_capacity_factor) against plain PyTorch.

The reference is transformers' Qwen3-MoE whose routers are wrapped by `DroppingGates`: after the
model's own top-k, each expert keeps at most ceil(factor * T * k / E) of the (token, pick) slots of
a token group — the highest routing weights ("probs", ties by slot order) or the first slots
("position") — and the others are sent to transformers' own "no expert" index E, which its expert
loop skips. A token group is what one rank routes in one micro-batch: the micro-batch's row (one
row per micro-batch here), or under CP each rank's chunks r and 2cp-1-r of every document (the
load-balanced split the CP design fixes). So that a layer sees the whole row at once, the
reference runs each packed row in one forward with a block-diagonal causal mask (positions
restart per document), which gives every document what it gets alone (checked below).

Weights after 3 AdamW steps, SFT / aux losses, grad norms, expert load and the dropped picks per
expert are compared at tp 1, EP2 x DP2 (ZeRO-1, also with full recompute), TP2 + SP x EP2, EP2 x PP2
(1F1B) and CP2 x DP2 with EP over the CP ranks; the "position" policy at tp 1 and EP2 x DP2.
The capacity boundary is asserted to have no near-tie (the kept and the first dropped weight of
an expert differ by more than 1e-4, far above the fp32 rounding at which the two implementations'
weights differ), so both keep the same slots.
"""
from __future__ import annotations

import math

import pytest
import torch

from megasft.model.dispatch import LocalDispatch, capacity_keep
from tests.layouts import Case, Run, check_case, train_cases
from tests.multiproc import run_ranks
from tests.oracle import IGNORE, canonical_reference, hf_model, moe_fields, packed_batch, reference_moe_training, segments

RUN = Run(seq=16, rows=4, lr=1e-3, warmup=1, steps=3)
FACTOR = 1.0       # 16 tokens x top-2 over 8 experts: 4 slots each (2 under CP2)
MIN_GAP = 1e-3     # routing: as tests.test_moe
BOUNDARY_GAP = 1e-4
BATCH_SEED = 13    # batches whose routing keeps both gaps (asserted) along all 3 reference steps
CASES = [
    Case("cap-tp1-mb1", (0,)),
    Case("cap-ep2-dp2-zero1-mb1", (0, 1, 2, 3), ep=2),
    Case("caprecompute-ep2-dp2-zero1-mb1", (0, 1, 2, 3), ep=2),
    Case("cap-tp2-ep2-sp-mb1", (0, 1, 2, 3), tp=2, ep=2, sequence_parallel=True),
    Case("cap-ep2-pp2-1f1b-mb1", (0, 1, 2, 3), pp=2, ep=2, pipeline_layers=(2, 1)),
    Case("cap-cp2-ep2-mb1", (0, 1, 2, 3), cp=2, ep=2),
    Case("pos-tp1-mb1", (1,)),
    Case("pos-ep2-dp2-zero1-mb1", (0, 1, 2, 3), ep=2),
]
MODELS = {"cap": moe_fields("qwen3_moe", moe_capacity_factor=FACTOR),
          "caprecompute": moe_fields("qwen3_moe", moe_capacity_factor=FACTOR, recompute="full"),
          "pos": moe_fields("qwen3_moe", moe_capacity_factor=FACTOR, moe_drop_policy="position")}
# The references: (policy, cp); recompute changes nothing in the math.
REFERENCE = {"cap": "probs", "caprecompute": "probs", "pos": "position"}


def _model(case: Case) -> str:
    return case.name.split("-")[0]


def global_batches() -> list[dict]:
    lens = [[4, 8], [8, 4], [16], [4, 4, 4], [12], [8]]   # multiples of 2*cp: the same rows at cp 2
    return [packed_batch([lens[(i + s) % len(lens)] for i in range(RUN.rows)], RUN.seq, 300, seed=BATCH_SEED + s)
            for s in range(RUN.steps)]


# ------------------------------------------------------------------------------ the reference
class DroppingGates:
    """Wraps every MoE router of a transformers model: the model's top-k, then capacity per token
    group (`groups`: lists of token positions of the forward's flattened tokens). Keeps each
    forward's router logits (`logits`, layer order: the model's own output_router_logits would
    also compute its aux loss, which a 4-D mask breaks), counts the dropped picks per (layer,
    expert) and the smallest weight gap at a capacity boundary."""

    def __init__(self, model, factor: float, policy: str):
        self.factor, self.policy, self.groups, self.logits = factor, policy, None, []
        self.experts = model.config.num_experts
        self.gates = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
        self.dropped = torch.zeros(len(self.gates), self.experts, dtype=torch.long)
        self.boundary_gap = math.inf
        for index, gate in enumerate(self.gates):
            gate.forward = self._wrap(gate.forward, index)

    def _wrap(self, forward, index: int):
        def routed(x):
            logits, weights, chosen = forward(x)
            self.logits.append(logits)
            chosen = chosen.clone()
            for group in self.groups or [list(range(x.shape[0]))]:
                self._drop(chosen, weights, group, index)
            return logits, weights, chosen
        return routed

    def _drop(self, chosen: torch.Tensor, weights: torch.Tensor, group: list[int], layer: int) -> None:
        k, weights = chosen.shape[1], weights.detach()
        capacity = math.ceil(self.factor * len(group) * k / self.experts)
        for e in range(self.experts):
            slots = [(t, j) for t in group for j in range(k) if int(chosen[t, j]) == e]   # slot order
            if self.policy == "probs":
                slots.sort(key=lambda s: -float(weights[s]))                            # stable: ties by order
                if len(slots) > capacity:
                    self.boundary_gap = min(self.boundary_gap,
                                            float(weights[slots[capacity - 1]] - weights[slots[capacity]]))
            for t, j in slots[capacity:]:
                chosen[t, j] = self.experts                                # transformers' "no expert"
                self.dropped[layer, e] += 1


def cp_groups(batch: dict, row: int, cp: int) -> list[list[int]]:
    """The tokens each CP rank holds of `row`: chunks r and 2cp-1-r of every segment."""
    groups = [[] for _ in range(cp)]
    for r, start, n in segments(batch):
        if r != row:
            continue
        chunk = n // (2 * cp)
        for rank in range(cp):
            for c in (rank, 2 * cp - 1 - rank):
                groups[rank] += list(range(start + c * chunk, start + (c + 1) * chunk))
    return groups


def row_mask(batch: dict, row: int) -> torch.Tensor:
    """[1, 1, s, s] additive block-diagonal causal mask of a packed row's segments."""
    s = batch["input_ids"].shape[1]
    doc = torch.empty(s, dtype=torch.long)
    for i, (r, start, n) in enumerate(seg for seg in segments(batch) if seg[0] == row):
        doc[start:start + n] = i
    causal = torch.arange(s)[:, None] >= torch.arange(s)[None, :]
    allowed = (doc[:, None] == doc[None, :]) & causal
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]


def packed_forward(gates: DroppingGates, cp: int):
    """reference_moe's result with each row in one forward (micro_batch_size 1: a row is a
    micro-batch), capacity over each row's token groups."""
    import importlib

    def forward(model, batch: dict, micro_batch_size: int) -> dict:
        assert micro_batch_size == 1
        c = model.config
        balance = importlib.import_module(type(model).__module__).load_balancing_loss_func
        docs = {(r, start): n for r, start, n in batch["docs"]}
        result = {"loss_sum": 0.0, "count": 0, "aux": [], "z": [], "router_logits": []}
        gaps = []
        for row in range(batch["input_ids"].shape[0]):
            gates.groups, gates.logits = cp_groups(batch, row, cp) if cp > 1 else None, []
            out = model(input_ids=batch["input_ids"][row:row + 1], position_ids=batch["position_ids"][row:row + 1],
                        attention_mask=row_mask(batch, row))
            for r, start, n in segments(batch):
                if r == row and (r, start) in docs:
                    target = batch["labels"][r, start + 1:start + n]
                    result["loss_sum"] = result["loss_sum"] + torch.nn.functional.cross_entropy(
                        out.logits[0, start:start + n - 1], target, ignore_index=IGNORE, reduction="sum")
                    result["count"] += int((target != IGNORE).sum())
            layers = tuple(gates.logits)                                        # [s, E] each
            result["router_logits"].append(layers)
            result["aux"].append(balance(layers, c.num_experts, c.num_experts_per_tok))
            result["z"].append(torch.stack([torch.logsumexp(x, dim=-1).square() for x in layers]).mean())
            top = torch.stack(layers).detach().topk(c.num_experts_per_tok + 1, dim=-1).values
            gaps.append(float((top[..., c.num_experts_per_tok - 1] - top[..., c.num_experts_per_tok]).min()))
        result["min_gap"] = min(gaps)
        return result

    return forward


def _rank_main(hf_dir: str) -> dict:
    return train_cases(CASES, RUN, lambda case: MODELS[_model(case)], lambda case: hf_dir, global_batches())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    hf_dir = str(tmp_path_factory.mktemp("hf") / "qwen3moe")
    fields = MODELS["cap"]
    hf_model(fields, seed=5).save_pretrained(hf_dir)
    refs = {}
    for policy, cp in sorted({(REFERENCE[_model(c)], c.cp) for c in CASES}):
        model = hf_model(fields, seed=5)
        gates = DroppingGates(model, FACTOR, policy)
        ref = reference_moe_training(model, global_batches(), RUN.lr, RUN.warmup, RUN.steps, 1,
                                     fields["moe_aux_loss_coef"], fields["moe_z_loss_coef"],
                                     forward=packed_forward(gates, cp))
        assert ref["min_gap"] > MIN_GAP, f"near-tie in routing, gap {ref['min_gap']:.2g}"
        assert gates.boundary_gap > BOUNDARY_GAP, f"near-tie at a capacity boundary: {gates.boundary_gap:.2g}"
        # the test must drop something, and not nearly everything
        assert 0.02 < float(gates.dropped.sum() / ref["load"].sum()) < 0.5, gates.dropped
        refs[policy, cp] = ref, canonical_reference(model), gates.dropped
    return refs, run_ranks(_rank_main, 4, hf_dir, timeout=900)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_capacity_train_steps_match_plain_pytorch(trained, case):
    refs, per_rank = trained
    ref, weights, dropped = refs[REFERENCE[_model(case)], case.cp]
    check_case(case, per_rank, ref["losses"], weights, RUN)
    for out in (r[case.name] for r in per_rank if case.name in r):
        assert torch.allclose(torch.tensor(out["aux"]), torch.tensor(ref["aux"]), rtol=1e-5), (out["aux"], ref["aux"])
        # as tests.test_moe_training: summation order moves the norms by ~1e-6 relative
        assert torch.allclose(torch.tensor(out["grad_norms"]), torch.tensor(ref["grad_norms"]), rtol=1e-4)
        record = out["moe_record"]
        layers = list(record["expert_load"])
        assert record["expert_load"] == {layer: row for layer, row in zip(layers, ref["load"].tolist())}
        assert record["expert_dropped"] == {layer: row for layer, row in zip(layers, dropped.tolist())}
        assert record["moe_dropped_fraction"] == pytest.approx(float(dropped.sum() / ref["load"].sum()))


# ------------------------------------------------------------------------------ units
def _brute_keep(experts: torch.Tensor, weights: torch.Tensor, num_experts: int, factor: float, policy: str):
    tokens, k = experts.shape
    capacity = math.ceil(factor * tokens * k / num_experts)
    keep = torch.zeros(tokens, k, dtype=torch.bool)
    for e in range(num_experts):
        slots = [(t, j) for t in range(tokens) for j in range(k) if int(experts[t, j]) == e]
        if policy == "probs":
            slots.sort(key=lambda s: -float(weights[s]))
        for t, j in slots[:capacity]:
            keep[t, j] = True
    return keep


@pytest.mark.quick
@pytest.mark.parametrize("policy", ["probs", "position"])
def test_capacity_keep_is_each_experts_best_slots_up_to_capacity(policy):
    """Against a loop over experts, with tied weights (a repeated token routes alike: ties go by slot
    order) and factors that drop much, little or nothing."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        tokens, k, experts = int(torch.randint(1, 40, (1,), generator=gen)), 2, 8
        ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
        weights = torch.rand(tokens, k, generator=gen).round(decimals=1)   # many exact ties
        for factor in (0.25, 0.5, 1.0, 1.5, 8.0):
            keep = capacity_keep(ids, weights, experts, factor, policy)
            assert torch.equal(keep, _brute_keep(ids, weights, experts, factor, policy)), (trial, factor)
    keep = capacity_keep(ids, weights, experts, float(experts), policy)
    assert bool(keep.all())   # capacity T*k: nothing dropped


@pytest.mark.quick
def test_dispatch_skips_dropped_slots_and_combine_gives_them_nothing():
    gen = torch.Generator().manual_seed(1)
    tokens, k, experts, h = 12, 2, 4, 3
    x = torch.randn(tokens, h, generator=gen)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=gen)
    keep = capacity_keep(ids, weights, experts, 0.5, "probs")
    assert 0 < int((~keep).sum()) < tokens * k
    dispatch = LocalDispatch(experts)
    rows, counts, state = dispatch.dispatch(x, ids, keep)
    assert rows.shape[0] == int(keep.sum()) and counts.tolist() == torch.bincount(ids[keep], minlength=experts).tolist()
    scale = torch.arange(1, experts + 1, dtype=x.dtype)          # an "expert" e multiplies its rows by e + 1
    out = dispatch.combine(rows * torch.repeat_interleave(scale, counts)[:, None], weights, state)
    expected = sum(x * (weights[:, j] * keep[:, j] * scale[ids[:, j]])[:, None] for j in range(k))
    assert torch.allclose(out, expected)


def test_the_packed_reference_gives_each_document_its_own_logits():
    """The reference's one-forward-per-row (block-diagonal mask) equals transformers run on each
    document alone, so it is the per-document reference of the other MoE tests."""
    model = hf_model(MODELS["cap"], seed=5)
    batch = global_batches()[0]
    with torch.no_grad():
        for row in range(batch["input_ids"].shape[0]):
            out = model(input_ids=batch["input_ids"][row:row + 1], position_ids=batch["position_ids"][row:row + 1],
                        attention_mask=row_mask(batch, row)).logits[0]
            for r, start, n in segments(batch):
                if r == row:
                    alone = model(input_ids=batch["input_ids"][r:r + 1, start:start + n]).logits[0]
                    assert (out[start:start + n] - alone).abs().max() < 1e-5


@pytest.mark.quick
def test_capacity_options_are_validated():
    from megasft.config import Config, ConfigError

    for model, message in [({"moe_capacity_factor": 1.0}, "model.moe_capacity_factor drops tokens routed to "
                            "experts, and a dense model has none (model.num_experts=0); leave it unset"),
                           ({**MODELS["cap"], "moe_capacity_factor": 0.0}, "model.moe_capacity_factor"),
                           ({**MODELS["cap"], "moe_drop_policy": "random"}, "model.moe_drop_policy")]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            Config.from_dict({"model": model}).validate()
