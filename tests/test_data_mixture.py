"""data.sources: trained-token shares, epochs sources, exact resume at another DP size, the
start-up plan, the config rules, and per-source eval losses against a plain transformers forward."""
from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest
import torch

from megasft.checkpoint.convert import megasft_to_hf
from megasft.config import Config, ConfigError, DataConfig
from megasft.data.indexed import DatasetError, IndexedDatasetBuilder
from megasft.data.loader import build_loaders

SEQ = 32
OFFSET = 300   # document d of source k holds the token k * OFFSET + d + 1: every segment names its source


def make_source(path, k: int, n_docs: int, lengths=(2, SEQ), density=0.5, seed=0, vocab=1000):
    rng = np.random.default_rng([seed, k])
    builder = IndexedDatasetBuilder(path, vocab_size=vocab)
    for d in range(n_docs):
        n = int(rng.integers(lengths[0], lengths[1] + 1))
        builder.add(np.full(n, k * OFFSET + d + 1), (rng.random(n) < density).astype(np.uint8))
    builder.finish({"pad_id": 0})
    return str(path)


def segments(mb):
    """(source, doc, trained tokens) of every document segment of a micro-batch, counted from its
    labels: a segment's trained tokens are its labels != -100 (its first label is always -100)."""
    ids, labels, cu = mb.input_ids.reshape(-1), mb.labels.reshape(-1), mb.cu_seqlens.tolist()
    out = []
    for a, e in zip(cu[:-1], cu[1:]):
        if ids[a] != 0:
            k, d = divmod(int(ids[a]) - 1, OFFSET)
            out.append((k, d, int((labels[a:e] != -100).sum())))
    return out


def step_segments(loaders):
    """Segments of one optimizer step over all DP ranks (rank order)."""
    return [s for ld in loaders for mb in ld.next_global_batch() for s in segments(mb)]


def three_sources(tmp_path):
    """Sources unlike each other: long dense documents, short sparse ones, a middle one."""
    return [make_source(tmp_path / "long", 0, 80, (16, SEQ), 0.8),
            make_source(tmp_path / "short", 1, 200, (2, 8), 0.3),
            make_source(tmp_path / "mid", 2, 120, (4, 20), 0.5)]


def data_config(sources, rows=8, mbs=1, **kw) -> DataConfig:
    return DataConfig(sources=sources, seq_len=SEQ, global_batch_tokens=rows * SEQ, micro_batch_size=mbs, **kw)


def test_weights_deliver_trained_token_shares_within_one_percent(tmp_path):
    paths = three_sources(tmp_path)
    weights = [0.5, 0.3, 0.2]
    cfg = data_config([{"name": n, "path": p, "weight": w} for n, p, w in zip(("long", "short", "mid"), paths, weights)])
    loader, evals = build_loaders(cfg, seed=4, steps=60)
    assert evals is None
    trained, seen = Counter(), [Counter() for _ in paths]
    for _ in range(60):
        step = step_segments([loader])
        for k, d, n in step:
            trained[k] += n
            seen[k][d] += 1
        for k in range(3):   # no source repeats a document within one step
            docs = [d for kk, d, _ in step if kk == k]
            assert len(docs) == len(set(docs))
    total = sum(trained.values())
    shares = [trained[k] / total for k in range(3)]
    assert max(abs(s - w) for s, w in zip(shares, weights)) < 0.01, shares
    # The start-up plan simulated the same run: its shares are the measured ones.
    plan = loader.describe_plan()
    printed = {line.split()[0]: line.split() for line in plan.splitlines()[2:]}
    for name, share in zip(("long", "short", "mid"), shares):
        assert printed[name][6] == f"{share:.1%}", (name, plan)
        assert int(printed[name][7]) == trained[("long", "short", "mid").index(name)]
    assert "60 steps (train.steps)" in plan.splitlines()[0]


