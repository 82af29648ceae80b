"""The locally built test tokenizers (tests/data_fixtures.py) behave as real ones do."""
from __future__ import annotations

from tests.data_fixtures import hf_tokenizer_dir, sp_model_path


def test_fixture_tokenizers_round_trip():
    from megasft.data.tokenizer import load_tokenizer

    hf = load_tokenizer(hf_tokenizer_dir(), "llama3")
    sp = load_tokenizer(sp_model_path(), "llama3")
    for tok in (hf, sp):
        text = "<|begin_of_text|>What is 3 plus 4?<|eot_id|>"
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eot_id
        assert tok.decode(ids) == text
