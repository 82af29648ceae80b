"""CPU time per conversation of the Jinja mask compiler (megasft.data.chat.jinja) on the tool-calling +
reasoning set of benchmarks/preprocess.py, through Qwen3's text with a Jinja comment appended (not recognised
by the plain-Python Qwen renderer: the sandboxed compiler, as any user template): the full compile of every
conversation, the compiler with its structure cache (megasft.data.chat.structure: one render and a fill for a
conversation of a shape seen before), and one render of the text (the floor). ``time.process_time`` over the
same conversations, interleaved rounds, best of ``--rounds``; the first pass (skeletons built) is not timed.

    python benchmarks/chat_compile.py [--conversations 1000] [--rounds 5]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megasft.data.chat.families import FAMILIES  # noqa: E402
from megasft.data.chat.jinja import JinjaTemplate  # noqa: E402
from megasft.data.chat.schema import normalize_record  # noqa: E402
from tests.chat_cases import tool_reasoning_records  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    source, tokens = FAMILIES["qwen3"].source + "{#- not Qwen's text -#}", FAMILIES["qwen3"].tokens()
    cached, full = JinjaTemplate(source, "unrecognised", tokens), JinjaTemplate(source, "unrecognised", tokens, shapes=0)
    convs = [normalize_record(r) for r in tool_reasoning_records(args.conversations, seed=0)]
    assert all(cached.render(c) == full.render(c) for c in convs)   # and the cache's skeletons are built
    methods = {"full compile": lambda c: full.render(c, notes=Counter()),
               "with the structure cache": lambda c: cached.render(c, notes=Counter()),
               "one render (text only)": full.render_text}
    best = {name: float("inf") for name in methods}
    for _ in range(args.rounds):
        for name, run in methods.items():
            start = time.process_time()
            for conv in convs:
                run(conv)
            best[name] = min(best[name], time.process_time() - start)
    for name, seconds in best.items():
        print(f"{name:>26}: {1e3 * seconds / len(convs):.3f} CPU ms per conversation")
    print(f"structure cache: {dict(cached.structures.stats)}; {len(cached.structures.skeletons)} skeletons; "
          f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