def test_epochs_sources_repeat_exactly_that_many_times(tmp_path):
    paths = three_sources(tmp_path)
    for spec in ([{"epochs": 2}, {"epochs": 3}, {"epochs": 1}],          # all epochs: the run ends with them
                 [{"weight": 0.4}, {"epochs": 2}, {"epochs": 1}]):       # the weight source fills around them
        cfg = data_config([{"name": f"s{k}", "path": p, **extra} for k, (p, extra) in enumerate(zip(paths, spec))])
        Config(data=cfg).validate()
        loader, _ = build_loaders(cfg, seed=2, steps=999)
        printed = int(re.search(r"(\d+) steps \(derived", loader.describe_plan()).group(1))
        seen = [Counter() for _ in paths]
        for _ in range(loader.total_steps):
            step = step_segments([loader])
            assert step
            for k, d, _ in step:
                seen[k][d] += 1
        assert printed == loader.total_steps
        for k, extra in enumerate(spec):
            if "epochs" in extra:   # every document of the source, exactly `epochs` times
                assert seen[k] == Counter({d: extra["epochs"] for d in range(len(seen[k]))}), k
                assert len(seen[k]) == {0: 80, 1: 200, 2: 120}[k]
                final = loader.seen_counts(loader.sources[k], loader.state[k])
                assert (final == extra["epochs"]).all()
        if all("epochs" in e for e in spec):
            with pytest.raises(DatasetError, match="epochs were consumed"):
                loader.next_global_batch()


def test_tiny_upsampled_source_never_repeats_a_document_in_a_step(tmp_path):
    paths = [make_source(tmp_path / "big", 0, 200), make_source(tmp_path / "tiny", 1, 6, (20, SEQ))]
    cfg = data_config([{"name": "big", "path": paths[0], "weight": 0.4},
                       {"name": "tiny", "path": paths[1], "weight": 0.6}])
    loader, _ = build_loaders(cfg, seed=1, steps=10)
    for _ in range(10):
        step = step_segments([loader])
        tiny = [d for k, d, _ in step if k == 1]
        assert tiny and len(tiny) == len(set(tiny))


def test_eval_split_per_source_is_held_out_of_training(tmp_path):
    paths = three_sources(tmp_path)
    eval_path = make_source(tmp_path / "mid_eval", 2, 10, seed=3)
    cfg = data_config([{"name": "long", "path": paths[0], "weight": 0.5, "eval_fraction": 0.25},
                       {"name": "short", "path": paths[1], "weight": 0.3},
                       {"name": "mid", "path": paths[2], "weight": 0.2, "eval_path": eval_path}])
    loader, evals = build_loaders(cfg, seed=6, steps=40)
    assert sorted(evals.loaders) == ["long", "mid"]   # "short" has no eval split
    held = {d for rows in evals.loaders["long"].epoch_rows(0) for d in rows}
    assert len(held) == 20   # a quarter of its 80 documents
    trained = {d for _ in range(40) for k, d, _ in step_segments([loader]) if k == 0}
    assert trained == set(range(80)) - held   # 40 steps pass over every other document
    mid_eval = {d for mb in next(evals.loaders["mid"].one_pass()) for _, d, _ in segments(mb)}
    assert mid_eval == set(range(10))   # its eval_path dataset, all of it


@pytest.mark.parametrize("stop", [3, 7], ids=["stop3", "stop7"])
def test_resume_at_another_dp_size_continues_the_same_rows(tmp_path, stop):
    paths = three_sources(tmp_path)
    cfg = data_config([{"name": "long", "path": paths[0], "weight": 0.5},
                       {"name": "short", "path": paths[1], "epochs": 2},
                       {"name": "mid", "path": paths[2], "weight": 0.2}], mbs=2)
    straight, _ = build_loaders(cfg, seed=5)
    expected = [step_segments([straight]) for _ in range(stop + 6)]
    first = [build_loaders(cfg, seed=5, dp_rank=r, dp_size=4)[0] for r in range(4)]   # DP4 until the stop
    assert [step_segments(first) for _ in range(stop)] == expected[:stop]
    state = json.loads(json.dumps(first[0].state_dict()))   # as meta.json keeps it
    assert all(ld.state_dict() == first[0].state_dict() for ld in first)
    resumed = [build_loaders(data_config(cfg.sources, mbs=4), seed=5, dp_rank=r, dp_size=2)[0] for r in range(2)]
    for ld in resumed:
        ld.load_state_dict(state)
    assert [step_segments(resumed) for _ in range(6)] == expected[stop:]


