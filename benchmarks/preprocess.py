"""Preprocessing throughput (tokens/s): megasft's preprocessing (render + tokenise + mask + write the
indexed dataset, worker processes) vs a single-process loop of transformers ``apply_chat_template`` +
tokenise (no mask, nothing written) on the same data, in the same run.

    python benchmarks/preprocess.py [--conversations 4000] [--long-conversations 300] [--tool-conversations 2000]
                                    [--workers 2]
    python benchmarks/preprocess.py --scale 1000000 [--baseline-subset 50000]   # see scale_main

Data: synthetic chats of Zipf-distributed pseudo-words: a set of 2-8 turn conversations and one of
50-turn conversations (Llama-3 template, megasft's plain-Python built-in), and a tool-calling + reasoning
set (tests.chat_cases.tool_reasoning_records: a tools list, assistant reasoning_content, tool calls with
content null, tool replies; 1-3 user questions each) through Qwen3: megasft's qwen3 built-in and the same
template from a .jinja file (both recognised as Qwen3's and rendered by the plain-Python renderer of
megasft.data.chat.qwen), and that text with a comment added (not recognised: the Jinja mask compiler, sandboxed
as any user template), against transformers rendering the template text. A byte-level BPE tokenizer (Llama-3 pre-tokenizer, 8k vocab) is
trained on the data first. Token counts of all paths are checked equal.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megasft.data.preprocess import PreprocessOptions, preprocess  # noqa: E402
from megasft.data.chat.families import FAMILIES  # noqa: E402
from megasft.data.templates import LLAMA3_HF_CHAT_TEMPLATE  # noqa: E402
from tests.chat_cases import make_words, tool_reasoning_records  # noqa: E402  (the tool set, shared with its tests)
from tests.data_fixtures import train_bpe_tokenizer  # noqa: E402  (a real BPE tokenizer made locally)

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|pad|>",
            "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>",
            "</tool_response>"]


def make_conversation(rng: random.Random, words: list[str], turns: int) -> dict:
    weights = [1 / (k + 1) for k in range(len(words))]  # Zipf-like word frequencies

    def sentence(k: int) -> str:
        return " ".join(rng.choices(words, weights=weights, k=k)).capitalize() + rng.choice([".", "?", "!\n"])

    msgs = [{"role": "system", "content": sentence(12)}]
    for t in range(turns):
        role = "user" if t % 2 == 0 else "assistant"
        msgs.append({"role": role, "content": " ".join(sentence(rng.randint(4, 20)) for _ in range(rng.randint(1, 4)))})
    return {"messages": msgs}


def write_set(path: Path, records) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the worker pool): robust to a busy machine."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def transformers_loop(path: Path, tok_dir: Path, template: str, bos: str | None, eos: str) -> tuple[int, float, float]:
    """The baseline: the loop most SFT scripts run, single process (render, tokenise; no mask, nothing written)."""
    from transformers import PreTrainedTokenizerFast

    ref = PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"), bos_token=bos, eos_token=eos)
    ref.chat_template = template
    start, cpu, tokens = time.perf_counter(), cpu_seconds(), 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            text = ref.apply_chat_template(record["messages"], tools=record.get("tools"), tokenize=False)
            tokens += len(ref(text, add_special_tokens=False)["input_ids"])
    return tokens, time.perf_counter() - start, cpu_seconds() - cpu


def megasft_run(path: Path, tok_dir: Path, out: Path, workers: int, template: str) -> tuple[int, float, float]:
    start, cpu = time.perf_counter(), cpu_seconds()
    summary = preprocess(PreprocessOptions(inputs=[str(path)], output=str(out), tokenizer=str(tok_dir),
                                           template=template, workers=workers, progress=False, overwrite=True))
    return summary.tokens, time.perf_counter() - start, cpu_seconds() - cpu


# ---------------------------------------------------------------- --scale: 1 M conversations, memory bound
def long_tailed_set(path: Path, n: int, seed: int, words: list[str]) -> Path:
    """n conversations whose lengths are long-tailed: 1 + 2 x geometric(0.45) turn pairs (capped at 40),
    each turn log-normal(0, 1.1) sentences (capped at 300) drawn from a pool of Zipf-worded sentences.
    Vectorised draws: a million conversations take about a minute to write."""
    import numpy as np

    rng, gen = random.Random(seed), np.random.default_rng(seed)
    cum = list(itertools.accumulate(1 / (k + 1) for k in range(len(words))))   # Zipf-like word frequencies
    pool = [" ".join(rng.choices(words, cum_weights=cum, k=rng.randint(3, 18))).capitalize() + "."
            for _ in range(20000)]
    turns = 2 * np.minimum(gen.geometric(0.45, size=n), 40)
    counts = np.minimum(np.ceil(gen.lognormal(0.0, 1.1, size=int(turns.sum()))), 300).astype(np.int64)
    picks = gen.integers(0, len(pool), size=int(counts.sum())).tolist()
    counts, roles, at, c = counts.tolist(), ("user", "assistant"), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        for k in range(n):
            msgs = []
            for t in range(int(turns[k])):
                msgs.append({"role": roles[t % 2], "content": " ".join([pool[i] for i in picks[at:at + counts[c]]])})
                at, c = at + counts[c], c + 1
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


_CHILD = """
import json, sys, time
sys.path.insert(0, {repo!r})
from benchmarks.preprocess import MemoryWatch
kind, path, tok_dir, out, workers, limit = json.loads(sys.argv[1])
watch = MemoryWatch()
start = time.perf_counter()
if kind == "megasft":
    from megasft.data.preprocess import PreprocessOptions, preprocess
    s = preprocess(PreprocessOptions(inputs=[path], output=out, tokenizer=tok_dir, template="llama3",
                                     workers=workers, progress=False, overwrite=True))
    tokens, convs = s.tokens, s.read
