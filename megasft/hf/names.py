"""The one table between megasft parameter names and Hugging Face tensor names (every family).

A megasft parameter may fuse several HF tensors (kv_proj = [k_proj; v_proj], gate_up =
[gate_proj; up_proj]) and hold only this rank's shard of each; the ParamSpec split (see
megasft.tensor_parallel.spec) says which. Everything that moves weights between the two worlds
— random init, HF import, HF export, resharding — goes through ``canonical_names`` and
the spec's split, so the split/merge rules exist exactly once. Families whose HF files fuse
canonical tensors themselves (Phi-3's qkv_proj, gate_up_proj) are read and written through
``stored_access`` / ``fuse_stored`` below, as are families that store them under other names
(Mixtral's block_sparse_moe.experts.E.w1 for the canonical mlp.experts.E.gate_proj).

Routed experts (megasft.model.moe) are canonical per expert, as the HF files hold them
(``mlp.experts.E.gate_proj.weight`` ...): the stacked expert parameter of a layer expands its
``{e}`` names over the experts its ParamSpec says it holds.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import nn

from megasft.model.families import family_of
from megasft.tensor_parallel.spec import first_replica, spec_of

# megasft name (regex, layer id captured) -> HF tensor names fused into it, in order.
_LAYER = "model.layers.{0}."
_EXPERT = _LAYER + "mlp.experts.{e}."
NAME_TABLE: list[tuple[str, tuple[str, ...]]] = [
    (r"embedding\.weight", ("model.embed_tokens.weight",)),
    (r"layers\.(\d+)\.attn_norm\.weight", (_LAYER + "input_layernorm.weight",)),
    (r"layers\.(\d+)\.attention\.q_proj\.weight", (_LAYER + "self_attn.q_proj.weight",)),
    (r"layers\.(\d+)\.attention\.q_proj\.bias", (_LAYER + "self_attn.q_proj.bias",)),
    (r"layers\.(\d+)\.attention\.kv_proj\.weight",
     (_LAYER + "self_attn.k_proj.weight", _LAYER + "self_attn.v_proj.weight")),
    (r"layers\.(\d+)\.attention\.kv_proj\.bias",
     (_LAYER + "self_attn.k_proj.bias", _LAYER + "self_attn.v_proj.bias")),
    (r"layers\.(\d+)\.attention\.o_proj\.weight", (_LAYER + "self_attn.o_proj.weight",)),
    (r"layers\.(\d+)\.attention\.q_norm\.weight", (_LAYER + "self_attn.q_norm.weight",)),
    (r"layers\.(\d+)\.attention\.k_norm\.weight", (_LAYER + "self_attn.k_norm.weight",)),
    (r"layers\.(\d+)\.mlp_norm\.weight", (_LAYER + "post_attention_layernorm.weight",)),
    # Gemma's four norms: HF's post_attention_layernorm is the attention *output* norm there.
    (r"layers\.(\d+)\.attn_post_norm\.weight", (_LAYER + "post_attention_layernorm.weight",)),
    (r"layers\.(\d+)\.mlp_pre_norm\.weight", (_LAYER + "pre_feedforward_layernorm.weight",)),
    (r"layers\.(\d+)\.mlp_post_norm\.weight", (_LAYER + "post_feedforward_layernorm.weight",)),
    (r"layers\.(\d+)\.mlp\.gate_up\.weight", (_LAYER + "mlp.gate_proj.weight", _LAYER + "mlp.up_proj.weight")),
    (r"layers\.(\d+)\.mlp\.down\.weight", (_LAYER + "mlp.down_proj.weight",)),
    (r"layers\.(\d+)\.mlp\.router\.weight", (_LAYER + "mlp.gate.weight",)),
    # DeepSeek-V3's routing bias (state, not trained: megasft.model.router) and shared experts
    (r"layers\.(\d+)\.mlp\.router\.e_score_correction_bias", (_LAYER + "mlp.gate.e_score_correction_bias",)),
    (r"layers\.(\d+)\.mlp\.shared_experts\.gate_up\.weight",
     (_LAYER + "mlp.shared_experts.gate_proj.weight", _LAYER + "mlp.shared_experts.up_proj.weight")),
    (r"layers\.(\d+)\.mlp\.shared_experts\.down\.weight", (_LAYER + "mlp.shared_experts.down_proj.weight",)),
    # every held expert's [gate_proj; up_proj] rows, expert after expert, and its down_proj columns
    (r"layers\.(\d+)\.mlp\.experts\.gate_up", (_EXPERT + "gate_proj.weight", _EXPERT + "up_proj.weight")),
    (r"layers\.(\d+)\.mlp\.experts\.down", (_EXPERT + "down_proj.weight",)),
    (r"norm\.weight", ("model.norm.weight",)),
    (r"lm_head\.weight", ("lm_head.weight",)),
]
_COMPILED = [(re.compile(pattern + r"$"), names) for pattern, names in NAME_TABLE]


def canonical_names(name: str, param: nn.Parameter | None = None) -> tuple[str, ...]:
    """HF tensor names held (fused, sharded) by the megasft parameter `name`."""
    for pattern, names in _COMPILED:
        match = pattern.match(name)
        if match:
            if param is not None and spec_of(param).tied:
                return ("model.embed_tokens.weight",)
            if "{e}" not in names[0]:
                return tuple(n.format(*match.groups()) for n in names)
            experts = None if param is None else spec_of(param).experts
            if experts is None:
                raise KeyError(f"parameter {name!r} stacks routed experts, but no expert range was given")
            first, count = experts
            return tuple(n.format(*match.groups(), e=e) for e in range(first, first + count) for n in names)
    raise KeyError(f"parameter {name!r} has no Hugging Face name in megasft.hf.names.NAME_TABLE")


def full_shapes(param: nn.Parameter) -> list[tuple[int, ...]]:
    split = spec_of(param).split
    return [tuple(param.shape)] if split is None else split.full_shapes(param.shape)


def local_from_canonical(param: nn.Parameter, fulls: list[torch.Tensor]) -> torch.Tensor:
    split = spec_of(param).split
    if split is None:
        (full,) = fulls
        return full
    return split.local_from_full(fulls)


# ----------------------------------------------------------------------------- fused HF tensors
# Canonical names are Llama's (q_proj, k_proj, v_proj, gate_proj, up_proj) for every family; a
# family whose HF files fuse some of them (Family.fused: Phi-3's qkv_proj, gate_up_proj) stores
# each canonical tensor as a row range of the fused one. Import reads a rank's TP shard of a
# canonical piece at that range (never a slice of the fused tensor's own split); export fuses back.
_IN_LAYER = re.compile(r"(model\.layers\.\d+\.)(.+)$")


def stored_name(family: str, name: str) -> str:
    """The name `family`'s HF files give the (unfused) canonical tensor `name` (Family.renamed)."""
    match = _IN_LAYER.match(name)
    for pattern, replacement in family_of(family).renamed if match else ():
        if re.fullmatch(pattern, match.group(2)):
            return match.group(1) + re.sub(pattern, replacement, match.group(2))
    return name