def test_resume_refuses_other_sources_naming_the_fix(tmp_path):
    paths = three_sources(tmp_path)
    two = data_config([{"name": "a", "path": paths[0], "weight": 0.5}, {"name": "b", "path": paths[1], "weight": 0.5}])
    loader, _ = build_loaders(two, seed=1)
    loader.next_global_batch()
    other = data_config([{"name": "a", "path": paths[0], "weight": 0.5}, {"name": "c", "path": paths[2], "weight": 0.5}])
    with pytest.raises(DatasetError, match=r"saved with sources \['a', 'b'\].*reset_order_on_resume"):
        build_loaders(other, seed=1)[0].load_state_dict(loader.state_dict())
    single, _ = build_loaders(DataConfig(train_path=paths[0], seq_len=SEQ, global_batch_tokens=8 * SEQ), seed=1)
    with pytest.raises(DatasetError, match="single data.train_path run"):
        loader.load_state_dict(single.state_dict())
    with pytest.raises(DatasetError, match="of a data.sources mixture, this run reads data.train_path"):
        single.load_state_dict(loader.state_dict())


@pytest.mark.parametrize("sources, message", [
    ([{"name": "a", "path": "x", "weight": 0.5}, {"name": "b", "path": "y", "weight": 0.4}],
     r"weights sum to 0.5 \+ 0.4 = 0.9, not 1"),
    ([{"name": "a", "path": "x", "weight": 0.5, "epochs": 2}], r"data.sources\[a\] needs exactly one of .* both"),
    ([{"name": "a", "path": "x"}], r"data.sources\[a\] needs exactly one of .* neither"),
    ([{"name": "a", "path": "x", "weight": 0.5}, {"name": "a", "path": "y", "weight": 0.5}],
     r"the name 'a' is used 2 times"),
    ([{"name": "a", "path": "x", "weight": 1.0}, {"name": "b", "path": "y", "epochs": 1}],
     r"epochs sources need a share too"),
    ([{"name": "a", "path": "x", "wieght": 1.0}], r"data.sources\[0\]: unknown key 'wieght'"),
    ([{"name": "a", "path": "x", "weight": 1.0, "eval_path": "e", "eval_fraction": 0.1}], r"both eval_path and"),
    ("data/chat", r"data.sources must be a list"),
    ([], r"data.sources must be a non-empty list"),
], ids=["sum", "both", "neither", "dup", "no-share", "typo", "two-evals", "not-a-list", "empty"])
def test_config_rules_are_actionable(sources, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_dict({"data": {"sources": sources}}).validate()


def test_config_round_trip_and_missing_path(tmp_path):
    raw = {"data": {"sources": [{"name": "a", "path": str(tmp_path / "nowhere"), "weight": 1}]}}
    cfg = Config.from_dict(raw).validate()
    cfg.save(tmp_path / "c.yaml")
    again = Config.load(str(tmp_path / "c.yaml")).validate()
    assert again.data.sources == cfg.data.sources and again.data.sources[0].weight == 1.0
    with pytest.raises(ConfigError, match=r"no indexed dataset at .*nowhere \(data.sources\[a\].path"):
        build_loaders(cfg.data, seed=0)
    with pytest.raises(ConfigError, match="data.train_path and data.sources are both set"):
        Config.from_dict({"data": dict(raw["data"], train_path="x")}).validate()
    with pytest.raises(ConfigError, match="train.epochs does not apply"):
        Config.from_dict(dict(raw, train={"epochs": 2})).validate()
    epochs = {"data": {"sources": [{"name": "a", "path": "x", "epochs": 2}]}, "train": {"steps": 5},
              "optim": {"warmup_steps": 10}}
    Config.from_dict(epochs).validate()   # warmup is checked against the derived steps, not train.steps


def test_train_entry_names_a_missing_source(main, data, tmp_path):
    from tests.runs import train_args

    sources = json.dumps([{"name": "chat", "path": str(data), "weight": 0.5},
                          {"name": "code", "path": str(tmp_path / "missing"), "weight": 0.5}])
    args = [a for a in train_args(data, tmp_path / "run") if not a.startswith("data.train_path")]
    rc, err = main(args + [f"data.sources={sources}"])
    assert rc == 2 and err == [f"megasft.train: no indexed dataset at {tmp_path / 'missing'} "
                               f"(data.sources[code].path; {tmp_path / 'missing' / 'meta.json'} is missing); "
                               f"write one with megasft preprocess --output {tmp_path / 'missing'}"]


def test_per_source_eval_losses_equal_a_transformers_forward(main, tmp_path):
    """End to end through megasft.train: eval_loss/<name> in metrics.jsonl equals, per source, the
    mean token loss of transformers' LlamaForCausalLM (the exported final weights) over that
    source's eval documents, each run as its own sequence; the mixture's is their pooled mean."""
    from transformers import LlamaForCausalLM

    from megasft.data.indexed import IndexedDataset
    from megasft.data.loader import split_documents
    from megasft.training.metrics import loss_curves, plot_metrics, read_metrics
    from tests.runs import MODEL

    paths = [make_source(tmp_path / f"s{k}", k, 40, (2, 16), vocab=1003) for k in range(3)]
    eval_path = make_source(tmp_path / "s2_eval", 2, 12, (2, 16), seed=9, vocab=1003)
    sources = [{"name": "a", "path": paths[0], "weight": 0.5, "eval_fraction": 0.2},
               {"name": "b", "path": paths[1], "weight": 0.3, "eval_fraction": 0.1},
               {"name": "c", "path": paths[2], "weight": 0.2, "eval_path": eval_path}]
    run = tmp_path / "run"
    args = [f"model.{k}={v}" for k, v in MODEL.items()] + [
        f"data.sources={json.dumps(sources)}", "data.seq_len=16", "data.global_batch_tokens=64",
        "train.precision=fp32", f"train.run_dir={run}", 'train.progress_bar="off"', "train.steps=4",
        "train.eval_interval=2", "train.seed=11", "optim.lr=1e-2"]
    rc, err = main(args)
    assert (rc, err) == (0, []), err
    assert "data: mixture of 3 sources" in main.out and re.search(r"eval 4/4  loss .*  a \S+  b \S+  c \S+", main.out)
    train, evals = read_metrics(run / "metrics.jsonl")
    record = evals[-1]
    assert [r["step"] for r in evals] == [2, 4]
    # tools/plot_metrics.py draws one eval curve per source beside the mixture's.
    curves = loss_curves(train, evals)
    assert sorted(curves) == ["eval", "eval a", "eval b", "eval c", "train"]
    assert curves["eval b"] == ([2, 4], [r["eval_loss/b"] for r in evals])
    assert plot_metrics(run / "metrics.jsonl", tmp_path / "curves.png").stat().st_size > 0

    # The final weights in fp32 (a run from scratch exports bf16 by default), read by transformers.
    megasft_to_hf(run / "checkpoints", tmp_path / "hf", dtype="fp32")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    pooled_sum, pooled_tokens = 0.0, 0
    for src in sources:
        if "eval_path" in src:
            ds = IndexedDataset(src["eval_path"])
            docs = range(len(ds))
        else:
            ds = IndexedDataset(src["path"])
            docs = split_documents(len(ds), src["eval_fraction"], 11)[1]
        loss_sum, tokens = 0.0, 0
        for d in docs:
            ids, mask = (torch.from_numpy(np.asarray(a, np.int64)) for a in ds[d])
            labels = torch.where(mask.bool(), ids, -100)
            labels[0] = -100
            with torch.no_grad():
                logits = model(ids[None]).logits[0, :-1]
            target = labels[1:]
            n = int((target != -100).sum())
            if n:
                loss_sum += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
                tokens += n
        assert record[f"eval_tokens/{src['name']}"] == tokens
        # fp32 both ways; packing (several documents per row, varlen attention) changes only the
        # summation order: relative 1e-5 is far below one step's change of the loss (lr 1e-2).
        assert record[f"eval_loss/{src['name']}"] == pytest.approx(loss_sum / tokens, rel=1e-5)
        pooled_sum, pooled_tokens = pooled_sum + loss_sum, pooled_tokens + tokens
    assert record["eval_tokens"] == pooled_tokens
    assert record["eval_loss"] == pytest.approx(pooled_sum / pooled_tokens, rel=1e-5)
