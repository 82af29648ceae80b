"""Chat and generation with a trained model (megasft.generate, megasft.chat, megasft.model.kv_cache),
generation-based evaluation inside training (megasft.training.generate_eval) and the HF export as a
complete chat model (megasft.checkpoint.convert, megasft.hf.tokenizer_export).

One module fixture trains a tiny model (hidden 64, 2 layers) for a few steps in this process on the
tiny chat task's sentencepiece tokenizer and llama3 template, with generate-eval on, and exports it.
The references are transformers' AutoTokenizer.apply_chat_template + AutoModelForCausalLM.generate
on the export, and the same decoding loop without the KV cache.
"""
from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megasft.config import Config, ConfigError
from megasft.generate import Sampling, decode, load_chat_model, split_reference, read_conversations
from tests.runs import train_args

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "You are a calculator. Reply with the number only."
MODEL = ["model.vocab_size=512", "model.hidden_size=64", "model.intermediate_size=128", "model.num_layers=2",
         "model.num_attention_heads=4", "model.num_kv_heads=2", "model.max_position_embeddings=256",
         "model.tie_embeddings=true", "model.make_vocab_size_divisible_by=64"]
STEPS, SAMPLES = 8, 6


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A trained run directory (checkpoint, hf/ export, metrics with generate-eval records)."""
    from megasft.data.preprocess import PreprocessOptions, preprocess
    from megasft.train import main as train_main

    data = tmp_path_factory.mktemp("chat")
    out = subprocess.run([sys.executable, "examples/tiny_chat/make_data.py", "--out", str(data), "--train", "300",
                          "--eval", "20"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    preprocess(PreprocessOptions(inputs=[str(data / "train.jsonl")], output=str(data / "train"),
                                 tokenizer=str(data / "tokenizer.model"), template="llama3", seq_len=128,
                                 progress=False))
    run_dir = data / "run"
    args = train_args(data / "train", run_dir, *MODEL, "data.seq_len=128", "data.global_batch_tokens=1024",
                      "optim.lr=3e-3", f"train.steps={STEPS}", "train.log_interval=4", "checkpoint.export_hf=true",
                      "train.generate_eval_interval=4", f"train.generate_eval_path={data / 'eval.jsonl'}",
                      f"train.generate_eval_samples={SAMPLES}", "train.generate_eval_max_new_tokens=6")
    args = [a for a in args if not a.startswith("model.") or a in MODEL]   # this model, not runs.MODEL
    assert train_main(args) == 0
    return run_dir


def eval_prompts(run: Path, n: int = 6) -> list[list[dict]]:
    """System + user (+ earlier turns) prompts of the eval conversations."""
    return [split_reference(c)[0] for c in read_conversations(run.parent / "eval.jsonl", n)]


# ----------------------------------------------------------------------------- the HF export
def test_export_is_a_complete_chat_model(run):
    from megasft.data.tokenizer import load_tokenizer

    hf = run / "hf"
    names = {p.name for p in hf.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json"} <= names
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in hf.iterdir())
    sp = load_tokenizer(run.parent / "tokenizer.model", "llama3").sp   # ids straight from sentencepiece
    eot, eos, bos, pad = (sp.piece_to_id(t) for t in ("<|eot_id|>", "<|end_of_text|>", "<|begin_of_text|>", "<|pad|>"))
    generation = json.loads((hf / "generation_config.json").read_text())
    assert generation["eos_token_id"] == sorted({eot, eos}) and generation["bos_token_id"] == bos
    assert generation["pad_token_id"] == pad
    config = json.loads((hf / "config.json").read_text())
    # Trained from scratch: the dtype of the starting model is unknown, so the export is bf16.
    assert config.get("torch_dtype", config.get("dtype")) == "bfloat16"
    from safetensors import safe_open
    with safe_open(hf / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    tok_config = json.loads((hf / "tokenizer_config.json").read_text())
    assert (tok_config["bos_token"], tok_config["eos_token"], tok_config["pad_token"]) == \
        ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>")
    assert json.loads((hf / "special_tokens_map.json").read_text())["eos_token"] == "<|end_of_text|>"

    from transformers import AutoTokenizer

    from megasft.data.templates import Llama3Template
    tok = AutoTokenizer.from_pretrained(hf)
    for messages in eval_prompts(run):   # the export's chat template renders what megasft trained on
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert text == Llama3Template().render_text(messages, add_generation_prompt=True)
    # The special tokens are single ids and skipped on decode.
    assert tok.decode([eot, bos], skip_special_tokens=True) == ""


def test_default_export_dtype_is_the_starting_models():
    from megasft.checkpoint.convert import default_export_dtype

    def cfg(hf_config):
        return Config.from_dict({"model": {"hf_config": hf_config}})
    assert default_export_dtype(cfg({"torch_dtype": "float32"})) == "fp32"
    assert default_export_dtype(cfg({"dtype": "float16"})) == "fp16"
    assert default_export_dtype(cfg({"torch_dtype": "bfloat16"})) == "bf16"
    assert default_export_dtype(cfg(None)) == "bf16"
    out = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "megasft-to-hf", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert "the dtype of the model the run started from" in " ".join(out.stdout.split())


def test_transformers_generate_on_the_export_equals_megasft_greedy(run, tmp_path):
    """AutoTokenizer + apply_chat_template + AutoModelForCausalLM.generate (greedy) on an fp32
    export give exactly the tokens megasft's chat decodes from the run's checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megasft.checkpoint.convert import megasft_to_hf

    export = megasft_to_hf(run / "checkpoints", tmp_path / "hf32", dtype="fp32")
    tok = AutoTokenizer.from_pretrained(export)
    hf = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    chat = load_chat_model(run)      # the checkpoint, with the run's tokenizer and template
    stops = 0
    for messages in eval_prompts(run):
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        assert list(ids) == chat.prompt_ids(messages)
        theirs = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12)[0, len(ids):].tolist()
        ours = decode(chat.model, chat.prompt_ids(messages), chat.stop_ids, Sampling(max_new_tokens=12))
        assert theirs == ours.tokens
        stops += ours.ended
    assert stops   # generate stopped at the end-of-turn id through generation_config's eos list


