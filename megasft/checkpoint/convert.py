"""Hugging Face <-> megasft checkpoint conversion, streaming, in one process (no torchrun, no GPU).

hf_to_megasft: every canonical tensor the megasft model needs is checked against the HF files
(name and shape) and written to a DCP checkpoint as one whole-tensor chunk, read from safetensors
only when DCP's writer asks for it (resharding.LazyBlock). A megasft checkpoint does not depend on
the layout (see megasft.checkpoint.pieces), so the result loads at the requested tp/pp — which
is validated here against the model — and at any other.

megasft_to_hf: reads the ``model/*`` tensors of a checkpoint one at a time (DCP reads only that
tensor's chunks, from every rank's file), casts to the export dtype and streams them into
size-capped safetensors shards; peak memory is about one tensor plus one output shard.
"""
from __future__ import annotations

import json
import re
import shutil
from functools import partial
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch.distributed.checkpoint import FileSystemReader

from megasft.checkpoint.errors import CheckpointError, CheckpointMismatch
from megasft.checkpoint.files import (TMP_PREFIX, load_dcp, quiet_single_process, read_meta, resolve_checkpoint,
                                      publish, step_name, verification_problem)
from megasft.checkpoint.manifest import ChecksummedWriter
from megasft.checkpoint.meta import FORMAT_VERSION, model_shape
from megasft.checkpoint.pieces import MODEL_PREFIX, Block, TensorPieces
from megasft.checkpoint.resharding import LazyBlock, PiecesLoadPlanner, PiecesSavePlanner
from megasft.config import Config, ConfigError, ModelConfig
from megasft.hf.config import hf_config_from_model, hf_form_problem, model_fields_from_hf, read_hf_config
from megasft.hf.io import HFTensors, save_hf_tensors
from megasft.hf.names import canonical_names, full_shapes, fuse_stored, stored_locations
from megasft.layout import Layout

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