else:
    from benchmarks.preprocess import transformers_subset
    tokens, convs = transformers_subset(path, tok_dir, limit)
wall = time.perf_counter() - start
print(json.dumps(dict(tokens=tokens, conversations=convs, wall=wall, **watch.stop())))
"""


def _status_kib(pid, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key))
    except (OSError, StopIteration):
        return 0


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    kids = [int(k) for k in f.read().split()]
                out += kids
                todo += kids
        except OSError:
            pass
    return out


class MemoryWatch:
    """Peak memory of this process and its worker processes, from /proc (Linux): VmHWM, the peak resident
    set since exec, of this process and of each worker (sampled every 0.25 s while it lives), and the
    peak of their summed VmRSS. (getrusage's ru_maxrss would not do: a child started by fork + exec
    inherits the parent's peak from before the exec, here the benchmark's own data generation.)"""

    def __init__(self) -> None:
        self.worker_hwm = self.tree_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            kids = _descendants(os.getpid())
            self.worker_hwm = max([self.worker_hwm] + [_status_kib(k, "VmHWM:") for k in kids])
            self.tree_peak = max(self.tree_peak, _status_kib("self", "VmRSS:") +
                                 sum(_status_kib(k, "VmRSS:") for k in kids))

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        mib = 1 / 1024
        return dict(rss_main_mib=_status_kib("self", "VmHWM:") * mib, rss_worker_mib=self.worker_hwm * mib,
                    rss_tree_mib=max(self.tree_peak, _status_kib("self", "VmHWM:")) * mib,
                    cpu=sum(os.times()[:4]))


def transformers_subset(path: str, tok_dir: str, limit: int) -> tuple[int, int]:
    """The baseline loop of transformers_loop over the first ``limit`` conversations."""
    from transformers import PreTrainedTokenizerFast

    ref = PreTrainedTokenizerFast(tokenizer_file=str(Path(tok_dir) / "tokenizer.json"), bos_token="<|begin_of_text|>",
                                  eos_token="<|eot_id|>")
    ref.chat_template = LLAMA3_HF_CHAT_TEMPLATE
    tokens = convs = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if convs == limit:
                break
            text = ref.apply_chat_template(json.loads(line)["messages"], tokenize=False)
            tokens += len(ref(text, add_special_tokens=False)["input_ids"])
            convs += 1
    return tokens, convs


def measured(kind: str, path: Path, tok_dir: Path, out: Path, workers: int, limit: int = 0) -> dict:
    """One method in a fresh process: its own peak RSS (ru_maxrss of the process, and the largest of its
    worker processes), not the benchmark's."""
    import subprocess

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", _CHILD.format(repo=repo),
                          json.dumps([kind, str(path), str(tok_dir), str(out), workers, limit])],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": repo})
    if res.returncode:
        raise RuntimeError(f"{kind} run failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def scale_main(args) -> None:
    """megasft preprocessing of ``--scale`` long-tailed conversations (one JSONL file, 2 workers by default),
    and of a tenth of them (peak RSS should not grow with the input), against the single-process transformers
    loop on the first ``--baseline-subset`` conversations, its time scaled to the same count."""
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="megasft_bench_scale_"))
    t0 = time.perf_counter()
    data = long_tailed_set(work / "scale.jsonl", args.scale, args.seed, make_words(rng))
    tenth = work / "tenth.jsonl"
    with open(data, encoding="utf-8") as src, open(tenth, "w", encoding="utf-8") as dst:
        for k, line in enumerate(src):
            if k == args.scale // 10:
                break
            dst.write(line)
    corpus = [m["content"] for k, line in zip(range(4000), open(data, encoding="utf-8"))
              for m in json.loads(line)["messages"]]
    tok_dir = train_bpe_tokenizer(corpus, SPECIALS, 8000, work / "tok")
    print(f"{args.scale:,} conversations, {data.stat().st_size / 2**20:,.0f} MiB JSONL, made in "
          f"{time.perf_counter() - t0:.0f} s; {os.cpu_count()} CPUs; data in {work}", flush=True)
    print(f"{'method':<36} | {'conversations':>13} | {'tokens':>12} | {'wall s':>8} | {'tokens/s':>9} | "
          f"{'CPU s':>7} | {'peak RSS MiB: main':>18} | {'worker':>6} | {'all':>6}", flush=True)
    rows = []
    for name, kind, path, out, limit in (("transformers loop (1 process)", "hf", data, "x", args.baseline_subset),
                                         (f"megasft, {args.workers} workers, 1/10 of the set", "megasft", tenth,
                                          "o10", 0),
                                         (f"megasft, {args.workers} workers", "megasft", data, "o", 0)):
        r = measured(kind, path, tok_dir, work / out, args.workers, limit)
        rows.append((name, r))
        print(f"{name:<36} | {r['conversations']:>13,} | {r['tokens']:>12,} | {r['wall']:>8.1f} | "
              f"{r['tokens'] / r['wall']:>9,.0f} | {r['cpu']:>7.1f} | {r['rss_main_mib']:>18.0f} | "
              f"{r['rss_worker_mib']:>6.0f} | {r['rss_tree_mib']:>6.0f}", flush=True)
    hf, full = rows[0][1], rows[2][1]
    scaled = hf["wall"] * full["conversations"] / hf["conversations"]
    print(f"transformers loop scaled to {full['conversations']:,} conversations: {scaled:,.0f} s; megasft "
          f"{full['wall']:,.0f} s = {scaled / full['wall']:.2f}x faster in wall-clock tokens/s "
          f"({(full['tokens'] / full['wall']) / (hf['tokens'] / hf['wall']):.2f}x by tokens/s; tokens per CPU-second "
          f"{(full['tokens'] / full['cpu']) / (hf['tokens'] / hf['cpu']):.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=4000, help="2-8 turn conversations")
    parser.add_argument("--long-conversations", type=int, default=300, help="50-turn conversations")
    parser.add_argument("--tool-conversations", type=int, default=2000, help="tool-calling + reasoning conversations")
    parser.add_argument("--sets", default="2-8 turns,50 turns,tools+reasoning", help="comma-separated sets to run")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=3, help="trials per method; the fastest is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=int, default=0,
                        help="instead: this many long-tailed conversations, tokens/s and peak RSS (scale_main)")
    parser.add_argument("--baseline-subset", type=int, default=50000,
                        help="with --scale: conversations the transformers loop runs on (scaled to --scale)")
    args = parser.parse_args()
    if args.scale:
        return scale_main(args)
    rng = random.Random(args.seed)
    words = make_words(rng)
    work = Path(tempfile.mkdtemp(prefix="megasft_bench_pre_"))
    sets = {
        "2-8 turns": write_set(work / "short.jsonl", (make_conversation(rng, words, 2 * rng.randint(1, 4))
                                                      for _ in range(args.conversations))),
        "50 turns": write_set(work / "long.jsonl", (make_conversation(rng, words, 50)
                                                    for _ in range(args.long_conversations))),
        "tools+reasoning": write_set(work / "tools.jsonl", tool_reasoning_records(args.tool_conversations, args.seed)),
    }
    corpus = [m["content"] for line in open(sets["2-8 turns"], encoding="utf-8") for m in json.loads(line)["messages"]]
    corpus += [json.dumps(json.loads(line)["messages"][2:4]) for line in open(sets["tools+reasoning"], encoding="utf-8")]
    tok_dir = train_bpe_tokenizer(corpus[:22000], SPECIALS, 8000, work / "tok")
    qwen3_file, unrecognised = work / "qwen3.jinja", work / "qwen3_commented.jinja"
    qwen3_file.write_text(FAMILIES["qwen3"].source, encoding="utf-8")
    # the same rendering from a text megasft does not recognise: the Jinja compiler's cost
    unrecognised.write_text(FAMILIES["qwen3"].source + "{#- not Qwen's text -#}", encoding="utf-8")
    # set -> ({label: megasft template}, the template text transformers renders, its bos / eos)
    templates = {"2-8 turns": ({"": "llama3"}, LLAMA3_HF_CHAT_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>"),
                 "50 turns": ({"": "llama3"}, LLAMA3_HF_CHAT_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>"),
                 "tools+reasoning": ({" qwen3": "qwen3", " .jinja file": str(qwen3_file),
                                      " Jinja compiler": str(unrecognised)}, FAMILIES["qwen3"].source, None,
                                     "<|im_end|>")}
    print(f"{os.cpu_count()} CPUs; workers={args.workers}; best of {args.repeat}; data in {work}")
    print(f"{'set':<10} | {'method':<40} | {'tokens':>10} | {'wall s':>7} | {'tokens/s':>10} | {'CPU s':>6} | "
          f"{'tok/CPU-s':>10}")
    ratios = []
    for name, path in sets.items():
        if name not in args.sets.split(","):
            continue
        ours, source, bos, eos = templates[name]
        methods = {"transformers apply_chat_template (1 proc)": lambda: transformers_loop(path, tok_dir, source, bos, eos)}
        for label, template in ours.items():
            methods[f"megasft{label} (1 worker)"] = lambda t=template: megasft_run(path, tok_dir, work / "out1", 1, t)
            methods[f"megasft{label} ({args.workers} workers)"] = \
                lambda t=template: megasft_run(path, tok_dir, work / "outN", args.workers, t)
        # Best of --repeat interleaved trials: on a shared machine the minimum is the least disturbed run.
        best = {m: (0, float("inf"), float("inf")) for m in methods}
        for _ in range(args.repeat):
            for method, run in methods.items():
                tokens, seconds, cpu = run()
                best[method] = (tokens, min(seconds, best[method][1]), min(cpu, best[method][2]))
        counts = {tokens for tokens, _, _ in best.values()}
        assert len(counts) == 1, f"token counts differ between methods: {best}"
        for method, (tokens, seconds, cpu) in best.items():
            print(f"{name:<10} | {method:<40} | {tokens:>10,} | {seconds:>7.2f} | {tokens / seconds:>10,.0f} | "
                  f"{cpu:>6.2f} | {tokens / cpu:>10,.0f}")
        speeds = [tokens / seconds for tokens, seconds, _ in best.values()]
        per_cpu = [tokens / cpu for tokens, _, cpu in best.values()]
        labels = list(best)
        for k in range(1, len(labels), 2):  # (1 worker, N workers) pairs after the baseline
            ratios.append((name, labels[k + 1], speeds[k + 1] / speeds[0], speeds[k] / speeds[0], per_cpu[k + 1] / per_cpu[0]))
    for name, label, ratio, single, cpu_ratio in ratios:
        print(f"{name}: {label} = {ratio:.2f}x transformers loop in wall-clock tokens/s (target >= 2x; 1 worker: "
              f"{single:.2f}x; tokens per CPU-second: {cpu_ratio:.2f}x)")


if __name__ == "__main__":
    main()