# ----------------------------------------------------------------------------- the KV cache
def random_model(window=None):
    from megasft.config import ModelConfig
    from megasft.generate import single_process_model

    torch.manual_seed(0)
    family = {"family": "mistral", "sliding_window": window} if window else {}
    cfg = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_attention_heads=4,
                      num_kv_heads=2, max_position_embeddings=128, make_vocab_size_divisible_by=1, **family)
    model = single_process_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("window", [None, 5])
def test_kv_cache_equals_recomputing_the_sequence(run, window):
    """Greedy and sampled tokens identical, logits equal to fp32 rounding (the cached path sums the
    attention over other shapes, so ~1e-6 relative differences; 1e-4 leaves a margin of 100)."""
    model = random_model(window) if window else load_chat_model(run).model
    prompt = [3, 17, 42, 8, 11, 5, 29]
    for sampling in (Sampling(max_new_tokens=20), Sampling(temperature=0.9, top_p=0.8, max_new_tokens=20, seed=3)):
        cached = decode(model, prompt, set(), sampling, use_cache=True, keep_logits=True)
        full = decode(model, prompt, set(), sampling, use_cache=False, keep_logits=True)
        assert cached.tokens == full.tokens and len(cached.tokens) == 20
        torch.testing.assert_close(torch.stack(cached.logits), torch.stack(full.logits), rtol=1e-4, atol=1e-4)


def test_sampling_follows_the_seed_and_top_p():
    model = random_model()
    a, b = (decode(model, [1, 2, 3], set(), Sampling(temperature=1.0, max_new_tokens=30, seed=7)).tokens for _ in "ab")
    assert a == b
    greedy = decode(model, [1, 2, 3], set(), Sampling(max_new_tokens=30)).tokens
    # top_p so small that only the most likely token survives: sampling is greedy.
    assert decode(model, [1, 2, 3], set(), Sampling(temperature=1.0, top_p=1e-6, max_new_tokens=30)).tokens == greedy