# ----------------------------------------------------------------------------- HF -> megasft
def canonical_tensors(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical (HF) tensor name and full shape a megasft model of this config holds,
    found by building the tp=pp=1 model on the meta device (so the name table stays the one
    source of truth)."""
    from megasft.model.llama import LlamaStage
    from megasft.parallel_state import ParallelState

    with torch.device("meta"):
        stage = LlamaStage(model, ParallelState.single(), list(range(model.num_layers)),
                           pre_process=True, post_process=True)
    out = {}
    for name, param in stage.named_parameters():
        out.update(zip(canonical_names(name, param), full_shapes(param)))
    return out


def hf_to_megasft(hf_dir: str | Path, out: str | Path, tp: int = 1, pp: int = 1) -> Path:
    """Write the HF Llama directory `hf_dir` as a megasft checkpoint under the root `out` (with a
    ``latest``); returns the checkpoint directory. Raises ConfigError when the model cannot be
    split at tp/pp, CheckpointMismatch when a tensor is missing or has the wrong shape."""
    import torch.distributed.checkpoint as dcp

    hf_dir, out = Path(hf_dir), Path(out)
    hf_config = read_hf_config(hf_dir)
    fields = model_fields_from_hf(hf_config, str(hf_dir / "config.json"))
    cfg = Config.from_dict({"model": {**fields, "hf_config": hf_config}, "parallel": {"tp": tp, "pp": pp}})
    Layout.resolve(cfg.validate(), tp * pp)
    tensors = HFTensors(hf_dir)
    shapes = canonical_tensors(cfg.model)
    # Fused HF tensors (Phi-3's qkv_proj, gate_up_proj) hold several canonical ones as row ranges.
    where = stored_locations(cfg.model.family, shapes)
    state: dict = {}
    for name, shape in shapes.items():
        stored, offset, rows = where.get(name, (name, 0, shape[0]))
        if stored not in tensors.weight_map:
            raise CheckpointMismatch(f"{hf_dir}: tensor {stored!r} not found (config.json describes a model "
                                     "that has it)")
        if tensors.shape(stored) != (rows, *shape[1:]):
            raise CheckpointMismatch(f"{hf_dir / tensors.weight_map[stored]}: tensor {stored!r} has shape "
                                     f"{tensors.shape(stored)}, config.json implies {(rows, *shape[1:])}")
        read = partial(tensors.raw, name) if stored == name else partial(tensors.read, stored, 0, offset, shape[0])
        lazy = LazyBlock(shape, read)
        state[MODEL_PREFIX + name] = TensorPieces(shape, tensors.dtype(stored), [Block((0,) * len(shape), lazy)])
    state["meta"] = {"format": FORMAT_VERSION, "step": 0, "consumed_tokens": 0, "loader": None,
                     "model": model_shape(cfg.model), "hf_config": hf_config,
                     "layout": {"tp": tp, "pp": pp, "converted_from": str(hf_dir)}, "config": cfg.to_dict()}
    name = step_name(0)
    tmp, final = out / (TMP_PREFIX + name), out / name
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg.save(tmp / "config.yaml")
    # One file per tensor: DCP's writer keeps every tensor of a file alive until the file is
    # closed, so the default one-file-per-rank would hold the whole model in memory.
    writer = ChecksummedWriter(str(tmp), single_file_per_rank=False)
    with quiet_single_process():
        dcp.save(state, storage_writer=writer, planner=PiecesSavePlanner(), no_dist=True)
    publish(tmp, final, keep_last=0)
    return final


# ----------------------------------------------------------------------------- megasft -> HF
def hf_order(name: str) -> tuple:
    """Embedding, then layers in numeric order, then the final norm and head (HF's usual order)."""
    match = re.match(r"model\.layers\.(\d+)\.(.*)", name)
    if match:
        return (1, int(match.group(1)), match.group(2))
    return (0 if "embed_tokens" in name else 2, 0, name)


def stream_model_tensors(path: Path, dtype: Optional[torch.dtype]) -> Iterator[tuple[str, torch.Tensor]]:
    """(hf name, full tensor) for every model tensor of the checkpoint at `path`, one at a time."""
    metadata = FileSystemReader(str(path)).read_metadata()
    names = sorted((k[len(MODEL_PREFIX):] for k in metadata.state_dict_metadata if k.startswith(MODEL_PREFIX)),
                   key=hf_order)
    for name in names:
        md = metadata.state_dict_metadata[MODEL_PREFIX + name]
        size = tuple(md.size)
        # Read straight into the export dtype: no second full-size copy for the cast.
        target = torch.empty(size, dtype=dtype or md.properties.dtype)
        state = {MODEL_PREFIX + name: TensorPieces(size, md.properties.dtype, [Block((0,) * len(size), target)])}
        load_dcp(state, path, PiecesLoadPlanner(str(path)), None, no_dist=True)
        yield name, target


def default_export_dtype(cfg: Config, meta: Optional[dict] = None) -> str:
    """The dtype of the model the run started from: ``torch_dtype`` (or ``dtype``) of the
    config.json of ``model.init_from_hf`` / an imported HF model; bf16 when it is not known."""
    hf_config = cfg.model.hf_config or (meta or {}).get("hf_config") or {}
    name = hf_config.get("torch_dtype") or hf_config.get("dtype")
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(str(name).replace("torch.", ""), "bf16")


def special_token_ids(tokenizer: Optional[str], template: str, hf_config: Optional[dict]) -> dict:
    """bos / eos / pad ids for config.json and generation_config.json: from the run's tokenizer and
    chat template (the end-of-turn token is an eos, so generation stops at the end of the
    assistant's turn), else from the imported HF config, else {}."""
    if tokenizer:
        from megasft.data.tokenizer import load_tokenizer

        s = load_tokenizer(tokenizer, template).specials
        return {"bos_token_id": s.bos_id, "eos_token_id": sorted({s.eos_id, s.eot_id}), "pad_token_id": s.pad_id}
    if hf_config:
        eos = hf_config.get("eos_token_id")
        return {"bos_token_id": hf_config.get("bos_token_id"),
                "eos_token_id": eos if isinstance(eos, list) or eos is None else [eos],
                "pad_token_id": hf_config.get("pad_token_id")}
    return {}


def megasft_to_hf(ckpt: str | Path, out: str | Path, dtype: Optional[str] = None, tokenizer: Optional[str] = None,
                  max_shard_bytes: int = 5 * 2 ** 30, template: Optional[str] = None) -> Path:
    """Write the model of checkpoint `ckpt` (a checkpoint or a root with ``latest``) as a complete
    HF chat model: config.json, generation_config.json (eos = end-of-turn and eos ids), sharded
    safetensors + index, tokenizer.json / tokenizer_config.json (with the run's chat template) /
    special_tokens_map.json (megasft.hf.tokenizer_export); every file mode 0644.
    `dtype` None: the dtype of the model the run started from (default_export_dtype). `tokenizer`
    and `template` default to the ones the run was trained with (trained_chat_format)."""
    from megasft.hf.tokenizer_export import trained_chat_format, write_tokenizer_files

    path = resolve_checkpoint(ckpt)
    problem = verification_problem(path)
    if problem is not None:
        raise CheckpointError(f"{problem}; nothing was exported")
    meta = read_meta(path)
    cfg = Config.from_dict(meta["config"])
    problem = hf_form_problem(cfg.model)
    if problem:
        raise ConfigError(f"{path}: {problem}; nothing was exported")
    dtype = dtype or default_export_dtype(cfg, meta)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    run_tokenizer, run_template = trained_chat_format(cfg)
    tokenizer, template = tokenizer or run_tokenizer, template or run_template
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_hf_tensors(fuse_stored(cfg.model.family, stream_model_tensors(path, DTYPES[dtype])), out,
                    max_shard_bytes=max_shard_bytes)
    # Without a tokenizer the source config.json's ids stay as they were (ModelConfig.hf_config);
    # checkpoints from before it was kept fall back to the meta's copy.
    ids = special_token_ids(tokenizer, template, None if cfg.model.hf_config else meta.get("hf_config"))
    torch_dtype = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}[dtype]
    config = hf_config_from_model(cfg.model, torch_dtype, eos_token_id=ids.get("eos_token_id"),
                                  bos_token_id=ids.get("bos_token_id"))
    if ids.get("pad_token_id") is not None:
        config["pad_token_id"] = ids["pad_token_id"]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    # Sampling defaults of Llama-3-Instruct's generation_config; megasft.chat uses the same.
    generation = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id"),
                  "pad_token_id": config.get("pad_token_id"), "do_sample": True, "temperature": 0.6, "top_p": 0.9}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if tokenizer:
        write_tokenizer_files(tokenizer, template, out, model_max_length=cfg.model.max_position_embeddings)
    for f in out.iterdir():   # readable by every user of a shared model directory, whatever the umask
        if f.is_file():
            f.chmod(0o644)
    return out
