"""Small real runs of ``megasft.train`` in this process, for the tests of its command-line
behaviour: a tiny dataset and the overrides of a tiny fp32 model."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from megasft.data.indexed import IndexedDatasetBuilder

MODEL = {"vocab_size": 1003, "hidden_size": 32, "intermediate_size": 64, "num_layers": 2,
         "num_attention_heads": 4, "num_kv_heads": 2, "max_position_embeddings": 256,
         "make_vocab_size_divisible_by": 8}


def tiny_dataset(path: Path, docs: int = 40) -> Path:
    """An indexed dataset of `docs` random documents of 2-16 tokens, about half of them trained."""
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(path, vocab_size=1003)
    for _ in range(docs):
        n = int(rng.integers(2, 17))
        builder.add(rng.integers(1, 1003, n), (rng.random(n) < 0.5).astype(np.uint8))
    builder.finish({"pad_id": 0})
    return path


def train_args(data: Path, run: Path, *extra: str) -> list[str]:
    """megasft.train arguments: the tiny model on `data`, 4 rows of 16 tokens a step, into `run`."""
    model = [f"model.{k}={v}" for k, v in MODEL.items()]
    return model + [f"data.train_path={data}", "data.seq_len=16", "data.global_batch_tokens=64",
                    "train.precision=fp32", f"train.run_dir={run}", 'train.progress_bar="off"', *extra]
