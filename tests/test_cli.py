"""The ``megasft`` command: subcommand help with defaults, ``train --print-config`` (the resolved
config and the plan, nothing started), start-up checks before any process group, and the widths
of the progress and log lines."""
from __future__ import annotations

import io
import re

import pytest
import torch.distributed as dist
import yaml

from megasft import cli
from megasft.config import Config
from megasft.training.metrics import format_record
from megasft.training.progress import LINE_WIDTH, Progress
from tests.runs import train_args

HELP = [["train"], ["preprocess"], ["inspect"], ["plan"], ["plot"], ["convert", "hf-to-megasft"],
        ["convert", "megasft-to-hf"]]


def option_blocks(help_text: str) -> list[str]:
    """Each option's entry of an argparse help (its lines joined), from the options section on."""
    section = help_text.split("options:", 1)[1]
    blocks: list[str] = []
    for line in section.splitlines():
        if re.match(r"^  -", line):
            blocks.append(line)
        elif blocks and line.startswith("    "):
            blocks[-1] += " " + line.strip()
    return blocks


@pytest.mark.parametrize("words", HELP, ids=" ".join)
def test_every_option_shows_help_and_default(words, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([*words, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: megasft {words[0]}")
    blocks = [b for b in option_blocks(text) if not b.lstrip().startswith("-h, --help")]
    assert blocks, text
    for block in blocks:
        name = block.split()[0]
        assert "(default:" in block, f"megasft {' '.join(words)}: {name} shows no default: {block!r}"
        assert len(block.split("  ", 2)) > 1 and block.split(None, 1)[1].strip(), f"{name} has no help"


def test_known_defaults_in_help(capsys):
    for words, expected in ((["plan"], "(default: 8)"), (["preprocess"], "(default: 0.1)"),
                            (["train"], "(default: h100-80gb)")):
        with pytest.raises(SystemExit):
            cli.main([*words, "--help"])
        assert expected in " ".join(capsys.readouterr().out.split())


def test_top_level_usage_lists_every_subcommand(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("train", "preprocess", "inspect", "convert", "plan", "plot", "chat", "eval-generate"):
        assert re.search(rf"^  {re.escape(name)}\s", out, re.M), name
    assert cli.main(["trian"]) == 2
    assert "unknown subcommand 'trian'" in capsys.readouterr().err


def test_print_config_prints_resolved_config_and_plan(data, tmp_path, main):
    from megasft.data.loader import build_loaders
    from megasft.planner import make_cluster, plan
    from megasft.planner.hardware import GIB

    run = tmp_path / "run"
    overrides = train_args(data, run, "train.steps=10")
    rc, err = main(["--print-config", "--nproc", "2", *overrides])
    assert rc == 0 and err == []
    out = main.out
    expected = Config.load(None, overrides).validate()
    assert yaml.safe_load(out) == expected.to_dict()     # the config part is a loadable YAML config
    plan_text = out.split("# plan", 1)[1]
    assert "tp 1 x pp 1 x dp 2 = 2 ranks; schedule no_pipeline, bubble 0.0%" in plan_text
    # 64 tokens / 16 per row = 4 rows; 2 per dp rank; micro_batch_size 1 -> 2 micro-batches
    assert "4 rows x 16 tokens = 64 tokens per step; 2 rows per dp rank = 2 micro-batches of 1" in plan_text
    assert "steps       10 (train.steps)" in plan_text
    loader = build_loaders(expected.data, expected.train.seed, 0, 2, expected.model.vocab_size)[0]
    rows = loader.rows_per_epoch()
    assert rows >= -(-int(loader.dataset.lengths[loader.doc_indices].sum()) // 16)   # no row overfull
    assert f"{len(loader.doc_indices):,} documents -> {rows:,} rows per epoch = {rows / 4:.2f} steps per epoch" \
        in plan_text
    assert f"epochs      {10 * 4 / rows:.2f} in train.steps=10" in plan_text
    estimate = plan(expected, make_cluster(1, 2, "h100-80gb")).worst
    # The CUDA/NCCL reserve dominates a tiny model: the total is that plus the parts, in GiB.
    assert f"memory      {estimate.total / GIB:.2f} GiB per GPU on pp rank 0" in plan_text
    assert f"weights {estimate.weights / 2 ** 10:.1f} KiB" in plan_text   # 83,104 fp32 params = 325 KiB
    assert not run.exists() and not dist.is_initialized()   # nothing was started


def test_print_config_world_size_from_environment(data, tmp_path, main, monkeypatch):
    overrides = train_args(data, tmp_path / "run", "parallel.tp=2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    rc, err = main(["--print-config", *overrides])
    assert rc == 0 and "tp 2 x pp 1 x dp 2 = 4 ranks" in main.out
    rc, err = main(["--print-config", "--nproc", "2", *overrides])
    assert rc == 2 and err == ["megasft.train: configuration error: --nproc 2 but this rank was launched with "
                               "WORLD_SIZE=4; drop --nproc under torchrun (it sets the world size)"]


def test_layout_needing_more_ranks_points_at_nproc(data, tmp_path, main):
    rc, err = main(train_args(data, tmp_path / "run", "parallel.tp=2"))
    assert rc == 2 and len(err) == 1
    assert "world_size=1 is not divisible by tp*pp=2*1=2" in err[0] and "pass --nproc N" in err[0]


def test_missing_inputs_fail_before_any_process_group(data, tmp_path, main):
    run = tmp_path / "run"
    rc, err = main(train_args(data, run, f"data.tokenizer={tmp_path / 'nope.model'}"))
    assert rc == 2 and err == [f"megasft.train: no tokenizer at {tmp_path / 'nope.model'} (data.tokenizer; the "
                               "Hugging Face export at the end copies it); point it at the .model / tokenizer.json "
                               "file or its directory, or set data.tokenizer=null"]
    rc, err = main(["--config", str(tmp_path / "nope.yaml")])
    assert rc == 2 and err == [f"megasft.train: configuration error: no config file at {tmp_path / 'nope.yaml'}; "
                               "pass an existing YAML file to --config"]
    rc, err = main(train_args(data, run, "data.train_path=null"))
    assert rc == 2 and err == ["megasft.train: nothing to train: no --config given and neither data.train_path nor "
                               "data.sources is set; pass --config FILE (e.g. examples/configs/tiny_chat.yaml) or "
                               "data.train_path=DIR"]
    rc, err = main([])
    assert rc == 2 and len(err) == 1 and "no --config given" in err[0]
    assert not run.exists() and not dist.is_initialized()


def test_log_lines_fit_100_columns():
    huge = {"kind": "train", "step": 1234567, "lr": 1.2345e-3, "loss": 12345.678901, "loss_avg_steps": 1000,
            "grad_norm": 123456.789, "tokens_per_s": 123456789.0, "mfu": 0.999, "peak_mem_gb": 1234.5,
            "skipped_steps": 12345, "bubble": 0.4321, "bubble_theory": 0.4}
    line = format_record(huge, 9999999)
    assert len(line) <= LINE_WIDTH and line.startswith("step 1234567/9999999  loss(avg 1000) 12345.6789")
    # A 405B run's numbers are shown whole (2.3M tokens/s, 79.9 GB); the bubble is in metrics.jsonl.
    big = {**huge, "step": 12345, "loss": 2.5, "loss_avg_steps": 10, "grad_norm": 0.3125, "tokens_per_s": 2345678.0,
           "mfu": 0.41, "peak_mem_gb": 79.9, "skipped_steps": 0}
    assert format_record(big, 20000) == ("step 12345/20000  loss(avg 10) 2.5000  lr 1.23e-03  gnorm 0.312  "
                                         "2.35M tok/s  79.9GB  MFU 41.0%")
    assert format_record({**big, "skipped_steps": 3, "tokens_per_s": 12345.4}, 20000).endswith(
        "12,345 tok/s  79.9GB  skipped 3")
    ev = {"kind": "eval", "step": 1234567, "eval_loss": 1.5, "eval_tokens": 10 ** 12, "best_eval_loss": 1.25,
          "best_step": 1234567}
    assert len(format_record(ev, 9999999)) <= LINE_WIDTH


def test_live_progress_line_only_on_a_terminal():
    clock = iter([0.0, 10.0, 20.0])   # start, then the time at each step
    stream = io.StringIO()
    live = Progress(total_steps=4, live=True, stream=stream, now=lambda: next(clock))
    live.step(1, 2.5, 100, 40)     # 10 s for 100 tokens; 3 steps left at 10 s each
    frame = stream.getvalue()
    assert frame.startswith("\r[#####...............] step 1/4 | loss 2.5000 | 10 tok/s | 0:10 < 0:30")
    assert len(frame) - 1 <= LINE_WIDTH - 1
    live.step(2, 2.0, 100, 40)
    second = stream.getvalue()[len(frame):]
    assert second.startswith("\r[##########..........] step 2/4 | loss 2.0000 | 10 tok/s | 0:20 < 0:20")
    live.clear()
    assert stream.getvalue().endswith("\r" + " " * (LINE_WIDTH - 1) + "\r")
    assert (live.totals.tokens, live.totals.trained, live.totals.first_step) == (200, 80, 0)
    piped = io.StringIO()
    quiet = Progress(total_steps=4, live=False, stream=piped)
    quiet.step(1, 2.5, 100, 40)
    quiet.clear()
    assert piped.getvalue() == ""        # no carriage returns into a log file or a pipe


def test_subcommand_whose_module_is_missing_is_named(capsys, monkeypatch):
    """`megasft chat` dispatches to megasft.chat, which another change supplies; until a module is
    installed the command says so in one line instead of a traceback."""
    monkeypatch.setitem(cli.COMMANDS, "chat", ("megasft.no_such_module", "chat"))
    assert cli.main(["chat", "--model", "x"]) == 2
    assert capsys.readouterr().err == ("megasft: 'chat' is not available in this installation "
                                       "(megasft.no_such_module is missing)\n")


def test_subcommands_run_their_module_main(capsys):
    assert cli.COMMANDS["chat"][0] == "megasft.chat" and cli.COMMANDS["eval-generate"][0] == "megasft.generate"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["eval-generate", "--help"])
    assert exit_.value.code == 0 and "--prompts" in capsys.readouterr().out