def stored_locations(family: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[str, int, int]]:
    """canonical name -> (tensor in `family`'s HF files, its first row there, the fused tensor's
    rows) for every name of `shapes` (canonical name -> full shape) stored fused or renamed; the
    other canonical tensors are stored as themselves."""
    out = {}
    for name in shapes:
        renamed = stored_name(family, name)
        if renamed != name:   # one canonical tensor under another name: all its rows
            out[name] = (renamed, 0, shapes[name][0])
            continue
        match = _IN_LAYER.match(name)
        for stored, parts in family_of(family).fused if match else ():
            if match.group(2) not in parts:
                continue
            members = [match.group(1) + part for part in parts]
            missing = [m for m in members if m not in shapes]
            if missing:
                raise KeyError(f"{name} is stored fused in {match.group(1) + stored} with {missing}, which "
                               "the model does not hold")
            rows = [shapes[m][0] for m in members]
            out[name] = (match.group(1) + stored, sum(rows[:parts.index(match.group(2))]), sum(rows))
    return out


def stored_access(family: str, shapes: dict[str, tuple[int, ...]], shape_of: Callable[[str], tuple[int, ...]],
                  read: Callable[[str, int, int, int], torch.Tensor]):
    """(shape_of, read) by canonical name over the tensors of `family`'s HF files, given the same
    two by stored name (read(name, dim, start, length): the tensor narrowed along dim)."""
    where = stored_locations(family, shapes)

    def canonical_shape(name: str) -> tuple[int, ...]:
        if name not in where:
            return tuple(shape_of(name))
        stored, _, total = where[name]
        full = tuple(shape_of(stored))
        if full[0] != total:
            parts = " + ".join(f"{n} {shapes[n][0]}" for n, w in where.items() if w[0] == stored)
            raise ValueError(f"{stored}: checkpoint has shape {full}, the model expects {(total, *full[1:])} "
                             f"(rows {parts})")
        return (shapes[name][0], *full[1:])

    def canonical_read(name: str, dim: int, start: int, length: int) -> torch.Tensor:
        if name not in where:
            return read(name, dim, start, length)
        stored, offset, _ = where[name]
        if dim == 0:
            return read(stored, 0, offset + start, length)
        return read(stored, dim, start, length).narrow(0, offset, shapes[name][0])

    return canonical_shape, canonical_read