# ----------------------------------------------------------------------------- the chat command
def test_chat_command_answers_a_scripted_prompt(run, capsys, monkeypatch, tmp_path):
    from megasft.chat import CUT_SHORT, main as chat_main

    question = "What is 3 plus 4?"
    common = ["--model", str(run), "--prompt", question, "--system", SYSTEM, "--temperature", "0"]
    assert chat_main(common) == 0
    cached = capsys.readouterr().out
    assert chat_main(common + ["--no-cache"]) == 0
    assert capsys.readouterr().out == cached
    chat = load_chat_model(run)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    expected = decode(chat.model, chat.prompt_ids(messages), chat.stop_ids, Sampling(max_new_tokens=256))
    answer = chat.tokenizer.decode(expected.tokens[:-1] if expected.ended else expected.tokens).strip()
    assert cached.splitlines()[:2] == [f"user: {question}",
                                       f"assistant: {answer}" + ("" if expected.ended else f"  {CUT_SHORT}")]
    # The export answers the same (bf16 weights: the first tokens agree on this tiny model).
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(question + "\n" + json.dumps({"messages": messages}) + "\n")
    assert chat_main(["--model", str(run / "hf"), "--prompts", str(prompts), "--temperature", "0",
                      "--system", SYSTEM, "--max-new-tokens", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == lines[2] == f"user: {question}" and lines[1] == lines[3]
    # Interactive: a scripted conversation over stdin; the second turn sees the first.
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO(f"{question}\nAnd plus 1?\n/reset\n/exit\n"))
    assert chat_main(["--model", str(run), "--temperature", "0", "--system", SYSTEM, "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.count("assistant> ") == 2 and out.count("user> ") == 4


# ----------------------------------------------------------------------------- eval-generate
def test_eval_generate_records_without_reference_and_with_system(run, tmp_path, capsys):
    from megasft.generate import answer_text, main as eval_main

    chat = load_chat_model(run / "hf")
    with_system = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 2 plus 2?"}]
    greedy = decode(chat.model, chat.prompt_ids(with_system), chat.stop_ids, Sampling(max_new_tokens=16))
    right = answer_text(chat, greedy)
    records = [{"messages": with_system},                                                 # no reference
               {"messages": with_system + [{"role": "assistant", "content": right}]},     # right
               {"messages": [{"role": "user", "content": "Add 1 and 1."},
                             {"role": "assistant", "content": "not a number"}]}]          # wrong
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert eval_main(["--model", str(run / "hf"), "--prompts", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len([line for line in out if line.startswith("Q: ")]) == 3
    assert "ref:" not in out[0] and (out[1].endswith("ok") or out[1].endswith("ok (no end-of-turn)"))
    assert "WRONG" in out[2]
    assert out[-1].startswith("exact match 1/2 = 50.0%; stopped at end-of-turn ")
    # The system turn is in the prompt, rendered as transformers renders it.
    from transformers import AutoTokenizer
    ids = AutoTokenizer.from_pretrained(run / "hf").apply_chat_template(with_system, add_generation_prompt=True,
                                                                        return_dict=False)
    assert chat.prompt_ids(with_system) == list(ids)


# ----------------------------------------------------------------------------- inside training
def test_generate_eval_inside_training_logs_exact_match_and_eot_rate(run):
    from megasft.generate import score

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    gen = [r for r in records if r["kind"] == "generate_eval"]
    assert [r["step"] for r in gen] == [4, 8]
    assert all(r["answered"] == SAMPLES and 0 <= r["exact_match"] <= 1 and 0 <= r["eot_rate"] <= 1 for r in gen)
    # The last one scored the final weights: scoring the final checkpoint gives the same numbers.
    prompts = read_conversations(run.parent / "eval.jsonl", SAMPLES)
    again = score(load_chat_model(run), prompts, Sampling(max_new_tokens=6))
    assert (again.exact_match, again.eot_rate) == (gen[-1]["exact_match"], gen[-1]["eot_rate"])


def test_generate_eval_needs_a_prompt_file():
    with pytest.raises(ConfigError, match="train.generate_eval_path"):
        Config.from_dict({"train": {"generate_eval_interval": 10}}).validate()


def test_chat_and_eval_generate_refuse_a_path_that_is_no_model(tmp_path, capsys):
    from megasft.chat import main as chat_main
    from megasft.generate import main as eval_main

    assert chat_main(["--model", str(tmp_path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--model takes an HF export" in err[0]
    (tmp_path / "p.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert eval_main(["--model", str(tmp_path), "--prompts", str(tmp_path / "p.jsonl")]) == 2
    assert "--model takes an HF export" in capsys.readouterr().err
