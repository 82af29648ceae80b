"""The bundled tiny chat example: deterministic data, a tokenizer made by the project itself, and the
preprocess -> inspect path a user runs before training."""
from __future__ import annotations

import subprocess
import sys

from megasft.data.indexed import IndexedDataset
from megasft.data.preprocess import PreprocessOptions, preprocess
from megasft.data.tokenizer import load_tokenizer
from tests.data_fixtures import REPO
from tools import inspect_data


def make_data(out, *extra):
    subprocess.run([sys.executable, str(REPO / "examples/tiny_chat/make_data.py"), "--out", str(out), "--train", "300",
                    "--eval", "20", *extra], check=True, capture_output=True, cwd=REPO)


def test_example_data_tokenizer_and_inspect(tmp_path, capsys):
    make_data(tmp_path / "a")
    make_data(tmp_path / "b")
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    tok = load_tokenizer(tmp_path / "a" / "tokenizer.model", "llama3")
    for name in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>",
                 "<|pad|>"):
        assert tok.encode(name) == [tok.token_to_id(name)]
    assert tok.pad_id == tok.token_to_id("<|pad|>") and tok.eot_id == tok.token_to_id("<|eot_id|>")
    summary = preprocess(PreprocessOptions(inputs=[str(tmp_path / "a" / "train.jsonl")], output=str(tmp_path / "ds"),
                                           tokenizer=str(tmp_path / "a" / "tokenizer.model"), seq_len=256,
                                           workers=1, progress=False))
    assert summary.kept == 300 and 0.02 < summary.trained_fraction < 0.5
    ds = IndexedDataset(tmp_path / "ds")
    assert ds.meta["eot_id"] == tok.eot_id
    assert inspect_data.main(["--data", str(tmp_path / "ds"), "-n", "1", "--color", "off"]) == 0
    out = capsys.readouterr().out
    trained = [line for line in out.splitlines() if line.endswith("<- trained")]
    cells = [line.split(" | ") for line in trained]  # pos | id | token | label
    assert cells and all(c[1].strip() == c[3].split()[0] for c in cells)  # label == input id, same position
    assert any(c[2].strip() == "<|eot_id|>" for c in cells)
    assert not any(c[2].strip() in ("assistant", "user", "<|start_header_id|>") for c in cells)