def fuse_stored(family: str, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Canonical (name, tensor) pairs as `family`'s HF tensors: the pieces of a fused tensor are held
    until all have arrived (one layer's at a time in the usual order), then concatenated."""
    fused = family_of(family).fused
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors:
        match = _IN_LAYER.match(name)
        group = next(((st, parts) for st, parts in fused if match and match.group(2) in parts), None)
        if group is None:
            yield stored_name(family, name), tensor
            continue
        stored, parts = match.group(1) + group[0], group[1]
        pending.setdefault(stored, {})[match.group(2)] = tensor
        if len(pending[stored]) == len(parts):
            pieces = pending.pop(stored)
            yield stored, torch.cat([pieces[p] for p in parts])
    if pending:
        raise ValueError(f"fused tensors {sorted(pending)} are missing pieces: got only {pending[min(pending)].keys()}")


def module_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """canonical name -> full shape of every canonical tensor `module` holds (part of)."""
    return {n: s for name, p in module.named_parameters() for n, s in zip(canonical_names(name, p), full_shapes(p))}


def load_canonical(module: nn.Module, get_tensor: Callable[[str, tuple[int, ...]], torch.Tensor]) -> None:
    """Fill every parameter of `module` from canonical tensors: get_tensor(hf_name, full_shape)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            names = canonical_names(name, param)
            fulls = [get_tensor(n, shape) for n, shape in zip(names, full_shapes(param))]
            for n, full, shape in zip(names, fulls, full_shapes(param)):
                if tuple(full.shape) != shape:
                    raise ValueError(f"{n}: checkpoint has shape {tuple(full.shape)}, the model expects {shape}")
            param.copy_(local_from_canonical(param, fulls))


def load_canonical_sliced(module: nn.Module, shape_of: Callable[[str], tuple[int, ...]],
                          read: Callable[[str, int, int, int], torch.Tensor]) -> None:
    """load_canonical reading only this rank's rows: shape_of(hf_name) -> full shape (checked),
    read(hf_name, dim, start, length) -> the canonical tensor narrowed along dim. Vocab padding
    rows are zeroed, as TPSplit.local_from_full pads them."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            names, shapes = canonical_names(name, param), full_shapes(param)
            for n, shape in zip(names, shapes):
                if tuple(shape_of(n)) != shape:
                    raise ValueError(f"{n}: checkpoint has shape {tuple(shape_of(n))}, the model expects {shape}")
            split = spec_of(param).split
            if split is None:
                param.copy_(read(names[0], 0, 0, shapes[0][0]))
                continue
            offset = 0
            for n, shard in zip(names, split.parts):
                target = param.narrow(split.dim, offset, shard.local)
                keep = max(0, min(shard.local, shard.size - shard.start))
                if keep:
                    target.narrow(split.dim, 0, keep).copy_(read(n, split.dim, shard.start, keep))
                if keep < shard.local:
                    target.narrow(split.dim, keep, shard.local - keep).zero_()
                offset += shard.local


def load_hf_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a transformers state dict of the model's family (module.cfg.family; fused tensors
    split; a tied lm_head may be absent) into a LlamaStage."""
    def shape_of(name: str) -> tuple[int, ...]:
        return tuple(state[stored_name(name)].shape)

    def read(name: str, dim: int, start: int, length: int) -> torch.Tensor:
        return state[stored_name(name)].narrow(dim, start, length)

    def stored_name(name: str) -> str:
        if name not in state and name == "lm_head.weight":
            name = "model.embed_tokens.weight"
        if name not in state:
            raise KeyError(f"Hugging Face state has no tensor {name!r}")
        return name

    load_canonical_sliced(module, *stored_access(module.cfg.family, module_shapes(module), shape_of, read))


def canonical_pieces(module: nn.Module, grads: bool = False,
                     keep: Optional[Callable[[nn.Parameter], bool]] = None) -> Iterator[tuple[str, int, int, torch.Tensor]]:
    """(hf_name, split dim, offset, piece) for every shard this rank holds (of the parameters
    `keep` accepts) — of the weights, or with grads=True of their ``.grad`` (a module trained
    without the optimizer, whose fp32 main grads it owns); replicated parameters come with dim -1
    (the whole tensor)."""
    for name, param in module.named_parameters():
        if keep is not None and not keep(param):
            continue
        names = canonical_names(name, param)
        tensor = param.detach()
        if grads:
            tensor = param.grad
            if tensor is None:
                continue
        split = spec_of(param).split
        if split is None:
            yield names[0], -1, 0, tensor
            continue
        for part, offset, piece in split.pieces(tensor):
            yield names[part], split.dim, offset, piece


def assemble_canonical(pieces: Iterable[tuple[str, int, int, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Full canonical tensors from the (name, dim, offset, piece) tuples of every rank. Copies of
    replicated tensors (norms, replicated kv heads, a tied head) arrive more than once; one is kept."""
    by_name: dict[str, dict[int, tuple[int, torch.Tensor]]] = {}
    for name, dim, offset, piece in pieces:
        by_name.setdefault(name, {}).setdefault(offset, (dim, piece))
    full = {}
    for name, parts in by_name.items():
        ordered = [parts[o] for o in sorted(parts)]
        dim = ordered[0][0]
        full[name] = ordered[0][1] if dim < 0 else torch.cat([p for _, p in ordered], dim=dim)
    return full


def gather_hf_state(chunks: list[nn.Module], ps, dtype: torch.dtype = torch.float32):
    """The whole model as HF-named full tensors on the layout's rank 0 (None elsewhere). Collective.
    Meant for small models (it moves every shard through rank 0); large exports stream from a
    checkpoint with megasft convert instead."""
    import torch.distributed as dist

    mine = [(n, d, o, p.to(dtype=dtype, device="cpu").clone())
            for chunk in chunks for n, d, o, p in canonical_pieces(chunk, keep=lambda q: first_replica(q, ps))]
    if ps.world_size == 1:
        return dict(fuse_stored(chunks[0].cfg.family, assemble_canonical(mine).items()))
    gathered = [None] * ps.world_size if ps.rank == 0 else None
    dist.gather_object(mine, gathered, dst=ps.layout_ranks[0], group=ps.world_group)
    if ps.rank != 0:
        return None
    full = assemble_canonical(p for rank_pieces in gathered for p in rank_pieces)
    return dict(fuse_stored(chunks[0].cfg.family, full.items()))
