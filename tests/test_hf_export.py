"""The tokenizer half of the HF export (megasft.hf.tokenizer_export): transformers' AutoTokenizer on
the exported files renders and encodes every prompt exactly as megasft's ChatEncoder does — for a
copied tokenizer.json and for one converted from sentencepiece, with built-in templates written as
their Jinja text and a model's own Jinja template. The model half (weights, generation_config and
generate) is tested on a trained model in tests/test_generate_chat.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from megasft.data.templates import ChatEncoder, get_template
from megasft.data.tokenizer import load_tokenizer
from megasft.generate import split_reference
from megasft.hf.tokenizer_export import write_tokenizer_files
from tests.data_fixtures import conversations, hf_tokenizer_dir, sp_model_path

QWEN = str(Path(__file__).resolve().parents[2] / "shared" / "chat_templates" / "qwen2_5.jinja")
CASES = {"hf-chatml": ("hf", "chatml"), "hf-llama3": ("hf", "llama3"), "sp-llama3": ("sp", "llama3"),
         "hf-qwen2.5-jinja": ("hf", QWEN)}


@pytest.fixture(scope="module")
def tokenizers():
    return {"hf": str(hf_tokenizer_dir() / "tokenizer.json"), "sp": str(sp_model_path())}


def plain(conversation):
    """Turns a built-in template renders (plain text; the tool role becomes a user turn)."""
    return [{"role": "user" if m["role"] == "tool" else m["role"], "content": m["content"]} for m in conversation]


@pytest.mark.parametrize("case", list(CASES))
def test_autotokenizer_on_the_export_encodes_prompts_like_megasft(case, tokenizers, tmp_path):
    from transformers import AutoTokenizer

    kind, template_name = CASES[case]
    if template_name == QWEN and not Path(QWEN).is_file():
        pytest.skip(f"{QWEN} is not there")
    names = write_tokenizer_files(tokenizers[kind], template_name, tmp_path)
    tok = load_tokenizer(tokenizers[kind], template_name)
    template = get_template(template_name, tokenizer_config=tok.config)
    encoder = ChatEncoder(tok, template)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (theirs.eos_token, theirs.pad_token) == (names["eos_token"], names["pad_token"])
    assert theirs.eos_token == tok.id_to_piece(tok.eos_id) and config["chat_template"]
    seen = 0
    for conversation in conversations(40, seed=3):
        prompt, _ = split_reference(plain(conversation))
        if not prompt:
            continue
        text = theirs.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        assert text == template.render_text(prompt, add_generation_prompt=True)
        ids = theirs.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False)
        assert list(ids) == encoder.encode_prompt(prompt), text
        seen += 1
    assert seen > 20
    # The end-of-turn marker is one special id, dropped by decode(skip_special_tokens=True).
    eot = theirs.convert_tokens_to_ids(tok.id_to_piece(tok.eot_id))
    assert eot == tok.eot_id and theirs.decode([eot], skip_special_tokens=True) == ""


def test_a_second_export_replaces_the_first_tokenizer_files(tokenizers, tmp_path):
    write_tokenizer_files(tokenizers["sp"], "llama3", tmp_path)
    assert (tmp_path / "tokenizer.model").exists()
    write_tokenizer_files(tokenizers["hf"], "chatml", tmp_path)
    assert not (tmp_path / "tokenizer.model").exists()
    assert "<|im_start|>" in json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"]


def test_without_the_converter_the_export_keeps_tokenizer_model_and_warns(tokenizers, tmp_path, monkeypatch, capsys):
    import megasft.hf.tokenizer_export as export

    def missing(path):
        raise ImportError("no transformers")
    monkeypatch.setattr(export, "sentencepiece_to_tokenizers", missing)
    write_tokenizer_files(tokenizers["sp"], "llama3", tmp_path)
    assert (tmp_path / "tokenizer.model").exists() and not (tmp_path / "tokenizer.json").exists()
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"]
    assert "tokenizer.json not written (ImportError: no transformers)" in capsys.readouterr().out
