"""The tokenizer half of a Hugging Face export: what ``AutoTokenizer.from_pretrained(export)`` reads.

- ``tokenizer.json``: copied from an HF tokenizer, or converted from a sentencepiece ``.model`` by
  transformers' own SentencePiece converter (``SpmConverter.build_tokenizer_from_spm_proto``, which
  follows the model's normaliser, dummy prefix, byte fallback and user-defined pieces); the proto is
  read here, so protobuf is not needed. The run's special tokens (bos, eos, end-of-turn, pad, the
  template's markers) are registered as special added tokens: single ids, skipped by
  ``decode(skip_special_tokens=True)``.
- ``tokenizer_config.json``: bos / eos / pad / unk tokens and ``chat_template``, the template the run
  was trained with — a built-in (llama3, chatml) as the Jinja text it reproduces, a Jinja template
  as its source.
- ``special_tokens_map.json``.

The run's tokenizer and template are the ones its training data was preprocessed with
(``meta.json`` of ``data.train_path``), else ``data.tokenizer`` / ``data.template`` of its config.
"""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

from megasft.data.templates import LLAMA3_HF_CHAT_TEMPLATE
from megasft.data.tokenizer import Tokenizer, _varint, find_tokenizer_files, load_tokenizer

# The Jinja text each built-in template renders exactly (tests/test_hf_export.py checks both).
CHATML_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
BUILTIN_JINJA = {"llama3": LLAMA3_HF_CHAT_TEMPLATE, "chatml": CHATML_HF_CHAT_TEMPLATE}
STALE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
               "chat_template.jinja")


def trained_chat_format(cfg) -> tuple[Optional[str], str]:
    """(tokenizer path, template name) the run at config `cfg` was trained with: the training
    dataset's meta.json (written by preprocessing) when it names an existing tokenizer, else
    ``data.tokenizer`` / ``data.template``."""
    meta_file = Path(cfg.data.train_path or "") / "meta.json"
    if cfg.data.train_path and meta_file.is_file():
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        tokenizer, template = meta.get("tokenizer"), meta.get("template")
        if tokenizer and Path(tokenizer).exists() and template:
            return tokenizer, template
    return cfg.data.tokenizer, cfg.data.template


def template_source(template) -> str:
    """The Jinja text of a ChatTemplate (a built-in's equivalent HF template)."""
    if template.name in BUILTIN_JINJA:
        return BUILTIN_JINJA[template.name]
    source = getattr(template, "source", None)
    if source is None:
        raise ValueError(f"template {template.name!r} has no Jinja form to export")
    return source


# ----------------------------------------------------------------------------- sentencepiece
def _fields(buf: bytes):
    """(field number, value) of a serialized protobuf message: varints as int, the rest as bytes."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = buf[i:i + size], i + size
        else:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        yield number, value


def read_sentencepiece_proto(path: Path) -> SimpleNamespace:
    """The parts of a sentencepiece ModelProto the transformers converter reads (field numbers from
    sentencepiece_model.proto: pieces 1 {piece 1, score 2, type 3}, trainer_spec 2 {model_type 3,
    byte_fallback 35, unk_piece 45}, normalizer_spec 3 {precompiled_charsmap 2, add_dummy_prefix 3,
    remove_extra_whitespaces 4, escape_whitespaces 5}); absent fields take the proto defaults."""
    pieces, trainer, norm = [], {}, {}
    for number, value in _fields(path.read_bytes()):
        if number == 1:
            piece = dict(_fields(value))
            pieces.append(SimpleNamespace(piece=piece.get(1, b"").decode("utf-8"), type=piece.get(3, 1),
                                          score=struct.unpack("<f", piece[2])[0] if 2 in piece else 0.0))
        elif number == 2:
            trainer = dict(_fields(value))
        elif number == 3:
            norm = dict(_fields(value))
    return SimpleNamespace(
        pieces=pieces,
        trainer_spec=SimpleNamespace(model_type=trainer.get(3, 1), byte_fallback=bool(trainer.get(35, 0)),
                                     unk_piece=trainer.get(45, b"<unk>").decode("utf-8")),
        normalizer_spec=SimpleNamespace(precompiled_charsmap=norm.get(2, b""), add_dummy_prefix=bool(norm.get(3, 1)),
                                        remove_extra_whitespaces=bool(norm.get(4, 1)),
                                        escape_whitespaces=bool(norm.get(5, 1))))


def sentencepiece_to_tokenizers(path: Path):
    """A ``tokenizers.Tokenizer`` encoding like the sentencepiece model at `path` (BPE or unigram)."""
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = read_sentencepiece_proto(path)
    if proto.trainer_spec.model_type == 2:     # BPE: merges regenerated from the piece scores
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    else:
        vocab = [(p.piece, p.score) for p in proto.pieces]
    converted = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    if converted is None:
        raise ValueError(f"{path}: sentencepiece model type {proto.trainer_spec.model_type} cannot be converted "
                         "to tokenizer.json (BPE and unigram can)")
    return converted


# ----------------------------------------------------------------------------- the files
def special_token_names(tok: Tokenizer, template) -> dict[str, str]:
    """bos / eos / pad token strings of the run (eos: the template's end-of-sequence token)."""
    s = tok.specials
    names = {"eos_token": tok.id_to_piece(s.eos_id), "pad_token": tok.id_to_piece(s.pad_id)}
    if s.bos_id is not None:
        names["bos_token"] = tok.id_to_piece(s.bos_id)
    return names


def write_tokenizer_files(tokenizer: str | Path, template_name: str, out: Path,
                          model_max_length: Optional[int] = None) -> dict[str, str]:
    """Write tokenizer.json, tokenizer_config.json (with the chat template) and
    special_tokens_map.json for the run's tokenizer and template into `out`; returns the special
    token names written."""
    from megasft.data.templates import get_template

    model_file, source_config = find_tokenizer_files(tokenizer)
    tok = load_tokenizer(tokenizer, template_name)
    template = get_template(template_name, tokenizer_config=tok.config)
    for name in STALE_FILES:   # an older export's files must not survive next to the new ones
        (out / name).unlink(missing_ok=True)
    rust = None
    if model_file.suffix == ".json":
        from tokenizers import Tokenizer as RustTokenizer

        rust = RustTokenizer.from_file(str(model_file))
    else:
        shutil.copyfile(model_file, out / "tokenizer.model")
        try:
            rust = sentencepiece_to_tokenizers(model_file)
        except (ImportError, AttributeError) as err:   # no transformers, or one without this converter
            # The weights are written by now: an export at the end of a run must not fail here.
            print(f"megasft: warning: {out / 'tokenizer.json'} not written ({type(err).__name__}: {err}); "
                  "install transformers>=5 (pip install -e '.[hf]') and re-export with megasft convert "
                  "megasft-to-hf; tokenizer.model is there", flush=True)
    names = special_token_names(tok, template)
    if rust is not None:
        from tokenizers import AddedToken

        markers = {*names.values(), tok.id_to_piece(tok.eot_id), *template.required_tokens}
        rust.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in sorted(markers)])
        rust.save(str(out / "tokenizer.json"))
    config = {k: v for k, v in source_config.items() if k not in ("chat_template", "tokenizer_file")}
    config.update(names, tokenizer_class="PreTrainedTokenizerFast", chat_template=template_source(template),
                  clean_up_tokenization_spaces=False)
    config.setdefault("add_bos_token", False)    # the chat template writes bos as text
    config.setdefault("add_eos_token", False)
    if model_max_length:
        config.setdefault("model_max_length", model_max_length)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(names, indent=2, ensure_ascii=False), encoding="utf-8")
    return names
