"""Test tiers. ``python -m pytest tests -m quick`` runs the single-process unit tests (no spawned
ranks, no torchrun, no compilation; under a minute on 2 cores) — the loop to run while editing.
The full suite (README's command, what CI runs) adds the multi-rank equivalence tests, the CLI and
launcher tests and the kernels."""
from __future__ import annotations

import os
import tempfile

import pytest

from tests.runs import tiny_dataset

QUICK_MODULES = {
    "test_config", "test_layout", "test_tensor_parallel_units", "test_optim_single", "test_optim_lr_schedule",
    "test_presets", "test_planner", "test_planner_moe", "test_data_packing", "test_data_templates", "test_data_loader",
    "test_data_preprocess", "test_data_reliability", "test_data_chat_schema", "test_data_chat_templates",
    "test_data_epochs", "test_data_mixture", "test_model_init", "test_checkpoint_verify", "test_attention_backends",
    "test_model_families_gemma", "test_hf_export", "test_cli", "test_data_formats", "test_data_cache",
    "test_data_chat_audit", "test_data_chat_families",
}

# tools/preprocess_data.py caches tokenised inputs in ~/.cache/megasft by default: tests (and the ranks
# and tools they spawn, which inherit the variable) use a fresh directory of their own instead.
os.environ["MEGASFT_CACHE_DIR"] = tempfile.mkdtemp(prefix="megasft_test_cache_")


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in QUICK_MODULES:
            item.add_marker(pytest.mark.quick)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny indexed dataset (tests.runs.tiny_dataset), one per test module."""
    return tiny_dataset(tmp_path_factory.mktemp("runs") / "data")


@pytest.fixture
def main(monkeypatch, capsys):
    """megasft.train.main in this process (no launcher variables); returns (rc, stderr lines), and
    keeps the run's stdout in ``run.out``. ``fault`` sets MEGASFT_FAULT (megasft.training.faults)."""
    from megasft.train import main as train_main

    for var in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MEGASFT_FAULT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)

    def run(args: list[str], fault: str = "") -> tuple[int, list[str]]:
        monkeypatch.setenv("MEGASFT_FAULT", fault)
        capsys.readouterr()
        rc = train_main(args)
        captured = capsys.readouterr()
        run.out = captured.out
        return rc, captured.err.splitlines()
    return run


@pytest.fixture
def fake_world():
    """Single-process stand-in for a rank of a bigger world: torch's fake backend builds real
    process groups whose collectives do nothing, so a rank's model and optimizer can be built."""
    import torch.distributed as dist

    fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")

    def join(rank: int, world: int) -> None:
        dist.init_process_group("fake", rank=rank, world_size=world, store=fake_pg.FakeStore())

    yield join
    if dist.is_initialized():
        dist.destroy_process_group()
